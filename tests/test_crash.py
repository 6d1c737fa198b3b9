"""Invariant 1: an acknowledged action survives ``kill -9`` of the writer.

Design note. A child process (``CHILD_CODE``, a fresh interpreter per round) opens a 2-shard log
("sync", some rounds "group", 64 KiB segments so that rolls are frequent) and loops: it prints
``try TYPE FIRST_ID COUNT``, makes one call (a single ``dispatch`` or a small columnar
``append`` of one type), then prints one ``ack SHARD OFFSET ID`` line per action, in one write.
Every action carries a unique int id (``ts`` of a like, the head of a post's caption) from which
all its fields follow (``content``), so a read maps back to the call that wrote it. The parent
reads the pipe and, after a seeded number of acknowledgements (sometimes while the child is still
opening and recovering the directory, sometimes at 0), sends SIGKILL, drains the pipe (those
acks count too) and checks the reopened directory (first read-only in some rounds, which must
change no byte, then writable):

* offsets are dense from 0, every action decodes to exactly its content, no id appears twice;
* every acknowledged action is at its acknowledged (shard, offset);
* what an earlier round saw stays where it was; new actions in each shard are a prefix of what
  the child tried in that shard (nothing skipped), and a batch is in a shard whole or not at all;
* a further dispatch and append after recovery land at the next offsets and survive a reopen.

Directories are reused for up to 4 rounds, so recovered logs are crashed and recovered again.
Rounds run in two independent chains in parallel (one child each, synchronized only on their
pipes). A third of the kills aim at segment rolls: the child flags a call that will roll, and the
parent kills as soon as it reads the flag. ``ENGINE_CRASH_ROUNDS`` (default 50) and
``ENGINE_CRASH_SEED`` choose the run; a failure prints the seed, chain and round. Kill timing is
real, so a round replays only approximately.

Crash points make it exact: the child parks in the first call of a chosen function (a new
segment's ``posix_fallocate``, its ``mmap``, the index rename, a key record's ``pwrite``) and the
parent kills it there, then recovers, twice in the same directory.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import random
import signal
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from logutil import reap

import engine as en

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the project root, also in CI's fresh clone

ROUNDS = int(os.environ.get("ENGINE_CRASH_ROUNDS", "50"))
SEED = int(os.environ.get("ENGINE_CRASH_SEED", "424242"))
CHAINS = 2

def schema() -> tuple[list[en.ActionType], en.Limits]:
    """The writer's action types and limits (posts of up to 6 KB: a roll every ~25 actions)."""
    like = en.ActionType("like", {"user": en.key("user"), "photo": en.key("photo"),
                                  "ts": en.timestamp}, partition="user")
    post = en.ActionType("post", {"user": en.key("user"), "caption": en.string}, partition="user")
    return [like, post], en.Limits(segment_bytes=64 << 10)


def content(i: int, type_name: str) -> dict[str, Any]:
    """The fields (raw keys) of the action with id ``i``; the id is recoverable from them."""
    user = (i * 7919) % 61
    if type_name == "like":
        return {"user": user, "photo": i % 97, "ts": i}
    return {"user": user, "caption": f"post {i} " + "x" * ((i * 131) % 6000)}


def id_of(type_name: str, fields: dict[str, Any]) -> int:
    return fields["ts"] if type_name == "like" else int(fields["caption"].split(" ", 2)[1])


def plan_call(log: Any, rng: random.Random, next_id: int) -> tuple:
    """The writer's next call: (type, ids, rows, single dispatch?, will it roll a segment?)."""
    t = "post" if rng.random() < 0.4 else "like"
    k = 1 if rng.random() < 0.6 else rng.randint(1, 8)  # 8 posts of <= 6 KB fit in one frame
    ids = list(range(next_id, next_id + k))
    rows = [content(i, t) for i in ids]
    single = k == 1 and rng.random() < 0.8
    # Test instrumentation: flag a call that will (probably) roll a segment, so a parent can
    # kill in the middle of a roll (seal, index rename, new segment preallocation).
    need: dict[int, int] = {}
    for r in rows:
        s = log.shard_of(t, r["user"])
        need[s] = need.get(s, 1024) + 64 + len(r.get("caption", ""))
    roll = any(log.shard_logs[s].segments[-1].room() < n for s, n in need.items())
    return t, ids, rows, single, roll


def make_call(log: Any, t: str, ids: list[int], rows: list[dict], single: bool) -> list[tuple]:
    """Dispatch one row or append them all; return the acks [(shard, offset, id)]."""
    if single:
        off = log.dispatch(t, **rows[0])
        return [(log.shard_of(t, rows[0]["user"]), off, ids[0])]
    got = log.append(t, {f: [r[f] for r in rows] for f in rows[0]})
    per: dict[int, list[int]] = {}
    for i, r in zip(ids, rows):
        per.setdefault(log.shard_of(t, r["user"]), []).append(i)
    assert {s: len(v) for s, v in per.items()} == {s: len(r) for s, r in got.items()}
    return [(s, got[s].start + n, i) for s, v in per.items() for n, i in enumerate(v)]


TYPES, LIMITS = schema()

# The child runs the very functions above (their source), then this writer loop.
WRITER = r"""
import os, sys

TYPES, LIMITS = schema()
path, seed, durability, next_id = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rng = random.Random(seed)
os.write(1, b"opening\n")
log = en.open(path, TYPES, shards=2, durability=durability, limits=LIMITS)
park_ack = int(sys.argv[5][4:]) if len(sys.argv) > 5 and sys.argv[5].startswith("ack:") else 0
if len(sys.argv) > 5 and not park_ack:  # a crash point: park in the first call of module.function, to be killed
    import importlib
    mod_name, fn_name = sys.argv[5].rsplit(".", 1)
    mod = importlib.import_module(mod_name)
    real = getattr(mod, fn_name)

    def park(*a, **k):
        os.write(1, f"parked {sys.argv[5]}\n".encode())
        os.read(0, 1)  # stdin is a pipe nobody writes to: wait here for SIGKILL
        return real(*a, **k)

    setattr(mod, fn_name, park)
os.write(1, b"ready\n")
calls = 0
while True:
    t, ids, rows, single, roll = plan_call(log, rng, next_id)
    next_id = ids[-1] + 1
    os.write(1, f"try {t} {ids[0]} {len(ids)}{' roll' if roll else ''}\n".encode())
    try:
        acks = make_call(log, t, ids, rows, single)
    except en.DiskFullError as exc:  # test_diskfull's writer: say so, close, exit 0
        os.write(1, f"full {type(exc).__name__}: {exc}\n".encode())
        log.close()
        os.write(1, b"closed\n")
        break
    calls += 1
    if calls == park_ack:  # the call returned, its acks are not printed: wait for SIGKILL
        os.write(1, b"wrote\n")
        os.read(0, 1)
    os.write(1, "".join(f"ack {s} {o} {i}\n" for s, o, i in acks).encode())  # one write: atomic
"""
CHILD_CODE = "\n\n".join(
    ["from __future__ import annotations\nimport random\nfrom typing import Any\nimport engine as en"]
    + [inspect.getsource(f) for f in (schema, content, id_of, plan_call, make_call)] + [WRITER])

# The chains run in threads. A child forked by one thread holds a copy of every descriptor of
# this process until it execs, LOCK files included, and flock locks belong to the open file:
# a writable open in the other thread at that moment would find the directory "open by another
# process". Spawning and writable opens therefore take turns.
FD_LOCK = threading.Lock()


@dataclass
class Attempt:
    type_name: str
    ids: list[int]


@dataclass
class Chain:
    """One directory history: what every shard held at the last check (ids by offset)."""

    name: str
    tmp: str
    dir_no: int = 0
    path: str = ""
    rounds_here: int = 0
    model: list[list[int]] = field(default_factory=lambda: [[], []])
    next_id: int = 0
    must_see: list[int] = field(default_factory=list)  # returned, killed before the ack
    stats: Counter = field(default_factory=Counter)


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


def run_child(chain: Chain, rng: random.Random, where: str,
              park: str | None = None) -> tuple[list[Attempt], list[tuple]]:
    """Start a writer, kill -9 it at a seeded point (or where it parks), return (attempts, acks)."""
    durability = "group" if rng.random() < 0.25 else "sync"
    r = rng.random()
    kill_at: str | int = ("opening" if r < 0.08 else 0 if r < 0.16 else rng.randint(1, 8)
                          if r < 0.35 else rng.randint(9, 60) if r < 0.55 else "unacked"
                          if r < 0.67 else "roll")
    if park is None and kill_at == "unacked":  # park after a call returned, before its acks
        park = f"ack:{rng.randint(1, 12)}"
    elif park is not None:
        kill_at = "parked"
    rolls_to_pass = rng.randint(0, 2)  # "roll": kill in the (rolls_to_pass + 1)-th rolling call
    chain.stats[durability] += 1
    argv = [sys.executable, "-c", CHILD_CODE, chain.path, str(rng.random()), durability,
            str(chain.next_id)] + ([park] if park else [])
    with FD_LOCK:
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=child_env(), cwd=ROOT)
    lines: list[str] = []
    acks = 0
    try:
        for raw in p.stdout:  # synchronize on the pipe: kill right after the chosen line
            line = raw.decode()
            lines.append(line)
            if kill_at == "opening" and line == "opening\n":
                break
            if kill_at == 0 and line == "ready\n":
                break
            if kill_at == "parked" and line.startswith("parked "):
                break
            if kill_at == "unacked" and line == "wrote\n":
                break
            if kill_at == "roll" and line.startswith("try ") and line.endswith(" roll\n"):
                if rolls_to_pass == 0:
                    break
                rolls_to_pass -= 1
            if line.startswith("ack "):
                acks += 1
                if isinstance(kill_at, int) and kill_at and acks >= kill_at:
                    break
                if kill_at == "roll" and acks >= 400:
                    kill_at = "roll-not-reached"
                    break
        else:
            raise AssertionError(f"{where}: the writer exited by itself (code {p.wait()}): "
                                 f"{p.stderr.read().decode()[-3000:]}")
        chain.stats[f"kill-{kill_at if isinstance(kill_at, str) else min(kill_at, 9)}"] += 1
    finally:
        code, rest, err = reap(p)
    lines.extend(rest.splitlines(keepends=True))  # acks written before the kill landed count
    assert code == -signal.SIGKILL, f"{where}: the writer ended with {code}, not SIGKILL: {err[-3000:]}"
    attempts, acked = parse_lines(lines)
    chain.stats["acks"] += len(acked)
    # the call that returned without acknowledging: its actions are durable ("sync") or in the
    # page cache ("group"), which a kill -9 does not lose, so recovery must show them
    chain.must_see = attempts[-1].ids if kill_at == "unacked" else []
    if attempts:
        chain.next_id = attempts[-1].ids[-1] + 1
    return attempts, acked


def parse_lines(lines: list[str]) -> tuple[list[Attempt], list[tuple[int, int, int]]]:
    """A writer's 'try' lines as Attempts and its 'ack' lines as (shard, offset, id)."""
    attempts, acked = [], []
    for line in lines:
        if not line.endswith("\n"):
            continue  # cannot happen (one write < PIPE_BUF per call); a torn line acks nothing
        parts = line.split()
        if parts[0] == "try":
            first, k = int(parts[2]), int(parts[3])
            attempts.append(Attempt(parts[1], list(range(first, first + k))))
        elif parts[0] == "ack":
            acked.append((int(parts[1]), int(parts[2]), int(parts[3])))
    return attempts, acked


def read_shards(log: Any) -> list[list[tuple[int, str, dict[str, Any]]]]:
    """Every shard as (offset, type, fields with raw keys)."""
    out = []
    for s in range(log.shards):
        rows = []
        for b in log.read(s):
            raw = {(t, f): b.keys(t, f) for t in b.type_names for f in log.schema[t].key_fields}
            seen: Counter = Counter()
            for off, name, vals in b.to_pylist():
                for f in log.schema[name].key_fields:
                    vals[f] = int(raw[(name, f)][seen[name]])
                seen[name] += 1
                rows.append((off, name, vals))
        out.append(rows)
    return out


def _digest(path: str) -> dict[str, str]:
    out = {}
    for root, _d, files in os.walk(path):
        for f in files:
            if f != "LOCK":
                with open(os.path.join(root, f), "rb") as fh:
                    out[os.path.relpath(os.path.join(root, f), path)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def check_recovery(chain: Chain, attempts: list[Attempt], acked: list[tuple], rng: random.Random,
                   where: str) -> None:
    """Reopen (read-only first in some rounds), check everything, append, reopen, check."""
    ro_view = None
    if rng.random() < 0.5:
        before = _digest(chain.path)
        try:
            with en.open(chain.path, readonly=True) as ro:
                ro_view = read_shards(ro)
                chain.stats.update(_kinds(ro.report))
        except en.LogError as exc:  # killed while creating the directory: not a log yet
            assert not acked and not any(chain.model) and "engine.json missing" in str(exc), exc
            chain.stats["killed-creating"] += 1
        assert _digest(chain.path) == before, f"{where}: a read-only open changed files"
    with FD_LOCK:  # with the types, as the application would: the directory may be half-created
        log = en.open(chain.path, TYPES, shards=2, durability=rng.choice(["sync", "group"]),
                      limits=LIMITS)
    try:
        chain.stats.update(_kinds(log.report))
        view = read_shards(log)
        if ro_view is not None:
            assert ro_view == view, f"{where}: the read-only and the writable open disagree"
        ids = check_view(log, view, chain, attempts, acked, where)
        # recovery is done: the log takes more and keeps it
        base = chain.next_id
        chain.next_id += 4
        more = [(base, "like")] + [(i, "post") for i in range(base + 1, base + 4)]
        where_to = {i: log.shard_of(t, content(i, t)["user"]) for i, t in more}
        assert log.dispatch("like", **content(base, "like")) == len(ids[where_to[base]]), where
        rows = [content(i, t) for i, t in more[1:]]
        got = log.append("post", {f: [r[f] for r in rows] for f in rows[0]})
        for s, r in got.items():
            assert r.start == len(ids[s]) + (s == where_to[base]), f"{where}: appended at {r}"
    finally:
        log.close()
    with en.open(chain.path, readonly=True) as log:
        assert not log.report, f"{where}: a clean close still needed recovery: {log.report}"
        view = read_shards(log)
    after = [[id_of(name, vals) for _, name, vals in rows] for rows in view]
    for s in range(2):
        assert after[s] == ids[s] + [i for i, _ in more if where_to[i] == s], (
            f"{where}: shard {s} after append + reopen: {after[s][len(ids[s]) - 3:]}")
    chain.model = after


def check_view(log: Any, view: list[list[tuple]], chain: Chain, attempts: list[Attempt],
                acked: list[tuple], where: str) -> list[list[int]]:
    ids: list[list[int]] = []
    for s, rows in enumerate(view):
        assert [off for off, _, _ in rows] == list(range(len(rows))), f"{where}: shard {s} not dense"
        assert log.end_offset(s) == len(rows), where
        shard_ids = []
        for off, name, vals in rows:
            i = id_of(name, vals)
            assert vals == content(i, name), f"{where}: shard {s} offset {off} holds {vals}"
            assert log.shard_of(name, vals["user"]) == s, f"{where}: action {i} in the wrong shard"
            shard_ids.append(i)
        ids.append(shard_ids)
    every = [i for shard_ids in ids for i in shard_ids]
    assert len(every) == len(set(every)), f"{where}: an action is there twice"
    for s, off, i in acked:
        assert off < len(ids[s]) and ids[s][off] == i, (
            f"{where}: acknowledged action {i} at shard {s} offset {off} is "
            f"{'missing' if off >= len(ids[s]) else f'replaced by {ids[s][off]}'}")
    tried: list[list[int]] = [[], []]  # per shard, in the order the child tried them
    kind = {}
    for a in attempts:
        for i in a.ids:
            tried[log.shard_of(a.type_name, content(i, a.type_name)["user"])].append(i)
            kind[i] = a
    for s in range(2):
        old = chain.model[s]
        assert ids[s][: len(old)] == old, f"{where}: shard {s} lost or moved what an earlier round saw"
        new = ids[s][len(old):]
        assert new == tried[s][: len(new)], (
            f"{where}: shard {s} new actions {new[:20]} are not a prefix of the tried {tried[s][:20]}")
        present = set(new)
        for a in attempts:  # a batch is in a shard whole or not at all (it is one frame there)
            mine = [i for i in a.ids if log.shard_of(a.type_name, content(i, a.type_name)["user"]) == s]
            assert all(i in present for i in mine) or not any(i in present for i in mine), (
                f"{where}: half of batch {a.ids} is in shard {s}")
        chain.stats["unacked-visible"] += len(present - {i for _, _, i in acked})
    every_new = {i for s in range(2) for i in ids[s][len(chain.model[s]):]}
    missing = [i for i in chain.must_see if i not in every_new]
    assert not missing, f"{where}: actions {missing} of a call that returned are gone after kill -9"
    return ids


def _kinds(report: list[str]) -> list[str]:
    out = []
    for line in report:
        for key in ("torn tail", "index missing", "crash at creation", "index damaged", "torn record"):
            if key in line:
                out.append(f"report: {key}")
    return out


def run_chain(chain_no: int, rounds: int, tmp: str) -> Chain:
    chain = Chain(f"chain{chain_no}", tmp)
    for rnd in range(rounds):
        rng = random.Random(f"{SEED}:{chain_no}:{rnd}")
        if not chain.path or chain.rounds_here >= rng.randint(1, 4):
            chain.dir_no += 1
            chain.path = os.path.join(tmp, f"{chain.name}-dir{chain.dir_no}")
            chain.rounds_here, chain.model = 0, [[], []]
        chain.rounds_here += 1
        where = (f"ENGINE_CRASH_SEED={SEED} chain {chain_no} round {rnd} "
                 f"(dir {os.path.basename(chain.path)}, its round {chain.rounds_here})")
        attempts, acked = run_child(chain, rng, where)
        check_recovery(chain, attempts, acked, rng, where)
        chain.stats["rounds"] += 1
    return chain


@pytest.mark.timeout(600)
def test_kill9_keeps_every_acknowledged_action(tmp_path):
    per = [ROUNDS // CHAINS + (c < ROUNDS % CHAINS) for c in range(CHAINS)]
    with ThreadPoolExecutor(CHAINS) as pool:
        futures = [pool.submit(run_chain, c, per[c], str(tmp_path)) for c in range(CHAINS)]
        chains = [f.result() for f in futures]
    stats = sum((c.stats for c in chains), Counter())
    print(f"seed {SEED}: {dict(sorted(stats.items()))}")
    assert stats["rounds"] == ROUNDS
    assert stats["acks"] > 10 * ROUNDS // 2, stats  # the writers got somewhere before dying
    if ROUNDS >= 50:  # kills landed between a return and its ack, and inside segment rolls
        assert stats["kill-unacked"] >= 1 and stats["unacked-visible"] >= stats["kill-unacked"], stats
        assert stats["kill-roll"] >= 5, stats



PARK_POINTS = [
    pytest.param("os.posix_fallocate", id="segment-created-not-preallocated"),
    pytest.param("mmap.mmap", id="segment-preallocated-no-header"),
    pytest.param("os.replace", id="index-written-not-renamed"),
    pytest.param("os.pwrite", id="key-record-not-written"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("park", PARK_POINTS)
def test_kill9_at_a_crash_point(tmp_path, park):
    """A real kill -9 at an exact step of a roll (or of a key record write), then recovery."""
    chain = Chain("point", str(tmp_path), path=str(tmp_path / "log"))
    rng = random.Random(f"{SEED}:{park}")
    for rnd in range(2):  # crash at the point, recover; then again in the recovered directory
        where = f"ENGINE_CRASH_SEED={SEED} crash point {park} round {rnd}"
        attempts, acked = run_child(chain, rng, where, park=park)
        check_recovery(chain, attempts, acked, rng, where)
    assert chain.stats["kill-parked"] == 2, chain.stats  # both kills landed at the point
    if park == "mmap.mmap":
        assert chain.stats["report: crash at creation"] >= 1, chain.stats
