"""Type stubs of the native ``engine._codec`` (ext/_codec.pyx); twin: engine/_codec_py.py.

Hand-written and checked against the compiled module by ``python -m mypy.stubtest`` (see
tests/test_stubs.py). Integer arguments go through ``operator.index`` at run time, so they are
``SupportsIndex`` (numpy integers are fine). Byte buffers are any C-contiguous buffer, read as
raw bytes; ``np.ndarray`` is listed explicitly because numpy only declares ``__buffer__`` for
Python >= 3.12.
"""

from collections.abc import Iterable
from typing import Any, Final, SupportsIndex, TypeAlias, TypedDict, type_check_only

import numpy as np
from numpy.typing import NDArray
from typing_extensions import Buffer

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

_Bytes: TypeAlias = Buffer | np.ndarray[Any, Any]

# (type_id, field_index, kind, rows, data, aux): aux is None for fixed-width kinds, the int32
# offsets buffer (rows + 1 entries) for kinds 13 (string) and 14 (bytes).
_Column: TypeAlias = tuple[
    SupportsIndex, SupportsIndex, SupportsIndex, SupportsIndex, _Bytes, _Bytes | None
]

@type_check_only
class _FrameHeader(TypedDict):
    """What ``frame_header`` returns: the header fields, unvalidated."""

    magic: int
    version: int
    flags: int
    length: int
    crc: int
    first_offset: int
    count: int
    ncols: int
    ntypes: int
    timestamp_ns: int

FRAME_MAGIC: Final = 1179078213  # 0x46474E45, b"ENGF" read as a little-endian u32
FRAME_VERSION: Final = 1
FRAME_HEADER_BYTES: Final = 64
COLUMN_DESC_BYTES: Final = 32
FRAME_ALIGN: Final = 64
FRAME_FLAG_TYPE_COLUMN: Final = 1
FRAME_FLAG_SPARSE: Final = 2
SCAN_END: Final = 0
SCAN_BAD_MAGIC: Final = 1
SCAN_BAD_VERSION: Final = 2
SCAN_BAD_LENGTH: Final = 3
SCAN_BAD_CRC: Final = 4
SCAN_BAD_OFFSET: Final = 5
SCAN_TRUNCATED: Final = 6

def crc32c(data: _Bytes, value: SupportsIndex = 0) -> int: ...
def frame_length(columns: Iterable[_Column]) -> int: ...
def encode_frame(
    buf: _Bytes,  # must be writable (a segment's mmap, a bytearray): TypeError otherwise
    pos: SupportsIndex,
    first_offset: SupportsIndex,
    count: SupportsIndex,
    ntypes: SupportsIndex,
    flags: SupportsIndex,
    timestamp_ns: SupportsIndex,
    columns: Iterable[_Column],
) -> int: ...
def scan_frames(
    buf: _Bytes,
    start: SupportsIndex,
    end: SupportsIndex,
    expected_offset: SupportsIndex,
    verify_crc: bool = True,
    max_frames: SupportsIndex = -1,
    max_frame_bytes: SupportsIndex = 4294967296,
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], int, int]:
    """(positions, first_offsets, counts, stop_pos, status): one int64 entry per valid frame."""

def frame_header(buf: _Bytes, pos: SupportsIndex) -> _FrameHeader: ...

# Private helpers the tests use (not in __all__, not in the twin).
def _crc32c_sw(data: _Bytes, value: SupportsIndex = 0) -> int: ...
def _crc32c_hw_available() -> bool: ...
