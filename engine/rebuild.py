"""Blue/green rebuilds: a new version of a store folds from the log while the old one serves.

Design note. The new version lives in its own directory (``stores/<name>/v<new>``) and is
folded by a background thread straight from the log, checkpointing every
``checkpoint_every_actions`` as it goes, so a crash mid-rebuild leaves the serving version
untouched and the rebuild resumable from its last checkpoint. When it has caught up, the App's
fold lock is taken (the live fold pauses for the last few batches), both versions are brought
to the same offsets, optionally compared key by key, and the switch is one dict assignment —
readers see the old version or the new one, each complete.

The switch, in crash order: the new version is checkpointed at the cut; then
``stores/<name>/CURRENT.json`` names it (atomically: this is the commit point, and it records
the version it retired); then the dict assignment and the subscriptions move; then the old
version's directory is renamed to ``.retired-v<old>`` and removed. A crash before the commit
point leaves the old version's files exactly as they were; a crash after it leaves a directory
that :func:`finish_switch` (run when a store is recovered) removes. The rename makes the
removal all-or-nothing as seen by a later ``register`` of the old version: its checkpoint is
whole, or it is gone and the old version replays from scratch.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import EngineError, SchemaError
from .fsutil import fsync_dir
from .reducers import MultiMapColumn, Ring, TopK
from .state import write_json_atomic
from .store import Store, StoreState

CATCH_UP_LAG = 100_000  # actions left when the switch takes the fold lock
CURRENT = "CURRENT.json"
RETIRED_PREFIX = ".retired-"  # a version directory being removed after a switch

# The rebuild's lifecycle (one transition function, this table).
_TRANSITIONS = {
    "folding": {"ready", "switched", "failed", "cancelled"},
    "ready": {"switched", "failed", "cancelled"},
    "switched": set(),
    "failed": set(),
    "cancelled": set(),
}


@dataclass
class StoreDiff:
    """Key-by-key differences between two versions of a store, at the same offsets."""

    store: str
    old_version: int
    new_version: int
    compared: list[str]
    only_old: list[str]
    only_new: list[str]
    not_compared: list[str]
    keys: int
    differences: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def equal(self) -> bool:
        return not self.differences and not self.only_old and not self.only_new

    def __str__(self) -> str:
        lines = [f"store {self.store!r} v{self.old_version} -> v{self.new_version}: "
                 f"{self.keys:,} keys, columns compared {self.compared}"]
        for c in self.only_old:
            lines.append(f"  column {c!r} only in v{self.old_version}")
        for c in self.only_new:
            lines.append(f"  column {c!r} only in v{self.new_version}")
        for c in self.not_compared:
            lines.append(f"  column {c!r} not compared (not a scalar)")
        for c, d in self.differences.items():
            shown = ", ".join(f"{k!r}: {o} -> {n}" for k, o, n in
                              zip(d["keys"][:5], d["old"][:5].tolist(), d["new"][:5].tolist()))
            lines.append(f"  column {c!r}: {len(d['ids']):,} keys differ (e.g. {shown})")
        if self.equal:
            lines.append("  identical")
        return "\n".join(lines)


def compare_stores(old: Store, new: Store) -> StoreDiff:
    """Compare every scalar column the two versions share, for every key of the domain.

    Versions keyed by different domains share no key: every column is only in one of them."""
    log = old.log
    n = len(log.dicts[old.domain])
    scal_old = {c for c in old.user_columns if c in old._ops}
    scal_new = {c for c in new.user_columns if c in new._ops}
    both = sorted(scal_old & scal_new) if old.domain == new.domain else []
    diff = StoreDiff(old.name, old.version, new.version, both, sorted(scal_old - set(both)),
                     sorted(scal_new - set(both)),
                     sorted((set(old.user_columns) | set(new.user_columns)) - scal_old - scal_new), n)
    if not both:
        return diff
    ids = np.arange(n, dtype=np.int64)
    with old._locked(), new._locked():
        a, b = old.read_ids(ids), new.read_ids(ids)
    for c in both:
        x, y = a[c], b[c]
        ne = x != y
        if x.dtype.kind == "f" or y.dtype.kind == "f":
            ne &= ~(np.isnan(x.astype(np.float64)) & np.isnan(y.astype(np.float64)))
        where = np.nonzero(ne)[0]
        if len(where):
            diff.differences[c] = {"ids": where, "keys": log.dicts[old.domain].key_of(where),
                                   "old": x[where], "new": y[where]}
    return diff


def finish_switch(root: str, version: int) -> None:
    """Complete a switch a crash interrupted (``root`` is ``stores/<name>``; ``version`` the
    version being recovered): when CURRENT.json names ``version``, the version it retired is
    removed; half-removed directories of retired versions always are."""
    if not os.path.isdir(root):
        return
    try:
        with open(os.path.join(root, CURRENT)) as f:
            cur = json.load(f)
    except FileNotFoundError:
        cur = {}
    retired = cur.get("retired")
    if cur.get("version") == version and retired is not None and retired != version:
        try:
            _remove_version(root, int(retired))
        except OSError:  # garbage, not state: the next recovery tries again
            pass
    for name in os.listdir(root):
        if name.startswith(RETIRED_PREFIX):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _remove_version(root: str, version: int) -> None:
    """Rename ``v<version>`` out of the way (atomic), then delete it."""
    d = os.path.join(root, f"v{version}")
    if not os.path.isdir(d):
        return
    trash = os.path.join(root, f"{RETIRED_PREFIX}v{version}")
    shutil.rmtree(trash, ignore_errors=True)  # a previous removal a crash interrupted
    os.rename(d, trash)
    fsync_dir(root)
    shutil.rmtree(trash, ignore_errors=True)  # mapped state stays readable


class Rebuild:
    """A running blue/green rebuild (made by :meth:`engine.App.rebuild`).

    ``state`` is "folding" → ("ready" when ``switch=False``) → "switched", or "failed" /
    "cancelled". ``fraction``, ``rate`` and ``eta_s`` report progress; ``diff`` holds the
    key-by-key comparison taken just before the switch; ``wait()`` blocks until it is done.
    """

    def __init__(self, app: Any, store: Store, *, compare: bool, switch: bool, progress: bool,
                 checkpoint_every_actions: int):
        old = app.stores.get(store.name)
        if old is None:
            raise SchemaError(f"no store {store.name!r} is serving; register it instead of "
                              f"rebuilding (registered: {sorted(app.stores)})")
        if store is old or store.version == old.version:
            raise SchemaError(f"store {store.name!r} already serves version {old.version}; bump "
                              "the version to rebuild")
        running = app.rebuilds.get(store.name)
        if running is not None and running.state in ("folding", "ready"):
            raise SchemaError(f"store {store.name!r} is already being rebuilt (to version "
                              f"{running.new.version}, {running.state}); wait, switch or cancel it")
        if checkpoint_every_actions < 1:
            raise ValueError("checkpoint_every_actions must be >= 1")
        app._check_acyclic({**app.stores, store.name: store}, app.derivations)
        self.app, self.old, self.new = app, old, store
        self.compare, self.auto_switch, self.show_progress = compare, switch, progress
        self.checkpoint_every = checkpoint_every_actions
        self.state = "folding"
        self.error: BaseException | None = None
        self.diff: StoreDiff | None = None
        self.done = 0  # actions folded into the new version by this rebuild
        self.total = 0  # actions this rebuild has to fold (grows with live writes)
        self.started = time.monotonic()
        self.finished_at: float | None = None
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None

    def _to(self, state: str) -> None:
        assert state in _TRANSITIONS[self.state], f"rebuild of {self.new.name}: {self.state} -> {state}"
        self.state = state
        if state != "folding":
            self.finished_at = time.monotonic()
            self.total = self.done if state in ("ready", "switched") else self.total

    # -- progress --------------------------------------------------------------------------
    @property
    def fraction(self) -> float:
        return 1.0 if self.total == 0 else min(1.0, self.done / self.total)

    @property
    def rate(self) -> float:
        """Actions folded per second (until the rebuild finished)."""
        end = time.monotonic() if self.finished_at is None else self.finished_at
        return self.done / max(1e-9, end - self.started)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current rate (None before the first batch)."""
        r = self.rate
        return None if r <= 0 else max(0.0, (self.total - self.done) / r)

    def __repr__(self) -> str:
        eta = "-" if self.eta_s is None else f"{self.eta_s:.1f} s"
        return (f"Rebuild({self.new.name!r} v{self.old.version} -> v{self.new.version}, {self.state}, "
                f"{100 * self.fraction:.0f}%, eta {eta})")

    # -- running ---------------------------------------------------------------------------
    def start(self) -> None:
        app, new = self.app, self.new
        try:
            new.bind(app.log.schema, app.log.shards)
            new.log = app.log
            app._recover(new)  # resumes from the new version's own checkpoint after a crash
            self.total = self._lag()
        except BaseException as exc:
            self.error = exc
            self._to("failed")
            self._finished.set()
            raise
        self._thread = threading.Thread(target=self._run, name=f"engine-rebuild-{new.name}", daemon=True)
        self._thread.start()

    def _lag(self) -> int:
        log = self.app.log
        return sum(max(0, log.end_offset(s) - self.new.shards[s].offset) for s in range(log.shards))

    def _run(self) -> None:
        bar = None
        try:
            tick = None
            if self.show_progress:
                from .progress import progress_bar, ticker

                bar = progress_bar()
                bar.start()
                tick = ticker(bar, f"rebuild {self.new.name} v{self.new.version}", self.total)
            self._catch_up(tick)
            if bar is not None:
                bar.stop()
                bar = None
            with self.app._fold_lock:  # the live fold pauses: both versions reach one cut
                if self._cancel.is_set():
                    self.app._checkpoint_store(self.new)  # a later rebuild resumes from here
                    self._to("cancelled")
                    return
                self._same_cut()
                if self.compare:
                    self.diff = compare_stores(self.old, self.new)
                if self.auto_switch:
                    self._switch_locked()
                else:
                    self.app._checkpoint_store(self.new)
                    self._to("ready")
        except BaseException as exc:  # noqa: BLE001 - kept; the serving version is untouched
            self.error = exc
            if self.state in ("folding", "ready"):
                self._to("failed")
        finally:
            if bar is not None:
                bar.stop()
            self._finished.set()

    def _catch_up(self, tick: Any) -> None:
        """Fold the new version until it is within CATCH_UP_LAG of the log's end (or cancelled),
        checkpointing every ``checkpoint_every`` actions."""
        app, new, log = self.app, self.new, self.app.log
        since = 0
        while not self._cancel.is_set():
            for s in range(log.shards):
                for batch in log.shard_logs[s].read(new.shards[s].offset, log.end_offset(s)):
                    if self._cancel.is_set():
                        return
                    n = self._apply(s, batch)
                    since += n
                    if tick is not None:
                        tick(n)
                    if since >= self.checkpoint_every:
                        app._checkpoint_store(new)
                        since = 0
            lag = self._lag()
            self.total = self.done + lag
            if lag <= CATCH_UP_LAG:
                return

    def _apply(self, shard: int, batch: Any) -> int:
        new = self.new
        new.apply(shard, batch, len(self.app.log.dicts[new.domain]))
        if new.status is StoreState.FAILED:
            raise EngineError(f"the new version v{new.version} of store {new.name!r} failed at "
                              f"(shard, offset) {new.failed_at}: {new.error!r}; the serving "
                              f"version v{self.old.version} is untouched") from new.error
        n = batch.end_offset - batch.first_offset
        self.done += n
        return n

    def _same_cut(self) -> None:
        """Under the fold lock: fold the serving version to the log's end, then the new one to
        exactly the serving version's offsets (never cancelled half-way)."""
        app, log, new = self.app, self.app.log, self.new
        app._fold(None)
        for s in range(log.shards):
            for batch in log.shard_logs[s].read(new.shards[s].offset, self.old.shards[s].offset):
                self._apply(s, batch)
        self.total = self.done
        if self.old.status is not StoreState.FAILED:  # a failed one stopped at its failure
            assert [st.offset for st in new.shards] == [st.offset for st in self.old.shards], (
                f"rebuild of {new.name}: not at one cut")

    def switch(self) -> None:
        """Switch to the new version now (after ``switch=False`` and a look at ``diff``)."""
        with self.app._fold_lock:
            if self.state != "ready":
                raise EngineError(f"rebuild is {self.state!r}; switch() needs 'ready'")
            try:
                self._same_cut()
                self._switch_locked()
            except BaseException as exc:
                self.error = exc
                if self.state == "ready":
                    self._to("failed")
                raise

    def _switch_locked(self) -> None:
        app, old, new = self.app, self.old, self.new
        if app.stores.get(new.name) is not old:
            raise EngineError(f"store {new.name!r} no longer serves version {old.version}; "
                              "this rebuild cannot switch")
        self._check_subscriptions()
        app._checkpoint_store(new)  # the new version is durable before anything names it
        root = os.path.dirname(app.store_dir(new))
        write_json_atomic(os.path.join(root, CURRENT),  # the commit point
                          {"store": new.name, "version": new.version, "retired": old.version})
        app.stores[new.name] = new  # one assignment: readers see one complete version or the other
        app.hub.move(old, new)  # key watches re-read from the new version; queries re-evaluated
        if old.status is not StoreState.CLOSED:
            old.transition(StoreState.CLOSED)
        self._to("switched")
        try:
            _remove_version(root, old.version)
        except OSError:  # the switch is done; a later recovery removes it (finish_switch)
            pass

    # -- subscriptions across the switch -----------------------------------------------------
    def _check_subscriptions(self) -> None:
        """Key subscriptions on the old version must find their column in the new one: checked
        before anything is written, so a mismatch fails the rebuild, not half a switch."""
        for (name, col), w in list(self.app.hub.columns.items()):
            if name != self.old.name or not w.subs:
                continue
            kind = self.new.user_columns.get(col)
            ok = kind is not None and not isinstance(kind, (Ring, MultiMapColumn, TopK))
            if not ok or self.new._dtype(col) not in (np.dtype(np.int64), np.dtype(np.float64)):
                raise SchemaError(
                    f"{len(w.subs)} subscription(s) watch column {col!r} of store {name!r}, which "
                    f"version {self.new.version} has not as an int64 or float64 column; close "
                    "them (or keep the column) and rebuild again: it resumes from its checkpoint")

    # -- waiting and cancelling --------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> "Rebuild":
        """Block until the rebuild switched, is ready, failed or was cancelled."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"rebuild of {self.new.name!r} still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self

    def cancel(self) -> None:
        """Stop folding (a ready rebuild will not switch); the new version keeps its last
        checkpoint, so a later rebuild resumes from there."""
        self._cancel.set()
        if self._thread is not None:
            self._thread.join()
        with self.app._fold_lock:
            if self.state == "ready":
                self._to("cancelled")
