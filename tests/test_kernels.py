"""engine._kernels (native) == engine._kernels_py (twin) == a plain-Python model, bit for bit.

Every reducer is run on Hypothesis batches (repeated ids, empty batches, masks of both dtypes,
int64 extremes that wrap, floats with NaN, -0.0 and infinities) against a dict-and-loop model
written from the contract, not from either implementation. Then: folding any split of a batch
equals one call; read-only arrays and read-only memmaps are accepted as inputs and writeable
memmaps as outputs; a too-short output raises ValueError and is left untouched; big outputs
take the native prefetching path; both modules reject bad arguments with the same exception
and message. The numba tier (engine.jit) is held to the twin too, when numba is installed.
Per-key top k (``topk_push``) is also run from states no push could leave (unsorted, NaN), where
native and twin must still agree bit for bit.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine import _kernels as native
from engine import _kernels_py as twin

MODULES = [pytest.param(native, id="native"), pytest.param(twin, id="twin")]
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
RING_WIDTH = 3
FAST = settings(deadline=None, max_examples=80,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HAVE_NUMBA = importlib.util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed (pip install numba)")


# ---- batches -----------------------------------------------------------------------------------


@dataclass
class Batch:
    nkeys: int
    ids: np.ndarray
    values: np.ndarray
    mask: np.ndarray | None

    def rows(self) -> list[tuple[int, Any]]:
        """The kept (id, value) rows in order, as Python scalars."""
        keep = [True] * len(self.ids) if self.mask is None else (self.mask != 0).tolist()
        return [(k, v) for k, v, m in zip(self.ids.tolist(), self.values.tolist(), keep) if m]


INTS = st.one_of(st.integers(INT64_MIN, INT64_MAX), st.integers(-3, 3),
                 st.sampled_from([INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3).map(float),
                   st.sampled_from([0.0, -0.0, math.nan, -math.nan, math.inf, -math.inf,
                                    1e308, -1e308, 5e-324]))


@st.composite
def batches(draw, dtype: str | None = None, max_rows: int = 60) -> Batch:
    nkeys = draw(st.integers(1, 12))
    n = draw(st.integers(0, max_rows))
    ids = np.array(draw(st.lists(st.integers(0, nkeys - 1), min_size=n, max_size=n)), np.int64)
    dtype = dtype or draw(st.sampled_from(["int64", "float64"]))
    vals = draw(st.lists(INTS if dtype == "int64" else FLOATS, min_size=n, max_size=n))
    values = np.array(vals, dtype=dtype)
    kind = draw(st.sampled_from([None, "bool", "uint8"]))
    mask = None
    if kind == "bool":
        mask = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    elif kind == "uint8":  # any non-zero byte keeps the row
        mask = np.array(draw(st.lists(st.integers(0, 255), min_size=n, max_size=n)), np.uint8)
    return Batch(nkeys, ids, values, mask)


# ---- the model: the contract as plain Python ---------------------------------------------------


def wrap64(x: int) -> int:
    return (x + (1 << 63)) % (1 << 64) - (1 << 63)


def add(a: Any, b: Any) -> Any:
    return wrap64(a + b) if isinstance(a, int) else a + b


def is_nan(x: Any) -> bool:
    return isinstance(x, float) and x != x


def extreme(cands: list[Any], largest: bool) -> Any:
    """Smallest (largest) non-NaN value, the first among equals; else the first NaN."""
    numbers = [c for c in cands if not is_nan(c)]
    if not numbers:
        return cands[0]
    best = max(numbers) if largest else min(numbers)
    return next(c for c in numbers if c == best)


def model(op: str, state: list[list[Any]], b: Batch) -> list[list[Any]]:
    """The state after folding b: per-key lists in, per-key lists out."""
    st_ = [list(x) for x in state]
    rows = b.rows()
    if op == "count":
        for k, _ in rows:
            st_[0][k] += 1
    elif op == "sum":
        for k, v in rows:
            st_[0][k] = add(st_[0][k], v)
    elif op in ("min", "max"):
        out, seen = st_
        for k in sorted({k for k, _ in rows}):
            cands = ([out[k]] if seen[k] else []) + [v for kk, v in rows if kk == k]
            out[k], seen[k] = extreme(cands, op == "max"), True
    elif op in ("first", "last"):
        out, seen = st_
        for k, v in rows:
            if op == "last" or not seen[k]:
                out[k] = v
            seen[k] = True
    elif op == "fold":
        count, total, last = st_
        for k, v in rows:
            count[k] += 1
            total[k] = add(total[k], v)
            last[k] = v
    elif op == "rows":   # state[k] = [count, sum, last, padding...]
        for k, v in rows:
            row = st_[0][k]
            row[0], row[1], row[2] = row[0] + 1, add(row[1], v), v
    elif op == "ring":
        ring, head = st_
        for k, v in rows:
            ring[k][head[k] % len(ring[k])] = v
            head[k] += 1
    elif op == "topk":   # a sorted list per key: after every value >= v, then cut to k
        top, fill = st_
        for k, v in rows:
            if is_nan(v):
                continue
            kept = top[k][: fill[k]]
            kept.insert(sum(1 for x in kept if x >= v), v)
            kept = kept[: len(top[k])]
            top[k][: len(kept)] = kept
            fill[k] = len(kept)
    return st_


# ---- the kernels under test, one shape each ---------------------------------------------------


@dataclass
class Op:
    dtype: str | None  # None: int64 and float64
    init: Callable[[Batch, np.random.Generator], tuple[np.ndarray, ...]]
    call: Callable[[Any, tuple[np.ndarray, ...], Batch], None]
    numba: str | None  # the engine.jit kernel, if any


def _vals(b: Batch, rng: np.random.Generator, n: int) -> np.ndarray:
    if b.values.dtype == np.int64:
        return rng.integers(-5, 5, n).astype(np.int64)
    return rng.normal(size=n).round(2)


def _seen_init(b, rng):
    return _vals(b, rng, b.nkeys), rng.integers(0, 2, b.nkeys).astype(bool)


def _topk_init(b, rng, widths=(1, 2, 3, 5, 8)):
    """A state topk_push may have left: k largest first up to fill[k], junk after."""
    width = int(rng.choice(widths))
    top = _vals(b, rng, b.nkeys * width).reshape(b.nkeys, width)
    fill = rng.integers(0, width + 1, b.nkeys).astype(np.int64)
    for k in range(b.nkeys):
        top[k, : fill[k]] = np.sort(top[k, : fill[k]])[::-1]
    return top, fill


OPS: dict[str, Op] = {
    "count": Op(None, lambda b, r: (r.integers(0, 5, b.nkeys).astype(np.int64),),
                lambda m, s, b: m.reduce_count(*s, b.ids, b.mask), "reduce_count_numba"),
    "sum": Op(None, lambda b, r: (_vals(b, r, b.nkeys),),
              lambda m, s, b: m.reduce_sum(*s, b.ids, b.values, b.mask), "reduce_sum_numba"),
    "min": Op(None, _seen_init, lambda m, s, b: m.reduce_min(*s, b.ids, b.values, b.mask),
              "reduce_min_numba"),
    "max": Op(None, _seen_init, lambda m, s, b: m.reduce_max(*s, b.ids, b.values, b.mask),
              "reduce_max_numba"),
    "first": Op(None, _seen_init, lambda m, s, b: m.reduce_first(*s, b.ids, b.values, b.mask),
                "reduce_first_numba"),
    "last": Op(None, _seen_init, lambda m, s, b: m.reduce_last(*s, b.ids, b.values, b.mask),
               "reduce_last_numba"),
    "fold": Op(None, lambda b, r: (r.integers(0, 5, b.nkeys).astype(np.int64),
                                   _vals(b, r, b.nkeys), _vals(b, r, b.nkeys)),
               lambda m, s, b: m.fold_count_sum_last(*s, b.ids, b.values, b.mask),
               "fold_count_sum_last_numba"),
    "rows": Op(None, lambda b, r: (_vals(b, r, b.nkeys * 4).reshape(b.nkeys, 4)[:, :int(
                   r.integers(3, 5))].copy(),),
               lambda m, s, b: m.fold_count_sum_last_rows(*s, b.ids, b.values, b.mask),
               "fold_count_sum_last_rows_numba"),
    "ring": Op("int64", lambda b, r: (r.integers(-5, 5, (b.nkeys, RING_WIDTH)),
                                      r.integers(0, 7, b.nkeys).astype(np.int64)),
               lambda m, s, b: m.ring_push(*s, b.ids, b.values, b.mask), "ring_push_numba"),
    "topk": Op(None, _topk_init, lambda m, s, b: m.topk_push(*s, b.ids, b.values, b.mask),
               "topk_push_numba"),
}
OP_NAMES = list(OPS)


def fresh(state: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    return tuple(a.copy() for a in state)


def same_bits(got: tuple[np.ndarray, ...], want: tuple[np.ndarray, ...]) -> bool:
    return all(g.dtype == w.dtype and g.shape == w.shape and g.tobytes() == w.tobytes()
               for g, w in zip(got, want))


def as_arrays(lists: list[list[Any]], like: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    return tuple(np.array(x, dtype=a.dtype).reshape(a.shape) for x, a in zip(lists, like))


def draw_case(data, op: str) -> tuple[Batch, tuple[np.ndarray, ...]]:
    b = data.draw(batches(OPS[op].dtype), label="batch")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    return b, OPS[op].init(b, rng)


# ---- native == twin == model ------------------------------------------------------------------


@pytest.mark.parametrize("op", OP_NAMES)
@FAST
@given(data=st.data())
def test_native_twin_and_model_agree_bit_for_bit(op, data):
    b, state0 = draw_case(data, op)
    want = as_arrays(model(op, [a.tolist() for a in state0], b), state0)
    for mod in (native, twin):
        state = fresh(state0)
        assert OPS[op].call(mod, state, b) is None
        assert same_bits(state, want), (mod.__name__, state, want)


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("op", OP_NAMES)
@FAST
@given(data=st.data())
def test_any_split_folds_to_the_one_shot_state(mod, op, data):
    b, state0 = draw_case(data, op)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(b.ids)), max_size=4), label="cuts"))
    whole, pieces = fresh(state0), fresh(state0)
    OPS[op].call(mod, whole, b)
    for lo, hi in zip([0, *cuts], [*cuts, len(b.ids)]):
        part = Batch(b.nkeys, b.ids[lo:hi], b.values[lo:hi],
                     None if b.mask is None else b.mask[lo:hi])
        OPS[op].call(mod, pieces, part)
    assert same_bits(pieces, whole)


def test_int64_sums_wrap_and_float_sums_add_in_row_order():
    ids = np.zeros(3, np.int64)
    for mod in (native, twin):
        s = np.array([INT64_MAX], np.int64)
        mod.reduce_sum(s, ids, np.array([1, 1, INT64_MIN], np.int64))
        assert s[0] == wrap64(INT64_MAX + 2 + INT64_MIN)
        f = np.zeros(1)
        mod.reduce_sum(f, ids, np.array([1e16, 1.0, 1.0]))
        assert f[0] == (1e16 + 1.0) + 1.0 != 1e16 + 2.0


@pytest.mark.parametrize("mod", MODULES)
def test_min_max_keep_the_first_of_equals_and_nan_loses(mod):
    ids = np.zeros(4, np.int64)
    vals = np.array([math.nan, 0.0, -0.0, math.nan])
    out, seen = np.zeros(1), np.zeros(1, bool)
    mod.reduce_min(out, seen, ids, vals)
    assert out.tobytes() == np.array([0.0]).tobytes() and seen[0]
    out, seen = np.zeros(1), np.zeros(1, bool)
    mod.reduce_max(out, seen, ids[:1], vals[:1])
    assert math.isnan(out[0]) and seen[0]   # only NaN so far: it stays
    mod.reduce_max(out, seen, ids[:3], vals[1:])
    assert out.tobytes() == np.array([0.0]).tobytes()


# ---- memory: read-only and memmapped inputs, memmapped outputs, short outputs ----------------


def memmap_of(tmp_path, a: np.ndarray, name: str, mode: str = "r") -> np.memmap:
    """A memmap of a's bytes: "r" read-only, "r+" writeable (shared with the file)."""
    path = tmp_path / name
    a.tofile(path)
    return np.memmap(path, dtype=a.dtype, mode=mode, shape=a.shape)


def read_only(a: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return None
    a = a.copy()
    a.setflags(write=False)
    return a


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("dtype", ["int64", "float64"])
def test_read_only_and_memmapped_inputs_memmapped_outputs(mod, op, dtype, tmp_path):
    if OPS[op].dtype not in (None, dtype):
        pytest.skip(f"{op} takes {OPS[op].dtype} values only")
    rng = np.random.default_rng(7)
    n, nkeys = 500, 40
    ids = rng.integers(0, nkeys, n).astype(np.int64)
    vals = rng.integers(-9, 9, n).astype(dtype)
    mask = rng.integers(0, 2, n).astype(bool)
    b = Batch(nkeys, ids, vals, mask)
    state0 = OPS[op].init(b, rng)
    want = fresh(state0)
    OPS[op].call(mod, want, b)
    for batch in (Batch(nkeys, read_only(ids), read_only(vals), read_only(mask)),
                  Batch(nkeys, memmap_of(tmp_path, ids, "ids"), memmap_of(tmp_path, vals, "v"),
                        memmap_of(tmp_path, mask, "m"))):
        state = tuple(memmap_of(tmp_path, a, f"out{j}", mode="r+") for j, a in enumerate(state0))
        OPS[op].call(mod, state, batch)
        for a in state:
            a.flush()
        assert same_bits(tuple(np.asarray(a) for a in state), want)


def short_state(op: str, b: Batch) -> tuple[np.ndarray, ...]:
    """Outputs one key shorter than the largest id needs (rows/ring: shorter along axis 0)."""
    rng = np.random.default_rng(1)
    full = OPS[op].init(Batch(b.nkeys, b.ids, b.values, b.mask), rng)
    return tuple(a[: b.nkeys - 1].copy() for a in full)


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("bad", [5, -1, INT64_MIN, INT64_MAX])
def test_an_out_of_range_id_raises_before_anything_is_written(mod, op, bad):
    ids = np.array([0, 1, 2, 3, 4, bad], np.int64)   # the outputs hold keys 0..4
    b = Batch(6, ids, np.arange(6, dtype=np.int64), None)
    state = short_state(op, b)
    before = fresh(state)
    with pytest.raises(ValueError, match=r"key_ids\[5\] = .* is outside the outputs"):
        OPS[op].call(mod, state, b)
    assert same_bits(state, before)


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("op", OP_NAMES)
def test_rows_the_mask_drops_may_hold_any_id(mod, op):
    ids = np.array([0, -1, 1, 10**12, 2], np.int64)   # e.g. lookup()'s -1 for unseen keys
    mask = np.array([1, 0, 1, 0, 1], np.uint8)
    b = Batch(3, ids, np.arange(5, dtype=np.int64), mask)
    state = OPS[op].init(b, np.random.default_rng(2))
    want = as_arrays(model(op, [a.tolist() for a in state], b), state)
    OPS[op].call(mod, state, b)
    assert same_bits(state, want)


# ---- the native prefetching path: outputs bigger than the L2 ----------------------------------


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("n", [0, 1, 127, 128, 129, 20_000])
def test_big_outputs_take_the_prefetch_path_and_agree(op, n):
    rng = np.random.default_rng(n)
    nkeys = 200_000  # >= 1 MiB per output: the native loops prefetch 128 rows ahead
    for dtype in (["int64", "float64"] if OPS[op].dtype is None else [OPS[op].dtype]):
        ids = rng.integers(0, nkeys, n).astype(np.int64)
        mask = rng.integers(0, 2, n).astype(bool)
        ids[~mask] = rng.choice([-1, nkeys, INT64_MIN, INT64_MAX], (~mask).sum())  # dropped
        b = Batch(nkeys, ids, rng.integers(-100, 100, n).astype(dtype), mask)
        state0 = OPS[op].init(b, rng)
        got, want = fresh(state0), fresh(state0)
        OPS[op].call(native, got, b)
        OPS[op].call(twin, want, b)
        assert same_bits(got, want)


# ---- rings, change detection, ranking ----------------------------------------------------------


@pytest.mark.parametrize("mod", MODULES)
@FAST
@given(b=batches("int64", max_rows=80), width=st.integers(1, 5), head0=st.integers(0, 9))
def test_ring_read_gives_the_last_n_newest_first(mod, b, width, head0):
    ring = np.full((b.nkeys, width), -7, np.int64)
    head = np.full(b.nkeys, head0, np.int64)
    history = [deque([-7] * min(head0, width), maxlen=width) for _ in range(b.nkeys)]
    mod.ring_push(ring, head, b.ids, b.values, b.mask)
    for k, v in b.rows():
        history[k].append(v)
    for k in range(b.nkeys):
        got = mod.ring_read(ring, head, k)
        assert got.dtype == np.int64 and got.tolist() == list(reversed(history[k]))


def test_ring_heads_are_unsigned_counts():
    for mod in (native, twin):
        ring, head = np.zeros((1, 3), np.int64), np.array([-1], np.int64)  # 2**64 - 1 pushes
        mod.ring_push(ring, head, np.zeros(2, np.int64), np.array([5, 6], np.int64))
        assert head[0] == 1 and ring[0].tolist() == [6, 0, 0]  # slot (2**64 - 1) % 3, then 0
        assert mod.ring_read(ring, head, 0).tolist() == [6]


@pytest.mark.parametrize("mod", MODULES)
@FAST
@given(b=batches(), k=st.integers(0, 70))
@example(b=Batch(5, np.zeros(5, np.int64), np.array([1, 5, 5, 5, 2], np.int64), None), k=2)
@example(b=Batch(4, np.zeros(4, np.int64), np.array([math.nan, -0.0, 0.0, -math.inf]), None), k=4)
def test_topk_largest_first_ties_by_smaller_id(mod, b, k):
    values, mask = b.values, b.mask
    keep = [True] * len(values) if mask is None else (mask != 0).tolist()

    def rank(i: int) -> tuple:
        v = values.tolist()[i]
        return (1, 0.0, i) if is_nan(v) else (0, -v, i)   # NaN after every number

    want = sorted((i for i in range(len(values)) if keep[i]), key=rank)[:k]
    got = mod.topk(values, k, mask)
    assert got.dtype == np.int64 and got.tolist() == want


# ---- per-key top k ---------------------------------------------------------------------------


def topk_model(top: np.ndarray, fill: np.ndarray, b: Batch) -> tuple[np.ndarray, np.ndarray]:
    return as_arrays(model("topk", [top.tolist(), fill.tolist()], b), (top, fill))


@st.composite
def crowded(draw, max_rows: int = 300) -> Batch:
    """Few keys, many rows: keys fill up, then most values compete with the smallest kept."""
    b = draw(batches(max_rows=max_rows))
    nkeys = draw(st.integers(1, 3))
    return Batch(nkeys, b.ids % nkeys, b.values, b.mask)


@pytest.mark.parametrize("width", [1, 2, 64, 300])
@FAST
@given(b=crowded(), seed=st.integers(0, 2**32 - 1))
def test_topk_k1_and_large_k_agree_with_the_model(width, b, seed):
    state0 = _topk_init(b, np.random.default_rng(seed), widths=(width,))
    want = topk_model(*state0, b)
    for mod in (native, twin):
        state = fresh(state0)
        mod.topk_push(*state, b.ids, b.values, b.mask)
        assert same_bits(state, want), mod.__name__


@pytest.mark.parametrize("mod", MODULES)
@FAST
@given(b=batches(max_rows=80), width=st.sampled_from([1, 2, 3, 5, 40]))
def test_topk_read_gives_the_kept_values_largest_first(mod, b, width):
    top = np.full((b.nkeys, width), 7, b.values.dtype)   # junk: fill says what is used
    fill = np.zeros(b.nkeys, np.int64)
    want = model("topk", [top.tolist(), fill.tolist()], b)
    for cut in range(0, len(b.ids) + 1, 25):   # in pieces, reading back in between
        part = Batch(b.nkeys, b.ids[cut:cut + 25], b.values[cut:cut + 25],
                     None if b.mask is None else b.mask[cut:cut + 25])
        mod.topk_push(top, fill, part.ids, part.values, part.mask)
    for key in range(-2, b.nkeys + 2):
        got = mod.topk_read(read_only(top), read_only(fill), key)
        assert got.dtype == top.dtype and got.ndim == 1
        if not 0 <= key < b.nkeys:
            assert got.shape == (0,)
            continue
        expect = np.array(want[0][key][: want[1][key]], dtype=top.dtype)
        assert got.tobytes() == expect.tobytes()
        if got.shape[0]:   # a copy, not a view of the state
            got[0] = 0
            assert top[key, 0].tobytes() == expect[:1].tobytes()


@pytest.mark.parametrize("mod", MODULES)
def test_topk_read_accepts_memmaps_and_short_fill(mod, tmp_path):
    top = np.array([[5, 3], [9, 9], [4, 0]], np.int64)
    fill = np.array([2, 1], np.int64)   # shorter than top: key 2 is outside
    t, f = memmap_of(tmp_path, top, "top"), memmap_of(tmp_path, fill, "fill")
    got = mod.topk_read(t, f, 0)
    assert type(got) is np.ndarray and got.tolist() == [5, 3]
    assert mod.topk_read(t, f, 1).tolist() == [9]
    assert mod.topk_read(t, f, 2).tolist() == [] and mod.topk_read(t, f, 2).dtype == np.int64
    assert mod.topk_read(np.zeros((0, 3)), np.zeros(0, np.int64), 0).dtype == np.float64


@pytest.mark.parametrize("mod", MODULES)
def test_topk_ties_keep_arrival_order_and_nan_never_enters(mod):
    top, fill = np.full((1, 2), 9.0), np.zeros(1, np.int64)
    one = np.zeros(1, np.int64)

    def bits(a: np.ndarray) -> list[float]:   # the signs, so that -0.0 and 0.0 differ
        return [math.copysign(1, x) for x in a.tolist()]

    mod.topk_push(top, fill, one, [math.nan])
    assert fill[0] == 0 and top.tolist() == [[9.0, 9.0]]
    mod.topk_push(top, fill, np.zeros(3, np.int64), [0.0, -0.0, -0.0])
    assert fill[0] == 2 and bits(top[0]) == [1, -1]   # -0.0 == 0.0 goes after; full: not in
    mod.topk_push(top, fill, one, [-0.0])   # equal to the smallest of a full key: not in
    assert bits(top[0]) == [1, -1]
    mod.topk_push(top, fill, np.zeros(2, np.int64), [math.nan, 1.0])
    assert top[0].tolist() == [1.0, 0.0] and bits(top[0]) == [1, 1] and fill[0] == 2
    mod.topk_push(top, fill, np.zeros(3, np.int64), [math.inf, -math.inf, 0.5])
    assert top[0].tolist() == [math.inf, 1.0]
    ti, fi = np.zeros((2, 3), np.int64), np.zeros(2, np.int64)
    keep = np.array([1, 1, 1, 1, 1, 0], bool)
    mod.topk_push(ti, fi, np.array([1, 1, 1, 1, 1, 0]),
                  np.array([INT64_MIN, 2, INT64_MAX, 2, 2, INT64_MIN]), keep)
    assert ti[1].tolist() == [INT64_MAX, 2, 2] and fi.tolist() == [0, 3]


FILL_BAD = [-1, 4, INT64_MIN, INT64_MAX]


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("bad", FILL_BAD)
@pytest.mark.parametrize("nkeys", [6, 1000])   # native: whole-fill pass first / per row only
def test_topk_a_bad_fill_raises_before_anything_is_written(mod, bad, nkeys):
    rng = np.random.default_rng(8)
    top, fill = rng.normal(size=(nkeys, 3)), np.zeros(nkeys, np.int64)
    fill[2] = bad
    ids = np.array([0, 1, 3, 2, 2, 4], np.int64)
    vals = np.arange(6.0)
    before = (top.copy(), fill.copy())
    msg = rf"fill\[2\] = {bad} \(key_ids\[3\]\) is outside \[0, 3\]"
    with pytest.raises(ValueError, match=msg):
        mod.topk_push(top, fill, ids, vals)
    assert same_bits((top, fill), before)
    keep = np.array([1, 1, 1, 0, 0, 1], bool)   # key 2 only in dropped rows: not read, no error
    mod.topk_push(top, fill, ids, vals, keep)
    assert fill[[0, 1, 2, 3, 4]].tolist() == [1, 1, bad, 1, 1]


@st.composite
def odd_states(draw) -> tuple[Batch, np.ndarray, np.ndarray]:
    """Any top and any fill in [0, k]: unsorted rows, NaN, junk (no push leaves these)."""
    b = draw(batches(max_rows=80))
    width = draw(st.integers(1, 6))
    vals = draw(st.lists(INTS if b.values.dtype == np.int64 else FLOATS,
                         min_size=b.nkeys * width, max_size=b.nkeys * width))
    top = np.array(vals, b.values.dtype).reshape(b.nkeys, width)
    fill = np.array(draw(st.lists(st.integers(0, width), min_size=b.nkeys, max_size=b.nkeys)),
                    np.int64)
    return b, top, fill


@FAST
@given(case=odd_states())
def test_topk_from_any_state_native_and_twin_agree_bit_for_bit(case):
    b, top0, fill0 = case
    want = fresh((top0, fill0))
    twin.topk_push(*want, b.ids, b.values, b.mask)
    got = fresh((top0, fill0))
    native.topk_push(*got, b.ids, b.values, b.mask)
    assert same_bits(got, want)
    assert ((0 <= want[1]) & (want[1] <= top0.shape[1])).all()
    if HAVE_NUMBA:
        import engine.jit as jit_module

        got = fresh((top0, fill0))
        jit_module.topk_push_numba(*got, b.ids, b.values, b.mask)
        assert same_bits(got, want)


def test_topk_push_runs_in_threads_on_its_own_outputs():
    rng = np.random.default_rng(9)
    ids, vals = rng.integers(0, 300_000, 400_000), rng.normal(size=400_000)
    outs = [(np.zeros((300_000, 4)), np.zeros(300_000, np.int64)) for _ in range(4)]
    threads = [threading.Thread(target=native.topk_push, args=(*o, ids, vals)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = (np.zeros((300_000, 4)), np.zeros(300_000, np.int64))
    twin.topk_push(*want, ids, vals)
    assert all(same_bits(o, want) for o in outs)


# ---- arguments: both modules reject alike ------------------------------------------------------


def raised(fn: Callable[[], Any]) -> tuple[type, str] | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the point is to compare them
        return type(exc), str(exc)
    return None


I8 = np.zeros(4, np.int64)
F8 = np.zeros(4)
IDS = np.array([0, 1, 2, 3], np.int64)
BAD_CALLS: dict[str, Callable[[Any], Any]] = {
    "values dtype != out": lambda m: m.reduce_sum(I8.copy(), IDS, F8),
    "int32 values": lambda m: m.reduce_sum(I8.copy(), IDS, IDS.astype(np.int32)),
    "float32 out": lambda m: m.reduce_sum(F8.astype(np.float32), IDS, F8),
    "int32 ids": lambda m: m.reduce_count(I8.copy(), IDS.astype(np.int32)),
    "2-D ids": lambda m: m.reduce_count(I8.copy(), IDS.reshape(2, 2)),
    "values too short": lambda m: m.reduce_sum(I8.copy(), IDS, I8[:3]),
    "mask too short": lambda m: m.reduce_count(I8.copy(), IDS, np.ones(3, bool)),
    "float mask": lambda m: m.reduce_count(I8.copy(), IDS, np.ones(4)),
    "read-only out": lambda m: m.reduce_count(read_only(I8), IDS),
    "strided out": lambda m: m.reduce_count(np.zeros(8, np.int64)[::2], IDS),
    "list out": lambda m: m.reduce_count([0, 0, 0, 0], IDS),
    "seen int64": lambda m: m.reduce_last(F8.copy(), I8.copy(), IDS, F8),
    "sum/last dtypes": lambda m: m.fold_count_sum_last(I8.copy(), I8.copy(), F8.copy(), IDS, F8),
    "rows of 2": lambda m: m.fold_count_sum_last_rows(np.zeros((4, 2), np.int64), IDS, I8),
    "rows dtypes": lambda m: m.fold_count_sum_last_rows(np.zeros((4, 3)), IDS, I8),
    "rows float32": lambda m: m.fold_count_sum_last_rows(np.zeros((4, 3), np.float32), IDS, F8),
    "rows F order": lambda m: m.fold_count_sum_last_rows(np.zeros((4, 3), np.int64, order="F"),
                                                         IDS, I8),
    "ring width 0": lambda m: m.ring_push(np.zeros((4, 0), np.int64), I8.copy(), IDS, I8),
    "ring float values": lambda m: m.ring_push(np.zeros((4, 2), np.int64), I8.copy(), IDS, F8),
    "ring_read key": lambda m: m.ring_read(np.zeros((4, 2), np.int64), I8, 4),
    "topk k < 0": lambda m: m.topk(I8, -1),
    "topk k float": lambda m: m.topk(I8, 1.5),
    "topk int32": lambda m: m.topk(IDS.astype(np.int32), 1),
    "topk mask": lambda m: m.topk(I8, 1, np.ones(3, bool)),
    "top k = 0": lambda m: m.topk_push(np.zeros((4, 0)), I8.copy(), IDS, F8),
    "top 1-D": lambda m: m.topk_push(F8.copy(), I8.copy(), IDS, F8),
    "top float32": lambda m: m.topk_push(np.zeros((4, 2), np.float32), I8.copy(), IDS, F8),
    "top/values dtypes": lambda m: m.topk_push(np.zeros((4, 2)), I8.copy(), IDS, I8),
    "top F order": lambda m: m.topk_push(np.zeros((4, 2), order="F"), I8.copy(), IDS, F8),
    "top read-only": lambda m: m.topk_push(read_only(np.zeros((4, 2))), I8.copy(), IDS, F8),
    "fill float": lambda m: m.topk_push(np.zeros((4, 2)), F8.copy(), IDS, F8),
    "fill read-only": lambda m: m.topk_push(np.zeros((4, 2)), read_only(I8), IDS, F8),
    "fill strided": lambda m: m.topk_push(np.zeros((4, 2)), np.zeros(8, np.int64)[::2], IDS, F8),
    "fill > k": lambda m: m.topk_push(np.zeros((4, 2)), np.array([0, 0, 3, 0]), IDS, F8),
    "fill < 0": lambda m: m.topk_push(np.zeros((4, 2)), np.array([0, -1, 0, 0]), IDS, F8),
    "top mask short": lambda m: m.topk_push(np.zeros((4, 2)), I8.copy(), IDS, F8, np.ones(3, bool)),
    "topk_read 1-D": lambda m: m.topk_read(F8, I8, 0),
    "topk_read float32": lambda m: m.topk_read(np.zeros((4, 2), np.float32), I8, 0),
    "topk_read fill float": lambda m: m.topk_read(np.zeros((4, 2)), F8, 0),
    "topk_read key float": lambda m: m.topk_read(np.zeros((4, 2)), I8, 1.5),
    "topk_read fill > k": lambda m: m.topk_read(np.zeros((4, 2)), np.array([0, 3, 0, 0]), 1),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_arguments_raise_the_same_error_in_both(name):
    got_n, got_t = raised(lambda: BAD_CALLS[name](native)), raised(lambda: BAD_CALLS[name](twin))
    assert got_n is not None and got_n == got_t


@pytest.mark.parametrize("mod", MODULES)
def test_inputs_may_be_lists_strided_or_empty_of_any_dtype(mod):
    c = np.zeros(4, np.int64)
    mod.reduce_count(c, [0, 1, 1])
    mod.reduce_count(c, np.arange(4, dtype=np.int64)[::2])   # strided: copied
    mod.reduce_count(c, np.array([], dtype=np.float64))
    s = np.zeros(4)
    mod.reduce_sum(s, [], [])
    assert c.tolist() == [2, 2, 1, 0] and s.tolist() == [0.0] * 4
    assert mod.topk([], 3).tolist() == []


# ---- native entry points: references and threads ----------------------------------------------


def test_native_entry_points_keep_reference_counts():
    rng = np.random.default_rng(3)
    ids, vals, mask = rng.integers(0, 50, 300), rng.normal(size=300), rng.integers(0, 2, 300)
    mask = mask.astype(bool)
    c, s, l, seen = np.zeros(50, np.int64), np.zeros(50), np.zeros(50), np.zeros(50, bool)
    top, fill = np.zeros((50, 4)), np.zeros(50, np.int64)
    args = (ids, vals, mask, c, s, l, seen, top, fill)
    before = [sys.getrefcount(a) for a in args]
    for _ in range(200):
        native.fold_count_sum_last(c, s, l, ids, vals, mask)
        native.reduce_max(s, seen, ids, vals, mask)
        native.watch_diff(ids, seen.view(np.uint8), s, l, np.empty(300, np.int64),
                          np.empty(300), np.empty(300))
        native.topk(vals, 5, mask)
        native.topk_push(top, fill, ids, vals, mask)
        native.topk_read(top, fill, 7)
        with pytest.raises(ValueError):
            native.reduce_count(c[:10], ids)
    assert [sys.getrefcount(a) for a in args] == before


def test_native_kernels_run_in_threads_on_their_own_outputs():
    rng = np.random.default_rng(4)
    ids, vals = rng.integers(0, 300_000, 400_000), rng.integers(-9, 9, 400_000)
    outs = [tuple(np.zeros(300_000, np.int64) for _ in range(3)) for _ in range(4)]
    threads = [threading.Thread(target=native.fold_count_sum_last, args=(*o, ids, vals))
               for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = tuple(np.zeros(300_000, np.int64) for _ in range(3))
    twin.fold_count_sum_last(*want, ids, vals)
    assert all(same_bits(o, want) for o in outs)


# ---- the numba tier ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jit():
    if not HAVE_NUMBA:
        pytest.skip("numba not installed")
    import engine.jit as jit_module

    return jit_module


@needs_numba
@pytest.mark.parametrize("op", OP_NAMES)
@settings(deadline=None, max_examples=40,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_numba_kernels_equal_the_twin(jit, op, data):
    b, state0 = draw_case(data, op)
    got, want = fresh(state0), fresh(state0)
    args = (b.ids,) if op == "count" else (b.ids, b.values)
    getattr(jit, OPS[op].numba)(*got, *args, b.mask)
    OPS[op].call(twin, want, b)
    assert same_bits(got, want)


@needs_numba
@pytest.mark.parametrize("op", OP_NAMES)
def test_numba_kernels_on_big_read_only_inputs_and_short_outputs(jit, op, tmp_path):
    rng = np.random.default_rng(5)
    n, nkeys = 5_000, 200_000
    ids = rng.integers(0, nkeys, n).astype(np.int64)
    vals = rng.integers(-9, 9, n).astype(np.int64)
    b = Batch(nkeys, memmap_of(tmp_path, ids, "ids"), memmap_of(tmp_path, vals, "v"), None)
    state0 = OPS[op].init(Batch(nkeys, ids, vals, None), rng)
    got, want = fresh(state0), fresh(state0)
    kernel = getattr(jit, OPS[op].numba)
    args = (b.ids,) if op == "count" else (b.ids, b.values)
    kernel(*got, *args, None)
    OPS[op].call(twin, want, b)
    assert same_bits(got, want)
    short = tuple(a[:10].copy() for a in state0)
    with pytest.raises(ValueError, match="is outside the outputs"):
        kernel(*short, *args, None)
    assert same_bits(short, tuple(a[:10] for a in state0))


@needs_numba
def test_kernel_decorator_compiles_checks_lengths_and_runs(jit):
    @jit.kernel
    def count_and_max(state, key_ids, columns, mask):
        count, best = state
        (v,) = columns
        for i in range(key_ids.shape[0]):
            if mask is not None and not mask[i]:
                continue
            k = key_ids[i]
            count[k] += 1
            best[k] = max(best[k], v[i])

    ids = np.array([0, 2, 2, 1], np.int64)
    v = np.array([5, 7, 3, 9], np.int64)
    count, best = np.zeros(3, np.int64), np.zeros(3, np.int64)
    count_and_max((count, best), ids, (v,), None)
    count_and_max((count, best), read_only(ids), (read_only(v),), np.array([1, 0, 0, 0], bool))
    assert count.tolist() == [2, 1, 2] and best.tolist() == [5, 9, 7]
    assert count_and_max.__name__ == "count_and_max"
    with pytest.raises(ValueError, match=r"count_and_max: key_ids\[1\] = 2 is outside"):
        count_and_max((count[:2], best), ids, (v,), None)
    assert count.tolist() == [2, 1, 2]
    with pytest.raises(ValueError, match="one entry per key id"):
        count_and_max((count, best), ids, (v[:2],), None)
    with pytest.raises(TypeError, match="writeable numpy array"):
        count_and_max((read_only(count), best), ids, (v,), None)


@needs_numba
def test_user_kernels_may_prefetch(jit):
    prefetch_write = jit.prefetch_write

    @jit.kernel
    def rows_fold(state, key_ids, columns, mask):
        (st,) = state
        (v,) = columns
        n = key_ids.shape[0]
        for i in range(n):
            if i + 8 < n:
                prefetch_write(st, (key_ids[i + 8], 0))
            k = key_ids[i]
            st[k, 0] += 1
            st[k, 1] += v[i]
            st[k, 2] = v[i]

    rng = np.random.default_rng(6)
    ids, v = rng.integers(0, 100, 1_000), rng.integers(-9, 9, 1_000)
    got, want = np.zeros((100, 3), np.int64), np.zeros((100, 3), np.int64)
    rows_fold((got,), ids, (v,), None)
    twin.fold_count_sum_last_rows(want, ids, v)
    assert same_bits((got,), (want,))


@settings(deadline=None, max_examples=100)
@given(ids=st.lists(st.integers(0, 40), max_size=60), dtype=st.sampled_from(["int64", "float64"]),
       width=st.integers(3, 5))
def test_fold_rows_fast_path_equals_the_checked_path(ids, dtype, width):
    """mask=None with plain arrays takes the native fast path; an all-true mask goes through
    the argument checks: the same rows, and a bad id raises the same error in both."""
    key_ids = np.array(ids, np.int64)
    v = (np.arange(len(ids)) * 7 - 20).astype(dtype)
    fast, slow = np.zeros((41, width), dtype), np.zeros((41, width), dtype)
    native.fold_count_sum_last_rows(fast, key_ids, v)
    native.fold_count_sum_last_rows(slow, key_ids, v, np.ones(len(ids), bool))
    assert fast.tobytes() == slow.tobytes()
    bad = np.append(key_ids, 41)
    for mask in (None, np.ones(len(bad), bool)):
        with pytest.raises(ValueError, match="41") as info:
            native.fold_count_sum_last_rows(fast, bad, np.append(v, v[:1] if len(v) else [0]).astype(dtype), mask)
        assert "state" in str(info.value)


# ---- point reads --------------------------------------------------------------------------------

POINT_DTYPES = ["int64", "float64", "int32", "uint8", "bool"]


def _same_scalar(a: Any, b: Any) -> bool:
    """Equal Python scalars of the same type (NaN equals NaN, -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    return a == b


@settings(deadline=None, max_examples=150)
@given(cols=st.lists(st.tuples(st.sampled_from(POINT_DTYPES), st.booleans()), min_size=1, max_size=5),
       size=st.integers(0, 6), kid=st.integers(-3, 9), data=st.data())
def test_point_read_native_equals_twin(cols, size, kid, data):
    """Each column by pointer (int64, float64; strided row-group views too) or by ``item``
    (other dtypes) gives the twin's Python scalar of the same type; past the end, the zero."""
    arrays, names, zeros = {}, [], []
    for i, (dt, strided) in enumerate(cols):
        vals = data.draw(st.lists(
            st.floats(allow_nan=True, width=64) if dt == "float64" else st.integers(-(2**63), 2**63 - 1)
            if dt == "int64" else st.integers(0, 1) if dt == "bool" else st.integers(0, 200),
            min_size=size, max_size=size), label=f"col{i}")
        col = np.array(vals, dtype=dt)
        if strided:  # a column of a row group: a strided view
            rows = np.zeros((size, 3), dtype=dt)
            rows[:, 1] = col
            col = rows[:, 1]
        arrays[f"c{i}"] = col
        names.append(f"c{i}")
        zeros.append(0.0 if dt == "float64" else 0)
    got = native.point_read(arrays, tuple(names), kid, tuple(zeros))
    want = twin.point_read(arrays, tuple(names), kid, tuple(zeros))
    assert list(got) == list(want) == names
    assert all(_same_scalar(got[n], want[n]) for n in names), (got, want)
    if 0 <= kid < size:
        assert all(_same_scalar(got[n], arrays[n][kid].item()) for n in names)
    else:
        assert all(got[n] is zeros[i] for i, n in enumerate(names))


@pytest.mark.parametrize("mod", [native, twin], ids=["native", "twin"])
def test_point_read_errors(mod):
    arrays = {"a": np.zeros(3, np.int64), "m": np.zeros((3, 2))}
    with pytest.raises(KeyError):
        mod.point_read(arrays, ("nope",), 0, (0,))
    with pytest.raises(TypeError, match="'m' must be a 1-D numpy array"):
        mod.point_read(arrays, ("m",), 0, (0,))
    with pytest.raises(ValueError, match="zeros has 2 entries but names has 1"):
        mod.point_read(arrays, ("a",), 0, (0, 0))
