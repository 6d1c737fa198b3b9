"""engine._keys (native) == engine._keys_py (twin) == a plain dict model.

Interning runs against a dict model, both as properties and as a state machine that drives the
native module, the twin and the model together. The key streams include negative keys,
INT64_MIN/MAX, heavy duplication and tables that resize several times. Routing is pinned by
golden values (which must never change: a change moves keys to other shards). It is checked
against published splitmix64/FNV-1a vectors, between the two modules and across the three
string input forms.
"""

from __future__ import annotations

import multiprocessing
import pickle
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from engine import _keys as native
from engine import _keys_py as twin

MODULES = [pytest.param(native, id="native"), pytest.param(twin, id="twin")]
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
INT32_MAX = (1 << 31) - 1
SPECIAL = [0, 1, -1, 2, INT64_MIN, INT64_MIN + 1, INT64_MAX, INT64_MAX - 1]
FAST = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])


# ---- independent references and data generators ------------------------------------------------


def ref_splitmix64(x: int) -> int:
    """Textbook splitmix64 on Python ints (the test's own copy, not the twin's)."""
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def ref_fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & ((1 << 64) - 1)
    return h


def model_intern(model: dict[int, int], keys: list[int]) -> list[int]:
    out = []
    for k in keys:
        if k not in model:
            model[k] = len(model)
        out.append(model[k])
    return out


def key_stream(seed: int, n: int, distinct: int) -> np.ndarray:
    """n keys drawn from `distinct` keys: the specials plus random full-range int64s."""
    rng = np.random.default_rng(seed)
    pool = np.concatenate([np.array(SPECIAL, np.int64),
                           rng.integers(INT64_MIN, INT64_MAX, distinct, dtype=np.int64,
                                        endpoint=True)])[:distinct]
    return pool[rng.integers(0, len(pool), n)]


keys_st = st.one_of(st.sampled_from(SPECIAL), st.integers(-20, 20),
                    st.integers(INT64_MIN, INT64_MAX))
key_lists = st.lists(keys_st, max_size=60)
streams = st.builds(key_stream, st.integers(0, 2**32 - 1), st.integers(0, 4000),
                    st.integers(1, 2500))
key_arrays = st.one_of(key_lists.map(lambda ks: np.array(ks, dtype=np.int64)), streams)
shards_st = st.one_of(st.integers(1, 5), st.just(INT32_MAX), st.integers(1, INT32_MAX))
str_keys = st.lists(st.one_of(st.text(max_size=12), st.binary(max_size=12)), max_size=40)


def arrow_pair(encoded: list[bytes], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(int32 offsets, uint8 data) in Arrow layout; `pad` junk bytes before the first string
    make offsets start above zero, as in a sliced Arrow array."""
    offsets = np.full(len(encoded) + 1, pad, dtype=np.int32)
    offsets[1:] += np.cumsum([len(e) for e in encoded], dtype=np.int64).astype(np.int32)
    data = np.frombuffer(b"\xff" * pad + b"".join(encoded), dtype=np.uint8)
    return offsets, data


def read_only(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.setflags(write=False)
    return a


def memmap_of(tmp_path, a: np.ndarray, name: str) -> np.memmap:
    path = tmp_path / name
    a.tofile(path)
    return np.memmap(path, dtype=a.dtype, mode="r", shape=a.shape)


def raised(fn, *args):
    """(exception type, message) of fn(*args), or None when it returns."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - the point is to compare them
        return type(exc), str(exc)
    return None


# ---- the interner against a dict model ----------------------------------------------------------


def fill_levels(mod) -> None:
    it = mod.Int64Interner(capacity=0)
    for k in range(1, 600):
        assert it.intern_one(k) == k - 1
        assert it.get(-k) == -1 and -k not in it
        assert it.lookup([-k, 0, k]).tolist() == [-1, -1, k - 1]


@pytest.mark.parametrize("mod", MODULES)
def test_absent_keys_found_absent_at_every_fill_level(mod):
    """A miss must stop at an empty slot: the table never fills up, across every resize.
    Run in a forked child: a probe loop that never ends holds the GIL, so no in-process
    timeout could stop it."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork")
    child = multiprocessing.get_context("fork").Process(target=fill_levels, args=(mod,))
    child.start()
    child.join(30)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("a lookup of an absent key never returned: the table filled up")
    assert child.exitcode == 0


@pytest.mark.parametrize("mod", MODULES)
@FAST
@given(chunks=st.lists(key_arrays, min_size=1, max_size=4), probes=key_arrays,
       capacity=st.integers(0, 40))
def test_interner_equals_dict_model(mod, chunks, probes, capacity):
    it, model = mod.Int64Interner(capacity), {}
    for chunk in chunks:
        ids = it.intern(chunk)
        assert ids.dtype == np.int64
        assert ids.tolist() == model_intern(model, chunk.tolist())
    assert len(it) == len(model)
    assert it.keys().tolist() == list(model)
    assert it.lookup(probes).tolist() == [model.get(k, -1) for k in probes.tolist()]
    for k in probes[:50].tolist():
        assert it.get(k) == model.get(k, -1)
        assert it.get(k, -7) == model.get(k, -7)
        assert (k in it) == (k in model)
    all_ids = np.arange(len(model), dtype=np.int64)
    assert it.key_of(all_ids[::-1]).tolist() == list(model)[::-1]
    assert len(it) == len(model)  # lookups, gets and key_of never add


@pytest.mark.parametrize("mod", MODULES)
@FAST
@given(keys=key_lists, capacity=st.integers(0, 4))
def test_intern_one_equals_intern(mod, keys, capacity):
    one, bulk = mod.Int64Interner(capacity), mod.Int64Interner()
    assert [one.intern_one(k) for k in keys] == bulk.intern(np.array(keys, np.int64)).tolist()
    assert one.keys().tolist() == bulk.keys().tolist()


@FAST
@given(values=streams, capacity=st.integers(0, 40), seeds=st.tuples(
    st.integers(0, 2**64 - 1), st.integers(INT64_MIN, INT64_MAX)))
def test_seed_changes_layout_never_ids(values, capacity, seeds):
    a = native.Int64Interner(capacity, seed=seeds[0])
    b = native.Int64Interner(capacity, seed=seeds[1])
    assert a.intern(values).tolist() == b.intern(values).tolist() == \
        twin.Int64Interner(capacity).intern(values).tolist()


class InternerMachine(RuleBasedStateMachine):
    """Native, twin and a dict model take the same steps and must agree after each one."""

    @initialize(capacity=st.integers(0, 20), seed=st.integers(0, 2**64 - 1))
    def start(self, capacity, seed):
        self.native = native.Int64Interner(capacity, seed=seed)
        self.twin = twin.Int64Interner(capacity)
        self.model: dict[int, int] = {}

    def both(self, method, *args):
        got_n = getattr(self.native, method)(*args)
        got_t = getattr(self.twin, method)(*args)
        if isinstance(got_n, np.ndarray):
            assert got_n.dtype == got_t.dtype == np.int64
            got_n, got_t = got_n.tolist(), got_t.tolist()
        assert got_n == got_t
        return got_n

    @rule(values=key_arrays)
    def intern(self, values):
        assert self.both("intern", values) == model_intern(self.model, values.tolist())

    @rule(values=key_arrays)
    def lookup(self, values):
        assert self.both("lookup", values) == [self.model.get(k, -1) for k in values.tolist()]

    @rule(key=keys_st)
    def intern_one(self, key):
        assert self.both("intern_one", key) == model_intern(self.model, [key])[0]

    @rule(key=keys_st, default=keys_st)
    def get(self, key, default):
        assert self.both("get", key, default) == self.model.get(key, default)

    @rule(keys=key_lists, seed=st.integers(0, 2**32), fresh=st.integers(0, 3000),
          late_dup=st.booleans())
    def extend(self, keys, seed, fresh, late_dup):
        """Up to 3000 fresh keys (several resizes) plus drawn keys, which may repeat."""
        rng = np.random.default_rng(seed)
        new = rng.integers(INT64_MIN, INT64_MAX, fresh, dtype=np.int64).tolist()
        new = [k for k in dict.fromkeys(new) if k not in self.model] + keys
        if late_dup and self.model:
            new.append(next(iter(self.model)))
        arr = np.array(new, dtype=np.int64)
        before = list(self.model)
        dup = len(set(new)) < len(new) or any(k in self.model for k in new)
        err_n, err_t = raised(self.native.extend, arr), raised(self.twin.extend, arr)
        assert err_n == err_t
        if dup:
            assert err_n is not None and err_n[0] is ValueError
            assert list(self.model) == before  # checked again by the invariant
        else:
            assert err_n is None
            model_intern(self.model, new)

    @rule(ids=st.lists(st.integers(-3, 3000), max_size=20))
    def key_of(self, ids):
        arr = np.array(ids, dtype=np.int64)
        err_n, err_t = raised(self.native.key_of, arr), raised(self.twin.key_of, arr)
        assert err_n == err_t
        if err_n is None:
            keys = list(self.model)
            assert self.both("key_of", arr) == [keys[i] for i in ids]
        else:
            assert err_n[0] is IndexError
            assert any(i < 0 or i >= len(self.model) for i in ids)

    @invariant()
    def same_state(self):
        assert len(self.native) == len(self.twin) == len(self.model)
        assert self.native.keys().tolist() == self.twin.keys().tolist() == list(self.model)


InternerMachine.TestCase.settings = settings(
    deadline=None, max_examples=40, stateful_step_count=25,
    suppress_health_check=[HealthCheck.too_slow])
test_interner_machine = InternerMachine.TestCase


# ---- the interner: explicit cases ---------------------------------------------------------------


@pytest.mark.parametrize("mod", MODULES)
def test_first_appearance_order_and_extremes(mod):
    it = mod.Int64Interner(0)
    assert it.intern([INT64_MAX, 5, INT64_MIN, 5, -1, INT64_MAX]).tolist() == [0, 1, 2, 1, 3, 0]
    assert it.intern_one(-1) == 3 and it.intern_one(0) == 4
    assert it.get(INT64_MIN) == 2 and it.get(7) == -1 and it.get(7, 99) == 99
    assert it.lookup([0, 7, INT64_MIN]).tolist() == [4, -1, 2]
    assert it.keys().tolist() == [INT64_MAX, 5, INT64_MIN, -1, 0]
    assert it.key_of([4, 0]).tolist() == [0, INT64_MAX]
    assert INT64_MIN in it and 7 not in it and (1 << 70) not in it and len(it) == 5
    keys = it.keys()
    keys[0] = 123  # a copy: the interner is unaffected
    assert it.keys()[0] == INT64_MAX


@pytest.mark.parametrize("mod", MODULES)
def test_growth_past_many_resizes(mod):
    values = key_stream(7, 300_000, 100_000)
    it = mod.Int64Interner(0)
    first = it.intern(values)
    _, first_pos, inverse = np.unique(values, return_index=True, return_inverse=True)
    rank = np.empty(len(first_pos), np.int64)
    rank[np.argsort(first_pos)] = np.arange(len(first_pos))  # ids in first-appearance order
    assert np.array_equal(first, rank[inverse])
    assert np.array_equal(it.lookup(values), first) and np.array_equal(it.intern(values), first)
    assert np.array_equal(it.key_of(first), values)


@pytest.mark.parametrize("mod", MODULES)
def test_extend_rejects_duplicates_and_changes_nothing(mod):
    it = mod.Int64Interner(2)
    it.extend([10, 20, 30])
    assert it.keys().tolist() == [10, 20, 30]
    fresh = key_stream(3, 5000, 5000)  # thousands of inserts to undo, after a resize
    fresh = fresh[np.sort(np.unique(fresh, return_index=True)[1])]  # distinct, in order
    fresh = fresh[~np.isin(fresh, [10, 20, 30])]
    with pytest.raises(ValueError, match=r"key 20 at position \d+ is already interned \(id 1\)"):
        it.extend(np.append(fresh, 20))
    with pytest.raises(ValueError, match=r"key 7 at position 2 repeats position 0"):
        it.extend([7, 8, 7])
    assert it.keys().tolist() == [10, 20, 30] and len(it) == 3
    assert (it.lookup(fresh) == -1).all() and it.get(7) == -1 and 8 not in it
    assert it.intern([8, 20, fresh[0]]).tolist() == [3, 1, 4]  # the table still works
    it.extend(fresh[1:])
    assert it.keys().tolist() == [10, 20, 30, 8] + fresh.tolist()


def test_error_messages_match():
    calls = [
        ("extend", ([1, 2, 1],)), ("extend", ([5],)), ("key_of", ([0, 3],)),
        ("key_of", ([-1],)), ("intern", (np.zeros(3, np.int32),)), ("lookup", ([1.5],)),
        ("intern", (np.zeros((2, 2), np.int64),)), ("intern", (7,)),
    ]
    for method, args in calls:
        results = []
        for mod in (native, twin):
            it = mod.Int64Interner()
            it.intern([5, 6])
            results.append(raised(getattr(it, method), *args))
        assert results[0] is not None and results[0] == results[1], (method, results)


@pytest.mark.parametrize("mod", MODULES)
def test_scalar_argument_errors(mod):
    it = mod.Int64Interner()
    for bad, exc in [(1 << 63, OverflowError), (INT64_MIN - 1, OverflowError),
                     (1.0, TypeError), ("1", TypeError), (None, TypeError)]:
        for call in (it.intern_one, it.get, lambda k: it.get(0, k),
                     lambda k: mod.shard_of_int(k, 3), lambda k: mod.Int64Interner(k)):
            with pytest.raises(exc):
                call(bad)
    with pytest.raises(TypeError):
        1.5 in it  # noqa: B015
    with pytest.raises(ValueError, match="capacity"):
        mod.Int64Interner(-1)
    assert it.intern_one(np.int64(4)) == it.intern_one(True + 3) == 0  # __index__ works
    assert len(it) == 1


@pytest.mark.parametrize("mod", MODULES)
def test_readonly_strided_and_memmap_inputs(mod, tmp_path):
    values = key_stream(1, 2000, 300)
    expect = mod.Int64Interner().intern(values)
    for form in (read_only(values), memmap_of(tmp_path, values, "v.i64"), list(values)):
        it = mod.Int64Interner()
        assert np.array_equal(it.intern(form), expect)
        assert np.array_equal(it.lookup(form), expect)
        assert np.array_equal(it.key_of(read_only(expect)), values)
        assert np.array_equal(mod.splitmix64(form), twin.splitmix64(values))
        assert np.array_equal(mod.shard_of_ints(form, 13), twin.shard_of_ints(values, 13))
        fresh = mod.Int64Interner()
        fresh.extend(memmap_of(tmp_path, it.keys(), "k.i64"))
        assert np.array_equal(fresh.keys(), it.keys())
    double = np.repeat(values, 2)
    assert np.array_equal(mod.Int64Interner().intern(double[::2]), expect)  # strided view
    assert mod.Int64Interner().intern([]).shape == (0,)


@pytest.mark.parametrize("mod", MODULES)
def test_pickle_round_trip(mod):
    it = mod.Int64Interner()
    it.intern(key_stream(2, 1000, 100))
    back = pickle.loads(pickle.dumps(it))
    assert type(back) is type(it) and np.array_equal(back.keys(), it.keys())


@pytest.mark.parametrize("mod", MODULES)
def test_threads_share_one_interner_safely(mod):
    """Concurrent bulk and scalar calls serialise: every id maps back to its key."""
    it = mod.Int64Interner(0)
    chunks = [key_stream(s, 50_000, 20_000) for s in range(4)]
    results: dict[int, list] = {}

    def work(t: int) -> None:
        out = []
        for rep in range(3):
            out.append((chunks[t], it.intern(chunks[t])))
            small = chunks[(t + 1) % 4][rep * 300:(rep + 1) * 300]
            out.append((small, np.array([it.intern_one(k) for k in small.tolist()])))
            it.lookup(chunks[(t + 2) % 4])
        results[t] = out

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    keys = it.keys()
    assert len(np.unique(keys)) == len(keys) == len(np.unique(np.concatenate(chunks)))
    for out in results.values():
        for values, ids in out:
            assert np.array_equal(it.key_of(ids), values)


# ---- routing ------------------------------------------------------------------------------------


def test_golden_values():
    """Pinned forever: a failure here means keys would move to other shards."""
    mix = [0xE220A8397B1DCDAF, 0x910A2DEC89025CC1, 0xE4D971771B652C20,
           0x2A67D7552E039EA7, 0x481EC0A212A9F3DB]
    ints = np.array([0, 1, -1, INT64_MAX, INT64_MIN], np.int64)
    strs = ["", "user-1", "user-2", "é"]
    for mod in (native, twin):
        assert mod.splitmix64(ints).tolist() == mix
        assert mod.splitmix64(ints).dtype == np.uint64
        assert mod.hash_bytes(b"") == 0xC3817C016BA4FF30
        assert mod.hash_bytes(b"a") == 0x5F29C2AADD9B8527
        assert mod.hash_bytes(b"user-1") == 0xF16D8D440FBB25D5
        assert mod.shard_of_ints(np.array([0, 1, -1, 42]), 16).tolist() == [15, 1, 0, 5]
        assert mod.shard_of_ints(np.array([0, 1, -1, 42]), 7).tolist() == [2, 2, 0, 5]
        assert mod.shard_of_strs(strs, 16).tolist() == [0, 5, 7, 10]
        assert mod.shard_of_strs(strs, 7).tolist() == [4, 4, 2, 5]
    # Tie the pins to published vectors: splitmix64's first output for seed 0, FNV-1a("a").
    assert ref_splitmix64(0) == mix[0]
    assert ref_fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert ref_splitmix64(ref_fnv1a64(b"a")) == 0x5F29C2AADD9B8527


@FAST
@given(values=key_arrays, shards=shards_st)
def test_int_routing_agrees(values, shards):
    expect = [ref_splitmix64(x & ((1 << 64) - 1)) for x in values.tolist()]
    assert native.splitmix64(values).tolist() == twin.splitmix64(values).tolist() == expect
    got = native.shard_of_ints(values, shards)
    assert got.dtype == np.int32
    assert got.tolist() == twin.shard_of_ints(values, shards).tolist() == \
        [h % shards for h in expect]
    for x, s in zip(values[:20].tolist(), got[:20].tolist()):
        assert native.shard_of_int(x, shards) == twin.shard_of_int(x, shards) == s


@FAST
@given(keys=str_keys, shards=shards_st, pad=st.integers(0, 3))
def test_string_routing_agrees_across_forms(keys, shards, pad):
    encoded = [k.encode() if isinstance(k, str) else k for k in keys]
    expect = [ref_splitmix64(ref_fnv1a64(e)) % shards for e in encoded]
    offsets, data = arrow_pair(encoded, pad)
    for mod in (native, twin):
        assert mod.shard_of_strs(keys, shards).tolist() == expect
        assert mod.shard_of_strs(encoded, shards).tolist() == expect
        assert mod.shard_of_strs(tuple(keys), shards).tolist() == expect
        assert mod.shard_of_strs((offsets, data), shards).tolist() == expect
        assert mod.shard_of_strs((read_only(offsets), data.tobytes()), shards).tolist() == expect
        assert mod.shard_of_strs((offsets, data.view(np.int8)), shards).tolist() == expect
        assert [mod.shard_of_str(k, shards) for k in keys] == expect
        assert [mod.hash_bytes(e) for e in encoded] == [mod.hash_bytes(bytearray(e))
                                                      for e in encoded]
        assert mod.shard_of_strs((offsets, data), shards).dtype == np.int32


def test_arrow_inputs_from_pyarrow_and_memmap(tmp_path):
    pa = pytest.importorskip("pyarrow")
    strs = [f"user-{i}" for i in range(100)] + ["", "é", "日本"]
    arr = pa.array(strs).slice(3, 90)  # a slice: offsets start above 0
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, np.int32)[arr.offset:arr.offset + len(arr) + 1]
    expect = twin.shard_of_strs(strs[3:93], 10)
    offs_mm = memmap_of(tmp_path, offsets, "o.i32")
    data_mm = memmap_of(tmp_path, np.frombuffer(data_buf, np.uint8), "d.u8")
    for mod in (native, twin):
        assert np.array_equal(mod.shard_of_strs((offsets, data_buf), 10), expect)  # format 'b'
        assert np.array_equal(mod.shard_of_strs((offs_mm, data_mm), 10), expect)


def test_routing_errors_match():
    good = (np.array([0, 1, 3], np.int32), b"abc")
    cases = [
        ("shard_of_ints", ([1, 2], 0)), ("shard_of_ints", ([1, 2], -3)),
        ("shard_of_ints", ([1, 2], 1 << 31)), ("shard_of_ints", (np.zeros(2, np.uint64), 4)),
        ("shard_of_strs", (["a", 3], 4)), ("shard_of_strs", ("abc", 4)),
        ("shard_of_strs", (good, 0)), ("shard_of_str", (3, 4)), ("shard_of_str", ("a", 0)),
        ("shard_of_strs", ((np.array([0, 1, 3], np.int64), b"abc"), 4)),
        ("shard_of_strs", ((np.array([-1, 1], np.int32), b"abc"), 4)),
        ("shard_of_strs", ((np.array([0, 2, 1], np.int32), b"abc"), 4)),
        ("shard_of_strs", ((np.array([0, 4], np.int32), b"abc"), 4)),
        ("shard_of_strs", ((np.array([], np.int32), b""), 4)),
        ("shard_of_strs", ((np.array([0, 1], np.int32), "abc"), 4)),
        ("hash_bytes", ("abc",)), ("hash_bytes", (3,)),
    ]
    for name, args in cases:
        got_n, got_t = raised(getattr(native, name), *args), raised(getattr(twin, name), *args)
        assert got_n is not None and got_n == got_t, (name, args, got_n, got_t)
    for mod in (native, twin):
        with pytest.raises(OverflowError):
            mod.shard_of_ints([1], 1 << 64)
        with pytest.raises(UnicodeEncodeError):
            mod.shard_of_str("\ud800", 4)  # a lone surrogate has no UTF-8 form
        assert mod.shard_of_strs((np.array([0], np.int32), b""), 4).shape == (0,)
        assert mod.shard_of_strs([], 4).shape == (0,)
        assert mod.shard_of_strs(iter(["a", b"a"]), 4).tolist() == [mod.shard_of_str("a", 4)] * 2


@pytest.mark.parametrize("mod", MODULES)
def test_public_names(mod):
    assert sorted(mod.__all__) == sorted([
        "Int64Interner", "splitmix64", "hash_bytes", "shard_of_ints", "shard_of_int",
        "shard_of_strs", "shard_of_str"])
    for name in mod.__all__:
        assert hasattr(mod, name)
