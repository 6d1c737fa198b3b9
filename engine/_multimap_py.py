"""Pure-Python reference twin of ``engine._multimap`` (ext/_multimap.pyx): same names, results.

A ``MultiMap`` maps a key id (an int64 >= 0, e.g. from an interner) to a growing list of int64
values in insertion order: followers of a user, posts of a feed. ``add(..., distinct=True)``
keeps each (key, value) pair at most once. Here it is a ``dict[int, list[int]]``, a set of
pairs and the insertion log, written to be obvious: the test oracle first, the fallback
(``ENGINE_NO_EXTENSIONS=1``) second. Argument checks are imported by the native module, so
both reject bad input with the same exception and message.
"""

from __future__ import annotations

import operator
import threading
from typing import Any

import numpy as np

__all__ = ["MultiMap", "KEY_MAX"]

KEY_MAX = 1 << 40  # key ids are dense ids, below this; a larger one is a bug, not a plan
_INT64 = np.dtype(np.int64)


def _int64_column(arr: Any, name: str) -> np.ndarray:
    """1-D C-contiguous int64 (strided input is copied; an empty array of any dtype is cast)."""
    a = np.asarray(arr)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got {a.ndim} dimensions")
    if a.dtype != _INT64:
        if a.shape[0] == 0:
            return np.empty(0, dtype=_INT64)
        raise TypeError(
            f"{name} must be an int64 array, got dtype {a.dtype}; cast with .astype(np.int64)"
        )
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _pairs_args(keys: Any, values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Checked (keys, values) of ``add``: same length, every key in [0, KEY_MAX)."""
    k = _int64_column(keys, "keys")
    v = _int64_column(values, "values")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"keys has {k.shape[0]} entries but values has {v.shape[0]}")
    bad = np.flatnonzero(k.view(np.uint64) >= np.uint64(KEY_MAX))  # negative: huge as uint64
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"keys[{i}] = {k[i]} is not a key id: MultiMap keys are ids in [0, 2**40); "
            f"intern raw keys first; nothing was added"
        )
    return k, v


def _key_arg(key: Any) -> int:
    """A scalar key: TypeError unless an integer; any integer is allowed (unknown -> empty)."""
    return operator.index(key)


def _nkeys_arg(nkeys: Any) -> int:
    n = operator.index(nkeys)
    if not 0 <= n <= KEY_MAX:
        raise ValueError(f"nkeys must be between 0 and 2**40, got {n}")
    return n


def _limit_arg(limit: Any) -> int:
    """``limit`` of get_many: None (every value, -1 inside) or an int >= 0."""
    if limit is None:
        return -1
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or int(limit) < 0:
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
    return min(int(limit), (1 << 62))


def _seed_arg(seed: Any) -> int | None:
    return None if seed is None else operator.index(seed)


class MultiMap:
    """key id -> list of int64 values, in insertion order.

    ``seed`` only changes the native hash table's layout (random when None), never a result;
    here it is only checked.
    """

    def __init__(self, *, seed: int | None = None) -> None:
        _seed_arg(seed)
        self._lists: dict[int, list[int]] = {}
        self._pairs: set[tuple[int, int]] = set()
        self._log_keys: list[int] = []  # every added pair, in insertion order
        self._log_values: list[int] = []
        self._lock = threading.Lock()  # "check then add" must not interleave

    def add(self, keys: Any, values: Any, distinct: bool = True) -> np.ndarray:
        """Append ``values[i]`` to ``keys[i]``'s list, in row order; return the added mask.

        With ``distinct`` a pair already present (or earlier in the same call) is skipped.
        """
        k, v = _pairs_args(keys, values)
        added = np.zeros(k.shape[0], dtype=bool)
        with self._lock:
            for i, pair in enumerate(zip(k.tolist(), v.tolist())):
                if distinct and pair in self._pairs:
                    continue
                self._pairs.add(pair)
                self._lists.setdefault(pair[0], []).append(pair[1])
                self._log_keys.append(pair[0])
                self._log_values.append(pair[1])
                added[i] = True
        return added

    def get(self, key: int) -> np.ndarray:
        """A copy of ``key``'s values in insertion order (empty if unknown)."""
        return np.array(self._lists.get(_key_arg(key), ()), dtype=np.int64)

    def get_many(self, keys: Any, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """CSR: ``values[offsets[i]:offsets[i + 1]]`` are the values of ``keys[i]`` (its first
        ``limit`` values when given)."""
        ks = _int64_column(keys, "keys").tolist()
        lim = _limit_arg(limit)
        lists = [self._lists.get(k, []) for k in ks]
        if lim >= 0:
            lists = [x[:lim] for x in lists]
        offsets = np.zeros(len(ks) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in lists], out=offsets[1:])
        flat = [x for lst in lists for x in lst]
        return offsets, np.array(flat, dtype=np.int64)

    def length(self, key: int) -> int:
        """How many values ``key`` has (0 if unknown)."""
        return len(self._lists.get(_key_arg(key), ()))

    def lengths(self, nkeys: int) -> np.ndarray:
        """``length(k)`` for every k in range(nkeys), as int64."""
        out = np.zeros(_nkeys_arg(nkeys), dtype=np.int64)
        for k, lst in self._lists.items():
            if k < out.shape[0]:
                out[k] = len(lst)
        return out

    def __len__(self) -> int:
        """The number of (key, value) pairs."""
        return len(self._log_keys)

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Every pair as (keys, values) in global insertion order: ``from_pairs`` rebuilds."""
        return (np.array(self._log_keys, dtype=np.int64),
                np.array(self._log_values, dtype=np.int64))

    @classmethod
    def from_pairs(cls, keys: Any, values: Any) -> MultiMap:
        """A MultiMap holding exactly these pairs, in this order (duplicates kept)."""
        mm = cls()
        mm.add(keys, values, distinct=False)
        return mm

    def __repr__(self) -> str:
        return f"MultiMap(<{len(self)} pairs, {len(self._lists)} keys>)"

    def __reduce__(self) -> tuple[Any, tuple[np.ndarray, np.ndarray]]:
        return _from_pairs, self.pairs()


def _from_pairs(keys: np.ndarray, values: np.ndarray) -> MultiMap:
    """Unpickle (a module-level function, so that pickle can name it)."""
    return MultiMap.from_pairs(keys, values)
