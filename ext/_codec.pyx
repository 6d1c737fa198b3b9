"""CRC32C, the frame encoder and the frame scanner of log format v1 (native; the twin is
engine/_codec_py.py).

Design note. Every entry point takes a generic read-only buffer (PyBUF_SIMPLE), so bytes,
mmap.mmap (read-only too), C-contiguous numpy arrays of any dtype, read-only memmaps and pyarrow
Buffers (format 'b', which a typed `const uint8_t[::1]` would reject) are all raw bytes here.
The scan kernel runs without the GIL and trusts nothing it reads: each header is bounds-checked
against `end` before any byte of it, and a frame's CRC range only after its length has been
checked against the bytes left, so crafted lengths or column counts cannot make it read outside
[start, end). Outputs are owned by the caller: the wrapper hands the kernel int64 arrays with
room for `cap` frames and grows them (doubling) while the kernel reports them full.
The encoder checks every argument and column and holds every buffer before it writes a byte,
then lays the frame out in one C pass (without the GIL from 64 KiB on): it never writes outside
[pos, pos + length) and leaves the buffer untouched when it raises.

Frame header v1, little-endian, 64 bytes:
  0 u32 magic | 4 u16 version | 6 u16 flags | 8 u32 length | 12 u32 crc (of bytes [16, length))
  16 u64 first_offset | 24 u32 count | 28 u16 ncols | 30 u16 ntypes | 32 u64 timestamp_ns
  40..63 reserved, zero. Then ncols descriptors of 32 bytes, then 64-byte aligned buffers.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.number cimport PyNumber_Index
from libc.stdint cimport (
    INT64_MAX, UINT64_MAX, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t,
)
from libc.string cimport memcpy, memset

from operator import index

import numpy as np

cimport numpy as cnp

cnp.import_array()

cdef extern from "crc32c.h" nogil:
    uint32_t engine_crc32c(uint32_t crc, const uint8_t *p, size_t n)
    uint32_t engine_crc32c_sw(uint32_t crc, const uint8_t *p, size_t n)
    int engine_crc32c_hw_available()

__all__ = [
    "crc32c", "encode_frame", "frame_length", "scan_frames", "frame_header", "FRAME_MAGIC",
    "FRAME_VERSION", "FRAME_HEADER_BYTES", "COLUMN_DESC_BYTES", "FRAME_ALIGN",
    "FRAME_FLAG_TYPE_COLUMN", "FRAME_FLAG_SPARSE", "SCAN_END", "SCAN_BAD_MAGIC", "SCAN_BAD_VERSION",
    "SCAN_BAD_LENGTH", "SCAN_BAD_CRC", "SCAN_BAD_OFFSET", "SCAN_TRUNCATED",
]

cdef enum:
    _MAGIC = 0x46474E45  # b"ENGF" read as a little-endian u32
    _VERSION = 1
    _HEADER_BYTES = 64
    _DESC_BYTES = 32
    _ALIGN = 64
    _FLAGS_KNOWN = 3  # bit 0: a type column is present; bit 1: sparse (compacted) rows
    _RESERVED_AT = 40  # bytes [40, 64) of the header must be zero
    _END = 0
    _BAD_MAGIC = 1
    _BAD_VERSION = 2
    _BAD_LENGTH = 3
    _BAD_CRC = 4
    _BAD_OFFSET = 5
    _TRUNCATED = 6
    _FULL = -1  # kernel only: the output arrays are full, call again with more room

FRAME_MAGIC = _MAGIC
FRAME_VERSION = _VERSION
FRAME_HEADER_BYTES = _HEADER_BYTES
COLUMN_DESC_BYTES = _DESC_BYTES
FRAME_ALIGN = _ALIGN
FRAME_FLAG_TYPE_COLUMN = 1
FRAME_FLAG_SPARSE = 2
SCAN_END = _END  # reached `end`, or unwritten (all-zero) space at the stop position
SCAN_BAD_MAGIC = _BAD_MAGIC
SCAN_BAD_VERSION = _BAD_VERSION  # also unknown flags or non-zero reserved bytes
SCAN_BAD_LENGTH = _BAD_LENGTH
SCAN_BAD_CRC = _BAD_CRC
SCAN_BAD_OFFSET = _BAD_OFFSET  # first_offset != expected, count == 0, or first+count > 2**63-1
SCAN_TRUNCATED = _TRUNCATED

_LENGTH_LIMIT = 0x1_0000_0000  # bytes; default max_frame_bytes, above any u32 length
cdef Py_ssize_t _GIL_FREE_BYTES = 64 << 10  # crc32c releases the GIL at or above this size
cdef Py_ssize_t _FIRST_CAP = 256  # frames; first capacity of the scan's output arrays


# ---- crc32c -----------------------------------------------------------------------------------

cdef uint32_t _crc_buffer(object data, uint32_t value, bint software) except? 0:
    cdef Py_buffer view
    cdef const uint8_t *p
    cdef size_t n
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        p = <const uint8_t *>view.buf
        n = <size_t>view.len
        if software:
            with nogil:
                value = engine_crc32c_sw(value, p, n)
        elif view.len >= _GIL_FREE_BYTES:
            with nogil:
                value = engine_crc32c(value, p, n)
        else:
            value = engine_crc32c(value, p, n)
    finally:
        PyBuffer_Release(&view)
    return value


cdef uint32_t _check_value(object value) except? 0:
    value = index(value)  # Cython's own uint32_t conversion would truncate a float
    if not 0 <= value <= 0xFFFFFFFF:
        raise OverflowError(f"crc32c value={value} is outside [0, 2**32)")
    return value


def crc32c(data, value=0):
    """CRC32C (Castagnoli) of the bytes of ``data``, continuing from ``value``.

    ``crc32c(b, crc32c(a)) == crc32c(a + b)``; ``crc32c(b"") == 0``. ``data`` is any
    C-contiguous buffer, read as raw bytes; the GIL is released above 64 KiB.
    """
    return _crc_buffer(data, _check_value(value), False)


def _crc32c_sw(data, value=0):
    """``crc32c`` forced onto the portable slicing-by-8 path (for tests and benchmarks)."""
    return _crc_buffer(data, _check_value(value), True)


def _crc32c_hw_available():
    """True when ``crc32c`` uses the SSE4.2 instruction on this machine."""
    return engine_crc32c_hw_available() != 0


# ---- frame encoding ---------------------------------------------------------------------------

cdef enum:
    _NKINDS = 17
    _NCOLS_MAX = 0xFFFF

# Bytes per row of each column kind of format v1 (index = kind); 0: variable-length (13 string,
# 14 bytes: int32 offsets in aux, bytes in data). Kinds from _NKINDS on are unknown.
cdef uint8_t _KIND_BYTES[_NKINDS]
_KIND_BYTES[:] = [2, 1, 2, 4, 8, 1, 2, 4, 8, 4, 8, 1, 8, 0, 0, 8, 8]


cdef struct _Column:
    const uint8_t *data
    const uint8_t *aux  # the int32 offsets of a variable-length kind; unused when aux_len == 0
    uint64_t data_off, data_len, aux_off, aux_len  # bytes; offsets from the frame start
    uint32_t rows
    uint16_t type_id, field_index
    uint8_t kind


cdef struct _Frame:
    _Column *cols
    Py_buffer *views  # the column buffers held; views[:held] are released by _release
    Py_ssize_t ncols, held
    uint64_t length  # bytes, a multiple of 64


cdef struct _Head:
    uint64_t pos, first_offset, count, ntypes, flags, timestamp_ns


cdef inline uint64_t _align(uint64_t n) noexcept nogil:
    return (n + _ALIGN - 1) & ~(<uint64_t>_ALIGN - 1)


cdef inline void _put16(uint8_t *p, uint64_t v) noexcept nogil:
    p[0] = <uint8_t>v
    p[1] = <uint8_t>(v >> 8)


cdef inline void _put32(uint8_t *p, uint64_t v) noexcept nogil:
    _put16(p, v)
    _put16(p + 2, v >> 16)


cdef inline void _put64(uint8_t *p, uint64_t v) noexcept nogil:
    _put32(p, v)
    _put32(p + 4, v >> 32)


cdef int _arg(object value, uint64_t top, str name, Py_ssize_t col, uint64_t *out) except -1:
    """``*out = value`` if it is an integer in [0, top]; ValueError (TypeError) otherwise."""
    cdef int overflow = 0
    cdef long long v
    value = PyNumber_Index(value)
    v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow == 0 and v >= 0 and <uint64_t>v <= top:
        out[0] = <uint64_t>v
        return 0
    if overflow > 0 and value <= top:  # above INT64_MAX, still a valid u64
        out[0] = value
        return 0
    where = f"column {col}: " if col >= 0 else ""
    raise ValueError(f"{where}{name}={value} is outside [0, {top}]")


cdef inline Py_buffer *_hold(object obj, _Frame *f) except NULL:
    cdef Py_buffer *view = &f.views[f.held]
    PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
    f.held += 1
    return view


cdef void _release(_Frame *f) noexcept:
    cdef Py_ssize_t i
    for i in range(f.held):
        PyBuffer_Release(&f.views[i])
    f.held = 0
    PyMem_Free(f.cols)
    f.cols = NULL


cdef int _column(Py_ssize_t i, object col, _Column *c, _Frame *f) except -1:
    """Check column ``i`` (a 6-tuple), hold its buffers and fill ``c`` but its offsets."""
    cdef uint64_t v, rows, item
    cdef Py_buffer *data
    cdef Py_buffer *aux
    cdef int64_t end
    cdef tuple t
    if not isinstance(col, tuple) or len(<tuple>col) != 6:
        raise TypeError(f"column {i}: expected a tuple (type_id, field_index, kind, rows, data, "
                        f"aux), got {type(col).__name__}")
    t = <tuple>col
    _arg(t[0], 0xFFFF, "type_id", i, &v)
    c.type_id = <uint16_t>v
    _arg(t[1], 0xFFFF, "field_index", i, &v)
    c.field_index = <uint16_t>v
    _arg(t[2], 0xFF, "kind", i, &v)
    c.kind = <uint8_t>v
    _arg(t[3], 0xFFFFFFFF, "rows", i, &rows)
    c.rows = <uint32_t>rows
    data = _hold(t[4], f)
    c.data = <const uint8_t *>data.buf
    if c.kind >= _NKINDS:
        raise ValueError(f"column {i}: kind {c.kind} is not a column kind of format v1")
    item = _KIND_BYTES[c.kind]
    if item:
        if t[5] is not None:
            raise ValueError(f"column {i}: kind {c.kind} is fixed-width, so aux must be None")
        if <uint64_t>data.len != item * rows:
            raise ValueError(f"column {i}: data has {data.len} bytes, but {rows} rows of "
                             f"kind {c.kind} need {item * rows}")
        c.aux, c.aux_len, c.data_len = NULL, 0, data.len
        return 0
    if t[5] is None:
        raise ValueError(f"column {i}: kind {c.kind} is variable-length, so aux must be its "
                         "int32 offsets (rows + 1 of them)")
    aux = _hold(t[5], f)
    c.aux, c.aux_len = <const uint8_t *>aux.buf, aux.len
    if c.aux_len != 4 * (rows + 1):
        raise ValueError(f"column {i}: aux has {c.aux_len} bytes, but {rows} rows need "
                         f"4 * (rows + 1) = {4 * (rows + 1)}")
    end = <int32_t>_u32(c.aux + 4 * rows)
    if not 0 <= end <= data.len:
        raise ValueError(f"column {i}: offsets[rows]={end} is outside [0, len(data)="
                         f"{data.len}]")
    c.data_len = <uint64_t>end
    return 0


cdef int _gather(object columns, _Frame *f) except -1:
    """Check every column, hold its buffers and place them: fills ``f``; _release undoes it."""
    cdef Py_ssize_t i, n
    cdef uint64_t pos
    cdef _Column *c
    if not isinstance(columns, (list, tuple)):
        columns = list(columns)
    n = len(columns)
    if n > _NCOLS_MAX:
        raise ValueError(f"{n} columns: a frame holds at most {_NCOLS_MAX}")
    # one block: the columns, then room for two buffers (data, aux) per column
    f.cols = <_Column *>PyMem_Malloc(n * (sizeof(_Column) + 2 * sizeof(Py_buffer)) + 1)
    if f.cols == NULL:
        raise MemoryError()
    f.views = <Py_buffer *>(f.cols + n)
    f.ncols, f.held = n, 0
    pos = _align(_HEADER_BYTES + _DESC_BYTES * n)
    for i in range(n):
        c = &f.cols[i]
        _column(i, columns[i], c, f)
        c.aux_off = 0
        if c.aux_len:
            c.aux_off = pos
            pos = _align(pos + c.aux_len)
        c.data_off = pos
        pos = _align(pos + c.data_len)
        if pos > 0xFFFFFFFF:  # checked per column, so the sums above never overflow
            raise ValueError(f"column {i} ends at byte {pos} of the frame: a frame holds at "
                             f"most {0xFFFFFFFF} bytes")
    f.length = max(pos, <uint64_t>_ALIGN)
    return 0


cdef void _pad(uint8_t *p, uint64_t end) noexcept nogil:
    memset(p + end, 0, _align(end) - end)


cdef void _write(uint8_t *p, const _Frame *f, const _Head *h) noexcept nogil:
    """Lay the checked frame ``f`` out at ``p`` (its ``f.length`` bytes are all written)."""
    cdef Py_ssize_t i
    cdef const _Column *c
    cdef uint8_t *d
    # header, descriptors and their padding: zero, then the non-zero fields are stored
    memset(p, 0, _align(_HEADER_BYTES + _DESC_BYTES * f.ncols))
    for i in range(f.ncols):
        c = &f.cols[i]
        d = p + _HEADER_BYTES + _DESC_BYTES * i
        _put16(d, c.type_id)
        _put16(d + 2, c.field_index)
        d[4] = c.kind
        _put32(d + 8, c.rows)
        _put32(d + 12, c.data_off)
        _put32(d + 16, c.data_len)
        _put32(d + 20, c.aux_off)
        _put32(d + 24, c.aux_len)
        if c.aux_len:
            memcpy(p + c.aux_off, c.aux, c.aux_len)
            _pad(p, c.aux_off + c.aux_len)
        if c.data_len:
            memcpy(p + c.data_off, c.data, c.data_len)
        _pad(p, c.data_off + c.data_len)
    _put32(p, _MAGIC)
    _put16(p + 4, _VERSION)
    _put16(p + 6, h.flags)
    _put32(p + 8, f.length)
    _put64(p + 16, h.first_offset)
    _put32(p + 24, h.count)
    _put16(p + 28, f.ncols)
    _put16(p + 30, h.ntypes)
    _put64(p + 32, h.timestamp_ns)
    _put32(p + 12, engine_crc32c(0, p + 16, f.length - 16))


def frame_length(columns):
    """The length in bytes of the frame ``encode_frame`` would write for ``columns``.

    Checks the columns as ``encode_frame`` does and raises the same errors.
    """
    cdef _Frame f
    f.cols, f.held = NULL, 0
    try:
        _gather(columns, &f)
    finally:
        _release(&f)
    return f.length


def encode_frame(buf, pos, first_offset, count, ntypes, flags, timestamp_ns, columns):
    """Encode one frame into the writable buffer ``buf`` at byte ``pos``; returns its length.

    ``columns``: a sequence of ``(type_id, field_index, kind, rows, data, aux)`` tuples.
    ``data`` is any C-contiguous buffer whose raw bytes are copied. ``aux`` is None for a
    fixed-width kind (then ``data`` holds exactly ``rows`` values of the kind's width), or for
    kinds 13 (string) and 14 (bytes) the little-endian int32 offsets buffer (``rows + 1``
    entries, the first 0); the first ``offsets[rows]`` bytes of ``data`` are copied.

    Layout: a 64-byte header, one 32-byte descriptor per column, then each column's aux and
    data buffers, each 64-byte aligned; length = the aligned end. Only the header, the
    descriptors and the padding are zeroed: no byte outside ``[pos, pos + length)`` is touched.
    The CRC32C of bytes ``[16, length)`` is written last, at ``pos + 12``. The GIL is released
    for frames of 64 KiB or more.

    Everything is checked before any byte is written: TypeError for a read-only ``buf``, a
    column that is not a 6-tuple, non-integers; ValueError for values outside their field,
    an unknown kind, a wrong aux or data size, a frame over 2**32 - 1 bytes, or a frame that
    does not fit ``buf`` at ``pos``; the buffer protocol's errors for non-contiguous buffers.
    """
    cdef _Head h
    cdef _Frame f
    cdef Py_buffer out
    cdef uint8_t *p
    _arg(pos, INT64_MAX, "pos", -1, &h.pos)
    _arg(first_offset, UINT64_MAX, "first_offset", -1, &h.first_offset)
    _arg(count, 0xFFFFFFFF, "count", -1, &h.count)
    _arg(ntypes, 0xFFFF, "ntypes", -1, &h.ntypes)
    _arg(flags, 0xFFFF, "flags", -1, &h.flags)
    _arg(timestamp_ns, UINT64_MAX, "timestamp_ns", -1, &h.timestamp_ns)
    PyObject_GetBuffer(buf, &out, PyBUF_SIMPLE)
    f.cols, f.held = NULL, 0
    try:
        if out.readonly:
            raise TypeError("buf is read-only: encode_frame needs a writable buffer (a "
                            "segment's mmap or a bytearray)")
        _gather(columns, &f)
        if h.pos + f.length > <uint64_t>out.len:
            raise ValueError(f"a frame of {f.length} bytes at pos={h.pos} does not fit a buffer "
                             f"of {out.len} bytes")
        p = <uint8_t *>out.buf + h.pos
        if f.length >= <uint64_t>_GIL_FREE_BYTES:
            with nogil:
                _write(p, &f, &h)
        else:
            _write(p, &f, &h)
    finally:
        _release(&f)
        PyBuffer_Release(&out)
    return f.length


# ---- frame scanning ---------------------------------------------------------------------------

cdef inline uint16_t _u16(const uint8_t *p) noexcept nogil:
    return <uint16_t>(p[0] | (p[1] << 8))


cdef inline uint32_t _u32(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint64_t _u64(const uint8_t *p) noexcept nogil:
    return _u32(p) | (<uint64_t>_u32(p + 4) << 32)


cdef inline bint _all_zero(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    cdef uint8_t acc = 0
    cdef Py_ssize_t i
    for i in range(n):
        acc |= p[i]
    return acc == 0


cdef struct _Cursor:
    Py_ssize_t pos  # bytes from the buffer start; the next frame to check
    Py_ssize_t end  # bytes; nothing at or past it is read
    uint64_t expected  # shard offset the next frame must start at
    uint64_t frame_bytes_max  # bytes; a longer frame is SCAN_BAD_LENGTH
    bint verify_crc
    Py_ssize_t nframes  # frames written to the outputs so far


cdef int _scan_kernel(
    int64_t *positions, int64_t *first_offsets, int64_t *counts, Py_ssize_t cap,
    const uint8_t *base, _Cursor *c,
) noexcept nogil:
    """Append valid frames to outputs[c.nframes:cap]; return a SCAN_* status, or _FULL."""
    cdef const uint8_t *h
    cdef Py_ssize_t left
    cdef uint64_t length, first, count
    while c.pos < c.end:
        if c.nframes >= cap:
            return _FULL
        h = base + c.pos
        left = c.end - c.pos
        if left < _HEADER_BYTES:
            return _END if _all_zero(h, left) else _TRUNCATED
        if _u32(h) != _MAGIC:
            return _END if _all_zero(h, _HEADER_BYTES) else _BAD_MAGIC
        if (_u16(h + 4) != _VERSION or (_u16(h + 6) & ~_FLAGS_KNOWN) != 0
                or not _all_zero(h + _RESERVED_AT, _HEADER_BYTES - _RESERVED_AT)):
            return _BAD_VERSION
        length = _u32(h + 8)
        if (length % _ALIGN != 0 or length < _HEADER_BYTES + _DESC_BYTES * <uint64_t>_u16(h + 28)
                or length > c.frame_bytes_max or length > <uint64_t>left):
            return _BAD_LENGTH
        if c.verify_crc and engine_crc32c(0, h + 16, length - 16) != _u32(h + 12):
            return _BAD_CRC
        first = _u64(h + 16)
        count = _u32(h + 24)
        if count == 0 or first != c.expected or first > INT64_MAX - count:
            return _BAD_OFFSET
        positions[c.nframes] = c.pos
        first_offsets[c.nframes] = <int64_t>first
        counts[c.nframes] = <int64_t>count
        c.nframes += 1
        c.expected = first + count
        c.pos += <Py_ssize_t>length
    return _END


cdef int _check_scan_args(nbytes, start, end, expected_offset, max_frame_bytes) except -1:
    if not 0 <= end <= nbytes:
        raise ValueError(f"end={end} is outside the buffer of {nbytes} bytes")
    if not 0 <= start <= end:
        raise ValueError(f"start={start} is outside [0, end={end}]")
    if start % _ALIGN:
        raise ValueError(f"start={start} is not a multiple of {_ALIGN}: frames are aligned")
    if not 0 <= expected_offset <= UINT64_MAX:  # any u64: a header's own first_offset is fine
        raise ValueError(f"expected_offset={expected_offset} is outside [0, 2**64)")
    if max_frame_bytes < 0:
        raise ValueError(f"max_frame_bytes={max_frame_bytes} is negative")
    return 0


cdef inline cnp.ndarray _empty(Py_ssize_t n):
    cdef cnp.npy_intp dims = n
    return cnp.PyArray_EMPTY(1, &dims, cnp.NPY_INT64, 0)


cdef inline cnp.ndarray _grown(cnp.ndarray a, Py_ssize_t n):
    cdef cnp.ndarray b = _empty(n)
    b[: a.shape[0]] = a
    return b


cdef inline int64_t *_data(cnp.ndarray a) noexcept:
    return <int64_t *>cnp.PyArray_DATA(a)


def scan_frames(buf, start, end, expected_offset, verify_crc=True, max_frames=-1,
                max_frame_bytes=_LENGTH_LIMIT):
    """Walk the frames of ``buf[start:end]`` (``start`` 64-aligned), validating each header.

    Stops at the first invalid frame, at all-zero (unwritten) space, at ``end``, or after
    ``max_frames`` (>= 0) frames; never reads outside ``[start, end)``. Each frame's
    ``first_offset`` must equal the running expected offset (``expected_offset``, += count).
    Returns ``(positions, first_offsets, counts, stop_pos, status)``: one int64 entry per valid
    frame, the byte where the walk stopped and the SCAN_* code saying why. ValueError when
    ``end`` is past the buffer or ``start`` is outside ``[0, end]`` or not 64-aligned.
    """
    cdef Py_buffer view
    cdef _Cursor c
    cdef cnp.ndarray positions, first_offsets, counts
    cdef Py_ssize_t cap, limit, room
    cdef int64_t *pos_p
    cdef int64_t *first_p
    cdef int64_t *count_p
    cdef int status
    start, end, expected_offset = index(start), index(end), index(expected_offset)
    max_frames, max_frame_bytes = index(max_frames), index(max_frame_bytes)
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        _check_scan_args(view.len, start, end, expected_offset, max_frame_bytes)
        c.pos, c.end, c.expected = start, end, expected_offset
        c.frame_bytes_max = min(max_frame_bytes, _LENGTH_LIMIT)  # larger is moot: length is u32
        c.verify_crc = bool(verify_crc)
        c.nframes = 0
        room = (end - start) // _ALIGN + 1  # frames; more than fit, so never the binding limit
        limit = max_frames if 0 <= max_frames < room else room
        cap = min(_FIRST_CAP, limit)
        positions, first_offsets, counts = _empty(cap), _empty(cap), _empty(cap)
        while True:
            pos_p, first_p, count_p = _data(positions), _data(first_offsets), _data(counts)
            with nogil:
                status = _scan_kernel(pos_p, first_p, count_p, cap, <const uint8_t *>view.buf, &c)
            if status != _FULL:
                break
            if c.nframes >= limit:  # max_frames reached
                status = _END
                break
            cap = min(2 * cap, limit)
            positions, first_offsets, counts = (
                _grown(positions, cap), _grown(first_offsets, cap), _grown(counts, cap)
            )
    finally:
        PyBuffer_Release(&view)
    if c.nframes < cap:  # hand back no more memory than needed; no views of them exist
        for a in (positions, first_offsets, counts):
            a.resize(c.nframes, refcheck=False)
    return positions, first_offsets, counts, c.pos, status


def frame_header(buf, pos):
    """The fields of the frame header at byte ``pos`` of ``buf``, unvalidated (for tooling).

    Raises ValueError when fewer than 64 bytes of ``buf`` start at ``pos``.
    """
    cdef Py_buffer view
    cdef const uint8_t *h
    pos = index(pos)
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        if not 0 <= pos <= view.len - _HEADER_BYTES:
            raise ValueError(
                f"no 64-byte frame header at byte {pos} of a buffer of {view.len} bytes"
            )
        h = <const uint8_t *>view.buf + <Py_ssize_t>pos
        return {
            "magic": _u32(h),
            "version": _u16(h + 4),
            "flags": _u16(h + 6),
            "length": _u32(h + 8),
            "crc": _u32(h + 12),
            "first_offset": _u64(h + 16),
            "count": _u32(h + 24),
            "ncols": _u16(h + 28),
            "ntypes": _u16(h + 30),
            "timestamp_ns": _u64(h + 32),
        }
    finally:
        PyBuffer_Release(&view)
