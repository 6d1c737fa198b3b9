"""CRC32C and the frame scanner of log format v1: the pure-Python reference twin of
``engine._codec`` (ext/_codec.pyx). Same names, same results, same exceptions.

It is the test oracle first and the fallback second. ``crc32c_reference`` is a table-driven
CRC32C in plain Python (slow: ~15 MB/s); ``crc32c`` uses the PyPI ``crc32c`` package when it is
importable and the reference otherwise. ``scan_frames`` makes the checks of the native kernel in
the same order, so both report the same status and stop position for any bytes.

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
_RESERVED_AT = 40  # bytes [40, 64) of the header must be zero
_LENGTH_LIMIT = 1 << 32  # bytes; default max_frame_bytes, above any u32 length
_INT64_MAX = (1 << 63) - 1
_UINT32_MAX = (1 << 32) - 1
_UINT64_MAX = (1 << 64) - 1


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
