"""watch_diff and watched_unique: engine._kernels (native) == engine._kernels_py (twin) == model.

Hypothesis draws calls with repeated ids, unwatched ids, ids past ``watched`` and past ``state``
(up to INT64_MAX), a ``state`` shorter or longer than ``watched``, a ``shadow`` that already holds
some of the values (NaN, -0.0 against 0.0 too) and int64 extremes; both modules must give the
plain-loop model's answer bit for bit, never write past ``len(ids)``, and carry ``shadow`` from
one call to the next. Then plain cases: the shadow is updated, a second call with no change
reports nothing, read-only and memmapped inputs, the native prefetch path, bad arguments
(same exception and message in both) and negative ids (nothing written).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine import _kernels as native
from engine import _kernels_py as twin

MODULES = [pytest.param(native, id="native"), pytest.param(twin, id="twin")]
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
FAST = settings(deadline=None, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SENTINEL = {"int64": -77, "float64": -77.5}  # prefilled outputs: the tail must keep it

INTS = st.one_of(st.integers(INT64_MIN, INT64_MAX), st.integers(-3, 3),
                 st.sampled_from([INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1, 0]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3).map(float),
                   st.sampled_from([0.0, -0.0, math.nan, -math.nan, math.inf, -math.inf,
                                    1e308, 5e-324]))
IDS = st.one_of(st.integers(0, 16), st.sampled_from([INT64_MAX, INT64_MAX - 1, 1 << 40]))


def is_nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def bits(a: np.ndarray) -> bytes:
    return a.dtype.str.encode() + a.tobytes()


# ---- cases and the model -----------------------------------------------------------------------


@st.composite
def cases(draw, dtype: str | None = None) -> dict[str, Any]:
    """One call's arguments: ids, watched, state, shadow (as fresh arrays)."""
    dtype = dtype or draw(st.sampled_from(["int64", "float64"]), label="dtype")
    vals = INTS if dtype == "int64" else FLOATS
    special = st.sampled_from([INT64_MIN, INT64_MAX, 0] if dtype == "int64"
                              else [math.nan, -0.0, 0.0])
    cap_w = draw(st.integers(0, 12), label="cap_w")
    cap_s = draw(st.integers(0, 12), label="cap_s")
    state = draw(st.lists(st.one_of(vals, special, special), min_size=cap_s, max_size=cap_s),
                 label="state")
    shadow = []
    for k in range(cap_w + draw(st.integers(0, 3), label="extra shadow")):
        current = state[k] if k < cap_s else (0 if dtype == "int64" else 0.0)
        same = [current] + ([-current] if current == 0 else [])  # 0.0 and -0.0 are equal
        told = st.sampled_from(same)
        shadow.append(draw(st.one_of(vals, told, told), label=f"shadow[{k}]"))
    watched = draw(st.lists(st.sampled_from([0, 1, 1, 2, 255]), min_size=cap_w,
                            max_size=cap_w), label="watched")
    near = st.integers(0, max(cap_w, cap_s) + 2)
    ids = draw(st.lists(st.one_of(near, near, IDS), min_size=1, max_size=30), label="ids")
    ids += draw(st.lists(st.sampled_from(ids), max_size=10), label="repeats")
    ids = draw(st.permutations(ids), label="order")  # empty ids: the plain tests
    return {
        "ids": np.array(ids, dtype=np.int64),
        "watched": np.array(watched, dtype=np.uint8),
        "state": np.array(state, dtype=dtype),
        "shadow": np.array(shadow, dtype=dtype),
    }


def model(ids: np.ndarray, watched: np.ndarray, state: np.ndarray,
          shadow: np.ndarray) -> tuple[list[tuple[Any, Any, Any]], list[Any]]:
    """The contract as a plain loop: the reported (k, old, new) rows and the shadow after."""
    w, s, sh = watched.tolist(), state.tolist(), shadow.tolist()
    zero = 0 if state.dtype == np.int64 else 0.0
    rows = []
    for k in ids.tolist():
        if not (k < len(w) and w[k] != 0):
            continue
        new = s[k] if k < len(s) else zero
        old = sh[k]
        if old == new or (is_nan(old) and is_nan(new)):
            continue
        rows.append((k, old, new))
        sh[k] = new
    return rows, sh


def outputs(n: int, dtype: Any, extra: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    dt = np.dtype(dtype)
    fill = SENTINEL[dt.name]
    return (np.full(n + extra, -77, np.int64), np.full(n + extra, fill, dt),
            np.full(n + extra, fill, dt))


def run(mod, c: dict[str, Any], extra: int = 0) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """watch_diff on fresh outputs; returns (j, out_ids, out_old, out_new); c['shadow'] moves."""
    oi, oo, on = outputs(c["ids"].shape[0], c["state"].dtype, extra)
    j = mod.watch_diff(c["ids"], c["watched"], c["state"], c["shadow"], oi, oo, on)
    return j, oi, oo, on


def copy_case(c: dict[str, Any]) -> dict[str, Any]:
    return {k: v.copy() for k, v in c.items()}


# ---- native == twin == model -------------------------------------------------------------------


EXAMPLE = {  # every rule at once: NaN == NaN, -0.0 == 0.0, past state, unwatched, repeats
    "ids": np.array([5, 0, 1, 2, 3, 4, 7, INT64_MAX, 3, 0, 2], np.int64),
    "watched": np.array([1, 1, 1, 1, 0, 1, 0], np.uint8),
    "state": np.array([math.nan, -0.0, 0.0, 1.0, 2.0]),
    "shadow": np.array([-math.nan, 0.0, -0.0, math.nan, 0.0, 3.0, 0.0]),
}


@pytest.mark.parametrize("mod", MODULES)
@FAST
@given(c=cases(), extra=st.integers(0, 3))
@example(c=EXAMPLE, extra=1)
def test_watch_diff_equals_the_model(mod, c, extra):
    c = copy_case(c)   # an @example's arrays are shared between runs
    rows, shadow_after = model(**c)
    j, oi, oo, on = run(mod, c, extra)
    dt = c["state"].dtype
    assert isinstance(j, int) and j == len(rows)
    assert oi[:j].tolist() == [k for k, _, _ in rows]
    assert bits(oo[:j]) == bits(np.array([o for _, o, _ in rows], dtype=dt).reshape(-1))
    assert bits(on[:j]) == bits(np.array([n for _, _, n in rows], dtype=dt).reshape(-1))
    assert len(set(oi[:j].tolist())) == j  # each key at most once
    assert bits(c["shadow"]) == bits(np.array(shadow_after, dtype=dt).reshape(-1))
    n = c["ids"].shape[0]
    # entries from j on are scratch (the native loop stores every row's candidate there), but
    # nothing is written past len(ids): the extra room keeps its sentinel
    assert (oi[n:] == -77).all() and bits(oo[n:]) == bits(np.full(extra, SENTINEL[dt.name], dt))
    assert bits(on[n:]) == bits(np.full(extra, SENTINEL[dt.name], dt))


@FAST
@given(c=cases(), steps=st.lists(st.tuples(st.lists(st.integers(0, 14), max_size=20),
                                           st.lists(st.integers(0, 11), max_size=4)),
                                 max_size=4))
def test_native_and_twin_agree_bit_for_bit_over_several_calls(c, steps):
    """Each step: change a few state values (writes past the end are dropped), then diff."""
    cn, ct = copy_case(c), copy_case(c)
    for ids, touch in [(c["ids"].tolist(), [])] + steps:
        for case in (cn, ct):
            case["ids"] = np.array(ids, dtype=np.int64)
            s = case["state"]
            for k in touch:
                if k < s.shape[0]:  # always a different value: ~v, or 1.5 / NaN
                    s[k] = ~s[k] if s.dtype == np.int64 else (math.nan if s[k] == 1.5 else 1.5)
        got_n, got_t = run(native, cn, 1), run(twin, ct, 1)
        j = got_n[0]
        assert j == got_t[0]
        assert all(bits(a[:j]) == bits(b[:j]) for a, b in zip(got_n[1:], got_t[1:]))
        assert bits(cn["shadow"]) == bits(ct["shadow"])
        again_n, again_t = run(native, cn), run(twin, ct)  # nothing changed since
        assert again_n[0] == again_t[0] == 0


@pytest.mark.parametrize("mod", MODULES)
@FAST
@given(c=cases())
def test_watched_unique_equals_the_model(mod, c):
    w = c["watched"].tolist()
    want: list[int] = []
    for k in c["ids"].tolist():
        if k < len(w) and w[k] != 0 and k not in want:
            want.append(k)
    got = mod.watched_unique(c["ids"], c["watched"])
    assert got.dtype == np.int64 and got.tolist() == want
    assert got.tolist() == mod.watched_unique(c["ids"], c["watched"].astype(bool)).tolist()


# ---- plain cases -------------------------------------------------------------------------------


@pytest.mark.parametrize("mod", MODULES)
def test_shadow_is_updated_and_a_second_call_reports_nothing(mod):
    ids = np.array([5, 1, 5, 3, 1, 9, 2], np.int64)
    watched = np.array([0, 1, 1, 1, 0, 1], np.uint8)          # 1, 2, 3, 5; not 0, 4, 9
    state = np.array([10, 11, 12, 13, 14, 15, 16], np.int64)
    shadow = np.array([0, 0, 12, 3, 0, 0], np.int64)          # 2 already told 12
    oi, oo, on = outputs(7, np.int64)
    assert mod.watch_diff(ids, watched, state, shadow, oi, oo, on) == 3
    assert oi[:3].tolist() == [5, 1, 3] and oo[:3].tolist() == [0, 0, 3]
    assert on[:3].tolist() == [15, 11, 13]
    assert shadow.tolist() == [0, 11, 12, 13, 0, 15]
    assert mod.watch_diff(ids, watched, state, shadow, oi, oo, on) == 0
    assert shadow.tolist() == [0, 11, 12, 13, 0, 15]
    state[3] = INT64_MIN
    assert mod.watch_diff(ids, watched, state, shadow, oi, oo, on) == 1
    assert (oi[0], oo[0], on[0]) == (3, 13, INT64_MIN) and shadow[3] == INT64_MIN
    assert mod.watched_unique(ids, watched).tolist() == [5, 1, 3, 2]


@pytest.mark.parametrize("mod", MODULES)
def test_keys_past_state_read_as_zero(mod):
    ids = np.array([4, 0, 3, 4], np.int64)
    watched = np.ones(5, np.uint8)
    state = np.array([1.5, 2.5])                 # 2, 3, 4 not grown yet
    shadow = np.array([1.5, 0.0, 0.0, 7.0, -0.0])
    oi, oo, on = outputs(4, np.float64)
    assert mod.watch_diff(ids, watched, state, shadow, oi, oo, on) == 1
    assert (oi[0], oo[0], on[0]) == (3, 7.0, 0.0) and math.copysign(1, on[0]) == 1
    assert shadow.tolist() == [1.5, 0.0, 0.0, 0.0, -0.0]   # -0.0 == 0: left alone


@pytest.mark.parametrize("mod", MODULES)
def test_nan_and_signed_zero_are_not_changes(mod):
    ids = np.arange(4, dtype=np.int64)
    watched = np.ones(4, bool)
    state = np.array([math.nan, -0.0, 0.0, math.nan])
    shadow = np.array([-math.nan, 0.0, -0.0, 1.0])
    oi, oo, on = outputs(4, np.float64)
    assert mod.watch_diff(ids, watched, state, shadow, oi, oo, on) == 1
    assert oi[0] == 3 and oo[0] == 1.0 and math.isnan(on[0]) and math.isnan(shadow[3])
    assert mod.watch_diff(ids, watched, state, shadow, oi, oo, on) == 0


@pytest.mark.parametrize("mod", MODULES)
def test_read_only_and_memmapped_inputs(mod, tmp_path):
    state = np.memmap(tmp_path / "state", np.int64, "w+", shape=(6,))
    state[:] = [0, 1, 2, 3, 4, 5]
    state.flush()
    ro_state = np.memmap(tmp_path / "state", np.int64, "r", shape=(6,))
    ids, watched = np.array([5, 4, 3], np.int64), np.array([0, 0, 0, 1, 0, 1], np.uint8)
    ids.flags.writeable = watched.flags.writeable = False
    shadow = np.memmap(tmp_path / "shadow", np.int64, "w+", shape=(6,))
    oi, oo, on = outputs(3, np.int64)
    assert mod.watch_diff(ids, watched, ro_state, shadow, oi, oo, on) == 2
    assert oi[:2].tolist() == [5, 3] and shadow.tolist() == [0, 0, 0, 3, 0, 5]
    assert mod.watched_unique(ids, watched).tolist() == [5, 3]
    assert mod.watch_diff([], [], [], np.zeros(0), *outputs(0, np.float64)) == 0
    assert mod.watched_unique([], []).tolist() == []


@pytest.mark.parametrize("dtype", ["int64", "float64"])
def test_big_arrays_take_the_prefetch_path_and_agree(dtype):
    rng = np.random.default_rng(7)
    keys = 300_000
    ids = rng.integers(0, keys + 1000, 50_000).astype(np.int64)
    watched = (rng.random(keys) < 0.7).astype(np.uint8)
    state = rng.integers(0, 4, keys - 500).astype(dtype)
    shadow = rng.integers(0, 4, keys).astype(dtype)
    got = []
    for mod in (native, twin):
        sh = shadow.copy()
        oi, oo, on = outputs(ids.shape[0], dtype)
        j = mod.watch_diff(ids, watched, state, sh, oi, oo, on)
        got.append((j, bits(oi), bits(oo), bits(on), bits(sh),
                    bits(mod.watched_unique(ids, watched))))
    assert got[0] == got[1] and got[0][0] > 1000


# ---- bad arguments -----------------------------------------------------------------------------


def raised(fn: Callable[[], Any]) -> tuple[type, str] | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the point is to compare them
        return type(exc), str(exc)
    return None


I8, F8, W = np.zeros(4, np.int64), np.zeros(4), np.ones(4, np.uint8)
IDS4 = np.array([0, 1, 2, 3], np.int64)


def wd(ids=IDS4, watched=W, state=I8, shadow=None, oi=None, oo=None, on=None,
       dtype=np.int64) -> Callable[[Any], Any]:
    def call(m):
        return m.watch_diff(ids, watched, state,
                            np.zeros(4, dtype) if shadow is None else shadow,
                            np.zeros(4, np.int64) if oi is None else oi,
                            np.zeros(4, dtype) if oo is None else oo,
                            np.zeros(4, dtype) if on is None else on)
    return call


def read_only(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


BAD_CALLS: dict[str, tuple[type, str, Callable[[Any], Any]]] = {
    "negative id": (ValueError, "ids[2] = -1 is negative", wd(ids=np.array([0, 9, -1, -5]))),
    "INT64_MIN id": (ValueError, "is negative", wd(ids=np.array([INT64_MIN], np.int64))),
    "int32 ids": (TypeError, "ids must be an int64", wd(ids=IDS4.astype(np.int32))),
    "2-D ids": (ValueError, "ids must be 1-D", wd(ids=IDS4.reshape(2, 2))),
    "int64 watched": (TypeError, "watched must be a bool or uint8", wd(watched=I8)),
    "float32 state": (TypeError, "state must be int64 or float64", wd(state=F8.astype("f4"))),
    "shadow dtype": (TypeError, "shadow has dtype float64 but state has int64",
                     wd(shadow=np.zeros(4))),
    "out_old dtype": (TypeError, "out_old has dtype float64 but state has int64",
                      wd(oo=np.zeros(4))),
    "out_new dtype": (TypeError, "out_new has dtype int64 but state has float64",
                      wd(state=F8, dtype=np.float64, on=np.zeros(4, np.int64))),
    "out_ids float": (TypeError, "out_ids must have dtype int64", wd(oi=np.zeros(4))),
    "shadow short": (ValueError, "shadow has 3 keys but watched has 4",
                     wd(shadow=np.zeros(3, np.int64))),
    "out_ids short": (ValueError, "out_ids has 3 entries but ids has 4",
                      wd(oi=np.zeros(3, np.int64))),
    "out_old short": (ValueError, "out_old has 2 entries", wd(oo=np.zeros(2, np.int64))),
    "out_new short": (ValueError, "out_new has 0 entries", wd(on=np.zeros(0, np.int64))),
    "shadow read-only": (ValueError, "shadow is read-only", wd(shadow=read_only(I8))),
    "out_new strided": (ValueError, "out_new must be C-contiguous",
                        wd(on=np.zeros(8, np.int64)[::2])),
    "shadow list": (TypeError, "shadow must be a numpy array", wd(shadow=[0, 0, 0, 0])),
    "unique negative": (ValueError, "ids[1] = -3 is negative",
                        lambda m: m.watched_unique(np.array([2, -3]), W)),
    "unique float watched": (TypeError, "watched must be a bool or uint8",
                             lambda m: m.watched_unique(IDS4, F8)),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_arguments_raise_the_same_error_in_both(name):
    exc, text, call = BAD_CALLS[name]
    got_n, got_t = raised(lambda: call(native)), raised(lambda: call(twin))
    assert got_n is not None and got_n == got_t
    assert got_n[0] is exc and text in got_n[1], got_n


@pytest.mark.parametrize("mod", MODULES)
def test_a_negative_id_raises_before_anything_is_written(mod):
    state, shadow = np.arange(4, dtype=np.int64) + 10, np.zeros(4, np.int64)
    oi, oo, on = outputs(3, np.int64)
    with pytest.raises(ValueError, match="nothing was written"):
        mod.watch_diff(np.array([1, 2, -1], np.int64), W, state, shadow, oi, oo, on)
    assert shadow.tolist() == [0] * 4 and (oi == -77).all() and (oo == -77).all()
    assert (on == -77).all()


def test_native_entry_points_keep_reference_counts():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 60, 300).astype(np.int64)
    watched, state = rng.integers(0, 2, 50).astype(np.uint8), rng.normal(size=55)
    shadow, (oi, oo, on) = np.zeros(50), outputs(300, np.float64)
    args = (ids, watched, state, shadow, oi, oo, on)
    before = [sys.getrefcount(a) for a in args]
    for i in range(200):
        state[i % 55] += 1
        native.watch_diff(*args)
        native.watched_unique(ids, watched)
        with pytest.raises(ValueError):
            native.watch_diff(ids, watched, state, shadow, oi[:10], oo, on)
    assert [sys.getrefcount(a) for a in args] == before


@FAST
@given(c=cases(), strided_state=st.booleans())
def test_the_native_fast_path_equals_its_checked_path(c, strided_state):
    """Plain arguments (C-contiguous ids, uint8 watched) take the native fast path; bool
    ``watched`` and strided ``ids`` go through the argument checks first: same results."""
    if strided_state:  # the state as a column of a row group, read in place by both paths
        rows = np.zeros((c["state"].shape[0], 3), c["state"].dtype)
        rows[:, 1] = c["state"]
        c["state"] = rows[:, 1]
    fast, slow = copy_case(c), copy_case(c)
    slow["state"] = c["state"]
    fast["state"] = c["state"]
    slow["watched"] = slow["watched"].astype(bool)
    slow["ids"] = np.repeat(slow["ids"], 2)[::2]
    assert not slow["ids"].flags.c_contiguous or slow["ids"].shape[0] <= 1
    got_fast, got_slow = run(native, fast, 1), run(native, slow, 1)
    j = got_fast[0]
    assert j == got_slow[0]
    assert all(bits(a[:j]) == bits(b[:j]) for a, b in zip(got_fast[1:], got_slow[1:]))
    assert bits(fast["shadow"]) == bits(slow["shadow"])
