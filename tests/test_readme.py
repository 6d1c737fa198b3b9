"""The README's Python examples run as written (in a fresh directory), and where a line's
comment shows a value (``store.get(3)   # {'n': 143, ...}``) the line gives that value."""

from __future__ import annotations

import ast
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", open(README).read(), re.S)


def test_the_readme_has_examples():
    assert len(blocks()) >= 2


@pytest.mark.parametrize("i", range(len(blocks())))
def test_readme_example_runs(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = blocks()[i]
    claims = []
    for line in code.splitlines():
        m = re.match(r"^(\w+\.get\(\d+\))\s+# (\{[^}]*\})", line)
        if m and "array" not in m.group(2):
            claims.append((m.group(1), ast.literal_eval(m.group(2))))
    ns: dict = {}
    exec(compile(code, f"README block {i}", "exec"), ns)
    for expr, shown in claims:
        assert eval(expr, ns) == shown, f"README says {expr} gives {shown}"
