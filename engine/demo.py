"""The main job: ``python -m engine demo`` — the photo-sharing app, end to end.

Users follow users, post photos with captions, like and comment. A seeded workload (Zipf
popularity) is appended to an embedded data directory in columnar batches, folded into seven
stores, checkpointed, reopened from the checkpoint, and a few answers are printed with the
throughput of every stage.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from . import reducers as r
from . import schema as sc
from .app import App
from .log import Log
from .progress import progress_bar, ticker
from .store import Store
from .workload import photo_app

TYPES = [
    sc.ActionType("follow", {"user": sc.key("user"), "target": sc.key("user")}, partition="user"),
    sc.ActionType("post", {"user": sc.key("user"), "photo": sc.key("photo"), "caption": sc.string,
                           "ts": sc.timestamp}, partition="user"),
    sc.ActionType("like", {"user": sc.key("user"), "photo": sc.key("photo"), "ts": sc.timestamp},
                  partition="user"),
    sc.ActionType("comment", {"user": sc.key("user"), "photo": sc.key("photo"), "text": sc.string},
                  partition="user"),
    sc.ActionType("tag", {"token": sc.key("token", str), "photo": sc.key("photo")}, partition="token"),
]


def stores() -> list[Store]:
    """The demo's stores (also used by the tests and ``engine replay --stores engine.demo:stores``)."""
    return [
        Store("photo_likes", key="photo", columns={"likes": np.int64, "first_like_ts": np.int64},
              reducers={"like": [r.count("likes"), r.min("first_like_ts", "ts")]}),
        Store("user_photos", key="user", columns={"photos": np.int64},
              reducers={"post": r.count("photos")}, key_fields={"post": "user"}),
        Store("followers", key="user", columns={"followers": r.multimap()},
              reducers={"follow": r.add("followers", "user")}, key_fields={"follow": "target"}),
        Store("follower_counts", key="user", columns={"followers": np.int64},
              reducers={"follow": r.count("followers")}, key_fields={"follow": "target"}),
        Store("photo_comments", key="photo", columns={"comments": np.int64},
              reducers={"comment": r.count("comments")}),
        Store("caption_index", key="token", columns={"photos": r.multimap()},
              reducers={"tag": r.add("photos", "photo")}),
    ]


def _append(log: Log, chunks: list, batch: int, prog: Progress) -> int:
    total = sum(len(next(iter(c.values()))) for _, c in chunks)
    tick = ticker(prog, "append", total)
    for name, cols in chunks:
        n = len(next(iter(cols.values())))
        for lo in range(0, n, batch):
            hi = min(n, lo + batch)
            log.append(name, {f: v[lo:hi] for f, v in cols.items()})
            tick(hi - lo)
    log.flush()
    return total


def run_demo(args: argparse.Namespace) -> int:
    con = Console()
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="engine-demo-")
    con.print(f"[bold]engine demo[/bold]: photo sharing, {args.actions:,} actions by {args.users:,} "
              f"users; {args.shards} shards, batches of {args.batch:,}, durability="
              f"{args.durability!r}; data in {data_dir}")
    timings: list[tuple[str, int, float]] = []
    try:
        t = time.perf_counter()
        chunks = photo_app(args.actions, args.users, args.seed)
        total = sum(len(next(iter(c.values()))) for _, c in chunks)
        timings.append(("generate workload", total, time.perf_counter() - t))
        log = Log(data_dir, TYPES, shards=args.shards, durability=args.durability)
        with progress_bar(con) as prog:
            t = time.perf_counter()
            _append(log, chunks, args.batch, prog)
            timings.append((f"append ({args.durability})", total, time.perf_counter() - t))
            app = App(log, stores(), checkpoint_every_actions=None, checkpoint_every_s=None)
            t0 = time.perf_counter()
            app.fold(progress=ticker(prog, "fold", total))
            timings.append(("fold into 6 stores", total, time.perf_counter() - t0))
        t = time.perf_counter()
        app.checkpoint()
        timings.append(("checkpoint", total, time.perf_counter() - t))
        app.close()
        log.close()
        t = time.perf_counter()
        log = Log(data_dir)
        app = App(log, stores(), checkpoint_every_actions=None, checkpoint_every_s=None)
        folded = app.fold()
        timings.append(("reopen from checkpoint", total, time.perf_counter() - t))
        assert folded == 0, folded
        _print(con, app, timings)
        app.close()
        log.close()
    finally:
        if not args.keep and args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)
    return 0


def _print(con: Console, app: App, timings: list[tuple[str, int, float]]) -> None:
    tab = Table("stage", "actions", "seconds", "actions/s", title="throughput")
    for name, n, s in timings:
        tab.add_row(name, f"{n:,}", f"{s:.2f}", f"{n / s / 1e6:.1f}M" if s > 0 else "-")
    con.print(tab)
    ans = Table("question", "answer", title="a few answers")
    top = app["photo_likes"].top_k("likes", 5)
    ans.add_row("trending photos (top 5 by likes)", ", ".join(f"#{k}: {v:,}" for k, v in top))
    star = app["follower_counts"].top_k("followers", 1)[0]
    ans.add_row("most followed user", f"user {star[0]} with {star[1]:,} followers")
    fol = app["followers"].get(star[0])["followers"]
    ans.add_row(f"a few followers of user {star[0]}", ", ".join(map(str, app.log.dicts["user"].key_of(fol[:5]))))
    hits = app["caption_index"].get("sunset")
    n_hits = 0 if hits is None else len(hits["photos"])
    ans.add_row('photos whose caption says "sunset"', f"{n_hits:,}")
    p = top[0][0]
    ans.add_row(f"comments on photo #{p}", f"{app['photo_comments'].get(p)['comments']:,}")
    ans.add_row(f"user_photos of user {star[0]}", f"{(app['user_photos'].get(star[0]) or {'photos': 0})['photos']:,}")
    con.print(ans)
