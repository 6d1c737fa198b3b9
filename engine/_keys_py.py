"""Pure-Python reference twin of ``engine._keys`` (ext/_keys.pyx): same names, same results.

This module is the test oracle first, so it is written to be obvious: a dict for the
interner, Python ints for scalar hashes and numpy for array hashes. It is also the fallback
(``ENGINE_NO_EXTENSIONS=1``). Every public function returns what the native one returns and
raises the same exception types, with the same messages for bad input. There is one
exception: the messages for integers that do not fit in int64 (OverflowError) come from
Cython in the native module. The checks of array arguments (``_int64_vector``, ``_byte_view``,
``_arrow_layout``) are shared: the native module imports them from here.
"""

from __future__ import annotations

import operator
import threading
from typing import Any

import numpy as np

__all__ = [
    "Int64Interner",
    "splitmix64",
    "hash_bytes",
    "shard_of_ints",
    "shard_of_int",
    "shard_of_strs",
    "shard_of_str",
]

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_INT32_MAX = (1 << 31) - 1  # shard numbers are int32
_MASK64 = (1 << 64) - 1
_CAPACITY_MAX = 1 << 40  # keys; a larger pre-size is a typo, not a plan

# splitmix64 and FNV-1a 64 constants. Routing depends on them: never change them.
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3


# ---- input checks: the array ones are imported by ext/_keys.pyx, the scalar ones mirrored there --


def _int64(value: Any, name: str) -> int:
    """An int64 scalar argument: TypeError if not an integer, OverflowError if too big."""
    v = operator.index(value)
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise OverflowError(f"{name} = {v} does not fit in int64")
    return v


def _check_shards(shards: Any) -> int:
    s = _int64(shards, "shards")
    if s < 1 or s > _INT32_MAX:
        raise ValueError(f"shards must be between 1 and {_INT32_MAX}, got {s}")
    return s


def _int64_vector(values: Any, name: str) -> np.ndarray:
    """``values`` as a 1-D int64 ndarray; arrays are never copied, lists of ints also work."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got {arr.ndim} dimensions")
    if arr.dtype != np.int64:
        if arr.shape[0] == 0:
            return np.empty(0, dtype=np.int64)
        raise TypeError(
            f"{name} must be an int64 array, got dtype {arr.dtype}; cast with .astype(np.int64)"
        )
    return arr


def _byte_view(data: Any, name: str) -> memoryview:
    """A 1-D unsigned-byte memoryview of any C-contiguous buffer (pyarrow exports 'b')."""
    if isinstance(data, str):
        raise TypeError(f"{name} must be bytes-like, got str; encode it as UTF-8 first")
    return memoryview(data).cast("B")


def _key_bytes(key: Any, name: str) -> bytes:
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, bytes):
        return key
    raise TypeError(f"{name} must be str or bytes, got {type(key).__name__}")


# ---- routing: fixed forever -------------------------------------------------------------------


def _mix(x: int) -> int:
    """splitmix64 of a uint64 given as a Python int in [0, 2**64)."""
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _fnv1a(data: bytes | memoryview) -> int:
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    return h


def splitmix64(values: Any) -> np.ndarray:
    """splitmix64 of each int64 (its two's-complement bits as uint64) -> uint64 array."""
    z = _int64_vector(values, "values").astype(np.uint64)  # wraps: two's-complement bits
    z = z + np.uint64(_GOLDEN)  # numpy uint64 array arithmetic wraps modulo 2**64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return z ^ (z >> np.uint64(31))


def shard_of_ints(values: Any, shards: int) -> np.ndarray:
    """``splitmix64(values) % shards`` as int32 shard numbers."""
    s = _check_shards(shards)
    return (splitmix64(values) % np.uint64(s)).astype(np.int32)


def shard_of_int(key: int, shards: int) -> int:
    """Shard of one int64 key; equals ``shard_of_ints([key], shards)[0]``."""
    k = _int64(key, "key")
    return _mix(k & _MASK64) % _check_shards(shards)


def hash_bytes(data: Any) -> int:
    """splitmix64 of the FNV-1a 64 hash of ``data`` (bytes-like) -> int in [0, 2**64)."""
    if isinstance(data, bytes):
        return _mix(_fnv1a(data))
    return _mix(_fnv1a(_byte_view(data, "data")))


def shard_of_str(key: str | bytes, shards: int) -> int:
    """Shard of one str (hashed as UTF-8) or bytes key."""
    s = _check_shards(shards)
    return hash_bytes(_key_bytes(key, "key")) % s


def shard_of_strs(values: Any, shards: int) -> np.ndarray:
    """Shards of many str/bytes keys -> int32 array.

    ``values`` is an iterable of str (hashed as UTF-8) or bytes, or a pair ``(offsets, data)``
    in Arrow layout: int32 offsets of n + 1 entries into a byte buffer. The same strings give
    the same shards whatever the form.
    """
    s = _check_shards(shards)
    if (
        isinstance(values, tuple)
        and len(values) == 2
        and not isinstance(values[0], (str, bytes))
    ):
        return _shard_of_arrow(*_arrow_layout(values[0], values[1]), s)
    if isinstance(values, (str, bytes)):
        raise TypeError("values must be a sequence of keys; for one key use shard_of_str()")
    seq = list(values)
    out = np.empty(len(seq), dtype=np.int32)
    for i, key in enumerate(seq):
        out[i] = hash_bytes(_key_bytes(key, f"values[{i}]")) % s
    return out


def _arrow_layout(offsets: Any, data: Any) -> tuple[np.ndarray, memoryview]:
    """Checked Arrow string layout: (int32 offsets of n + 1 entries, unsigned-byte view)."""
    off = np.asarray(offsets)
    if off.dtype != np.int32:
        raise TypeError(f"offsets must be an int32 array (Arrow layout), got dtype {off.dtype}")
    if off.ndim != 1 or off.shape[0] < 1:
        raise ValueError(f"offsets must be 1-D with n + 1 >= 1 entries, got shape {off.shape}")
    buf = _byte_view(data, "data")
    n = off.shape[0] - 1
    if off[0] < 0:
        raise ValueError(f"offsets[0] = {off[0]} is negative")
    drops = np.flatnonzero(off[1:] < off[:-1])
    if drops.size:
        bad = int(drops[0]) + 1
        raise ValueError(
            f"offsets must not decrease: offsets[{bad}] = {off[bad]} < "
            f"offsets[{bad - 1}] = {off[bad - 1]}"
        )
    if off[n] > buf.nbytes:
        raise ValueError(f"offsets[{n}] = {off[n]} is past the end of data ({buf.nbytes} bytes)")
    return off, buf


def _shard_of_arrow(off: np.ndarray, buf: memoryview, s: int) -> np.ndarray:
    bounds = off.tolist()
    hashes = [_mix(_fnv1a(buf[bounds[i] : bounds[i + 1]])) for i in range(len(bounds) - 1)]
    return np.array([h % s for h in hashes], dtype=np.int32)


# ---- the interner -----------------------------------------------------------------------------


class Int64Interner:
    """Dense ids 0, 1, 2, ... for int64 keys, in first-appearance order.

    ``capacity`` is the number of keys held before the first resize. ``seed`` only changes the
    native hash table's layout, never an id; here both are only checked.
    """

    def __init__(self, capacity: int = 1024, *, seed: int | None = None) -> None:
        capacity = _int64(capacity, "capacity")
        if capacity < 0 or capacity > _CAPACITY_MAX:
            raise ValueError(
                f"capacity must be between 0 and {_CAPACITY_MAX} keys, got {capacity}"
            )
        if seed is not None:
            operator.index(seed)
        self._ids: dict[int, int] = {}  # key -> id; insertion order is id order
        self._key_array = np.empty(0, dtype=np.int64)  # cache of the keys; stale if shorter
        self._lock = threading.Lock()  # a dict is GIL-safe, but "check then add" is not

    def _keys_in_id_order(self) -> np.ndarray:
        with self._lock:
            if self._key_array.shape[0] != len(self._ids):
                self._key_array = np.fromiter(self._ids, dtype=np.int64, count=len(self._ids))
            return self._key_array

    def intern(self, values: Any) -> np.ndarray:
        """Ids of ``values`` (1-D int64); unseen keys get new ids in order of appearance."""
        keys = _int64_vector(values, "values").tolist()
        ids = self._ids
        with self._lock:
            # len(ids) is evaluated before setdefault inserts, so a new key gets the next id.
            out = [ids.setdefault(k, len(ids)) for k in keys]
        return np.array(out, dtype=np.int64)

    def lookup(self, values: Any) -> np.ndarray:
        """Ids of ``values`` (1-D int64), -1 where unseen; never adds a key."""
        keys = _int64_vector(values, "values").tolist()
        get = self._ids.get
        return np.array([get(k, -1) for k in keys], dtype=np.int64)

    def intern_one(self, key: int) -> int:
        """The id of one key, added if unseen."""
        k = _int64(key, "key")
        with self._lock:
            return self._ids.setdefault(k, len(self._ids))

    def get(self, key: int, default: int = -1) -> int:
        """The id of one key, or ``default`` if unseen."""
        return self._ids.get(_int64(key, "key"), _int64(default, "default"))

    def extend(self, keys: Any) -> None:
        """Append ``keys`` (new and distinct) with the next ids; on a duplicate raise
        ValueError naming it and add nothing."""
        new = _int64_vector(keys, "keys").tolist()
        with self._lock:
            ids = self._ids
            n0 = len(ids)
            position: dict[int, int] = {}
            for i, k in enumerate(new):
                if k in ids:
                    raise ValueError(
                        f"extend(): key {k} at position {i} is already interned "
                        f"(id {ids[k]}); nothing was added"
                    )
                if k in position:
                    raise ValueError(
                        f"extend(): key {k} at position {i} repeats position "
                        f"{position[k]}; nothing was added"
                    )
                position[k] = i
            ids.update(zip(new, range(n0, n0 + len(new))))

    def keys(self) -> np.ndarray:
        """A copy of the keys in id order (int64)."""
        return self._keys_in_id_order().copy()

    def key_of(self, ids: Any) -> np.ndarray:
        """The keys of ``ids`` (1-D int64); IndexError if any id is not in [0, len)."""
        arr = _int64_vector(ids, "ids")
        n = len(self._ids)
        bad = np.flatnonzero((arr < 0) | (arr >= n))
        if bad.size:
            i = int(bad[0])
            raise IndexError(f"ids[{i}] = {arr[i]} is out of range for {n} keys")
        return self._keys_in_id_order()[arr]

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return operator.index(key) in self._ids  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"Int64Interner(<{len(self)} keys>)"

    def __reduce__(self) -> tuple[Any, tuple[int], np.ndarray]:
        return Int64Interner, (len(self),), self.keys()  # pickle: the keys in id order

    def __setstate__(self, keys: np.ndarray) -> None:
        self.extend(keys)
