"""One shard's log: an ordered list of segments, one writer, many readers.

Readers go through ``read(start, stop)``, which yields ``Batch`` views of exactly the actions
[start, stop) in order (invariant 3); frames are CRC-checked as they are read. The writer
appends encoded frames with ``write_frame`` and rolls to a new preallocated segment when the
current one is full. A NATS JetStream log would implement the same small surface
(``end_offset``, ``start_offset``, ``read``, ``refresh``) and readers would not change.
"""

from __future__ import annotations

import bisect
import os
import time
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ._impl import load
from .errors import CorruptLogError, LogError
from .frame import Batch, ColumnSpec, decode_frame, frame_layout, read_header, write_frame
from .segment import SEG_HEADER_BYTES, Segment, SegmentState, seg_name

_codec = load("codec")


class ShardLog:
    """The segments of one shard under ``directory``."""

    def __init__(self, directory: str, shard: int, segment_bytes: int, writable: bool,
                 schema: Any, dicts: Mapping[str, Any], report: list[str]):
        self.directory = directory
        self.shard = shard
        self.segment_bytes = segment_bytes
        self.writable = writable
        self.schema = schema
        self.dicts = dicts
        self.segments: list[Segment] = []
        self._bases: list[int] = []
        if writable:
            os.makedirs(directory, exist_ok=True)
        self._open_existing(report)

    # -- open / recovery -------------------------------------------------------------------
    def _open_existing(self, report: list[str]) -> None:
        names = sorted(n for n in os.listdir(self.directory) if n.endswith(".seg")) \
            if os.path.isdir(self.directory) else []
        for leftover in (n for n in os.listdir(self.directory) if n.endswith(".tmp")) \
                if self.writable and os.path.isdir(self.directory) else ():
            os.unlink(os.path.join(self.directory, leftover))
        expected = None
        for i, name in enumerate(names):
            path = os.path.join(self.directory, name)
            seg = Segment.open(path, self.shard, self.writable, i == len(names) - 1, report)
            if expected is not None and seg.base != expected:
                seg.close()
                raise CorruptLogError(
                    f"segments are not contiguous: expected one starting at offset {expected}; a "
                    "segment file is missing. Restore it from a backup", path=path,
                    shard=self.shard, offset=expected)
            self.segments.append(seg)
            self._bases.append(seg.base)
            expected = seg.next_offset
        if self.writable and (not self.segments or self.segments[-1].state is not SegmentState.OPEN):
            self._new_segment(self.segments[-1].next_offset if self.segments else 0)

    def _new_segment(self, base: int) -> Segment:
        seg = Segment.create(self.directory, self.shard, base, self.segment_bytes)
        self.segments.append(seg)
        self._bases.append(base)
        return seg

    # -- positions -------------------------------------------------------------------------
    @property
    def end_offset(self) -> int:
        """The offset the next action will get (= number of actions ever appended)."""
        return self.segments[-1].next_offset if self.segments else 0

    @property
    def start_offset(self) -> int:
        """The first offset still stored (> 0 only after retention)."""
        return self.segments[0].base if self.segments else 0

    # -- writing ---------------------------------------------------------------------------
    def write_frame(self, columns: Sequence[ColumnSpec], count: int, ntypes: int) -> int:
        """Encode one frame at the end of the log; returns its first offset."""
        assert self.writable and count > 0
        length, _ = frame_layout(columns)
        seg = self.segments[-1]
        if length > seg.room():
            assert length <= self.segment_bytes - SEG_HEADER_BYTES, "frame larger than a segment"
            self.roll()
            seg = self.segments[-1]
        first = seg.next_offset
        pos = seg.end_pos
        written = write_frame(seg.mm, pos, first, count, ntypes, columns, time.time_ns())
        seg.add_frame(pos, written, first, count)
        return first

    def roll(self) -> None:
        """Seal the open segment (index written, fsync'd) and start a new one."""
        seg = self.segments[-1]
        if seg.frame_count == 0:
            return  # nothing to seal; the empty segment keeps its base offset
        seg.sync()
        seg.seal()
        self._new_segment(seg.next_offset)

    def sync(self) -> None:
        self.segments[-1].sync()

    # -- reading ---------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read-only follower: discover frames and segments written by the writer since."""
        if self.writable:
            return
        if self.segments:
            self.segments[-1].refresh()
        while True:
            nxt = self.end_offset
            path = os.path.join(self.directory, seg_name(nxt))
            if not os.path.exists(path):
                break
            seg = Segment.open(path, self.shard, False, True, [])
            self.segments.append(seg)
            self._bases.append(seg.base)
            if seg.state is not SegmentState.SEALED:
                break

    def read(self, start: int = 0, stop: int | None = None, verify: bool = True) -> Iterator[Batch]:
        """Batches of exactly the actions [start, stop) of this shard, in order."""
        end = self.end_offset if stop is None else min(stop, self.end_offset)
        if start < self.start_offset:
            raise LogError(f"offset {start} is no longer stored (retention); the earliest is "
                           f"{self.start_offset}", shard=self.shard, offset=start)
        pos_off = start
        si = max(0, bisect.bisect_right(self._bases, start) - 1)
        while pos_off < end and si < len(self.segments):
            seg = self.segments[si]
            positions, firsts = seg.frame_index()
            fi = max(0, int(np.searchsorted(firsts, pos_off, side="right")) - 1)
            while fi < len(positions) and pos_off < end:
                batch = self._frame(seg, int(positions[fi]), verify)
                fi += 1
                if batch.end_offset <= pos_off:
                    continue
                if batch.first_offset < pos_off or batch.end_offset > end:
                    batch = batch.between(pos_off, end)
                pos_off = batch.end_offset
                if batch.count:
                    yield batch
            si += 1

    def _frame(self, seg: Segment, pos: int, verify: bool) -> Batch:
        h = read_header(seg.mm, pos)
        if verify:
            if pos + h.length > seg.size or h.length < 64:
                raise CorruptLogError("frame length is out of bounds", path=seg.path,
                                      byte_offset=pos, shard=self.shard, offset=h.first_offset)
            crc = _codec.crc32c(memoryview(seg.mm)[pos + 16 : pos + h.length])
            if crc != h.crc:
                raise CorruptLogError(
                    "frame CRC mismatch: the segment is corrupt; nothing was skipped. Restore "
                    "it from a backup or replica", path=seg.path, byte_offset=pos,
                    shard=self.shard, offset=h.first_offset)
        return decode_frame(seg.mm, pos, self.shard, self.schema, self.dicts, seg.path)

    def frame_positions(self) -> Iterator[tuple[Segment, int]]:
        for seg in self.segments:
            positions, _ = seg.frame_index()
            for p in positions.tolist():
                yield seg, p

    # -- retention -------------------------------------------------------------------------
    def retire_before(self, keep_bytes: int | None, keep_age_s: float | None, now_ns: int) -> list[str]:
        """Delete whole sealed segments beyond the retention limits; returns removed paths."""
        removed: list[str] = []
        sealed = [s for s in self.segments if s.state is SegmentState.SEALED]
        total = sum(s.end_pos for s in self.segments)
        for seg in sealed:
            too_big = keep_bytes is not None and total > keep_bytes
            too_old = False
            if keep_age_s is not None and seg.frame_count:
                last_pos = int(seg.frame_index()[0][-1])
                too_old = (now_ns - read_header(seg.mm, last_pos).timestamp_ns) / 1e9 > keep_age_s
            if not (too_big or too_old):
                break
            total -= seg.end_pos
            seg.transition(SegmentState.RETIRED)
            os.unlink(seg.idx_path)
            os.unlink(seg.path)
            seg.close()
            removed.append(seg.path)
            self.segments.pop(0)
            self._bases.pop(0)
        return removed

    def close(self) -> None:
        for seg in self.segments:
            seg.close()
        self.segments = []
        self._bases = []
