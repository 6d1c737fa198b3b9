"""The engine's one error hierarchy (a leaf module: it imports nothing from the engine).

Operating errors (bad input, disk full, corrupt file) are these exceptions; programmer errors
(a broken invariant) are assertions. Every message says what to do next.
"""

from __future__ import annotations

__all__ = [
    "EngineError",
    "SchemaError",
    "IncompatibleSchemaError",
    "ValidationError",
    "UnknownActionTypeError",
    "LimitExceededError",
    "LogError",
    "CorruptLogError",
    "DiskFullError",
    "ClosedError",
    "ReadOnlyError",
]


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class SchemaError(EngineError):
    """An action type or field declaration is malformed."""


class IncompatibleSchemaError(SchemaError):
    """The schema given on open does not match the one stored in the data directory."""


class ValidationError(EngineError, ValueError):
    """An action (or a column of a batch) is invalid; nothing was written.

    ``action_type`` and ``field`` name what was wrong (``field`` may be ``None``).
    """

    def __init__(self, message: str, *, action_type: str | None = None, field: str | None = None):
        super().__init__(message)
        self.action_type = action_type
        self.field = field


class UnknownActionTypeError(ValidationError, KeyError):
    """The action type is not declared in the schema."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class LimitExceededError(ValidationError):
    """A configured limit (frame bytes, batch size, string length, ...) would be exceeded."""


class LogError(EngineError):
    """An operating error of the log. Names the file, byte offset and shard offset when known."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        byte_offset: int | None = None,
        shard: int | None = None,
        offset: int | None = None,
    ):
        where = []
        if path is not None:
            where.append(f"file {path}")
        if byte_offset is not None:
            where.append(f"byte {byte_offset}")
        if shard is not None:
            where.append(f"shard {shard}")
        if offset is not None:
            where.append(f"offset {offset}")
        full = message if not where else f"{message} ({', '.join(where)})"
        super().__init__(full)
        self.path = path
        self.byte_offset = byte_offset
        self.shard = shard
        self.offset = offset


class CorruptLogError(LogError):
    """A file of the data directory is corrupt somewhere other than a torn tail.

    Nothing was skipped. Restore the file from a replica or backup, or run
    ``python -m engine verify DIR`` for a full report.
    """


class DiskFullError(LogError, OSError):
    """The filesystem is full. Every acknowledged action is kept; free space and retry."""


class ClosedError(EngineError):
    """The engine (or log, or reader) was closed."""


class ReadOnlyError(EngineError):
    """A write was attempted on a data directory opened read-only."""
