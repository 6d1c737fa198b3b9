"""A Hypothesis state machine over the log against a plain list per shard.

Rules: append columnar batches, dispatch single actions (mixed types in one frame), flush,
roll segments, crash (buffers lost, written frames kept), clean reopen, read random ranges.
After every step: each shard's end offset equals the model's length and a full read equals it.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import hypothesis.strategies as st
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import engine as en
from logutil import SMALL, TYPES, crash, likes, read_all

NO_TIMER = en.Limits(segment_bytes=SMALL.segment_bytes, dispatch_buffer_actions=64, flush_interval_ms=1e9)


class LogMachine(RuleBasedStateMachine):
    @initialize(shards=st.integers(1, 3), durability=st.sampled_from(["none", "sync", "group"]))
    def open_log(self, shards: int, durability: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="engine-model-")
        self.durability = durability
        # "none": no timed flush, so what is buffered depends only on the steps (determinism)
        self.limits = NO_TIMER if durability == "none" else SMALL
        self.log = en.open(self.dir, TYPES, shards=shards, durability=durability, limits=self.limits)
        self.shards = shards
        self.model: list[list[tuple]] = [[] for _ in range(shards)]  # written
        self.pending: list[tuple[int, tuple]] = []  # dispatched, maybe only buffered
        self.next_id = 0

    def teardown(self) -> None:
        try:
            self.log.close()
        except en.ClosedError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def _ids(self, n: int) -> np.ndarray:
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        self.next_id += n
        return ids

    def _absorb_written(self) -> None:
        """Move buffered dispatches the committer thread already wrote into the model."""
        with self.log._lock:
            ends = [self.log.end_offset(s) for s in range(self.shards)]
            keep = []
            for shard, row in self.pending:
                if len(self.model[shard]) < ends[shard]:
                    self.model[shard].append(row)
                else:
                    keep.append((shard, row))
            self.pending = keep

    def _settle_pending(self) -> None:
        for shard, row in self.pending:
            self.model[shard].append(row)
        self.pending = []

    @rule(n=st.integers(1, 300), users=st.integers(1, 50), data=st.data())
    def append(self, n: int, users: int, data: st.DataObject) -> None:
        ids = self._ids(n)
        user = np.array(data.draw(st.lists(st.integers(0, users), min_size=n, max_size=n)), np.int64)
        got = self.log.append("like", likes(ids, user))
        self._settle_pending()  # append cuts the dispatch buffer first: order is kept
        for i, u in zip(ids.tolist(), user.tolist()):
            s = self.log.shard_of("like", u)
            self.model[s].append(("like", u, i))
        for s, r in got.items():
            assert r.stop == len(self.model[s])

    @rule(user=st.integers(-5, 40), kind=st.sampled_from(["like", "post", "profile"]))
    def dispatch(self, user: int, kind: str) -> None:
        (i,) = self._ids(1).tolist()
        if kind == "like":
            off = self.log.dispatch("like", user=user, photo=i % 97, ts=i)
            row = ("like", user, i)
        elif kind == "post":
            off = self.log.dispatch("post", user=user, caption=f"c{i}")
            row = ("post", user, f"c{i}")
        else:
            off = self.log.dispatch("profile", user=user, name=f"n{i}")
            row = ("profile", user, f"n{i}")
        s = self.log.shard_of(kind, user)
        assert off == len(self.model[s]) + sum(1 for ps, _ in self.pending if ps == s)
        self.pending.append((s, row))
        if self.durability != "none":
            self._settle_pending()

    @rule()
    def flush(self) -> None:
        self.log.flush()
        self._settle_pending()

    @rule()
    def roll(self) -> None:
        with self.log._lock:
            self.log._flush_pending_locked()
            self._settle_pending()
            for sl in self.log.shard_logs:
                sl.roll()

    @rule()
    def compact(self) -> None:
        self.log.compact()
        self._settle_pending()  # compact flushes first
        for s, rows in enumerate(self.model):
            sealed_end = self.log.shard_logs[s].segments[-1].base
            newest: dict[int, int] = {}
            for off, row in enumerate(rows):
                if row is not None and row[0] == "profile":
                    newest[row[1]] = off
            for off in range(sealed_end):
                row = rows[off]
                if row is not None and row[0] == "profile" and newest[row[1]] != off:
                    rows[off] = None

    @rule()
    def crash_and_reopen(self) -> None:
        if self.durability == "none":
            # buffered dispatches are lost unless the committer thread already wrote them
            crash(self.log)  # stops the committer thread first
            written = [sl.end_offset for sl in self.log.shard_logs]
            for s, row in self.pending:
                if len(self.model[s]) < written[s]:
                    self.model[s].append(row)
            self.pending = []
        else:
            crash(self.log)
        self.log = en.open(self.dir, durability=self.durability, limits=self.limits)

    @rule()
    def reopen(self) -> None:
        self.log.close()
        self._settle_pending()
        self.log = en.open(self.dir, durability=self.durability, limits=self.limits)
        assert not self.log.report, self.log.report  # a clean close needs no recovery

    @precondition(lambda self: any(self.model))
    @rule(data=st.data())
    def read_range(self, data: st.DataObject) -> None:
        self._absorb_written()
        s = data.draw(st.integers(0, self.shards - 1))
        n = len(self.model[s])
        start = data.draw(st.integers(0, n))
        stop = data.draw(st.integers(start, n + 3))
        got = read_all(self.log, s, start, stop)
        want = [(start + k, *row) for k, row in enumerate(self.model[s][start:stop]) if row is not None]
        assert got == want

    @invariant()
    def matches_model(self) -> None:
        if not hasattr(self, "log"):
            return
        self._absorb_written()
        with self.log._lock:
            if self.durability != "none":
                assert not self.pending
            for s in range(self.shards):
                end = self.log.end_offset(s)
                # the committer may have cut buffered dispatches into frames already
                assert len(self.model[s]) <= end <= len(self.model[s]) + len(self.pending)
        # compare everything written so far
        for s in range(self.shards):
            got = read_all(self.log, s)
            want_written = [(k, *row) for k, row in enumerate(self.model[s]) if row is not None]
            assert got[: len(want_written)] == want_written


TestLogMachine = LogMachine.TestCase
TestLogMachine.settings = settings(max_examples=int(os.environ.get("ENGINE_MODEL_EXAMPLES", "60")), stateful_step_count=30, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])
