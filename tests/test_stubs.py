"""The hand-written stubs of the native modules (engine/_<name>.pyi) against the compiled modules.

``python -m mypy.stubtest`` imports each native module and compares every public name,
signature (parameter names, kinds, defaults) and ``Final`` value with its stub; the allowlist
(tests/stubtest_allowlist.txt) holds only what cannot be expressed, each entry with its reason.
A mypy run over typed code then proves that the stubs are what a user's mypy sees: the typed
code passes ``--strict`` (and runs), and each deliberate misuse is reported on its own line.

Both mypy runs use tests/stubtest_mypy.ini, which checks the stubs but not the rest of the
package, with their cache in tmp_path. By hand, from the project root::

    python -m mypy.stubtest --mypy-config-file tests/stubtest_mypy.ini \
        --allowlist tests/stubtest_allowlist.txt engine._codec engine._kernels engine._keys \
        engine._dispatch engine._multimap
"""

from __future__ import annotations

import configparser
import re
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "stubtest_mypy.ini"
ALLOWLIST = ROOT / "tests" / "stubtest_allowlist.txt"
MODULES = [
    "engine._codec",
    "engine._kernels",
    "engine._keys",
    "engine._dispatch",
    "engine._multimap",
]

# Typed use of every native module: mypy --strict must accept it, and it must run.
USES = """
from typing import Any

import numpy as np
from numpy.typing import NDArray

from engine import _codec, _dispatch, _kernels, _keys, _multimap

# _kernels: outputs are arrays of their exact dtype, inputs anything array-like
ids: NDArray[np.int64] = np.array([0, 1, 1], dtype=np.int64)
count = np.zeros(2, dtype=np.int64)
_kernels.reduce_count(count, ids)
_kernels.reduce_sum(np.zeros(2), ids, [1.0, 2.0, 3.0], mask=np.ones(3, dtype=np.bool_))
_kernels.fold_count_sum_last(count, np.zeros(2), np.zeros(2), ids, np.ones(3))
state, shadow = np.array([5.0, 6.0]), np.zeros(2)
out_ids, out_old, out_new = np.zeros(3, dtype=np.int64), np.zeros(3), np.zeros(3)
n: int = _kernels.watch_diff(ids, np.ones(2, np.bool_), state, shadow, out_ids, out_old, out_new)
assert n == 2
best: NDArray[np.int64] = _kernels.topk(np.arange(5.0), np.int64(2))
top, fill = np.zeros((2, 3)), np.zeros(2, dtype=np.int64)
_kernels.topk_push(top, fill, ids, [1.0, 2.0, 3.0])
largest: NDArray[np.float64] = _kernels.topk_read(top, fill, 1)
out, row = _kernels.fan_out([0, 2, 3], np.arange(3, dtype=np.int64), cap=1)

# _codec: raw byte buffers (numpy arrays too), SCAN_* codes, the header as a TypedDict
crc: int = _codec.crc32c(b"abc", _codec.crc32c(np.zeros(4, np.uint8)))
buf = bytearray(256)
length = _codec.encode_frame(
    buf, 0, 0, 2, 1, 0, 0, [(1, 0, 4, 2, np.arange(2, dtype=np.int64), None)]
)
positions, firsts, counts, stop, status = _codec.scan_frames(buf, 0, len(buf), 0)
assert status == _codec.SCAN_END and stop == length and counts.tolist() == [2]
frame_bytes: int = _codec.frame_header(bytes(buf), 0)["length"]

# _keys
interner = _keys.Int64Interner(16, seed=1)
got: NDArray[np.int64] = interner.intern([10, 20, 10])
one: int = interner.intern_one(np.int64(30))
assert 20 in interner and len(interner) == 3
shard_ids: NDArray[np.int32] = _keys.shard_of_strs(["a", b"b"], 4)
hashed: NDArray[np.uint64] = _keys.splitmix64(ids)

# _multimap
mm = _multimap.MultiMap.from_pairs([0, 0], [5, 6])
added: NDArray[np.bool_] = mm.add([1], [7])
offsets, values = mm.get_many([0, 1], limit=1)
assert values.tolist() == [5, 7] and mm.length(0) == 2 < _multimap.KEY_MAX

# _dispatch
def validate_row(*values: Any) -> tuple[Any, ...]:
    return values

rb = _dispatch.RowBuffer(2, [(1, ("int64", "string"), 0)], on_full=None)
dispatch = rb.dispatcher(1, [None, None], validate_row)
offset: int = dispatch(1, "x")
shard: int = rb.last_shard
type_col, columns = rb.take(shard)
assert type_col is None and columns[1][1] == ["x"] and offset == 0
"""

# Each line marked "# E:" must get a mypy error (and no other line may).
MISUSES = """
import numpy as np

from engine import _codec, _dispatch, _kernels, _keys, _multimap

ids = np.array([0, 1], dtype=np.int64)
text: str = _kernels.watch_diff(ids, ids, ids, ids, ids, ids, ids)  # E: returns int
_codec.crc32c("text")  # E: a str is not a byte buffer
_kernels.fold_count_sum_last(ids, ids, np.zeros(2), ids, ids)  # E: sum and last dtypes differ
_multimap.MultiMap(5)  # E: seed is keyword-only
_codec.frame_header(b"", 0)["lenght"]  # E: no such header field
_dispatch.RowBuffer(1, []).shards = 2  # E: read-only property
_keys.Int64Interner().intern_one("7")  # E: not an integer
"""

ERROR = re.compile(r"^(?P<path>.+?):(?P<line>\d+): error: ")


def _python_m(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m ARGS`` from the project root (so ``engine`` is the in-place build)."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def config(tmp_path: Path) -> str:
    """tests/stubtest_mypy.ini with the cache in tmp_path (stubtest ignores MYPY_CACHE_DIR)."""
    text = CONFIG.read_text()
    assert "\n[mypy]\n" in text
    path = tmp_path / "mypy.ini"
    path.write_text(text.replace("\n[mypy]\n", f"\n[mypy]\ncache_dir = {tmp_path / 'cache'}\n"))
    return str(path)


def test_every_native_module_has_a_stub():
    native = {"engine." + p.stem for p in (ROOT / "ext").glob("*.pyx")}
    assert native == set(MODULES)
    assert all((ROOT / "engine" / f"{m.split('.')[1]}.pyi").is_file() for m in MODULES)
    config = configparser.ConfigParser()
    config.read(CONFIG)
    sections = [s.removeprefix("mypy-") for s in config.sections() if s.startswith("mypy-")]
    checked = {m for s in sections if s != "engine.*" for m in s.split(",")}
    assert checked == set(MODULES), f"list every stubbed module in {CONFIG.name}"


def test_stubtest(config):
    proc = _python_m(
        "mypy.stubtest", "--mypy-config-file", config, "--allowlist", str(ALLOWLIST), *MODULES
    )
    assert proc.returncode == 0, f"stubtest failed:\n{proc.stdout}\n{proc.stderr}"


def test_mypy_uses_the_stubs(tmp_path, config):
    uses = tmp_path / "uses_stubs.py"
    misuses = tmp_path / "misuses_stubs.py"
    uses.write_text(textwrap.dedent(USES).lstrip())
    misuses.write_text(textwrap.dedent(MISUSES).lstrip())
    expected = {i for i, line in enumerate(misuses.read_text().splitlines(), 1) if "# E:" in line}
    proc = _python_m("mypy", "--strict", "--config-file", config, str(uses), str(misuses))
    output = f"{proc.stdout}\n{proc.stderr}"
    errors = [m for m in map(ERROR.match, proc.stdout.splitlines()) if m]
    elsewhere = [m.group(0) for m in errors if Path(m["path"]).name != misuses.name]
    assert not elsewhere, f"mypy rejects the typed use or the stubs themselves:\n{output}"
    lines = {int(m["line"]) for m in errors}
    assert lines == expected, (
        f"misuse lines {sorted(expected)} should each get an error, got {sorted(lines)}:\n{output}"
    )
    assert proc.returncode == 1, output  # 2 would be a crash or a bad invocation

    runpy.run_path(str(uses), run_name="uses_stubs")  # the typed code also runs
