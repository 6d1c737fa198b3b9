"""The runtime: a log plus stores. Folds each shard's log into every store, checkpoints, queries.

Design note. ``App.fold()`` tails every shard in its own thread (the kernels release the GIL,
so shards fold in parallel) and applies each batch to every store interested in its action
types, under that store-shard's lock, so a reader never sees a half-applied batch. Checkpoints
(periodic by actions and by time, and on close) write a new state generation per store and
then atomically replace its manifest; restart maps the checkpoint and folds only the tail.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from . import clock
from .fsutil import fsync_dir
from .errors import EngineError, SchemaError
from .log import Log
from .state import ShardState, write_json_atomic
from .derive import CycleError, Derivation, Graph, StoreView
from .store import Store, StoreState
from .subscribe import Hub, Subscription, SubscriptionError

MANIFEST = "MANIFEST.json"


class Receipt(dict):
    """Where dispatched actions landed: ``{shard: offset of the last one}``. Pass it to
    :meth:`App.wait` to read your own writes."""

    def __repr__(self) -> str:
        return f"Receipt({dict.__repr__(self)})"


class App:
    """Stores over a log. ``App(log, [store, ...])`` recovers each store from its checkpoint."""

    def __init__(self, log: Log, stores: Iterable[Store] = (), derivations: Iterable[Derivation] = (), *,
                 checkpoint_every_actions: int | None = 5_000_000,
                 checkpoint_every_s: float | None = 60.0):
        self.log = log
        self.stores: dict[str, Store] = {}
        self.derivations: dict[str, Derivation] = {}
        self.hub = Hub(self)
        self._fold_lock = threading.RLock()  # one fold (round) at a time; rebuild switches take it
        self._progress = threading.Condition()  # notified after every applied batch
        self._wake = threading.Event()
        self._read_to = [-1] * log.shards  # per shard, the log end the last fold round read to
        self._runner: threading.Thread | None = None
        self._stopping = False
        self.rebuilds: dict[str, Any] = {}
        self.checkpoint_every_actions = checkpoint_every_actions
        self.checkpoint_every_s = checkpoint_every_s
        self._since_ckpt = 0
        self._last_ckpt = clock.monotonic()
        self._pool = ThreadPoolExecutor(max_workers=log.shards, thread_name_prefix="engine-fold") \
            if log.shards > 1 else None
        for s in stores:
            self.register(s)
        for d in derivations:
            self.register(d)

    # -- registration and recovery ---------------------------------------------------------
    def store_dir(self, store: Store) -> str:
        return os.path.join(self.log.path, "stores", store.name, f"v{store.version}")

    def register(self, item: Any) -> Any:
        """Add a store or a derivation; it is recovered from its checkpoint (or starts empty).

        Raises CycleError when the stores and derivations would no longer form a DAG."""
        if isinstance(item, Derivation):
            return self._register_derivation(item)
        store = item
        if store.name in self.stores:
            raise SchemaError(f"a store named {store.name!r} is already registered")
        self._check_acyclic({**self.stores, store.name: store}, self.derivations)
        store.bind(self.log.schema, self.log.shards)
        store.log = self.log
        self._recover(store)
        self.stores[store.name] = store
        return store

    def _register_derivation(self, d: Derivation) -> Derivation:
        if d.name in self.derivations:
            raise SchemaError(f"a derivation named {d.name!r} is already registered")
        for other in self.derivations.values():
            if other.emits == d.emits:
                raise SchemaError(f"action type {d.emits!r} is already emitted by derivation "
                                  f"{other.name!r}; each derived type has one derivation")
        for r in d.reads:
            if r not in self.stores:
                raise SchemaError(f"derivation {d.name!r} reads store {r!r}, which is not "
                                  f"registered (register stores first); stores: {sorted(self.stores)}")
        if self.log.readonly:
            raise SchemaError("derivations append to the log: open it writable")
        self._check_acyclic(self.stores, {**self.derivations, d.name: d})
        d.bind(self.log)
        d.recover(self.log)
        self.derivations[d.name] = d
        return d

    @staticmethod
    def _check_acyclic(stores: Mapping[str, Store], derivations: Mapping[str, Derivation]) -> None:
        cycle = Graph.of(stores, derivations).find_cycle()
        if cycle:
            raise CycleError("stores and derivations must form a DAG; this makes a cycle: "
                             + " -> ".join(cycle))

    def _recover(self, store: Store) -> None:
        d = self.store_dir(store)
        from .rebuild import finish_switch

        finish_switch(os.path.dirname(d), store.version)  # a switch a crash interrupted
        man_path = os.path.join(d, MANIFEST)
        if os.path.exists(man_path):
            import json

            with open(man_path) as f:
                man = json.load(f)
            if man.get("definition") == store.definition_hash() and len(man["shards"]) == self.log.shards:
                gen_dir = os.path.join(d, man["generation"])
                store.shards = [ShardState.read(store.columns, os.path.join(gen_dir, f"shard-{s}"), m)
                                for s, m in enumerate(man["shards"])]
                store.checkpoint_generation = man["generation"]
            else:
                shutil.rmtree(d)  # the definition changed under the same version: rebuild
        store.checkpoint_generation = getattr(store, "checkpoint_generation", None)
        if os.path.exists(os.path.join(d, "FAILED.json")):
            os.unlink(os.path.join(d, "FAILED.json"))  # a restart retries from the checkpoint
        if os.path.isdir(d):  # generations a crash left behind, never referenced
            for name in os.listdir(d):
                if name.startswith("gen-") and name != store.checkpoint_generation:
                    shutil.rmtree(os.path.join(d, name), ignore_errors=True)
        store.transition(StoreState.RUNNING)

    def __getitem__(self, name: str) -> Store:
        try:
            return self.stores[name]
        except KeyError:
            raise KeyError(f"no store {name!r}; registered: {sorted(self.stores)}") from None

    # -- folding ---------------------------------------------------------------------------
    def fold(self, progress: Callable[[int], None] | None = None) -> int:
        """Fold every shard up to its current end into every store and derivation (one round:
        actions derived now are folded by the next); returns actions read."""
        with self._fold_lock:
            return self._fold(progress)

    def _fold(self, progress: Callable[[int], None] | None) -> int:
        if self.log.readonly:
            self.log.refresh()
        elif self.log._pending_n:
            with self.log._lock:
                self.log._flush_pending_locked()
        shards = range(self.log.shards)
        if self._pool is None:
            n = sum(self._fold_shard(s, progress) for s in shards)
        else:
            n = sum(self._pool.map(lambda s: self._fold_shard(s, progress), shards))
        self._since_ckpt += n
        for store in self.stores.values():
            if store.status is StoreState.FAILED and not getattr(store, "_failure_recorded", False):
                self._record_failure(store)
        if self._checkpoint_due():
            self.checkpoint()
        return n

    def _fold_shard(self, shard: int, progress: Callable[[int], None] | None) -> int:
        live = [s for s in self.stores.values() if s.status is StoreState.RUNNING]
        derivs = [d for d in self.derivations.values() if d.error is None]
        if not live and not derivs:
            return 0
        start = min([s.shards[shard].offset for s in live] + [d.offsets[shard] for d in derivs])
        end = self._read_to[shard] = self.log.end_offset(shard)
        if start >= end:
            return 0
        dicts = self.log.dicts
        views = {name: StoreView(st) for name, st in self.stores.items()} if derivs else {}
        hub = self.hub
        n = 0
        for batch in self.log.shard_logs[shard].read(start, end):
            for store in live:
                done = store.apply(shard, batch, len(dicts[store.domain]))
                if done is not None and store.name in hub.active:
                    hub.after_batch(store, shard, done)
            for d in derivs:
                d.run(self.log, shard, batch, views)
            n += batch.end_offset - batch.first_offset
            with self._progress:
                self._progress.notify_all()
            if progress is not None:
                progress(batch.end_offset - batch.first_offset)
        return n

    def settle(self, timeout: float | None = None) -> int:
        """Fold until quiescent: every store and derivation has caught up with the log,
        derived actions included. Returns actions read."""
        deadline = None if timeout is None else time.monotonic() + timeout
        total = 0
        with self._fold_lock:
            while True:
                n = self._fold(None)
                total += n
                if n == 0 and not self.log._pending_n:
                    return total
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"settle: still folding after {timeout} s")

    # -- writing with receipts and reading your own writes --------------------------------
    def dispatch(self, type_name: str, /, **fields: Any) -> Receipt:
        """``log.dispatch`` that returns a :class:`Receipt` and wakes the runtime."""
        off = self.log.dispatch(type_name, **fields)
        self._wake.set()
        return Receipt({self._shard_of_action(type_name, fields): off})

    def _shard_of_action(self, type_name: str, fields: Mapping[str, Any]) -> int:
        if self.log.shards == 1:
            return 0
        return self.log.shard_of(type_name, fields[self.log.schema[type_name].partition])

    def dispatch_sync(self, type_name: str, /, **fields: Any) -> Receipt:
        """Flux's synchronous dispatch: append the action, then fold its shard in this thread
        before returning (stores updated, inline subscribers called, derivations run), so the
        caller reads its own write with no wait — the lowest-latency path."""
        off = self.log.dispatch(type_name, **fields)
        shard = self._shard_of_action(type_name, fields)
        with self._fold_lock:
            with self.log._lock:
                self.log._flush_pending_locked()
            self._fold_shard(shard, None)
        return Receipt({shard: off})

    def append(self, type_name: str, columns: Any) -> Receipt:
        """``log.append`` that returns a :class:`Receipt` and wakes the runtime."""
        out = self.log.append(type_name, columns)
        self._wake.set()
        return Receipt({s: r.stop - 1 for s, r in out.items()})

    def applied(self, receipt: Mapping[int, int], store: str | None = None) -> bool:
        """Have ``store`` and the derivations feeding it (default: every store and derivation)
        passed the receipt's offsets?"""
        consumers = self._consumers(store)
        return all(c.shards[s].offset > off if isinstance(c, Store) else c.offsets[s] > off
                   for s, off in receipt.items() for c in consumers)

    def _consumers(self, store: str | None) -> list[Any]:
        if store is not None:
            st = self[store]
            if st.status is StoreState.FAILED:
                st._check_readable()
            return [st, *self._upstream(store)]
        return ([s for s in self.stores.values() if s.status is StoreState.RUNNING]
                + [d for d in self.derivations.values() if d.error is None])

    def _upstream(self, store: str) -> list[Derivation]:
        """The derivations whose output reaches ``store`` (directly or through others)."""
        types = set(self[store].reducers)
        out: list[Derivation] = []
        while types:
            t = types.pop()
            for d in self.derivations.values():
                if d.emits == t and d not in out and d.error is None:
                    out.append(d)
                    types.add(d.source)
        return out

    def wait(self, receipt: Mapping[int, int], store: str | None = None,
             timeout: float | None = None) -> None:
        """Block until ``store`` has applied the receipt's actions and whatever derivations
        made of them for it (a post's feed items, for a feeds store) — or, with no store,
        until the whole DAG has: every store and derivation, and everything derived.

        With the runtime started (:meth:`start`) this waits for it; otherwise it folds here.
        Raises TimeoutError after ``timeout`` seconds, StoreFailedError if the store failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = [dict(receipt)]
        while pending:
            rec = pending.pop()
            while not self.applied(rec, store):
                if self._runner is None:
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"wait: {rec} not applied after {timeout} s")
                    if not self.fold() and not self.applied(rec, store):
                        beyond = {s: o for s, o in rec.items() if o >= self.log.end_offset(s)}
                        if beyond:
                            raise ValueError(f"wait: receipt {beyond} is past the log's end "
                                             f"({[self.log.end_offset(s) for s in beyond]}): not "
                                             "a receipt of this log")
                    continue
                if not self._runner.is_alive():
                    raise EngineError(f"wait: the runtime thread stopped with "
                                      f"{getattr(self, 'runtime_error', None)!r}; see app.status()")
                self._wake.set()
                with self._progress:
                    if self.applied(rec, store):
                        break
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"wait: {rec} not applied after {timeout} s")
                    self._progress.wait(0.05 if left is None else min(left, 0.05))
            derivs = self.derivations.values() if store is None else self._upstream(store)
            for d in derivs:  # then what was derived from them
                for s, off in rec.items():
                    ends = d.targets_after(s, off, self.log)
                    derived = {t: e - 1 for t, e in enumerate(ends) if e > 0}
                    if derived and not self.applied(derived, store):
                        pending.append(derived)

    # -- the live runtime -------------------------------------------------------------------
    def start(self) -> "App":
        """Fold continuously in a background thread, woken by every write to the log."""
        if self._runner is not None:
            return self
        if self.log.readonly:
            raise SchemaError("the live runtime needs a writable log (readonly: call fold())")
        self._stopping = False
        self.log.add_listener(self._wake.set)
        self._runner = threading.Thread(target=self._run, name="engine-runtime", daemon=True)
        self._runner.start()
        return self

    def _run(self) -> None:
        interval = self.log.limits.flush_interval_ms / 1000
        while not self._stopping:
            self._wake.wait(interval)
            self._wake.clear()
            if self._stopping or self.log._closed:
                break
            try:
                with self._fold_lock:
                    while self._fold(None) and self._log_moved():
                        pass
            except Exception as exc:  # noqa: BLE001 - kept for status(); the loop stops
                self.runtime_error = exc
                break

    def _log_moved(self) -> bool:
        """Did anything reach the log since the last fold round read it (so another round
        has work)? Cheaper than a round finding nothing, which held the GIL ~5 µs longer
        while a caller woken by this round's notifications waited for it."""
        return bool(self.log._pending_n) or any(
            self.log.end_offset(s) != end for s, end in enumerate(self._read_to))

    def stop(self) -> None:
        """Stop the background runtime (after its current round)."""
        if self._runner is None:
            return
        self._stopping = True
        self._wake.set()
        self._runner.join()
        self._runner = None
        self.log.remove_listener(self._wake.set)

    # -- subscriptions ----------------------------------------------------------------------
    def subscribe(self, store: str, *, key: Any = None, keys: Any = None, column: str | None = None,
                  top: int | None = None, query: Callable[[Store], Any] | None = None,
                  callback: Callable[[Any], Any] | None = None, maxsize: int = 64,
                  deliver: str = "thread", every_s: float = 0.0) -> Subscription:
        """Be told when an answer of ``store`` changes.

        One of: ``key=k, column=c`` (a :class:`Change` per change), ``keys=[...], column=c``
        (:class:`Changes`, arrays, batched per fold batch), ``top=k, column=c`` (the top-k as
        [(key, value)]), or ``query=fn`` (``fn(store)``'s answer). Notifications go to
        ``callback`` (on the subscription's own thread, or ``deliver="inline"`` in the folding
        thread), or iterate the subscription (``for`` / ``async for`` / ``next``). At most
        ``maxsize`` notifications wait; beyond that they are conflated to the latest answers.
        ``every_s`` throttles top-k and query answers: evaluated at most that often.
        """
        st = self[store]
        st._check_readable()
        given = [x is not None for x in (key, keys, top, query)]
        if sum(given) != 1:
            raise SubscriptionError("subscribe to exactly one of key=, keys=, top= or query=")
        if key is not None or keys is not None:
            if column is None:
                scalars = [c for c in st.user_columns if c in st._ops]
                if len(scalars) != 1:
                    raise SubscriptionError(f"store {store!r} has columns {sorted(st.user_columns)}: "
                                            "name one with column=")
                column = scalars[0]
            raw = [key] if key is not None else list(keys)
            ids = self._intern_for_watch(st, raw)
            sub = Subscription(self.hub, store, "keys", column=column, ids=ids,
                               single=key, callback=callback, maxsize=maxsize, deliver=deliver)
            self.hub.add_keys(sub, st)
        else:
            if top is not None:
                if column is None:
                    raise SubscriptionError("top= needs column=")
                k, col = int(top), column
                query = lambda s: s.top_k(col, k)  # noqa: E731
                kind = f"top{k}:{col}"
            else:
                kind = "query"
            sub = Subscription(self.hub, store, kind, query=query, callback=callback,
                               maxsize=maxsize, deliver=deliver, every_s=every_s)
            self.hub.add_query(sub, st)
        sub._start()
        return sub

    def _intern_for_watch(self, st: Store, raw: list[Any]) -> np.ndarray:
        d = self.log.dicts[st.domain]
        if self.log.readonly:
            ids = st.key_ids(raw)
            if (ids < 0).any():
                raise SubscriptionError(f"keys never seen in a read-only log: {np.asarray(raw)[ids < 0][:5]}")
            return ids
        with self.log._lock:  # a key not seen yet gets its id now: it is watched from the start
            ids = d.intern(list(raw)) if d.kind == "str" else d.intern(np.asarray(raw, np.int64))
        return np.asarray(ids, np.int64)

    def rebuild(self, store: Store, *, compare: bool = True, switch: bool = True,
                progress: bool = False, checkpoint_every_actions: int = 5_000_000) -> Any:
        """Blue/green: fold ``store`` (same name, new version) from the log in the background
        while the serving version answers; then switch atomically. See :class:`Rebuild`."""
        from .rebuild import Rebuild

        r = Rebuild(self, store, compare=compare, switch=switch, progress=progress,
                    checkpoint_every_actions=checkpoint_every_actions)
        self.rebuilds[store.name] = r
        r.start()
        return r

    def _record_failure(self, store: Store) -> None:
        """Make a FAILED store visible to other processes (``python -m engine inspect``)."""
        d = self.store_dir(store)
        os.makedirs(d, exist_ok=True)
        write_json_atomic(os.path.join(d, "FAILED.json"), {
            "store": store.name, "version": store.version, "error": repr(store.error),
            "shard": store.failed_at[0] if store.failed_at else None,
            "offset": store.failed_at[1] if store.failed_at else None})
        store._failure_recorded = True

    def as_of(self, store: str, offsets: int | Sequence[int]) -> Store:
        """A temporary copy of ``store`` folded up to ``offsets`` (one int per shard, or one
        int for a one-shard log): its checkpoint if that is not past them, plus replay."""
        src = self[store]
        target = [offsets] * self.log.shards if isinstance(offsets, int) else list(offsets)
        tmp = Store(src.name, src.domain, src.user_columns, src.reducers, version=src.version,
                    key_fields=src.key_fields, layout=src.layout)
        tmp.bind(self.log.schema, self.log.shards)
        tmp.log = self.log
        man = os.path.join(self.store_dir(src), MANIFEST)
        if os.path.exists(man):
            import json

            with open(man) as f:
                m = json.load(f)
            if (m["definition"] == tmp.definition_hash()
                    and all(o <= t for o, t in zip(m["offsets"], target))):
                gen = os.path.join(self.store_dir(src), m["generation"])
                tmp.shards = [ShardState.read(tmp.columns, os.path.join(gen, f"shard-{s}"), sm)
                              for s, sm in enumerate(m["shards"])]
        tmp.transition(StoreState.RUNNING)
        for s in range(self.log.shards):
            d = self.log.dicts[tmp.domain]
            for batch in self.log.shard_logs[s].read(tmp.shards[s].offset, target[s]):
                tmp.apply(s, batch, len(d))
        return tmp

    def _checkpoint_due(self) -> bool:
        if self.checkpoint_every_actions is not None and self._since_ckpt >= self.checkpoint_every_actions:
            return True
        return (self.checkpoint_every_s is not None and self._since_ckpt > 0
                and clock.monotonic() - self._last_ckpt >= self.checkpoint_every_s)

    # -- checkpoints -----------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Write every running store's state, then its manifest (atomically), and every
        derivation's cursors (after making the log durable: what they derived is on disk)."""
        with self._fold_lock:
            for store in self.stores.values():
                if store.status is StoreState.RUNNING:
                    self._checkpoint_store(store)
            if self.derivations and not self.log.readonly:
                self.log.flush()
                for d in self.derivations.values():
                    d.save(self.log)
        self._since_ckpt = 0
        self._last_ckpt = clock.monotonic()

    def _checkpoint_store(self, store: Store) -> None:
        d = self.store_dir(store)
        os.makedirs(d, exist_ok=True)
        prev = store.checkpoint_generation
        n = 1 + max([int(x[4:]) for x in os.listdir(d) if x.startswith("gen-")] or [0])
        gen = f"gen-{n:06d}"
        metas = []
        for s, st in enumerate(store.shards):
            with store.locks[s]:  # a consistent cut: whole batches only
                metas.append(st.write(os.path.join(d, gen, f"shard-{s}")))
        _fsync_tree(os.path.join(d, gen))
        write_json_atomic(os.path.join(d, MANIFEST), {
            "store": store.name, "version": store.version, "definition": store.definition_hash(),
            "log_schema": self.log.schema.schema_hash(), "generation": gen, "shards": metas,
            "offsets": [m["offset"] for m in metas]})
        store.checkpoint_generation = gen
        if prev is not None:
            shutil.rmtree(os.path.join(d, prev), ignore_errors=True)

    def close(self) -> None:
        """Stop the runtime and rebuilds, fold what is left, checkpoint, and close the stores
        and subscriptions (not the log)."""
        self.stop()
        for r in list(self.rebuilds.values()):
            r.cancel()
        for sub in self.hub.all():
            sub.close()
        if not self.log._closed:
            self.fold()
            self.checkpoint()
        for s in self.stores.values():
            if s.status is not StoreState.CLOSED:
                s.transition(StoreState.CLOSED)
        if self._pool is not None:
            self._pool.shutdown()

    def status(self) -> dict[str, dict[str, Any]]:
        """Per store: state, offsets per shard, and the error and offset if FAILED."""
        out: dict[str, dict[str, Any]] = {
            n: {"kind": "store", "version": s.version, "state": s.status.value,
                "offsets": [st.offset for st in s.shards],
                "error": None if s.error is None else repr(s.error), "failed_at": s.failed_at}
            for n, s in self.stores.items()}
        if getattr(self, "runtime_error", None) is not None:
            out["runtime"] = {"kind": "runtime", "state": "failed", "error": repr(self.runtime_error)}
        for n, d in self.derivations.items():
            out[n] = {"kind": "derivation", "state": "failed" if d.error else "running",
                      "offsets": list(d.offsets), "emitted": d.emitted,
                      "error": None if d.error is None else repr(d.error), "failed_at": d.failed_at}
        return out

    def __enter__(self) -> "App":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fsync_tree(path: str) -> None:
    """Make a new checkpoint generation's directory entries durable (files are fsync'd)."""
    for root, _dirs, _files in os.walk(path):
        fsync_dir(root)
    fsync_dir(os.path.dirname(path))


def replay(path: str, stores: Iterable[Store], *, progress: bool = True,
           fresh: bool = True) -> App:
    """Rebuild ``stores`` from the log at ``path`` at full speed, shards in parallel.

    The log is opened read-only (a writer may keep appending). With ``fresh`` the stores'
    checkpoints are discarded first, so everything is folded from offset 0. Shows a progress
    bar with actions/s and ETA; returns the App (checkpointed), whose log the caller closes.
    """
    log = Log(path, readonly=True)
    stores = list(stores)
    if fresh:
        for s in stores:
            shutil.rmtree(os.path.join(log.path, "stores", s.name, f"v{s.version}"), ignore_errors=True)
    app = App(log, stores, checkpoint_every_actions=None, checkpoint_every_s=None)
    total = sum(log.end_offset(s) - min(st.shards[s].offset for st in stores)
                for s in range(log.shards)) if stores else 0
    if progress:
        from .progress import progress_bar, ticker

        with progress_bar() as prog:
            app.fold(progress=ticker(prog, "replay", total))
    else:
        app.fold()
    app.checkpoint()
    return app


def load_stores(spec: str) -> list[Store]:
    """``"module:attr"`` → stores: attr is a list of stores or a callable returning one."""
    import importlib

    mod_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"--stores wants module:attr, got {spec!r}")
    obj = getattr(importlib.import_module(mod_name), attr)
    obj = obj() if callable(obj) else obj
    out = list(obj)
    if not all(isinstance(s, Store) for s in out):
        raise TypeError(f"{spec} must give engine.Store objects")
    return out
