"""Seeded data shared by the benchmarks and the tests (a thin layer over ``engine.workload``).

Every generator is deterministic in its arguments, so the engine and each peer of a benchmark
get exactly the same actions, and a test can regenerate what a benchmark wrote.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

import engine as en
from engine.workload import likes, uniform_keys, zipf_keys

__all__ = [
    "BATCH",
    "LIKE",
    "SEED",
    "VIEW",
    "batches",
    "frame_bytes",
    "like_columns",
    "like_rows",
    "likes",
    "uniform_keys",
    "view_columns",
    "zipf_keys",
]  # fmt: skip

#: One action per call (dispatch suites): two key fields and a timestamp, three arguments.
LIKE = en.ActionType("like", {"user": en.key("user"), "photo": en.key("photo"), "ts": en.timestamp},
                     partition="user")
#: The columnar suites (append, scan): BENCH.md's "3 × int64 + key" = one key column (interned
#: to dense ids) and three int64-wide columns, 32 bytes per action.
VIEW = en.ActionType("view", {"user": en.key("user"), "photo": en.int64, "ts": en.timestamp,
                              "ms": en.int64}, partition="user")
BATCH = 65_536  # actions per appended batch (BENCH.md: "in batches of 64k")
SEED = 20_240_601
USERS_PER_ACTION = 0.05  # distinct users ≈ 5 % of the actions (at least 1,000)
PHOTOS_PER_ACTION = 0.5


def _domains(n: int) -> tuple[int, int]:
    return max(1_000, int(n * USERS_PER_ACTION)), max(1_000, int(n * PHOTOS_PER_ACTION))


@lru_cache(maxsize=8)
def _cached_likes(n: int, seed: int) -> dict[str, np.ndarray]:
    users, photos = _domains(n)
    cols = likes(n, users, photos, seed)
    for v in cols.values():
        v.setflags(write=False)  # shared between benchmarks: nobody may change it
    return cols


def like_columns(n: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """``n`` "like" actions as int64 columns {"user", "photo", "ts"} (read-only, cached)."""
    return _cached_likes(int(n), int(seed))


@lru_cache(maxsize=8)
def _cached_views(n: int, seed: int) -> dict[str, np.ndarray]:
    users, photos = _domains(n)
    base = likes(n, users, photos, seed)
    cols = {"user": base["user"], "photo": base["photo"], "ts": base["ts"],
            "ms": np.random.default_rng(seed + 3).integers(0, 60_000, n, dtype=np.int64)}
    for v in cols.values():
        v.setflags(write=False)
    return cols


def view_columns(n: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """``n`` "view" actions as int64 columns {"user", "photo", "ts", "ms"} (read-only, cached)."""
    return _cached_views(int(n), int(seed))


def like_rows(n: int, seed: int = SEED) -> tuple[list[int], list[int], list[int]]:
    """The same actions as three Python int lists (for one-call-per-action paths)."""
    cols = like_columns(n, seed)
    return cols["user"].tolist(), cols["photo"].tolist(), cols["ts"].tolist()


def batches(cols: dict[str, np.ndarray], size: int = BATCH) -> list[dict[str, np.ndarray]]:
    """``cols`` cut into consecutive batches of ``size`` actions (views, no copy)."""
    n = len(next(iter(cols.values())))
    return [{f: v[lo : lo + size] for f, v in cols.items()} for lo in range(0, n, size)]


def frame_bytes(cols: dict[str, np.ndarray]) -> int:
    """Column bytes of a batch (what a frame carries besides its header and padding)."""
    return sum(int(v.nbytes) for v in cols.values())


# -- stores (bench_store.py): one keyed action "ev" {k: key, v: int64} folded into count + sum +
# last per key. Appended helpers; the log suites above do not use them.
STORE_KEYS = 1_000_000  # BENCH.md: "1M int keys" (the key domain; Zipf draws touch fewer)
STORE_DISTS = ("zipf", "uniform")
STORE_VALUE_MAX = 1 << 20


@lru_cache(maxsize=8)
def _cached_fold_columns(n: int, dist: str, keys: int, seed: int) -> dict[str, np.ndarray]:
    if dist == "zipf":
        k = zipf_keys(n, keys, seed + 11, s=1.1)
    elif dist == "uniform":
        k = uniform_keys(n, keys, seed + 12)
    else:
        raise ValueError(f"dist must be one of {STORE_DISTS}, not {dist!r}")
    v = np.random.default_rng(seed + 13).integers(0, STORE_VALUE_MAX, n, dtype=np.int64)
    cols = {"k": k, "v": v}
    for a in cols.values():
        a.setflags(write=False)
    return cols


def fold_columns(n: int, dist: str, keys: int = STORE_KEYS, seed: int = SEED) -> dict[str, np.ndarray]:
    """``n`` actions {"k": int64 key in [0, keys) (Zipf 1.1 or uniform), "v": int64 value}
    (read-only, cached)."""
    return _cached_fold_columns(int(n), str(dist), int(keys), int(seed))


def string_keys_of(ints: np.ndarray) -> list[str]:
    """The string spelling of int keys: ``"user-%07d" % i`` (same order for ids < 10**7)."""
    return [f"user-{i:07d}" for i in np.asarray(ints).tolist()]


@lru_cache(maxsize=2)
def string_key_names(keys: int = STORE_KEYS) -> object:
    """:func:`string_keys_of` of every key in [0, keys), as a pyarrow string array."""
    import pyarrow as pa

    return pa.array(string_keys_of(np.arange(int(keys))), pa.string())


def fold_string_columns(n: int, dist: str, keys: int = STORE_KEYS, seed: int = SEED) -> dict[str, object]:
    """:func:`fold_columns` with every key spelled as a string: {"k": pyarrow string array,
    "v": int64}. The int keys stay recoverable: ``int(s[5:])``."""
    import pyarrow as pa

    cols = fold_columns(n, dist, keys, seed)
    return {"k": string_key_names(keys).take(pa.array(cols["k"])), "v": cols["v"]}


@lru_cache(maxsize=4)
def _cached_restart_columns(keys: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 21)
    k = np.concatenate([rng.permutation(keys), rng.integers(0, keys, keys)]).astype(np.int64)
    v = rng.integers(0, STORE_VALUE_MAX, len(k), dtype=np.int64)
    cols = {"k": k, "v": v}
    for a in cols.values():
        a.setflags(write=False)
    return cols


def restart_columns(keys: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """``2 * keys`` actions in which every key of [0, keys) appears (each once, in a random
    order, then ``keys`` uniform draws): a store over them has exactly ``keys`` keys."""
    return _cached_restart_columns(int(keys), int(seed))


def fold_reference(keys: np.ndarray, values: np.ndarray) -> dict[str, np.ndarray]:
    """count, sum (int64, wrapping) and last value per distinct key, keys ascending: the
    expected answer of every replay-fold system (a stable sort keeps log order per key)."""
    keys = np.asarray(keys)
    values = np.asarray(values, np.int64)
    n = len(keys)
    if n == 0:
        e = np.empty(0, np.int64)
        return {"key": keys[:0], "n": e, "s": e, "last": e}
    order = np.argsort(keys, kind="stable")
    sk, sv = keys[order], values[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    ends = np.r_[starts[1:], n]
    return {"key": sk[starts], "n": (ends - starts).astype(np.int64),
            "s": np.add.reduceat(sv, starts), "last": sv[ends - 1]}
