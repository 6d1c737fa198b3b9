"""The one place that chooses native modules or their pure-Python reference twins.

``ENGINE_NO_EXTENSIONS=1`` selects the twins everywhere. Tests import both explicitly and prove
them equal; the rest of the engine imports only from here.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

NO_EXTENSIONS = os.environ.get("ENGINE_NO_EXTENSIONS", "") not in ("", "0")


def load(name: str) -> ModuleType:
    """Return ``engine._<name>`` (native) or ``engine._<name>_py`` (twin), per the switch.

    A missing native build falls back to the twin only when the switch is set; otherwise the
    ImportError says how to build.
    """
    twin = importlib.import_module(f"engine._{name}_py")
    if NO_EXTENSIONS:
        return twin
    try:
        return importlib.import_module(f"engine._{name}")
    except ImportError as exc:  # pragma: no cover - exercised only on broken installs
        raise ImportError(
            f"engine's native module engine._{name} is not built: run "
            "`pip install -e .` (or `python setup.py build_ext --inplace`), "
            "or set ENGINE_NO_EXTENSIONS=1 to use the pure-Python twins"
        ) from exc
