"""Live answers and the DAG (shared BENCH.md): subscriptions, latency, derive-fanout, shards.

* ``subscriptions``: the replay-fold of ``bench_store`` (count + sum + last per key, N actions
  over 1M int keys, Zipf and uniform) with every one of the 1M keys subscribed (one
  subscription on column ``n``, changes delivered batched as arrays to a callback that keeps
  the latest answer per key) against ``no-subscriptions``: the same fold, nobody subscribed.
  After each round the callback's latest answers are checked against the store.
* ``latency``: one action dispatched, durability "none", the live runtime (``app.start()``)
  folds it and a key subscription's callback fires; the time from before ``dispatch`` to
  inside the callback, per action. ``p50_us`` / ``p99_us`` in extra_info.
* ``derive-fanout``: the demo's fan-out derivation (``engine.demo.fan_out_rows``: post × the
  author's followers → ``feed_add``), run by ``app.fold()`` over a log of posts whose followers
  store is already folded; ``actions`` = derived actions appended per round (checked).
* ``shards``: the replay-fold with 2 shards (2 threads, 2 cores) against ``one-shard``.

    ENGINE_BENCH_SCALE=full pytest benchmarks/bench_live.py --benchmark-only \\
        --benchmark-json=out.json && python -m engine bench report out.json
"""

from __future__ import annotations

import gc
import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from data import STORE_DISTS, STORE_KEYS, fold_columns, fold_reference

import engine as en
from engine import reducers as r
from engine.demo import fan_out_rows
from engine.workload import zipf_keys


@dataclass(frozen=True)
class Sizes:
    fold_actions: int
    fold_rounds: int
    latency_actions: int
    latency_rounds: int
    fan_users: int
    fan_follows: int
    fan_posts: int
    fan_rounds: int
    segment_bytes: int  # preallocated per segment file: small in the smoke run (CI's disk)

    @property
    def limits(self) -> en.Limits:
        return en.Limits(segment_bytes=self.segment_bytes)


SIZES = {
    "smoke": Sizes(20_000, 1, 300, 1, 2_000, 20_000, 2_000, 1, 4 << 20),
    "quick": Sizes(2_000_000, 5, 5_000, 3, 100_000, 2_000_000, 100_000, 3, 256 << 20),
    "full": Sizes(10_000_000, 5, 20_000, 5, 500_000, 10_000_000, 1_000_000, 3, 256 << 20),
}


@pytest.fixture(scope="module")
def sizes(scale: Any) -> Sizes:
    return SIZES[scale.name]


def _tag(benchmark: Any, group: str, system: str, actions: int, **extra: Any) -> None:
    benchmark.group = group
    benchmark.extra_info["system"] = system
    benchmark.extra_info["actions"] = int(actions)
    benchmark.extra_info.update(extra)


EV = en.ActionType("ev", {"k": en.key("k"), "v": en.int64}, partition="k")


def agg_store() -> en.Store:
    return en.Store("agg", key="k", columns={"n": np.int64, "s": np.int64, "last": np.int64},
                    reducers={"ev": [r.count("n"), r.sum("s", "v"), r.last("last", "v")]})


class FoldLogs:
    """One log per (distribution, shards), appended once per module."""

    def __init__(self, root: Any, n: int, limits: en.Limits):
        self.root, self.n, self.limits = root, n, limits
        self.made: dict[tuple[str, int], tuple[en.Log, dict[str, np.ndarray]]] = {}

    def __call__(self, dist: str, shards: int) -> tuple[en.Log, dict[str, np.ndarray]]:
        if (dist, shards) not in self.made:
            cols = fold_columns(self.n, dist)
            log = en.open(str(self.root / f"{dist}-{shards}"), [EV], shards=shards,
                          durability="none", limits=self.limits)
            for lo in range(0, self.n, 65_536):
                log.append("ev", {f: v[lo:lo + 65_536] for f, v in cols.items()})
            log.flush()
            self.made[(dist, shards)] = (log, fold_reference(cols["k"], cols["v"]))
        return self.made[(dist, shards)]

    def close(self) -> None:
        for log, _ in self.made.values():
            log.close()


@pytest.fixture(scope="module")
def fold_logs(tmp_path_factory: Any, sizes: Sizes) -> Any:
    logs = FoldLogs(tmp_path_factory.mktemp("live"), sizes.fold_actions, sizes.limits)
    yield logs
    logs.close()


def _fresh_app(log: en.Log, keep: list) -> en.App:
    keep.clear()  # drop the previous round's app and store first
    # ... and free them now: an App holds reference cycles, and a collection run inside the
    # timed fold would munmap the previous round's state there (seen as 40 -> 90 ms, all of it
    # system time, with the same user time)
    gc.collect()
    shutil.rmtree(os.path.join(log.path, "stores"), ignore_errors=True)
    app = en.App(log, [agg_store()], checkpoint_every_actions=None, checkpoint_every_s=None)
    keep.append(app)
    return app


def _check(app: en.App, want: dict[str, np.ndarray]) -> None:
    got = app["agg"].get_many(want["key"])
    assert got["found"].all()
    for c in ("n", "s", "last"):
        assert np.array_equal(got[c], want[c]), c


# =============================================================================================
# subscriptions: fold with 1M keys subscribed, against the same fold with nobody subscribed
# =============================================================================================
class Counting:
    """A subscriber: counts the changes and keeps the last batch of them."""

    def __init__(self) -> None:
        self.calls = 0
        self.changes = 0
        self.last: en.Changes | None = None

    def __call__(self, ch: en.Changes) -> None:
        self.calls += 1
        self.changes += len(ch)
        self.last = ch


def _expected_changes(log: en.Log) -> int:
    """Column n (a count) changes for every distinct key of every batch the fold applies."""
    return sum(len(np.unique(np.asarray(b.column("ev", "k")))) for b in log.read(0))


@pytest.mark.parametrize("dist", STORE_DISTS)
@pytest.mark.parametrize("system", ["engine", "no-subscriptions"])
def test_subscriptions(benchmark: Any, fold_logs: Any, sizes: Sizes, dist: str, system: str) -> None:
    log, want = fold_logs(dist, 1)
    _tag(benchmark, "subscriptions", system, sizes.fold_actions, subscribed_keys=STORE_KEYS)
    apps: list[en.App] = []
    subs: list[Counting] = []

    def setup() -> tuple[tuple, dict]:
        app = _fresh_app(log, apps)
        subs.clear()
        if system == "engine":
            sub = Counting()
            app.subscribe("agg", keys=np.arange(STORE_KEYS), column="n", callback=sub,
                          deliver="inline", maxsize=1 << 20)
            subs.append(sub)
        return (app,), {}

    folded = benchmark.pedantic(lambda app: app.fold(), setup=setup, rounds=sizes.fold_rounds,
                                warmup_rounds=1, iterations=1)
    assert folded == sizes.fold_actions
    _check(apps[0], want)
    if system == "engine":
        sub = subs[0]
        assert sub.changes == _expected_changes(log)  # every change of every batch arrived
        last = sub.last
        assert np.array_equal(last.new, apps[0]["agg"].get_ids(last.ids)["n"])
        benchmark.extra_info["deliveries"] = sub.calls
        benchmark.extra_info["changes"] = sub.changes


# =============================================================================================
# latency: dispatch -> subscriber callback through the live runtime
# =============================================================================================
@pytest.mark.parametrize("mode", ["runtime", "sync"])
def test_latency(benchmark: Any, tmp_path: Any, sizes: Sizes, mode: str) -> None:
    """``runtime``: the background runtime folds and calls back (two thread hand-offs);
    ``sync``: ``app.dispatch_sync`` folds in the caller's thread."""
    log = en.open(str(tmp_path / "lat"), [EV], shards=1, durability="none", limits=sizes.limits)
    app = en.App(log, [agg_store()], checkpoint_every_actions=None, checkpoint_every_s=None)
    fired = threading.Event()
    stamp = [0]

    def on_change(ch: en.Change) -> None:
        stamp[0] = time.perf_counter_ns()
        fired.set()

    app.subscribe("agg", key=1, column="n", callback=on_change, deliver="inline")
    sync = mode == "sync"
    if not sync:
        app.start()
    lat: list[np.ndarray] = []

    def run() -> int:
        out = np.empty(sizes.latency_actions, np.int64)
        for i in range(sizes.latency_actions):
            fired.clear()
            t0 = time.perf_counter_ns()
            (app.dispatch_sync if sync else app.dispatch)("ev", k=1, v=i)
            if not fired.wait(10):
                raise AssertionError(f"no callback for action {i} within 10 s")
            out[i] = stamp[0] - t0
        lat.append(out)
        return sizes.latency_actions

    _tag(benchmark, "latency", "engine", sizes.latency_actions, mode=mode)
    benchmark.pedantic(run, rounds=sizes.latency_rounds, warmup_rounds=1 if sizes.latency_rounds > 1 else 0,
                       iterations=1)
    us = np.concatenate(lat[-sizes.latency_rounds:]) / 1000
    benchmark.extra_info["p50_us"] = round(float(np.percentile(us, 50)), 1)
    benchmark.extra_info["p99_us"] = round(float(np.percentile(us, 99)), 1)
    app.stop()
    assert app["agg"].get(1)["n"] == len(lat) * sizes.latency_actions
    app.close()
    log.close()


# =============================================================================================
# derive-fanout: posts x followers -> feed items, derived actions appended per second
# =============================================================================================
FOLLOW = en.ActionType("follow", {"user": en.key("user"), "target": en.key("user")}, partition="user")
POST = en.ActionType("post", {"user": en.key("user"), "photo": en.key("photo")}, partition="user")
FEED_ADD = en.derived("feed_add", {"user": en.key("user"), "photo": en.key("photo")}, partition="user")
FAN_CAP = 1 << 30  # no cap: every follower gets the post


def followers_store() -> en.Store:
    return en.Store("followers", key="user", columns={"followers": r.multimap()},
                    reducers={"follow": r.add("followers", "user", distinct=False)},
                    key_fields={"follow": "target"})


def _fan(rows: en.DerivationInput, views: Any) -> dict[str, np.ndarray]:
    off, fol = views["followers"].lists("followers", rows.column("user"))
    return fan_out_rows(off, fol, rows.column("photo"), FAN_CAP)


@pytest.mark.parametrize("shards", [1, 2])
def test_derive_fanout(benchmark: Any, tmp_path: Any, sizes: Sizes, shards: int) -> None:
    users = sizes.fan_users
    follower = np.random.default_rng(1).integers(0, users, sizes.fan_follows)
    target = zipf_keys(sizes.fan_follows, users, 2, s=0.7)
    author = np.random.default_rng(3).integers(0, users, sizes.fan_posts)
    fans = np.bincount(target, minlength=users)
    expected = int(fans[author].sum())
    _tag(benchmark, "derive-fanout", "engine", expected, posts=sizes.fan_posts, shards=shards)
    apps: list[Any] = []
    rnd = [0]

    def setup() -> tuple[tuple, dict]:
        for app, log in apps:
            app.close()
            log.close()
            shutil.rmtree(log.path, ignore_errors=True)
        apps.clear()
        rnd[0] += 1
        log = en.open(str(tmp_path / f"fan{rnd[0]}"), [FOLLOW, POST, FEED_ADD], shards=shards,
                      durability="none", limits=sizes.limits)
        log.append("follow", {"user": follower, "target": target})
        log.append("post", {"user": author, "photo": np.arange(len(author))})
        en.App(log, [followers_store()], checkpoint_every_actions=None,
               checkpoint_every_s=None).close()  # followers folded and checkpointed
        app = en.App(log, [followers_store()], [en.Derivation("fan", "post", "feed_add", _fan,
                                                              reads=["followers"])],
                     checkpoint_every_actions=None, checkpoint_every_s=None)
        apps.append((app, log))
        return (app,), {}

    benchmark.pedantic(lambda app: app.fold(), setup=setup, rounds=sizes.fan_rounds,
                       warmup_rounds=0, iterations=1)
    app, log = apps[0]
    assert app.derivations["fan"].emitted == expected
    total = sum(b.rows_of("feed_add") for s in range(shards) for b in log.read(s))
    assert total == expected
    app.close()
    log.close()
    apps.clear()


# =============================================================================================
# shards: replay-fold with 2 shards on 2 cores, against one shard
# =============================================================================================
@pytest.mark.parametrize("dist", STORE_DISTS)
@pytest.mark.parametrize("system", ["engine", "one-shard"])
def test_shards(benchmark: Any, fold_logs: Any, sizes: Sizes, dist: str, system: str) -> None:
    shards = 2 if system == "engine" else 1
    log, want = fold_logs(dist, shards)
    _tag(benchmark, "shards", system, sizes.fold_actions, shards=shards, cores=os.cpu_count())
    apps: list[en.App] = []
    folded = benchmark.pedantic(lambda app: app.fold(), setup=lambda: ((_fresh_app(log, apps),), {}),
                                rounds=sizes.fold_rounds, warmup_rounds=1, iterations=1)
    assert folded == sizes.fold_actions
    _check(apps[0], want)
