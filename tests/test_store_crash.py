"""Store checkpoints survive ``kill -9`` at any moment, during checkpoint writing included.

Design note. The parent prepares a 2-shard log once (likes and follows, ~200k actions, 1 MiB
segments) and folds a clean copy of it from scratch into the stores (``stores()``: scalar
reducers, the fused count + sum + last, a ring and a multimap), keeping every store's answer
for every key (``snapshot``: ``get`` of each key) as the reference. Each round then starts a
child (a fresh interpreter running ``CHILD_CODE``) in a working copy of the directory; it opens
the log and the App (recovering the stores from the last checkpoint), folds STEP actions per
shard at a time, and before and after each ``app.checkpoint()`` prints ``start-ckpt I`` /
``ckpt I MS``. The parent reads the pipe and SIGKILLs the child right after a seeded line: most
rounds after a ``start-ckpt`` plus a seeded busy-wait of up to the child's own last checkpoint
duration (so the kill lands inside the checkpoint writing: a half-written generation, a
manifest renamed or not, the previous generation half removed), some after a ``ckpt`` line
(between checkpoints, mid-fold). No sleeps synchronize anything.

After each kill the parent checks the directory:

* the checkpoint the App recovers is exactly a fold from scratch up to the checkpoint's offsets
  (state arrays and multimap pairs compared), never a mix of generations;
* no ``gen-*`` directory other than the manifest's remains after the reopen;
* after folding the rest of the log, every store's ``get`` of every key equals the reference;
* the log itself is unchanged (end offsets).

Working copies are reused for up to ROUNDS_PER_DIR rounds (a recovered directory is crashed
and recovered again; the next child resumes from the parent's reopen, which does not
checkpoint), then replaced by a fresh copy of the prepared log. ``ENGINE_STORE_CRASH_ROUNDS``
(default 10) and ``ENGINE_STORE_CRASH_SEED`` choose the run; a failure names the seed and round.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest

import engine as en
from engine import reducers as r
from engine.app import MANIFEST, App
from engine.store import Store
from engine.testing import Faults

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the project root, also in CI's fresh clone

ROUNDS = int(os.environ.get("ENGINE_STORE_CRASH_ROUNDS", "10"))
SEED = int(os.environ.get("ENGINE_STORE_CRASH_SEED", "770077"))
ROUNDS_PER_DIR = 3
USERS, PHOTOS = 3_000, 5_000
N_LIKE, N_FOLLOW = 150_000, 50_000
STEP = 12_000  # actions per shard folded between two checkpoints (~6 steps to a shard's end)


def schema() -> tuple[list[en.ActionType], en.Limits]:
    like = en.ActionType("like", {"user": en.key("user"), "photo": en.key("photo"),
                                  "ts": en.int64}, partition="user")
    follow = en.ActionType("follow", {"user": en.key("user"), "target": en.key("user")},
                           partition="user")
    return [like, follow], en.Limits(segment_bytes=1 << 20)


def stores(suffix: str = "") -> list[Store]:
    """Every kind of state: count/sum/min/max/mean, the fused count + sum + last, first, a ring
    (the 32 latest photos of a user: the checkpoint's bulk) and a multimap (followers,
    distinct). ``suffix`` renames them (same definitions, no checkpoint: they start empty)."""
    return [
        Store("photo" + suffix, key="photo",
              columns={"likes": np.int64, "ts_sum": np.int64, "ts_min": np.int64,
                       "ts_max": np.int64, "ts_mean": np.float64},
              reducers={"like": [r.count("likes"), r.sum("ts_sum", "ts"), r.min("ts_min", "ts"),
                                 r.max("ts_max", "ts"), r.mean("ts_mean", "ts")]}),
        Store("user" + suffix, key="user",  # keyed by the partition key: order-dependent ok
              columns={"n": np.int64, "ts_sum": np.int64, "ts_last": np.int64,
                       "first": np.int64, "recent": r.ring(32)},
              reducers={"like": [r.count("n"), r.sum("ts_sum", "ts"), r.last("ts_last", "ts"),
                                 r.first("first", "ts"), r.push("recent", "photo")]},
              key_fields={"like": "user"}),
        Store("followers" + suffix, key="user", columns={"who": r.multimap(), "count": np.int64},
              reducers={"follow": [r.add("who", "user"), r.count("count")]},
              key_fields={"follow": "target"}),
    ]


def fold_step(app: Any, step: int) -> int:
    """Fold up to ``step`` more actions of every shard into every store (what ``App.fold``
    does, with a stop): returns the actions folded."""
    n = 0
    for s in range(app.log.shards):
        live = list(app.stores.values())
        start = min(st.shards[s].offset for st in live)
        stop = min(start + step, app.log.end_offset(s))
        for batch in app.log.read(s, start, stop):
            for st in live:
                st.apply(s, batch, len(app.log.dicts[st.domain]))
            n += batch.end_offset - batch.first_offset
    return n


# The child runs the functions above (their source), then this loop until it is killed.
CHILD = r"""
import os, sys, time

TYPES, LIMITS = schema()
path = sys.argv[1]
log = en.open(path, TYPES, durability="none", limits=LIMITS)
app = App(log, stores(), checkpoint_every_actions=None, checkpoint_every_s=None)
os.write(1, b"ready\n")
i = 0
while True:
    fold_step(app, STEP)
    i += 1
    os.write(1, f"start-ckpt {i}\n".encode())
    t0 = time.perf_counter()
    app.checkpoint()
    os.write(1, f"ckpt {i} {(time.perf_counter() - t0) * 1e3:.3f}\n".encode())
"""
CHILD_HEAD = f"""from __future__ import annotations
from typing import Any
import numpy as np
import engine as en
from engine import reducers as r
from engine.app import App
from engine.store import Store
STEP = {STEP}
"""
CHILD_CODE = "\n\n".join(
    [CHILD_HEAD] + [inspect.getsource(f) for f in (schema, stores, fold_step)] + [CHILD])

TYPES, LIMITS = schema()


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


def prepare(path: str) -> list[int]:
    """The log every round starts from (seeded); returns its end offset per shard."""
    rng = np.random.default_rng(SEED)
    with en.open(path, TYPES, shards=2, durability="none", limits=LIMITS) as log:
        for lo in range(0, N_LIKE, 25_000):  # several frames and segments per shard
            m = min(25_000, N_LIKE - lo)
            log.append("like", {"user": rng.integers(0, USERS, m),
                                "photo": rng.zipf(1.3, m) % PHOTOS,
                                "ts": rng.integers(-10**12, 10**12, m)})
            f = N_FOLLOW * m // N_LIKE
            log.append("follow", {"user": rng.integers(0, USERS, f),
                                  "target": rng.zipf(1.2, f) % USERS})
        log.flush()
        return [log.end_offset(s) for s in range(log.shards)]


def snapshot(app: App) -> dict[str, dict[Any, dict[str, Any]]]:
    """Every store's answer for every key of its domain, through ``get``."""
    out: dict[str, dict[Any, dict[str, Any]]] = {}
    for name, s in app.stores.items():
        keys = app.log.dicts[s.domain].interner.keys().tolist()
        out[name] = {k: {c: (v.tolist() if isinstance(v, np.ndarray) else v)
                         for c, v in s.get(k).items()} for k in keys}
    return out


def state_of(store: Store, keys: int) -> list[tuple]:
    """A store's raw state per shard: offset, arrays (first ``keys`` rows, zero beyond the
    capacity), multimap pairs."""
    shards = []
    for st in store.shards:
        arrays = {}
        for a, v in st.arrays.items():
            rows = np.zeros((keys, *v.shape[1:]), v.dtype)
            m = min(keys, v.shape[0])
            rows[:m] = v[:m]
            arrays[a] = rows.tobytes()
        pairs = {m: tuple(x.tolist() for x in mm.pairs()) for m, mm in st.multimaps.items()}
        shards.append((st.offset, arrays, pairs))
    return shards


def first_difference(got: list[tuple], want: list[tuple]) -> str:
    """Where two ``state_of`` results differ first ("" if they are equal)."""
    for s, ((o1, a1, p1), (o2, a2, p2)) in enumerate(zip(got, want, strict=True)):
        if o1 != o2:
            return f"shard {s}: offset {o1} != {o2}"
        for name in sorted(set(a1) | set(a2)):
            if a1.get(name) != a2.get(name):
                return f"shard {s}: array {name!r} differs"
        for name in sorted(set(p1) | set(p2)):
            if p1.get(name) != p2.get(name):
                return f"shard {s}: multimap {name!r} pairs differ"
    return ""


def scratch_fold(path: str, index: int, offsets: list[int]) -> tuple[Store, en.Log]:
    """Store ``stores()[index]`` (renamed: no checkpoint) folded from offset 0 up to
    ``offsets`` (per shard) of the log at ``path``, opened read-only (the caller closes it)."""
    log = en.open(path, readonly=True)
    store = stores("-scratch")[index]
    App(log, [store], checkpoint_every_actions=None, checkpoint_every_s=None)
    assert all(st.offset == 0 for st in store.shards)
    for s, stop in enumerate(offsets):
        for batch in log.read(s, 0, stop):
            store.apply(s, batch, len(log.dicts[store.domain]))
    return store, log


def generations(path: str) -> dict[str, list[str]]:
    root = os.path.join(path, "stores")
    out = {}
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        d = os.path.join(root, name, "v1")
        names = os.listdir(d) if os.path.isdir(d) else []
        out[name] = sorted(x for x in names if x.startswith("gen-"))
    return out


def manifest_gen(path: str, name: str) -> str | None:
    m = os.path.join(path, "stores", name, "v1", MANIFEST)
    if not os.path.exists(m):
        return None
    with open(m) as f:
        return json.load(f)["generation"]


def busy_wait(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def run_child(path: str, rng: random.Random, ckpt_ms: list[float], where: str) -> str:
    """Start a child in ``path``, SIGKILL it at a seeded point; returns where it was killed."""
    mid = rng.random() < 0.75  # kill inside a checkpoint (else right after one completed)
    target = rng.randint(1, 4)
    p = subprocess.Popen([sys.executable, "-c", CHILD_CODE, path], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(),
                         cwd=ROOT)
    killed = ""
    try:
        for raw in p.stdout:  # synchronize on the pipe: kill right after the chosen line
            parts = raw.decode().split()
            if parts[0] == "ckpt":
                ckpt_ms.append(float(parts[2]))
            if parts[0] == "start-ckpt" and mid and int(parts[1]) == target:
                window = (ckpt_ms[-1] if ckpt_ms else 30.0) / 1e3
                busy_wait(rng.uniform(0, 1.1 * window))
                killed = f"in-ckpt-{target}"
                break
            if parts[0] == "ckpt" and not mid and int(parts[1]) == target:
                killed = f"after-ckpt-{target}"
                break
        else:
            raise AssertionError(f"{where}: the child exited by itself (code {p.wait()}): "
                                 f"{p.stderr.read().decode()[-3000:]}")
    finally:
        from logutil import reap  # here, not at the top: the child runs this file's imports

        code, _, err = reap(p)
    assert code == -signal.SIGKILL, f"{where}: the child ended with {code}: {err[-3000:]}"
    return killed


def check_recovery(path: str, ends: list[int], reference: dict, where: str,
                   stats: Counter) -> None:
    before = generations(path)
    if any(len(g) > 1 or (g and g[0] != manifest_gen(path, n)) for n, g in before.items()):
        stats["stray-gen-found"] += 1  # the kill landed between a gen's mkdir and the old's removal
    log = en.open(path, TYPES, durability="none", limits=LIMITS)
    try:
        assert [log.end_offset(s) for s in range(log.shards)] == ends, f"{where}: log changed"
        app = App(log, stores(), checkpoint_every_actions=None, checkpoint_every_s=None)
        # no generation but the manifest's survives the reopen
        for name, gens in generations(path).items():
            want = [manifest_gen(path, name)] if manifest_gen(path, name) else []
            assert gens == want, f"{where}: store {name}: generations {gens}, manifest's {want}"
        # the recovered checkpoint is exactly a fold from scratch up to its offsets
        for i, (name, s) in enumerate(app.stores.items()):
            offs = [st.offset for st in s.shards]
            stats["recovered-from-ckpt" if any(offs) else "recovered-empty"] += 1
            scratch, ro = scratch_fold(path, i, offs)
            try:
                nk = len(log.dicts[s.domain])
                diff = first_difference(state_of(s, nk), state_of(scratch, nk))
                if diff:
                    pytest.fail(f"{where}: store {name}: its checkpoint at offsets {offs} is not "
                                f"the fold of the log up to them: {diff}")
            finally:
                ro.close()
        app.fold()
        assert snapshot(app) == reference, f"{where}: stores differ from a clean fold"
    finally:
        log.close()  # no app.close(): the next child resumes from the child's checkpoint


def prepared_with_reference(tmp_path: Any) -> tuple[str, list[int], dict]:
    """The prepared log (a template to copy), its end offsets, and every store's answers
    after a clean fold of a copy of it."""
    template = str(tmp_path / "template")
    ends = prepare(template)
    clean = str(tmp_path / "clean")
    shutil.copytree(template, clean)
    with en.open(clean, TYPES, durability="none", limits=LIMITS) as log:
        app = App(log, stores(), checkpoint_every_actions=None, checkpoint_every_s=None)
        app.fold()
        return template, ends, snapshot(app)


def test_kill9_during_checkpoints(tmp_path: Any) -> None:
    template, ends, reference = prepared_with_reference(tmp_path)
    assert sum(len(v) for v in reference.values()) > 5_000
    assert len(reference["followers"]) > 1_000
    assert sum(len(v["who"]) for v in reference["followers"].values()) > 10_000
    assert sum(len(v["recent"]) for v in reference["user"].values()) > 10_000

    rng = random.Random(SEED)
    stats: Counter = Counter()
    ckpt_ms: list[float] = []
    path = ""
    for rnd in range(ROUNDS):
        where = f"seed {SEED} round {rnd}"
        if rnd % ROUNDS_PER_DIR == 0:
            if path:
                shutil.rmtree(path)
            path = str(tmp_path / f"work-{rnd}")
            shutil.copytree(template, path)
        stats[run_child(path, rng, ckpt_ms, where)] += 1
        check_recovery(path, ends, reference, where, stats)
    print(f"\nstore crash rounds={ROUNDS} seed={SEED}: {dict(sorted(stats.items()))}; "
          f"checkpoint ms median {np.median(ckpt_ms) if ckpt_ms else float('nan'):.1f}")
    assert ckpt_ms, "no checkpoint completed in any round"
    # timed kills land in the generation window only sometimes ("stray-gen-found" above);
    # test_kill9_parked_in_a_checkpoint puts them there every time


@pytest.mark.timeout(180)
@pytest.mark.parametrize("point,hit", [
    pytest.param("engine.app.write_json_atomic", 2, id="second-store-gen-written-no-manifest"),
    pytest.param("shutil.rmtree", 1, id="manifest-renamed-old-gen-kept"),
])
def test_kill9_parked_in_a_checkpoint(tmp_path: Any, point: str, hit: int) -> None:
    """A real kill -9 at an exact step of a checkpoint leaves a generation the manifest does
    not name (or the manifest's new one plus the old); recovery removes the stray one and the
    stores recover exactly the manifest's checkpoint."""
    template, ends, reference = prepared_with_reference(tmp_path)
    path = str(tmp_path / "work")
    shutil.copytree(template, path)
    crash = Faults(0).crash_point(CHILD_CODE, point, hit=hit, args=[path])
    assert crash.returncode == -signal.SIGKILL and crash.lines[0] == "ready", crash.stdout
    gens = generations(path)
    stray = {n: g for n, g in gens.items() if g != ([manifest_gen(path, n)] if manifest_gen(path, n) else [])}
    assert stray, f"the kill at {point} (call {hit}) left no stray generation: {gens}"
    stats: Counter = Counter()
    check_recovery(path, ends, reference, f"parked at {point} call {hit}", stats)
    assert stats["stray-gen-found"] == 1, stats




def test_to_arrow_after_restart_before_fold(tmp_path: Any) -> None:
    """A restarted store answers for keys appended after its checkpoint (as zero until the
    tail is folded): get/get_many do, to_arrow must agree with them."""
    ev = en.ActionType("ev", {"k": en.key("k"), "v": en.int64}, partition="k")

    def store() -> Store:
        return Store("agg", key="k", columns={"n": np.int64},
                     reducers={"ev": [r.count("n")]})

    with en.open(str(tmp_path), [ev], durability="none") as log:
        log.append("ev", {"k": np.arange(1_000), "v": np.arange(1_000)})
        App(log, [store()], checkpoint_every_actions=None, checkpoint_every_s=None).close()
        log.append("ev", {"k": np.arange(1_000, 3_000), "v": np.arange(2_000)})
    with en.open(str(tmp_path)) as log:
        s = App(log, [store()], checkpoint_every_actions=None, checkpoint_every_s=None)["agg"]
        assert s.get_many([5, 2_500])["n"].tolist() == [1, 0]  # before the tail is folded
        t = s.to_arrow()  # ArrowInvalid: column n has 1024 rows, the key column 3000
        assert t.num_rows == 3_000
        assert t.column("n").to_pylist() == s.get_many(np.arange(3_000))["n"].tolist()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-s"]))
