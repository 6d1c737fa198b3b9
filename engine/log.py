"""The dispatcher: a sharded, durable, columnar action log with a schema and key dictionaries.

Design note. ``Log`` validates every action against the schema before anything is written,
routes it to ``shard = stable_hash(partition key) % shards``, interns key fields into dense
ids (dictionary records are written before the frames that use them), and appends columnar
frames to the shard's ``ShardLog``. Single actions (``dispatch``) are buffered per shard and cut
into mixed-type frames; columnar batches (``append``) become frames directly. Durability:

* ``"sync"``: a call returns once an fdatasync covering its actions is done; concurrent
  callers share one fdatasync (leader/follower group commit, no added delay);
* ``"group"``: the same guarantee; single actions from all callers are gathered by a committer
  thread for up to ``flush_interval_ms`` into one frame and one fdatasync (higher throughput,
  bounded extra latency); a columnar ``append`` syncs at once, as with "sync";
* ``"none"``: no fdatasync until ``flush()`` / ``close()``; ``dispatch`` buffers up to
  ``dispatch_buffer_actions`` in memory (a crash loses what is still buffered).

``flush()`` is a durability barrier in every mode. One process writes a directory (an
exclusive ``flock``); any number of processes may open it read-only and follow it.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import json
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Mapping

import numpy as np

from . import clock
from ._impl import load
from .errors import (ClosedError, IncompatibleSchemaError, LimitExceededError, LogError, ReadOnlyError,
                     ValidationError)
from .fsutil import write_atomic
from .frame import KIND_TYPES, TYPE_COLUMN_FIELD, Batch, ColumnSpec, Var, kind_of, take_rows
from .keys import KeyDictionary
from .limits import DEFAULT_LIMITS, Limits
from .schema import ActionType, Schema, VarColumn
from .shardlog import ShardLog

if TYPE_CHECKING:  # pragma: no cover
    from .compaction import CompactionStats

_keys = load("keys")
_dispatch = load("dispatch")

Durability = Literal["sync", "group", "none"]
FORMAT_VERSION = 1


class Log:
    """A data directory's log. Use :func:`engine.open` to get one."""

    def __init__(self, path: str, types: Iterable[ActionType] | Schema | None = None, *,
                 shards: int | None = None, durability: Durability = "group",
                 limits: Limits = DEFAULT_LIMITS, readonly: bool = False,
                 retention_bytes: int | None = None, retention_age_s: float | None = None):
        if durability not in ("sync", "group", "none"):
            raise ValueError(f"durability must be 'sync', 'group' or 'none', not {durability!r}")
        self.path = os.path.abspath(path)
        self.durability = durability
        self.limits = limits
        self.readonly = readonly
        self.retention_bytes = retention_bytes
        self.retention_age_s = retention_age_s
        self.report: list[str] = []  # what recovery did on open (torn tails cut, indexes rebuilt)
        self._closed = False
        self._lock = threading.RLock()  # guards every write path
        self._lockfile = None
        self.dicts: dict[str, KeyDictionary] = {}
        self.shard_logs: list[ShardLog] = []
        try:
            self._open_meta(types, shards)
            for d, kind in self.schema.domains.items():
                self.dicts[d] = KeyDictionary(os.path.join(self.path, "keys"), d, kind, not readonly,
                                              self.report)
            for s in range(self.shards):
                self.shard_logs.append(ShardLog(
                    os.path.join(self.path, "shards", f"{s:04d}"), s, self.meta["segment_bytes"],
                    not readonly, self.schema, self.dicts, self.report))
        except BaseException:
            self._release()  # a failed open holds nothing: a retry must not find the LOCK taken
            raise
        # dispatch buffer: per shard, single actions in order (native; see ext/_dispatch.pyx)
        self._rowbuf = _dispatch.RowBuffer(self.shards, [_row_spec(self.schema, at) for at in self.schema],
                                           flush_at=limits.dispatch_buffer_actions)
        for s_, sl_ in enumerate(self.shard_logs):
            self._rowbuf.set_base(s_, sl_.end_offset)
        self._written_seq = 0  # frames written; a caller's actions are in frame <= its seq
        self._synced_seq = 0  # frames covered by the last completed fdatasync
        self._sync_cond = threading.Condition(threading.Lock())
        self._syncing = False
        self._committer: threading.Thread | None = None
        self._committer_wake = threading.Event()
        if not readonly and durability in ("group", "none"):
            self._committer = threading.Thread(target=self._commit_loop, name="engine-commit", daemon=True)
            self._committer.start()
        self._async_waiters: list[tuple[int, asyncio.Future]] = []
        self._fast: dict[str, Any] = {}  # type name -> (native validator or None, field names)
        self._async_scheduled = False
        self._listeners: list[Callable[[], None]] = []  # told after frames are written
        self._field_plans: dict[int, list[tuple[int, int, Any, Any]]] = {}  # see _field_plan
        self._sync_failed: LogError | None = None  # set by a failed fdatasync: writes refused

    # -- metadata --------------------------------------------------------------------------
    def _open_meta(self, types: Iterable[ActionType] | Schema | None, shards: int | None) -> None:
        meta_path = os.path.join(self.path, "engine.json")
        schema_path = os.path.join(self.path, "schema.json")
        exists = os.path.exists(meta_path)
        if self.readonly and not exists:
            raise LogError("no engine data directory here (engine.json missing)", path=self.path)
        if not self.readonly:
            os.makedirs(self.path, exist_ok=True)
            self._lockfile = open(os.path.join(self.path, "LOCK"), "a+")
            try:
                fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                self._lockfile.close()
                raise LogError("the data directory is open for writing by another process; open "
                               "it with readonly=True to follow it", path=self.path) from exc
        declared = None if types is None else (types if isinstance(types, Schema) else Schema(list(types)))
        if exists:
            with open(meta_path) as f:
                self.meta = json.load(f)
            if self.meta.get("format") != FORMAT_VERSION:
                raise IncompatibleSchemaError(f"data directory format {self.meta.get('format')} is "
                                              f"not supported (this engine reads {FORMAT_VERSION})")
            if shards is not None and shards != self.meta["shards"]:
                raise IncompatibleSchemaError(
                    f"the directory has {self.meta['shards']} shards, {shards} requested; "
                    "resharding is not supported: replay into a new directory")
            with open(schema_path) as f:
                stored = Schema.from_json(f.read())
            self.schema = stored if declared is None else Schema.merge(stored, declared)
            if not self.readonly and self.schema.to_json() != stored.to_json():
                write_atomic(schema_path, self.schema.to_json())
        else:
            if declared is None:
                raise ValueError("a new data directory needs its action types: open(path, types=[...])")
            n = 1 if shards is None else shards
            if not 1 <= n <= self.limits.shards_max:
                raise ValueError(f"shards must be in [1, {self.limits.shards_max}], not {n}")
            self.meta = {"format": FORMAT_VERSION, "shards": n,
                         "segment_bytes": self.limits.segment_bytes}
            self.schema = Schema.merge(Schema([]), declared) if hasattr(Schema, "merge") else declared
            write_atomic(schema_path, self.schema.to_json())
            write_atomic(meta_path, json.dumps(self.meta, indent=1, sort_keys=True))
        self.shards = int(self.meta["shards"])

    # -- routing ---------------------------------------------------------------------------
    def shard_of(self, type_name: str, key: Any) -> int:
        """The shard an action of ``type_name`` with partition key ``key`` goes to."""
        self.schema[type_name]  # unknown types raise
        return self.shard_of_key(key)

    def shard_of_key(self, key: Any) -> int:
        """The shard of a raw partition key (a stable hash; never Python's ``hash``)."""
        if self.shards == 1:
            return 0
        if isinstance(key, (str, bytes)):
            return int(_keys.shard_of_str(key, self.shards))
        return int(_keys.shard_of_int(int(key), self.shards))

    def _route(self, at: ActionType, cols: Mapping[str, Any], n: int) -> np.ndarray | None:
        if self.shards == 1 or n == 0:
            return None
        v = cols[at.partition]
        if isinstance(v, VarColumn):
            return _keys.shard_of_strs((v.offsets, v.data), self.shards)
        return _keys.shard_of_ints(np.asarray(v).astype(np.int64, copy=False), self.shards)

    # -- writing: columnar -----------------------------------------------------------------
    def append(self, type_name: str, columns: Any, *, wait: bool = True) -> dict[int, range]:
        """Append a columnar batch of one action type; returns ``{shard: offsets range}``.

        ``columns`` maps field names to numpy arrays / lists / Arrow arrays, or is a
        ``pyarrow.RecordBatch``. The whole batch is validated first: on error nothing is
        written. Returns once durable per the log's durability mode (``wait=False``: once
        written; the next commit or ``flush()`` makes it durable — what derivations use, whose
        output is re-derived after a crash anyway).
        """
        self._check_writable()
        at = self.schema[type_name]
        cols, n = at.validate_columns(columns, self.limits)
        if n == 0:
            return {}
        type_id = self.schema.type_id(type_name)
        shard_ids = self._route(at, cols, n)
        _check_row_bytes(at, cols, n, self.limits)  # before anything (keys included) is written
        with self._lock:
            self._flush_pending_locked()
            cols = self._intern_columns(at, cols)
            out, seq = self._write_routed(at, type_id, cols, n, shard_ids)
        self._after_write(seq) if wait else self._committer_wake.set()
        self._wake_listeners()
        return out

    def append_ids(self, type_name: str, columns: Mapping[str, Any], *,
                   wait: bool = True) -> dict[int, range]:
        """Append a columnar batch whose key fields are already interned ids (derivations).

        Key ids must be ids of the log's dictionaries (``0 <= id < len(log.dicts[domain])``);
        other fields are validated like ``append``. Nothing is looked up again: this is the
        path that fans out millions of derived actions a second.
        """
        self._check_writable()
        at = self.schema[type_name]
        ids: dict[str, np.ndarray] = {}
        rest = dict(columns)
        for f, domain in at.key_fields.items():
            if f not in rest:
                raise ValidationError(f"append_ids of action type {type_name!r}: key field {f!r} "
                                      "is missing", action_type=type_name, field=f)
            v = np.ascontiguousarray(rest.pop(f), np.int64)
            if len(v) and (int(v.min()) < 0 or int(v.max()) >= len(self.dicts[domain])):
                raise ValidationError(
                    f"append_ids of action type {type_name!r}: field {f!r} holds ids outside "
                    f"[0, {len(self.dicts[domain])}) of key domain {domain!r}; pass interned ids "
                    "(or raw keys to append)", action_type=type_name, field=f)
            ids[f] = v
        n = len(next(iter(ids.values()))) if ids else None
        checked = _exact_columns(at, rest, n) if rest and n is not None else None
        if checked is not None:
            m = n
        elif rest:  # the other fields are checked as append checks them (keys stand in as raw)
            stand_in = {f: _raw_keys(self.dicts[at.key_fields[f]], v) for f, v in ids.items()}
            checked, m = at.validate_columns({**rest, **stand_in}, self.limits)
        else:
            checked, m = {}, n or 0
        if n is not None and m != n:
            raise ValidationError(f"append_ids of action type {type_name!r}: columns have "
                                  f"different lengths ({n} key ids, {m} rows)", action_type=type_name)
        if m == 0:
            return {}
        cols = {f: (ids[f] if f in ids else checked[f]) for f in at.field_names}
        type_id = self.schema.type_id(type_name)
        shard_ids = self.route_ids(type_name, cols)
        with self._lock:
            self._flush_pending_locked()
            out, seq = self._write_routed(at, type_id, cols, m, shard_ids if self.shards > 1 else None)
        self._after_write(seq) if wait else self._committer_wake.set()
        self._wake_listeners()
        return out

    def route_ids(self, type_name: str, columns: Mapping[str, Any]) -> np.ndarray:
        """The shard of each row of a batch whose key fields are interned ids."""
        at = self.schema[type_name]
        p = at.partition
        v = columns[p]
        n = len(v)
        if self.shards == 1:
            return np.zeros(n, np.int64)
        if p in at.key_fields:
            return self.shard_of_ids(at.key_fields[p], np.asarray(v, np.int64))
        return self._route(at, columns, n)

    def shard_of_ids(self, domain: str, ids: np.ndarray) -> np.ndarray:
        """The shard of each interned key id of ``domain`` (its raw key's partition hash);
        ids the dictionary does not hold (e.g. -1) map to shard 0."""
        d = self.dicts[domain]
        ids = np.asarray(ids, np.int64)
        if self.shards == 1 or not len(d):
            return np.zeros(len(ids), np.int64)
        ok = (ids >= 0) & (ids < len(d))
        raw = _raw_keys(d, ids if ok.all() else np.where(ok, ids, 0))
        if isinstance(raw, VarColumn):
            owner = _keys.shard_of_strs((raw.offsets, raw.data), self.shards)
        else:
            owner = _keys.shard_of_ints(raw, self.shards)
        return np.where(ok, owner, 0).astype(np.int64, copy=False)

    def add_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` (cheap, non-blocking) after new frames are written."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def _wake_listeners(self) -> None:
        for fn in self._listeners:
            fn()

    def _write_routed(self, at: ActionType, type_id: int, cols: Mapping[str, Any], n: int,
                      shard_ids: np.ndarray | None) -> tuple[dict[int, range], int]:
        """Write rows (keys interned) to their shards; the caller holds the lock."""
        out: dict[int, range] = {}
        if shard_ids is None:
            parts = [(0, cols, n)]
        else:
            # stable sort of 16-bit shard ids is a radix sort in numpy: O(n), ~10x int64's
            order = np.argsort(shard_ids.astype(np.uint16, copy=False), kind="stable")
            bounds = np.searchsorted(shard_ids[order], np.arange(self.shards + 1))
            parts = []
            for s in range(self.shards):
                idx = order[bounds[s] : bounds[s + 1]]
                if len(idx):
                    parts.append((s, {f: take_rows(v, idx) for f, v in cols.items()}, len(idx)))
        self._make_room([(s, _frames_bytes(at, part, m, self.limits)) for s, part, m in parts])
        for s, part, m in parts:
            first = self._write_columns(s, at, type_id, part, m)
            out[s] = range(first, first + m)
            self._rowbuf.set_base(s, first + m)
        seq = self._written_seq
        return out, seq

    def _make_room(self, needs: list[tuple[int, int]]) -> None:
        """Roll every shard whose open segment cannot take its part, before writing any part,
        so a full disk fails the whole append (multi-shard appends are all-or-nothing as long as
        each shard's part fits in one segment)."""
        for s, nbytes in needs:
            sl = self.shard_logs[s]
            if nbytes > sl.segments[-1].room() and nbytes <= sl.segment_bytes - 4096:
                sl.roll()

    def _write_columns(self, shard: int, at: ActionType, type_id: int, cols: Mapping[str, Any], n: int) -> int:
        """Write rows of one type to one shard as frames; returns the first offset."""
        first = None
        for lo, hi in _frame_cuts(at, cols, n, self.limits):
            specs = [ColumnSpec(type_id, at.field_index(f), kind_of(at.fields[f]), _slice(v, lo, hi))
                     for f, v in cols.items()]
            off = self.shard_logs[shard].write_frame(specs, hi - lo, 1)
            self._written_seq += 1
            first = off if first is None else first
        assert first is not None
        return first

    def _intern_columns(self, at: ActionType, cols: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(cols)
        for f, domain in at.key_fields.items():
            v = cols[f]
            raw = (v.offsets, v.data) if isinstance(v, VarColumn) else v
            out[f] = self.dicts[domain].intern(raw)
        return out

    # -- writing: single actions -----------------------------------------------------------
    def dispatch(self, type_name: str, /, **fields: Any) -> int:
        """Append one action; returns its offset in its shard (see ``shard_of``).

        Validated before anything is written. With "sync"/"group" durability the call returns
        once the action is durable; with "none" it is buffered (see ``flush``).
        """
        self._check_writable()
        offset = self._buffer(type_name, fields)
        if self.durability == "none":
            if self._rowbuf.total >= self.limits.dispatch_buffer_actions:
                with self._lock:
                    self._flush_pending_locked()
            return offset
        self._make_durable()
        return offset

    def _buffer(self, type_name: str, fields: Mapping[str, Any]) -> int:
        """Validate one action and add it to its shard's buffer; returns its offset.

        Complete keyword arguments go through the native validator; anything else (defaults,
        missing or extra fields, types whose strings could outgrow a frame) through the schema.
        """
        fast = self._fast.get(type_name)
        if fast is None:
            at = self.schema[type_name]
            native = None if _row_may_outgrow_frame(at, self.limits) else self._native_dispatcher(type_name)
            fast = self._fast[type_name] = (native, at.field_names)
        d, names = fast
        if d is not None and len(fields) == len(names):
            try:
                values = [fields[f] for f in names]
            except KeyError:
                values = None
            if values is not None:
                with self._lock:
                    return d(*values)
        at = self.schema[type_name]
        row = at.validate_one(fields, self.limits)
        _check_row_bytes(at, row, 1, self.limits)
        with self._lock:
            return self._rowbuf.add_offset(self.schema.type_id(type_name), row)

    def dispatcher(self, type_name: str) -> Callable[..., int]:
        """A fast callable for one action type: ``d(*values)`` → offset, values in field order.

        Validation equals ``dispatch``'s (native for fixed-width values). With durability
        "none" it is the native buffer itself (~70 ns a call); calls from several threads are
        safe with each other, but do not mix it with ``append`` from another thread at the same
        moment (offsets are assigned outside the log's lock). With "sync"/"group" each call
        returns once durable, like ``dispatch``.
        """
        self._check_writable()
        d = self._native_dispatcher(type_name)
        self._rowbuf.on_full = self._on_full
        if self.durability == "none":
            return d

        def durable(*values: Any) -> int:
            with self._lock:
                off = d(*values)
            self._make_durable()
            return off

        return durable

    def _native_dispatcher(self, type_name: str) -> Any:
        at = self.schema[type_name]
        fallback = functools.partial(at.validate_row, limits=self.limits)
        d = self._rowbuf.dispatcher(self.schema.type_id(type_name), [None] * len(at.field_names),
                                    fallback, string_bytes_max=self.limits.string_bytes_max)
        return d

    def _on_full(self) -> None:
        with self._lock:
            self._flush_pending_locked()

    async def dispatch_async(self, type_name: str, /, **fields: Any) -> int:
        """Append one action; resolves once it is durable (all producers share fdatasyncs)."""
        if self._closed or self.readonly:
            self._check_writable()
        offset = self._buffer(type_name, fields)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._async_waiters.append((offset, fut))  # no await since the add: same commit group
        if not self._async_scheduled:
            self._async_scheduled = True
            loop.call_soon(lambda: asyncio.ensure_future(self._async_commit(loop)))
        await fut
        return offset

    async def _async_commit(self, loop: asyncio.AbstractEventLoop) -> None:
        """Commit groups while waiters arrive: write everything pending, one fdatasync, resolve."""
        try:
            while self._async_waiters:
                with self._lock:
                    waiters, self._async_waiters = self._async_waiters, []
                    self._flush_pending_locked()
                    seq = self._written_seq
                try:
                    await loop.run_in_executor(None, self._sync_to, seq)
                except BaseException as exc:  # every waiter learns the commit failed
                    for _, fut in waiters:
                        if not fut.done():
                            fut.set_exception(exc)
                    raise
                for _, fut in waiters:
                    if not fut.done():
                        fut.set_result(None)
        finally:
            self._async_scheduled = False

    @property
    def _pending_n(self) -> int:
        return self._rowbuf.total

    def _flush_pending_locked(self) -> None:
        """Cut every shard's dispatch buffer into one (mixed-type) frame each."""
        if not self._rowbuf.total:
            return
        for shard in range(self.shards):
            if self._rowbuf.count(shard):
                types, cols = self._rowbuf.take(shard)
                self._write_taken(shard, types, cols)
        for fn in self._listeners:
            fn()

    def _write_taken(self, shard: int, types: np.ndarray | None, by_type: dict[int, list]) -> None:
        specs: list[ColumnSpec] = []
        if types is not None:
            specs.append(ColumnSpec(0, TYPE_COLUMN_FIELD, KIND_TYPES, types))
        count = 0
        for t, columns in by_type.items():
            for i, kind, ft, dictionary in self._field_plan(t):
                v = columns[i]
                if dictionary is not None:
                    v = dictionary.intern(v if isinstance(v, list) else np.asarray(v, np.int64))
                elif ft.is_var:
                    v = VarColumn.from_values(v)
                else:
                    v = np.asarray(v, ft.dtype)
                specs.append(ColumnSpec(t, i, kind, v))
            count += len(columns[0])
        self.shard_logs[shard].write_frame(specs, count, len(by_type), owned=True)
        self._written_seq += 1

    def _field_plan(self, type_id: int) -> list[tuple[int, int, Any, Any]]:
        """Per field of a type: (index, frame kind, field type, key dictionary or None)."""
        plans = self._field_plans
        plan = plans.get(type_id)
        if plan is None:
            at = self.schema.type_by_id(type_id)
            plan = plans[type_id] = [
                (i, kind_of(at.fields[f]), at.fields[f],
                 self.dicts[at.fields[f].domain] if at.fields[f].is_key else None)
                for i, f in enumerate(at.field_names)]
        return plan

    # -- durability ------------------------------------------------------------------------
    def _after_write(self, seq: int, gather: bool = False) -> None:
        """Wait per the durability mode. ``gather``: let the committer batch more callers."""
        if self.durability == "sync" or (self.durability == "group" and not gather):
            self._sync_to(seq)
        elif self.durability == "group":
            self._committer_wake.set()
            with self._sync_cond:
                while self._synced_seq < seq and not self._closed:
                    self._sync_cond.wait(0.05)

    def _make_durable(self) -> None:
        if self.durability == "group":
            # leave single actions in the buffer: the committer cuts one frame for many callers
            with self._lock:
                seq = self._written_seq + (1 if self._rowbuf.total else 0)
            self._after_write(seq, gather=True)
            return
        with self._lock:
            self._flush_pending_locked()
            seq = self._written_seq
        self._after_write(seq)

    def _sync_to(self, seq: int) -> None:
        """Leader/follower: return once an fdatasync covering frame ``seq`` has completed."""
        with self._sync_cond:
            while self._synced_seq < seq:
                if self._syncing:
                    self._sync_cond.wait()
                    continue
                self._syncing = True
                self._sync_cond.release()
                try:
                    with self._lock:
                        self._flush_pending_locked()
                        target = self._written_seq
                    self._fdatasync_all()
                finally:
                    self._sync_cond.acquire()
                    self._syncing = False
                    self._sync_cond.notify_all()
                self._synced_seq = max(self._synced_seq, target)

    def _fdatasync_all(self) -> None:
        try:
            for d in self.dicts.values():
                d.sync()  # keys before the frames that use them
            for sl in self.shard_logs:
                sl.sync()
        except LogError as exc:
            # after a failed fdatasync Linux may have dropped the dirty pages it could not
            # write: a later "successful" sync would acknowledge writes behind a hole
            self._sync_failed = exc
            raise

    def _commit_loop(self) -> None:
        interval = self.limits.flush_interval_ms / 1000
        while not self._closed:
            self._committer_wake.wait(interval)
            self._committer_wake.clear()
            if self._closed:
                break
            if self.durability == "group":
                if self._rowbuf.total or self._synced_seq < self._written_seq:
                    time.sleep(interval / 4)  # gather more callers into this commit (bounded)
                    self._sync_to(self._written_seq + (1 if self._rowbuf.total else 0))
            elif self._pending_n:
                with self._lock:
                    self._flush_pending_locked()

    def flush(self) -> None:
        """Durability barrier: every action appended or dispatched before is on disk."""
        self._check_writable()
        with self._lock:
            self._flush_pending_locked()
            seq = self._written_seq
        self._sync_to(seq)
        if self.retention_bytes is not None or self.retention_age_s is not None:
            with self._lock:
                for sl in self.shard_logs:
                    sl.retire_before(self.retention_bytes, self.retention_age_s, clock.time_ns())

    def compact(self) -> "CompactionStats":
        """Rewrite sealed segments keeping the last action per key of last-write-wins types.

        Offsets are preserved (readers skip the gaps); the open segment is left alone.
        """
        from .compaction import CompactionStats, compact_shard

        self.flush()
        total = CompactionStats()
        with self._lock:
            for sl in self.shard_logs:
                st = compact_shard(sl, self.schema)
                total.segments_rewritten += st.segments_rewritten
                total.actions_dropped += st.actions_dropped
                total.bytes_before += st.bytes_before
                total.bytes_after += st.bytes_after
        return total

    def roll(self) -> None:
        """Seal every shard's open segment now (compaction and retention act on sealed ones)."""
        self._check_writable()
        with self._lock:
            self._flush_pending_locked()
            for sl in self.shard_logs:
                sl.roll()

    # -- reading ---------------------------------------------------------------------------
    def end_offset(self, shard: int = 0) -> int:
        """Offset the next action of ``shard`` gets (buffered dispatches not counted)."""
        return self.shard_logs[shard].end_offset

    def start_offset(self, shard: int = 0) -> int:
        return self.shard_logs[shard].start_offset

    def read(self, shard: int = 0, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        """Batches of exactly the actions [start, stop) of ``shard``, in order, CRC-checked."""
        self._check_open()
        if not 0 <= shard < self.shards:
            raise ValueError(f"shard must be in [0, {self.shards}), not {shard}")
        if self.readonly:
            self.refresh()
        return self.shard_logs[shard].read(start, stop)

    def refresh(self) -> None:
        """Read-only follower: see what the writer appended since (keys first, then frames)."""
        for d in self.dicts.values():
            d.refresh()
        for sl in self.shard_logs:
            sl.refresh()

    def follow(self, shard: int = 0, start: int = 0, poll_interval_s: float = 0.05,
               stop_event: threading.Event | None = None) -> Iterator[Batch]:
        """Tail ``shard`` from ``start`` forever (or until ``stop_event``), yielding new batches."""
        pos = start
        while stop_event is None or not stop_event.is_set():
            got = False
            for b in self.read(shard, pos):
                got = True
                pos = b.end_offset
                yield b
            if not got:
                time.sleep(poll_interval_s)

    # -- lifecycle -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the log is closed; open it again with engine.open(path)")

    def _check_writable(self) -> None:
        self._check_open()
        if self.readonly:
            raise ReadOnlyError("this log was opened read-only; writes go through the writer process")
        if self._sync_failed is not None:
            raise LogError("an earlier fdatasync failed, so writes since the last good sync may "
                           "be lost; close and reopen the log (recovery checks every frame) before "
                           "writing again", path=self.path) from self._sync_failed

    def close(self) -> None:
        """Flush (durably) and release everything. Further calls raise ``ClosedError``."""
        if self._closed:
            return
        if not self.readonly and self._sync_failed is None:  # after a failed sync: just release
            self.flush()
        self._closed = True
        self._committer_wake.set()
        if self._committer is not None:
            self._committer.join()
        self._release()

    def _release(self) -> None:
        for sl in self.shard_logs:
            sl.close()
        for d in self.dicts.values():
            d.close()
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None

    def __enter__(self) -> "Log":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("read-only" if self.readonly else self.durability)
        return f"Log({self.path!r}, shards={self.shards}, {state})"


# -- helpers ---------------------------------------------------------------------------------
def _exact_columns(at: ActionType, cols: Mapping[str, Any], n: int) -> dict[str, np.ndarray] | None:
    """Fixed-width columns that already are 1-D arrays of exactly the field dtype and length
    (nothing to convert or range-check); None when any is not, or a field is missing."""
    out = {}
    for f in at.field_names:
        if f in at.key_fields:
            continue
        v, ft = cols.get(f), at.fields[f]
        if (not isinstance(v, np.ndarray) or ft.is_var or v.ndim != 1 or v.dtype != ft.dtype
                or len(v) != n or ft.kind == "bool"):
            return None
        out[f] = np.ascontiguousarray(v)
    return out if len(out) == len(cols) else None


def _raw_keys(d: KeyDictionary, ids: np.ndarray) -> Any:
    """The raw keys of interned ids: int64 array (int domains) or a VarColumn (str domains)."""
    raw = d.key_of(ids)
    return VarColumn.from_values(raw) if d.kind == "str" else np.asarray(raw, np.int64)


def _slice(v: Any, lo: int, hi: int) -> Any:
    if isinstance(v, (VarColumn, Var)):
        offs = v.offsets[lo : hi + 1]
        base = int(offs[0])
        return Var((offs - base).astype(np.int32), v.data[base : int(offs[-1])])
    return v[lo:hi]


def _frame_cuts(at: ActionType, cols: Mapping[str, Any], n: int, limits: Limits) -> list[tuple[int, int]]:
    """Row ranges so that each frame stays under the frame byte and action limits."""
    fixed = sum(v.itemsize for v in cols.values() if not isinstance(v, VarColumn))
    budget = _frame_budget(at, limits)
    var = [v for v in cols.values() if isinstance(v, VarColumn)]
    step = limits.frame_actions_max
    if not var:
        step = max(1, min(step, budget // max(1, fixed)))
        return [(lo, min(n, lo + step)) for lo in range(0, n, step)]
    cost = np.full(n, fixed + 4 * len(var), np.int64)
    for v in var:
        cost += np.diff(v.offsets).astype(np.int64)
    total = np.cumsum(cost)
    cuts, lo = [], 0
    while lo < n:
        base = int(total[lo - 1]) if lo else 0
        hi = int(np.searchsorted(total, base + budget, side="right"))
        hi = max(lo + 1, min(hi, lo + step, n))
        if int(total[hi - 1]) - base > budget:
            raise LimitExceededError(f"one {at.name!r} action is larger than a frame "
                                     f"({limits.frame_bytes_max} bytes)", action_type=at.name)
        cuts.append((lo, hi))
        lo = hi
    return cuts


def _frame_budget(at: ActionType, limits: Limits) -> int:
    """Bytes of one frame left for one action type's values (descriptors and padding off)."""
    return limits.frame_bytes_max - 64 * (2 * len(at.fields) + 4)


def _row_may_outgrow_frame(at: ActionType, limits: Limits) -> bool:
    """Can one valid action (longest strings allowed) be larger than a frame?"""
    n_var = sum(1 for ft in at.fields.values() if ft.is_var and not ft.is_key)
    return 8 * len(at.fields) + (4 + limits.string_bytes_max) * n_var > _frame_budget(at, limits)


def _check_row_bytes(at: ActionType, cols: Any, n: int, limits: Limits) -> None:
    """Raise LimitExceededError if one action cannot fit in a frame (validated input)."""
    if not _row_may_outgrow_frame(at, limits):
        return  # the common case: no action can be too large
    budget = _frame_budget(at, limits)
    fixed = 8 * len(at.fields)
    if isinstance(cols, tuple):  # one validated row
        sizes = {f: len(v.encode() if isinstance(v, str) else v)
                 for f, v in zip(at.field_names, cols) if at.fields[f].is_var and not at.fields[f].is_key}
        total = fixed + sum(4 + x for x in sizes.values())
        worst = max(sizes, key=sizes.get) if sizes else None
        if total > budget:
            raise LimitExceededError(
                f"one {at.name!r} action needs {total} bytes, more than a frame holds ({budget}); "
                f"shorten field {worst!r} or raise Limits.frame_bytes_max/segment_bytes",
                action_type=at.name, field=worst)
        return
    cost = np.full(n, fixed, np.int64)
    worst, worst_len = None, -1
    for f, v in cols.items():
        ft = at.fields[f]
        if ft.is_var and not ft.is_key:
            lens = np.diff(v.offsets).astype(np.int64)
            cost += 4 + lens
            if len(lens) and lens.max() > worst_len:
                worst, worst_len = f, int(lens.max())
    if n and cost.max() > budget:
        row = int(cost.argmax())
        raise LimitExceededError(
            f"{at.name!r} action at row {row} needs {int(cost[row])} bytes, more than a frame "
            f"holds ({budget}); shorten field {worst!r} or raise Limits.frame_bytes_max/segment_bytes",
            action_type=at.name, field=worst)


def _frames_bytes(at: ActionType, cols: Mapping[str, Any], n: int, limits: Limits) -> int:
    """An upper bound of the bytes the frames of this part take."""
    total = 0
    for lo, hi in _frame_cuts(at, cols, n, limits):
        fixed = sum(v.itemsize for v in cols.values() if not isinstance(v, VarColumn)) * (hi - lo)
        var = sum(int(v.offsets[hi] - v.offsets[lo]) + 4 * (hi - lo + 1) + 64
                  for v in cols.values() if isinstance(v, VarColumn))
        total += 64 * (2 * len(cols) + 2) + fixed + var
    return total


def _row_spec(schema: Schema, at: ActionType) -> tuple[int, list[str], int]:
    """The dispatch buffer's description of one action type."""
    kinds = [("key_int" if ft.key_kind is int else "key_str") if ft.is_key else ft.kind
             for ft in at.fields.values()]
    return schema.type_id(at.name), kinds, at.field_index(at.partition)


__all__ = ["Log", "Durability"]
