"""Segments: preallocated, mmap'd files of frames, with a sealed-segment index.

Design note. A segment file ``<base_offset:020d>.seg`` is preallocated (``posix_fallocate``) to
``segment_bytes`` and mapped. Bytes [0, 64) hold a segment header (magic "ENGS", version,
shard, base offset, size, CRC32C); frames follow from byte 64, each 64-byte aligned; unwritten
space is zero. Lifecycle: OPEN (the shard's last segment, appended to) → SEALED (an index file
``<base>.idx`` exists: every frame's first offset and byte position, the end position and the
next offset, CRC32C-protected) → RETIRED (deleted by retention or replaced by compaction).

Creation is crash-safe: a new segment is built under ``<base>.seg.tmp`` (preallocated, header
written, fdatasync'd; ``prepare``) and only then renamed into place (``publish``, then the
directory is fsync'd). A ``<base>.seg`` therefore always has its full size and a header; a crash
leaves at most a ``<base>.seg.tmp``, which the shard log removes (and reports) on open.

Recovery (``Segment.open``): a sealed segment trusts its index (frames are still CRC-checked on
read); a missing or damaged index is rebuilt by a full scan. The open segment is scanned: a torn
or corrupt frame at the tail (nothing valid follows it) is cut off and reported; a bad frame
followed by valid frames is corruption and raises ``CorruptLogError``.
"""

from __future__ import annotations

import enum
import errno
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._impl import load
from .fsutil import fsync_dir
from .errors import CorruptLogError, DiskFullError, LogError
from .frame import ALIGN, FRAME_MAGIC, HEADER_BYTES, read_header

_codec = load("codec")

SEG_MAGIC = 0x53474E45  # b"ENGS"
SEG_VERSION = 1
SEG_HEADER_BYTES = 64
_SEG_HEADER = struct.Struct("<IHHIQQ")  # magic, version, reserved, shard, base, size; crc at 60
IDX_MAGIC = 0x58474E45  # b"ENGX"
_IDX_HEADER = struct.Struct("<IHHQQQI")  # magic, version, reserved, frames, end_pos, next, crc

SCAN_NAMES = {0: "clean end", 1: "bad magic", 2: "bad version", 3: "bad length",
              4: "bad CRC", 5: "offset gap", 6: "truncated"}


class SegmentState(enum.Enum):
    OPEN = "open"
    SEALED = "sealed"
    RETIRED = "retired"


_TRANSITIONS = {
    SegmentState.OPEN: {SegmentState.SEALED, SegmentState.RETIRED},
    SegmentState.SEALED: {SegmentState.RETIRED},
    SegmentState.RETIRED: set(),
}


def seg_name(base: int) -> str:
    return f"{base:020d}.seg"


@dataclass
class Segment:
    """One segment file of one shard. ``positions``/``firsts`` index every frame."""

    path: str
    shard: int
    base: int
    size: int
    writable: bool
    state: SegmentState
    mm: Any
    fd: int
    positions: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    firsts: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    end_pos: int = SEG_HEADER_BYTES  # bytes; first unwritten byte; only grows while OPEN
    next_offset: int = 0  # offset the next frame will start at
    _n: int = 0  # frames indexed (positions/firsts may have spare capacity)
    _tmp: str | None = None  # prepared, not yet published: the temp file's path

    # -- lifecycle -------------------------------------------------------------------------
    def transition(self, to: SegmentState) -> None:
        assert to in _TRANSITIONS[self.state], f"segment {self.path}: {self.state} -> {to}"
        self.state = to

    @classmethod
    def create(cls, directory: str, shard: int, base: int, size: int) -> "Segment":
        """Create, preallocate and map a new OPEN segment starting at offset ``base``."""
        seg = cls.prepare(directory, shard, base, size)
        try:
            seg.publish()
        except BaseException:
            seg.discard()
            raise
        return seg

    @classmethod
    def prepare(cls, directory: str, shard: int, base: int, size: int) -> Segment:
        """Build a new OPEN segment under ``<base>.seg.tmp``: preallocated, mapped, header
        written and fdatasync'd. Nothing is visible under the segment's name until
        ``publish``; ``discard`` removes it.

        Raises DiskFullError (nothing created) if the disk has no room for it.
        """
        path = os.path.join(directory, seg_name(base))
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _preallocate(fd, size, path, shard, base)
        except BaseException:
            os.close(fd)
            _unlink_quiet(tmp)
            raise
        try:
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            _SEG_HEADER.pack_into(mm, 0, SEG_MAGIC, SEG_VERSION, 0, shard, base, size)
            struct.pack_into("<I", mm, 60, _codec.crc32c(memoryview(mm)[:60]))
            os.fdatasync(fd)  # the header is durable before the name is
        except BaseException:
            os.close(fd)
            _unlink_quiet(tmp)
            raise
        seg = cls(path, shard, base, size, True, SegmentState.OPEN, mm, fd)
        seg.next_offset = base
        seg._tmp = tmp
        return seg

    def publish(self) -> None:
        """Rename a prepared segment into place and make the rename durable."""
        tmp = self._tmp
        assert tmp is not None, f"segment {self.path} is not a prepared one"
        if os.path.exists(self.path):
            raise LogError("a segment file with this name already exists; the shard directory "
                           "was changed behind the engine's back", path=self.path, shard=self.shard)
        os.rename(tmp, self.path)
        self._tmp = None
        fsync_dir(os.path.dirname(self.path))

    def discard(self) -> None:
        """Close and remove a prepared, unpublished segment."""
        tmp = self._tmp
        self.close()
        if tmp is not None:
            _unlink_quiet(tmp)
            self._tmp = None

    @classmethod
    def open(cls, path: str, shard: int, writable: bool, is_last: bool,
             report: list[str]) -> "Segment":
        """Map an existing segment, recover or verify it, and index its frames."""
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        size = os.fstat(fd).st_size
        if size < SEG_HEADER_BYTES:
            os.close(fd)
            raise CorruptLogError(
                "segment file is shorter than its header. If it is the shard's last segment and "
                "empty, an engine version before crash-safe segment creation was killed while "
                "creating it: delete the file. Otherwise restore it from a backup or replica",
                path=path, shard=shard)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        base = int(os.path.basename(path).split(".")[0])
        magic, version, _, hshard, hbase, hsize = _SEG_HEADER.unpack_from(mm, 0)
        (hcrc,) = struct.unpack_from("<I", mm, 60)
        ok = (magic == SEG_MAGIC and version == SEG_VERSION and hshard == shard and hbase == base
              and hsize == size and hcrc == _codec.crc32c(memoryview(mm)[:60]))
        seg = cls(path, shard, base, size, writable, SegmentState.OPEN, mm, fd)
        seg.next_offset = base
        if not ok:
            if is_last and not np.frombuffer(mm, np.uint8).any():
                # Crash while creating the segment: nothing was ever written into it.
                report.append(f"{path}: empty segment with no header (crash at creation); reinitialized")
                if writable:
                    _SEG_HEADER.pack_into(mm, 0, SEG_MAGIC, SEG_VERSION, 0, shard, base, size)
                    struct.pack_into("<I", mm, 60, _codec.crc32c(memoryview(mm)[:60]))
                return seg
            seg.close()
            raise CorruptLogError("segment header is corrupt", path=path, byte_offset=0, shard=shard)
        if os.path.exists(seg.idx_path) and seg._load_index(report):
            seg.state = SegmentState.SEALED
            return seg
        seg._recover(is_last, report)
        return seg

    @property
    def idx_path(self) -> str:
        return self.path[: -len(".seg")] + ".idx"

    # -- scanning and recovery -------------------------------------------------------------
    def _recover(self, is_last: bool, report: list[str]) -> None:
        pos, firsts, _counts, stop, status = _codec.scan_frames(
            self.mm, SEG_HEADER_BYTES, self.size, self.base, True)
        self._set_index(pos, firsts, stop, self.base + int(_counts.sum()))
        if status == 0:
            if not is_last:
                # An unsealed segment in the middle: sealing was interrupted. Seal it now.
                report.append(f"{self.path}: index missing; rebuilt from a full scan")
                if self.writable:
                    self.seal()
                else:
                    self.state = SegmentState.SEALED
            return
        why = SCAN_NAMES.get(status, str(status))
        if not is_last or self._valid_frame_after(stop):
            raise CorruptLogError(
                f"corrupt frame ({why}) with valid data after it; nothing was skipped. Restore "
                "the file from a replica/backup, or truncate the shard at this offset",
                path=self.path, byte_offset=stop, shard=self.shard, offset=self.next_offset)
        report.append(f"{self.path}: torn tail frame ({why}) at byte {stop} cut off; "
                      f"shard {self.shard} ends at offset {self.next_offset}")
        if self.writable:
            tail = np.frombuffer(self.mm, np.uint8, self.size - stop, stop)
            nz = np.flatnonzero(tail)
            if len(nz):
                tail[: int(nz[-1]) + 1] = 0
                self.mm.flush()

    def _valid_frame_after(self, stop: int) -> bool:
        """Is there any CRC-valid frame header at a 64-byte boundary past ``stop``?"""
        body = np.frombuffer(self.mm, np.uint8, self.size - stop, stop)
        words = body[: len(body) // ALIGN * ALIGN].view("<u4")[:: ALIGN // 4]
        for hit in np.flatnonzero(words == FRAME_MAGIC).tolist():
            at = stop + hit * ALIGN
            if at == stop:
                continue  # the damaged frame itself
            p, _f, _c, _s, _st = _codec.scan_frames(self.mm, at, self.size, _header_first(self.mm, at),
                                                    True, 1)
            if len(p):
                return True
        return False

    def _set_index(self, positions: np.ndarray, firsts: np.ndarray, end_pos: int, nxt: int) -> None:
        self.positions = np.array(positions, np.int64)
        self.firsts = np.array(firsts, np.int64)
        self._n = len(self.positions)
        self.end_pos = int(end_pos)
        self.next_offset = int(nxt)

    def _load_index(self, report: list[str]) -> bool:
        """Load a sealed segment's index; False (and a report line) if it is damaged."""
        try:
            with open(self.idx_path, "rb") as f:
                raw = f.read()
            magic, version, _, frames, end_pos, nxt, crc = _IDX_HEADER.unpack_from(raw, 0)
            body = raw[_IDX_HEADER.size :]
            good = (magic == IDX_MAGIC and version == 1 and len(body) == 16 * frames
                    and crc == _codec.crc32c(raw[: _IDX_HEADER.size - 4] + body)
                    and SEG_HEADER_BYTES <= end_pos <= self.size and nxt >= self.base)
            if good:
                arr = np.frombuffer(body, "<i8").reshape(-1, 2) if frames else np.empty((0, 2), np.int64)
                firsts, positions = arr[:, 0], arr[:, 1]
                good = bool(
                    (frames == 0 or (firsts[0] == self.base and positions[0] == SEG_HEADER_BYTES))
                    and np.all(np.diff(positions) > 0) and np.all(np.diff(firsts) > 0)
                    and (frames == 0 or positions[-1] < end_pos))
        except (OSError, struct.error):
            good = False
        if not good:
            report.append(f"{self.idx_path}: index damaged; rebuilding it from the segment")
            return False
        self._set_index(positions, firsts, end_pos, nxt)
        return True

    # -- writing ---------------------------------------------------------------------------
    def room(self) -> int:
        return self.size - self.end_pos

    def add_frame(self, pos: int, length: int, first: int, count: int) -> None:
        """Index a frame just written at ``pos`` (writer) or discovered (tailing reader)."""
        assert pos == self.end_pos and first == self.next_offset
        if self._n == len(self.positions):
            cap = max(64, 2 * self._n)
            self.positions = np.resize(self.positions, cap)
            self.firsts = np.resize(self.firsts, cap)
        self.positions[self._n] = pos
        self.firsts[self._n] = first
        self._n += 1
        self.end_pos = pos + length
        self.next_offset = first + count

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise LogError("fdatasync failed; acknowledged writes since the last sync may be "
                           "lost on power failure", path=self.path, shard=self.shard) from exc

    def seal(self) -> None:
        """Write the index file (temp + fsync + rename), then mark SEALED."""
        n = self._n
        body = np.stack([self.firsts[:n], self.positions[:n]], axis=1).astype("<i8").tobytes()
        head = _IDX_HEADER.pack(IDX_MAGIC, 1, 0, n, self.end_pos, self.next_offset, 0)[:-4]
        crc = _codec.crc32c(head + body)
        tmp = self.idx_path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(head + struct.pack("<I", crc) + body)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            _unlink_quiet(tmp)
            if exc.errno in _FULL:
                raise DiskFullError("no space to write the index of a full segment; the segment "
                                    "stays open and keeps every action. Free space and retry",
                                    path=self.idx_path, shard=self.shard,
                                    offset=self.next_offset) from exc
            raise
        os.replace(tmp, self.idx_path)
        fsync_dir(os.path.dirname(self.path))
        if self.state is SegmentState.OPEN:
            self.transition(SegmentState.SEALED)

    # -- reading ---------------------------------------------------------------------------
    @property
    def frame_count(self) -> int:
        return self._n

    def frame_index(self) -> tuple[np.ndarray, np.ndarray]:
        return self.positions[: self._n], self.firsts[: self._n]

    def refresh(self) -> int:
        """Tailing reader: index frames appended (by any process) since. Returns new frames."""
        pos, firsts, counts, _stop, _status = _codec.scan_frames(
            self.mm, self.end_pos, self.size, self.next_offset, True)
        for p, f, c in zip(pos.tolist(), firsts.tolist(), counts.tolist()):
            self.add_frame(p, read_header(self.mm, p).length, f, c)
        return len(pos)

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            pass  # numpy/Arrow views are still alive; the mapping goes when they do
        try:
            os.close(self.fd)
        except OSError:
            pass


def _header_first(mm: Any, pos: int) -> int:
    return struct.unpack_from("<Q", mm, pos + 16)[0]


_FULL = (errno.ENOSPC, errno.EDQUOT)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _preallocate(fd: int, size: int, path: str, shard: int, base: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in _FULL:
            raise DiskFullError("no space to preallocate a new segment; free space and retry",
                                path=path, shard=shard, offset=base) from exc
        raise


assert HEADER_BYTES == 64 and SEG_HEADER_BYTES % ALIGN == 0
