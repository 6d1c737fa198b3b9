"""CRC32C, the frame encoder and the frame scanner of log format v1: the pure-Python
reference twin of ``engine._codec`` (ext/_codec.pyx). Same names, same results, same exceptions.

It is the test oracle first and the fallback second. ``crc32c_reference`` is a table-driven
CRC32C in plain Python (slow: ~15 MB/s); ``crc32c`` uses the PyPI ``crc32c`` package when it is
importable and the reference otherwise. ``encode_frame`` is the numpy + struct writer the engine
used before the native one, and validates its input in the same order as the native one, so
both raise the same exception for the same bad input and write the same bytes for good input.
``scan_frames`` makes the checks of the native kernel in the same order, so both report the same
status and stop position for any bytes.

Frame header v1, little-endian, 64 bytes:
  0 u32 magic | 4 u16 version | 6 u16 flags | 8 u32 length | 12 u32 crc (of bytes [16, length))
  16 u64 first_offset | 24 u32 count | 28 u16 ncols | 30 u16 ntypes | 32 u64 timestamp_ns
  40..63 reserved, zero. Then ncols descriptors of 32 bytes, then 64-byte aligned buffers.
"""

from __future__ import annotations

import struct
from operator import index
from typing import Any

import numpy as np

try:
    import crc32c as _crc32c_pkg
except ImportError:  # pragma: no cover - the package is a declared dependency
    _crc32c_pkg = None

__all__ = [
    "crc32c",
    "encode_frame",
    "frame_length",
    "scan_frames",
    "frame_header",
    "FRAME_MAGIC",
    "FRAME_VERSION",
    "FRAME_HEADER_BYTES",
    "COLUMN_DESC_BYTES",
    "FRAME_ALIGN",
    "FRAME_FLAG_TYPE_COLUMN",
    "FRAME_FLAG_SPARSE",
    "SCAN_END",
    "SCAN_BAD_MAGIC",
    "SCAN_BAD_VERSION",
    "SCAN_BAD_LENGTH",
    "SCAN_BAD_CRC",
    "SCAN_BAD_OFFSET",
    "SCAN_TRUNCATED",
]

FRAME_MAGIC = 0x46474E45  # b"ENGF" read as a little-endian u32
FRAME_VERSION = 1
FRAME_HEADER_BYTES = 64
COLUMN_DESC_BYTES = 32
FRAME_ALIGN = 64
FRAME_FLAG_TYPE_COLUMN = 1  # a type column is present
FRAME_FLAG_SPARSE = 2  # compacted: an offsets column lists the rows present; count = span
SCAN_END = 0  # reached `end`, or unwritten (all-zero) space at the stop position
SCAN_BAD_MAGIC = 1
SCAN_BAD_VERSION = 2  # also unknown flags or non-zero reserved bytes
SCAN_BAD_LENGTH = 3
SCAN_BAD_CRC = 4
SCAN_BAD_OFFSET = 5  # first_offset != expected, count == 0, or first_offset + count > 2**63 - 1
SCAN_TRUNCATED = 6

_HEADER = struct.Struct("<IHHIIQIHHQ")  # the 40 bytes before the reserved ones
_DESC = struct.Struct("<HHB3xIIIIII")  # one column descriptor
_I32 = struct.Struct("<i")
_RESERVED_AT = 40  # bytes [40, 64) of the header must be zero
_LENGTH_LIMIT = 1 << 32  # bytes; default max_frame_bytes, above any u32 length
_INT64_MAX = (1 << 63) - 1
_UINT32_MAX = (1 << 32) - 1
_UINT16_MAX = (1 << 16) - 1
_UINT64_MAX = (1 << 64) - 1
_SSIZE_MAX = (1 << 63) - 1
# Bytes per row of each column kind of format v1 (index = kind); 0: variable-length (13 string,
# 14 bytes: int32 offsets in aux, bytes in data). Kinds past the end are unknown.
_KIND_BYTES = (2, 1, 2, 4, 8, 1, 2, 4, 8, 4, 8, 1, 8, 0, 0, 8, 8)


# ---- crc32c -----------------------------------------------------------------------------------


def _make_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def _bytes_of(data: Any) -> memoryview:
    """The raw bytes of a C-contiguous buffer as a 1-D 'B' view, like PyBUF_SIMPLE in C."""
    if isinstance(data, np.ndarray):  # any dtype, even those a memoryview cannot describe
        if not data.flags.c_contiguous:
            raise ValueError("ndarray is not C-contiguous")  # what numpy says to native code
        data = data.reshape(-1).view(np.uint8)
    view = memoryview(data)
    if not view.c_contiguous:
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    if view.format == "B" and view.ndim == 1:
        return view
    try:
        return view.cast("B")
    except TypeError:  # a non-native format ('<i', 'T{...}'): copying is fine in the oracle
        return memoryview(view.tobytes())


def _check_value(value: Any) -> int:
    value = index(value)
    if not 0 <= value <= _UINT32_MAX:
        raise OverflowError(f"crc32c value={value} is outside [0, 2**32)")
    return value


def crc32c_reference(data: Any, value: int = 0) -> int:
    """CRC32C (Castagnoli) of the bytes of ``data``, continuing from ``value``: the oracle."""
    crc = _check_value(value) ^ 0xFFFFFFFF
    table = _TABLE
    with _bytes_of(data) as view:
        for byte in view:
            crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc ^ 0xFFFFFFFF


def crc32c(data: Any, value: int = 0) -> int:
    """CRC32C (Castagnoli) of the bytes of ``data``, continuing from ``value``.

    ``crc32c(b, crc32c(a)) == crc32c(a + b)``; ``crc32c(b"") == 0``. ``data`` is any
    C-contiguous buffer, read as raw bytes.
    """
    value = _check_value(value)
    if _crc32c_pkg is None:
        return crc32c_reference(data, value)
    with _bytes_of(data) as view:  # same acceptance as native whatever the package accepts
        return int(_crc32c_pkg.crc32c(view, value))


# ---- frame encoding ---------------------------------------------------------------------------


def _align(n: int) -> int:
    return (n + FRAME_ALIGN - 1) & ~(FRAME_ALIGN - 1)


def _arg(value: Any, top: int, name: str, col: int = -1) -> int:
    value = index(value)
    if not 0 <= value <= top:
        where = f"column {col}: " if col >= 0 else ""
        raise ValueError(f"{where}{name}={value} is outside [0, {top}]")
    return value


class _Column:
    """One validated column: its descriptor fields, raw bytes and place in the frame."""

    __slots__ = ("aux", "aux_len", "aux_off", "data", "data_len", "data_off", "field_index", "kind",
                 "rows", "type_id")


def _check_ncols(columns: Any) -> Any:
    if not isinstance(columns, (list, tuple)):
        columns = list(columns)
    if len(columns) > _UINT16_MAX:
        raise ValueError(f"{len(columns)} columns: a frame holds at most {_UINT16_MAX}")
    return columns


def _column(i: int, col: Any) -> _Column:
    """Check column ``i`` (a 6-tuple) and view its buffers; ValueError/TypeError if bad."""
    if not isinstance(col, tuple) or len(col) != 6:
        raise TypeError(f"column {i}: expected a tuple (type_id, field_index, kind, rows, data, "
                        f"aux), got {type(col).__name__}")
    c = _Column()
    c.type_id = _arg(col[0], _UINT16_MAX, "type_id", i)
    c.field_index = _arg(col[1], _UINT16_MAX, "field_index", i)
    c.kind = kind = _arg(col[2], 0xFF, "kind", i)
    c.rows = rows = _arg(col[3], _UINT32_MAX, "rows", i)
    c.data = np.frombuffer(col[4], np.uint8)  # raw bytes, as PyBUF_SIMPLE gives them to C
    aux = col[5]
    if kind >= len(_KIND_BYTES):
        raise ValueError(f"column {i}: kind {kind} is not a column kind of format v1")
    item = _KIND_BYTES[kind]
    if item:
        if aux is not None:
            raise ValueError(f"column {i}: kind {kind} is fixed-width, so aux must be None")
        if len(c.data) != item * rows:
            raise ValueError(f"column {i}: data has {len(c.data)} bytes, but {rows} rows of "
                             f"kind {kind} need {item * rows}")
        c.aux, c.aux_len, c.data_len = None, 0, len(c.data)
        return c
    if aux is None:
        raise ValueError(f"column {i}: kind {kind} is variable-length, so aux must be its "
                         "int32 offsets (rows + 1 of them)")
    c.aux = np.frombuffer(aux, np.uint8)
    c.aux_len = len(c.aux)
    if c.aux_len != 4 * (rows + 1):
        raise ValueError(f"column {i}: aux has {c.aux_len} bytes, but {rows} rows need "
                         f"4 * (rows + 1) = {4 * (rows + 1)}")
    (end,) = _I32.unpack_from(c.aux, 4 * rows)
    if not 0 <= end <= len(c.data):
        raise ValueError(f"column {i}: offsets[rows]={end} is outside [0, len(data)="
                         f"{len(c.data)}]")
    c.data_len = end
    return c


def _layout(columns: Any) -> tuple[int, list[_Column]]:
    """Check every column and place its buffers: the frame length and the columns."""
    columns = _check_ncols(columns)
    pos = _align(FRAME_HEADER_BYTES + COLUMN_DESC_BYTES * len(columns))
    cols = []
    for i, col in enumerate(columns):
        c = _column(i, col)
        if c.aux is not None:
            c.aux_off = pos
            pos = _align(pos + c.aux_len)
        else:
            c.aux_off = 0
        c.data_off = pos
        pos = _align(pos + c.data_len)
        if pos > _UINT32_MAX:  # checked per column, so native sums never overflow
            raise ValueError(f"column {i} ends at byte {pos} of the frame: a frame holds at "
                             f"most {_UINT32_MAX} bytes")
        cols.append(c)
    return max(pos, FRAME_ALIGN), cols


def frame_length(columns: Any) -> int:
    """The length in bytes of the frame ``encode_frame`` would write for ``columns``.

    Checks the columns as ``encode_frame`` does and raises the same errors.
    """
    return _layout(columns)[0]


def _put(view: np.ndarray, off: int, src: np.ndarray, length: int) -> None:
    if length:
        view[off : off + length] = src[:length]


def encode_frame(buf: Any, pos: int, first_offset: int, count: int, ntypes: int, flags: int,
                 timestamp_ns: int, columns: Any) -> int:
    """Encode one frame into the writable buffer ``buf`` at byte ``pos``; returns its length.

    ``columns``: a sequence of ``(type_id, field_index, kind, rows, data, aux)`` tuples.
    ``data`` is any C-contiguous buffer whose raw bytes are copied. ``aux`` is None for a
    fixed-width kind (then ``data`` holds exactly ``rows`` values of the kind's width), or for
    kinds 13 (string) and 14 (bytes) the little-endian int32 offsets buffer (``rows + 1``
    entries, the first 0); the first ``offsets[rows]`` bytes of ``data`` are copied.

    Layout: a 64-byte header, one 32-byte descriptor per column, then each column's aux and
    data buffers, each 64-byte aligned; length = the aligned end. Only the header, the
    descriptors and the padding are zeroed: no byte outside ``[pos, pos + length)`` is touched.
    The CRC32C of bytes ``[16, length)`` is written last, at ``pos + 12``.

    Everything is checked before any byte is written: TypeError for a read-only ``buf``, a
    column that is not a 6-tuple, non-integers; ValueError for values outside their field,
    an unknown kind, a wrong aux or data size, a frame over 2**32 - 1 bytes, or a frame that
    does not fit ``buf`` at ``pos``; the buffer protocol's errors for non-contiguous buffers.
    """
    pos = _arg(pos, _SSIZE_MAX, "pos")
    first_offset = _arg(first_offset, _UINT64_MAX, "first_offset")
    count = _arg(count, _UINT32_MAX, "count")
    ntypes = _arg(ntypes, _UINT16_MAX, "ntypes")
    flags = _arg(flags, _UINT16_MAX, "flags")
    timestamp_ns = _arg(timestamp_ns, _UINT64_MAX, "timestamp_ns")
    out = np.frombuffer(buf, np.uint8)
    if not out.flags.writeable:
        raise TypeError("buf is read-only: encode_frame needs a writable buffer (a segment's "
                        "mmap or a bytearray)")
    length, cols = _layout(columns)
    if pos > len(out) - length:
        raise ValueError(f"a frame of {length} bytes at pos={pos} does not fit a buffer of "
                         f"{len(out)} bytes")
    view = out[pos : pos + length]
    # Padding must be deterministic for the CRC whatever was there before; zero only the
    # header, the descriptors and the padding, never the bytes about to be copied.
    first_buf = min([c.data_off for c in cols] + [c.aux_off for c in cols if c.aux_len] + [length])
    view[:first_buf] = 0
    for c in cols:
        view[c.data_off + c.data_len : _align(c.data_off + c.data_len)] = 0
        if c.aux_len:
            view[c.aux_off + c.aux_len : _align(c.aux_off + c.aux_len)] = 0
    for i, c in enumerate(cols):
        _DESC.pack_into(view, FRAME_HEADER_BYTES + COLUMN_DESC_BYTES * i, c.type_id,
                        c.field_index, c.kind, c.rows, c.data_off, c.data_len, c.aux_off,
                        c.aux_len, 0)
        if c.aux_len:
            _put(view, c.aux_off, c.aux, c.aux_len)
        _put(view, c.data_off, c.data, c.data_len)
    _HEADER.pack_into(view, 0, FRAME_MAGIC, FRAME_VERSION, flags, length, 0, first_offset, count,
                      len(cols), ntypes, timestamp_ns)
    struct.pack_into("<I", view, 12, crc32c(view[16:length]))
    return length


# ---- frame scanning ---------------------------------------------------------------------------


def _all_zero(view: memoryview) -> bool:
    return not any(view)


def _check_scan_args(nbytes: int, start: int, end: int, expected_offset: int,
                     max_frame_bytes: int) -> None:
    if not 0 <= end <= nbytes:
        raise ValueError(f"end={end} is outside the buffer of {nbytes} bytes")
    if not 0 <= start <= end:
        raise ValueError(f"start={start} is outside [0, end={end}]")
    if start % FRAME_ALIGN:
        raise ValueError(f"start={start} is not a multiple of {FRAME_ALIGN}: frames are aligned")
    if not 0 <= expected_offset <= _UINT64_MAX:  # any u64: a header's own first_offset is fine
        raise ValueError(f"expected_offset={expected_offset} is outside [0, 2**64)")
    if max_frame_bytes < 0:
        raise ValueError(f"max_frame_bytes={max_frame_bytes} is negative")


def scan_frames(
    buf: Any,
    start: int,
    end: int,
    expected_offset: int,
    verify_crc: bool = True,
    max_frames: int = -1,
    max_frame_bytes: int = _LENGTH_LIMIT,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Walk the frames of ``buf[start:end]`` (``start`` 64-aligned), validating each header.

    A valid frame has the magic, version 1, only known flags, zero reserved bytes, a length
    that is a multiple of 64, covers its column descriptors, is at most ``max_frame_bytes`` and
    ends by ``end``, a matching CRC (if ``verify_crc``), ``count >= 1`` and ``first_offset``
    equal to the running expected offset (``expected_offset``, then += count). Stops at the
    first invalid frame, at all-zero (unwritten) space, at ``end``, or after ``max_frames``
    (>= 0) frames. Never reads outside ``[start, end)``.

    Returns ``(positions, first_offsets, counts, stop_pos, status)``: one int64 entry per valid
    frame, the byte where the walk stopped and the SCAN_* code saying why. ValueError when
    ``end`` is past the buffer or ``start`` is outside ``[0, end]`` or not 64-aligned.
    """
    start, end, expected = index(start), index(end), index(expected_offset)
    max_frames, max_frame_bytes = index(max_frames), index(max_frame_bytes)
    verify_crc = bool(verify_crc)
    positions: list[int] = []
    first_offsets: list[int] = []
    counts: list[int] = []
    with _bytes_of(buf) as view:
        _check_scan_args(len(view), start, end, expected, max_frame_bytes)
        pos, status = start, SCAN_END
        while pos < end:
            if 0 <= max_frames <= len(positions):
                break
            left = end - pos
            if left < FRAME_HEADER_BYTES:
                status = SCAN_END if _all_zero(view[pos:end]) else SCAN_TRUNCATED
                break
            magic, version, flags, length, crc, first, count, ncols, _ntypes, _ts = (
                _HEADER.unpack_from(view, pos)
            )
            if magic != FRAME_MAGIC:
                status = SCAN_END if _all_zero(view[pos : pos + FRAME_HEADER_BYTES]) else (
                    SCAN_BAD_MAGIC
                )
                break
            if (version != FRAME_VERSION or flags & ~(FRAME_FLAG_TYPE_COLUMN | FRAME_FLAG_SPARSE)
                    or not _all_zero(view[pos + _RESERVED_AT : pos + FRAME_HEADER_BYTES])):
                status = SCAN_BAD_VERSION
                break
            if (length % FRAME_ALIGN or length < FRAME_HEADER_BYTES + COLUMN_DESC_BYTES * ncols
                    or length > max_frame_bytes or length > left):
                status = SCAN_BAD_LENGTH
                break
            if verify_crc and crc32c(view[pos + 16 : pos + length]) != crc:
                status = SCAN_BAD_CRC
                break
            if count == 0 or first != expected or first > _INT64_MAX - count:
                status = SCAN_BAD_OFFSET
                break
            positions.append(pos)
            first_offsets.append(first)
            counts.append(count)
            expected = first + count
            pos += length
    return (
        np.array(positions, np.int64),
        np.array(first_offsets, np.int64),
        np.array(counts, np.int64),
        pos,
        status,
    )


def frame_header(buf: Any, pos: int) -> dict[str, int]:
    """The fields of the frame header at byte ``pos`` of ``buf``, unvalidated (for tooling).

    Raises ValueError when fewer than 64 bytes of ``buf`` start at ``pos``.
    """
    pos = index(pos)
    with _bytes_of(buf) as view:
        if not 0 <= pos <= len(view) - FRAME_HEADER_BYTES:
            raise ValueError(
                f"no 64-byte frame header at byte {pos} of a buffer of {len(view)} bytes"
            )
        fields = _HEADER.unpack_from(view, pos)
    names = ("magic", "version", "flags", "length", "crc", "first_offset", "count", "ncols",
             "ntypes", "timestamp_ns")
    return dict(zip(names, fields))
