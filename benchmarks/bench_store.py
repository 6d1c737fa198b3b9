"""The stores' suites (shared BENCH.md): replay-fold, replay-string-keys, restart, query-get and
query-get-single.

Every suite folds one keyed action type "ev" {k: key, v: int64} into count + sum + last of v per
key (the engine fuses the three into one native pass), over seeded data from ``data.py`` that
every system of a group gets identically:

* ``replay-fold`` / ``replay-string-keys``: N actions over a domain of 1M keys, Zipf (1.1) or
  uniform (parameters ``zipf``, ``uniform``). The engine folds them from its on-disk log (in
  the page cache: appended in the module's setup) with a fresh App + Store per round, timing
  only ``app.fold()``; polars and duckdb group the same columns already in memory;
  ``limit-kernel`` is ``engine.jit.fold_count_sum_last_numba`` (warm) over the same interned ids
  and values in memory; ``python-dict`` is a dict loop over the first ``dict_cap`` actions.
  String keys are interned when appended, so the engine's fold is the same id fold; the peers
  group by the strings.
* ``restart``: a store with K keys checkpointed in setup; ``engine`` reopens it and answers one
  ``get``, ``full-replay`` rebuilds the same store from the log and answers the same ``get``.
  Both report the same ``actions`` (the log's length), so the ratio is the speed-up. Parameter
  ``process``: a process restart (``en.open`` of the directory, whose key dictionary loads, is
  timed too); ``store``: the log stays open and only the store is reopened / rebuilt.
* ``query-get``: one batch of raw keys per call through ``store.get_many`` (parameter
  ``get_many``) or of interned ids through ``store.get_ids`` (``get_ids``), against
  ``limit-numpy-take``: numpy fancy indexing of the store's own three arrays by the same ids (the
  same work for both parameters). ``query-get-single``: one ``store.get(key)`` per call.

Sizes by ``ENGINE_BENCH_SCALE`` (see ``SIZES``); results are checked against a numpy reference
after each benchmark (also in the once-each smoke run)::

    ENGINE_BENCH_SCALE=quick pytest benchmarks/bench_store.py --benchmark-only \\
        --benchmark-json=out.json && python -m engine bench report out.json
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from data import (
    STORE_DISTS,
    STORE_KEYS,
    fold_columns,
    fold_reference,
    fold_string_columns,
    restart_columns,
    string_keys_of,
)

import engine as en
from engine import reducers as r
from engine.app import App
from engine.store import Store

FOLD = "replay-fold"
FOLD_STR = "replay-string-keys"
RESTART = "restart"
QUERY = "query-get"
QUERY_SINGLE = "query-get-single"


@dataclass(frozen=True)
class Sizes:
    fold_actions: int  # replay-fold / replay-string-keys actions per round
    dict_cap: int  # python-dict: actions per round (its throughput is per action processed)
    fold_rounds: int  # engine and limit-kernel rounds (fast)
    peer_rounds: int  # polars, duckdb, python-dict rounds
    restart_keys: int  # keys of the checkpointed store (the log has twice as many actions)
    restart_rounds: int
    replay_rounds: int  # full-replay rounds
    query_keys: int  # keys of the queried store
    query_batch: int  # keys per get_many / get_ids call
    single_gets: int  # get() calls per round


SIZES = {
    "smoke": Sizes(fold_actions=20_000, dict_cap=20_000, fold_rounds=1, peer_rounds=1,
                   restart_keys=10_000, restart_rounds=1, replay_rounds=1,
                   query_keys=10_000, query_batch=1_000, single_gets=1_000),
    "quick": Sizes(fold_actions=2_000_000, dict_cap=300_000, fold_rounds=10, peer_rounds=5,
                   restart_keys=1_000_000, restart_rounds=10, replay_rounds=5,
                   query_keys=1_000_000, query_batch=100_000, single_gets=20_000),
    "full": Sizes(fold_actions=10_000_000, dict_cap=1_000_000, fold_rounds=10, peer_rounds=5,
                  restart_keys=10_000_000, restart_rounds=5, replay_rounds=3,
                  query_keys=1_000_000, query_batch=1_000_000, single_gets=100_000),
}


def _limits(actions: int) -> en.Limits:
    """Segments sized to the data (~32 bytes an action, 4 MiB to 256 MiB): every segment is
    preallocated, so the smoke run in CI must not reserve hundreds of MB per log."""
    size = 4 << 20
    while size < 32 * actions and size < 256 << 20:
        size *= 2
    return en.Limits(segment_bytes=size)
QUERY_SEED = 7


@pytest.fixture(scope="module")
def sizes(scale: Any) -> Sizes:
    return SIZES[scale.name]


def _tag(benchmark: Any, group: str, system: str, actions: int, **extra: Any) -> None:
    benchmark.group = group
    benchmark.extra_info["system"] = system
    benchmark.extra_info["actions"] = int(actions)
    benchmark.extra_info.update(extra)


def _ev(str_keys: bool = False) -> en.ActionType:
    return en.ActionType("ev", {"k": en.key("k", str) if str_keys else en.key("k"),
                                "v": en.int64}, partition="k")


def agg_store(name: str = "agg") -> Store:
    """count + sum + last of v per key: the update every system of these suites performs."""
    return Store(name, key="k", columns={"n": np.int64, "s": np.int64, "last": np.int64},
                 reducers={"ev": [r.count("n"), r.sum("s", "v"), r.last("last", "v")]})


def _app(log: en.Log, store: Store) -> App:
    return App(log, [store], checkpoint_every_actions=None, checkpoint_every_s=None)


def _append(path: str, cols: dict[str, Any], str_keys: bool = False) -> en.Log:
    n = len(next(iter(cols.values())))
    log = en.open(path, [_ev(str_keys)], shards=1, durability="none", limits=_limits(n))
    log.append("ev", cols)
    log.flush()
    return log


def _log_columns(log: en.Log) -> tuple[np.ndarray, np.ndarray]:
    """The log's interned key ids and values, copied into memory (writeable, contiguous)."""
    ids = [np.asarray(b.column("ev", "k")) for b in log.read(0)]
    vals = [np.asarray(b.column("ev", "v")) for b in log.read(0)]
    return np.concatenate(ids).astype(np.int64), np.concatenate(vals).astype(np.int64)


def _check(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Same keys (any order) and the same count, sum and last for each."""
    order = np.argsort(np.asarray(got["key"]), kind="stable")
    assert np.array_equal(np.asarray(got["key"])[order], want["key"])
    for c in ("n", "s", "last"):
        assert np.array_equal(np.asarray(got[c], np.int64)[order], want[c]), c


def _check_store(store: Store, want: dict[str, np.ndarray]) -> None:
    many = store.get_many(want["key"].tolist() if want["key"].dtype == object else want["key"])
    assert many["found"].all()
    for c in ("n", "s", "last"):
        assert np.array_equal(many[c], want[c]), c


# =============================================================================================
# replay-fold and replay-string-keys: count + sum + last per key over N actions
# =============================================================================================
@dataclass
class FoldData:
    """One parameter set's actions: in memory for the peers, appended to a log for the engine."""

    keys: Any  # raw keys: int64 numpy array or a pyarrow string array
    vals: np.ndarray
    log: en.Log
    ids: np.ndarray  # the log's interned key ids (for limit-kernel)
    want: dict[str, np.ndarray]  # fold_reference over the raw keys

    @property
    def n(self) -> int:
        return len(self.vals)


class FoldLogs:
    """Logs built on first use, one per (string keys?, distribution), closed at module end."""

    def __init__(self, root: Any, n: int):
        self.root, self.n = root, n
        self.made: dict[tuple[bool, str], FoldData] = {}

    def __call__(self, dist: str, str_keys: bool = False) -> FoldData:
        if (str_keys, dist) not in self.made:
            path = str(self.root / f"{'str' if str_keys else 'int'}-{dist}")
            if str_keys:
                cols = fold_string_columns(self.n, dist)
                ints = fold_columns(self.n, dist)["k"]
                ref = fold_reference(ints, cols["v"])  # int order = string order (zero-padded)
                ref["key"] = np.array(string_keys_of(ref["key"]), object)
            else:
                cols = fold_columns(self.n, dist)
                ref = fold_reference(cols["k"], cols["v"])
            log = _append(path, cols, str_keys)
            ids, vals = _log_columns(log)
            self.made[(str_keys, dist)] = FoldData(cols["k"], vals, log, ids, ref)
        return self.made[(str_keys, dist)]

    def close(self) -> None:
        for d in self.made.values():
            d.log.close()


@pytest.fixture(scope="module")
def fold_logs(tmp_path_factory: Any, sizes: Sizes) -> Iterator[FoldLogs]:
    logs = FoldLogs(tmp_path_factory.mktemp("fold"), sizes.fold_actions)
    yield logs
    logs.close()


def _fold_engine(benchmark: Any, sizes: Sizes, d: FoldData, group: str) -> None:
    _tag(benchmark, group, "engine", d.n, keys=STORE_KEYS, distinct=len(d.want["key"]))
    apps: list[App] = []

    def setup() -> tuple[tuple, dict]:
        apps.clear()  # drop the previous round's store before allocating the next
        gc.collect()  # and free it now, not in a collection inside the timed fold
        shutil.rmtree(os.path.join(d.log.path, "stores", "agg"), ignore_errors=True)
        apps.append(_app(d.log, agg_store()))
        return (apps[0],), {}

    def run(app: App) -> int:
        return app.fold()

    folded = benchmark.pedantic(run, setup=setup, rounds=sizes.fold_rounds, warmup_rounds=1,
                                iterations=1)
    assert folded == d.n
    _check_store(apps[0]["agg"], d.want)


def _polars(benchmark: Any, peers: Any, sizes: Sizes, d: FoldData, group: str) -> None:
    pl = peers.module("polars", "polars", "polars")
    df = pl.DataFrame({"k": pl.Series("k", d.keys), "v": d.vals})
    _tag(benchmark, group, "polars", d.n, threads=pl.thread_pool_size())

    def run() -> Any:
        return df.group_by("k").agg(pl.len().alias("n"), pl.col("v").sum().alias("s"),
                                    pl.col("v").last().alias("last"))

    out = benchmark.pedantic(run, rounds=sizes.peer_rounds, warmup_rounds=1, iterations=1)
    _check({c: out[c].to_numpy() for c in ("n", "s", "last")}
           | {"key": np.asarray(out["k"].to_list(), dtype=d.want["key"].dtype)}, d.want)


DUCKDB_SQL = ("SELECT k, count(*) AS n, sum(v)::BIGINT AS s, arg_max(v, rowid) AS last "
              "FROM ev GROUP BY k")


def _duckdb(benchmark: Any, peers: Any, sizes: Sizes, d: FoldData, group: str) -> None:
    """An in-memory duckdb table (insertion order kept: ``rowid`` is the log order), "last" as
    ``arg_max(v, rowid)``; the result materialized as an Arrow table."""
    duckdb = peers.module("duckdb", "duckdb", "duckdb")
    import pyarrow as pa

    con = duckdb.connect()
    try:
        src = pa.table({"k": d.keys, "v": d.vals})  # noqa: F841 - scanned by name below
        con.sql("CREATE TABLE ev AS SELECT * FROM src")
        threads = con.sql("SELECT current_setting('threads')").fetchall()[0][0]
        _tag(benchmark, group, "duckdb", d.n, threads=int(threads))

        def run() -> Any:
            return con.sql(DUCKDB_SQL).to_arrow_table()

        out = benchmark.pedantic(run, rounds=sizes.peer_rounds, warmup_rounds=1, iterations=1)
        _check({c: out.column(c).to_numpy() for c in ("n", "s", "last")}
               | {"key": np.asarray(out.column("k").to_pylist(), dtype=d.want["key"].dtype)},
               d.want)
    finally:
        con.close()


@pytest.mark.parametrize("dist", STORE_DISTS)
def test_fold_engine(benchmark: Any, sizes: Sizes, fold_logs: FoldLogs, dist: str) -> None:
    _fold_engine(benchmark, sizes, fold_logs(dist), FOLD)


@pytest.mark.parametrize("dist", STORE_DISTS)
def test_fold_polars(benchmark: Any, peers: Any, sizes: Sizes, fold_logs: FoldLogs,
                     dist: str) -> None:
    _polars(benchmark, peers, sizes, fold_logs(dist), FOLD)


@pytest.mark.parametrize("dist", STORE_DISTS)
def test_fold_duckdb(benchmark: Any, peers: Any, sizes: Sizes, fold_logs: FoldLogs,
                     dist: str) -> None:
    _duckdb(benchmark, peers, sizes, fold_logs(dist), FOLD)


@pytest.mark.parametrize("dist", STORE_DISTS)
def test_fold_limit_kernel(benchmark: Any, sizes: Sizes, fold_logs: FoldLogs, dist: str) -> None:
    """``engine.jit.fold_count_sum_last_numba`` over the log's interned ids and values, both
    already in memory; outputs sized to the distinct keys, zeroed outside the timing, compiled
    before it."""
    jit = pytest.importorskip("engine.jit", reason="limit-kernel needs numba: pip install numba")
    d = fold_logs(dist)
    nk = len(d.want["key"])
    outs = tuple(np.zeros(nk, np.int64) for _ in range(3))
    kernel = jit.fold_count_sum_last_numba
    kernel(*outs, d.ids, d.vals)  # compile (or load the cache) now
    _tag(benchmark, FOLD, "limit-kernel", d.n, kernel="fold_count_sum_last_numba")

    def setup() -> tuple[tuple, dict]:
        for a in outs:
            a.fill(0)
        return (), {}

    def run() -> None:
        kernel(*outs, d.ids, d.vals)

    benchmark.pedantic(run, setup=setup, rounds=sizes.fold_rounds, warmup_rounds=1, iterations=1)
    raw = d.log.dicts["k"].key_of(np.arange(nk))
    _check({"key": raw, "n": outs[0], "s": outs[1], "last": outs[2]}, d.want)


@pytest.mark.parametrize("dist", STORE_DISTS)
def test_fold_python_dict(benchmark: Any, sizes: Sizes, fold_logs: FoldLogs, dist: str) -> None:
    """A dict of [count, sum, last] per key, one Python loop iteration per action, over the
    first ``dict_cap`` actions (Python ints, converted outside the timing)."""
    d = fold_logs(dist)
    m = min(d.n, sizes.dict_cap)
    keys, vals = d.keys[:m].tolist(), d.vals[:m].tolist()
    _tag(benchmark, FOLD, "python-dict", m, capped_from=d.n)

    def run() -> dict[int, list[int]]:
        state: dict[int, list[int]] = {}
        get = state.get
        for k, v in zip(keys, vals):
            e = get(k)
            if e is None:
                state[k] = [1, v, v]
            else:
                e[0] += 1
                e[1] += v
                e[2] = v
        return state

    out = benchmark.pedantic(run, rounds=sizes.peer_rounds, iterations=1)
    want = fold_reference(d.keys[:m], d.vals[:m])
    rows = np.array([out[k] for k in want["key"].tolist()], np.int64).reshape(-1, 3)
    assert len(out) == len(want["key"])
    for j, c in enumerate(("n", "s", "last")):
        assert np.array_equal(rows[:, j], want[c]), c


@pytest.mark.parametrize("dist", STORE_DISTS)
def test_fold_str_engine(benchmark: Any, sizes: Sizes, fold_logs: FoldLogs, dist: str) -> None:
    _fold_engine(benchmark, sizes, fold_logs(dist, str_keys=True), FOLD_STR)


@pytest.mark.parametrize("dist", STORE_DISTS)
def test_fold_str_polars(benchmark: Any, peers: Any, sizes: Sizes, fold_logs: FoldLogs,
                         dist: str) -> None:
    _polars(benchmark, peers, sizes, fold_logs(dist, str_keys=True), FOLD_STR)


@pytest.mark.parametrize("dist", STORE_DISTS)
def test_fold_str_duckdb(benchmark: Any, peers: Any, sizes: Sizes, fold_logs: FoldLogs,
                         dist: str) -> None:
    _duckdb(benchmark, peers, sizes, fold_logs(dist, str_keys=True), FOLD_STR)


# =============================================================================================
# restart: reopen a checkpointed store and answer one get, vs rebuilding it from the log
# =============================================================================================
RESTART_VARIANTS = ("process", "store")


@dataclass
class RestartDir:
    path: str
    actions: int
    keys: int
    probe: int  # the raw key asked for
    want: dict[str, int]


@pytest.fixture(scope="module")
def restart_dir(tmp_path_factory: Any, sizes: Sizes) -> RestartDir:
    """A closed directory: its log, and store "agg" folded and checkpointed at the log's end."""
    cols = restart_columns(sizes.restart_keys)
    path = str(tmp_path_factory.mktemp("restart") / "data")
    log = _append(path, cols)
    try:
        app = _app(log, agg_store())
        app.fold()
        app.checkpoint()
        probe = int(cols["k"][len(cols["k"]) // 2])
        want = app["agg"].get(probe)
        assert want is not None and want["n"] >= 1
    finally:
        log.close()
    return RestartDir(path, len(cols["k"]), sizes.restart_keys, probe, want)


class _Reopened:
    """The log a round opened: closed by the next round's setup, or at the end."""

    def __init__(self) -> None:
        self.log: en.Log | None = None

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


def _restart(benchmark: Any, sizes: Sizes, rd: RestartDir, variant: str, system: str) -> None:
    store_name = "agg" if system == "engine" else "rebuild"  # "rebuild" is never checkpointed
    rounds = sizes.restart_rounds if system == "engine" else sizes.replay_rounds
    _tag(benchmark, RESTART, system, rd.actions, keys=rd.keys,
         log_reopened=variant == "process")
    held = _Reopened()
    answers: list[Any] = []
    opens: list[float] = []
    try:
        if variant == "store":
            held.log = en.open(rd.path, durability="none")

        def setup() -> tuple[tuple, dict]:
            if variant == "process":
                held.close()
            return (), {}

        def run() -> Any:
            if variant == "process":
                t0 = time.perf_counter()
                held.log = en.open(rd.path, durability="none")
                opens.append(time.perf_counter() - t0)
            app = _app(held.log, agg_store(store_name))
            app.fold()  # the tail after the checkpoint (none here) / everything
            return app[store_name].get(rd.probe)

        answers.append(benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=1,
                                          iterations=1))
    finally:
        held.close()
    if opens:  # where a process restart's time goes: the log's open (its key dictionary load)
        benchmark.extra_info["log_open_ms_median"] = round(float(np.median(opens)) * 1e3, 3)
    assert answers == [rd.want]
    assert not os.path.exists(os.path.join(rd.path, "stores", "rebuild"))


@pytest.mark.parametrize("variant", RESTART_VARIANTS)
def test_restart_engine(benchmark: Any, sizes: Sizes, restart_dir: RestartDir,
                        variant: str) -> None:
    _restart(benchmark, sizes, restart_dir, variant, "engine")


@pytest.mark.parametrize("variant", RESTART_VARIANTS)
def test_restart_full_replay(benchmark: Any, sizes: Sizes, restart_dir: RestartDir,
                             variant: str) -> None:
    _restart(benchmark, sizes, restart_dir, variant, "full-replay")


# =============================================================================================
# query-get: batched point reads; query-get-single: one get per call
# =============================================================================================
QUERY_VARIANTS = ("get_many", "get_ids")


@dataclass
class Queried:
    store: Store
    raw: np.ndarray  # raw keys of one batch (all present)
    ids: np.ndarray  # their interned ids


@pytest.fixture(scope="module")
def queried(tmp_path_factory: Any, sizes: Sizes) -> Iterator[Queried]:
    """A store over ``query_keys`` keys, folded, and one seeded batch of its keys."""
    cols = restart_columns(sizes.query_keys, seed=QUERY_SEED)
    log = _append(str(tmp_path_factory.mktemp("query") / "data"), cols)
    try:
        app = _app(log, agg_store())
        app.fold()
        store = app["agg"]
        rng = np.random.default_rng(QUERY_SEED)
        raw = rng.integers(0, sizes.query_keys, sizes.query_batch, dtype=np.int64)
        ids = store.key_ids(raw)
        assert (ids >= 0).all()
        yield Queried(store, raw, ids)
    finally:
        log.close()


def _take(store: Store, ids: np.ndarray) -> dict[str, np.ndarray]:
    arrays = store.shards[0].arrays
    return {c: arrays[c][ids] for c in ("n", "s", "last")}


@pytest.mark.parametrize("variant", QUERY_VARIANTS)
def test_query_engine(benchmark: Any, sizes: Sizes, queried: Queried, variant: str) -> None:
    q = queried
    _tag(benchmark, QUERY, "engine", len(q.raw), keys=sizes.query_keys)
    if variant == "get_many":
        out = benchmark(q.store.get_many, q.raw)
        assert out["found"].all()
    else:
        out = benchmark(q.store.get_ids, q.ids)
    want = _take(q.store, q.ids)
    for c in want:
        assert np.array_equal(out[c], want[c]), c


@pytest.mark.parametrize("variant", QUERY_VARIANTS)
def test_query_limit_numpy_take(benchmark: Any, sizes: Sizes, queried: Queried,
                                variant: str) -> None:
    """Fancy indexing of the store's own arrays (single shard) by the batch's interned ids:
    the same work for both parameters (get_many's raw key → id lookup is the engine's own)."""
    q = queried
    _tag(benchmark, QUERY, "limit-numpy-take", len(q.raw), keys=sizes.query_keys)
    out = benchmark(_take, q.store, q.ids)
    assert len(out["n"]) == len(q.ids) and (out["n"] >= 1).all()


def test_query_single_engine(benchmark: Any, sizes: Sizes, queried: Queried) -> None:
    """``store.get(key)`` once per Python call, over the batch's first keys as Python ints."""
    q = queried
    keys = q.raw[: sizes.single_gets].tolist()
    _tag(benchmark, QUERY_SINGLE, "engine", len(keys), keys=sizes.query_keys)
    get = q.store.get

    def run() -> Any:
        out = None
        for k in keys:
            out = get(k)
        return out

    last = benchmark.pedantic(run, rounds=5 if sizes.single_gets > 1_000 else 1, warmup_rounds=1,
                              iterations=1)
    want = _take(q.store, q.ids[len(keys) - 1 : len(keys)])
    assert last == {c: int(v[0]) for c, v in want.items()}

