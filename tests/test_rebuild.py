"""Blue/green rebuilds: reads always come from a complete version, also under ``kill -9``.

Design note. One seeded log (``prepare``: 2 shards, likes and views of 5,000 photos, ~360k
actions in ~1,200 small frames, 1 MiB segments) with version 1 of the store ``photos`` folded
and checkpointed is the template every test copies. v1 counts likes per photo; v2 counts likes
plus views and sums the likes' ``w``. Their exact answers at the log's end are computed with
numpy (``expected``), so "complete" means equal to a full replay, key by key.

* In process, a reader thread reads ``get_many`` of every photo and ``top_k`` without pause
  while ``app.rebuild(v2)`` runs, and checks every answer is v1-complete or v2-complete (never
  a mix, never partial; never v1 again once it saw v2). No sleeps: the rebuild thread is held
  (by test hooks on ``_checkpoint_store``, on the CURRENT.json write and on the old version's
  removal) until the reader has read during the fold, inside the switch before and after the
  commit point, and the test waits for reads after it. A live variant appends chunks from
  inside the rebuild while the runtime folds v1: every answer must be complete at a frame
  boundary and never older than the previous one.
* ``switch=False``: the diff against numpy, then ``switch()``; errors and cancellation leave
  the serving version serving.
* Under ``kill -9``: a child process (``CHILD_CODE``) opens the template copy with v1, starts
  the rebuild with a reader thread of its own, prints progress, checkpoint and read lines, and
  is SIGKILLed after a seeded progress line or parked at a crash point (inside a v2 checkpoint
  before its manifest is renamed, in the switch before CURRENT.json, after it with the old
  directory renamed but not removed). The parent then reopens: before the commit point, v1's
  files are byte for byte the template's and v1 answers v1-complete; a rebuild in the parent
  resumes from v2's checkpoint (it folds exactly the actions after it) and ends v2-complete;
  after the commit point, v2 answers v2-complete at once and the old files are gone.
  ``ENGINE_REBUILD_CRASH_ROUNDS`` (default 8) and ``ENGINE_REBUILD_CRASH_SEED`` choose the run.
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

ROUNDS = int(os.environ.get("ENGINE_REBUILD_CRASH_ROUNDS", "8"))
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
    ``states``: ``{digest of an answer: (version, step)}`` of every state a read may see
    (get_many), which must never step back."""

    def __init__(self, app: App, exp: dict | None = None, states: dict[bytes, str] | None = None):
        self.app, self.exp, self.states = app, exp, states
        self.counts: Counter = Counter()
        self.step = -1  # the latest state read (with ``states``)
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
            ver, step = self.states.get(digest(got), (None, 0)) if got.pop("found").all() else (None, 0)
            if ver is not None and step < self.step:
                return f"bad: {ver} at step {step} after step {self.step}: went back in time"
            self.step = max(self.step, step)
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

            real_remove = rebuild_mod._remove_version

            def remove_version(root: str, version: int) -> None:  # switched, lock still held
                hold.append(("removal", 1.0, None))
                assert app["photos"].version == 2 and version == 1
                reader.wait_reads("v2", 10)
                real_remove(root, version)

            monkeypatch.setattr(App, "_checkpoint_store", checkpoint_store)
            monkeypatch.setattr(rebuild_mod, "write_json_atomic", write_current)
            monkeypatch.setattr(rebuild_mod, "_remove_version", remove_version)
            rb = app.rebuild(v2(), checkpoint_every_actions=STEP)
            assert rb.total == TOTAL  # known when rebuild() returns
            rb.wait(WAIT_S)
            reader.wait_reads("v2", 20)
        assert reader.counts["v1"] >= 60 and reader.counts["v2"] >= 20, reader.counts
        # progress: strictly growing fractions in (0, 1) with an ETA while folding; 1 at the end
        fr = [f for where, f, _ in hold if where == "ckpt"]
        assert len(fr) == 3 and 0 < fr[0] < fr[1] < fr[2] < 1, hold
        assert all(isinstance(e, float) and e > 0 for where, _, e in hold if where == "ckpt"), hold
        assert [w for w, _, _ in hold][-2:] == ["switch", "removal"]
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
    # a restart recovers v2 from its checkpoint (close() took one)
    log, app = open_app(path, v2())
    try:
        assert app.fold() == 0
        assert app["photos"].get(7)["likes"] == int(exp["v2"]["likes"][7]) + 3
    finally:
        log.close()


def test_reads_stay_complete_with_live_writes_during_the_rebuild(tmp_path, monkeypatch):
    """One shard, the runtime folding v1 while chunks are appended during the rebuild (from its
    checkpoints, between its catch-up and the cut, inside the switch): every read is complete
    at a frame boundary and never older than the one before, and v2 ends equal to a full
    replay, nothing missed or folded twice across the cut."""
    path = str(tmp_path / "live")
    rng = np.random.default_rng(SEED + 1)
    chunks = [chunk(rng) for _ in range(CHUNKS // 3 + 12)]
    base = CHUNKS // 3
    # every complete state, by its step in log order: i chunks (2i), or i likes and i-1 views
    # (2i - 1: a chunk is a frame of likes, then one of views); v1 ignores views (lower step)
    states: dict[bytes, tuple[str, int]] = {}
    for i in range(base, len(chunks) + 1):
        for views in (i - 1, i):
            exp = answers([c[0] for c in chunks[:i]], [c[1] for c in chunks[:views]])
            states.setdefault(digest(exp["v1"]), ("v1", i + views))
            states[digest(exp["v2"])] = ("v2", i + views)
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
            if store.version == 2 and len(pending) > 3:  # appended while v2 folds
                append_one()
                append_one()
            real_ckpt(self, store)

        real_catch_up = rebuild_mod.Rebuild._catch_up

        def catch_up(self: Any, tick: Any) -> None:
            real_catch_up(self, tick)
            append_one()  # between the catch-up and the cut: the cut must fold them into v2
            append_one()

        real_write = rebuild_mod.write_json_atomic

        def write_current(p: str, obj: Any) -> None:
            append_one()  # lands after the cut: the runtime folds it into v2 after the switch
            real_write(p, obj)

        real_remove = rebuild_mod._remove_version

        def remove_version(root: str, version: int) -> None:
            reader.wait_reads("v2", 5)  # the fold lock is still held: v2 exactly at the cut
            real_remove(root, version)

        monkeypatch.setattr(App, "_checkpoint_store", checkpoint_store)
        monkeypatch.setattr(rebuild_mod, "write_json_atomic", write_current)
        monkeypatch.setattr(rebuild_mod, "_remove_version", remove_version)
        monkeypatch.setattr(rebuild_mod.Rebuild, "_catch_up", catch_up)
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
        rb3 = app.rebuild(same, progress=True).wait(WAIT_S)  # with a progress bar
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


# The child runs schema(), v1(), v2() (their source), then this until it is killed.
CHILD = r"""
import os, sys, threading
from engine import app as app_mod, rebuild as rebuild_mod

TYPES, LIMITS = schema()
path, park, expected = sys.argv[1], sys.argv[2], sys.argv[3]
kind, _, arg = park.partition(":")
exp = np.load(expected)
V = {"v1": {"likes": exp["v1_likes"]}, "v2": {"likes": exp["v2_likes"], "w": exp["v2_w"]}}
keys = np.arange(len(exp["v1_likes"]))


def say(line):
    os.write(1, (line + "\n").encode())  # one write per line: lines never interleave


reads = {"v1": 0, "v2": 0}
cv = threading.Condition()


def park_here(what):
    need = "v2" if what in ("retire", "switched") else "v1"
    with cv:  # the reader reads on while this thread is parked (the fold lock held, or not)
        goal = reads[need] + 3
        cv.wait_for(lambda: reads[need] >= goal, 30)
    say(f"parked {what}")
    os.read(0, 1)  # stdin is a pipe nobody writes to: wait here for SIGKILL
    os._exit(3)


n_ckpt = 0
real_ckpt = App._checkpoint_store


def checkpoint_store(self, store):
    global n_ckpt
    n_ckpt += store.version == 2
    real_ckpt(self, store)
    if store.version == 2:
        say(f"ckpt {n_ckpt} {sum(st.offset for st in store.shards)}")


real_manifest = app_mod.write_json_atomic


def write_manifest(p, obj):  # a v2 generation is written and fsync'd; its manifest is not
    if kind == "ckpt" and obj.get("version") == 2 and n_ckpt == int(arg):
        park_here(f"ckpt {n_ckpt}")
    real_manifest(p, obj)


real_apply = rebuild_mod.Rebuild._apply
batches = 0


def apply(self, shard, batch):
    global batches
    n = real_apply(self, shard, batch)
    batches += 1
    if batches % 20 == 0:
        say(f"progress {self.done} {self.total} {self.fraction:.4f}")
    return n


App._checkpoint_store = checkpoint_store
app_mod.write_json_atomic = write_manifest
rebuild_mod.Rebuild._apply = apply
if kind == "current":  # in the switch: v2 checkpointed at the cut, CURRENT.json not written
    rebuild_mod.write_json_atomic = lambda p, obj: park_here("current")
if kind == "retire":  # CURRENT.json names v2, v1's directory renamed but not removed
    rebuild_mod.fsync_dir = lambda d: park_here("retire")

log = en.open(path, TYPES, durability="none", limits=LIMITS)
app = App(log, [v1()], checkpoint_every_actions=None, checkpoint_every_s=None)


def reader():
    seen = set()
    while True:
        s = app["photos"]
        got = s.get_many(keys)
        found = got.pop("found").all()
        ver = f"v{s.version}"
        if not (found and got.keys() == V[ver].keys()
                and all(np.array_equal(got[c], V[ver][c]) for c in got)):
            say(f"bad-read {ver}")
            return
        if ver not in seen:
            seen.add(ver)
            say(f"read {ver}")
        with cv:
            reads[ver] += 1
            cv.notify_all()


threading.Thread(target=reader, daemon=True).start()
with cv:
    cv.wait_for(lambda: reads["v1"] >= 1, 30)  # the reader reads from before the rebuild on
rb = app.rebuild(v2(), checkpoint_every_actions=int(sys.argv[4]))
say(f"started {rb.total}")
rb.wait()
say(f"switched {rb.done}")
park_here("switched")
"""
CHILD_HEAD = """from __future__ import annotations
import numpy as np
import engine as en
from engine import reducers as r
from engine.app import App
from engine.store import Store
"""
CHILD_CODE = "\n\n".join([CHILD_HEAD] + [inspect.getsource(f) for f in (schema, v1, v2)] + [CHILD])


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


def tree_digest(path: str) -> dict[str, str]:
    out = {}
    for root, _dirs, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), path)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def run_child(path: str, park: str, expected: str, where: str, stats: Counter) -> list[str]:
    """Start a rebuilding child in ``path``; SIGKILL it after the ``progress:K``-th progress
    line, or where it parks. Returns its output lines."""
    kind, _, arg = park.partition(":")
    p = subprocess.Popen([sys.executable, "-c", CHILD_CODE, path, park, expected, str(STEP)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=child_env(), cwd=ROOT)
    lines: list[str] = []
    progress = 0
    killed = "early"
    try:
        for raw in p.stdout:  # synchronize on the pipe: kill right after the chosen line
            line = raw.decode().strip()
            lines.append(line)
            if line.startswith("bad-read"):
                break
            if line.startswith("progress"):
                progress += 1
                if kind == "progress" and progress == int(arg):
                    killed = "at-progress"
                    break
            if line.startswith("parked"):
                killed = f"parked-{line.split()[1]}"
                break
        else:
            raise AssertionError(f"{where}: the child exited by itself (code {p.wait()}): "
                                 f"{p.stderr.read().decode()[-3000:]}")
    finally:
        from logutil import reap  # here, not at the top: the child runs this file's imports

        code, rest, err = reap(p)
    lines += [x.strip() for x in rest.splitlines()]
    assert code == -signal.SIGKILL, f"{where}: the child ended with {code}: {err[-3000:]}"
    assert not [x for x in lines if x.startswith("bad-read")], (
        f"{where}: the child read an incomplete version: {lines[-5:]}")
    assert "read v1" in lines, f"{where}: the child never read: {lines[-5:]}"
    stats[f"killed-{killed}"] += 1
    if killed in ("parked-retire", "parked-switched"):
        assert "read v2" in lines, f"{where}: the child never read v2 after its switch"
    return lines


def v2_checkpoint(path: str) -> int:
    """Actions in v2's checkpoint (0 if it has none)."""
    man = os.path.join(path, "stores", "photos", "v2", MANIFEST)
    if not os.path.exists(man):
        return 0
    with open(man) as f:
        return sum(json.load(f)["offsets"])


def check_after_kill(path: str, exp: dict, v1_files: dict, where: str, stats: Counter,
                     rebuild: bool) -> None:
    """The directory a child was killed in: the serving version complete, its files intact;
    with ``rebuild``, a rebuild in this process resumes and switches."""
    cur = current_of(path)
    v1_dir = os.path.join(path, "stores", "photos", "v1")
    if cur is not None:  # killed after the commit point: v2 serves, v1 goes
        assert cur == {"store": "photos", "version": 2, "retired": 1}, f"{where}: {cur}"
        stats["after-commit"] += 1
        log, app = open_app(path, v2())
        try:
            assert stores_listing(path) == ["CURRENT.json", "v2"], f"{where}: old files remain"
            assert version_of(app["photos"].get_many(KEYS), exp) == "v2", where
            assert app.fold() == 0, f"{where}: v2 was not checkpointed at the cut"
        finally:
            app._pool.shutdown()
            log.close()
        return
    assert tree_digest(v1_dir) == v1_files, f"{where}: v1's files changed"
    ckpt = v2_checkpoint(path)
    stats["v2-checkpoint-found" if ckpt else "no-v2-checkpoint"] += 1
    log, app = open_app(path, v1())
    try:
        assert version_of(app["photos"].get_many(KEYS), exp) == "v1", f"{where}: v1 not complete"
        assert app.fold() == 0, where
        if not rebuild:
            return
        rb = app.rebuild(v2(), checkpoint_every_actions=STEP).wait(WAIT_S)
        assert rb.state == "switched", where
        assert rb.done == TOTAL - ckpt, f"{where}: folded {rb.done}, checkpoint had {ckpt} of {TOTAL}"
        stats["resumed" if 0 < ckpt else "replayed"] += 1
        assert version_of(app["photos"].get_many(KEYS), exp) == "v2", f"{where}: v2 not complete"
        assert stores_listing(path) == ["CURRENT.json", "v2"], where
        assert current_of(path) == {"store": "photos", "version": 2, "retired": 1}, where
        app.close()
    finally:
        log.close()
    log, app = open_app(path, v2())  # the switch's checkpoint is v2 at the log's end
    try:
        assert app.fold() == 0 and version_of(app["photos"].get_many(KEYS), exp) == "v2", where
    finally:
        app._pool.shutdown()
        log.close()


def plan(rnd: int, rng: random.Random) -> list[str]:
    """The kills of one round: one at a crash point (each kind in turn), sometimes a second
    (a resumed rebuild killed again) before the parent's check."""
    first = ["ckpt", "progress", "current", "retire"][rnd % 4]
    points = {"ckpt": f"ckpt:{1 if rnd == 0 else rng.randint(1, 6)}", "progress": f"progress:{rng.randint(1, 55)}",
              "current": "current", "retire": "retire"}
    kills = [points[first]]
    if first in ("ckpt", "progress") and (rnd < 4 or rng.random() < 0.5):
        kills.append(points["progress"] if first == "ckpt" else f"ckpt:{rng.randint(1, 3)}")
    return kills


@pytest.mark.timeout(300)
def test_kill9_mid_rebuild_never_harms_the_serving_version(template, tmp_path):
    exp = template[1]
    expected = str(tmp_path / "expected.npz")
    np.savez(expected, v1_likes=exp["v1"]["likes"], v2_likes=exp["v2"]["likes"],
             v2_w=exp["v2"]["w"])
    v1_files = tree_digest(os.path.join(template[0], "stores", "photos", "v1"))
    assert any(f.endswith(".bin") for f in v1_files)
    stats: Counter = Counter()
    for rnd in range(ROUNDS):
        rng = random.Random(f"{SEED}:{rnd}")
        path = copy_of(template, tmp_path, f"round-{rnd}")
        kills = plan(rnd, rng)
        for i, park in enumerate(kills):
            where = f"ENGINE_REBUILD_CRASH_SEED={SEED} round {rnd} kill {i} ({park})"
            run_child(path, park, expected, where, stats)
            check_after_kill(path, exp, v1_files, where, stats, rebuild=i == len(kills) - 1)
        shutil.rmtree(path)
    print(f"\nrebuild crash rounds={ROUNDS} seed={SEED}: {dict(sorted(stats.items()))}")
    if ROUNDS >= 4:  # every crash point was reached, and a rebuild resumed from a checkpoint
        for k in ("killed-parked-ckpt", "killed-parked-current", "killed-parked-retire",
                  "killed-at-progress", "after-commit", "resumed", "no-v2-checkpoint"):
            assert stats[k] >= 1, stats


def test_inspect_shows_the_serving_version_and_derivation_cursors(tmp_path):
    from engine import tools

    types = [en.ActionType("post", {"user": en.key("user"), "photo": en.key("photo")}, partition="user"),
             en.derived("echo", {"user": en.key("user"), "photo": en.key("photo")}, partition="user")]
    log = en.open(str(tmp_path / "d"), types, shards=2, durability="none")
    v1 = en.Store("n", key="user", columns={"n": np.int64}, reducers={"post": en.reducers.count("n")})
    echo = en.Derivation("echo", "post", "echo", lambda rows, views: {"user": rows.column("user"),
                                                                      "photo": rows.column("photo")})
    app = en.App(log, [v1], [echo], checkpoint_every_actions=None, checkpoint_every_s=None)
    app.append("post", {"user": [1, 2, 3], "photo": [4, 5, 6]})
    app.settle()
    app.checkpoint()
    v2 = en.Store("n", key="user", columns={"n": np.int64}, version=2,
                  reducers={"echo": en.reducers.count("n")})
    app.rebuild(v2).wait(30)
    info = tools.inspect(log.path)
    assert set(info["stores"]) == {"n/v2"} and info["stores"]["n/v2"]["serving"] is True
    assert info["derivations"]["echo/v1"]["emits"] == "echo"
    # its cursors are shard offsets: past the 3 posts and the 3 echoes it appended itself
    assert info["derivations"]["echo/v1"]["offsets"] == [log.end_offset(s) for s in range(2)]
    assert sum(info["derivations"]["echo/v1"]["offsets"]) == 6
    app.close()
    log.close()
