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
import threading
import time
from typing import Any, Mapping

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from . import reducers as r
from . import schema as sc
from ._impl import load
from .app import App
from .derive import Derivation, DerivationInput, StoreView, derived
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
    derived("feed_add", {"user": sc.key("user"), "photo": sc.key("photo")}, partition="user"),
    derived("caption_word", {"token": sc.key("token", str), "photo": sc.key("photo")},
            partition="token"),
]

_k = load("kernels")
FEED_LEN = 20  # photo ids kept per user's feed
FANOUT_MAX = 100  # followers a post is pushed to; a celebrity's other followers would pull it


def fan_out(rows: DerivationInput, views: Mapping[str, StoreView]) -> dict[str, np.ndarray]:
    """post × the author's followers → one ``feed_add`` per follower (at most FANOUT_MAX)."""
    authors = rows.column("user")
    offsets, followers = views["followers"].lists("followers", authors, FANOUT_MAX)
    return fan_out_rows(offsets, followers, rows.column("photo"), FANOUT_MAX)


def fan_out_rows(offsets: np.ndarray, followers: np.ndarray, photos: np.ndarray,
                 cap: int) -> dict[str, np.ndarray]:
    """The fan-out over a CSR of follower lists: each row's first ``cap`` followers."""
    followers_out, row = _k.fan_out(offsets, followers, cap)
    return {"user": followers_out, "photo": np.asarray(photos)[row], "_row": row}


def caption_words(rows: DerivationInput, views: Mapping[str, StoreView]) -> dict[str, Any]:
    """post → one ``caption_word`` per word of its caption (split in Arrow, no Python loop);
    words are raw keys: a word never seen before gets its id when appended."""
    import pyarrow.compute as pc

    words = pc.split_pattern(rows.batch.to_arrow("post").column("caption"), " ")
    row = np.asarray(pc.list_parent_indices(words), np.int64)
    photos = rows.keys("photo")
    return {"token": pc.list_flatten(words), "photo": np.asarray(photos)[row], "_row": row}


def derivations() -> list[Derivation]:
    """The demo's derivations: feeds filled by fanning posts out to followers, and the
    caption index fed by splitting captions into words."""
    return [Derivation("feed_fanout", "post", "feed_add", fan_out, reads=["followers"]),
            Derivation("caption_words", "post", "caption_word", caption_words, raw_keys=True)]


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
              reducers={"caption_word": r.add("photos", "photo")}),
        Store("feeds", key="user", columns={"feed": r.ring(FEED_LEN)},
              reducers={"feed_add": r.push("feed", "photo")}),
    ]


def interleaved(chunks: list[tuple[str, dict[str, Any]]], batch: int
                ) -> list[tuple[str, dict[str, Any]]]:
    """Slices of at most ``batch`` rows in a live-like order: the follow graph first, then
    every other type round-robin, each slice proportional to its type's size."""
    first = [c for c in chunks if c[0] == "follow"]
    rest = [c for c in chunks if c[0] != "follow"]
    out = [(t, {f: v[lo:lo + batch] for f, v in cols.items()})
           for t, cols in first for lo in range(0, _rows(cols), batch)]
    total = sum(_rows(c) for _, c in rest)
    steps = max(1, -(-total // batch))
    pos = [0] * len(rest)
    for i in range(1, steps + 1):
        for j, (t, cols) in enumerate(rest):
            hi = _rows(cols) * i // steps
            if hi > pos[j]:
                out.append((t, {f: v[pos[j]:hi] for f, v in cols.items()}))
                pos[j] = hi
    return out


def _rows(cols: Mapping[str, Any]) -> int:
    return len(next(iter(cols.values())))


def _append(log: Any, slices: list, prog: Progress, label: str = "append") -> int:
    total = sum(_rows(c) for _, c in slices)
    tick = ticker(prog, label, total)
    for name, cols in slices:
        log.append(name, cols)
        tick(_rows(cols))
    return total


class _Live:
    """Prints live changes: the trending top-5 and a few users' feeds (throttled)."""

    def __init__(self, con: Console, app: App, users: list[int], feed_lines: int = 9):
        self.con, self.app, self.users = con, app, users
        self.feed_left = feed_lines
        self.lock = threading.Lock()
        self.subs = [app.subscribe("photo_likes", top=5, column="likes", callback=self.on_top,
                                   every_s=0.5)]
        for u in users:
            self.subs.append(app.subscribe("feeds", query=_feed_of(u), callback=self._on_feed(u),
                                           every_s=0.2))

    def on_top(self, ch: Any) -> None:
        top = ", ".join(f"#{k}: {v:,}" for k, v in ch.new)
        self.con.print(f"[cyan]trending now[/cyan] {top}")

    def _on_feed(self, user: int) -> Any:
        photo_key = self.app.log.dicts["photo"].key_of

        def on_feed(ch: Any) -> None:
            old = set([] if ch.old is None else ch.old)
            added = [p for p in ch.new if p not in old]  # the ring is newest first
            with self.lock:
                if self.feed_left <= 0:
                    return
                self.feed_left -= 1
            shown = ", ".join(f"#{p}" for p in photo_key(np.asarray(added[:3], np.int64)))
            more = f" and {len(added) - 3} more" if len(added) > 3 else ""
            self.con.print(f"[green]feed of user {user}[/green]: +{shown}{more} ({len(ch.new)} items)")

        return on_feed

    def close(self) -> None:
        for s in self.subs:
            s.close()


def _feed_of(user: int) -> Any:
    def q(store: Store) -> list[int]:
        row = store.get(user)
        return [] if row is None else row["feed"].tolist()

    return q


def run_demo(args: argparse.Namespace) -> int:
    con = Console()
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="engine-demo-")
    con.print(f"[bold]engine demo[/bold]: photo sharing, {args.actions:,} actions by {args.users:,} "
              f"users; {args.shards} shards, batches of {args.batch:,}, durability="
              f"{args.durability!r}; data in {data_dir}")
    timings: list[tuple[str, int, float]] = []
    try:
        t = time.perf_counter()
        # the generator's "tag" actions are what the caption_words derivation now derives
        chunks = [c for c in photo_app(args.actions, args.users, args.seed) if c[0] != "tag"]
        slices = interleaved(chunks, args.batch)
        total = sum(_rows(c) for _, c in chunks)
        timings.append(("generate workload", total, time.perf_counter() - t))
        follows = dict(chunks)["follow"]["user"]
        watch = np.bincount(follows).argsort()[-3:][::-1].tolist()  # the keenest followers
        log = Log(data_dir, TYPES, shards=args.shards, durability=args.durability)
        app = App(log, stores(), derivations(), checkpoint_every_actions=None, checkpoint_every_s=None)
        live = _Live(con, app, watch)
        app.start()
        with progress_bar(con) as prog:
            t = time.perf_counter()
            _append(app, slices, prog, "append")
            timings.append((f"append ({args.durability}), folded live", total, time.perf_counter() - t))
            app.settle()
            feed_items = app.derivations["feed_fanout"].emitted
            words = app.derivations["caption_words"].emitted
            derived = feed_items + words
            timings.append(("end to end: append + fold + derivations", total, time.perf_counter() - t))
        app.stop()
        live.close()
        con.print(f"derived {feed_items:,} feed items (posts fanned out to followers) and "
                  f"{words:,} caption words from {len(dict(chunks)['post']['user']):,} posts")
        t = time.perf_counter()
        app.checkpoint()
        timings.append(("checkpoint", total + derived, time.perf_counter() - t))
        app.close()
        log.close()
        t = time.perf_counter()
        log = Log(data_dir)
        app = App(log, stores(), derivations(), checkpoint_every_actions=None, checkpoint_every_s=None)
        folded = app.fold()
        timings.append(("reopen from checkpoint", total + derived, time.perf_counter() - t))
        assert folded == 0, folded
        _print(con, app, timings, watch[0])
        app.close()
        log.close()
    finally:
        if not args.keep and args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)
    return 0


def _print(con: Console, app: App, timings: list[tuple[str, int, float]], reader: int) -> None:
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
    feed = app["feeds"].get(reader)
    items = [] if feed is None else app.log.dicts["photo"].key_of(feed["feed"][:5]).tolist()
    ans.add_row(f"latest photos in user {reader}'s feed", ", ".join(f"#{p}" for p in items))
    con.print(ans)
