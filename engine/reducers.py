"""Reducer declarations: what a store does with each action type, batch at a time.

Three tiers, all deterministic and batch-at-a-time:

1. built-ins run by native kernels (``count``, ``sum``, ``min``, ``max``, ``first``, ``last``,
   ``mean``, ``push`` into a ring, ``add`` to a multimap);
2. ``kernel``: a numba ``@njit`` function ``fn(state, key_ids, columns) -> None`` where
   ``state`` and ``columns`` are tuples of arrays;
3. ``python``: a function ``fn(state, key_ids, columns) -> None`` receiving dicts of numpy
   arrays, called once per batch.

A reducer names the state column(s) it writes and the action field(s) it reads; the key of
each action is the store's key field (by default the action's field referencing the store's
key domain).
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, Callable

import numpy as np

BUILTIN_OPS = ("count", "sum", "min", "max", "first", "last", "mean", "push", "add", "top")


@dataclass(frozen=True)
class Reducer:
    """One reducer. Build it with the functions below, not directly."""

    op: str  # one of BUILTIN_OPS, "kernel" or "python"
    column: str | tuple[str, ...]  # state column(s) written
    field: str | tuple[str, ...] | None = None  # action field(s) read
    fn: Callable[..., Any] | None = dc_field(default=None, compare=False)
    distinct: bool = True  # "add" only

    @property
    def columns(self) -> tuple[str, ...]:
        return self.column if isinstance(self.column, tuple) else (self.column,)

    @property
    def fields(self) -> tuple[str, ...]:
        if self.field is None:
            return ()
        return self.field if isinstance(self.field, tuple) else (self.field,)

    @property
    def native(self) -> bool:
        return self.op in BUILTIN_OPS


def count(column: str) -> Reducer:
    """``column[key] += 1`` per action."""
    return Reducer("count", column)


def sum(column: str, field: str) -> Reducer:  # noqa: A001 - the natural name
    """``column[key] += action.field`` (int64 wraps, float64 sums in log order)."""
    return Reducer("sum", column, field)


def min(column: str, field: str) -> Reducer:  # noqa: A001
    """Smallest ``action.field`` seen per key."""
    return Reducer("min", column, field)


def max(column: str, field: str) -> Reducer:  # noqa: A001
    """Largest ``action.field`` seen per key."""
    return Reducer("max", column, field)


def first(column: str, field: str) -> Reducer:
    """``action.field`` of the first action per key."""
    return Reducer("first", column, field)


def last(column: str, field: str) -> Reducer:
    """``action.field`` of the latest action per key."""
    return Reducer("last", column, field)


def mean(column: str, field: str) -> Reducer:
    """Mean of ``action.field`` per key (kept as a sum and a count; read as their ratio)."""
    return Reducer("mean", column, field)


def push(column: str, field: str) -> Reducer:
    """Push ``action.field`` into the key's ring (a ``ring(n)`` column) of the last n values."""
    return Reducer("push", column, field)


def top(column: str, field: str) -> Reducer:
    """Keep the key's k largest ``action.field`` values in a ``topk(k)`` column (descending)."""
    return Reducer("top", column, field)


def add(column: str, field: str, distinct: bool = True) -> Reducer:
    """Append ``action.field`` to the key's list in a ``multimap()`` column (once if distinct)."""
    return Reducer("add", column, field, distinct=distinct)


def kernel(fn: Callable[..., Any], columns: tuple[str, ...] | list[str],
           fields: tuple[str, ...] | list[str]) -> Reducer:
    """A numba kernel ``fn(state, key_ids, columns)``; compiled with ``njit(nogil=True)``."""
    return Reducer("kernel", tuple(columns), tuple(fields), fn)


def python(fn: Callable[..., Any], columns: tuple[str, ...] | list[str],
           fields: tuple[str, ...] | list[str]) -> Reducer:
    """A Python function ``fn(state: dict, key_ids, columns: dict)`` called once per batch."""
    return Reducer("python", tuple(columns), tuple(fields), fn)


@dataclass(frozen=True)
class Ring:
    """A fixed-size per-key vector of the last ``n`` values pushed (newest first on read)."""

    n: int
    dtype: Any = np.int64


@dataclass(frozen=True)
class TopK:
    """A fixed-size per-key vector of the ``k`` largest values seen (largest first on read)."""

    k: int
    dtype: Any = np.int64


@dataclass(frozen=True)
class MultiMapColumn:
    """A per-key growing list of int64 values (adjacency lists, inverted indexes)."""


def ring(n: int, dtype: Any = np.int64) -> Ring:
    if n < 1:
        raise ValueError("a ring needs n >= 1")
    return Ring(n, np.dtype(dtype))


def topk(k: int, dtype: Any = np.int64) -> TopK:
    if k < 1:
        raise ValueError("a top-k column needs k >= 1")
    return TopK(k, np.dtype(dtype))


def multimap() -> MultiMapColumn:
    return MultiMapColumn()
