"""Field types, and how the values of one field are checked and normalized.

Design note. Every field type has one *validated* form, which is what the log writes:

- int/uint/float/bool: a 1-D C-contiguous numpy array of exactly the field dtype;
- timestamp: int64 nanoseconds since 1970-01-01 UTC (``INT64_MIN`` is NaT, so it is rejected);
- string/bytes: a ``VarColumn`` (Arrow's offsets + data layout), strings valid UTF-8;
- key: the *raw* key (an int64 array for int keys, a ``VarColumn`` of UTF-8 for str keys); the
  log interns it into a dense int64 id per key domain before it is stored.

Every check exists twice: vectorized for columns (numpy, Arrow, ``VarColumn``) and per value for
Python scalars (``validate_one``, and list columns, which go value by value). Both raise through
the same ``FieldRef`` message builders, so a value is rejected with the same words whichever way
it came in, plus " at row N" when it came in a column. Nothing here knows about action types as a
whole: ``engine.schema`` composes these per-field checks (and re-exports the public names).
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.errors import LimitExceededError, SchemaError, ValidationError
from engine.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "FieldType", "VarColumn", "FieldRef", "parse_field_type", "key", "check_identifier",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float32", "float64", "bool_", "timestamp", "string", "bytes_",
    "check_value", "check_column", "column_len", "fill_default",
]  # fmt: skip

NAME_CHARS_MAX = 64  # characters; action type, field and key domain names
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_INT32_MAX = 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_UINT64_MAX = 2**64 - 1
_TIMESTAMP_RANGE = (_INT64_MIN + 1, _INT64_MAX)  # ns; INT64_MIN is numpy's and Arrow's NaT


def check_identifier(what: str, name: object) -> str:
    """Return ``name`` if it is an ASCII identifier of at most 64 characters, else SchemaError."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name) or len(name) > NAME_CHARS_MAX:
        raise SchemaError(
            f"{what} {name!r} is not a valid name: use an ASCII identifier (letters, digits, "
            f"underscores, not starting with a digit) of at most {NAME_CHARS_MAX} characters"
        )
    return name


# --- field types -------------------------------------------------------------------------------


_FAMILY_OF_DTYPE_KIND = {"i": "int", "u": "int", "f": "float", "b": "bool"}


@dataclass(frozen=True)
class FieldType:
    """The type of one field. Use the module singletons, ``key()`` or ``parse_field_type()``."""

    name: str  # canonical spelling: "uint8", "timestamp", "key:user", "key:user:str", ...
    kind: str  # physical kind: the name, except "key" for every key type (the frame kind codes)
    dtype: np.dtype | None  # of a validated column; None = variable length (a VarColumn)
    domain: str | None = None  # the key domain; set for kind "key" only

    @property
    def is_var(self) -> bool:
        """Validated values are variable-length bytes (string, bytes, raw str keys)."""
        return self.dtype is None

    @property
    def is_key(self) -> bool:
        return self.kind == "key"

    @property
    def family(self) -> str:
        """How values are checked: "int" (also uint, int keys), "float", "bool", "timestamp",
        "string" (also str keys) or "bytes"."""
        if self.is_key:
            return "string" if self.dtype is None else "int"
        if self.dtype is None or self.kind == "timestamp":
            return self.kind
        return _FAMILY_OF_DTYPE_KIND[self.dtype.kind]

    @property
    def key_kind(self) -> type | None:
        """``int`` or ``str`` for a key field, else None."""
        if not self.is_key:
            return None
        return str if self.dtype is None else int

    @property
    def storage_dtype(self) -> np.dtype | None:
        """The dtype the log stores: keys become int64 ids once interned."""
        return np.dtype(np.int64) if self.is_key else self.dtype

    def __str__(self) -> str:
        return self.name


def _fixed(name: str, dtype: type | str) -> FieldType:
    return FieldType(name, name, np.dtype(dtype))


int8, int16, int32, int64 = (_fixed(f"int{b}", f"i{b // 8}") for b in (8, 16, 32, 64))
uint8, uint16, uint32, uint64 = (_fixed(f"uint{b}", f"u{b // 8}") for b in (8, 16, 32, 64))
float32, float64 = _fixed("float32", np.float32), _fixed("float64", np.float64)
bool_ = _fixed("bool", np.bool_)
timestamp = _fixed("timestamp", np.int64)  # int64 ns since the epoch, UTC
string = FieldType("string", "string", None)
bytes_ = FieldType("bytes", "bytes", None)

_BY_NAME = {
    ft.name: ft
    for ft in (int8, int16, int32, int64, uint8, uint16, uint32, uint64)
    + (float32, float64, bool_, timestamp, string, bytes_)
}
_BY_NAME["str"] = string
_SPELLINGS = (
    "int8..int64, uint8..uint64, float32, float64, bool, timestamp, string (or str), bytes, "
    "key:<domain> (int keys), key:<domain>:str"
)


def key(domain: str, kind: type | str = int) -> FieldType:
    """A reference into the key domain ``domain`` (e.g. "user"); ``kind`` is ``int`` or ``str``."""
    check_identifier("key domain", domain)
    if kind in (int, "int"):
        return FieldType(f"key:{domain}", "key", np.dtype(np.int64), domain)
    if kind in (str, "str"):
        return FieldType(f"key:{domain}:str", "key", None, domain)
    raise SchemaError(f"key kind must be int or str, not {kind!r}: use key('{domain}', int|str)")


def parse_field_type(x: FieldType | str) -> FieldType:
    """A FieldType from itself or from its spelling ("int64", "key:user", "key:user:str", ...)."""
    if isinstance(x, FieldType):
        if _parse_name(x.name) != x:
            raise SchemaError(f"{x!r} is not a field type of engine.schema: use {_SPELLINGS}")
        return x
    if not isinstance(x, str):
        raise SchemaError(f"a field type is a FieldType or one of {_SPELLINGS}; got {x!r}")
    return _parse_name(x)


def _parse_name(name: str) -> FieldType:
    if name in _BY_NAME:
        return _BY_NAME[name]
    parts = name.split(":")
    if parts[0] == "key" and len(parts) == 2:
        return key(parts[1], int)
    if parts[0] == "key" and len(parts) == 3 and parts[2] in ("int", "str"):
        return key(parts[1], parts[2])
    raise SchemaError(f"unknown field type {name!r}: use one of {_SPELLINGS}")


@functools.cache
def _int_range(ft: FieldType) -> tuple[int, int]:
    if ft.kind == "timestamp":
        return _TIMESTAMP_RANGE
    info = np.iinfo(ft.dtype)
    return int(info.min), int(info.max)


# --- variable-length columns -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VarColumn:
    """n variable-length values in Arrow's string/binary layout.

    Value i is ``data[offsets[i]:offsets[i + 1]]``; bytes of ``data`` past ``offsets[-1]`` are
    ignored. Equality compares values, not buffers.
    """

    offsets: np.ndarray  # int32, n + 1 entries; offsets[0] == 0, non-decreasing, <= len(data)
    data: np.ndarray  # uint8

    def __post_init__(self) -> None:
        o, d = self.offsets, self.data
        if not (isinstance(o, np.ndarray) and o.dtype == np.int32 and o.ndim == 1 and len(o)):
            raise TypeError("VarColumn.offsets must be a 1-D int32 array of n + 1 entries")
        if not (isinstance(d, np.ndarray) and d.dtype == np.uint8 and d.ndim == 1):
            raise TypeError("VarColumn.data must be a 1-D uint8 array")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> bytes:
        return self.data[self.offsets[i] : self.offsets[i + 1]].tobytes()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VarColumn):
            return NotImplemented
        return bool(
            np.array_equal(self.offsets, other.offsets)
            and np.array_equal(self.data[: self.offsets[-1]], other.data[: other.offsets[-1]])
        )

    __hash__ = None  # type: ignore[assignment]  # mutable buffers, like numpy arrays

    @classmethod
    def from_values(cls, values: Sequence[str | bytes]) -> VarColumn:
        """Encode str (as UTF-8) and bytes-like values. Copies."""
        encoded = []
        for v in values:
            if isinstance(v, str):
                encoded.append(v.encode("utf-8"))
            elif isinstance(v, (bytes, bytearray, memoryview)):
                encoded.append(bytes(v))
            else:
                raise TypeError(f"VarColumn values are str or bytes, not {type(v).__name__}")
        ends = np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)))
        if len(ends) and ends[-1] > _INT32_MAX:
            raise ValueError("VarColumn holds at most 2 GiB of data: split the batch")
        offsets = np.zeros(len(encoded) + 1, np.int32)
        offsets[1:] = ends
        return cls(offsets, np.frombuffer(b"".join(encoded), np.uint8))

    @classmethod
    def from_arrow(cls, arr: pa.Array | pa.ChunkedArray) -> VarColumn:
        """View an Arrow string/binary array (also large_* and *_view) without nulls.

        Zero-copy for string/binary arrays whose offsets start at 0; a slice gets rebased offsets
        (a copy) over a view of the data; large_* offsets are converted to int32.
        """
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()
        t = arr.type
        if pa.types.is_string_view(t) or pa.types.is_binary_view(t):
            arr = arr.cast(pa.large_string() if pa.types.is_string_view(t) else pa.large_binary())
            t = arr.type
        large = pa.types.is_large_string(t) or pa.types.is_large_binary(t)
        if not (large or pa.types.is_string(t) or pa.types.is_binary(t)):
            raise TypeError(f"VarColumn.from_arrow takes a string or binary array, not {t}")
        if arr.null_count:
            raise ValueError("the Arrow array has nulls: fill them (pyarrow.compute.fill_null)")
        n = len(arr)
        _, obuf, dbuf = arr.buffers()[:3]
        otype = np.dtype(np.int64 if large else np.int32)
        if obuf is None:
            offsets = np.zeros(n + 1, otype)
        else:
            offsets = np.frombuffer(obuf, otype, n + 1, arr.offset * otype.itemsize)
        base, end = int(offsets[0]), int(offsets[-1])
        if end - base > _INT32_MAX:
            raise ValueError("VarColumn holds at most 2 GiB of data: slice the Arrow array")
        data = np.frombuffer(dbuf, np.uint8) if dbuf is not None else np.zeros(0, np.uint8)
        if end > len(data) or base > end:
            raise ValueError("the Arrow array's offsets point outside its data buffer")
        if base or large:
            offsets = (offsets - base).astype(np.int32)
        return cls(offsets, data[base:end])

    def to_pylist(self, as_str: bool = True) -> list[str] | list[bytes]:
        raw, o = self.data.tobytes(), self.offsets.tolist()
        values = [raw[o[i] : o[i + 1]] for i in range(len(o) - 1)]
        return [v.decode("utf-8") for v in values] if as_str else values

    def to_arrow(self, as_str: bool = True) -> pa.Array:
        """A zero-copy Arrow string (or binary) array over the same buffers."""
        buffers = [None, pa.py_buffer(self.offsets), pa.py_buffer(self.data)]
        return pa.Array.from_buffers(pa.string() if as_str else pa.binary(), len(self), buffers)


# --- errors ------------------------------------------------------------------------------------

_EXPECTED = {
    "int": "give integers (Python int, or any numpy/Arrow int dtype: values are range-checked)",
    "float": "give floats or integers",
    "bool": "give booleans (True/False, or a bool array)",
    "timestamp": "give datetimes, numpy datetime64 or int nanoseconds since the epoch (UTC)",
    "string": "give str (or bytes holding UTF-8)",
    "bytes": "give bytes",
}


@dataclass(frozen=True, slots=True)
class FieldRef:
    """Which field of which action type a check is about. Builds every error message."""

    action_type: str
    field: str
    ft: FieldType

    def error(self, what: str, todo: str, row: int | None = None, cls: type = ValidationError):
        at = "" if row is None else f" at row {row}"
        return cls(
            f"{what} for {self.ft.name} field '{self.field}'{at} of action type "
            f"'{self.action_type}'; {todo}",
            action_type=self.action_type,
            field=self.field,
        )

    def out_of_range(self, value: object, row: int | None) -> ValidationError:
        if self.ft.kind == "timestamp":
            todo = (
                "a timestamp is int64 nanoseconds since 1970-01-01 UTC (years 1677..2262, "
                "whole nanoseconds): fix the value"
            )
        elif self.ft.is_key:
            todo = f"int keys are int64: fix the value or declare key:{self.ft.domain}:str"
        elif self.ft.family == "float":
            todo = f"{self.ft.name} holds finite values up to ±{np.finfo(self.ft.dtype).max}: "
            todo += "fix the value or declare float64"
        else:
            lo, hi = _int_range(self.ft)
            todo = f"{self.ft.name} holds {lo}..{hi}: fix the value or declare a wider field type"
        return self.error(f"value {value} out of range", todo, row)

    def wrong_type(self, what: str, row: int | None = None) -> ValidationError:
        expected = _EXPECTED[self.ft.family]
        if self.ft.is_key:
            expected = "give str keys" if self.ft.dtype is None else "give int keys (int64)"
        return self.error(f"wrong type {what}", expected, row)

    def wrong_value_type(self, value: object, row: int | None) -> ValidationError:
        text = repr(value)
        return self.wrong_type(f"{type(value).__name__} ({text[:40]})", row)

    def null(self, row: int | None) -> ValidationError:
        todo = f"give a value or declare a default for '{self.field}'"
        return self.error("null value", todo, row)

    def too_long(self, nbytes: int, row: int | None, limits: Limits) -> ValidationError:
        todo = (
            f"the limit is string_bytes_max={limits.string_bytes_max} bytes: shorten the value "
            "or raise Limits.string_bytes_max"
        )
        return self.error(f"value of {nbytes} bytes too long", todo, row, LimitExceededError)

    def bad_utf8(self, row: int | None) -> ValidationError:
        return self.error("invalid UTF-8", "give valid UTF-8 or declare the field as bytes", row)

    def str_for_bytes(self, row: int | None) -> ValidationError:
        todo = "encode it first (value.encode()) or declare the field as string"
        return self.error("str value", todo, row)


# --- one value ---------------------------------------------------------------------------------


def check_value(
    ref: FieldRef,
    value: Any,
    limits: Limits = DEFAULT_LIMITS,
    row: int | None = None,
    default: Any = None,
) -> int | float | bool | str | bytes:
    """Normalize one Python value: int, float, bool, int ns, str or bytes (raw key values).

    None (or NaT) is replaced by ``default``; with no default it is a null error.
    """
    if value is None or (isinstance(value, np.datetime64) and np.isnat(value)):
        if default is None:
            raise ref.null(row)
        value = default
    return _SCALAR[ref.ft.family](ref, value, limits, row)


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _scalar_int(ref: FieldRef, v: Any, limits: Limits, row: int | None) -> int:
    if not _is_int(v):
        raise ref.wrong_value_type(v, row)
    lo, hi = _int_range(ref.ft)
    if not lo <= int(v) <= hi:
        raise ref.out_of_range(v, row)
    return int(v)


def _scalar_float(ref: FieldRef, v: Any, limits: Limits, row: int | None) -> float:
    if type(v) is float and ref.ft.dtype == np.float64:  # the common case, exact as it is
        return v
    # Cast through numpy, as a column cast does, so both round the same way.
    if not (_is_int(v) or isinstance(v, (float, np.floating))):
        raise ref.wrong_value_type(v, row)
    if isinstance(v, int) and not _INT64_MIN <= v <= _UINT64_MAX:
        try:
            v = float(v)
        except OverflowError:
            raise ref.out_of_range(v, row) from None
    src = np.asarray(v)
    with np.errstate(over="ignore"):
        x = src.astype(ref.ft.dtype)
    if np.isinf(x) and np.isfinite(src):
        raise ref.out_of_range(v, row)
    return float(x)


def _scalar_bool(ref: FieldRef, v: Any, limits: Limits, row: int | None) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise ref.wrong_value_type(v, row)
    return bool(v)


def _scalar_timestamp(ref: FieldRef, v: Any, limits: Limits, row: int | None) -> int:
    if isinstance(v, datetime):
        ns = _datetime_ns(v)
    elif isinstance(v, np.datetime64):
        ns_arr, bad = _datetime64_ns(np.asarray(v).reshape(1))
        if bad[0]:
            raise ref.out_of_range(v, row)
        ns = int(ns_arr[0])
    elif _is_int(v):
        ns = int(v)
    else:
        raise ref.wrong_value_type(v, row)
    if not _TIMESTAMP_RANGE[0] <= ns <= _TIMESTAMP_RANGE[1]:
        raise ref.out_of_range(v, row)
    return ns


_EPOCH = datetime(1970, 1, 1)


def _datetime_ns(dt: datetime) -> int:
    """Exact ns since the epoch; a naive datetime is UTC. Keeps pandas' extra nanoseconds."""
    offset = dt.utcoffset() if dt.tzinfo is not None else None
    delta = dt.replace(tzinfo=None) - _EPOCH
    ns = (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000
    ns += getattr(dt, "nanosecond", 0)
    if offset is not None:
        ns -= (offset.days * 86_400 + offset.seconds) * 10**9 + offset.microseconds * 1000
    return ns


def _scalar_string(ref: FieldRef, v: Any, limits: Limits, row: int | None) -> str:
    if isinstance(v, str):
        try:
            nbytes, text = len(v.encode("utf-8")), str(v)
        except UnicodeEncodeError:  # lone surrogates
            raise ref.bad_utf8(row) from None
    elif isinstance(v, (bytes, bytearray, memoryview)):
        raw = bytes(v)
        try:
            nbytes, text = len(raw), raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ref.bad_utf8(row) from None
    else:
        raise ref.wrong_value_type(v, row)
    if nbytes > limits.string_bytes_max:
        raise ref.too_long(nbytes, row, limits)
    return text


def _scalar_bytes(ref: FieldRef, v: Any, limits: Limits, row: int | None) -> bytes:
    if isinstance(v, str):
        raise ref.str_for_bytes(row)
    if not isinstance(v, (bytes, bytearray, memoryview)):
        raise ref.wrong_value_type(v, row)
    raw = bytes(v)
    if len(raw) > limits.string_bytes_max:
        raise ref.too_long(len(raw), row, limits)
    return raw


_SCALAR = {
    "int": _scalar_int,
    "float": _scalar_float,
    "bool": _scalar_bool,
    "timestamp": _scalar_timestamp,
    "string": _scalar_string,
    "bytes": _scalar_bytes,
}


# --- one column --------------------------------------------------------------------------------

Column = np.ndarray | VarColumn
_COLUMN_FORMS = "a 1-D numpy array, a list, a pyarrow Array or a VarColumn"


def column_len(ref: FieldRef, col: Any) -> int:
    """Rows of a column, or ValidationError if ``col`` is not a column at all."""
    if isinstance(col, (str, bytes, bytearray, memoryview, dict)) or not hasattr(col, "__len__"):
        raise ref.error(f"not a column ({type(col).__name__})", f"give {_COLUMN_FORMS}")
    if isinstance(col, np.ndarray) and col.ndim == 0:
        raise ref.error("not a column (0-D array)", f"give {_COLUMN_FORMS}")
    return len(col)


def check_column(
    ref: FieldRef, col: Any, default: Any = None, limits: Limits = DEFAULT_LIMITS
) -> Column:
    """Normalize one column to its validated form (zero-copy when it already is)."""
    if isinstance(col, VarColumn):
        if not ref.ft.is_var:
            raise ref.wrong_type("VarColumn")
        return _check_var(ref, col, limits, trusted=False)
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        return _from_arrow(ref, col, default, limits)
    if isinstance(col, (list, tuple)):
        return _from_pylist(ref, col, default, limits)
    column_len(ref, col)
    if isinstance(col, np.ndarray) or hasattr(col, "__array__"):
        array = col if isinstance(col, np.ndarray) else np.asarray(col)  # pandas, polars, ...
        return _from_numpy(ref, array, default, limits)
    raise ref.error(f"not a column ({type(col).__name__})", f"give {_COLUMN_FORMS}")


def fill_default(ref: FieldRef, n: int, default: Any, limits: Limits) -> Column:
    """A column of ``n`` copies of ``default`` (for a field the batch does not give)."""
    value = check_value(ref, default, limits)
    if not ref.ft.is_var:
        return np.full(n, value, ref.ft.dtype)
    raw = value.encode("utf-8") if isinstance(value, str) else value
    if n * len(raw) > _INT32_MAX:
        raise ref.error("defaults exceed 2 GiB", "split the batch", cls=LimitExceededError)
    offsets = (np.arange(n + 1, dtype=np.int64) * len(raw)).astype(np.int32)
    return VarColumn(offsets, np.tile(np.frombuffer(raw, np.uint8), n))


def _from_pylist(ref: FieldRef, values: Sequence, default: Any, limits: Limits) -> Column:
    out = [check_value(ref, v, limits, row, default) for row, v in enumerate(values)]
    if ref.ft.is_var:
        return VarColumn.from_values(out)
    return np.array(out, ref.ft.dtype)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _from_numpy(ref: FieldRef, a: np.ndarray, default: Any, limits: Limits) -> Column:
    mask = None
    if isinstance(a, np.ma.MaskedArray):
        mask, a = np.ma.getmaskarray(a), np.ma.getdata(a)
    if a.ndim != 1:
        raise ref.error(f"{a.ndim}-D array", "give a 1-D array (one value per row)")
    if a.dtype.kind in "OUS":  # Python objects, str, bytes (numpy strips trailing NULs of "S")
        values = a.tolist()
        for row in [] if mask is None else np.flatnonzero(mask).tolist():
            values[row] = None
        return _from_pylist(ref, values, default, limits)
    if ref.ft.is_var:
        raise ref.wrong_type(f"dtype {a.dtype}")
    if mask is not None and mask.any():
        a = a.copy()
        a[mask] = np.zeros(1, a.dtype)[0]  # a placeholder in range of every field type
    out, nat = _fixed_from_numpy(ref, a)
    if nat is not None:
        mask = nat if mask is None else mask | nat
    return _fill_nulls(ref, out, mask, default)


def _fill_nulls(ref: FieldRef, out: np.ndarray, mask: np.ndarray | None, default: Any):
    if mask is None or not mask.any():
        return out
    if default is None:
        raise ref.null(_first(mask))
    out = np.array(out, copy=True)
    out[mask] = default
    return out


def _fixed_from_numpy(ref: FieldRef, a: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The validated array and the rows that were NaT (nulls), if any."""
    family, kind = ref.ft.family, a.dtype.kind
    if family == "timestamp" and kind == "M":
        return _timestamps(ref, a)
    if family in ("int", "timestamp") and kind in "iu":
        return _ints(ref, a, *_int_range(ref.ft)), None
    if family == "float" and kind in "iuf":
        return _floats(ref, a), None
    if family == "bool" and kind == "b":
        return np.ascontiguousarray(a), None
    raise ref.wrong_type(f"dtype {a.dtype}")


def _ints(ref: FieldRef, a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    info = np.iinfo(a.dtype)
    if len(a) and (info.min < lo or info.max > hi):
        if a.min() < lo or a.max() > hi:
            row = _first((a < lo) | (a > hi))
            raise ref.out_of_range(a[row].item(), row)
    if a.dtype == ref.ft.dtype:
        return np.ascontiguousarray(a)
    return a.astype(ref.ft.dtype)


def _floats(ref: FieldRef, a: np.ndarray) -> np.ndarray:
    if a.dtype == ref.ft.dtype:
        return np.ascontiguousarray(a)
    # float64 -> float32 rounds to nearest; only finite values that overflow are rejected.
    with np.errstate(over="ignore", invalid="ignore"):
        out = a.astype(ref.ft.dtype)
    if a.dtype.kind == "f":
        bad = np.isinf(out) & np.isfinite(a)
        if bad.any():
            row = _first(bad)
            raise ref.out_of_range(a[row].item(), row)
    return out


def _datetime64_ns(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """datetime64 of any unit as int64 ns, and the non-NaT rows that do not fit exactly.

    numpy's unit cast wraps silently on overflow and truncates sub-ns units, so a round trip
    back to the source unit finds both.
    """
    if np.datetime_data(a.dtype)[0] == "ns":
        a = np.ascontiguousarray(a)
        return a.view(np.int64), np.zeros(len(a), bool)
    ns = a.astype("datetime64[ns]")
    bad = (ns.astype(a.dtype) != a) & ~np.isnat(a)
    return ns.view(np.int64), bad


def _timestamps(ref: FieldRef, a: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    ns, bad = _datetime64_ns(a)
    if bad.any():
        row = _first(bad)
        raise ref.out_of_range(a[row], row)
    nat = np.isnat(a)
    if not nat.any():
        return ns, None
    ns = ns.copy()
    ns[nat] = 0
    return ns, nat


def _from_arrow(ref: FieldRef, arr: pa.Array | pa.ChunkedArray, default: Any, limits: Limits):
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t = arr.type
    if pa.types.is_null(t):
        if len(arr) and default is None:
            raise ref.null(0)
        return fill_default(ref, len(arr), default, limits) if len(arr) else _empty(ref)
    if ref.ft.is_var:
        return _var_from_arrow(ref, arr, default, limits)
    if not (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_timestamp(t)
    ):
        raise ref.wrong_type(f"Arrow {t}")
    mask = None
    if arr.null_count:
        mask = arr.is_null().to_numpy(zero_copy_only=False)
        arr = pc.fill_null(arr, pa.scalar(False if pa.types.is_boolean(t) else 0, t))
    # Arrow bools are bit-packed, so only they are copied; timestamps with a time zone hold UTC.
    a = arr.to_numpy(zero_copy_only=not pa.types.is_boolean(t))
    out, _ = _fixed_from_numpy(ref, a)
    return _fill_nulls(ref, out, mask, default)


def _empty(ref: FieldRef) -> Column:
    return VarColumn.from_values([]) if ref.ft.is_var else np.zeros(0, ref.ft.dtype)


def _var_from_arrow(ref: FieldRef, arr: pa.Array, default: Any, limits: Limits) -> VarColumn:
    t = arr.type
    text = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
    binary = pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)
    if not (text or binary):
        raise ref.wrong_type(f"Arrow {t}")
    if text and ref.ft.family == "bytes":
        raise ref.str_for_bytes(None)
    if arr.null_count:
        if default is None:
            raise ref.null(_first(arr.is_null().to_numpy(zero_copy_only=False)))
        fill = check_value(ref, default, limits)
        fill = fill.encode("utf-8") if binary and isinstance(fill, str) else fill
        arr = pc.fill_null(arr, pa.scalar(fill, t))
    try:
        col = VarColumn.from_arrow(arr)
    except ValueError as exc:
        raise ref.error(str(exc), "split the batch", cls=LimitExceededError) from exc
    return _check_var(ref, col, limits, trusted=True)


def _check_var(ref: FieldRef, col: VarColumn, limits: Limits, trusted: bool) -> VarColumn:
    """Check structure (unless built by this module), lengths and UTF-8 of a VarColumn."""
    offsets, data = col.offsets, col.data
    if not trusted:
        decreasing = (np.diff(offsets.astype(np.int64)) < 0).any()  # int64: no wrap-around
        if offsets[0] != 0 or decreasing or offsets[-1] > len(data):
            raise ref.error(
                "malformed VarColumn",
                "offsets must start at 0, never decrease and end within data",
            )
        offsets, data = np.ascontiguousarray(offsets), np.ascontiguousarray(data)
    end = int(offsets[-1])
    lengths = np.diff(offsets)
    if len(lengths) and lengths.max() > limits.string_bytes_max:
        row = _first(lengths > limits.string_bytes_max)
        raise ref.too_long(int(lengths[row]), row, limits)
    data = data[:end]
    if ref.ft.family == "string":
        _check_utf8(ref, offsets, data)
    if offsets is col.offsets and data is col.data:
        return col
    return VarColumn(offsets, data)


def _check_utf8(ref: FieldRef, offsets: np.ndarray, data: np.ndarray) -> None:
    """Every value on its own must be valid UTF-8: Arrow's full validation checks exactly that."""
    if not len(data) or data.max() < 0x80:  # ASCII
        return
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    try:
        pa.Array.from_buffers(pa.string(), len(offsets) - 1, buffers).validate(full=True)
    except pa.ArrowInvalid:
        raise ref.bad_utf8(_first_bad_utf8_row(offsets, data)) from None


def _first_bad_utf8_row(offsets: np.ndarray, data: np.ndarray) -> int:
    """Values are valid iff the whole buffer is and no offset splits a character."""
    splits = offsets[offsets < len(data)]
    split_bad = (data[splits] & 0xC0) == 0x80  # a value would start with a continuation byte
    bad = [int(splits[_first(split_bad)])] if split_bad.any() else []
    try:
        codecs.utf_8_decode(memoryview(data), "strict", True)
    except UnicodeDecodeError as exc:
        bad.append(exc.start)
    assert bad, "Arrow found invalid UTF-8 that Python did not"
    # Rows ending before the first bad byte lie in a valid prefix and are split well: skip them.
    start = max(0, int(np.searchsorted(offsets, min(bad), "left")) - 1)
    for row in range(start, len(offsets) - 1):
        try:
            codecs.utf_8_decode(memoryview(data[offsets[row] : offsets[row + 1]]), "strict", True)
        except UnicodeDecodeError:
            return row
    raise AssertionError("invalid UTF-8 found but no bad row")  # pragma: no cover
