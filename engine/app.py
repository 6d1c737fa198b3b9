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
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .fsutil import fsync_dir
from .errors import EngineError, SchemaError
from .log import Log
from .state import ShardState, write_json_atomic
from .store import Store, StoreFailedError, StoreState

MANIFEST = "MANIFEST.json"


class App:
    """Stores over a log. ``App(log, [store, ...])`` recovers each store from its checkpoint."""

    def __init__(self, log: Log, stores: Iterable[Store] = (), *,
                 checkpoint_every_actions: int | None = 5_000_000,
                 checkpoint_every_s: float | None = 60.0):
        self.log = log
        self.stores: dict[str, Store] = {}
        self.checkpoint_every_actions = checkpoint_every_actions
        self.checkpoint_every_s = checkpoint_every_s
        self._since_ckpt = 0
        self._last_ckpt = time.monotonic()
        self._pool = ThreadPoolExecutor(max_workers=log.shards, thread_name_prefix="engine-fold") \
            if log.shards > 1 else None
        for s in stores:
            self.register(s)

    # -- registration and recovery ---------------------------------------------------------
    def store_dir(self, store: Store) -> str:
        return os.path.join(self.log.path, "stores", store.name, f"v{store.version}")

    def register(self, store: Store) -> Store:
        """Add a store; it is recovered from its checkpoint (or starts empty) and bound."""
        if store.name in self.stores:
            raise SchemaError(f"a store named {store.name!r} is already registered")
        store.bind(self.log.schema, self.log.shards)
        store.log = self.log
        self._recover(store)
        self.stores[store.name] = store
        return store

    def _recover(self, store: Store) -> None:
        d = self.store_dir(store)
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
        """Fold every shard up to its current end into every store; returns actions folded."""
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
        if not live:
            return 0
        start = min(s.shards[shard].offset for s in live)
        end = self.log.end_offset(shard)
        dicts = {s.domain: self.log.dicts[s.domain] for s in live}
        n = 0
        for batch in self.log.shard_logs[shard].read(start, end):
            for store in live:
                store.apply(shard, batch, len(dicts[store.domain]))
            n += batch.end_offset - batch.first_offset
            if progress is not None:
                progress(batch.end_offset - batch.first_offset)
        return n

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
                and time.monotonic() - self._last_ckpt >= self.checkpoint_every_s)

    # -- checkpoints -----------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Write every running store's state, then its manifest (atomically)."""
        for store in self.stores.values():
            if store.status is StoreState.RUNNING:
                self._checkpoint_store(store)
        self._since_ckpt = 0
        self._last_ckpt = time.monotonic()

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
        """Fold what is left, checkpoint, and close the stores (not the log)."""
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
        return {n: {"state": s.status.value, "offsets": [st.offset for st in s.shards],
                    "error": None if s.error is None else repr(s.error), "failed_at": s.failed_at}
                for n, s in self.stores.items()}

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
