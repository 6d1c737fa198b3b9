"""engine.testing: the fake clock, seeded faults and incremental == replay, each shown to bite.

Design note. Every fault here really happens (bytes zeroed or flipped in real files, os.fsync
raising, a child process killed with SIGKILL) and every test checks the engine's documented
reaction to it, as a user's test would: a torn tail is cut and reported, corruption in the
middle is a CorruptLogError naming the file and byte, a failed fsync fails the write and loses
nothing acknowledged, and acknowledged actions survive kill -9 at an exact function call.
``assert_incremental_equals_replay`` is shown to pass on the demo stores and to fail on a
nondeterministic reducer and on a batch-dependent one.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import engine as en
from engine import clock
from engine import reducers as r
from engine.app import App
from engine.errors import CorruptLogError
from engine.testing import (
    CrashPointError,
    FakeClock,
    Faults,
    ReplayCheck,
    assert_incremental_equals_replay,
)

pytestmark = pytest.mark.timeout(120)

LIKE = en.ActionType("like", {"user": en.key("user"), "photo": en.key("photo"), "ts": en.int64},
                     partition="user")
POST = en.ActionType("post", {"user": en.key("user"), "caption": en.string}, partition="user")
TYPES = [LIKE, POST]
SMALL = en.Limits(segment_bytes=64 << 10)


def rows(log: en.Log, shard: int) -> list[tuple]:
    return [(off, name, vals) for b in log.read(shard) for off, name, vals in b.to_pylist()]


def seg_files(path: str, shard: int) -> list[str]:
    d = os.path.join(path, "shards", f"{shard:04d}")
    return [os.path.join(d, n) for n in sorted(os.listdir(d)) if n.endswith(".seg")]


def build(path: str, rolls: int = 1) -> list[list[tuple]]:
    """2 shards; per shard ``rolls`` sealed segments then an open one, 4+ frames in each."""
    with en.open(path, TYPES, shards=2, durability="none", limits=SMALL) as log:
        for rnd in range(rolls + 1):
            for i in range(4):
                users = np.arange(8) + 8 * i
                log.append("like", {"user": users, "photo": users % 5, "ts": users + 100 * rnd})
                log.append("post", {"user": users[:4], "caption": [f"p{rnd}.{i}.{u}" for u in range(4)]})
            log.flush()
            if rnd < rolls:
                log.roll()
        return [rows(log, s) for s in range(2)]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[str, list[list[tuple]]]:
    path = str(tmp_path_factory.mktemp("kit") / "template")
    return path, build(path)


@pytest.fixture
def copy(template, tmp_path) -> tuple[str, list[list[tuple]]]:
    path, expected = template
    dst = str(tmp_path / "log")
    shutil.copytree(path, dst)
    return dst, expected


# -- the fake clock ---------------------------------------------------------------------------

def test_frame_timestamps_follow_the_fake_clock(tmp_path):
    start = 1_000_000_000_000_000_000
    with FakeClock(start_ns=start) as clk:
        with en.open(str(tmp_path / "log"), TYPES, durability="sync", limits=SMALL) as log:
            log.append("like", {"user": [1], "photo": [2], "ts": [3]})
            clk.advance(5)
            log.dispatch("like", user=1, photo=2, ts=4)
            clk.set(clk.now_ns - 3_000_000_000)  # the wall clock may step back
            log.append("like", {"user": [1], "photo": [2], "ts": [5]})
            stamps = [b.timestamp_ns for b in log.read(0)]
        assert clk.monotonic() == (start + 5_000_000_000) / 1e9  # it did not step back
    assert stamps == [start, start + 5_000_000_000, start + 2_000_000_000]
    assert abs(clock.time_ns() - time.time_ns()) < 10**9  # the real clock is back


def test_retention_by_age_follows_the_fake_clock(tmp_path):
    path = str(tmp_path / "log")
    with FakeClock() as clk:
        log = en.open(path, TYPES, durability="sync", limits=SMALL, retention_age_s=60)
        try:
            log.append("like", {"user": [1, 2], "photo": [1, 1], "ts": [1, 2]})
            log.roll()  # seals the first segment (its last frame is stamped now)
            old = seg_files(path, 0)[0]
            log.append("like", {"user": [3], "photo": [1], "ts": [3]})
            clk.advance(59.5)
            log.flush()  # retention runs on flush
            assert log.start_offset(0) == 0 and os.path.exists(old)
            clk.advance(1)
            log.flush()
            assert log.start_offset(0) == 2 and not os.path.exists(old)
            assert [v["ts"] for b in log.read(0, 2) for _, _, v in b.to_pylist()] == [3]
        finally:
            log.close()


def test_checkpoint_every_s_follows_the_fake_clock(tmp_path):
    store = en.Store("likes", key="photo", columns={"n": np.int64}, reducers={"like": r.count("n")})
    with FakeClock() as clk, en.open(str(tmp_path / "log"), TYPES, durability="none",
                                          limits=SMALL) as log:
        app = App(log, [store], checkpoint_every_actions=None, checkpoint_every_s=10)
        manifest = Path(app.store_dir(store), "MANIFEST.json")
        log.append("like", {"user": [1], "photo": [1], "ts": [1]})
        app.fold()
        clk.advance(9.5)
        log.append("like", {"user": [1], "photo": [1], "ts": [2]})
        app.fold()
        assert not manifest.exists(), "checkpointed before checkpoint_every_s passed"
        clk.advance(0.5)
        log.append("like", {"user": [1], "photo": [1], "ts": [3]})
        app.fold()
        assert manifest.exists(), "no checkpoint once checkpoint_every_s passed"
        assert '"offsets": [\n  3\n ]' in manifest.read_text()
        app.close()


def test_fake_clock_nests_and_checks_its_input():
    with FakeClock(start_ns=10) as outer:
        with FakeClock(start_ns=20):
            assert clock.time_ns() == 20
        assert clock.time_ns() == 10
        assert outer.advance(0.25) == 250_000_010
    with pytest.raises(ValueError, match="set\\(\\)"):
        FakeClock().advance(-1)
    with pytest.raises(ValueError):
        FakeClock(start_ns=1.5)  # type: ignore[arg-type]


# -- torn writes and bit flips ----------------------------------------------------------------

@pytest.mark.parametrize("shard", [0, 1])
def test_torn_write_is_cut_and_reported(copy, shard):
    path, expected = copy
    before = {p: Path(p).read_bytes() for s in range(2) for p in seg_files(path, s)}
    dmg = Faults(11).torn_write(path, shard=shard)
    assert dmg.path == seg_files(path, shard)[-1] and dmg.frame_offset is not None
    after = {p: Path(p).read_bytes() for p in before}
    assert [p for p in before if before[p] != after[p]] == [dmg.path]  # that file, really changed
    torn = after[dmg.path][dmg.byte_offset : dmg.end]
    assert not any(torn) and any(before[dmg.path][dmg.byte_offset : dmg.end])
    with en.open(path, durability="sync") as log:
        assert any(dmg.path in line and "torn tail" in line and f"offset {dmg.frame_offset}" in line
                   for line in log.report), log.report
        assert log.end_offset(shard) == dmg.frame_offset
        assert rows(log, shard) == expected[shard][: dmg.frame_offset]
        assert rows(log, 1 - shard) == expected[1 - shard]
        user = next(u for u in range(50) if log.shard_of("like", u) == shard)
        assert log.dispatch("like", user=user, photo=1, ts=7) == dmg.frame_offset  # appends go on


def test_bit_flip_in_the_open_segment_middle_refuses_the_open(copy):
    path, _ = copy
    seg = seg_files(path, 0)[-1]
    pristine = Path(seg).read_bytes()
    dmg = Faults(3).bit_flip(seg, frame=0)
    flipped = Path(seg).read_bytes()
    assert [i for i in range(len(pristine)) if pristine[i] != flipped[i]] == [dmg.byte_offset]
    assert pristine[dmg.byte_offset] ^ flipped[dmg.byte_offset] == 1 << dmg.bit
    with pytest.raises(CorruptLogError) as info:
        en.open(path)
    exc = info.value
    assert (exc.path, exc.byte_offset, exc.offset) == (seg, dmg.frame_pos, dmg.frame_offset)
    assert f"file {seg}" in str(exc) and f"byte {dmg.frame_pos}" in str(exc)


def test_bit_flip_in_a_sealed_segment_raises_on_read(copy):
    path, expected = copy
    seg = seg_files(path, 1)[0]
    dmg = Faults(4).bit_flip(seg, frame=1)
    with en.open(path) as log:  # a sealed segment trusts its index: found when read
        assert not log.report
        assert rows(log, 0) == expected[0]
        with pytest.raises(CorruptLogError) as info:
            rows(log, 1)
    exc = info.value
    assert (exc.path, exc.byte_offset, exc.shard, exc.offset) == (seg, dmg.frame_pos, 1, dmg.frame_offset)


def test_seeded_bit_flips_in_the_open_segment(template, tmp_path):
    """Wherever a seed lands: the last frame is a torn tail (cut, reported), any other frame is
    corruption (refused, file and byte named)."""
    path, expected = template
    with en.open(path, readonly=True) as log:
        last = int(log.shard_logs[0].segments[-1].frame_index()[0][-1])
    outcomes = []
    for seed in range(12):
        dst = str(tmp_path / f"seed{seed}")
        shutil.copytree(path, dst)
        seg = seg_files(dst, 0)[-1]
        dmg = Faults(seed).bit_flip(seg)
        if dmg.frame_pos == last:
            with en.open(dst) as log:
                assert any(seg in line and "torn tail" in line for line in log.report), (dmg, log.report)
                assert rows(log, 0) == expected[0][: dmg.frame_offset], dmg
            outcomes.append("cut")
        else:
            with pytest.raises(CorruptLogError) as info:
                en.open(dst)
            assert (info.value.path, info.value.byte_offset) == (seg, dmg.frame_pos), dmg
            outcomes.append("refused")
    assert {"cut", "refused"} <= set(outcomes), outcomes


def test_bit_flips_in_index_and_key_files(copy):
    path, expected = copy
    idx = seg_files(path, 0)[0][: -len(".seg")] + ".idx"
    faults = Faults(8)
    faults.bit_flip(idx)
    with en.open(path) as log:
        assert any(idx in line and "index damaged" in line for line in log.report), log.report
        assert [rows(log, s) for s in range(2)] == expected
    keys = os.path.join(path, "keys", "user.keys")
    dmg = faults.bit_flip(keys, lo=0, hi=32)  # the first record's header; more records follow
    with pytest.raises(CorruptLogError) as info:
        en.open(path)
    assert info.value.path == keys and "user" in str(info.value)
    assert faults.done[-1] is dmg and len(faults.done) == 2 and "seed=8" in str(dmg)


def test_same_seed_same_damage(template, tmp_path):
    path, _ = template
    got = []
    for name in ("a", "b"):
        dst = str(tmp_path / name)
        shutil.copytree(path, dst)
        f = Faults(21)
        flip = f.bit_flip(seg_files(dst, 1)[0])
        tear = f.torn_write(dst, shard=1)
        got.append([(os.path.relpath(d.path, dst), d.byte_offset, d.end, d.bit) for d in (flip, tear)])
        got.append({os.path.relpath(p, dst): Path(p).read_bytes() for p in seg_files(dst, 1)})
    assert got[0] == got[2] and got[1] == got[3]
    with pytest.raises(ValueError, match="frame="):
        Faults(0).bit_flip(seg_files(path, 0)[0], frame=99)


# -- failing fsync ----------------------------------------------------------------------------

def test_failing_fsync_fails_the_write_and_loses_nothing_acknowledged(tmp_path):
    path = str(tmp_path / "log")
    real = (os.fsync, os.fdatasync)
    log = en.open(path, TYPES, durability="sync", limits=SMALL)
    acked = [log.dispatch("like", user=u % 3, photo=1, ts=u) for u in range(5)]
    with Faults(5).failing_fsync(after=0, errno=errno.EIO) as ff:
        with pytest.raises(en.LogError) as info:
            log.dispatch("like", user=1, photo=1, ts=99)  # known keys: only the segment syncs
    assert (os.fsync, os.fdatasync) == real, "the real fsync functions were not put back"
    assert [name for name, _ in ff.failed] == ["fdatasync"] and ff.failed[0][1].endswith(".seg")
    cause = info.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.EIO
    assert "fdatasync failed" in str(info.value) and info.value.path == ff.failed[0][1]
    log.close()
    with en.open(path) as log:
        ts = [v["ts"] for _, _, v in rows(log, 0)]
    assert ts[: len(acked)] == list(range(5)) and acked == list(range(5))


def test_failing_fsync_mid_stream_keeps_every_acknowledged_action(tmp_path):
    path = str(tmp_path / "log")
    log = en.open(path, TYPES, shards=2, durability="sync", limits=SMALL)
    acked: dict[int, list[tuple[int, int]]] = {0: [], 1: []}
    with Faults(9).failing_fsync(after=12) as ff:  # calls [0, 12) go through
        for i in range(100):
            users = [i % 4, 4 + i % 4]
            try:
                got = log.append("like", {"user": users, "photo": [i, i], "ts": [i, i]})
            except en.LogError:  # the segment's or a key file's fdatasync failed
                break
            for s, rng in got.items():
                acked[s] += [(off, i) for off in rng]
    assert ff.failed and ff.calls == 13
    log.close()
    with en.open(path) as log:
        for s in range(2):
            have = {off: v["ts"] for off, _, v in rows(log, s)}
            assert all(have.get(off) == i for off, i in acked[s]), f"shard {s} lost an ack"


def test_failing_fsync_of_a_key_file_is_a_log_error(tmp_path):
    log = en.open(str(tmp_path / "log"), TYPES, durability="sync", limits=SMALL)
    try:
        with Faults(1).failing_fsync(after=0), pytest.raises(en.LogError, match=r"\.keys|key dictionary") as err:
            log.dispatch("like", user=1, photo=1, ts=1)  # new keys: the .keys file syncs first
        assert err.value.path is not None and err.value.path.endswith(".keys")
    finally:
        log.close()


def test_after_a_failed_fsync_writes_are_refused_until_reopen(tmp_path):
    """fsyncgate: once fdatasync failed, the kernel may have dropped the pages it could not
    write, so a later successful sync would acknowledge writes behind a hole. The log refuses
    writes (even once fsync works again) until it is reopened, and close() still works."""
    path = str(tmp_path / "log")
    log = en.open(path, TYPES, durability="sync", limits=SMALL)
    log.dispatch("like", user=1, photo=1, ts=1)
    with Faults(3).failing_fsync(after=0, times=1), pytest.raises(en.LogError):
        log.dispatch("like", user=1, photo=1, ts=2)
    with pytest.raises(en.LogError, match="earlier fdatasync failed"):
        log.dispatch("like", user=1, photo=1, ts=3)  # fsync works again: still refused
    with pytest.raises(en.LogError, match="earlier fdatasync failed"):
        log.append("like", {"user": [1], "photo": [1], "ts": [4]})
    log.close()
    with en.open(path) as log:
        log.dispatch("like", user=1, photo=1, ts=5)  # reopened: recovery checked every frame
        ts = [v["ts"] for _, _, v in rows(log, 0)]
    assert ts[0] == 1 and ts[-1] == 5 and 3 not in ts and 4 not in ts


# -- crash points -----------------------------------------------------------------------------

WRITER = """
import sys
import engine as en
like = en.ActionType("like", {"user": en.key("user"), "n": en.int64}, partition="user")
log = en.open(sys.argv[1], [like], shards=2, durability="sync", limits=en.Limits(segment_bytes=64 << 10))
for i in range(0, 10**6, 40):
    ids = list(range(i, i + 40))
    got = log.append("like", {"user": [k % 7 for k in ids], "n": ids})
    by_shard = {s: [k for k in ids if log.shard_of("like", k % 7) == s] for s in got}
    sys.stdout.write("".join(f"ack {s} {off} {k}\\n" for s, rng in got.items()
                             for off, k in zip(rng, by_shard[s])))
"""


@pytest.mark.parametrize("point, hit", [("engine.segment.Segment.seal", 1),
                                        ("engine.segment.Segment.prepare", 3)])
def test_kill9_at_a_crash_point_keeps_acknowledged_actions(tmp_path, point, hit):
    path = str(tmp_path / "log")
    crash = Faults(0).crash_point(WRITER, point, args=[path], hit=hit)
    acks = [tuple(map(int, line.split()[1:])) for line in crash.lines if line.startswith("ack ")]
    assert crash.returncode < 0 and len(acks) > 100, (crash.stderr[-2000:], len(acks))
    with en.open(path, durability="sync") as log:
        have = [{off: v["n"] for off, _, v in rows(log, s)} for s in range(2)]
        for s in range(2):
            assert sorted(have[s]) == list(range(len(have[s]))), "offsets are not dense"
        lost = [(s, off, k) for s, off, k in acks if have[s].get(off) != k]
        assert not lost, f"acknowledged actions lost at {point}: {lost[:5]}"
        if point.endswith(".seal"):  # killed mid-roll: the prepared next segment is left over
            assert any("crash at creation" in line for line in log.report), log.report
        log.append("like", {"user": [1], "n": [-1]})  # the recovered log takes more


def test_crash_point_not_reached_says_why(tmp_path):
    script = tmp_path / "quiet.py"
    script.write_text("print('nothing to see')\n")
    with pytest.raises(CrashPointError, match="exited with code 0"):
        Faults(0).crash_point(str(script), "os.fdatasync")
    with pytest.raises(CrashPointError, match="no 'nope'"):
        Faults(0).crash_point(str(script), "os.nope")


# -- incremental == replay --------------------------------------------------------------------

def demo_batches(n: int = 12_000, per: int = 1500) -> list[tuple[str, dict]]:
    from engine.workload import photo_app

    out = []
    for name, cols in photo_app(n, 300, seed=5):
        total = len(next(iter(cols.values())))
        for lo in range(0, total, per):
            out.append((name, {f: v[lo : lo + per] for f, v in cols.items()}))
    return out


def demo_stores() -> list[en.Store]:
    from engine import demo

    def likes_per_user(state, ids, cols):  # a deterministic custom reducer
        np.add.at(state["likes"], ids, 1)

    return demo.stores() + [
        en.Store("user_likes", key="user", columns={"recent": r.ring(4), "best": r.topk(3),
                                                     "likes": np.int64, "mean_ts": np.float64},
                 reducers={"like": [r.push("recent", "photo"), r.top("best", "ts"),
                                    r.python(likes_per_user, ["likes"], []),
                                    r.mean("mean_ts", "ts")]},
                 key_fields={"like": "user"}),
    ]


def test_incremental_equals_replay_on_the_demo_stores(tmp_path):
    from engine import demo

    check = assert_incremental_equals_replay(demo_stores, demo.TYPES, demo_batches(), shards=2,
                                             seed=4, checkpoint_every=5000, path=tmp_path)
    assert isinstance(check, ReplayCheck)
    assert check.restarts >= 1 and check.crashes >= 1 and check.folds > len(demo_batches())
    assert "followers" in check.stores and "user_likes" in check.stores and check.values > 1000


def nondeterministic_stores() -> list[en.Store]:
    def noisy(state, ids, cols):  # randomness in a reducer: replay gives another state
        np.add.at(state["score"], ids, random.randrange(1, 1000))

    return [en.Store("photo_score", key="photo", columns={"score": np.int64},
                     reducers={"like": r.python(noisy, ["score"], ["ts"])})]


def batch_dependent_stores() -> list[en.Store]:
    def batch_size(state, ids, cols):  # depends on how actions were batched
        state["seen_in"][ids] = len(ids)

    return [en.Store("batching", key="photo", columns={"seen_in": np.int64},
                     reducers={"like": r.python(batch_size, ["seen_in"], [])})]


@pytest.mark.parametrize("make", [nondeterministic_stores, batch_dependent_stores])
def test_incremental_equals_replay_catches_a_bad_reducer(tmp_path, make):
    from engine import demo

    likes = [b for b in demo_batches(6000, 1000) if b[0] == "like"]
    store = make()[0]
    column = next(iter(store.user_columns))
    with pytest.raises(AssertionError) as info:
        assert_incremental_equals_replay(make, demo.TYPES, likes, seed=2, path=tmp_path)
    msg = str(info.value)
    assert f"store {store.name!r} column {column!r} key " in msg and "seed=2" in msg, msg


def test_incremental_equals_replay_reports_a_failed_store(tmp_path):
    def boom(state, ids, cols):
        raise RuntimeError("reducer bug")

    def make():
        return [en.Store("bad", key="user", columns={"x": np.int64},
                         reducers={"like": r.python(boom, ["x"], [])})]

    with pytest.raises(AssertionError, match="'bad' FAILED.*reducer bug"):
        assert_incremental_equals_replay(make, TYPES, [("like", {"user": [1], "photo": [1],
                                                                 "ts": [1]})])
    with pytest.raises(TypeError, match="batch 0"):
        assert_incremental_equals_replay(make, TYPES, [["like", {}]])  # type: ignore[list-item]
