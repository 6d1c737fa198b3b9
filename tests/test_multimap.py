"""engine._multimap.MultiMap (native) == engine._multimap_py.MultiMap (twin) == a dict model.

A Hypothesis state machine drives the native map, the twin and a plain dict-of-lists model
through the same adds (distinct or not, with repeats inside a call) and reads, and checks they
agree after every step, including ``pairs()`` / ``from_pairs`` and pickling. Long lists cross
the block-size cap; a distinct add after non-distinct ones builds the pair set from what is
there; concurrent adds are serialised; bad arguments raise alike in both.
"""

from __future__ import annotations

import pickle
import sys
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from engine import _multimap as native
from engine import _multimap_py as twin

MODULES = [pytest.param(native, id="native"), pytest.param(twin, id="twin")]


def pair_arrays(max_key: int, max_value: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, max_key + 1, n).astype(np.int64),
            rng.integers(-max_value, max_value + 1, n).astype(np.int64))


pairs_st = st.builds(pair_arrays, st.integers(0, 60), st.integers(0, 8), st.integers(0, 300),
                     st.integers(0, 2**32 - 1))
probe_st = st.lists(st.integers(-3, 80), max_size=30).map(lambda x: np.array(x, np.int64))


class MultiMapMachine(RuleBasedStateMachine):
    """Native, twin and a dict model take the same steps and must agree after each one."""

    @initialize(seed=st.integers(0, 2**64 - 1))
    def start(self, seed):
        self.native = native.MultiMap(seed=seed)
        self.twin = twin.MultiMap()
        self.lists: dict[int, list[int]] = {}
        self.log: list[tuple[int, int]] = []

    def model_add(self, keys, values, distinct):
        added = []
        for k, v in zip(keys.tolist(), values.tolist()):
            ok = not (distinct and v in self.lists.get(k, []))
            if ok:
                self.lists.setdefault(k, []).append(v)
                self.log.append((k, v))
            added.append(ok)
        return added

    @rule(kv=pairs_st, distinct=st.booleans())
    def add(self, kv, distinct):
        keys, values = kv
        want = self.model_add(keys, values, distinct)
        for mm in (self.native, self.twin):
            got = mm.add(keys, values, distinct=distinct)
            assert got.dtype == bool and got.tolist() == want

    @rule(probes=probe_st)
    def reads(self, probes):
        for mm in (self.native, self.twin):
            offsets, values = mm.get_many(probes)
            assert offsets.dtype == values.dtype == np.int64
            for i, k in enumerate(probes.tolist()):
                want = self.lists.get(k, [])
                assert values[offsets[i]:offsets[i + 1]].tolist() == want
                assert mm.get(k).tolist() == want and mm.length(k) == len(want)
            assert offsets[-1] == len(values)

    @rule(nkeys=st.integers(0, 80))
    def lengths(self, nkeys):
        want = [len(self.lists.get(k, [])) for k in range(nkeys)]
        assert self.native.lengths(nkeys).tolist() == self.twin.lengths(nkeys).tolist() == want

    @rule()
    def rebuild(self):
        """pairs() -> from_pairs() and pickle give back the same map."""
        for mod, mm in ((native, self.native), (twin, self.twin)):
            keys, values = mm.pairs()
            assert list(zip(keys.tolist(), values.tolist())) == self.log
            for copy in (mod.MultiMap.from_pairs(keys, values), pickle.loads(pickle.dumps(mm))):
                assert type(copy) is mod.MultiMap
                assert [tuple(a.tolist()) for a in copy.pairs()] == [tuple(a.tolist()) for a in
                                                                     (keys, values)]

    @invariant()
    def sizes(self):
        if hasattr(self, "native"):
            assert len(self.native) == len(self.twin) == len(self.log)
            assert repr(self.native) == repr(self.twin)


MultiMapMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=12, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestMultiMap = MultiMapMachine.TestCase


@pytest.mark.parametrize("mod", MODULES)
def test_long_lists_cross_the_block_cap_and_keep_order(mod):
    mm = mod.MultiMap()
    keys = np.array([7] * 10_000 + [3] * 5 + [7] * 3, np.int64)
    values = np.arange(keys.shape[0], dtype=np.int64)
    assert mm.add(keys, values, distinct=False).all()
    assert mm.get(7).tolist() == list(range(10_000)) + [10_005, 10_006, 10_007]
    assert mm.get(3).tolist() == list(range(10_000, 10_005))
    k, v = mm.pairs()
    assert k.tolist() == keys.tolist() and v.tolist() == values.tolist()


@pytest.mark.parametrize("mod", MODULES)
def test_distinct_after_plain_adds_sees_what_is_there(mod):
    mm = mod.MultiMap()
    mm.add([1, 1, 2], [5, 5, 6], distinct=False)               # a duplicate, kept
    assert mm.add([1, 2, 2, 3, 3], [5, 6, 7, 8, 8]).tolist() == [False, False, True, True, False]
    assert mm.add([1], [5], distinct=False).tolist() == [True]  # still appends when asked
    assert mm.get(1).tolist() == [5, 5, 5] and mm.get(2).tolist() == [6, 7]
    assert len(mm) == 6 and mm.get(3).tolist() == [8]


@pytest.mark.parametrize("mod", MODULES)
def test_unknown_and_odd_keys_read_as_empty(mod):
    mm = mod.MultiMap()
    mm.add([0, 5], [1, 2])
    for key in (-1, 4, 6, 10**6, 2**70, np.int64(3)):
        assert mm.get(key).tolist() == [] and mm.length(key) == 0
    offsets, values = mm.get_many(np.array([5, -1, 2**40, 0], np.int64))
    assert offsets.tolist() == [0, 1, 1, 1, 2] and values.tolist() == [2, 1]
    assert mm.lengths(0).tolist() == [] and mm.lengths(7).tolist() == [1, 0, 0, 0, 0, 1, 0]
    empty = mod.MultiMap()
    assert len(empty) == 0 and [a.tolist() for a in empty.pairs()] == [[], []]
    assert empty.get_many([])[0].tolist() == [0]


def raised(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the point is to compare them
        return type(exc), str(exc)
    return None


BAD = {
    "negative key": lambda m: m.MultiMap().add([1, -1], [0, 0]),
    "key too big": lambda m: m.MultiMap().add([2**40], [0]),
    "lengths differ": lambda m: m.MultiMap().add([1, 2], [0]),
    "int32 keys": lambda m: m.MultiMap().add(np.array([1], np.int32), [0]),
    "float values": lambda m: m.MultiMap().add([1], [0.5]),
    "2-D keys": lambda m: m.MultiMap().add(np.zeros((1, 1), np.int64), [0]),
    "float key": lambda m: m.MultiMap().get(1.5),
    "lengths < 0": lambda m: m.MultiMap().lengths(-1),
    "seed str": lambda m: m.MultiMap(seed="x"),
    "get_many float": lambda m: m.MultiMap().get_many(np.array([1.0])),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_arguments_raise_the_same_error_in_both(name):
    got_n, got_t = raised(lambda: BAD[name](native)), raised(lambda: BAD[name](twin))
    assert got_n is not None and got_n == got_t


@pytest.mark.parametrize("mod", MODULES)
def test_a_rejected_add_adds_nothing(mod):
    mm = mod.MultiMap()
    mm.add([1], [1])
    with pytest.raises(ValueError):
        mm.add([2, 3, -4], [1, 1, 1])
    assert len(mm) == 1 and mm.lengths(4).tolist() == [0, 1, 0, 0]


@pytest.mark.parametrize("mod", MODULES)
def test_concurrent_distinct_adds_keep_each_pair_once(mod):
    mm = mod.MultiMap()
    keys, values = pair_arrays(2_000, 50, 60_000, seed=1)
    chunks = [(keys[i::4], values[i::4]) for i in range(4)]
    threads = [threading.Thread(target=mm.add, args=chunk) for chunk in chunks]
    readers = [threading.Thread(target=lambda: [mm.get_many(keys[:500]) for _ in range(20)])]
    for t in threads + readers:
        t.start()
    for t in threads + readers:
        t.join()
    unique = set(zip(keys.tolist(), values.tolist()))
    k, v = mm.pairs()
    assert len(mm) == len(unique) and set(zip(k.tolist(), v.tolist())) == unique


def test_native_big_map_equals_twin_and_keeps_reference_counts():
    keys, values = pair_arrays(50_000, 30, 200_000, seed=2)
    a, b = native.MultiMap(seed=1), twin.MultiMap()
    before = [sys.getrefcount(x) for x in (keys, values)]
    for lo in range(0, keys.shape[0], 50_000):
        sl = slice(lo, lo + 50_000)
        d = lo % 100_000 == 0
        assert a.add(keys[sl], values[sl], d).tolist() == b.add(keys[sl], values[sl], d).tolist()
    assert [sys.getrefcount(x) for x in (keys, values)] == before
    probes = np.arange(-1, 50_002, dtype=np.int64)
    assert all((x == y).all() for x, y in zip(a.get_many(probes), b.get_many(probes)))
    assert all((x == y).all() for x, y in zip(a.pairs(), b.pairs()))


@pytest.mark.parametrize("limit", [0, 1, 3, 5000, None])
def test_get_many_limit_keeps_each_keys_first_values(limit):
    rng = np.random.default_rng(5)
    keys = rng.integers(0, 40, 20_000)
    vals = rng.integers(-10**12, 10**12, 20_000)
    ask = np.array([3, -1, 39, 3, 1_000_000, 0], np.int64)
    got = []
    for mod in (native, twin):
        m = mod.MultiMap()
        m.add(keys, vals, distinct=False)
        off, out = m.get_many(ask, limit)
        for i, k in enumerate(ask.tolist()):
            full = m.get(k) if k >= 0 else np.empty(0, np.int64)
            want = full if limit is None else full[:limit]
            assert out[off[i]:off[i + 1]].tolist() == want.tolist()
        got.append((off.tolist(), out.tolist()))
    assert got[0] == got[1]


@pytest.mark.parametrize("mod", [native, twin])
@pytest.mark.parametrize("limit", [-1, 1.5, True, "3"])
def test_get_many_rejects_a_bad_limit(mod, limit):
    with pytest.raises(ValueError, match="limit"):
        mod.MultiMap().get_many(np.array([1], np.int64), limit)
