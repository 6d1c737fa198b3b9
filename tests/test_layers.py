"""Imports point down (STYLE.md habit 2): a module may import only from lower layers."""

from __future__ import annotations

import ast
import os

ENGINE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "engine")

LAYERS = [
    {"errors", "limits", "workload", "benchreport", "reducers", "fsutil", "progress", "clock"},
    {"_codec_py", "_keys_py", "_kernels_py", "_multimap_py", "jit",
     "_codec", "_keys", "_kernels", "_multimap"},
    {"_impl", "_dispatch_py", "_dispatch"},
    {"validate", "keys"},
    {"schema"},
    {"frame"},
    {"segment"},
    {"shardlog", "compaction"},
    {"log", "state"},
    {"store"},
    {"subscribe", "derive", "rebuild"},
    {"app", "tools"},
    {"demo", "testing"},
    {"sweep"},
    {"cli", "__init__"},
    {"__main__"},
]
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def engine_imports(path: str) -> set[str]:
    """Engine modules imported by the file (relative or absolute, also inside functions)."""
    tree = ast.parse(open(path).read())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 or mod.startswith("engine"):
                parts = mod.split(".")
                name = parts[-1] if node.level == 1 and mod else (parts[1] if len(parts) > 1 else "")
                if name:
                    out.add(name)
                else:  # "from . import x" / "from engine import x"
                    out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("engine."))
    return out


def test_every_module_has_a_layer():
    mods = {f[:-3] for f in os.listdir(ENGINE) if f.endswith(".py")}
    assert mods <= set(LAYER), f"give these modules a layer: {sorted(mods - set(LAYER))}"


def test_imports_point_down():
    upward = []
    for f in sorted(os.listdir(ENGINE)):
        if not f.endswith(".py"):
            continue
        me = f[:-3]
        for dep in engine_imports(os.path.join(ENGINE, f)):
            if dep in LAYER and LAYER[dep] >= LAYER[me] and dep != me:
                upward.append(f"{me} (layer {LAYER[me]}) imports {dep} (layer {LAYER[dep]})")
    assert not upward, "\n".join(upward)
