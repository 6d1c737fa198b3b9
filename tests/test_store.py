"""Stores: incremental == full == reference twin == dict model; checkpoints; as_of; failures."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings

import engine as en
from engine import _kernels_py, _multimap_py
from engine import reducers as r
from engine import state as state_mod
from engine import store as store_mod
from engine.app import App
from engine.store import Store, StoreFailedError, StoreState

LIKE = en.ActionType("like", {"user": en.key("user"), "photo": en.key("photo"), "ts": en.int64},
                     partition="user")
FOLLOW = en.ActionType("follow", {"user": en.key("user"), "target": en.key("user")}, partition="user")
TYPES = [LIKE, FOLLOW]
SMALL = en.Limits(segment_bytes=256 << 10)


def stores() -> list[Store]:
    return [
        Store("photo", key="photo", columns={"likes": np.int64, "ts_sum": np.int64, "ts_min": np.int64,
                                             "ts_max": np.int64, "ts_mean": np.float64},
              reducers={"like": [r.count("likes"), r.sum("ts_sum", "ts"), r.min("ts_min", "ts"),
                                 r.max("ts_max", "ts"), r.mean("ts_mean", "ts")]}),
        Store("user", key="user", columns={"n": np.int64, "total": np.int64, "last": np.int64,
                                           "first": np.int64, "recent": r.ring(3), "best": r.topk(2)},
              reducers={"like": [r.count("n"), r.sum("total", "ts"), r.last("last", "ts"),
                                 r.first("first", "ts"), r.push("recent", "photo"),
                                 r.top("best", "ts")]},
              key_fields={"like": "user"}),
        Store("followers", key="user", columns={"who": r.multimap(), "count": np.int64},
              reducers={"follow": [r.add("who", "user"), r.count("count")]},
              key_fields={"follow": "target"}),
    ]


def snapshot(app: App) -> dict:
    """Every store's answer for every key, through the public query API."""
    out = {}
    for name, s in app.stores.items():
        d = app.log.dicts[s.domain]
        out[name] = {}
        for k in d.interner.keys().tolist():
            v = s.get(k)
            out[name][k] = {c: (_raw(app, c, x) if isinstance(x, np.ndarray) else x) for c, x in v.items()}
    return out


def _raw(app: App, column: str, ids: np.ndarray) -> list:
    """Ring and multimap values hold key ids: map them back to raw keys."""
    if column == "best":
        return ids.tolist()  # values, not key ids
    domain = {"recent": "photo", "who": "user"}[column]
    return [int(k) for k in app.log.dicts[domain].key_of(ids)]


def model(actions: list[tuple]) -> dict:
    """A plain-Python fold of the same actions (one shard: log order)."""
    photo: dict = {}
    user: dict = {}
    fol: dict = {}
    for a in actions:
        if a[0] == "like":
            _, u, p, ts = a
            ph = photo.setdefault(p, {"likes": 0, "ts_sum": 0, "ts_min": ts, "ts_max": ts, "s": 0})
            ph["likes"] += 1
            ph["ts_sum"] += ts
            ph["ts_min"] = min(ph["ts_min"], ts)
            ph["ts_max"] = max(ph["ts_max"], ts)
            us = user.setdefault(u, {"n": 0, "total": 0, "last": ts, "first": ts, "recent": [],
                                     "best": []})
            us["best"] = sorted(us["best"] + [ts], reverse=True)[:2]
            us["n"] += 1
            us["total"] += ts
            us["last"] = ts
            us["recent"] = ([p] + us["recent"])[:3]
        else:
            _, u, t = a
            f = fol.setdefault(t, {"who": [], "count": 0})
            if u not in f["who"]:
                f["who"].append(u)
            f["count"] += 1
    return {"photo": photo, "user": user, "followers": fol}


actions_st = st.lists(st.one_of(
    st.tuples(st.just("like"), st.integers(0, 12), st.integers(0, 8), st.integers(-1000, 1000)),
    st.tuples(st.just("follow"), st.integers(0, 12), st.integers(0, 12))), min_size=1, max_size=120)


def chunks(actions: list[tuple], cuts: list[int]) -> list[list[tuple]]:
    bounds = sorted({0, len(actions), *[c % (len(actions) + 1) for c in cuts]})
    return [actions[lo:hi] for lo, hi in zip(bounds, bounds[1:])]


def append_chunk(log: en.Log, chunk: list[tuple]) -> None:
    for a in chunk:
        if a[0] == "like":
            log.dispatch("like", user=a[1], photo=a[2], ts=a[3])
        else:
            log.dispatch("follow", user=a[1], target=a[2])
    log.flush()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=actions_st, cuts=st.lists(st.integers(0, 200), max_size=5),
       restarts=st.lists(st.booleans(), min_size=6, max_size=6))
def test_incremental_equals_full_twin_and_model(actions, cuts, restarts):
    base = tempfile.mkdtemp()
    try:
        # incremental: fold after every chunk, checkpoint / restart at random points
        log = en.open(os.path.join(base, "inc"), TYPES, durability="none", limits=SMALL)
        app = App(log, stores(), checkpoint_every_actions=None, checkpoint_every_s=None)
        for i, chunk in enumerate(chunks(actions, cuts)):
            append_chunk(log, chunk)
            app.fold()
            if restarts[i % len(restarts)]:
                app.close()  # checkpoint
                log.close()
                log = en.open(os.path.join(base, "inc"), limits=SMALL)
                app = App(log, stores(), checkpoint_every_actions=None, checkpoint_every_s=None)
        app.fold()
        inc = snapshot(app)
        app.close()
        log.close()
        # full: one append, one fold
        log = en.open(os.path.join(base, "full"), TYPES, durability="none", limits=SMALL)
        append_chunk(log, actions)
        app = App(log, stores(), checkpoint_every_actions=None, checkpoint_every_s=None)
        app.fold()
        full = snapshot(app)
        app.close()
        # the same with the pure-Python reference kernels
        saved = store_mod._k, state_mod._mm
        store_mod._k, state_mod._mm = _kernels_py, _multimap_py
        try:
            app = App(en.open(os.path.join(base, "full"), readonly=True), stores(),
                      checkpoint_every_actions=None, checkpoint_every_s=None)
            for s in app.stores.values():  # from scratch, not from the checkpoint
                for sh in s.shards:
                    sh.offset = 0
                s.shards = [state_mod.ShardState(s.columns) for _ in s.shards]
            app.fold()
            twin = snapshot(app)
            app.log.close()
        finally:
            store_mod._k, state_mod._mm = saved
        log.close()
        assert inc == full == twin
        m = model(actions)
        for p, v in m["photo"].items():
            got = full["photo"][p]
            assert (got["likes"], got["ts_sum"], got["ts_min"], got["ts_max"]) == (
                v["likes"], v["ts_sum"], v["ts_min"], v["ts_max"])
            assert got["ts_mean"] == pytest.approx(v["ts_sum"] / v["likes"])
        for u, v in m["user"].items():
            got = full["user"][u]
            assert (got["n"], got["total"], got["last"], got["first"], got["recent"], got["best"]) == (
                v["n"], v["total"], v["last"], v["first"], v["recent"], v["best"])
        for t, v in m["followers"].items():
            assert full["followers"][t]["count"] == v["count"]
            assert full["followers"][t]["who"] == v["who"]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_as_of_equals_fold_of_prefix(tmp_path):
    log = en.open(tmp_path, TYPES, durability="none", limits=SMALL)
    rng = np.random.default_rng(1)
    n = 5000
    log.append("like", {"user": rng.integers(0, 50, n), "photo": rng.integers(0, 30, n),
                        "ts": np.arange(n)})
    app = App(log, stores()[:1], checkpoint_every_actions=None, checkpoint_every_s=None)
    app.fold()
    app.checkpoint()
    for cut in (0, 1, 777, 4999, 5000):
        old = app.as_of("photo", cut)
        ids = np.arange(len(log.dicts["photo"]))
        got = old.get_ids(ids)["likes"]
        photos = next(iter(log.read(0, 0, cut)), None)
        want = np.zeros(len(ids), np.int64)
        if photos is not None:
            np.add.at(want, photos.column("like", "photo"), 1)
        assert np.array_equal(got, want)
    app.close()
    log.close()


def test_query_api_get_many_topk_arrow(tmp_path):
    with en.open(tmp_path, TYPES, shards=2, durability="none", limits=SMALL) as log:
        photos = np.array([5, 5, 5, 7, 7, 9])
        log.append("like", {"user": np.arange(6), "photo": photos, "ts": np.arange(6)})
        app = App(log, stores()[:1], checkpoint_every_actions=None, checkpoint_every_s=None)
        app.fold()
        s = app["photo"]
        assert s.get(5)["likes"] == 3 and s.get(123) is None
        many = s.get_many([9, 5, 42])
        assert many["likes"].tolist() == [1, 3, 0] and many["found"].tolist() == [True, True, False]
        assert s.top_k("likes", 2) == [(5, 3), (7, 2)]
        t = s.to_arrow()
        assert dict(zip(t.column("key").to_pylist(), t.column("likes").to_pylist())) == {5: 3, 7: 2, 9: 1}
        app.close()


def test_reducer_failure_isolated_and_resumes_after_fix(tmp_path):
    boom = {"on": False}

    def risky(state, ids, cols):
        if boom["on"] and (cols["ts"] > 100).any():
            raise RuntimeError("bad ts")
        np.add.at(state["seen"], ids, 1)

    def make():
        return [Store("risky", key="photo", columns={"seen": np.int64, "likes": np.int64},
                      reducers={"like": [r.python(risky, ["seen"], ["ts"]), r.count("likes")]}),
                stores()[0]]

    log = en.open(tmp_path, TYPES, durability="none", limits=SMALL)
    app = App(log, make(), checkpoint_every_actions=None, checkpoint_every_s=None)
    log.append("like", {"user": [1, 2], "photo": [1, 1], "ts": [1, 2]})
    app.fold()
    app.checkpoint()
    boom["on"] = True
    log.append("like", {"user": [3, 4], "photo": [1, 2], "ts": [500, 3]})
    app.fold()
    risky_store = app["risky"]
    assert risky_store.status is StoreState.FAILED and risky_store.failed_at == (0, 2)
    assert risky_store.shards[0].arrays["seen"][:2].tolist() == [2, 0]  # not half-applied
    assert risky_store.shards[0].arrays["likes"][:2].tolist() == [2, 0]
    assert app["photo"].get(1)["likes"] == 3  # the other store went on
    with pytest.raises(StoreFailedError, match="bad ts"):
        risky_store.get(1)
    from engine.tools import inspect

    assert inspect(str(tmp_path))["stores"]["risky/v1"]["state"] == "FAILED"
    app.close()
    log.close()
    boom["on"] = False  # "the code is fixed": restart resumes from the checkpoint
    log = en.open(tmp_path)
    app = App(log, make(), checkpoint_every_actions=None, checkpoint_every_s=None)
    app.fold()
    assert app["risky"].get(1) == {"seen": 3, "likes": 3}
    app.close()
    log.close()


def test_replay_cli_and_api_rebuild_the_demo_stores(tmp_path):
    import subprocess
    import sys

    from engine import demo
    from engine.workload import photo_app

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with en.open(tmp_path, demo.TYPES, shards=2, durability="none", limits=SMALL) as log:
        for name, cols in photo_app(20_000, 500, seed=3):
            log.append(name, cols)
        app = App(log, demo.stores(), checkpoint_every_actions=None, checkpoint_every_s=None)
        app.fold()
        want = {n: s.to_arrow().to_pydict() for n, s in app.stores.items()
                if n not in ("followers", "caption_index")}
        want_fol = sorted(app["followers"].get(k)["followers"].tolist()
                          for k in log.dicts["user"].interner.keys()[:50].tolist())
        app.close()
    out = subprocess.run([sys.executable, "-m", "engine", "replay", str(tmp_path), "--stores",
                          "engine.demo:stores", "--quiet"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": root}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "photo_likes: running" in out.stdout and "replayed" in out.stdout
    app = en.replay(str(tmp_path), demo.stores(), progress=False)
    try:
        got = {n: s.to_arrow().to_pydict() for n, s in app.stores.items() if n in want}
        assert got == want
        got_fol = sorted(app["followers"].get(k)["followers"].tolist()
                         for k in app.log.dicts["user"].interner.keys()[:50].tolist())
        assert got_fol == want_fol
    finally:
        app.close()
        app.log.close()


@pytest.mark.parametrize("extra", [False, True], ids=["trio", "trio+other-sums"])
def test_count_sum_last_stored_together_equals_separate(tmp_path, extra):
    """With ``extra``, more sums of the same type (over another field) around the trio stay
    separate columns and are folded too."""
    def make(fused):
        cols = {"n": np.int64, "s": np.int64, "last": np.int64}
        red = [r.count("n"), r.sum("s", "ts"), r.last("last", "ts")]
        if extra:
            cols |= {"p": np.int64, "p2": np.int64}
            red = [r.sum("p", "photo"), red[0], r.sum("p2", "photo"), *red[1:]]
        return Store("agg" if fused else "sep", key="user", columns=cols, reducers={"like": red},
                     key_fields={"like": "user"}, layout="auto" if fused else "columns")

    rng = np.random.default_rng(5)
    with en.open(tmp_path, TYPES, durability="none", limits=SMALL) as log:
        for _ in range(3):
            n = 3000
            log.append("like", {"user": rng.integers(0, 400, n), "photo": rng.integers(0, 9, n),
                                "ts": rng.integers(-10**12, 10**12, n)})
        app = App(log, [make(True), make(False)], checkpoint_every_actions=None, checkpoint_every_s=None)
        assert app["agg"]._rows == {"like": "rows:n,s,last"} and not app["sep"]._rows
        app.fold()
        app.checkpoint()
        a, b = app["agg"].to_arrow(), app["sep"].to_arrow()
        names = ["key", "n", "s", "last"] + (["p", "p2"] if extra else [])
        assert a.select(names).equals(b.select(names))
        if extra:
            assert a["p"].to_pylist() == a["p2"].to_pylist() and any(a["p"].to_pylist())
        app.close()
        app = App(log, [make(True)], checkpoint_every_actions=None, checkpoint_every_s=None)
        assert app["agg"].to_arrow().equals(a)  # the row group survives the checkpoint
        app.close()


EV3 = en.ActionType("ev3", {"k": en.key("k"), "a": en.int64, "b": en.int64}, partition="k")
SCALAR_OPS = ["count", "sum", "min", "max", "first", "last", "mean"]


def _reducer(op: str, column: str, field: str) -> r.Reducer:
    return r.count(column) if op == "count" else getattr(r, op)(column, field)


def _model_value(op: str, vals: list[int]) -> Any:
    return {"count": len(vals), "sum": sum(vals), "min": min(vals), "max": max(vals),
            "first": vals[0], "last": vals[-1], "mean": sum(vals) / len(vals)}[op]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.lists(st.tuples(st.sampled_from(SCALAR_OPS), st.sampled_from(["a", "b"])),
                     min_size=1, max_size=7),
       rows=st.lists(st.tuples(st.integers(0, 6), st.integers(-50, 50), st.integers(-50, 50)),
                     min_size=1, max_size=60),
       cuts=st.lists(st.integers(0, 60), max_size=4), layout=st.sampled_from(["auto", "columns"]))
@example(spec=[("sum", "b"), ("count", "a"), ("sum", "a"), ("last", "a")],  # the fold-plan bug:
         rows=[(1, 2, 3), (1, 5, 7)], cuts=[], layout="auto")  # "b" summed into the row group
def test_any_mix_of_scalar_reducers_equals_a_plain_fold(spec, rows, cuts, layout):
    """Several reducers of one action type, repeated ops and fields included (a fused
    count/sum/last row group forms whenever the last count, sum and last agree on a field):
    every column equals a plain-Python fold, whatever the batch cuts."""
    cols = {f"c{i}": (np.float64 if op == "mean" else np.int64) for i, (op, _) in enumerate(spec)}
    reds = [_reducer(op, f"c{i}", f) for i, (op, f) in enumerate(spec)]
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        with en.open(tmp, [EV3], durability="none", limits=SMALL) as log:
            app = App(log, [Store("s", key="k", columns=cols, reducers={"ev3": reds}, layout=layout)],
                      checkpoint_every_actions=None, checkpoint_every_s=None)
            bounds = sorted({0, len(rows), *[c % (len(rows) + 1) for c in cuts]})
            for lo, hi in zip(bounds, bounds[1:]):
                part = rows[lo:hi]
                log.append("ev3", {"k": [x[0] for x in part], "a": [x[1] for x in part],
                                   "b": [x[2] for x in part]})
                app.fold()
            for k in sorted({x[0] for x in rows}):
                mine = [x for x in rows if x[0] == k]
                want = {f"c{i}": _model_value(op, [x[1] if f == "a" else x[2] for x in mine])
                        for i, (op, f) in enumerate(spec)}
                got = app["s"].get(k)
                assert got == pytest.approx(want), (k, spec, app["s"]._rows)
            app.close()
