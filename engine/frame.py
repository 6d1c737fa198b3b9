"""Frames: one columnar batch of actions, written into and viewed from a segment's mmap.

Design note. A frame is a 64-byte header (see ``ext/_codec.pyx``: magic, version, flags,
length, CRC32C of bytes [16, length), first offset, count, ncols, ntypes, timestamp), then
``ncols`` 32-byte column descriptors, then 64-byte aligned buffers. A batch may mix action
types and keeps their order: a "type column" (uint16 type id per action, dense-union style)
is present when ``ntypes > 1``, and each type's fields are child columns holding only that
type's rows, in order. Variable-length values (string, bytes) are Arrow's layout: int32
offsets (rows + 1) in the aux buffer, bytes in the data buffer. Key fields hold interned int64
ids. Every buffer is 64-byte aligned so numpy and pyarrow view it in place without copying.

Writing (``_codec.encode_frame``, native, or its pure-Python twin): buffers first, header
next, CRC last; a torn write fails its CRC and is cut on open.
Reading: every descriptor is bounds-checked against the frame before a view is made, so no
file, however crafted, can make a view reach outside its frame. Every type present has a column
for each of its fields, except fields with a default (absent from frames written before the
field was added); anything else is ``CorruptLogError``.

Column descriptor (32 bytes): u16 type_id, u16 field_index (0xFFFF: the type column),
u8 kind, 3 reserved, u32 rows, u32 data_off, u32 data_len, u32 aux_off, u32 aux_len,
u32 reserved. Offsets are relative to the frame start.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from ._impl import load
from .errors import CorruptLogError
from .validate import VarColumn

if TYPE_CHECKING:  # pragma: no cover
    from .schema import Schema

_codec = load("codec")
crc32c = _codec.crc32c
_encode_frame = _codec.encode_frame

FRAME_MAGIC = 0x46474E45
FRAME_VERSION = 1
HEADER_BYTES = 64
DESC_BYTES = 32
ALIGN = 64
FLAG_TYPE_COLUMN = 1
FLAG_SPARSE = 2  # compacted frame: an offsets column lists the rows present; count = span
TYPE_COLUMN_FIELD = 0xFFFF
OFFSETS_FIELD = 0xFFFE
KIND_OFFSETS = 16

_HEADER = struct.Struct("<IHHIIQIHHQ")  # first 40 bytes; 24 reserved follow
_DESC = struct.Struct("<HHB3xIIIIII")

# Physical kinds (u8 in the descriptor). The numpy dtype of each fixed-width kind.
KIND_TYPES = 0
KIND_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<u2"),
    16: np.dtype("<i8"),  # row offsets of a sparse frame
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<i8"),
    5: np.dtype("u1"),
    6: np.dtype("<u2"),
    7: np.dtype("<u4"),
    8: np.dtype("<u8"),
    9: np.dtype("<f4"),
    10: np.dtype("<f8"),
    11: np.dtype("?"),
    12: np.dtype("<i8"),  # timestamp, ns since the epoch
    15: np.dtype("<i8"),  # interned key id
}
KIND_STRING = 13
KIND_BYTES = 14
KIND_KEY = 15
_KIND_BY_NAME = {
    "int8": 1, "int16": 2, "int32": 3, "int64": 4, "uint8": 5, "uint16": 6, "uint32": 7,
    "uint64": 8, "float32": 9, "float64": 10, "bool": 11, "timestamp": 12, "string": 13,
    "bytes": 14, "key": 15,
}


def kind_of(field_type: Any) -> int:
    """The physical kind code of a schema field type (keys are stored as int64 ids)."""
    if field_type.is_key:
        return KIND_KEY
    return _KIND_BY_NAME[field_type.kind]


@dataclass(frozen=True)
class Var:
    """A variable-length column in Arrow layout: int32 offsets (rows + 1) and uint8 data."""

    offsets: np.ndarray
    data: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1


_VARS = (Var, VarColumn)  # written alike; offsets of both start at 0 on the write path


@dataclass
class ColumnSpec:
    """One column to encode: fixed-width ``data`` array, or ``Var`` for strings/bytes."""

    type_id: int
    field_index: int
    kind: int
    values: np.ndarray | Var | VarColumn

    @property
    def rows(self) -> int:
        return len(self.values)


def take_rows(v: np.ndarray | Var | VarColumn, idx: np.ndarray) -> np.ndarray | VarColumn:
    """Rows ``idx`` of a column (a copy); variable-length columns are regathered."""
    if not isinstance(v, _VARS):
        return v[idx]
    offsets, data = v.offsets, v.data
    lens = (offsets[1:] - offsets[:-1])[idx]
    new_off = np.zeros(len(idx) + 1, np.int32)
    np.cumsum(lens, out=new_off[1:])
    starts = offsets[:-1][idx].astype(np.int64)
    # the source position of every output byte
    src = np.repeat(starts - new_off[:-1], lens) + np.arange(int(new_off[-1]), dtype=np.int64)
    return VarColumn(new_off, data[src] if len(src) else np.empty(0, np.uint8))


def _column_tuples(columns: Sequence[ColumnSpec]) -> list[tuple]:
    """The ``(type_id, field_index, kind, rows, data, aux)`` tuples of ``_codec.encode_frame``."""
    out = []
    for c in columns:
        v = c.values
        if type(v) is not np.ndarray and isinstance(v, _VARS):  # a plain array skips isinstance
            out.append((c.type_id, c.field_index, c.kind, len(v.offsets) - 1, v.data,
                        v.offsets.astype("<i4", copy=False)))
        else:
            out.append((c.type_id, c.field_index, c.kind, len(v), v, None))
    return out


def frame_size(columns: Sequence[ColumnSpec]) -> tuple[int, list[tuple]]:
    """The frame length of ``columns`` and their encoder tuples (pass them to ``write_frame``
    as ``tuples``: built once for the room check and the write).

    A strided column (a slice with a step) is not one block of memory: when the encoder refuses
    the columns, they are copied contiguous and checked again, so any other error is raised by
    the second check, unchanged. (Checking contiguity per column would cost every frame.)"""
    cols = _column_tuples(columns)
    try:
        return _codec.frame_length(cols), cols
    except (ValueError, BufferError):
        cols = [(t, f, k, r, np.ascontiguousarray(d), a if a is None else np.ascontiguousarray(a))
                for t, f, k, r, d, a in cols]
        return _codec.frame_length(cols), cols


def write_frame(
    buf: Any,
    pos: int,
    first_offset: int,
    count: int,
    ntypes: int,
    columns: Sequence[ColumnSpec],
    timestamp_ns: int,
    sparse: bool = False,
    tuples: list[tuple] | None = None,
) -> int:
    """Encode one frame into writable buffer ``buf`` at byte ``pos``; returns its length.

    The caller makes room (``frame_size`` gives the length and the ``tuples``). Only bytes
    [pos, pos + length) are written. Bad input (no room, a column whose size disagrees with
    its kind and rows, ...) raises ValueError or TypeError from ``_codec`` and leaves ``buf``
    unchanged.
    """
    flags = (FLAG_TYPE_COLUMN if ntypes > 1 else 0) | (FLAG_SPARSE if sparse else 0)
    if tuples is None:
        tuples = frame_size(columns)[1]
    return _encode_frame(buf, pos, first_offset, count, ntypes, flags, timestamp_ns, tuples)


@dataclass(frozen=True)
class FrameHeader:
    pos: int
    length: int
    crc: int
    first_offset: int
    count: int
    ncols: int
    ntypes: int
    flags: int
    timestamp_ns: int


def read_header(buf: Any, pos: int) -> FrameHeader:
    magic, version, flags, length, crc, first, count, ncols, ntypes, ts = _HEADER.unpack_from(buf, pos)
    return FrameHeader(pos, length, crc, first, count, ncols, ntypes, flags, ts)


class Batch:
    """A read-only, zero-copy view of consecutive actions of one shard (one frame or a slice).

    It covers shard offsets [``first_offset``, ``end_offset``). ``count`` actions are present:
    all of them, except in a compacted (sparse) frame, where superseded last-write-wins actions
    were removed and ``offsets()`` tells which remain. Columns are numpy views into the
    segment's mmap; ``to_arrow`` wraps the same memory.
    """

    __slots__ = ("shard", "first_offset", "end_offset", "timestamp_ns", "_schema", "_types",
                 "_cols", "_start", "_stop", "_dicts", "_row_ranges", "_row_offsets", "_memo")

    def __init__(self, shard: int, first_offset: int, end_offset: int, timestamp_ns: int,
                 schema: "Schema", types: np.ndarray | None, cols: dict, start: int, stop: int,
                 dicts: Mapping[str, Any] | None = None, row_offsets: np.ndarray | None = None):
        self.shard = shard
        self.first_offset = first_offset
        self.end_offset = end_offset
        self.timestamp_ns = timestamp_ns
        self._schema = schema
        self._types = types  # uint16 per row of the whole frame, or None if single type
        self._cols = cols  # type_id -> {field_index: ndarray | Var} over the whole frame
        self._start = start  # frame rows [start, stop) are in this batch
        self._stop = stop
        self._dicts = dicts or {}
        self._row_ranges: dict[int, tuple[int, int]] | None = None
        self._row_offsets = row_offsets  # sparse frames: int64 offset of every frame row
        self._memo: dict | None = None  # columns already sliced (a batch is read many times)

    def __repr__(self) -> str:
        return (f"Batch(shard={self.shard}, offsets=[{self.first_offset}, {self.end_offset}), "
                f"count={self.count}, types={self.type_names})")

    def __len__(self) -> int:
        return self.count

    @property
    def count(self) -> int:
        """Actions present in the batch."""
        return self._stop - self._start

    @property
    def sparse(self) -> bool:
        return self._row_offsets is not None

    @property
    def type_ids(self) -> list[int]:
        return sorted(self._cols)

    @property
    def type_names(self) -> list[str]:
        """Names of the action types the batch holds (at least one action each)."""
        memo = self._memo
        if memo is None:
            memo = self._memo = {}
        names = memo.get("type_names")
        if names is None:
            if self._types is None and self._stop > self._start:  # one type: every row
                names = [self._schema.type_by_id(t).name for t in self._cols]
            else:
                names = [self._schema.type_by_id(t).name for t in self.type_ids
                         if self._rows(t)[1] > self._rows(t)[0]]
            memo["type_names"] = names
        return names

    @property
    def types(self) -> np.ndarray:
        """The type id of every action of the batch, in order (uint16)."""
        if self._types is not None:
            return self._types[self._start : self._stop]
        if not self._cols:
            return np.empty(0, np.uint16)
        (only,) = self._cols
        return np.full(self.count, only, np.uint16)

    def all_offsets(self) -> np.ndarray:
        """The shard offset of every action of the batch, in order (int64)."""
        if self._row_offsets is not None:
            return self._row_offsets[self._start : self._stop]
        return np.arange(self.first_offset, self.end_offset, dtype=np.int64)

    def _rows(self, type_id: int) -> tuple[int, int]:
        """Row range [lo, hi) of ``type_id``'s child columns covered by this batch."""
        if self._row_ranges is None:
            ranges = {}
            if self._types is None:
                for only in self._cols:
                    ranges[only] = (self._start, self._stop)
            else:
                before = self._types[: self._start]
                inside = self._types[self._start : self._stop]
                for t in self._cols:
                    lo = int(np.count_nonzero(before == t))
                    ranges[t] = (lo, lo + int(np.count_nonzero(inside == t)))
            self._row_ranges = ranges
        return self._row_ranges.get(type_id, (0, 0))

    def _type_id(self, type_name: str) -> int:
        return self._schema.type_id(type_name)

    def rows_of(self, type_name: str) -> int:
        """How many actions of ``type_name`` the batch holds."""
        lo, hi = self._rows(self._type_id(type_name))
        return hi - lo

    def offsets(self, type_name: str) -> np.ndarray:
        """Shard offsets of the actions of ``type_name`` (int64), in order."""
        t = self._type_id(type_name)
        if self._types is None:
            if t not in self._cols:
                return np.empty(0, np.int64)
            return self.all_offsets()
        inside = self._types[self._start : self._stop]
        return self.all_offsets()[inside == t]

    def column(self, type_name: str, field: str) -> np.ndarray | Var:
        """One field of ``type_name``'s actions: a zero-copy view (Var for strings/bytes)."""
        memo = self._memo
        if memo is None:
            memo = self._memo = {}
        got = memo.get((type_name, field))
        if got is None:
            got = memo[(type_name, field)] = self._column(type_name, field)
        return got

    def _column(self, type_name: str, field: str) -> np.ndarray | Var:
        slots = self._schema.field_slots
        slot = slots.get((type_name, field))
        if slot is None:
            at = self._schema[type_name]
            slot = slots[(type_name, field)] = (self._type_id(type_name), at, at.field_index(field))
        t, at, idx = slot
        lo, hi = self._rows(t)
        cols = self._cols.get(t)
        if cols is None or idx not in cols:
            return _default_column(at, field, hi - lo)
        v = cols[idx]
        if isinstance(v, Var):
            return Var(v.offsets[lo : hi + 1], v.data)
        return v if lo == 0 and hi == len(v) else v[lo:hi]

    def columns(self, type_name: str) -> dict[str, np.ndarray | Var]:
        """Every field of ``type_name``'s actions, in declaration order."""
        return {f: self.column(type_name, f) for f in self._schema[type_name].field_names}

    def to_arrow(self, type_name: str) -> Any:
        """``type_name``'s actions as a ``pyarrow.RecordBatch`` over the same memory."""
        import pyarrow as pa

        at = self._schema[type_name]
        arrays, names = [], []
        for f in at.field_names:
            v = self.column(type_name, f)
            names.append(f)
            if isinstance(v, Var):
                ftype = at.fields[f]
                is_str = ftype.kind == "string"  # key fields are int64 ids, never Var
                base = int(v.offsets[0]) if len(v.offsets) else 0
                offs = v.offsets if base == 0 else (v.offsets - base).astype(np.int32)
                data = v.data[base:] if base else v.data
                arrays.append(pa.Array.from_buffers(
                    pa.string() if is_str else pa.binary(), len(v),
                    [None, pa.py_buffer(offs), pa.py_buffer(data)]))
            elif at.fields[f].kind == "timestamp":
                arrays.append(pa.Array.from_buffers(pa.timestamp("ns"), len(v), [None, pa.py_buffer(v)]))
            else:
                arrays.append(pa.array(v))
        return pa.RecordBatch.from_arrays(arrays, names=names)

    def keys(self, type_name: str, field: str) -> np.ndarray | list:
        """Raw keys of a key field (the ids resolved through the persisted dictionary)."""
        at = self._schema[type_name]
        domain = at.fields[field].domain
        ids = self.column(type_name, field)
        return self._dicts[domain].key_of(ids)

    def between(self, lo: int, hi: int) -> "Batch":
        """The sub-batch of the actions with offsets in [lo, hi) (views, no copy)."""
        lo, hi = max(lo, self.first_offset), min(hi, self.end_offset)
        assert lo <= hi
        if self._row_offsets is None:
            start = self._start + lo - self.first_offset
            stop = self._start + hi - self.first_offset
        else:
            start = int(np.searchsorted(self._row_offsets, lo))
            stop = int(np.searchsorted(self._row_offsets, hi))
        return Batch(self.shard, lo, hi, self.timestamp_ns, self._schema, self._types, self._cols,
                     start, stop, self._dicts, self._row_offsets)

    def to_pylist(self) -> list[tuple[int, str, dict[str, Any]]]:
        """Every action as ``(offset, type name, {field: value})`` (slow; for tools and tests)."""
        out: list[tuple[int, str, dict[str, Any]]] = []
        types = self.types
        offsets = self.all_offsets().tolist()
        per_type: dict[int, Iterator[dict[str, Any]]] = {}
        for t in set(types.tolist()):
            name = self._schema.type_by_id(t).name
            per_type[t] = iter(_columns_to_rows(self._schema[name], self.columns(name)))
        for i, t in enumerate(types.tolist()):
            out.append((offsets[i], self._schema.type_by_id(t).name, next(per_type[t])))
        return out


def _columns_to_rows(at: Any, cols: Mapping[str, np.ndarray | Var]) -> list[dict[str, Any]]:
    lists = {}
    for f, v in cols.items():
        if isinstance(v, Var):
            raw = bytes(v.data[int(v.offsets[0]) : int(v.offsets[-1])]) if len(v.offsets) > 1 else b""
            base = int(v.offsets[0]) if len(v.offsets) else 0
            offs = (v.offsets - base).tolist()
            vals = [raw[offs[i] : offs[i + 1]] for i in range(len(offs) - 1)]
            if at.fields[f].kind == "string":
                vals = [b.decode("utf-8") for b in vals]
            lists[f] = vals
        else:
            lists[f] = v.tolist()
    n = len(next(iter(lists.values()))) if lists else 0
    return [{f: lists[f][i] for f in lists} for i in range(n)]


def _default_column(at: Any, field: str, rows: int) -> np.ndarray | Var:
    """A column for a field that older frames lack: its default, repeated."""
    ftype = at.fields[field]
    default = at.defaults[field]
    if ftype.is_var and not ftype.is_key:
        raw = default.encode("utf-8") if isinstance(default, str) else bytes(default)
        data = np.frombuffer(raw * rows, np.uint8) if raw else np.empty(0, np.uint8)
        return Var(np.arange(rows + 1, dtype=np.int32) * len(raw), data)
    dtype = KIND_DTYPES[kind_of(ftype)]
    return np.full(rows, default, dtype)


def _ro(buf: Any, dtype: Any, count: int, offset: int) -> np.ndarray:
    """A read-only view: a reader must never be able to write into the log."""
    arr = np.frombuffer(buf, dtype, count, offset)
    arr.flags.writeable = False
    return arr


def decode_frame(buf: Any, pos: int, shard: int, schema: "Schema", dicts: Mapping[str, Any],
                 path: str = "?") -> Batch:
    """View the (already CRC-checked) frame at ``pos`` as a Batch, checking every descriptor.

    Raises CorruptLogError if the layout points outside the frame or disagrees with the schema.
    """
    h = read_header(buf, pos)

    def bad(why: str) -> CorruptLogError:
        return CorruptLogError(f"frame layout is invalid: {why}", path=path, byte_offset=pos,
                               shard=shard, offset=h.first_offset)

    body_lo = pos + HEADER_BYTES + DESC_BYTES * h.ncols
    end = pos + h.length
    if body_lo > end:
        raise bad("descriptor table exceeds the frame")
    cols: dict[int, dict[int, np.ndarray | Var]] = {}
    rows_by_type: dict[int, int] = {}
    types = row_offsets = None
    sparse = bool(h.flags & FLAG_SPARSE)
    for i in range(h.ncols):
        t, fidx, kind, rows, d_off, d_len, a_off, a_len, _ = _DESC.unpack_from(
            buf, pos + HEADER_BYTES + DESC_BYTES * i)
        if d_off % ALIGN or a_off % ALIGN or pos + d_off < body_lo or pos + d_off + d_len > end:
            raise bad(f"column {i} data is out of bounds")
        if fidx == TYPE_COLUMN_FIELD:
            if kind != KIND_TYPES or d_len != 2 * rows or types is not None:
                raise bad("type column has the wrong shape")
            types = _ro(buf, "<u2", rows, pos + d_off)
            continue
        if fidx == OFFSETS_FIELD:
            if not sparse or kind != KIND_OFFSETS or d_len != 8 * rows or row_offsets is not None:
                raise bad("offsets column has the wrong shape")
            row_offsets = _ro(buf, "<i8", rows, pos + d_off)
            if rows and (row_offsets[0] < h.first_offset or row_offsets[-1] >= h.first_offset + h.count
                         or np.any(row_offsets[1:] <= row_offsets[:-1])):
                raise bad("offsets column is not increasing within the frame")
            continue
        try:
            at = schema.type_by_id(t)
        except Exception as exc:
            raise bad(f"unknown type id {t}") from exc
        if fidx >= len(at.field_names):
            raise bad(f"field index {fidx} out of range for type {at.name!r}")
        expect = kind_of(at.fields[at.field_names[fidx]])
        if kind != expect:
            raise bad(f"column {i} has kind {kind}, schema says {expect}")
        if rows_by_type.setdefault(t, rows) != rows:
            raise bad(f"columns of type {at.name!r} disagree on row count")
        if kind in (KIND_STRING, KIND_BYTES):
            if a_len != 4 * (rows + 1) or pos + a_off < body_lo or pos + a_off + a_len > end:
                raise bad(f"column {i} offsets are out of bounds")
            offs = _ro(buf, "<i4", rows + 1, pos + a_off)
            if offs[0] != 0 or offs[-1] != d_len or (rows and np.any(offs[1:] < offs[:-1])):
                raise bad(f"column {i} offsets are not monotonic within the data")
            cols.setdefault(t, {})[fidx] = Var(offs, _ro(buf, np.uint8, d_len, pos + d_off))
        else:
            dt = KIND_DTYPES.get(kind)
            if dt is None or d_len != dt.itemsize * rows:
                raise bad(f"column {i} has {d_len} bytes for {rows} rows")
            cols.setdefault(t, {})[fidx] = _ro(buf, dt, rows, pos + d_off)
    if sparse and row_offsets is None:
        raise bad("sparse frame without an offsets column")
    for t, fields in cols.items():
        # a field may lack its column only if it has a default (frames older than the field)
        at = schema.type_by_id(t)
        if len(fields) < len(at.field_names):
            defaults = at.defaults
            for i, name in enumerate(at.field_names):
                if i not in fields and name not in defaults:
                    raise bad(f"type {at.name!r} has no column for field {name!r}, which has "
                              "no default")
    rows_total = h.count if row_offsets is None else len(row_offsets)
    if types is None:
        if len(rows_by_type) > 1 or sum(rows_by_type.values()) != rows_total:
            raise bad("single-type frame with inconsistent row counts")
        if not rows_by_type and not sparse:
            raise bad("frame has no columns")
    else:
        ids, counts = np.unique(types, return_counts=True)
        if (len(types) != rows_total or dict(zip(ids.tolist(), counts.tolist()))
                != {t: r for t, r in rows_by_type.items() if r}):
            raise bad("type column disagrees with the child columns")
    return Batch(shard, h.first_offset, h.first_offset + h.count, h.timestamp_ns, schema, types,
                 cols, 0, rows_total, dicts, row_offsets)
