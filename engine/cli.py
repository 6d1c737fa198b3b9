"""``python -m engine``: demo, verify, inspect, tail, bench report."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def _cmd_verify(args: argparse.Namespace) -> int:
    from .tools import verify

    rep = verify(args.dir)
    print(f"{rep.path}: {rep.shards} shards, {rep.segments} segments, {rep.frames} frames, "
          f"{rep.actions} actions, {rep.bytes} bytes")
    for line in rep.recovered:
        print(f"  recovered: {line}")
    for line in rep.errors:
        print(f"  CORRUPT: {line}")
    print("OK" if rep.ok else "CORRUPT: see above; restore the named files from a backup")
    return 0 if rep.ok else 1


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .tools import inspect

    info = inspect(args.dir)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]{info['path']}[/bold]")
    t = Table("type", "id", "partition", "fields", "lww")
    for name, ti in info["types"].items():
        t.add_row(name, str(ti["id"]), ti["partition"],
                  ", ".join(f"{f}:{k}" for f, k in ti["fields"].items()), str(ti["last_write_wins"]))
    con.print(t)
    k = Table("key domain", "kind", "keys")
    for d, di in info["key_domains"].items():
        k.add_row(d, di["kind"], str(di["keys"]))
    con.print(k)
    s = Table("shard", "segment", "state", "offsets", "frames", "bytes used / file")
    for sh in info["shards"]:
        for seg in sh["segments"]:
            s.add_row(str(sh["shard"]), seg["file"], seg["state"],
                      f"[{seg['offsets'][0]}, {seg['offsets'][1]})", str(seg["frames"]),
                      f"{seg['bytes_used']} / {seg['bytes_file']}")
    con.print(s)
    if info["stores"]:
        st = Table("store", "state", "checkpoint offsets", "error")
        for name, si in info["stores"].items():
            st.add_row(name, si["state"], str(si.get("offsets", "")),
                       f"{si.get('error', '')} at {si.get('failed_at', '')}" if si.get("error") else "")
        con.print(st)
    if info.get("derivations"):
        dt = Table("derivation", "source → emits", "checkpointed source offsets")
        for name, di in info["derivations"].items():
            dt.add_row(name, f"{di['source']} → {di['emits']}", str(di["offsets"]))
        con.print(dt)
    for line in info["recovery"]:
        con.print(f"recovery: {line}")
    return 0


def _cmd_tail(args: argparse.Namespace) -> int:
    from .tools import tail

    try:
        for n, line in enumerate(tail(args.dir, args.shard, args.start)):
            print(line, flush=True)
            if args.limit is not None and n + 1 >= args.limit:
                break
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    import time

    from .app import load_stores, replay

    t = time.perf_counter()
    app = replay(args.dir, load_stores(args.stores), progress=not args.quiet)
    secs = time.perf_counter() - t
    n = sum(app.log.end_offset(s) for s in range(app.log.shards))
    for name, st in app.status().items():
        print(f"{name}: {st['state']} at offsets {st['offsets']}"
              + (f" — FAILED at {st['failed_at']}: {st['error']}" if st["error"] else ""))
    print(f"replayed {n:,} actions in {secs:.2f} s ({n / max(secs, 1e-9) / 1e6:.1f}M actions/s)")
    app.close()
    app.log.close()
    return 0


def _cmd_bench_report(args: argparse.Namespace) -> int:
    from .benchreport import report

    return report(args.json_file, args.png)


def _cmd_bench_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    return run_sweep(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="run the demo workload on an embedded data directory",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--actions", type=int, default=5_000_000, help="actions to generate")
    d.add_argument("--users", type=int, default=200_000, help="distinct users")
    d.add_argument("--shards", type=int, default=2, help="log shards")
    d.add_argument("--batch", type=int, default=65_536, help="actions per appended batch")
    d.add_argument("--durability", choices=["sync", "group", "none"], default="group")
    d.add_argument("--data-dir", default=None, help="data directory (default: a fresh temp dir)")
    d.add_argument("--seed", type=int, default=7, help="workload seed")
    d.add_argument("--keep", action="store_true", help="keep the data directory")
    d.set_defaults(func=_cmd_demo)

    v = sub.add_parser("verify", help="check every frame, index and dictionary of a directory")
    v.add_argument("dir")
    v.set_defaults(func=_cmd_verify)

    i = sub.add_parser("inspect", help="show shards, segments, offsets, types and sizes")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_cmd_inspect)

    t = sub.add_parser("tail", help="print new actions as they arrive (Ctrl-C stops)")
    t.add_argument("dir")
    t.add_argument("--shard", type=int, default=None)
    t.add_argument("--start", type=int, default=None, help="offset to start at (default: the end)")
    t.add_argument("--limit", type=int, default=None, help="stop after this many actions")
    t.set_defaults(func=_cmd_tail)

    rp = sub.add_parser("replay", help="rebuild stores from a data directory (shards in parallel)")
    rp.add_argument("dir")
    rp.add_argument("--stores", required=True, help="module:attr giving a list of engine.Store")
    rp.add_argument("--quiet", action="store_true", help="no progress bar")
    rp.set_defaults(func=_cmd_replay)

    b = sub.add_parser("bench", help="benchmark tools")
    bsub = b.add_subparsers(dest="bench_cmd", required=True)
    r = bsub.add_parser("report", help="summarize a --benchmark-json file as ratios")
    r.add_argument("json_file")
    r.add_argument("--png", default=None, help="also write a bar chart here")
    r.set_defaults(func=_cmd_bench_report)
    from .sweep import add_arguments as sweep_arguments  # stdlib-only at import: stays light

    sw = bsub.add_parser("sweep", help="demo throughput over a grid of shards x batch sizes",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sweep_arguments(sw)
    sw.set_defaults(func=_cmd_bench_sweep)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
