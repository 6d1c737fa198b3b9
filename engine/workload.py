"""Seeded workloads shared by the demo, the tests and the benchmarks."""

from __future__ import annotations

import numpy as np


def zipf_keys(n: int, keys: int, seed: int, s: float = 1.1) -> np.ndarray:
    """``n`` int64 keys in [0, keys) with Zipf(s) popularity (rank 0 most popular), shuffled ids."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, keys + 1, dtype=np.float64)
    p = ranks ** -s
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    idx = np.searchsorted(cdf, rng.random(n)).astype(np.int64)
    perm = rng.permutation(keys).astype(np.int64)  # popular keys are not simply the small ids
    return perm[np.minimum(idx, keys - 1)]


def uniform_keys(n: int, keys: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, keys, n, dtype=np.int64)


def likes(n: int, users: int, photos: int, seed: int, t0_ns: int = 1_700_000_000_000_000_000) -> dict[str, np.ndarray]:
    """A batch of "like" actions: user (uniform-ish active users), photo (Zipf), ts."""
    rng = np.random.default_rng(seed)
    return {
        "user": zipf_keys(n, users, seed + 1, s=0.8),
        "photo": zipf_keys(n, photos, seed + 2, s=1.1),
        "ts": t0_ns + np.cumsum(rng.integers(1_000, 100_000, n, dtype=np.int64)),
    }
