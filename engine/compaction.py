"""Compaction: rewrite sealed segments keeping only the last action per key of LWW types.

Design note. Action types declared ``last_write_wins=True`` only matter by their latest action
per partition key. For one shard we find the last offset of every (type, key) over the whole
log, then rewrite each sealed segment that holds a superseded action. Offsets are preserved: a
rewritten frame keeps its span (header ``count``) and becomes *sparse*, listing the offsets of
the rows it kept, so the frame chain stays contiguous and readers skip the gaps. Frames with
nothing to drop are copied byte for byte. The swap is crash-safe: the new file is written and
fsync'd under a ``.tmp`` name, the old index is removed, the new file renamed over the old one;
a crash at any point leaves either the old segment or the new one, and a missing index is
rebuilt by a scan on open.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._impl import load
from .frame import (
    KIND_OFFSETS,
    KIND_TYPES,
    OFFSETS_FIELD,
    TYPE_COLUMN_FIELD,
    Batch,
    ColumnSpec,
    Var,
    frame_size,
    kind_of,
    read_header,
    take_rows,
    write_frame,
)
from .fsutil import fsync_dir
from .segment import _SEG_HEADER, SEG_HEADER_BYTES, SEG_MAGIC, SEG_VERSION, Segment, SegmentState

_codec = load("codec")


@dataclass
class CompactionStats:
    segments_rewritten: int = 0
    actions_dropped: int = 0
    bytes_before: int = 0
    bytes_after: int = 0


def _key_list(col: Any) -> list:
    if isinstance(col, Var) or hasattr(col, "offsets"):
        o = col.offsets.tolist()
        raw = col.data.tobytes()
        return [raw[o[i] : o[i + 1]] for i in range(len(o) - 1)]
    return col.tolist()


def _last_offsets(shard_log: Any, lww: dict[int, str]) -> dict[int, dict[Any, int]]:
    """For every LWW type id: partition key → offset of its last action in the shard."""
    last: dict[int, dict[Any, int]] = {t: {} for t in lww}
    for batch in shard_log.read(shard_log.start_offset):
        for t, name in lww.items():
            offs = batch.offsets(name)
            if not len(offs):
                continue
            keys = _key_list(batch.column(name, batch._schema[name].partition))
            last[t].update(zip(keys, offs.tolist()))
    return last


def _keep_mask(batch: Batch, lww: dict[int, str], last: dict[int, dict[Any, int]]) -> np.ndarray:
    keep = np.ones(batch.count, bool)
    types = batch.types
    all_offs = batch.all_offsets()
    for t, name in lww.items():
        rows = np.flatnonzero(types == t)
        if not len(rows):
            continue
        keys = _key_list(batch.column(name, batch._schema[name].partition))
        newest = last[t]
        offs = all_offs[rows].tolist()
        keep[rows] = [newest[k] == o for k, o in zip(keys, offs)]
    return keep


def _sparse_specs(batch: Batch, keep: np.ndarray) -> tuple[list[ColumnSpec], int]:
    """Column specs of a sparse frame holding the kept rows of ``batch`` (a whole frame)."""
    types = batch.types
    kept_types = types[keep]
    specs = [ColumnSpec(0, OFFSETS_FIELD, KIND_OFFSETS, batch.all_offsets()[keep].astype(np.int64))]
    present = sorted(set(kept_types.tolist()))
    if len(present) > 1:
        specs.append(ColumnSpec(0, TYPE_COLUMN_FIELD, KIND_TYPES, kept_types.astype(np.uint16)))
    for t in present:
        at = batch._schema.type_by_id(t)
        local = np.flatnonzero(keep[types == t])  # kept rows among this type's rows
        cols = batch.columns(at.name)
        for f in at.field_names:
            specs.append(ColumnSpec(t, at.field_index(f), kind_of(at.fields[f]), take_rows(cols[f], local)))
    return specs, max(1, len(present))


def compact_shard(shard_log: Any, schema: Any) -> CompactionStats:
    """Rewrite the sealed segments of one shard; returns what was done."""
    stats = CompactionStats()
    lww = {schema.type_id(at.name): at.name for at in schema if at.last_write_wins}
    if not lww:
        return stats
    last = _last_offsets(shard_log, lww)
    for i, seg in enumerate(list(shard_log.segments)):
        if seg.state is not SegmentState.SEALED:
            continue
        plan = []  # per frame: (raw position, header) or (specs, ntypes, header)
        dropped = 0
        positions, _ = seg.frame_index()
        for pos in positions.tolist():
            batch = shard_log._frame(seg, pos, True)
            keep = _keep_mask(batch, lww, last)
            h = read_header(seg.mm, pos)
            if keep.all():
                plan.append(("copy", pos, h))
            else:
                dropped += int((~keep).sum())
                plan.append(("sparse", _sparse_specs(batch, keep), h))
        if not dropped:
            continue
        new = _rewrite(seg, plan)
        stats.segments_rewritten += 1
        stats.actions_dropped += dropped
        stats.bytes_before += seg.end_pos
        stats.bytes_after += new.end_pos
        shard_log.segments[i] = new
        seg.transition(SegmentState.RETIRED)
        seg.close()
    return stats


def _rewrite(seg: Segment, plan: list) -> Segment:
    sizes = [h.length if kind == "copy" else frame_size(arg[0])[0] for kind, arg, h in plan]
    size = max(64 << 10, (SEG_HEADER_BYTES + sum(sizes) + 4095) // 4096 * 4096)
    tmp = seg.path[: -len(".seg")] + ".compact.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        _SEG_HEADER.pack_into(mm, 0, SEG_MAGIC, SEG_VERSION, 0, seg.shard, seg.base, size)
        struct.pack_into("<I", mm, 60, _codec.crc32c(memoryview(mm)[:60]))
        pos = SEG_HEADER_BYTES
        for kind, arg, h in plan:
            if kind == "copy":
                mm[pos : pos + h.length] = seg.mm[arg : arg + h.length]
                pos += h.length
            else:
                specs, ntypes = arg
                pos += write_frame(mm, pos, h.first_offset, h.count, ntypes, specs, h.timestamp_ns,
                                   sparse=True)
        mm.flush()
        mm.close()
        os.fsync(fd)
    finally:
        os.close(fd)
    directory = os.path.dirname(seg.path)
    if os.path.exists(seg.idx_path):
        os.unlink(seg.idx_path)  # from here until the new index exists, open() rescans
    fsync_dir(directory)
    os.replace(tmp, seg.path)
    fsync_dir(directory)
    report: list[str] = []
    new = Segment.open(seg.path, seg.shard, True, False, report)  # scans, verifies, seals
    return new
