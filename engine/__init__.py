"""engine: a server-side Flux engine for Python.

Every action is appended to a durable, columnar, memory-mapped log; stores fold that log into
keyed state. This module is the whole public surface::

    import engine as en

    like = en.ActionType("like", {"user": en.key("user"), "photo": en.key("photo")}, partition="user")
    with en.open("data", [like], shards=2, durability="group") as log:
        log.dispatch("like", user=1, photo=7)
        log.append("like", {"user": users, "photo": photos})   # numpy arrays or a RecordBatch
        for batch in log.read(shard=0):
            batch.column("like", "photo")                       # zero-copy numpy view
"""

from __future__ import annotations

from typing import Any, Iterable

from .errors import (
    ClosedError,
    CorruptLogError,
    DiskFullError,
    EngineError,
    IncompatibleSchemaError,
    LimitExceededError,
    LogError,
    ReadOnlyError,
    SchemaError,
    UnknownActionTypeError,
    ValidationError,
)
from . import reducers
from .app import App, Receipt, replay
from .derive import CycleError, Derivation, DerivationInput, StoreView, derived
from .rebuild import Rebuild, StoreDiff
from .subscribe import Change, Changes, Subscription, SubscriptionError
from .frame import Batch
from .limits import DEFAULT_LIMITS, Limits
from .log import Durability, Log
from .reducers import multimap, ring, topk
from .schema import (
    ActionType,
    Schema,
    bool_,
    bytes_,
    float32,
    float64,
    int8,
    int16,
    int32,
    int64,
    key,
    string,
    timestamp,
    uint8,
    uint16,
    uint32,
    uint64,
)
from .store import Store, StoreFailedError

__version__ = "0.1.0"


def open(  # noqa: A001 - the natural name, as in io.open / sqlite3.connect
    path: str,
    types: Iterable[ActionType] | Schema | None = None,
    *,
    shards: int | None = None,
    durability: Durability = "group",
    limits: Limits = DEFAULT_LIMITS,
    readonly: bool = False,
    retention_bytes: int | None = None,
    retention_age_s: float | None = None,
) -> Log:
    """Open (or create) the data directory ``path`` and return its :class:`Log`.

    ``types`` declares the action types; it is required for a new directory and, for an
    existing one, must be compatible with the stored schema (adding fields with defaults and
    new types is allowed). ``shards`` is fixed at creation. ``durability`` is "sync", "group"
    or "none" (see :class:`Log`). ``readonly=True`` follows a directory another process writes.
    """
    return Log(path, types, shards=shards, durability=durability, limits=limits,
               readonly=readonly, retention_bytes=retention_bytes, retention_age_s=retention_age_s)


__all__ = [
    "open", "Log", "Batch", "App", "Store", "replay", "reducers", "ring", "multimap", "topk",
    "Receipt", "Derivation", "DerivationInput", "StoreView", "derived", "CycleError", "Rebuild",
    "StoreDiff", "Change", "Changes", "Subscription", "SubscriptionError",
    "StoreFailedError", "ActionType", "Schema", "Limits", "DEFAULT_LIMITS", "Durability",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float32",
    "float64", "bool_", "timestamp", "string", "bytes_", "key",
    "EngineError", "SchemaError", "IncompatibleSchemaError", "ValidationError",
    "UnknownActionTypeError", "LimitExceededError", "LogError", "CorruptLogError",
    "DiskFullError", "ClosedError", "ReadOnlyError",
]
del Any
