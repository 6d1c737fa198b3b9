"""Limits on everything (a leaf module). Exceeding one is a typed error at the facade."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits", "DEFAULT_LIMITS"]


@dataclass(frozen=True)
class Limits:
    """Hard limits of one data directory. All sizes are bytes, counts are actions."""

    frame_bytes_max: int = 64 << 20  # bytes; one frame, header included
    frame_actions_max: int = 1 << 20  # actions; a larger append is split into several frames
    segment_bytes: int = 64 << 20  # bytes; preallocated size of every segment file
    string_bytes_max: int = 1 << 20  # bytes; one string or bytes value (UTF-8 encoded)
    batch_actions_max: int = 1 << 26  # actions; one call to append()
    fields_max: int = 256  # fields of one action type
    types_max: int = 4096  # action types of one schema
    shards_max: int = 1024  # shards of one data directory
    dispatch_buffer_actions: int = 8192  # actions buffered by dispatch() before a frame is cut
    flush_interval_ms: float = 2.0  # ms; longest delay of a "group" commit or a buffered flush

    def __post_init__(self) -> None:
        if self.segment_bytes % 4096 or self.segment_bytes < 64 << 10:
            raise ValueError("segment_bytes must be a multiple of 4096 and at least 64 KiB")
        if self.frame_bytes_max > self.segment_bytes - 4096:
            object.__setattr__(self, "frame_bytes_max", self.segment_bytes - 4096)


DEFAULT_LIMITS = Limits()
