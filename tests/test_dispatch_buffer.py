"""engine._dispatch (native) == engine._dispatch_py (twin) == a plain-Python model.

The model is ``ActionType.validate_row`` (what is accepted, the normalized values and the exact
ValidationError) plus routing by ``engine._keys_py`` and one list of rows per shard. Hypothesis
drives random action types (ints of every width at their range edges, floats, bools, timestamps,
strings, bytes, int and str keys, defaults) through the fast dispatcher and ``add``, with
invalid and odd values (None, numpy scalars, subclasses, datetimes, wrong counts), and requires
identical offsets, errors, untouched buffers on error and identical ``take()`` results.
"""

from __future__ import annotations

import functools
import gc
import sys
import threading
from datetime import datetime, timedelta, timezone
from enum import IntEnum

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import engine.schema as sc
from engine import _dispatch as native
from engine import _dispatch_py as twin
from engine import _keys, _keys_py
from engine.errors import ValidationError
from engine.limits import Limits

MODULES = [pytest.param(native, id="native"), pytest.param(twin, id="twin")]
FAST = settings(deadline=None, max_examples=150, suppress_health_check=list(HealthCheck))
INT64_MIN, INT64_MAX, UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
INT_KINDS = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
ALL_KINDS = INT_KINDS + ["float32", "float64", "bool", "timestamp", "string", "bytes",
                         "key_int", "key_str"]  # fmt: skip
PART_KINDS = INT_KINDS + ["key_int", "string", "bytes", "key_str"]
RANGE = {k: (int(np.iinfo(k).min), int(np.iinfo(k).max)) for k in INT_KINDS}
RANGE.update(timestamp=(INT64_MIN + 1, INT64_MAX), key_int=(INT64_MIN, INT64_MAX))


class Color(IntEnum):
    RED = 1


class MyStr(str):
    pass


class MyFloat(float):
    pass


# ---- schema helpers: what Log would pass ------------------------------------------------------


def field_type(kind: str) -> sc.FieldType:
    if kind == "key_int":
        return sc.key("k")
    if kind == "key_str":
        return sc.key("s", str)
    return sc.parse_field_type(kind)


def kind_of(ft: sc.FieldType) -> str:
    if ft.is_key:
        return "key_int" if ft.key_kind is int else "key_str"
    return ft.kind


def spec_of(tid: int, at: sc.ActionType) -> tuple:
    return tid, [kind_of(ft) for ft in at.fields.values()], at.field_index(at.partition)


def ranges_of(at: sc.ActionType, explicit: bool = True) -> list:
    return [RANGE[kind_of(ft)] if explicit and kind_of(ft) in RANGE else None
            for ft in at.fields.values()]


def dtype_of(ft: sc.FieldType) -> np.dtype | None:
    return np.dtype(np.int64) if ft.is_key and not ft.is_var else ft.dtype


def route(at: sc.ActionType, row: tuple, shards: int) -> int:
    """The shard Log routes an action to, by the reference (twin) key functions."""
    v = row[at.field_index(at.partition)]
    if isinstance(v, (str, bytes)):
        return _keys_py.shard_of_str(v, shards)
    if v > INT64_MAX:  # uint64 keys: their int64 bits, as Log._route casts columns
        return int(_keys_py.shard_of_ints(np.array([v], np.uint64).astype(np.int64), shards)[0])
    return _keys_py.shard_of_int(v, shards)


# ---- values: valid ones at the edges, invalid and odd ones ------------------------------------

ODD = [None, True, 1.0, "1", b"1", np.int64(3), np.uint8(7), Color.RED, [1]]


def int_values(lo: int, hi: int) -> st.SearchStrategy:
    return st.one_of(
        st.sampled_from([lo, hi, lo - 1, hi + 1, 0, -1, 1]), st.integers(lo, hi),
        st.integers(-(1 << 70), 1 << 70), st.sampled_from(ODD),
    )  # fmt: skip


FLOAT_EDGES = [0.0, -0.0, 1e39, -1e39, 3.4028234663852886e38, 3.4028235677973366e38, 1e-46,
               float("nan"), float("inf"), 2**63, 2**64, -(2**63), 2**63 - 1, 2**53 + 1,
               2**24 + 1, 2**70, -(2**70), 2**1024, np.float32(1.5), np.float64(2.5), MyFloat(1.5),
               np.int32(7), False, None, "1.5"]  # fmt: skip
STRINGS = ["", "é", "\ud800", "x" * 9, "é" * 4, "é" * 5, b"abc", b"\xff", b"x" * 9,
           bytearray(b"ab"), memoryview(b"cd"), MyStr("s"), None, 5]  # fmt: skip
UTC2 = timezone(timedelta(hours=2))

VALUES = {k: int_values(*RANGE[k]) for k in RANGE}
VALUES["float32"] = VALUES["float64"] = st.one_of(
    st.floats(), st.floats(width=32), st.integers(-(1 << 65), 1 << 65), st.sampled_from(FLOAT_EDGES)
)
VALUES["bool"] = st.sampled_from([True, False, np.True_, np.False_, 0, 1, None, "True", 1.0])
VALUES["timestamp"] = st.one_of(
    VALUES["timestamp"], st.sampled_from([INT64_MIN, np.datetime64("NaT"),
                                          np.datetime64("2020-01-01T00:00:00.123456789")]),
    st.datetimes(timezones=st.sampled_from([None, timezone.utc, UTC2])),
)  # fmt: skip
VALUES["string"] = VALUES["key_str"] = st.one_of(
    st.text(max_size=6), st.binary(max_size=6), st.sampled_from(STRINGS)
)
VALUES["bytes"] = st.one_of(st.binary(max_size=10), st.sampled_from(STRINGS))
VALID = {k: st.one_of(st.sampled_from(RANGE[k]), st.integers(*RANGE[k])) for k in RANGE}
VALID.update(
    float32=st.one_of(st.floats(width=32), st.integers(INT64_MIN, INT64_MAX)),
    float64=st.one_of(st.floats(), st.integers(INT64_MIN, INT64_MAX)), bool=st.booleans(),
    string=st.text(max_size=2), key_str=st.text(max_size=2), bytes=st.binary(max_size=8),
)  # fmt: skip  # within every limit the tests use (string_bytes_max >= 8)
VALID["timestamp"] = st.one_of(VALID["timestamp"], st.datetimes())
DEFAULTS = {"float32": 0.5, "float64": -1.5, "bool": False, "string": "d", "bytes": b"d",
            "key_str": "d", "timestamp": 7, "key_int": 7}  # fmt: skip


@st.composite
def action_types(draw) -> list[tuple[int, sc.ActionType]]:
    ids = draw(st.lists(st.integers(0, (1 << 16) - 1), min_size=2, max_size=3, unique=True))
    out = []
    for n, tid in enumerate(ids):
        kinds = draw(st.lists(st.sampled_from(ALL_KINDS), max_size=4))
        part = draw(st.integers(0, len(kinds)))
        kinds.insert(part, draw(st.sampled_from(PART_KINDS)))
        fields = {f"f{i}": field_type(k) for i, k in enumerate(kinds)}
        defaults = {}
        if part != len(kinds) - 1 and draw(st.booleans()):
            defaults[f"f{len(kinds) - 1}"] = DEFAULTS.get(kinds[-1], 3)
        out.append((tid, sc.ActionType(f"t{n}", fields, f"f{part}", defaults)))
    return out


@st.composite
def scripts(draw, types) -> list[tuple]:
    ops = []
    for _ in range(draw(st.integers(0, 40))):
        op = draw(st.sampled_from(["fast"] * 6 + ["add"] * 3 + ["take", "base"]))
        t = draw(st.integers(0, len(types) - 1))
        at = types[t][1]
        pool = draw(st.sampled_from([VALID, VALUES]))  # half the rows are valid
        values = [draw(pool[kind_of(ft)]) for ft in at.fields.values()]
        arity = draw(st.sampled_from([0] * 8 + [-1, 1]))
        values = values[: len(values) + arity] if arity < 0 else values + [1] * arity
        ops.append((op, t, tuple(values), draw(st.integers(0, 3)), draw(st.integers(0, 1 << 40))))
    return ops


# ---- the model and the comparison -------------------------------------------------------------


class Model:
    def __init__(self, shards: int, types: list[tuple[int, sc.ActionType]]):
        self.shards, self.types = shards, dict(types)
        self.rows = [[] for _ in range(shards)]  # per shard: (type id, row)
        self.base = [0] * shards

    def add(self, tid: int, row: tuple) -> tuple[int, int]:
        s = route(self.types[tid], row, self.shards)
        self.rows[s].append((tid, row))
        return s, len(self.rows[s]) - 1

    def take(self, s: int) -> tuple:
        rows, self.rows[s] = self.rows[s], []
        self.base[s] += len(rows)
        out = {}
        for tid, at in self.types.items():
            trs = [r for t, r in rows if t == tid]
            if trs:
                out[tid] = [[r[i] for r in trs] if ft.is_var else
                            np.array([r[i] for r in trs], dtype_of(ft))
                            for i, ft in enumerate(at.fields.values())]  # fmt: skip
        types = np.array([t for t, _ in rows], np.uint16) if len(out) > 1 else None
        return types, out


def same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype and bits (NaNs equal whatever their payload, -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind != "f":
        return a.tobytes() == b.tobytes()
    nan = np.isnan(a)
    return bool((nan == np.isnan(b)).all()) and a[~nan].tobytes() == b[~nan].tobytes()


def assert_same_take(got: tuple, want: tuple) -> None:
    (gt, gcols), (wt, wcols) = got, want
    assert (gt is None) == (wt is None)
    if wt is not None:
        assert same_array(gt, wt)
    assert gcols.keys() == wcols.keys()
    for tid in wcols:
        assert len(gcols[tid]) == len(wcols[tid])
        for g, w in zip(gcols[tid], wcols[tid]):
            if isinstance(w, list):
                assert type(g) is list and g == w and list(map(type, g)) == list(map(type, w))
            else:
                assert isinstance(g, np.ndarray) and same_array(g, w), (g, w)


def state(buf) -> tuple:
    return buf.total, [buf.count(s) for s in range(buf.shards)], buf.last_shard, buf.full


def expected(fallback, values) -> tuple | Exception:
    try:
        return fallback(*values)
    except Exception as exc:  # noqa: BLE001 - the exact error is what is compared
        return exc


# ---- the main property ------------------------------------------------------------------------


@FAST
@given(data=st.data(), shards=st.integers(1, 4), str_max=st.sampled_from([8, 1 << 20]),
       explicit=st.booleans())  # fmt: skip
def test_native_twin_and_model_agree(data, shards, str_max, explicit):
    types = data.draw(action_types(), "types")
    ops = data.draw(scripts(types), "ops")
    lim = Limits(string_bytes_max=str_max)
    model = Model(shards, types)
    specs = [spec_of(tid, at) for tid, at in types]
    fallbacks = [functools.partial(at.validate_row, limits=lim) for _, at in types]
    bufs, disps = [], []
    for mod in (native, twin):
        buf = mod.RowBuffer(shards, specs, flush_at=1 << 30)
        bufs.append(buf)
        disps.append([buf.dispatcher(tid, ranges_of(at, explicit), fb, string_bytes_max=str_max)
                      for (tid, at), fb in zip(types, fallbacks)])  # fmt: skip
    for op, t, values, shard, offset in ops:
        tid, s = types[t][0], shard % shards
        if op == "take":
            want = model.take(s)
            for buf in bufs:
                assert_same_take(buf.take(s), want)
            continue
        if op == "base":
            model.base[s] = offset
            for buf in bufs:
                buf.set_base(s, offset)
            continue
        want = expected(fallbacks[t], values)
        if op == "add" and isinstance(want, Exception):
            continue  # add() takes validated rows only
        for buf, ds in zip(bufs, disps):
            before = state(buf)
            if isinstance(want, Exception):
                with pytest.raises(type(want)) as err:
                    ds[t](*values)
                assert str(err.value) == str(want) and state(buf) == before
            elif op == "fast":
                got = ds[t](*values)
                s_got = buf.last_shard
                assert got == model.base[s_got] + before[1][s_got]
            else:
                s_got, index = buf.add(tid, want)
                assert index == before[1][s_got] and buf.shard_of_last() == s_got
        if not isinstance(want, Exception):
            s_model, index = model.add(tid, want)
            assert [b.last_shard for b in bufs] == [s_model, s_model]
            assert [b.count(s_model) for b in bufs] == [index + 1] * 2
    for s in range(shards):
        want = model.take(s)
        for buf in bufs:
            assert_same_take(buf.take(s), want)
            assert buf.take(s) == (None, {})
    assert [buf.total for buf in bufs] == [0, 0]


# ---- the fast path is native where it should be -----------------------------------------------


def no_fallback(*values):
    raise AssertionError(f"fallback called for {values!r}")


NATIVE_OK = {
    "int8": [-128, 127, 0], "uint64": [0, UINT64_MAX, 1 << 63], "int64": [INT64_MIN, INT64_MAX],
    "float32": [1.5, 3, -(2**63), float("nan"), float("inf"), 3.4028234663852886e38],
    "float64": [1e308, 2**63 - 1, -0.0], "bool": [True, False],
    "timestamp": [INT64_MIN + 1, INT64_MAX, 0], "key_int": [INT64_MIN, INT64_MAX],
    "string": ["", "é" * 4, "x" * 8], "key_str": ["k"], "bytes": [b"", b"x" * 8],
}  # fmt: skip
FALLBACK = {
    "int8": [128, -129, True, np.int8(1), Color.RED, 1.0], "uint64": [-1, 1 << 64],
    "int64": [1 << 63], "float32": [1e39, 1 << 63, np.float32(1), MyFloat(1), True],
    "float64": [1 << 64, "1"], "bool": [1, np.True_, None],
    "timestamp": [INT64_MIN, datetime(2020, 1, 1)],
    "key_int": [1 << 63], "string": [b"abc", "x" * 9, "\ud800", MyStr("a")],
    "key_str": [b"k"], "bytes": ["x", bytearray(b"x"), b"x" * 9],
}  # fmt: skip


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("kind", sorted(NATIVE_OK))
def test_fast_path_takes_exact_values_natively(mod, kind):
    tid, at = 5, sc.ActionType("a", {"p": sc.key("p"), "v": field_type(kind)}, "p")
    buf = mod.RowBuffer(1, [spec_of(tid, at)])
    d = buf.dispatcher(tid, [None, None], no_fallback, string_bytes_max=8)
    for v in NATIVE_OK[kind]:
        d(1, v)
    calls = []
    lim = Limits(string_bytes_max=8)

    def fallback(*values):
        calls.append(values)
        return at.validate_row(*values, limits=lim)

    e = buf.dispatcher(tid, [None, None], fallback, string_bytes_max=8)
    for v in FALLBACK[kind]:
        want = expected(functools.partial(at.validate_row, limits=lim), (1, v))
        before = state(buf)
        if isinstance(want, Exception):
            with pytest.raises(type(want), match=None):
                e(1, v)
            assert state(buf) == before
        else:
            e(1, v)
    assert len(calls) == len(FALLBACK[kind])
    col = buf.take(0)[1][tid][1]
    want = [at.validate_row(1, v)[1] for v in NATIVE_OK[kind]]
    if isinstance(col, list):
        assert col[: len(want)] == want
    else:
        assert same_array(col[: len(want)], np.array(want, col.dtype))


def test_bench_shape_never_calls_the_fallback():
    """The benchmarked call d(user, photo, ts) stays on the native path."""
    like = sc.ActionType("like", {"user": sc.key("user"), "photo": sc.key("photo"),
                                  "ts": sc.timestamp}, "user")  # fmt: skip
    buf = native.RowBuffer(4, [spec_of(0, like)])
    d = buf.dispatcher(0, ranges_of(like), no_fallback)
    for i in range(1000):
        d(i * 7919, -i, 1_700_000_000_000_000_000 + i)
    assert buf.total == 1000


# ---- routing ----------------------------------------------------------------------------------

ints = st.one_of(st.sampled_from([0, 1, -1, INT64_MIN, INT64_MAX]),
                 st.integers(INT64_MIN, INT64_MAX))


@pytest.mark.parametrize("mod", MODULES)
@FAST
@given(keys=st.lists(st.one_of(ints, st.integers(0, UINT64_MAX), st.text(max_size=8),
                               st.binary(max_size=8)), max_size=30),
       shards=st.sampled_from([1, 2, 3, 7, 1024]))  # fmt: skip
@example(keys=[0, -1, INT64_MIN, UINT64_MAX, "", "é", b"\xff"], shards=1 << 16)
def test_routing_equals_keys(mod, keys, shards):
    specs = [(0, ["key_int"], 0), (1, ["uint64"], 0), (2, ["key_str"], 0), (3, ["bytes"], 0)]
    buf = mod.RowBuffer(shards, specs)
    for k in keys:
        if isinstance(k, int):
            tid = 0 if k <= INT64_MAX and k >= INT64_MIN and k % 2 else 1
            if tid == 1 and k < 0:
                continue
            buf.add(tid, (k,))
            bits = k - (1 << 64) if k > INT64_MAX else k
            want = [m.shard_of_int(bits, shards) for m in (_keys, _keys_py)]
            want.append(int(_keys.shard_of_ints(np.array([bits], np.int64), shards)[0]))
        else:
            buf.add(3 if isinstance(k, bytes) else 2, (k,))
            want = [m.shard_of_str(k, shards) for m in (_keys, _keys_py)]
            want.append(int(_keys.shard_of_strs([k], shards)[0]))
        assert want == [buf.last_shard] * 3


# ---- offsets, base, take, full ----------------------------------------------------------------


@pytest.mark.parametrize("mod", MODULES)
def test_offsets_base_and_take(mod):
    buf = mod.RowBuffer(1, [(1, ["int64"], 0), (2, ["string", "float32"], 0)])
    assert buf.take(0) == (None, {}) and buf.last_shard == -1
    d = buf.dispatcher(1, [None], no_fallback)
    buf.set_base(0, 100)
    assert [d(5), d(6), buf.add_offset(1, (7,)), buf.add(1, (8,))] == [100, 101, 102, (0, 3)]
    types, cols = buf.take(0)
    assert types is None and same_array(cols[1][0], np.array([5, 6, 7, 8], np.int64))
    assert d(9) == 104 and buf.count(0) == 1  # take advanced base past the taken actions
    assert buf.add_offset(2, ("x", 1.0)) == 105
    types, cols = buf.take(0)
    assert same_array(types, np.array([1, 2], np.uint16))
    assert cols[2][0] == ["x"] and same_array(cols[2][1], np.array([1.0], np.float32))
    with pytest.raises(IndexError):
        buf.take(1)
    with pytest.raises(IndexError):
        buf.set_base(-1, 0)


@pytest.mark.parametrize("mod", MODULES)
def test_full_and_on_full(mod):
    calls = []
    buf = mod.RowBuffer(2, [(0, ["key_int"], 0)], flush_at=3)
    buf.on_full = lambda: calls.append(buf.total)
    d = buf.dispatcher(0, [None], no_fallback)
    d(1), d(2)
    assert not buf.full and calls == []
    d(3), d(4)
    assert buf.full and calls == [3, 4]
    for s in range(2):
        buf.take(s)
    assert not buf.full and buf.total == 0


@pytest.mark.parametrize("mod", MODULES)
def test_on_full_may_take(mod):
    """A flush from on_full (the Log's flush) sees the action just added."""
    taken = []
    buf = mod.RowBuffer(1, [(0, ["key_int", "bytes"], 0)], flush_at=2)
    buf.on_full = lambda: taken.append(buf.take(0))
    d = buf.dispatcher(0, [None, None], no_fallback)
    assert [d(i, b"%d" % i) for i in range(5)] == list(range(5))
    assert [t[1][0][1] for t in taken] == [[b"0", b"1"], [b"2", b"3"]] and buf.count(0) == 1


# ---- argument errors: same in both ------------------------------------------------------------


def raised(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        return type(exc), str(exc)
    return None


BAD_BUFFERS = [
    (0, [(0, ["int8"], 0)]), (1 << 17, [(0, ["int8"], 0)]), (1, []), (1, [(0, ["int8"])]),
    (1, [(0, ["int9"], 0)]), (1, [(0, [], 0)]), (1, [(0, ["float64"], 0)]),
    (1, [(0, ["int8"], 1)]), (1, [(0, ["int8"], 0), (0, ["int8"], 0)]),
    (1, [(1 << 16, ["int8"], 0)]), (1, [(0, ["int8"] * 257, 0)]), (1, [(0, ["int8"], 0)], 0),
]  # fmt: skip


@pytest.mark.parametrize("args", BAD_BUFFERS)
def test_bad_buffer_arguments(args):
    got = [raised(mod.RowBuffer, *args) for mod in (native, twin)]
    assert got[0] is not None and got[0] == got[1]


BAD_ROWS = [(9, (1,)), ("0", (1,)), (0, [1, 2.0]), (0, (1,)), (0, (1.0, 2.0)), (0, (1 << 63, 2.0)),
            (0, (True, 2.0)), (0, (1, 2)), (0, (1, 1e39)), (1, ("a", "b")), (1, (b"a", b"b")),
            (1, ("a", True)), (1, ("\ud800", b"x")), (2, (1, "x"))]  # fmt: skip


@pytest.mark.parametrize("tid, row", BAD_ROWS)
def test_add_rejects_rows_validate_one_cannot_return(tid, row):
    specs = [(0, ["int64", "float32"], 0), (1, ["string", "bytes"], 0), (2, ["key_int"], 0)]
    errs = []
    for mod in (native, twin):
        buf = mod.RowBuffer(3, specs)
        before = state(buf)
        errs.append(raised(buf.add, tid, row))
        assert state(buf) == before and buf.take(0) == buf.take(1) == buf.take(2) == (None, {})
    assert errs[0] is not None and errs[0] == errs[1]


BAD_DISPATCHERS = [
    (0, [None, None], no_fallback), (0, [(0, 1), (0, 1), None], no_fallback),
    (0, [(-129, 0), None, None], no_fallback), (0, [(1, 0), None, None], no_fallback),
    (0, [None, None, (INT64_MIN, 0)], no_fallback), (0, [None] * 3, None),
    (1, [None] * 3, no_fallback),
]  # fmt: skip


@pytest.mark.parametrize("args", BAD_DISPATCHERS)
def test_bad_dispatcher_arguments(args):
    spec = [(0, ["int8", "string", "timestamp"], 0)]
    got = [raised(mod.RowBuffer(1, spec).dispatcher, *args) for mod in (native, twin)]
    assert got[0] is not None and got[0] == got[1]


@pytest.mark.parametrize("mod", MODULES)
def test_dispatcher_is_made_by_the_buffer_and_takes_positional_values(mod):
    with pytest.raises(TypeError):
        mod.Dispatcher()
    d = mod.RowBuffer(1, [(0, ["int8"], 0)]).dispatcher(0, [None], no_fallback)
    assert d.type_id == 0
    with pytest.raises(TypeError):
        d(1, extra=1)


@pytest.mark.parametrize("mod", MODULES)
def test_narrow_ranges_only_route_to_the_fallback(mod):
    at = sc.ActionType("a", {"p": "int16"}, "p")
    calls = []
    buf = mod.RowBuffer(1, [spec_of(0, at)])
    d = buf.dispatcher(0, [(0, 10)], lambda *v: calls.append(v) or at.validate_row(*v))
    assert [d(5), d(11), d(-3)] == [0, 1, 2] and calls == [(11,), (-3,)]
    assert same_array(buf.take(0)[1][0][0], np.array([5, 11, -3], np.int16))


@pytest.mark.parametrize("mod", MODULES)
def test_count_and_defaults_go_through_the_fallback(mod):
    at = sc.ActionType("a", {"p": sc.key("p"), "n": "int32", "s": "string"}, "p", {"s": "dflt"})
    buf = mod.RowBuffer(1, [spec_of(0, at)])
    d = buf.dispatcher(0, ranges_of(at), at.validate_row)
    assert d(1, 2) == 0  # the fallback fills the default
    for args in [(1,), (1, 2, "x", 4), ()]:
        with pytest.raises(ValidationError) as err:
            d(*args)
        assert str(err.value) == str(expected(at.validate_row, args))
    assert buf.take(0)[1][0][2] == ["dflt"]


# ---- references, threads ----------------------------------------------------------------------


@pytest.mark.parametrize("mod", MODULES)
def test_references_are_released(mod):
    s, b = "".join(["ref", "count"]), bytes(range(40))
    n0, m0 = sys.getrefcount(s), sys.getrefcount(b)
    buf = mod.RowBuffer(2, [(0, ["key_str", "bytes", "int64"], 0)])
    d = buf.dispatcher(0, [None, None, None], no_fallback)
    for i in range(100):
        d(s, b, i)
        buf.add(0, (s, b, i))
    assert sys.getrefcount(s) == n0 + 200 and sys.getrefcount(b) == m0 + 200
    taken = [buf.take(0), buf.take(1)]
    assert sys.getrefcount(s) == n0 + 200
    del taken
    assert sys.getrefcount(s) == n0 and sys.getrefcount(b) == m0
    d(s, b, 1)
    del buf, d  # pending rows are released with the buffer
    gc.collect()
    assert sys.getrefcount(s) == n0 and sys.getrefcount(b) == m0


def test_fixed_width_path_keeps_no_references():
    big = 10**12 + 7
    n0 = sys.getrefcount(big)
    buf = native.RowBuffer(1, [(0, ["key_int", "timestamp", "float64"], 0)])
    d = buf.dispatcher(0, [None] * 3, no_fallback)
    for _ in range(1000):
        d(big, big, 1.5)
    assert sys.getrefcount(big) == n0


@pytest.mark.parametrize("mod", MODULES)
def test_threads_dispatch_and_take_concurrently(mod):
    """Producers and a taker race: every action is taken once, intact, at the offset it got."""
    threads_n, per_thread, shards = 4, 20_000 if mod is native else 2_000, 3
    specs = [(0, ["key_int", "int32", "string"], 0), (1, ["key_str", "int64"], 0)]
    buf = mod.RowBuffer(shards, specs)
    d0 = buf.dispatcher(0, [None] * 3, no_fallback)
    d1 = buf.dispatcher(1, [None] * 2, no_fallback)
    taken, offsets, stop = [[] for _ in range(shards)], {}, threading.Event()

    def produce(t):
        for i in range(per_thread):
            k = t * per_thread + i
            offsets[k] = d0(k, i, str(t)) if i % 3 else d1(str(t), k)

    def consume():
        while not stop.is_set():
            for s in range(shards):
                taken[s].append(buf.take(s))

    workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads_n)]
    taker = threading.Thread(target=consume)
    taker.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    taker.join()
    for s in range(shards):
        taken[s].append(buf.take(s))
    assert buf.total == 0
    seen = 0
    for s in range(shards):
        order = []  # the shard's keys in buffer order, across takes
        for types, cols in taken[s]:
            if not cols:
                continue
            keys = {}
            if 0 in cols:
                k, i, t = cols[0]
                assert (k % per_thread == i).all() and t == [str(int(x) // per_thread) for x in k]
                keys[0] = iter(k.tolist())
            if 1 in cols:
                t, k = cols[1]
                assert t == [str(int(x) // per_thread) for x in k]
                keys[1] = iter(k.tolist())
            if types is None:  # one type only
                types = [next(iter(keys))] * sum(len(c[0]) for c in cols.values())
            order += [next(keys[int(tid)]) for tid in types]
        for position, k in enumerate(order):
            assert offsets[k] == position
            if k % per_thread % 3:
                assert _keys.shard_of_int(k, shards) == s
            else:
                assert _keys.shard_of_str(str(k // per_thread), shards) == s
        seen += len(order)
    assert seen == threads_n * per_thread == len(offsets)
