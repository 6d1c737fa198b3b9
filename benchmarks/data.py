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
