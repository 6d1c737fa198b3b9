"""Pure-Python reference twin of ``engine._dispatch`` (ext/_dispatch.pyx): same names, same results.

``RowBuffer`` buffers single actions of several action types per shard, in arrival order, and
cuts a shard's buffer into columns on ``take``. A type is given as a plain tuple
``(type_id, field_kinds, partition_index)``: ``field_kinds`` are ``FieldType.kind`` per field in
field order, with "key" split into "key_int" / "key_str" (see ``KINDS``).

``Dispatcher`` (from ``RowBuffer.dispatcher``) is the fast single-action path: ``d(*values)``
accepts, with no Python-level validation call, exactly the values ``ActionType.validate_one``
accepts *and* that need no conversion beyond a C cast: exact ``int`` in the field's range for
int/uint/key-int/timestamp fields, exact ``int`` (int64) or ``float`` for float fields, ``True``
/ ``False`` for bool fields, exact ``str`` (encodable, at most ``string_bytes_max`` UTF-8 bytes)
for string and str-key fields, exact ``bytes`` for bytes fields. Anything else (a wrong count,
None, datetimes, numpy scalars, subclasses, bytes for a string field, a value to reject) goes to
``fallback(*values)`` -- ``ActionType.validate_row`` -- which raises the ValidationError or
returns the normalized row, stored as ``add`` stores it. Nothing is stored unless every value
passed.

This module is the oracle of the native one first and the fallback second
(``ENGINE_NO_EXTENSIONS=1``). The argument checks of the cold paths (``check_types``,
``check_ranges``, ``row_error``) live here only; the native module imports them, so both reject
bad arguments with the same words.
"""

from __future__ import annotations

import operator
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from engine import _keys_py

__all__ = ["RowBuffer", "Dispatcher", "KINDS"]

KINDS = (
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float32", "float64", "bool", "timestamp", "key_int", "string", "bytes", "key_str",
)  # fmt: skip  # the index of a kind is its code in ext/_dispatch.pyx
FIELDS_MAX = 256  # fields of one type; the native fast path keeps one row on the C stack
SHARDS_MAX = 1 << 16
TYPE_ID_MAX = (1 << 16) - 1  # type ids are stored in a uint16 column
STRING_BYTES_MAX = 1 << 20  # bytes; = Limits.string_bytes_max by default

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_INT_KINDS = KINDS[:8] + ("timestamp", "key_int")
_VAR_KINDS = ("string", "bytes", "key_str")
_PARTITION_KINDS = KINDS[:8] + ("key_int",) + _VAR_KINDS
# The values validate_one accepts per int kind; also what add() can store.
RANGES = {k: (int(np.iinfo(k).min), int(np.iinfo(k).max)) for k in KINDS[:8]}
RANGES["timestamp"] = (_INT64_MIN + 1, _INT64_MAX)  # INT64_MIN is NaT
RANGES["key_int"] = (_INT64_MIN, _INT64_MAX)
DTYPES = {k: np.dtype(k) for k in KINDS[:10]}
DTYPES.update(bool=np.dtype(np.bool_), timestamp=np.dtype(np.int64), key_int=np.dtype(np.int64))
_PY_TYPE = dict.fromkeys(_INT_KINDS, int)  # the one type add() takes for the kind
_PY_TYPE.update(float32=float, float64=float, bool=bool, string=str, key_str=str, bytes=bytes)

TypeSpec = tuple[int, Sequence[str], int]


# ---- cold-path argument checks (shared with the native module) --------------------------------


def check_types(
    shards: Any, types: Any, flush_at: Any
) -> tuple[int, list[tuple[int, tuple[str, ...], int]], int]:
    """Normalize RowBuffer's arguments, or raise TypeError/ValueError saying what to fix."""
    s = operator.index(shards)
    if not 1 <= s <= SHARDS_MAX:
        raise ValueError(f"shards must be between 1 and {SHARDS_MAX}, got {s}")
    f = operator.index(flush_at)
    if f < 1:
        raise ValueError(f"flush_at must be at least 1 action, got {f}")
    if not isinstance(types, (list, tuple)) or not types:
        raise ValueError(
            "types must be a non-empty list of (type_id, field_kinds, partition_index) tuples"
        )
    out, seen = [], set()
    for spec in types:
        if not isinstance(spec, tuple) or len(spec) != 3:
            raise ValueError(f"a type is (type_id, field_kinds, partition_index), not {spec!r}")
        tid, kinds, part = operator.index(spec[0]), tuple(spec[1]), operator.index(spec[2])
        if not 0 <= tid <= TYPE_ID_MAX or tid in seen:
            raise ValueError(f"type id {tid} is a duplicate or outside 0..{TYPE_ID_MAX}")
        seen.add(tid)
        if not 1 <= len(kinds) <= FIELDS_MAX or any(k not in KINDS for k in kinds):
            raise ValueError(
                f"field kinds of type {tid} must be 1..{FIELDS_MAX} of {', '.join(KINDS)}; got "
                f"{kinds!r}"
            )
        if not 0 <= part < len(kinds) or kinds[part] not in _PARTITION_KINDS:
            raise ValueError(
                f"partition index {part} of type {tid} must name an int, uint, int key, string, "
                "bytes or str key field"
            )
        out.append((tid, kinds, part))
    return s, out, f


def check_ranges(kinds: tuple[str, ...], ranges: Any) -> list[tuple[int, int] | None]:
    """Per field (lo, hi) inclusive for int kinds (None: the kind's whole range), else None."""
    if not isinstance(ranges, (list, tuple)) or len(ranges) != len(kinds):
        raise ValueError(f"ranges must be a list of {len(kinds)} entries, one per field")
    out: list[tuple[int, int] | None] = []
    for i, (kind, r) in enumerate(zip(kinds, ranges)):
        if kind not in _INT_KINDS:
            if r is not None:
                raise ValueError(f"range of field {i} ({kind}) must be None: it is not an int")
            out.append(None)
            continue
        lo, hi = RANGES[kind] if r is None else (operator.index(r[0]), operator.index(r[1]))
        if not RANGES[kind][0] <= lo <= hi <= RANGES[kind][1]:
            raise ValueError(
                f"range ({lo}, {hi}) of field {i} must lie within {kind}'s {RANGES[kind]}"
            )
        out.append((lo, hi))
    return out


def check_fallback(fallback: Any, string_bytes_max: Any) -> int:
    if not callable(fallback):
        raise TypeError("fallback must be callable: pass ActionType.validate_row")
    n = operator.index(string_bytes_max)
    if n < 0:
        raise ValueError(f"string_bytes_max must be >= 0 bytes, got {n}")
    return n


def row_error(i: int, tid: int, kind: str, value: Any) -> Exception:
    """add() got a row that ActionType.validate_one cannot have returned."""
    todo = "pass the row ActionType.validate_one returns"
    if type(value) is not _PY_TYPE[kind]:
        return TypeError(
            f"add(): value {i} of a type {tid} row is {type(value).__name__}, not "
            f"{_PY_TYPE[kind].__name__} ({kind}); {todo}"
        )
    return ValueError(
        f"add(): value {i} of a type {tid} row, {value!r}, does not fit {kind}; {todo}"
    )


def unknown_type(type_id: Any, known: Sequence[int]) -> ValueError:
    return ValueError(f"unknown type id {type_id!r}; this RowBuffer holds type ids {list(known)}")


def bad_shard(shard: int, shards: int) -> IndexError:
    return IndexError(f"shard {shard} is out of range for {shards} shards")


# ---- value conversion: the native fast path and add(), in Python ------------------------------


def _cast(value: int | float, dtype: np.dtype) -> float:
    """A float field's value cast as validate_one casts it (through numpy, nearest)."""
    with np.errstate(over="ignore"):
        return float(np.asarray(value).astype(dtype))


def _value(kind: str, v: Any, rng: tuple[int, int] | None, fast: bool, size_max: int
           ) -> tuple[bool, Any]:
    """(True, stored value) if ``v`` passes as it is, else (False, None). ``fast``: the
    dispatcher's check (ints for floats too); else add()'s (``rng`` is the kind's)."""
    if rng is not None:
        return (type(v) is int and rng[0] <= v <= rng[1]), v
    if kind in ("float32", "float64"):
        if type(v) is float:
            x = v if kind == "float64" else _cast(v, DTYPES[kind])
            return not (np.isinf(x) and np.isfinite(v)), x
        if fast and type(v) is int and _INT64_MIN <= v <= _INT64_MAX:
            return True, _cast(np.int64(v), DTYPES[kind])
        return False, None
    if kind == "bool":
        return (v is True or v is False), v
    if kind == "bytes":
        return (type(v) is bytes and len(v) <= size_max), v
    if type(v) is not str:
        return False, None
    try:
        return len(v.encode("utf-8")) <= size_max, v
    except UnicodeEncodeError:
        return False, None


# ---- the buffer -------------------------------------------------------------------------------


class _Shard:
    __slots__ = ("types", "cols", "base")

    def __init__(self, type_ids: Sequence[int], kinds: dict[int, tuple[str, ...]]) -> None:
        self.types: list[int] = []  # type id per buffered action, in order
        self.cols = {t: [[] for _ in kinds[t]] for t in type_ids}  # type id -> per field values
        self.base = 0  # offset of the shard's first buffered action; take() advances it


class RowBuffer:
    """Per-shard, in-order buffer of single actions of several types (see the module doc)."""

    def __init__(
        self,
        shards: int,
        types: list[TypeSpec],
        flush_at: int = 8192,
        on_full: Callable[[], Any] | None = None,
    ) -> None:
        self.shards, specs, self.flush_at = check_types(shards, types, flush_at)
        self._ids = [t for t, _, _ in specs]  # declaration order
        self._kinds = {t: k for t, k, _ in specs}
        self._part = {t: p for t, _, p in specs}
        self._shards = [_Shard(self._ids, self._kinds) for _ in range(self.shards)]
        self._lock = threading.Lock()  # the native module relies on the GIL instead
        self.total = 0  # actions buffered over all shards
        self.full = False  # set when total reaches flush_at; take() clears it below
        self.on_full = on_full  # called with no arguments after an append that leaves it full
        self.last_shard = -1  # shard of the last action added (by any thread)

    def _shard(self, shard: int) -> _Shard:
        s = operator.index(shard)
        if not 0 <= s < self.shards:
            raise bad_shard(s, self.shards)
        return self._shards[s]

    def _type(self, type_id: Any) -> int:
        if type(type_id) is not int or type_id not in self._kinds:
            raise unknown_type(type_id, self._ids)
        return type_id

    def _route(self, tid: int, row: tuple) -> int:
        if self.shards == 1:
            return 0
        v = row[self._part[tid]]
        if isinstance(v, (str, bytes)):
            return _keys_py.shard_of_str(v, self.shards)
        # uint64 keys route by their int64 bits, as Log._route does for columns
        return _keys_py.shard_of_int(v - (1 << 64) if v > _INT64_MAX else v, self.shards)

    def _append(self, tid: int, row: tuple) -> tuple[int, int, int]:
        """Store a row already in stored form; returns (shard, index, offset)."""
        with self._lock:
            s = self._route(tid, row)
            sh = self._shards[s]
            index = len(sh.types)
            for col, v in zip(sh.cols[tid], row):
                col.append(v)
            sh.types.append(tid)
            self.total += 1
            self.last_shard = s
            offset = sh.base + index
            notify = None
            if self.total >= self.flush_at:
                self.full, notify = True, self.on_full
        if notify is not None:
            notify()
        return s, index, offset

    def _add_valid(self, tid: int, row: Any) -> tuple[int, int, int]:
        if type(row) is not tuple:
            raise TypeError(
                f"add(): a row is the tuple ActionType.validate_one returns, not "
                f"{type(row).__name__}"
            )
        kinds = self._kinds[tid]
        if len(row) != len(kinds):
            raise ValueError(
                f"add(): type {tid} has {len(kinds)} fields but the row has {len(row)} values"
            )
        out = []
        for i, (kind, v) in enumerate(zip(kinds, row)):
            ok, x = _value(kind, v, RANGES.get(kind), False, sys.maxsize)
            if not ok:
                raise row_error(i, tid, kind, v)
            out.append(x)
        return self._append(tid, tuple(out))

    def add(self, type_id: int, row: tuple) -> tuple[int, int]:
        """Buffer a validated row; returns (shard, index in the shard's buffer)."""
        s, index, _ = self._add_valid(self._type(type_id), row)
        return s, index

    def add_offset(self, type_id: int, row: tuple) -> int:
        """Buffer a validated row; returns base[shard] + its index (see ``last_shard``)."""
        return self._add_valid(self._type(type_id), row)[2]

    def shard_of_last(self) -> int:
        return self.last_shard

    def dispatcher(
        self,
        type_id: int,
        ranges: list[tuple[int, int] | None],
        fallback: Callable[..., tuple],
        *,
        string_bytes_max: int = STRING_BYTES_MAX,
    ) -> Dispatcher:
        """The fast path for one type: ``d(*values)`` -> offset (see the module doc)."""
        tid = self._type(type_id)
        lims = check_ranges(self._kinds[tid], ranges)
        str_max = check_fallback(fallback, string_bytes_max)
        d = Dispatcher.__new__(Dispatcher)
        d._init(self, tid, lims, fallback, str_max)
        return d

    def count(self, shard: int) -> int:
        """Actions buffered for ``shard``."""
        return len(self._shard(shard).types)

    def set_base(self, shard: int, offset: int) -> None:
        """The offset the shard's next buffered action after the last take() gets."""
        sh = self._shard(shard)
        o = operator.index(offset)
        if not _INT64_MIN <= o <= _INT64_MAX:
            raise OverflowError(f"offset {o} does not fit in int64")
        sh.base = o

    def take(self, shard: int) -> tuple[np.ndarray | None, dict[int, list]]:
        """Cut the shard's buffer: (uint16 type column or None if one type, {type id: columns}).

        Columns come in field order: numpy arrays of the field's dtype (int keys: int64 raw
        keys; timestamps: int64 ns), lists of str/bytes for string, bytes and str-key fields.
        The buffer is emptied and the shard's base advances past the taken actions.
        """
        sh = self._shard(shard)
        with self._lock:
            types, cols, n = sh.types, sh.cols, len(sh.types)
            sh.types = []
            sh.cols = {t: [[] for _ in self._kinds[t]] for t in self._ids}
            sh.base += n
            self.total -= n
            self.full = self.full and self.total >= self.flush_at
        out = {}
        for t in self._ids:
            if cols[t][0]:
                out[t] = [c if k in _VAR_KINDS else np.array(c, DTYPES[k])
                          for k, c in zip(self._kinds[t], cols[t])]
        return (np.array(types, np.uint16) if len(out) > 1 else None), out

    def __repr__(self) -> str:
        return f"RowBuffer(shards={self.shards}, types={self._ids}, total={self.total})"


class Dispatcher:
    """``d(*values)`` -> offset of one action of one type, values in field order."""

    def __init__(self) -> None:
        raise TypeError("create a Dispatcher with RowBuffer.dispatcher()")

    def _init(self, buf: RowBuffer, tid: int, lims: list, fallback: Callable, str_max: int) -> None:
        self._buf, self.type_id, self._fallback, self._str_max = buf, tid, fallback, str_max
        self._plan = tuple(zip(buf._kinds[tid], lims))

    def __call__(self, *values: Any) -> int:
        row = []
        if len(values) == len(self._plan):
            for (kind, rng), v in zip(self._plan, values):
                ok, x = _value(kind, v, rng, True, self._str_max)
                if not ok:
                    break
                row.append(x)
        if len(row) == len(self._plan):
            return self._buf._append(self.type_id, tuple(row))[2]
        return self._buf._add_valid(self.type_id, self._fallback(*values))[2]
