"""``python -m engine bench sweep``: the demo's throughput over a grid of shards × batch sizes.

Design note. The photo-sharing workload (``engine.demo``) is generated once and shared by every
cell. A run appends it to a fresh data directory in columnar batches of ``batch`` actions
(``Log.append`` per slice, in the demo's order), flushes, then folds it into the demo's stores
and derivations (``App.settle()``). Per run three wall-clock times are kept: append (incl. the
final flush), fold (incl. the derivations and folding what they emitted), and end to end (append
start → settled, App construction included). Throughputs count the workload's actions only;
derived actions are reported apart. Runs are interleaved over the cells
(round r visits every cell before round r + 1) so drift on a shared machine spreads evenly;
each figure is actions ÷ the median of its ``--repeat`` times, as in BENCH.md.

The pure parts — grid parsing, ratios and the recommendation — are plain functions over
:class:`CellResult` so tests can feed them synthetic numbers. The module's top level imports
only the standard library, so ``python -m engine --help`` stays light.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .limits import DEFAULT_LIMITS

__all__ = ["CellResult", "Recommendation", "add_arguments", "explain", "parse_grid",
           "ratios_to_best", "recommend", "run_sweep"]

NEAR_BEST = 0.10  # fraction; "within 10 % of the best" end-to-end throughput
GRID_VALUES_MAX = 16  # values per axis; the grid is at most 16 × 16 cells
REPEAT_MAX = 100  # runs per cell


# -- arguments -----------------------------------------------------------------------------
def parse_grid(text: str, *, name: str, hi: int, example: str) -> list[int]:
    """``"1,2,4"`` → ``[1, 2, 4]``: distinct integers in [1, hi], sorted.

    Raises ``ValueError`` with a message saying what to pass (``--name`` and ``example``).
    """
    want = f"{name} wants comma-separated integers from 1 to {hi:,}, e.g. {name} {example}"
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise ValueError(f"{want}; got {text!r}")
    values = []
    for p in parts:
        try:
            v = int(p)  # underscores allowed: 256_000
        except ValueError:
            raise ValueError(f"{want}; {p!r} is not an integer") from None
        if not 1 <= v <= hi:
            raise ValueError(f"{want}; {v:,} is out of range")
        values.append(v)
    out = sorted(set(values))
    if len(out) > GRID_VALUES_MAX:
        raise ValueError(f"{want}; at most {GRID_VALUES_MAX} values, got {len(out)}")
    return out


def _grid_type(name: str, hi: int, example: str) -> Any:
    def parse(text: str) -> list[int]:
        try:
            return parse_grid(text, name=name, hi=hi, example=example)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name.lstrip("-")  # argparse names the type in some messages
    return parse


def _positive_int(name: str, hi: int) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = 0
        if not 1 <= v <= hi:
            raise argparse.ArgumentTypeError(
                f"{name} wants an integer from 1 to {hi:,}; got {text!r}")
        return v

    parse.__name__ = name.lstrip("-")
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's options, on the ``bench sweep`` subparser of ``engine.cli``."""
    lim = DEFAULT_LIMITS
    p.add_argument("--shards", type=_grid_type("--shards", lim.shards_max, "1,2,4"),
                   default="1,2,4", help="shard counts to try, comma-separated")
    p.add_argument("--batch", type=_grid_type("--batch", lim.batch_actions_max, "1000,16000,256000"),
                   default="1000,16000,256000",
                   help="actions per appended batch, comma-separated")
    p.add_argument("--actions", type=_positive_int("--actions", lim.batch_actions_max),
                   default=2_000_000, help="actions to generate (tags come on top)")
    p.add_argument("--users", type=_positive_int("--users", 1 << 40), default=100_000,
                   help="distinct users")
    p.add_argument("--seed", type=int, default=7, help="workload seed")
    p.add_argument("--durability", choices=["none", "group", "sync"], default="group",
                   help="the log's durability mode")
    p.add_argument("--repeat", type=_positive_int("--repeat", REPEAT_MAX), default=1,
                   help="runs per cell; figures are from the median")
    p.add_argument("--out", default=".", help="directory for sweep.png and sweep.json")


# -- results and the recommendation (pure) ---------------------------------------------------
@dataclass
class CellResult:
    """One (shards, batch) cell: wall-clock seconds of each run, per phase."""

    shards: int
    batch: int
    actions: int  # actions appended (and folded) per run
    append_s: list[float] = field(default_factory=list)
    fold_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    derived: list[int] = field(default_factory=list)  # actions a derivation emitted, per run
    error: str | None = None  # an engine error that stopped this cell (its other runs skipped)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.e2e_s)

    def _rate(self, secs: list[float]) -> float:
        if not secs:
            return 0.0
        return self.actions / max(statistics.median(secs), 1e-12)

    @property
    def append_rate(self) -> float:
        """Actions per second appended (incl. the final flush), from the median run."""
        return self._rate(self.append_s)

    @property
    def fold_rate(self) -> float:
        return self._rate(self.fold_s)

    @property
    def e2e_rate(self) -> float:
        """Actions per second from the first append to the fold's end (median run)."""
        return self._rate(self.e2e_s)


@dataclass(frozen=True)
class Recommendation:
    best: CellResult  # highest end-to-end throughput
    low_latency: CellResult  # smallest batch within ``tolerance`` of the best
    tolerance: float  # fraction


def ratios_to_best(results: Sequence[CellResult]) -> list[float]:
    """Each cell's end-to-end throughput ÷ the best cell's (1.0 for the best)."""
    top = max((r.e2e_rate for r in results if r.ok), default=0.0)
    return [r.e2e_rate / top if top > 0 and r.ok else 0.0 for r in results]


def recommend(results: Sequence[CellResult], tolerance: float = NEAR_BEST) -> Recommendation:
    """The best cell by end-to-end throughput, and the smallest batch within ``tolerance`` of it.

    Ties on throughput go to the smaller batch, then fewer shards. Among cells of the smallest
    qualifying batch the fastest is taken. Failed cells are left out.
    """
    results = [r for r in results if r.ok]
    if not results:
        raise ValueError("no results to recommend from: no cell of the grid completed")
    assert 0 <= tolerance < 1, tolerance
    best = max(results, key=lambda r: (r.e2e_rate, -r.batch, -r.shards))
    floor = (1 - tolerance) * best.e2e_rate
    near = [r for r in results if r.e2e_rate >= floor]
    low = min(near, key=lambda r: (r.batch, -r.e2e_rate, r.shards))
    return Recommendation(best, low, tolerance)


def _mps(rate: float) -> str:
    return f"{rate / 1e6:.2f}"


def explain(rec: Recommendation, cores: int | None = None) -> list[str]:
    """The recommendation as printable lines (no markup)."""
    b, lo = rec.best, rec.low_latency
    pct = f"{rec.tolerance:.0%}"
    lines = [(f"best end-to-end: --shards {b.shards} --batch {b.batch} "
              f"({_mps(b.e2e_rate)} M actions/s)")]
    if lo is b:
        lines.append(f"smallest batch within {pct} of the best: the same setting "
                     f"(no smaller batch comes within {pct})")
        lines.append(f"why: every append pays a fixed cost (a frame per shard, and an "
                     f"fdatasync unless durability is 'none'), so smaller batches lose more "
                     f"than {pct} here.")
    else:
        ratio = lo.e2e_rate / b.e2e_rate if b.e2e_rate else 0.0
        lines.append(f"smallest batch within {pct} of the best: --shards {lo.shards} "
                     f"--batch {lo.batch} ({_mps(lo.e2e_rate)} M actions/s, {ratio:.2f}× best)")
        lines.append(f"why: an append returns once its whole batch is durable, so batches "
                     f"{b.batch / lo.batch:.3g}× smaller acknowledge sooner for {1 - ratio:.0%} "
                     f"less throughput — prefer it unless raw throughput is all that matters.")
    if cores is not None and max(b.shards, lo.shards) > cores:
        lines.append(f"note: that uses more shards than the {cores} cores here; on a bigger "
                     f"machine rerun the sweep.")
    return lines


# -- measuring -------------------------------------------------------------------------------
def _slices(chunks: list, batch: int) -> list:
    """The workload as ``(type, columns)`` slices of at most ``batch`` rows, in the demo's
    live-like append order."""
    from . import demo

    return demo.interleaved(chunks, batch)


def _run_once(slices: list, shards: int, durability: str, root: str,
              note: Any) -> tuple[float, float, float, int]:
    """One run in a fresh directory under ``root``: (append_s, fold_s, e2e_s, derived)."""
    from . import demo
    from .app import App
    from .log import Log

    d = tempfile.mkdtemp(prefix=f"s{shards}-", dir=root)
    try:
        log = Log(d, demo.TYPES, shards=shards, durability=durability)  # type: ignore[arg-type]
        try:
            note("append")
            t0 = time.perf_counter()
            for name, cols in slices:  # as demo._append, without per-batch progress ticks
                log.append(name, cols)
            log.flush()
            t1 = time.perf_counter()
            note("fold")
            app = App(log, demo.stores(), demo.derivations(), checkpoint_every_actions=None,
                      checkpoint_every_s=None)
            app.settle()
            t2 = time.perf_counter()
            derived = sum(d.emitted for d in app.derivations.values())
            app.close()  # folds nothing more; checkpoints (not timed)
        finally:
            log.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return t1 - t0, t2 - t1, t2 - t0, int(derived)


def _measure(args: argparse.Namespace, chunks: list, total: int, con: Any) -> list[CellResult]:
    from .errors import EngineError
    from .progress import progress_bar

    cells = [CellResult(s, b, total) for s in args.shards for b in args.batch]
    slices = {b: _slices(chunks, b) for b in args.batch}  # cut once, outside the timings
    root = tempfile.mkdtemp(prefix="engine-sweep-")
    try:
        with progress_bar(con) as prog:
            task = prog.add_task("cells", total=len(cells) * args.repeat, rate="")
            for rnd in range(args.repeat):  # interleaved: every cell once per round
                for c in cells:
                    if c.error is not None:  # failed in an earlier round
                        prog.advance(task)
                        continue
                    label = f"shards={c.shards} batch={c.batch:,}" + (
                        f" run {rnd + 1}/{args.repeat}" if args.repeat > 1 else "")

                    def note(phase: str, label: str = label) -> None:
                        prog.update(task, rate=f"{label}: {phase}")

                    try:
                        a, f, e, n = _run_once(slices[c.batch], c.shards, args.durability, root,
                                               note)
                    except EngineError as exc:  # an operating error: report it, go on
                        c.error = f"{type(exc).__name__}: {exc}"
                        prog.advance(task)
                        continue
                    c.append_s.append(a)
                    c.fold_s.append(f)
                    c.e2e_s.append(e)
                    c.derived.append(n)
                    prog.advance(task)
            prog.update(task, rate="done")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return cells


# -- output ----------------------------------------------------------------------------------
def _table(results: list[CellResult], rec: Recommendation | None, cores: int) -> Any:
    from rich.table import Table

    heads = ["shards", "batch", "append M/s", "fold M/s", "end-to-end M/s", "ratio to best"]
    show_derived = any(any(r.derived) for r in results)
    t = Table(*heads, *(["derived"] if show_derived else []),
              title="[bold]bench sweep[/bold] (actions/s, median run)", title_justify="left")
    for r, ratio in zip(results, ratios_to_best(results)):
        shards = f"{r.shards}" + (" [yellow](> cores)[/yellow]" if r.shards > cores else "")
        if not r.ok:
            t.add_row(shards, f"{r.batch:,}", "-", "-", "-", "[red]failed[/red]",
                      *(["-"] if show_derived else []))
            continue
        assert rec is not None  # some cell completed
        mark = " ★ best" if r is rec.best else ""
        mark += " ◆ low-latency" if r is rec.low_latency and r is not rec.best else ""
        t.add_row(shards, f"{r.batch:,}", _mps(r.append_rate), _mps(r.fold_rate),
                  _mps(r.e2e_rate), f"{ratio:.2f}×{mark}",
                  *([f"{int(statistics.median(r.derived)):,}"] if show_derived else []),
                  style="bold" if r is rec.best else None)
    return t


def _plot(results: list[CellResult], rec: Recommendation, png: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if r.ok]
    panels = [("end to end", "e2e_rate"), ("fold", "fold_rate"), ("append", "append_rate")]
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 4.2), squeeze=False)
    for ax, (name, attr) in zip(axes[0], panels):
        for s in sorted({r.shards for r in results}):
            rs = sorted((r for r in results if r.shards == s), key=lambda r: r.batch)
            ax.plot([r.batch for r in rs], [getattr(r, attr) / 1e6 for r in rs], marker="o",
                    label=f"{s} shard{'s' if s > 1 else ''}")
        if attr == "e2e_rate":
            marks = [(rec.best, "*", 14, "best")]
            if rec.low_latency is not rec.best:
                marks.append((rec.low_latency, "D", 9, f"smallest batch within {rec.tolerance:.0%}"))
            for r, mk, size, lab in marks:
                ax.plot([r.batch], [r.e2e_rate / 1e6], mk, ms=size, mfc="none", mec="black",
                        label=f"{lab}: {r.shards} sh, batch {r.batch:,}")
        ax.set_xscale("log")
        batches = sorted({r.batch for r in results})
        ax.set_xticks(batches, [f"{b:,}" for b in batches], fontsize=8)
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_title(f"{name} throughput", fontsize=10)
        ax.set_xlabel("batch size (actions per append, log scale)")
        ax.set_ylabel("M actions/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _write_json(path: str, args: argparse.Namespace, results: list[CellResult],
                rec: Recommendation | None, meta: dict[str, Any]) -> None:
    cells = [{"shards": r.shards, "batch": r.batch, "actions": r.actions,
              "append_s": r.append_s, "fold_s": r.fold_s, "e2e_s": r.e2e_s, "derived": r.derived, "error": r.error,
              "append_per_s": r.append_rate, "fold_per_s": r.fold_rate,
              "e2e_per_s": r.e2e_rate, "ratio_to_best": ratio}
             for r, ratio in zip(results, ratios_to_best(results))]
    doc = {**meta, "actions_requested": args.actions, "users": args.users, "seed": args.seed,
           "durability": args.durability, "repeat": args.repeat, "shards": args.shards,
           "batch": args.batch, "cells": cells,
           "recommendation": None if rec is None else {
               "best": {"shards": rec.best.shards, "batch": rec.best.batch},
               "low_latency": {"shards": rec.low_latency.shards, "batch": rec.low_latency.batch},
               "tolerance": rec.tolerance}}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def run_sweep(args: argparse.Namespace) -> int:
    """Run the grid, print the table and recommendation, write sweep.png and sweep.json."""
    from rich.console import Console

    from .workload import photo_app

    con = Console()
    if not con.is_terminal:
        con = Console(width=max(con.width, 120))
    cores = os.cpu_count() or 1
    os.makedirs(args.out, exist_ok=True)
    con.print(f"[bold]engine bench sweep[/bold]: photo-sharing demo, {args.actions:,} actions by "
              f"{args.users:,} users (seed {args.seed}), durability={args.durability!r}; "
              f"shards {','.join(map(str, args.shards))} × batch "
              f"{' / '.join(f'{b:,}' for b in args.batch)}, "
              f"{args.repeat} run(s) per cell; machine: {cores} cores (os.cpu_count())")
    for s in args.shards:
        if s > cores:
            con.print(f"[yellow]warning[/yellow]: --shards {s} is more than the {cores} cores "
                      f"here: fold threads will share cores, expect no gain over {cores}")
    t = time.perf_counter()
    # as in the demo: caption words are derived from the posts, not appended as "tag" actions
    chunks = [c for c in photo_app(args.actions, args.users, args.seed) if c[0] != "tag"]
    total = sum(len(next(iter(c.values()))) for _, c in chunks)
    con.print(f"workload: {total:,} actions in {time.perf_counter() - t:.2f} s")
    results = _measure(args, chunks, total, con)
    rec = recommend(results) if any(r.ok for r in results) else None
    con.print(_table(results, rec, cores))
    failed = [r for r in results if not r.ok]
    for r in failed:
        con.print(f"FAILED shards={r.shards} batch={r.batch}: {r.error}", markup=False,
                  highlight=False, style="red")
    if failed:
        con.print("a failed cell is an engine bug or a full disk, not a slow setting: rerun it "
                  "alone (--shards S --batch B) to reproduce", markup=False, highlight=False)
    if rec is not None:
        for line in explain(rec, cores):
            con.print(line, markup=False, highlight=False)
    png = os.path.join(args.out, "sweep.png")
    js = os.path.join(args.out, "sweep.json")
    plotted = False
    if rec is not None:
        title = (f"engine bench sweep: demo workload, {total:,} actions, "
                 f"durability={args.durability}, {cores} cores, median of {args.repeat}")
        try:
            _plot(results, rec, png, title)
            plotted = True
        except ImportError:
            con.print("no plot: matplotlib is not installed (pip install matplotlib, or the "
                      "[bench] extra)", markup=False, highlight=False)
    _write_json(js, args, results, rec, {"cpu_count": cores, "actions": total})
    con.print(f"wrote {png + ' and ' if plotted else ''}{js}", markup=False, highlight=False)
    return 1 if failed else 0
