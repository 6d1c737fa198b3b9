"""Operator tools over a data directory: verify, inspect, tail. Used by ``python -m engine``."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from .errors import EngineError
from .log import Log
from .segment import SegmentState


@dataclass
class VerifyReport:
    """What ``verify`` found. ``ok`` is False if anything is corrupt."""

    path: str
    shards: int = 0
    segments: int = 0
    frames: int = 0
    actions: int = 0
    bytes: int = 0
    recovered: list[str] = field(default_factory=list)  # torn tails etc. (not errors)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def verify(path: str) -> VerifyReport:
    """Check every frame's CRC and layout, offsets, and key ids of the directory ``path``.

    Opens read-only: nothing is modified (a torn tail is reported, not cut).
    """
    rep = VerifyReport(path)
    try:
        log = Log(path, readonly=True)
    except EngineError as exc:
        rep.errors.append(str(exc))
        return rep
    try:
        rep.recovered.extend(log.report)
        rep.shards = log.shards
        for s, sl in enumerate(log.shard_logs):
            rep.segments += len(sl.segments)
            rep.bytes += sum(seg.end_pos for seg in sl.segments)
            try:
                for batch in sl.read(sl.start_offset):
                    rep.frames += 1
                    rep.actions += batch.count
                    _check_key_ids(log, batch)
            except EngineError as exc:
                rep.errors.append(f"shard {s}: {exc}")
    finally:
        log.close()
    return rep


def _check_key_ids(log: Log, batch: Any) -> None:
    for name in batch.type_names:
        at = log.schema[name]
        for f in at.key_fields:
            ids = batch.column(name, f)
            if len(ids):
                log.dicts[at.fields[f].domain].key_of(np.array([ids.min(), ids.max()]))


def inspect(path: str) -> dict[str, Any]:
    """Shards, segments (state, offsets, bytes), action types and key domains of ``path``."""
    log = Log(path, readonly=True)
    try:
        out: dict[str, Any] = {
            "path": log.path,
            "shards": [],
            "types": {at.name: {"id": log.schema.type_id(at.name), "partition": at.partition,
                                "fields": {f: at.fields[f].name for f in at.field_names},
                                "last_write_wins": at.last_write_wins}
                      for at in log.schema},
            "key_domains": {d: {"kind": kd.kind, "keys": len(kd)} for d, kd in log.dicts.items()},
            "recovery": list(log.report),
            "stores": _stores_info(log.path),
            "derivations": _derivations_info(log.path),
        }
        for s, sl in enumerate(log.shard_logs):
            segs = [{"file": os.path.basename(seg.path), "state": seg.state.value,
                     "offsets": [seg.base, seg.next_offset], "frames": seg.frame_count,
                     "bytes_used": seg.end_pos, "bytes_file": seg.size} for seg in sl.segments]
            out["shards"].append({"shard": s, "start_offset": sl.start_offset,
                                  "end_offset": sl.end_offset, "segments": segs})
        return out
    finally:
        log.close()


def _stores_info(path: str) -> dict[str, Any]:
    """Each store version's checkpoint offsets, and its failure if it failed."""
    import json

    out: dict[str, Any] = {}
    root = os.path.join(path, "stores")
    if not os.path.isdir(root):
        return out
    for name in sorted(os.listdir(root)):
        current = None
        if os.path.exists(os.path.join(root, name, "CURRENT.json")):  # after a blue/green switch
            with open(os.path.join(root, name, "CURRENT.json")) as f:
                current = json.load(f).get("version")
        for ver in sorted(os.listdir(os.path.join(root, name))):
            d = os.path.join(root, name, ver)
            if not (ver.startswith("v") and os.path.isdir(d)):
                continue  # CURRENT.json, a version being retired
            info: dict[str, Any] = {"state": "never checkpointed"}
            if os.path.exists(os.path.join(d, "MANIFEST.json")):
                with open(os.path.join(d, "MANIFEST.json")) as f:
                    m = json.load(f)
                info = {"state": "checkpointed", "offsets": m["offsets"], "generation": m["generation"]}
            if os.path.exists(os.path.join(d, "FAILED.json")):
                with open(os.path.join(d, "FAILED.json")) as f:
                    fail = json.load(f)
                info.update(state="FAILED", error=fail["error"], failed_at=[fail["shard"], fail["offset"]])
            if current is not None:
                info["serving"] = ver == f"v{current}"
            out[f"{name}/{ver}"] = info
    return out


def _derivations_info(path: str) -> dict[str, Any]:
    """Each derivation's checkpointed cursors (source offsets per shard)."""
    import json

    out: dict[str, Any] = {}
    root = os.path.join(path, "derivations")
    if not os.path.isdir(root):
        return out
    for name in sorted(os.listdir(root)):
        for ver in sorted(os.listdir(os.path.join(root, name))):
            f = os.path.join(root, name, ver, "STATE.json")
            if os.path.exists(f):
                with open(f) as fh:
                    st = json.load(fh)
                out[f"{name}/{ver}"] = {"source": st.get("source"), "emits": st.get("emits"),
                                        "offsets": st.get("offsets")}
    return out


def tail(path: str, shard: int | None = None, start: int | None = None,
         stop_event: threading.Event | None = None, poll_interval_s: float = 0.1) -> Iterator[str]:
    """Lines describing new actions as they arrive (all shards unless ``shard`` is given)."""
    log = Log(path, readonly=True)
    try:
        shards = range(log.shards) if shard is None else [shard]
        pos = {s: (log.end_offset(s) if start is None else start) for s in shards}
        while stop_event is None or not stop_event.is_set():
            got = False
            for s in shards:
                for batch in log.read(s, pos[s]):
                    got = True
                    for off, name, values in batch.to_pylist():
                        yield f"shard {s} offset {off} {name} {_fmt(log, name, values)}"
                    pos[s] = batch.end_offset
            if not got:
                if stop_event is not None:
                    stop_event.wait(poll_interval_s)
                else:
                    threading.Event().wait(poll_interval_s)
    finally:
        log.close()


def _fmt(log: Log, name: str, values: dict[str, Any]) -> str:
    at = log.schema[name]
    parts = []
    for f, v in values.items():
        if f in at.key_fields:
            v = log.dicts[at.fields[f].domain].key_of(np.array([v]))[0]
        parts.append(f"{f}={v!r}")
    return " ".join(parts)


__all__ = ["verify", "inspect", "tail", "VerifyReport", "SegmentState"]
