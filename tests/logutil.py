"""Shared helpers for log tests: a two-type schema, content encoding, an in-process crash, and
reaping a child process killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import numpy as np

import engine as en

LIKE = en.ActionType("like", {"user": en.key("user"), "photo": en.key("photo"), "ts": en.timestamp},
                     partition="user")
POST = en.ActionType("post", {"user": en.key("user"), "caption": en.string}, partition="user")
PROFILE = en.ActionType("profile", {"user": en.key("user"), "name": en.string}, partition="user",
                        last_write_wins=True)
TYPES = [LIKE, POST, PROFILE]
SMALL = en.Limits(segment_bytes=64 << 10, dispatch_buffer_actions=64)


def read_all(log: en.Log, shard: int, start: int = 0, stop: int | None = None) -> list[tuple]:
    """Every action of a shard as (offset, type, raw user, content) with raw keys resolved."""
    out = []
    for b in log.read(shard, start, stop):
        for off, name, vals in b.to_pylist():
            user = log.dicts["user"].key_of(np.array([vals["user"]]))[0]
            content = {"like": "ts", "post": "caption", "profile": "name"}[name]
            content = vals[content]
            out.append((off, name, int(user), content))
    return out


def crash(log: en.Log) -> None:
    """Abandon ``log`` as a killed process would: no flush, no sync, buffers lost.

    What was written into the mmaps stays (it is in the page cache, as after ``kill -9``).
    """
    log._closed = True
    log._committer_wake.set()
    if log._committer is not None:
        log._committer.join()
    for sl in log.shard_logs:
        for seg in sl.segments:
            seg.close()
    for d in log.dicts.values():
        if d._fd >= 0:
            os.close(d._fd)
            d._fd = -1
    if log._lockfile is not None:
        log._lockfile.close()


def snapshot(path: str) -> dict[str, bytes]:
    out = {}
    for root, _dirs, files in os.walk(path):
        for f in files:
            if f != "LOCK":
                p = os.path.join(root, f)
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, path)] = fh.read()
    return out


def likes(ids: Any, users: Any) -> dict[str, np.ndarray]:
    ids = np.asarray(ids, np.int64)
    return {"user": np.asarray(users, np.int64), "photo": ids % 97, "ts": ids}


def reap(p: subprocess.Popen) -> tuple[int, str, str]:
    """SIGKILL the child if it still runs, wait for it, close its pipes; returns its exit
    code, the rest of its stdout (lines written before the kill landed count too), its stderr."""
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    code = p.wait()
    rest = p.stdout.read().decode() if p.stdout else ""
    err = p.stderr.read().decode() if p.stderr else ""
    for f in (p.stdin, p.stdout, p.stderr):
        if f is not None:
            f.close()
    return code, rest, err
