"""The log's public behaviour: writing, reading, sharding, durability, followers, tools."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pytest

import engine as en
from engine.tools import inspect, verify
from logutil import LIKE, POST, PROFILE, SMALL, TYPES, likes, read_all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_append_read_roundtrip_zero_copy(tmp_path):
    with en.open(tmp_path, TYPES, durability="none") as log:
        ids = np.arange(1000)
        r = log.append("like", likes(ids, ids % 10))
        assert r == {0: range(0, 1000)}
        (b,) = list(log.read(0))
        ts = b.column("like", "ts")
        assert not ts.flags.writeable and ts.base is not None  # a view into the mmap
        assert np.array_equal(ts, ids)
        assert np.array_equal(b.keys("like", "user"), ids % 10)
        rb = b.to_arrow("like")
        assert rb.num_rows == 1000 and rb.schema.field("ts").type == pa.timestamp("ns")
        # the Arrow column shares the frame's memory
        assert rb.column("photo").buffers()[1].address == b.column("like", "photo").ctypes.data


def test_arrow_recordbatch_append_and_strings(tmp_path):
    with en.open(tmp_path, TYPES, durability="none") as log:
        rb = pa.record_batch({"user": pa.array([5, 6, 5]), "caption": pa.array(["a", "héllo", ""])})
        log.append("post", rb)
        (b,) = list(log.read(0))
        assert [v["caption"] for _, _, v in b.to_pylist()] == ["a", "héllo", ""]
        assert b.to_arrow("post").column("caption").to_pylist() == ["a", "héllo", ""]


def test_mixed_types_keep_order_in_one_frame(tmp_path):
    with en.open(tmp_path, TYPES, durability="none") as log:
        log.dispatch("like", user=1, photo=2, ts=10)
        log.dispatch("post", user=1, caption="x")
        log.dispatch("like", user=1, photo=3, ts=11)
        log.flush()
        (b,) = list(log.read(0))
        assert b.type_names == ["like", "post"]
        assert b.types.tolist() == [0, 1, 0]
        assert b.offsets("like").tolist() == [0, 2] and b.offsets("post").tolist() == [1]
        assert [r[1] for r in b.to_pylist()] == ["like", "post", "like"]
        # a slice in the middle of the frame
        (mid,) = list(log.read(0, 1, 3))
        assert [r[:2] for r in mid.to_pylist()] == [(1, "post"), (2, "like")]


def test_sharding_is_stable_and_partitions_keys(tmp_path):
    with en.open(tmp_path, TYPES, shards=4, durability="none") as log:
        users = np.arange(2000)
        got = log.append("like", likes(users, users))
        assert sum(len(r) for r in got.values()) == 2000
        seen = {}
        for s in range(4):
            for _off, _t, user, _c in read_all(log, s):
                assert seen.setdefault(user, s) == s
                assert log.shard_of("like", user) == s
        # golden values: a change of the routing hash would move existing data
        assert [log.shard_of("like", k) for k in (0, 1, 2, 3, -1, 2**40)] == [3, 1, 2, 1, 0, 1]
        assert [log.shard_of("post", k) for k in ("alice", "bob", "")] == [1, 0, 0]
    from engine import _keys_py

    assert _keys_py.shard_of_int(0, 4) == _keys_py.shard_of_ints(np.array([0]), 4)[0]
    assert int(_keys_py.splitmix64(np.array([0], np.int64))[0]) == 0xE220A8397B1DCDAF


def test_reopen_keeps_everything_and_offsets(tmp_path):
    with en.open(tmp_path, TYPES, shards=2, durability="sync", limits=SMALL) as log:
        for k in range(80):
            log.append("like", likes(np.arange(k * 100, k * 100 + 100), np.arange(100) % 7))
        before = [read_all(log, s) for s in range(2)]
        assert sum(len(sl.segments) for sl in log.shard_logs) > 2  # several segments rolled
    with en.open(tmp_path, limits=SMALL) as log:
        assert [read_all(log, s) for s in range(2)] == before
        assert not log.report


def test_schema_evolution_adds_field_with_default(tmp_path):
    with en.open(tmp_path, [POST], durability="none") as log:
        log.dispatch("post", user=1, caption="old")
    post2 = en.ActionType("post", {"user": en.key("user"), "caption": en.string, "lang": en.string},
                          partition="user", defaults={"lang": "en"})
    with en.open(tmp_path, [post2], durability="none") as log:
        log.dispatch("post", user=1, caption="new", lang="fr")
        log.flush()
        rows = [v for b in log.read(0) for _, _, v in b.to_pylist()]
        assert rows == [{"user": 0, "caption": "old", "lang": "en"},
                        {"user": 0, "caption": "new", "lang": "fr"}]
    bad = en.ActionType("post", {"user": en.key("user"), "caption": en.int64}, partition="user")
    with pytest.raises(en.IncompatibleSchemaError, match="caption"):
        en.open(tmp_path, [bad])


def test_second_writer_is_refused_and_readonly_follows(tmp_path):
    log = en.open(tmp_path, TYPES, durability="sync", limits=SMALL)
    try:
        with pytest.raises(en.LogError, match="another process"):
            en.open(tmp_path)
        ro = en.open(tmp_path, readonly=True)
        log.append("like", likes(np.arange(10), np.arange(10)))
        assert len(read_all(ro, 0)) == 10  # the follower sees the new frames (and keys)
        for k in range(30):  # across segment rolls too
            log.append("like", likes(np.arange(1000) + 10 + 1000 * k, np.arange(1000)))
        assert len(read_all(ro, 0)) == 30_010
        with pytest.raises(en.ReadOnlyError):
            ro.dispatch("like", user=1, photo=1, ts=1)
        ro.close()
    finally:
        log.close()


def test_follower_in_another_process(tmp_path):
    with en.open(tmp_path, TYPES, durability="sync") as log:
        log.append("like", likes(np.arange(50), np.arange(50) % 3))
        code = ("import sys, engine as en; log = en.open(sys.argv[1], readonly=True); "
                "print(sum(b.count for b in log.read(0)))")
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": ROOT}, check=True)
        assert out.stdout.strip() == "50"


def test_threads_and_asyncio_producers_are_all_durable(tmp_path):
    with en.open(tmp_path, TYPES, durability="group") as log:
        def worker(t):
            for i in range(200):
                log.dispatch("like", user=t, photo=i, ts=t * 1000 + i)
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

        async def producers():
            await asyncio.gather(*(log.dispatch_async("like", user=9, photo=i, ts=9000 + i)
                                   for i in range(300)))
        asyncio.run(producers())
        assert log._synced_seq == log._written_seq  # everything acknowledged was fdatasync'd
        ts = sorted(c for _, _, _, c in read_all(log, 0))
    assert ts == sorted([t * 1000 + i for t in range(4) for i in range(200)] + [9000 + i for i in range(300)])


def test_compaction_keeps_last_per_key_and_offsets(tmp_path):
    with en.open(tmp_path, TYPES, durability="none", limits=SMALL) as log:
        for round_ in range(5):
            for u in range(20):
                log.dispatch("profile", user=u, name=f"{u}-{round_}")
                log.dispatch("like", user=u, photo=round_, ts=round_ * 100 + u)
            log.roll()
        before = read_all(log, 0)
        stats = log.compact()
        assert stats.actions_dropped == 20 * 4 and stats.bytes_after < stats.bytes_before
        after = read_all(log, 0)
    kept = [r for r in before if r[1] != "profile" or r[3].endswith("-4")]
    assert after == kept  # same offsets, superseded profiles gone
    with en.open(tmp_path, limits=SMALL) as log:
        assert read_all(log, 0) == kept
        assert read_all(log, 0, 45, 130) == [r for r in kept if 45 <= r[0] < 130]
    assert verify(str(tmp_path)).ok


def test_retention_removes_whole_sealed_segments(tmp_path):
    with en.open(tmp_path, TYPES, durability="none", limits=SMALL, retention_bytes=200_000) as log:
        for k in range(40):
            log.append("like", likes(np.arange(k * 1000, k * 1000 + 1000), np.zeros(1000)))
        log.flush()
        start = log.start_offset(0)
        assert start > 0 and log.end_offset(0) == 40_000
        assert read_all(log, 0, start)[0][0] == start
        with pytest.raises(en.LogError, match="retention"):
            list(log.read(0, 0))


def test_verify_and_inspect_cli(tmp_path):
    with en.open(tmp_path, TYPES, shards=2, durability="none") as log:
        log.append("like", likes(np.arange(100), np.arange(100)))
    rep = verify(str(tmp_path))
    assert rep.ok and rep.actions == 100 and rep.shards == 2
    info = inspect(str(tmp_path))
    assert sum(sh["end_offset"] for sh in info["shards"]) == 100
    assert info["key_domains"]["user"]["keys"] == 100
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-m", "engine", "inspect", str(tmp_path), "--json"],
                         capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout)["types"]["like"]["partition"] == "user"
    out = subprocess.run([sys.executable, "-m", "engine", "verify", str(tmp_path)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "OK" in out.stdout
    out = subprocess.run([sys.executable, "-m", "engine", "tail", str(tmp_path), "--start", "0",
                          "--limit", "3", "--shard", "0"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 3 and "like" in out.stdout


def test_closed_log_raises(tmp_path):
    log = en.open(tmp_path, TYPES)
    log.close()
    with pytest.raises(en.ClosedError):
        log.dispatch("like", user=1, photo=1, ts=1)
    with pytest.raises(en.ClosedError):
        list(log.read(0))


def test_new_directory_needs_types_and_valid_args(tmp_path):
    with pytest.raises(ValueError, match="types"):
        en.open(tmp_path / "x")
    with pytest.raises(ValueError, match="durability"):
        en.open(tmp_path / "y", TYPES, durability="maybe")
    with pytest.raises(ValueError, match="shards"):
        en.open(tmp_path / "z", TYPES, shards=0)
    assert {LIKE.name, POST.name, PROFILE.name} == {t.name for t in TYPES}


def test_fast_dispatcher_equals_dispatch(tmp_path):
    with en.open(tmp_path / "a", TYPES, shards=3, durability="none") as a, \
            en.open(tmp_path / "b", TYPES, shards=3, durability="none") as b:
        d = a.dispatcher("like")
        offs_a = [d(u, u * 7, u * 11) for u in range(-50, 500)]
        offs_b = [b.dispatch("like", user=u, photo=u * 7, ts=u * 11) for u in range(-50, 500)]
        assert offs_a == offs_b
        with pytest.raises(en.ValidationError, match="photo"):
            d(1, 2**70, 3)
        with pytest.raises(en.ValidationError):
            d(1, 2)
        a.flush()
        b.flush()
        assert [read_all(a, s) for s in range(3)] == [read_all(b, s) for s in range(3)]
        assert sum(a.end_offset(s) for s in range(3)) == 550
