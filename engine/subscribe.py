"""Subscriptions: be told when the answer to a question changes.

Design note. Two kinds of question, two mechanisms:

* **Keys** (one key or many, one scalar column): change detection runs in the folding thread,
  right after a batch is applied, in native code (``_kernels.watch_diff``): for every key the
  batch touched that somebody watches, compare the store's value with a *shadow* (the last
  value subscribers were told) and emit (key id, old, new) where they differ, updating the
  shadow inline. Cost is one pass over the batch's key ids; keys nobody watches cost one bit
  test. When the store is not co-partitioned with its action types (a key's answer combines
  several shards), the watched keys a batch touched are re-read combined, under all shard
  locks, and compared with one shared shadow.
* **Queries** (a top-k, or any function of the store): the folding thread only marks the
  subscription dirty; the answer is evaluated where it is consumed (its delivery thread, the
  iterator's caller, or inline), compared with the last answer told, and delivered if it
  differs. A slow consumer therefore never costs the engine more than a flag.

Every subscription has a bounded queue. When it is full, the pending notifications are
conflated into one: per key the oldest ``old`` and the newest ``new`` (dropped if they are
equal again), so a slow subscriber gets the latest answers and never stalls the fold. A
subscriber whose callback raises is stopped, its error kept (``sub.error``) and logged; other
subscribers and the engine go on.

Offsets: a change carries the shard and the offset of the last action of the batch after which
it was seen: the new answer reflects that shard's actions up to and including ``offset``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from ._impl import load
from .errors import EngineError
from .reducers import MultiMapColumn, Ring, TopK

_k = load("kernels")
log = logging.getLogger("engine.subscribe")

__all__ = ["Change", "Changes", "Subscription", "SubscriptionError"]


class SubscriptionError(EngineError):
    """A subscription was used wrongly (unknown column, closed, ...)."""


@dataclass(frozen=True)
class Change:
    """One answer changed: ``old`` → ``new`` after ``offset`` of ``shard``."""

    key: Any
    old: Any
    new: Any
    shard: int
    offset: int


@dataclass
class Changes:
    """Many keys' answers changed (arrays, one entry per key, each key once).

    ``ids`` are interned key ids, ``keys`` the raw keys (computed on first use), ``old`` and
    ``new`` the answers, ``shards`` and ``offsets`` where each change was seen (-1 and -1:
    a blue/green switch to a new version of the store changed the answer).
    """

    store: str
    column: str
    ids: np.ndarray
    old: np.ndarray
    new: np.ndarray
    shard: np.ndarray | int  # one int when every change was seen after the same batch
    offset: np.ndarray | int
    _key_of: Callable[[np.ndarray], Any] | None = field(default=None, repr=False)
    _keys: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def shards(self) -> np.ndarray:
        """The shard of each change (read-only array)."""
        return np.broadcast_to(np.asarray(self.shard, np.int64), self.ids.shape)

    @property
    def offsets(self) -> np.ndarray:
        """The offset of each change (read-only array)."""
        return np.broadcast_to(np.asarray(self.offset, np.int64), self.ids.shape)

    @property
    def keys(self) -> Any:
        if self._keys is None:
            self._keys = self._key_of(self.ids) if self._key_of is not None else self.ids
        return self._keys

    def __iter__(self) -> Iterator[Change]:
        keys = self.keys
        for i in range(len(self.ids)):
            k = keys[i]
            yield Change(k.item() if hasattr(k, "item") else k, self.old[i].item(),
                         self.new[i].item(), int(self.shards[i]), int(self.offsets[i]))

    def as_dict(self) -> dict[Any, tuple[Any, Any]]:
        """``{key: (old, new)}``."""
        return {c.key: (c.old, c.new) for c in self}


def conflate(items: list[Changes]) -> Changes | None:
    """Merge pending notifications of one key subscription: per key the first ``old`` and the
    last ``new``; keys whose answer came back to what the subscriber last saw are dropped."""
    first = items[0]
    ids = np.concatenate([c.ids for c in items])
    old = np.concatenate([c.old for c in items])
    new = np.concatenate([c.new for c in items])
    shards = np.concatenate([c.shards for c in items])
    offs = np.concatenate([c.offsets for c in items])
    _, first_idx = np.unique(ids, return_index=True)
    _, last_rev = np.unique(ids[::-1], return_index=True)
    last_idx = len(ids) - 1 - last_rev
    o, n = old[first_idx], new[last_idx]
    keep = ~_same_values(o, n)
    if not keep.any():
        return None
    order = np.argsort(last_idx[keep], kind="stable")  # in the order they last changed
    pick = last_idx[keep][order]
    return Changes(first.store, first.column, ids[pick], o[keep][order], new[pick],
                   np.ascontiguousarray(shards[pick]), np.ascontiguousarray(offs[pick]), first._key_of)


def _same_values(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    eq = a == b
    if a.dtype.kind == "f":
        eq |= np.isnan(a) & np.isnan(b)
    return eq


def same_answer(a: Any, b: Any) -> bool:
    """Equality for answers: numpy arrays, dicts and sequences of them, NaN equal to NaN."""
    if a is b:
        return True
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a_, b_ = np.asarray(a), np.asarray(b)
        return a_.shape == b_.shape and bool(np.all(_same_values(a_, b_)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_answer(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_answer(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable answers are different answers
        return False


class Subscription:
    """A question about one store and how its changes reach the subscriber.

    Made by :meth:`engine.App.subscribe`. With a callback, notifications are delivered on the
    subscription's own thread (``deliver="thread"``, the default) or in the folding thread right
    after the batch (``deliver="inline"``: lowest latency, the callback must be fast). Without a
    callback, iterate: ``for ch in sub`` / ``async for ch in sub`` / ``sub.next(timeout)``.
    """

    def __init__(self, hub: "Hub", store: str, kind: str, *, column: str | None = None,
                 ids: np.ndarray | None = None, single: Any = None,
                 query: Callable[[Any], Any] | None = None,
                 callback: Callable[[Any], Any] | None = None, maxsize: int = 64,
                 deliver: str = "thread", every_s: float = 0.0):
        if deliver not in ("thread", "inline"):
            raise ValueError("deliver is 'thread' (own thread, default) or 'inline' (in the fold)")
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.hub, self.store, self.kind, self.column = hub, store, kind, column
        self.ids = ids
        self.single = single  # the raw key of a one-key subscription
        self.query = query
        self.callback = callback
        self.maxsize = maxsize
        self.deliver = deliver if callback is not None else "pull"
        self.mask: np.ndarray | None = None  # this subscription's own keys (when a column is shared)
        self.delivered = 0
        self.conflated = 0
        self.error: BaseException | None = None
        self.closed = False
        self._pending: collections.deque[Any] = collections.deque()
        self._cv = threading.Condition(threading.Lock())
        self._dirty = False
        self.every_s = float(every_s)  # query answers: evaluated at most this often
        self._next_eval = 0.0
        self._answer: Any = None
        self._answer_at: Any = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._thread: threading.Thread | None = None

    # -- engine side (folding threads): never blocks on the subscriber -----------------------
    def _push(self, item: Any) -> None:
        with self._cv:
            if self.closed:
                return
            self._pending.append(item)
            if len(self._pending) > self.maxsize:
                merged = conflate(list(self._pending)) if self.kind == "keys" else self._pending[-1]
                self._pending.clear()
                self.conflated += 1
                if merged is not None:
                    self._pending.append(merged)
            self._wake_locked()

    def _mark_dirty(self) -> None:
        with self._cv:
            if self.closed:
                return
            self._dirty = True
            self._wake_locked()

    def _wake_locked(self) -> None:
        self._cv.notify_all()
        for loop, fut in self._waiters:
            loop.call_soon_threadsafe(_resolve, fut)
        self._waiters.clear()

    # -- consumer side --------------------------------------------------------------------
    def _take_locked(self) -> Any:
        """The next notification, or None. Query answers are evaluated here (outside the
        engine's folding), compared with the last answer told."""
        if self._pending:
            return self._pending.popleft()
        if self._dirty:
            now = time.monotonic()
            if now < self._next_eval:
                return None  # throttled: the waiting loop comes back at _next_eval
            self._dirty = False
            self._next_eval = now + self.every_s
            self._cv.release()
            try:
                item = self._evaluate()
            finally:
                self._cv.acquire()
            return item
        return None

    def _retry_in(self) -> float | None:
        return max(0.0, self._next_eval - time.monotonic()) if self._dirty else None

    def _evaluate(self) -> Any:
        answer, at = self.hub.evaluate(self)
        if same_answer(answer, self._answer):
            return None
        old, self._answer, self._answer_at = self._answer, answer, at
        return Change(self.single if self.single is not None else self.kind, old, answer, -1, at)

    def next(self, timeout: float | None = None) -> Any:
        """The next notification (blocking up to ``timeout`` s); None on timeout or close."""
        if self.callback is not None:
            raise SubscriptionError("this subscription delivers to its callback; it has no queue to read")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while True:
                item = self._take_locked()
                if item is not None:
                    self.delivered += 1
                    return item
                left = None if deadline is None else deadline - time.monotonic()
                if self.closed or (left is not None and left <= 0):
                    return None
                retry = self._retry_in()  # a throttled answer (every_s) becomes due then
                self._cv.wait(left if retry is None else retry if left is None else min(left, retry))

    def drain(self) -> list[Any]:
        """Every notification pending now (non-blocking)."""
        out = []
        with self._cv:
            while (item := self._take_locked()) is not None:
                out.append(item)
        self.delivered += len(out)
        return out

    def __iter__(self) -> Iterator[Any]:
        while (item := self.next()) is not None:
            yield item

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            with self._cv:
                item = self._take_locked()
                if item is not None:
                    self.delivered += 1
                    return item
                if self.closed:
                    raise StopAsyncIteration
                fut = loop.create_future()
                self._waiters.append((loop, fut))
            await fut

    # -- delivery --------------------------------------------------------------------------
    def _start(self) -> None:
        if self.deliver == "thread":
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"engine-sub-{self.store}")
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cv:
                item = self._take_locked()
                while item is None and not self.closed:
                    self._cv.wait(self._retry_in())
                    item = self._take_locked()
                if item is None:
                    return
            if not self._call(item):
                return

    def _deliver_inline(self) -> None:
        with self._cv:
            items = []
            while (item := self._take_locked()) is not None:
                items.append(item)
        for item in items:
            if not self._call(item):
                return

    def _call(self, item: Any) -> bool:
        try:
            assert self.callback is not None
            self.callback(item)
            self.delivered += 1
            return True
        except Exception as exc:  # isolated: this subscriber stops, everything else goes on
            self.error = exc
            log.error("subscriber of store %r raised and was stopped: %r", self.store, exc)
            self.close()
            return False

    def close(self) -> None:
        """Stop notifications (pending ones are dropped); iterators end."""
        with self._cv:
            if self.closed:
                return
            self.closed = True
            self._pending.clear()
            self._wake_locked()
        self.hub.remove(self)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "error" if self.error else "closed" if self.closed else "open"
        return (f"Subscription({self.store!r}, {self.kind}, column={self.column!r}, {state}, "
                f"delivered={self.delivered}, conflated={self.conflated})")


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class _ColumnWatch:
    """Watched keys of one scalar column of one store: mask and shadow per shard (or one shared
    pair when answers combine shards)."""

    def __init__(self, column: str, dtype: np.dtype, shards: int, combined: bool):
        self.column = column
        self.dtype = dtype
        self.combined = combined
        n = 1 if combined else shards
        self.mask = [np.zeros(0, np.uint8) for _ in range(n)]
        self.shadow = [np.zeros(0, dtype) for _ in range(n)]
        self.subs: list[Subscription] = []

    def grow(self, part: int, size: int) -> None:
        m = self.mask[part]
        if size > len(m):
            cap = max(size, 2 * len(m), 1024)
            self.mask[part] = np.concatenate([m, np.zeros(cap - len(m), np.uint8)])
            self.shadow[part] = np.concatenate([self.shadow[part], np.zeros(cap - len(m), self.dtype)])


class Hub:
    """Every subscription of an App, by store; called by the folding threads."""

    def __init__(self, app: Any):
        self.app = app
        self._lock = threading.Lock()
        self.columns: dict[tuple[str, str], _ColumnWatch] = {}
        self.queries: dict[str, list[Subscription]] = {}
        self.active: set[str] = set()  # stores with at least one subscription

    # -- subscribing -----------------------------------------------------------------------
    def add_keys(self, sub: Subscription, store: Any) -> None:
        col = sub.column
        kind = store.user_columns.get(col)
        if kind is None:
            raise SubscriptionError(f"store {store.name!r} has no column {col!r}; columns: "
                                    f"{sorted(store.user_columns)}")
        if isinstance(kind, (Ring, MultiMapColumn, TopK)):
            raise SubscriptionError(
                f"column {col!r} of store {store.name!r} is not a scalar; subscribe with "
                f"query=lambda s: s.get(key)[{col!r}] for it")
        dtype = store._dtype(col)
        if dtype not in (np.dtype(np.int64), np.dtype(np.float64)):
            raise SubscriptionError(f"key subscriptions watch int64 or float64 columns; {col!r} is {dtype}")
        combined = not (store.copartitioned or len(store.shards) == 1)
        ids = np.asarray(sub.ids, np.int64)
        with self._lock, store._locked():
            w = self.columns.get((store.name, col))
            if w is None:
                w = self.columns[(store.name, col)] = _ColumnWatch(col, dtype, len(store.shards), combined)
            size = int(ids.max()) + 1 if len(ids) else 0
            if combined:
                w.grow(0, size)
                cur = store.read_ids(ids)[col]
                fresh = w.mask[0][ids] == 0
                w.shadow[0][ids[fresh]] = cur[fresh]
                w.mask[0][ids] = 1
            else:
                owner = self._owners(store, ids)
                for s in range(len(store.shards)):
                    mine = ids[owner == s]
                    if not len(mine):
                        continue
                    w.grow(s, int(mine.max()) + 1)
                    fresh = mine[w.mask[s][mine] == 0]
                    w.shadow[s][fresh] = _read_one_shard(store, s, col, fresh)
                    w.mask[s][mine] = 1
            sub.mask = np.zeros(size, np.uint8)  # its own keys, when others share the column
            sub.mask[ids] = 1
            w.subs = w.subs + [sub]
            self.active.add(store.name)

    def _owners(self, store: Any, ids: np.ndarray) -> np.ndarray:
        if len(store.shards) == 1:
            return np.zeros(len(ids), np.int64)
        return store._owner_shards(ids)  # vectorized partition hash of the raw keys

    def add_query(self, sub: Subscription, store: Any) -> None:
        with self._lock:
            self.queries[store.name] = self.queries.get(store.name, []) + [sub]
            self.active.add(store.name)
        sub._answer, sub._answer_at = self.evaluate(sub)

    def all(self) -> list[Subscription]:
        with self._lock:
            subs = [s for w in self.columns.values() for s in w.subs]
            return subs + [s for v in self.queries.values() for s in v]

    def remove(self, sub: Subscription) -> None:
        with self._lock:
            if sub.kind == "keys":
                w = self.columns.get((sub.store, sub.column))
                if w is not None and sub in w.subs:
                    w.subs = [s for s in w.subs if s is not sub]
                    if not w.subs:
                        del self.columns[(sub.store, sub.column)]
            else:
                subs = self.queries.get(sub.store, [])
                self.queries[sub.store] = [s for s in subs if s is not sub]
            self.active = {n for n, _ in self.columns} | {n for n, v in self.queries.items() if v}

    def evaluate(self, sub: Subscription) -> tuple[Any, Any]:
        store = self.app.stores[sub.store]
        answer = sub.query(store)
        return answer, tuple(st.offset for st in store.shards)

    def move(self, old: Any, new: Any) -> None:
        """A store was replaced (blue/green): re-watch its keys on the new version."""
        with self._lock:
            watches = [(c, w) for (n, c), w in self.columns.items() if n == old.name]
            for c, _ in watches:
                del self.columns[(old.name, c)]
        for c, w in watches:
            for sub in w.subs:
                ids = np.asarray(sub.ids, np.int64)
                before = self._told(old, w, ids)
                self.add_keys(sub, new)
                after = self._told(new, self.columns[(new.name, c)], ids)
                diff = ~_same_values(before, after.astype(before.dtype, copy=False))
                if diff.any():  # the new version answers differently: that is a change too
                    self._notify(sub, Changes(new.name, c, ids[diff], before[diff], after[diff],
                                              -1, -1, self._key_of(new)))
        with self._lock:
            subs = list(self.queries.get(old.name, []))
        for sub in subs:
            sub._mark_dirty()

    def _told(self, store: Any, w: _ColumnWatch, ids: np.ndarray) -> np.ndarray:
        """The answers subscribers were last told for ``ids`` (the watch's shadow)."""
        if w.combined:
            return w.shadow[0][ids].copy()
        owner = self._owners(store, ids)
        out = np.zeros(len(ids), w.dtype)
        for s in range(len(w.shadow)):
            mine = owner == s
            sh = w.shadow[s]
            inside = mine & (ids < len(sh))
            out[inside] = sh[ids[inside]]
        return out

    # -- after each applied batch (folding thread of ``shard``) -----------------------------
    def after_batch(self, store: Any, shard: int, batch: Any) -> None:
        if store.name not in self.active:
            return
        offset = batch.end_offset - 1
        ids = store.touched_ids(batch)
        if ids is None:
            return
        for (name, col), w in list(self.columns.items()):
            if name != store.name:
                continue
            if w.combined:
                ch = self._diff_combined(store, w, ids, shard, offset)
            else:  # under the shard's lock: a new subscription may be growing mask and shadow
                with store.locks[shard]:
                    ch = self._diff_shard(store, w, ids, shard, offset)
            if ch is None:
                continue
            for sub in w.subs:
                part = ch
                if sub.mask is not None and len(w.subs) > 1:
                    m = sub.mask
                    inside = ch.ids < len(m)
                    sel = np.zeros(len(ch.ids), bool)
                    sel[inside] = m[ch.ids[inside]] != 0
                    if not sel.any():
                        continue
                    part = Changes(ch.store, ch.column, ch.ids[sel], ch.old[sel], ch.new[sel],
                                   ch.shard if isinstance(ch.shard, int) else ch.shard[sel],
                                   ch.offset if isinstance(ch.offset, int) else ch.offset[sel],
                                   ch._key_of)
                self._notify(sub, part)
        for sub in self.queries.get(store.name, ()):
            sub._mark_dirty()
            if sub.deliver == "inline":
                sub._deliver_inline()

    def _notify(self, sub: Subscription, ch: Changes) -> None:
        if sub.single is not None:
            shard = ch.shard if isinstance(ch.shard, int) else ch.shard[0]
            offset = ch.offset if isinstance(ch.offset, int) else ch.offset[0]
            item: Any = Change(sub.single, ch.old.item(0), ch.new.item(0), int(shard), int(offset))
        else:
            item = ch
        if sub.deliver == "inline":  # synchronous: straight to the callback, no queue
            if not sub.closed:
                sub._call(item)
        else:
            sub._push(item)

    def _diff_shard(self, store: Any, w: _ColumnWatch, ids: np.ndarray, shard: int,
                    offset: int) -> Changes | None:
        mask, shadow = w.mask[shard], w.shadow[shard]
        if not len(mask):
            return None
        st = store.shards[shard]
        state = st.arrays[w.column]
        n = len(ids)
        out_ids = np.empty(n, np.int64)
        out_old = np.empty(n, w.dtype)
        out_new = np.empty(n, w.dtype)
        m = _k.watch_diff(ids, mask, state, shadow, out_ids, out_old, out_new)
        if m == 0:
            return None
        return Changes(store.name, w.column, out_ids[:m], out_old[:m], out_new[:m], shard, offset,
                       self._key_of(store))

    def _diff_combined(self, store: Any, w: _ColumnWatch, ids: np.ndarray, shard: int,
                       offset: int) -> Changes | None:
        cand = _k.watched_unique(ids, w.mask[0])
        if not len(cand):
            return None
        with self._lock, store._locked():  # one consistent read of every shard
            new = store.read_ids(cand)[w.column]
            old = w.shadow[0][cand]
            diff = ~_same_values(old, new)
            w.shadow[0][cand[diff]] = new[diff]
        if not diff.any():
            return None
        return Changes(store.name, w.column, cand[diff], old[diff], new[diff], shard, offset,
                       self._key_of(store))

    def _key_of(self, store: Any) -> Callable[[np.ndarray], Any]:
        return self.app.log.dicts[store.domain].key_of


def _read_one_shard(store: Any, s: int, col: str, ids: np.ndarray) -> np.ndarray:
    st = store.shards[s]
    arr = st.arrays[col]
    ok = ids < len(arr)
    out = np.zeros(len(ids), arr.dtype)
    out[ok] = arr[ids[ok]]
    return out
