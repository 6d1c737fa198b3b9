"""Blue/green rebuilds: reads always come from a complete version, also under ``kill -9``.

Design note. One seeded log (``prepare``: 2 shards, likes and views of 5,000 photos, ~360k
actions in ~1,200 small frames, 1 MiB segments) with version 1 of the store ``photos`` folded
and checkpointed is the template every test copies. v1 counts likes per photo; v2 counts likes
plus views and sums the likes' ``w``. Their exact answers at the log's end are computed with
numpy (``expected``), so "complete" means equal to a full replay, key by key.

* In process, a reader thread reads ``get_many`` of every photo and ``top_k`` without pause
  while ``app.rebuild(v2)`` runs, and checks every answer is v1-complete or v2-complete (never
  a mix, never partial; never v1 again once it saw v2). No sleeps: the rebuild thread is held
  (by test hooks on ``_checkpoint_store`` and on the CURRENT.json write) until the reader has
  read during the fold and during the switch, and the test waits for reads after it. A live
  variant appends chunks from inside the rebuild while the runtime folds v1: answers must be
  complete at a chunk boundary.
* Under ``kill -9``: a child process (``CHILD_CODE``) opens the template copy with v1, starts
  the rebuild with a reader thread of its own, prints progress, checkpoint and read lines, and
  is SIGKILLed after a seeded progress line or parked at a crash point (inside a v2 checkpoint
  before its manifest is renamed, in the switch before CURRENT.json, after it with the old
  directory renamed but not removed). The parent then reopens: before the commit point, v1's
  files are byte for byte the template's and v1 answers v1-complete; a rebuild in the parent
  resumes from v2's checkpoint (it folds exactly the actions after it) and ends v2-complete;
  after the commit point, v2 answers v2-complete at once and the old files are gone.
  ``ENGINE_REBUILD_CRASH_ROUNDS`` (default 4) and ``ENGINE_REBUILD_CRASH_SEED`` choose the run.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from typing import Any

import numpy as np
import pytest

import engine as en
from engine import rebuild as rebuild_mod
from engine import reducers as r
from engine.app import MANIFEST, App
from engine.store import Store, StoreState

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ROUNDS = int(os.environ.get("ENGINE_REBUILD_CRASH_ROUNDS", "4"))
SEED = int(os.environ.get("ENGINE_REBUILD_CRASH_SEED", "515151"))
USERS, PHOTOS = 3_000, 5_000
CHUNKS, LIKES_PER_CHUNK, VIEWS_PER_CHUNK = 300, 800, 400  # one frame per type, shard and chunk
TOTAL = CHUNKS * (LIKES_PER_CHUNK + VIEWS_PER_CHUNK)
STEP = 40_000  # checkpoint_every_actions of the rebuilds: ~9 checkpoints of v2 per full replay
WAIT_S = 60.0  # upper bound of any wait on another thread (a hang fails, it does not stall)


def schema() -> tuple[list[en.ActionType], en.Limits]:
    like = en.ActionType("like", {"user": en.key("user"), "photo": en.key("photo"),
                                  "w": en.int64}, partition="user")
    view = en.ActionType("view", {"user": en.key("user"), "photo": en.key("photo"),
                                  "w": en.int64}, partition="user")
    return [like, view], en.Limits(segment_bytes=1 << 20)


def v1() -> Store:
    """Likes per photo."""
    return Store("photos", key="photo", columns={"likes": np.int64},
                 reducers={"like": [r.count("likes")]})


def v2() -> Store:
    """A new definition: likes and views counted together, and the likes' w summed."""
    return Store("photos", key="photo", columns={"likes": np.int64, "w": np.int64},
                 reducers={"like": [r.count("likes"), r.sum("w", "w")], "view": [r.count("likes")]},
                 version=2)


TYPES, LIMITS = schema()


def chunk(rng: np.random.Generator) -> tuple[dict, dict]:
    """One chunk of likes and views (seeded); photos skewed so the top-k is not all ties."""
    def rows(m: int) -> dict:
        return {"user": rng.integers(0, USERS, m),
                "photo": np.minimum(rng.zipf(1.4, m) - 1, PHOTOS - 1) if rng.random() < 0.3
                else rng.integers(0, PHOTOS, m),
                "w": rng.integers(-100, 100, m)}
    return rows(LIKES_PER_CHUNK), rows(VIEWS_PER_CHUNK)


def answers(likes: list[dict], views: list[dict]) -> dict[str, dict[str, np.ndarray]]:
    """v1's and v2's exact answers for photos 0..PHOTOS-1 after these chunks (numpy)."""
    lp = np.concatenate([c["photo"] for c in likes]) if likes else np.zeros(0, np.int64)
    lw = np.concatenate([c["w"] for c in likes]) if likes else np.zeros(0, np.int64)
    vp = np.concatenate([c["photo"] for c in views]) if views else np.zeros(0, np.int64)
    n_like = np.bincount(lp, minlength=PHOTOS).astype(np.int64)
    w = np.zeros(PHOTOS, np.int64)
    np.add.at(w, lp, lw)
    return {"v1": {"likes": n_like},
            "v2": {"likes": n_like + np.bincount(vp, minlength=PHOTOS), "w": w}}


def prepare(path: str) -> dict[str, dict[str, np.ndarray]]:
    """The template: the log, v1 folded and checkpointed; returns the exact answers."""
    rng = np.random.default_rng(SEED)
    likes, views = [], []
    with en.open(path, TYPES, shards=2, durability="none", limits=LIMITS) as log:
        for _ in range(CHUNKS):
            lk, vw = chunk(rng)
            log.append("like", lk)
            log.append("view", vw)
            likes.append(lk)
            views.append(vw)
        log.flush()
        assert sum(log.end_offset(s) for s in range(2)) == TOTAL
        App(log, [v1()], checkpoint_every_actions=None, checkpoint_every_s=None).close()
    return answers(likes, views)


@pytest.fixture(scope="module")
def template(tmp_path_factory: Any) -> tuple[str, dict]:
    path = str(tmp_path_factory.mktemp("rebuild") / "template")
    exp = prepare(path)
    assert (exp["v1"]["likes"] != exp["v2"]["likes"]).any()  # the definitions disagree
    assert (exp["v1"]["likes"] > 0).all()  # every photo is a known key
    return path, exp


def copy_of(template: tuple[str, dict], tmp_path: Any, name: str = "work") -> str:
    path = str(tmp_path / name)
    shutil.copytree(template[0], path)
    return path


KEYS = np.arange(PHOTOS)


def version_of(got: dict[str, np.ndarray], exp: dict[str, dict[str, np.ndarray]]) -> str | None:
    """Which complete version ``get_many``'s answer is ("v1", "v2"), or None (partial, mixed)."""
    got = dict(got)
    if not got.pop("found").all():
        return None
    for v, want in exp.items():
        if got.keys() == want.keys() and all(np.array_equal(got[c], want[c]) for c in want):
            return v
    return None


def digest(cols: dict[str, np.ndarray]) -> bytes:
    """One complete state's answer, as a dict key: its columns' names and bytes."""
    h = hashlib.sha1()
    for c in sorted(cols):
        h.update(c.encode() + np.ascontiguousarray(cols[c], np.int64).tobytes())
    return h.digest()


def top_ok(top: list[tuple[Any, Any]], want: np.ndarray, k: int) -> bool:
    """``top_k`` agrees with a complete version: the k largest values, each its key's."""
    vals = [v for _, v in top]
    return (vals == sorted(want.tolist(), reverse=True)[:k]
            and all(want[key] == v for key, v in top))


def stores_listing(path: str) -> list[str]:
    return sorted(os.listdir(os.path.join(path, "stores", "photos")))


def current_of(path: str) -> dict | None:
    p = os.path.join(path, "stores", "photos", "CURRENT.json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def open_app(path: str, store: Store) -> tuple[en.Log, App]:
    log = en.open(path, TYPES, durability="none", limits=LIMITS)
    return log, App(log, [store], checkpoint_every_actions=None, checkpoint_every_s=None)


class Reader:
    """A thread reading ``app["photos"]`` without pause; every answer is checked.

    ``exp``: the one complete state of each version (get_many and top_k are checked), or
    ``states``: ``{digest of an answer: version}`` of every state a read may see (get_many)."""

    def __init__(self, app: App, exp: dict | None = None, states: dict[bytes, str] | None = None):
        self.app, self.exp, self.states = app, exp, states
        self.counts: Counter = Counter()
        self.bad: list[str] = []
        self.cv = threading.Condition()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _check(self) -> str:
        s = self.app["photos"]
        got = s.get_many(KEYS)
        if self.exp is not None:
            ver = version_of(got, self.exp)
        else:
            ver = self.states.get(digest(got)) if got.pop("found").all() else None
        if ver is None:
            return f"bad: get_many of v{s.version} is neither version, complete"
        if ver != f"v{s.version}":
            return f"bad: store v{s.version} answered like {ver}"
        if self.exp is not None and not top_ok(s.top_k("likes", 10), self.exp[ver]["likes"], 10):
            return f"bad: top_k of {ver} is not {ver}-complete"
        return ver

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                ver = self._check()
                with self.cv:
                    if ver.startswith("bad"):
                        self.bad.append(ver)
                        return
                    if ver == "v1" and self.counts["v2"]:
                        self.bad.append("v1 answered after v2 did")
                        return
                    self.counts[ver] += 1
                    self.cv.notify_all()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.bad.append(repr(exc))
        finally:
            with self.cv:
                self.counts["stopped"] += 1
                self.cv.notify_all()

    def wait_reads(self, version: str, more: int) -> None:
        """Block until the reader has answered ``more`` further times from ``version``."""
        with self.cv:
            goal = self.counts[version] + more
            ok = self.cv.wait_for(lambda: self.counts[version] >= goal or self.counts["stopped"],
                                  WAIT_S)
            assert ok and not self.bad, f"reader: {self.bad} {dict(self.counts)}"

    def __enter__(self) -> "Reader":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(WAIT_S)
        assert not self.bad, f"a read was not from a complete version: {self.bad}"


def test_reads_during_a_rebuild_come_from_a_complete_version(template, tmp_path, monkeypatch):
    exp = template[1]
    path = copy_of(template, tmp_path)
    log, app = open_app(path, v1())
    hold: list[tuple[str, float, float | None]] = []  # (where, fraction, eta_s) while held
    try:
        sub = app.subscribe("photos", key=7, column="likes")  # made before the rebuild
        top_sub = app.subscribe("photos", top=3, column="likes")
        with Reader(app, exp=exp) as reader:
            reader.wait_reads("v1", 20)
            real_ckpt = App._checkpoint_store

            def checkpoint_store(self: App, store: Store) -> None:
                if store.version == 2 and len(hold) < 3:  # hold the rebuild: the reader reads
                    rb = app.rebuilds["photos"]
                    hold.append(("ckpt", rb.fraction, rb.eta_s))
                    reader.wait_reads("v1", 10)
                real_ckpt(self, store)

            real_write = rebuild_mod.write_json_atomic

            def write_current(p: str, obj: Any) -> None:  # in the switch, under the fold lock
                hold.append(("switch", app.rebuilds["photos"].fraction, None))
                assert app["photos"].version == 1
                reader.wait_reads("v1", 10)
                real_write(p, obj)

            monkeypatch.setattr(App, "_checkpoint_store", checkpoint_store)
            monkeypatch.setattr(rebuild_mod, "write_json_atomic", write_current)
            rb = app.rebuild(v2(), checkpoint_every_actions=STEP)
            assert rb.total == TOTAL  # known when rebuild() returns
            rb.wait(WAIT_S)
            reader.wait_reads("v2", 20)
        assert reader.counts["v1"] >= 60 and reader.counts["v2"] >= 20, reader.counts
        # progress: strictly growing fractions in (0, 1) with an ETA while folding; 1 at the end
        fr = [f for where, f, _ in hold if where == "ckpt"]
        assert len(fr) == 3 and 0 < fr[0] < fr[1] < fr[2] < 1, hold
        assert all(isinstance(e, float) and e > 0 for where, _, e in hold if where == "ckpt"), hold
        assert [w for w, _, _ in hold][-1] == "switch"
        assert rb.state == "switched" and rb.fraction == 1.0 and rb.eta_s == 0.0
        assert rb.done == TOTAL  # a full replay: v2 had no checkpoint
        # after the switch: the new version serves, is named, and the old files are gone
        assert app["photos"].version == 2 and app["photos"] is rb.new
        assert rb.old.status is StoreState.CLOSED
        assert stores_listing(path) == ["CURRENT.json", "v2"]
        assert current_of(path) == {"store": "photos", "version": 2, "retired": 1}
        assert version_of(app["photos"].get_many(KEYS), exp) == "v2"
        assert rb.diff is not None and set(rb.diff.differences) == {"likes"}
        # the subscriptions made before the rebuild follow the new version
        sub.drain()
        changes = top_sub.drain()
        assert changes and changes[-1].new == app["photos"].top_k("likes", 3)
        before = int(exp["v2"]["likes"][7])
        app.append("like", {"user": [1, 2], "photo": [7, 7], "w": [5, 5]})
        app.append("view", {"user": [3], "photo": [7], "w": [0]})
        app.fold()
        got = sub.drain()  # pulled: queued by the fold itself, one change per batch touching 7
        assert got and got[0].old == before, got  # the v2 answer, not v1's
        assert got[-1].new == before + 3, got
        assert all(a.new == b.old for a, b in zip(got, got[1:])), got
        assert app["photos"].get(7) == {"likes": before + 3, "w": int(exp["v2"]["w"][7]) + 10}
        sub.close()
        top_sub.close()
        app.close()
    finally:
        log.close()
    # a restart recovers v2 from the switch's checkpoint (plus the tail)
    log, app = open_app(path, v2())
    try:
        assert app.fold() == 3
        assert app["photos"].get(7)["likes"] == int(exp["v2"]["likes"][7]) + 3
    finally:
        log.close()


def test_reads_stay_complete_with_live_writes_during_the_rebuild(tmp_path, monkeypatch):
    """One shard, the runtime folding v1 while chunks are appended during the rebuild (from its
    checkpoints and from inside the switch): every read is complete at a chunk boundary, and
    v2 ends equal to a full replay, nothing missed or folded twice across the cut."""
    path = str(tmp_path / "live")
    rng = np.random.default_rng(SEED + 1)
    chunks = [chunk(rng) for _ in range(CHUNKS // 3 + 12)]
    base = CHUNKS // 3
    states: dict[bytes, str] = {}  # every complete state: after i chunks, or i likes, i-1 views
    for i in range(base, len(chunks) + 1):
        for views in (i - 1, i):
            exp = answers([c[0] for c in chunks[:i]], [c[1] for c in chunks[:views]])
            states[digest(exp["v1"])] = "v1"
            states[digest(exp["v2"])] = "v2"
    final = answers([c[0] for c in chunks], [c[1] for c in chunks])
    with en.open(path, TYPES, shards=1, durability="none", limits=LIMITS) as log:
        for lk, vw in chunks[:base]:  # one frame per chunk: a read sees it whole or not at all
            log.append("like", lk)
            log.append("view", vw)
        app = App(log, [v1()], checkpoint_every_actions=20_000, checkpoint_every_s=None)
        app.fold()
        pending = list(chunks[base:])
        lock = threading.Lock()

        def append_one() -> None:
            with lock:
                if pending:
                    lk, vw = pending.pop(0)
                    app.append("like", lk)
                    app.append("view", vw)

        real_ckpt = App._checkpoint_store

        def checkpoint_store(self: App, store: Store) -> None:
            if store.version == 2:
                append_one()
                append_one()
            real_ckpt(self, store)

        real_write = rebuild_mod.write_json_atomic

        def write_current(p: str, obj: Any) -> None:
            append_one()  # lands after the cut: the runtime folds it into v2 after the switch
            real_write(p, obj)

        monkeypatch.setattr(App, "_checkpoint_store", checkpoint_store)
        monkeypatch.setattr(rebuild_mod, "write_json_atomic", write_current)
        monkeypatch.setattr(rebuild_mod, "CATCH_UP_LAG", 3_000)  # the cut folds some under the lock
        app.start()
        try:
            with Reader(app, states=states) as reader:
                reader.wait_reads("v1", 10)
                rb = app.rebuild(v2(), checkpoint_every_actions=STEP // 4)
                rb.wait(WAIT_S)
                reader.wait_reads("v2", 10)
                while pending:
                    append_one()
                app.settle(WAIT_S)
                reader.wait_reads("v2", 5)
        finally:
            app.stop()
        assert rb.state == "switched" and not pending
        assert version_of(app["photos"].get_many(KEYS), final) == "v2"
        assert reader.counts["v1"] >= 10 and reader.counts["v2"] >= 15, reader.counts
        app.close()


def test_compare_before_switching_then_switch(template, tmp_path):
    exp = template[1]
    path = copy_of(template, tmp_path)
    log, app = open_app(path, v1())
    try:
        rb = app.rebuild(v2(), switch=False, checkpoint_every_actions=STEP).wait(WAIT_S)
        assert rb.state == "ready" and app["photos"].version == 1
        assert current_of(path) is None and stores_listing(path) == ["v1", "v2"]
        d = rb.diff
        assert d.compared == ["likes"] and d.only_new == ["w"] and d.only_old == []
        assert not d.equal and d.keys == PHOTOS
        # the differing keys with their old and new values, as numpy says
        want = np.nonzero(exp["v1"]["likes"] != exp["v2"]["likes"])[0]
        got = d.differences["likes"]
        keys = np.asarray(got["keys"], np.int64)
        order = np.argsort(keys)
        assert np.array_equal(keys[order], want)
        assert np.array_equal(got["old"][order], exp["v1"]["likes"][want])
        assert np.array_equal(got["new"][order], exp["v2"]["likes"][want])
        assert f"{len(want):,} keys differ" in str(d) and "'w' only in v2" in str(d)
        # the serving version goes on meanwhile; switch() brings v2 to the same cut first
        app.append("like", {"user": [5], "photo": [11], "w": [7]})
        app.fold()
        assert app["photos"].get(11)["likes"] == exp["v1"]["likes"][11] + 1
        with pytest.raises(en.SchemaError, match="already being rebuilt"):
            app.rebuild(v2())
        rb.switch()
        assert rb.state == "switched" and app["photos"].version == 2
        assert app["photos"].get(11) == {"likes": int(exp["v2"]["likes"][11]) + 1,
                                         "w": int(exp["v2"]["w"][11]) + 7}
        assert stores_listing(path) == ["CURRENT.json", "v2"]
        with pytest.raises(en.EngineError, match="needs 'ready'"):
            rb.switch()
        # the same definition under a new version: key by key equal
        same = Store("photos", key="photo", columns={"likes": np.int64, "w": np.int64},
                     reducers={"like": [r.count("likes"), r.sum("w", "w")],
                               "view": [r.count("likes")]}, version=3)
        rb3 = app.rebuild(same).wait(WAIT_S)
        assert rb3.diff.equal and "identical" in str(rb3.diff), str(rb3.diff)
        assert rb3.diff.compared == ["likes", "w"]
        assert app["photos"].version == 3 and stores_listing(path) == ["CURRENT.json", "v3"]
        # a version keyed by another domain shares no key with the old one
        by_user = Store("photos", key="user", columns={"likes": np.int64},
                        reducers={"like": [r.count("likes")]}, version=4)
        rb4 = app.rebuild(by_user, switch=False).wait(WAIT_S)
        assert not rb4.diff.equal and rb4.diff.compared == [] and rb4.diff.differences == {}
        rb4.cancel()
        assert rb4.state == "cancelled" and app["photos"].version == 3
        app.close()
    finally:
        log.close()


def test_rebuild_errors_leave_the_serving_version(template, tmp_path):
    exp = template[1]
    path = copy_of(template, tmp_path)
    log, app = open_app(path, v1())
    try:
        with pytest.raises(en.SchemaError, match="bump the version"):
            app.rebuild(v1())
        other = Store("nope", key="photo", columns={"n": np.int64}, reducers={"like": [r.count("n")]},
                      version=2)
        with pytest.raises(en.SchemaError, match="no store 'nope' is serving"):
            app.rebuild(other)
        with pytest.raises(en.SchemaError, match="has no field"):  # fails in start()
            app.rebuild(Store("photos", key="photo", columns={"x": np.int64},
                              reducers={"like": [r.sum("x", "nofield")]}, version=2))
        assert app.rebuilds["photos"].state == "failed"  # not left "folding": no blocking

        # a reducer of the new version raises mid-way: the rebuild fails, v1 serves on
        def boom(state: dict, ids: np.ndarray, cols: dict) -> None:
            if int(cols["w"].sum()) % 7 == 3:
                raise ValueError("boom")
            state["likes"][ids] += 1

        bad = Store("photos", key="photo", columns={"likes": np.int64},
                    reducers={"like": [r.python(boom, ["likes"], ["w"])]}, version=2)
        rb = app.rebuild(bad, checkpoint_every_actions=STEP)
        with pytest.raises(en.EngineError, match="failed at"):
            rb.wait(WAIT_S)
        assert rb.state == "failed" and isinstance(rb.error.__cause__, ValueError)
        assert app["photos"] is rb.old and app["photos"].version == 1
        assert version_of(app["photos"].get_many(KEYS), exp) == "v1"
        assert current_of(path) is None

        # a key subscription on a column the new version lacks: fails before switching
        sub = app.subscribe("photos", key=3, column="likes")
        renamed = Store("photos", key="photo", columns={"n": np.int64},
                        reducers={"like": [r.count("n")]}, version=5)
        rb = app.rebuild(renamed, checkpoint_every_actions=STEP)
        with pytest.raises(en.SchemaError, match="subscription"):
            rb.wait(WAIT_S)
        assert app["photos"].version == 1 and current_of(path) is None
        assert "v1" in stores_listing(path)
        sub.close()

        # a ready rebuild, cancelled, does not switch; the next one resumes at its checkpoint
        rb = app.rebuild(v2(), switch=False, checkpoint_every_actions=STEP).wait(WAIT_S)
        rb.cancel()
        assert rb.state == "cancelled" and app["photos"].version == 1
        with pytest.raises(en.EngineError, match="needs 'ready'"):
            rb.switch()
        rb = app.rebuild(v2(), checkpoint_every_actions=STEP).wait(WAIT_S)
        assert rb.done == 0 and rb.fraction == 1.0  # nothing left to fold
        assert version_of(app["photos"].get_many(KEYS), exp) == "v2"
        app.close()
    finally:
        log.close()
