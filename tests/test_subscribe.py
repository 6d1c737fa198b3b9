"""Subscriptions: told iff the answer changed, with the right old/new/offset; conflation,
isolation, async iteration and read-your-writes."""

from __future__ import annotations

import asyncio
import tempfile
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engine as en
from engine import reducers as r

KEYS = 24
SMALL = en.Limits(segment_bytes=1 << 20)  # segments are preallocated: keep test logs small


def types() -> list[en.ActionType]:
    return [en.ActionType("like", {"user": en.key("user"), "photo": en.key("photo"), "w": en.int64},
                          partition="user"),
            en.ActionType("view", {"photo": en.key("photo"), "w": en.int64}, partition="photo")]


def likes_store(by: str) -> en.Store:
    """``by="photo"``: co-partitioned (views are partitioned by photo); ``"user"``: a photo's
    answer combines shards (likes are partitioned by user)."""
    t = "view" if by == "photo" else "like"
    return en.Store("s", key="photo", columns={"n": np.int64, "total": np.int64, "top": np.float64},
                    reducers={t: [r.count("n"), r.sum("total", "w"), r.max("top", "w")]})


def reference_changes(log: en.Log, t: str, column: str, watched: set[int]) -> dict[int, list]:
    """Per shard: the changes of watched keys found by diffing the answers after every batch."""
    out: dict[int, list] = {}
    for s in range(log.shards):
        state: dict[int, list] = {}
        found = []
        for b in log.read(s):
            if not b.rows_of(t):
                continue
            before = {k: _answer(state.get(k), column) for k in watched}
            for k, w in zip(b.keys(t, "photo"), b.column(t, "w").tolist()):
                cur = state.setdefault(int(k), [0, 0, None])
                cur[0] += 1
                cur[1] += w
                cur[2] = w if cur[2] is None else max(cur[2], w)
            for k in sorted(watched):
                new = _answer(state.get(k), column)
                if new != before[k]:
                    found.append((k, before[k], new, s, b.end_offset - 1))
        out[s] = found
    return out


def _answer(v: list | None, column: str) -> float:
    if v is None:
        return 0
    return {"n": v[0], "total": v[1], "top": float(v[2])}[column]


batches = st.lists(st.lists(st.tuples(st.integers(0, 5), st.integers(0, KEYS - 1),
                                      st.integers(-3, 3)), min_size=1, max_size=12),
                   min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(batches=batches, shards=st.sampled_from([1, 2]), column=st.sampled_from(["n", "total", "top"]),
       watched=st.sets(st.integers(0, KEYS + 3), min_size=1, max_size=KEYS))
def test_key_notifications_equal_the_diff_after_every_batch(batches, shards, column, watched):
    tmp = tempfile.TemporaryDirectory()  # one per example: removed at once, not at session end
    log = en.open(tmp.name, types(), shards=shards, durability="none", limits=SMALL)
    app = en.App(log, [likes_store("photo")], checkpoint_every_actions=None, checkpoint_every_s=None)
    got: list[en.Changes] = []
    app.subscribe("s", keys=sorted(watched), column=column, callback=got.append, deliver="inline",
                  maxsize=10_000)
    for rows in batches:
        app.append("view", {"photo": [k for _, k, _ in rows], "w": [w for _, _, w in rows]})
        app.fold()
    want = reference_changes(log, "view", column, watched)
    per_shard: dict[int, list] = {s: [] for s in range(shards)}
    for ch in got:
        for c in ch:
            per_shard[c.shard].append((c.key, c.old, c.new, c.shard, c.offset))
    for s in range(shards):  # within a batch the engine reports keys in first-touch order
        assert sorted(per_shard[s], key=lambda x: (x[4], x[0])) == want[s]
    app.close()
    log.close()
    tmp.cleanup()


@settings(max_examples=25, deadline=None)
@given(batches=batches, column=st.sampled_from(["n", "total", "top"]),
       watched=st.sets(st.integers(0, KEYS - 1), min_size=1, max_size=KEYS))
def test_combined_answers_form_an_exact_chain(batches, column, watched):
    """A photo's answer combines two shards (likes partitioned by user): per key the
    notifications chain old -> new without gaps, never repeat an answer, and end at the
    final answer; keys whose answer never changed are never notified."""
    tmp = tempfile.TemporaryDirectory()
    log = en.open(tmp.name, types(), shards=2, durability="none", limits=SMALL)
    app = en.App(log, [likes_store("user")], checkpoint_every_actions=None, checkpoint_every_s=None)
    got: list[en.Changes] = []
    app.subscribe("s", keys=sorted(watched), column=column, callback=got.append, deliver="inline",
                  maxsize=10_000)
    for rows in batches:
        app.append("like", {"user": [u for u, _, _ in rows], "photo": [k for _, k, _ in rows],
                            "w": [w for _, _, w in rows]})
        app.fold()
    final = app["s"].get_many(sorted(watched))
    chains: dict[int, list] = {}
    for ch in got:
        for c in ch:
            chains.setdefault(c.key, []).append((c.old, c.new))
    for i, k in enumerate(sorted(watched)):
        chain = chains.get(k, [])
        end = final[column][i].item()
        if not chain:
            assert end == 0, f"key {k} changed to {end} without a notification"
            continue
        assert chain[0][0] == 0
        for (o1, n1), (o2, _) in zip(chain, chain[1:]):
            assert n1 == o2, f"key {k}: a change was missed between {n1} and {o2}"
        assert all(o != n for o, n in chain), f"key {k}: spurious notification"
        assert chain[-1][1] == end
    app.close()
    log.close()
    tmp.cleanup()


@settings(max_examples=25, deadline=None)
@given(batches=batches, k=st.integers(1, 4))
def test_top_k_notified_iff_the_top_changed(batches, k):
    tmp = tempfile.TemporaryDirectory()
    log = en.open(tmp.name, types(), shards=1, durability="none", limits=SMALL)
    app = en.App(log, [likes_store("photo")], checkpoint_every_actions=None, checkpoint_every_s=None)
    got: list[en.Change] = []
    app.subscribe("s", top=k, column="n", callback=got.append, deliver="inline")
    answers = [app["s"].top_k("n", k)]
    for rows in batches:
        app.append("view", {"photo": [x for _, x, _ in rows], "w": [w for _, _, w in rows]})
        app.fold()
        answers.append(app["s"].top_k("n", k))
    want = [(a, b) for a, b in zip(answers, answers[1:]) if a != b]
    assert [(c.old, c.new) for c in got] == want
    app.close()
    log.close()
    tmp.cleanup()


@pytest.fixture
def app(tmp_path):
    log = en.open(str(tmp_path / "d"), types(), shards=2, durability="none", limits=SMALL)
    a = en.App(log, [likes_store("photo")], checkpoint_every_actions=None, checkpoint_every_s=None)
    yield a
    a.close()
    log.close()


def test_a_slow_subscriber_is_conflated_and_never_stalls_the_fold(app):
    release = threading.Event()
    entered = threading.Event()
    caught_up = threading.Event()
    seen: list[en.Changes] = []
    final: dict[int, int] = {}

    def slow(ch: en.Changes) -> None:
        seen.append(ch)
        entered.set()
        release.wait()
        if final and ch.as_dict().get(3, (None, None))[1] == final[3]:
            caught_up.set()  # the last batch's change of key 3 has arrived

    sub = app.subscribe("s", keys=list(range(KEYS)), column="n", callback=slow, maxsize=2)
    app.append("view", {"photo": [1], "w": [1]})
    app.fold()
    assert entered.wait(10)  # the subscriber is now stuck inside its callback
    for i in range(50):  # the fold goes on regardless: 50 more batches
        app.append("view", {"photo": [1, 2 + i % 3], "w": [1, 1]})
        assert app.fold() > 0
    assert sub.conflated > 0
    app.append("view", {"photo": [3], "w": [1]})  # the last batch: key 3's final answer
    app.fold()
    n = app["s"].get_many(list(range(KEYS)))["n"]
    final.update({k: int(n[k]) for k in range(KEYS)})
    release.set()
    assert caught_up.wait(10)
    latest: dict[int, int] = {}
    for ch in seen:  # in delivery order: the last word on each key is its final answer
        latest.update({k: new for k, (_, new) in ch.as_dict().items()})
    assert all(latest.get(k) == final[k] for k in (1, 2, 3, 4)), (latest, final)
    assert len(seen) < 52  # conflated: fewer deliveries than batches


def test_a_raising_subscriber_is_isolated_and_reported(app):
    good: list[en.Change] = []

    def bad(ch: en.Change) -> None:
        raise RuntimeError("boom")

    bad_sub = app.subscribe("s", key=5, column="n", callback=bad, deliver="inline")
    app.subscribe("s", key=5, column="n", callback=good.append, deliver="inline")
    app.append("view", {"photo": [5], "w": [1]})
    app.fold()
    app.append("view", {"photo": [5], "w": [1]})
    app.fold()
    assert isinstance(bad_sub.error, RuntimeError) and bad_sub.closed
    assert [(c.old, c.new) for c in good] == [(0, 1), (1, 2)]
    assert app["s"].get(5)["n"] == 2


def test_async_iteration_and_read_your_writes(app):
    app.start()

    async def main() -> list[tuple[int, int]]:
        sub = app.subscribe("s", key=7, column="total")
        out = []
        rc = app.dispatch("view", photo=7, w=5)
        app.wait(rc, store="s")
        assert app["s"].get(7)["total"] == 5  # read your own write
        app.dispatch("view", photo=7, w=2)
        async for ch in sub:
            out.append((ch.old, ch.new))
            if ch.new == 7:
                break
        sub.close()
        return out

    assert asyncio.run(asyncio.wait_for(main(), 20)) in ([(0, 5), (5, 7)], [(0, 7)])


def test_query_subscription_pull_and_offsets(app):
    sub = app.subscribe("s", query=lambda s: s.get(3))
    assert sub.next(0) is None  # nothing changed yet
    app.append("view", {"photo": [3, 3], "w": [4, 1]})
    app.fold()
    ch = sub.next(5)
    assert ch.old is None and ch.new == {"n": 2, "total": 5, "top": 4.0}
    app.append("view", {"photo": [4], "w": [4]})  # touches the store, not this answer
    app.fold()
    assert sub.drain() == []


def test_subscribe_errors(app):
    with pytest.raises(en.SubscriptionError, match="exactly one"):
        app.subscribe("s", key=1, top=3, column="n")
    with pytest.raises(en.SubscriptionError, match="no column"):
        app.subscribe("s", key=1, column="nope")
    with pytest.raises(en.SubscriptionError, match="name one"):
        app.subscribe("s", key=1)
    with pytest.raises(KeyError, match="no store"):
        app.subscribe("nope", key=1, column="n")
    sub = app.subscribe("s", key=1, column="n", callback=print)
    with pytest.raises(en.SubscriptionError, match="callback"):
        sub.next(0)


def test_a_blue_green_switch_that_changes_an_answer_is_a_change(app):
    got: list[en.Changes] = []
    app.subscribe("s", keys=[1, 2], column="n", callback=got.append, deliver="inline")
    app.append("view", {"photo": [1, 1, 2], "w": [1, 1, 1]})
    app.fold()
    got.clear()
    v2 = en.Store("s", key="photo", columns={"n": np.int64}, version=2,  # counts w, not actions
                  reducers={"view": r.sum("n", "w")})
    app.append("view", {"photo": [2], "w": [5]})
    app.rebuild(v2).wait(30)
    assert app["s"].version == 2 and app["s"].get(2)["n"] == 6
    switch = [c for ch in got for c in ch if c.offset == -1]
    assert [(c.key, c.old, c.new) for c in switch] == [(2, 2, 6)]  # key 1: 2 under both


@pytest.mark.parametrize("str_keys", [False, True])
def test_owner_shards_agree_with_the_log_routing_and_reads_use_them(tmp_path, str_keys):
    """A co-partitioned multi-shard store reads each key from the shard the log routes it to
    (a regression: first/last in the fused row layout read as 0 when shards were combined)."""
    k = en.key("k", str) if str_keys else en.key("k")
    log = en.open(str(tmp_path / "d"), [en.ActionType("ev", {"k": k, "v": en.int64}, partition="k")],
                  shards=3, durability="none", limits=SMALL)
    st = en.Store("agg", key="k", columns={"n": np.int64, "s": np.int64, "last": np.int64},
                  reducers={"ev": [r.count("n"), r.sum("s", "v"), r.last("last", "v")]})
    app = en.App(log, [st], checkpoint_every_actions=None, checkpoint_every_s=None)
    raw = [f"u{i}" for i in range(300)] if str_keys else list(range(0, 3000, 10))
    app.append("ev", {"k": raw + raw, "v": list(range(600))})
    app.fold()
    ids = st.key_ids(raw)
    assert st._owner_shards(ids).tolist() == [log.shard_of_key(x) for x in raw]
    got = st.get_many(raw)
    assert got["n"].tolist() == [2] * 300
    assert got["last"].tolist() == list(range(300, 600))
    assert got["s"].tolist() == [i + 300 + i for i in range(300)]
    app.close()
    log.close()


def test_subscribing_while_the_runtime_folds_keeps_every_chain_exact(tmp_path):
    """New subscriptions grow the watch arrays while the runtime folds on another thread: for
    every key each notification starts where the previous one ended, and the last one is the
    final answer."""
    log = en.open(str(tmp_path / "d"), types(), shards=2, durability="none", limits=SMALL)
    app = en.App(log, [likes_store("photo")], checkpoint_every_actions=None, checkpoint_every_s=None)
    got: list[en.Changes] = []
    lock = threading.Lock()

    def keep(ch: en.Changes) -> None:
        with lock:
            got.append(ch)

    app.start()
    rng = np.random.default_rng(3)
    subs, first = [], {}
    try:
        for step in range(40):
            keys = rng.integers(0, 4000, 500)
            app.append("view", {"photo": keys, "w": rng.integers(0, 9, 500)})
            if step % 4 == 0:  # new keys, ever larger ids: the arrays grow under the fold
                new = list(range(step * 100, step * 100 + 100))
                before = app["s"].get_many(new)["n"]
                subs.append(app.subscribe("s", keys=new, column="n", callback=keep,
                                          deliver="inline", maxsize=1 << 16))
                first.update({k: int(v) for k, v in zip(new, before)})
        for _ in range(30):  # more changes after the last subscription
            app.append("view", {"photo": rng.integers(0, 4000, 500), "w": rng.integers(0, 9, 500)})
        app.settle()
    finally:
        app.stop()
    final = app["s"].get_many(sorted(first))["n"]
    chains: dict[int, list] = {}
    for ch in got:
        for c in ch:
            chains.setdefault(c.key, []).append((c.old, c.new))
    for i, k in enumerate(sorted(first)):
        chain = chains.get(k, [])
        for (o1, n1), (o2, _) in zip(chain, chain[1:]):
            assert n1 == o2, f"key {k}: a change was missed or repeated between {n1} and {o2}"
        assert all(o < n for o, n in chain), f"key {k}: counts only grow: {chain}"
        if chain:
            assert chain[-1][1] == final[i], (k, chain[-1], final[i])
        else:  # unchanged since subscribed (it may have changed just before: >=)
            assert final[i] >= first[k]
    # the chain checks above carry the test: nearly every subscribed key must have one
    assert sum(1 for k in first if chains.get(k)) >= 0.9 * len(first)
    app.close()
    log.close()


def test_a_throttled_query_answer_is_pulled_when_it_becomes_due(app):
    """``every_s`` delays an evaluation; a blocked ``next()`` wakes for it rather than
    sleeping through its whole timeout (it used to wait for the timeout, or forever)."""
    import time

    sub = app.subscribe("s", query=lambda s: s.get(3), every_s=0.3)
    app.append("view", {"photo": [3], "w": [1]})
    app.fold()
    assert sub.next(5).new["n"] == 1  # the first evaluation is due at once
    app.append("view", {"photo": [3], "w": [1]})
    app.fold()  # due only 0.3 s after the first
    t = time.monotonic()
    ch = sub.next(30)
    assert ch.new["n"] == 2 and time.monotonic() - t < 10
