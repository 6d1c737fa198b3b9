"""Seeded workloads shared by the demo, the tests and the benchmarks."""

from __future__ import annotations

import numpy as np


def zipf_keys(n: int, keys: int, seed: int, s: float = 1.1, perm_seed: int | None = None) -> np.ndarray:
    """``n`` int64 keys in [0, keys) with Zipf(s) popularity (rank 0 most popular), shuffled ids.

    Draws with the same ``perm_seed`` share which ids are popular.
    """
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, keys + 1, dtype=np.float64)
    p = ranks ** -s
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    idx = np.searchsorted(cdf, rng.random(n)).astype(np.int64)
    perm_rng = rng if perm_seed is None else np.random.default_rng(perm_seed)
    perm = perm_rng.permutation(keys).astype(np.int64)  # popular keys are not simply small ids
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


WORDS = ("sunset beach dog cat city night food coffee mountain lake friends party art street "
         "travel summer winter snow rain flower garden music concert book library bike run "
         "sea boat bridge tower market bread pizza tea forest road train portrait smile").split()


def captions(n: int, seed: int, words: int = 4) -> list[str]:
    """``n`` captions of ``words`` words drawn Zipf-ishly from a small vocabulary."""
    idx = zipf_keys(n * words, len(WORDS), seed, s=0.9).reshape(n, words)
    vocab = np.array(WORDS, dtype=object)
    return [" ".join(row) for row in vocab[idx].tolist()]


def photo_app(n: int, users: int, seed: int, t0_ns: int = 1_700_000_000_000_000_000
              ) -> list[tuple[str, dict[str, object]]]:
    """The photo-sharing workload, as chunks ``(type, columns)`` in append order.

    Mix: 70 % likes, 12 % follows, 10 % comments, 5 % posts (each with its caption), 3 % tags
    (caption tokens → photo; the demo derives these from the captions instead and drops them). Popularity is Zipf everywhere.
    """
    rng = np.random.default_rng(seed)
    n_post = max(1, n // 20)
    n_follow = n * 12 // 100
    n_comment = n // 10
    n_like = n - n_post - n_follow - n_comment
    photos = n_post
    author = zipf_keys(n_post, users, seed + 1, s=0.9, perm_seed=seed)
    post_ts = t0_ns + np.sort(rng.integers(0, 10**12, n_post))
    caps = captions(n_post, seed + 2)
    tokens: list[str] = []
    tag_photo: list[int] = []
    for pid, c in enumerate(caps):
        for w in dict.fromkeys(c.split()):
            tokens.append(w)
            tag_photo.append(pid)
    chunks: list[tuple[str, dict[str, object]]] = [
        ("post", {"user": author, "photo": np.arange(n_post, dtype=np.int64), "caption": caps,
                  "ts": post_ts}),
        ("tag", {"token": tokens, "photo": np.array(tag_photo, np.int64)}),
        ("follow", {"user": zipf_keys(n_follow, users, seed + 3, s=0.6),
                    "target": zipf_keys(n_follow, users, seed + 4, s=1.1, perm_seed=seed)}),
        ("like", {"user": zipf_keys(n_like, users, seed + 5, s=0.8),
                  "photo": zipf_keys(n_like, photos, seed + 6, s=1.1, perm_seed=seed + 100),
                  "ts": t0_ns + 10**12 + np.cumsum(rng.integers(1, 1000, n_like, dtype=np.int64))}),
        ("comment", {"user": zipf_keys(n_comment, users, seed + 7, s=0.8),
                     "photo": zipf_keys(n_comment, photos, seed + 8, s=1.1, perm_seed=seed + 100),
                     "text": captions(n_comment, seed + 9, words=3)}),
    ]
    return chunks
