"""One shard's log: an ordered list of segments, one writer, many readers.

Readers go through ``read(start, stop)``, which yields ``Batch`` views of exactly the actions
[start, stop) in order (invariant 3); frames are CRC-checked as they are read, and each frame's
header must agree with the segment's index (first and end offset). The writer appends encoded
frames with ``write_frame`` and rolls to a new preallocated segment when the current one is
full. A NATS JetStream log would implement the same small surface (``end_offset``,
``start_offset``, ``read``, ``refresh``) and readers would not change.

Rolling is ordered so that a failure at any step keeps every action: the new segment is
prepared under a temp name first (a full disk fails here, and the open segment stays open and
writable), then the old segment is sealed (index written), then the new one is renamed into
place. ``write_frame`` only ever writes into an OPEN segment.

Temp files (``*.tmp``: a segment being created, an index or a compaction being written) are
removed on open; a ``<base>.seg.tmp`` is reported as a crash at creation.

Key ids. On open, the newest frames are checked against the key dictionaries (every frame, if a
dictionary had to cut a damaged last record): a frame using an id the dictionary does not have
means the dictionary lost records that the log uses, and new keys would silently reuse those
ids, so the open is refused with ``CorruptLogError`` naming the ``.keys`` file. (A read-only
follower first re-reads the dictionaries: the writer may have added keys, and frames using
them, since they were read.)
"""

from __future__ import annotations

import bisect
import os
import re
import struct
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from . import clock
from ._impl import load
from .errors import CorruptLogError, LogError
from .frame import (
    FRAME_MAGIC,
    FRAME_VERSION,
    HEADER_BYTES,
    Batch,
    ColumnSpec,
    decode_frame,
    frame_size,
    read_header,
    write_frame,
)
from .frame import TYPE_COLUMN_FIELD, Var
from .segment import SEG_HEADER_BYTES, Segment, SegmentState, seg_name

TAIL_ROWS = 256  # frames this small are kept as written for the next read

_codec = load("codec")

KEY_CHECK_FRAMES = 16  # newest frames per shard checked against the key dictionaries on open
_MAGIC_VERSION = struct.Struct("<IH")
_CREATING = re.compile(r"^\d{20}\.seg\.tmp$")  # a segment being created (see Segment.prepare)


class ShardLog:
    """The segments of one shard under ``directory``."""

    def __init__(self, directory: str, shard: int, segment_bytes: int, writable: bool,
                 schema: Any, dicts: Mapping[str, Any], report: list[str]):
        self.directory = directory
        self.shard = shard
        self.segment_bytes = segment_bytes
        self.writable = writable
        self._tail: tuple[Any, int, Batch] | None = None  # (segment, position, batch) of the newest small frame
        self.schema = schema
        self.dicts = dicts
        self.segments: list[Segment] = []
        self._bases: list[int] = []
        if writable:
            os.makedirs(directory, exist_ok=True)
        try:
            self._open_existing(report)
            self._check_key_ids()
        except BaseException:
            self.close()
            raise

    # -- open / recovery -------------------------------------------------------------------
    def _open_existing(self, report: list[str]) -> None:
        listing = sorted(os.listdir(self.directory)) if os.path.isdir(self.directory) else []
        names = [n for n in listing if n.endswith(".seg")]
        for leftover in (n for n in listing if n.endswith(".tmp")):
            path = os.path.join(self.directory, leftover)
            if _CREATING.match(leftover):
                # killed between preparing a new segment and renaming it into place: it never
                # held a frame (nothing is written into a segment before it is published)
                report.append(f"{path}: unfinished new segment (crash at creation)"
                              + ("; removed" if self.writable else ""))
            if self.writable:  # index and compaction temps: never the only copy
                os.unlink(path)
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

    # -- key ids ---------------------------------------------------------------------------
    def _key_columns(self) -> dict[int, list[tuple[int, str]]]:
        """type id -> [(field index, key domain)] of every key field of the schema."""
        out: dict[int, list[tuple[int, str]]] = {}
        for at in self.schema:
            for f, domain in at.key_fields.items():
                if domain in self.dicts:
                    t = self.schema.type_id(at.name)
                    out.setdefault(t, []).append((at.field_index(f), domain))
        return out

    def _newest_frames(self, limit: int | None) -> Iterator[tuple[Segment, int]]:
        """(segment, position) of the newest ``limit`` frames (all if None), newest first."""
        n = 0
        for seg in reversed(self.segments):
            positions, _ = seg.frame_index()
            for p in reversed(positions.tolist()):
                if limit is not None and n >= limit:
                    return
                n += 1
                yield seg, p

    def _key_id_use(self, domains: Sequence[str], limit: int | None,
                    beyond: Mapping[str, int] | None = None,
                    ) -> tuple[dict[str, int], tuple[str, int, Segment, int] | None]:
        """Largest key id per domain used by the newest ``limit`` frames (all if None), and,
        if ``beyond`` is given, the first frame (newest first) using an id >= beyond[domain]:
        (maxima, (domain, id, segment, position) or None).

        A frame that does not decode is skipped: its corruption is raised when it is read.
        """
        want = set(domains)
        cols = {t: [(i, d) for i, d in fl if d in want] for t, fl in self._key_columns().items()}
        cols = {t: fl for t, fl in cols.items() if fl}
        maxima = {d: -1 for d in domains}
        if not cols:
            return maxima, None
        for seg, pos in self._newest_frames(limit):
            try:
                batch = decode_frame(seg.mm, pos, self.shard, self.schema, self.dicts, seg.path)
            except CorruptLogError:
                continue
            for t, fl in cols.items():
                tcols = batch._cols.get(t)
                if not tcols:
                    continue
                for fidx, d in fl:
                    v = tcols.get(fidx)
                    if v is None or not len(v):
                        continue
                    m = int(v.max())
                    maxima[d] = max(maxima[d], m)
                    if (beyond is not None and d in beyond and m >= beyond[d]
                            and self._crc_ok(seg, pos)):
                        return maxima, (d, m, seg, pos)
        return maxima, None

    def max_key_ids(self, domains: Sequence[str], limit: int | None = None) -> dict[str, int]:
        """Largest key id of each domain used by the shard's newest ``limit`` frames (every
        frame if None); -1 for a domain no such frame uses."""
        return self._key_id_use(domains, limit)[0]

    def _check_key_ids(self) -> None:
        """Refuse a log whose frames use key ids its dictionaries do not have (see above)."""
        if not self.dicts or not self.segments:
            return
        every = any(kd.cut_from_id is not None for kd in self.dicts.values())
        for _attempt in range(3):
            sizes = {d: len(kd) for d, kd in self.dicts.items()}
            _, hit = self._key_id_use(list(self.dicts), None if every else KEY_CHECK_FRAMES, sizes)
            if hit is None:
                return
            if self.writable:  # the only writer: the dictionaries cannot have grown meanwhile
                break
            for kd in self.dicts.values():  # a follower: the writer may have added keys since
                kd.refresh()
        assert hit is not None
        d, m, seg, pos = hit
        kd = self.dicts[d]
        kd.refuse_cut()
        was_cut = (f"a damaged last record (ids from {kd.cut_from_id}) was cut"
                   if kd.cut_from_id is not None else "records are missing")
        raise CorruptLogError(
            f"key dictionary of domain {d!r} has {len(kd)} keys but the frame at byte {pos} of "
            f"{seg.path} (shard {self.shard}) uses key id {m}: {was_cut}. New keys would reuse "
            "ids that the log already uses, so nothing was changed. Restore the .keys file from "
            "a backup or replica", path=kd.path)

    def _crc_ok(self, seg: Segment, pos: int) -> bool:
        h = read_header(seg.mm, pos)
        if h.length < HEADER_BYTES or pos + h.length > seg.size:
            return False
        return _codec.crc32c(memoryview(seg.mm)[pos + 16 : pos + h.length]) == h.crc

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
    def write_frame(self, columns: Sequence[ColumnSpec], count: int, ntypes: int,
                    owned: bool = False) -> int:
        """Encode one frame at the end of the log; returns its first offset. ``owned``: the
        column arrays are the log's own (nobody else holds them), so the newest-frame cache
        may keep them instead of copies."""
        assert self.writable and count > 0
        length, tuples = frame_size(columns)
        seg = self.segments[-1]
        if seg.state is not SegmentState.OPEN or length > seg.room():
            assert length <= self.segment_bytes - SEG_HEADER_BYTES, "frame larger than a segment"
            self.roll()  # also replaces a last segment left sealed by a failed roll
            seg = self.segments[-1]
        assert seg.state is SegmentState.OPEN and length <= seg.room(), seg.path
        first = seg.next_offset
        pos = seg.end_pos
        ts = clock.time_ns()
        written = write_frame(seg.mm, pos, first, count, ntypes, columns, ts, tuples=tuples)
        assert written == length, (written, length)
        seg.add_frame(pos, written, first, count)
        # the newest small frame, kept as written: the live runtime reads it back at once and
        # skips decoding (copies: the caller may reuse its arrays)
        self._tail = ((seg, pos, _tail_batch(self, columns, first, count, ts, owned))
                      if count <= TAIL_ROWS else None)
        return first

    def roll(self) -> None:
        """Seal the open segment (index written, fsync'd) and start a new one.

        The new segment is prepared first: if that fails (a full disk), nothing changed and
        the open segment keeps taking frames. If sealing fails, the prepared one is dropped.
        """
        seg = self.segments[-1]
        if seg.state is SegmentState.OPEN and seg.frame_count == 0:
            return  # nothing to seal; the empty segment keeps its base offset
        if seg.state is SegmentState.OPEN:
            seg.sync()  # its frames are durable before anything else happens
        new = Segment.prepare(self.directory, self.shard, seg.next_offset, self.segment_bytes)
        try:
            if seg.state is SegmentState.OPEN:
                seg.seal()
            new.publish()
        except BaseException:
            new.discard()
            raise
        self.segments.append(new)
        self._bases.append(new.base)

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
        tail = self._tail
        if (tail is not None and tail[2].first_offset == start and tail[2].end_offset == end
                and tail[0] is self.segments[-1]):
            yield tail[2]  # the live runtime reading back the frame just written
            return
        pos_off = start
        si = max(0, bisect.bisect_right(self._bases, start) - 1)
        while pos_off < end and si < len(self.segments):
            seg = self.segments[si]
            sealed = seg.state is not SegmentState.OPEN  # before the snapshot: a writer may seal it
            sealed_end = seg.next_offset
            positions, firsts = seg.frame_index()
            n = len(positions)
            fi = max(0, int(np.searchsorted(firsts, pos_off, side="right")) - 1)
            while fi < n and pos_off < end:
                # the offsets the index says this frame holds; the end is not known for the
                # open segment's last frame (a writer may be adding frames meanwhile)
                last = None
                if fi + 1 < n:
                    last = int(firsts[fi + 1])
                elif sealed:
                    last = sealed_end
                tail = self._tail
                if tail is not None and tail[0] is seg and tail[1] == positions[fi]:
                    batch = tail[2]
                else:
                    batch = self._frame(seg, int(positions[fi]), verify, int(firsts[fi]), last)
                fi += 1
                if batch.end_offset <= pos_off:
                    continue
                if batch.first_offset < pos_off or batch.end_offset > end:
                    batch = batch.between(pos_off, end)
                pos_off = batch.end_offset
                if batch.count:
                    yield batch
            si += 1

    def _frame(self, seg: Segment, pos: int, verify: bool, first: int | None = None,
               end: int | None = None) -> Batch:
        """Check and view the frame at ``pos``; ``first``/``end``: the offsets the segment's
        index says it covers (checked against its header: a misdirected or stale write)."""
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
        if first is not None:
            magic, version = _MAGIC_VERSION.unpack_from(seg.mm, pos)
            if (magic != FRAME_MAGIC or version != FRAME_VERSION or h.first_offset != first
                    or (end is not None and h.first_offset + h.count != end)):
                why = (f"it holds offsets [{h.first_offset}, {h.first_offset + h.count}), the "
                       f"index says [{first}, {'?' if end is None else end})"
                       if magic == FRAME_MAGIC and version == FRAME_VERSION
                       else "no frame header there")
                raise CorruptLogError(
                    f"frame disagrees with the segment index ({why}): a misdirected or stale "
                    "write; nothing was skipped. Restore the segment from a backup or replica",
                    path=seg.path, byte_offset=pos, shard=self.shard, offset=first)
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


def _tail_batch(sl: "ShardLog", columns: Sequence[ColumnSpec], first: int, count: int,
                ts: int, owned: bool) -> Batch:
    """A Batch over the columns just written (what decoding the frame would give): read-only
    copies, or the arrays themselves when the log owns them."""
    cols: dict[int, dict[int, Any]] = {}
    types = None
    for c in columns:
        v = c.values
        if c.field_index == TYPE_COLUMN_FIELD:
            types = _frozen(np.asarray(v, np.uint16), owned)
        elif hasattr(v, "offsets"):
            cols.setdefault(c.type_id, {})[c.field_index] = Var(
                _frozen(np.asarray(v.offsets, np.int32), owned), _frozen(np.asarray(v.data, np.uint8), owned))
        else:
            cols.setdefault(c.type_id, {})[c.field_index] = _frozen(v, owned)
    return Batch(sl.shard, first, first + count, ts, sl.schema, types, cols, 0, count, sl.dicts)


def _frozen(a: np.ndarray, owned: bool) -> np.ndarray:
    out = a if owned else np.array(a, copy=True)
    out.flags.writeable = False
    return out
