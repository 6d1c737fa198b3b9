"""Progress bars for long work (replay, the demo): actions done, actions/s and ETA."""

from __future__ import annotations

import time
from typing import Any, Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def progress_bar(console: Any = None) -> Progress:
    return Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console)


def ticker(prog: Progress, description: str, total: int) -> Callable[[int], None]:
    """A new task on ``prog``; the returned function advances it by n actions."""
    task = prog.add_task(description, total=total, rate="")
    t0 = time.perf_counter()
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        rate = done / max(1e-9, time.perf_counter() - t0) / 1e6
        prog.update(task, completed=done, rate=f"{rate:.1f}M actions/s")

    return tick
