"""The main job: ``python -m engine demo``.

Until stores exist this demonstrates the log: it generates a seeded photo-sharing "like"
workload (Zipf popularity), appends it in columnar batches to an embedded data directory with
the chosen durability, reads everything back with CRC verification, and prints throughput.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import schema as sc
from .log import Log
from .workload import likes

LIKE = sc.ActionType("like", {"user": sc.key("user"), "photo": sc.key("photo"), "ts": sc.timestamp},
                     partition="user")


def _progress(con: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=con)


def run_demo(args: argparse.Namespace) -> int:
    con = Console()
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="engine-demo-")
    photos = max(1000, args.users * 5)
    con.print(f"[bold]engine demo[/bold]: {args.actions:,} likes by {args.users:,} users on "
              f"{photos:,} photos, {args.shards} shards, batches of {args.batch:,}, "
              f"durability={args.durability!r}, data in {data_dir}")
    t = time.perf_counter()
    work = likes(args.actions, args.users, photos, args.seed)
    gen_s = time.perf_counter() - t
    log = Log(data_dir, [LIKE], shards=args.shards, durability=args.durability)
    try:
        with _progress(con) as prog:
            task = prog.add_task("append", total=args.actions, rate="")
            t = time.perf_counter()
            for lo in range(0, args.actions, args.batch):
                hi = min(args.actions, lo + args.batch)
                log.append("like", {k: v[lo:hi] for k, v in work.items()})
                prog.update(task, completed=hi, rate=f"{hi / (time.perf_counter() - t) / 1e6:.1f}M/s")
            log.flush()
            append_s = time.perf_counter() - t
            task = prog.add_task("read + CRC", total=args.actions, rate="")
            t = time.perf_counter()
            total, photo_sum, n = 0, 0, 0
            for s in range(log.shards):
                for b in log.read(s):
                    col = b.column("like", "photo")
                    photo_sum += int(col.sum())
                    n += b.count
                    prog.update(task, completed=n, rate=f"{n / (time.perf_counter() - t) / 1e6:.1f}M/s")
            read_s = time.perf_counter() - t
        total = sum(log.end_offset(s) for s in range(log.shards))
        assert total == args.actions == n, (total, n)
        # the raw keys are recoverable: check one shard's first batch against the input
        ids = np.asarray(log.dicts["photo"].lookup(work["photo"][:5]))
        tab = Table("stage", "actions", "seconds", "actions/s")
        tab.add_row("generate (numpy)", f"{args.actions:,}", f"{gen_s:.2f}", f"{args.actions / gen_s / 1e6:.1f}M")
        tab.add_row(f"append ({args.durability})", f"{args.actions:,}", f"{append_s:.2f}", f"{args.actions / append_s / 1e6:.1f}M")
        tab.add_row("read back + CRC", f"{n:,}", f"{read_s:.2f}", f"{n / read_s / 1e6:.1f}M")
        con.print(tab)
        con.print(f"distinct users {len(log.dicts['user']):,}, photos {len(log.dicts['photo']):,}; "
                  f"first photos -> ids {ids.tolist()}")
    finally:
        log.close()
        if not args.keep and args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)
    return 0
