"""The engine's clock (a leaf module): every wall-clock and monotonic read goes through here.

Design note. Time is not deterministic, so it is injected (STYLE.md habit 10): the engine calls
``clock.time_ns()`` (frame timestamps, retention by age) and ``clock.monotonic()`` (periodic
checkpoints), never ``time`` directly. Both default to the real clocks; ``install`` replaces
them for the whole process (every thread) and returns what it replaced, so a test can put it
back. ``engine.testing.FakeClock`` is the usual way to do that.
"""

from __future__ import annotations

import time
from typing import Callable

__all__ = ["time_ns", "monotonic", "install", "reset"]

TimeNs = Callable[[], int]  # ns since the epoch
Monotonic = Callable[[], float]  # s; only grows

_time_ns: TimeNs = time.time_ns
_monotonic: Monotonic = time.monotonic


def time_ns() -> int:
    """Wall-clock time in ns since the epoch (``time.time_ns`` unless replaced)."""
    return _time_ns()


def monotonic() -> float:
    """A monotonic clock in seconds (``time.monotonic`` unless replaced)."""
    return _monotonic()


def install(time_ns: TimeNs | None = None,
            monotonic: Monotonic | None = None) -> tuple[TimeNs, Monotonic]:
    """Replace the clocks (None keeps the current one); returns the previous pair.

    Process-wide: every thread (the commit thread, the fold pool) sees the new clocks. Undo
    with ``install(*previous)``.
    """
    global _time_ns, _monotonic
    previous = (_time_ns, _monotonic)
    if time_ns is not None:
        _time_ns = time_ns
    if monotonic is not None:
        _monotonic = monotonic
    return previous


def reset() -> None:
    """Back to the real clocks (``time.time_ns`` and ``time.monotonic``)."""
    install(time.time_ns, time.monotonic)
