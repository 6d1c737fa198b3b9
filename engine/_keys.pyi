"""Type stubs of the native ``engine._keys`` (ext/_keys.pyx); twin: engine/_keys_py.py.

Hand-written and checked against the compiled module by ``python -m mypy.stubtest`` (see
tests/test_stubs.py). Integer arguments go through ``operator.index`` at run time, so they are
``SupportsIndex`` (numpy integers are fine); arrays of int64 keys are ``ArrayLike`` (int64
arrays are used as they are, lists of ints work too).
"""

from collections.abc import Iterable
from typing import Any, Self, SupportsIndex, TypeAlias, final

import numpy as np
from numpy.typing import ArrayLike, NDArray
from typing_extensions import Buffer

__all__ = [
    "Int64Interner",
    "splitmix64",
    "hash_bytes",
    "shard_of_ints",
    "shard_of_int",
    "shard_of_strs",
    "shard_of_str",
]

# numpy only declares ndarray.__buffer__ for Python >= 3.12: list it explicitly.
_Bytes: TypeAlias = Buffer | np.ndarray[Any, Any]

def splitmix64(values: ArrayLike) -> NDArray[np.uint64]: ...
def shard_of_ints(values: ArrayLike, shards: SupportsIndex) -> NDArray[np.int32]: ...
def shard_of_int(key: SupportsIndex, shards: SupportsIndex) -> int: ...
def hash_bytes(data: _Bytes) -> int: ...
def shard_of_str(key: str | bytes, shards: SupportsIndex) -> int: ...
def shard_of_strs(
    values: Iterable[str | bytes] | tuple[ArrayLike, _Bytes], shards: SupportsIndex
) -> NDArray[np.int32]:
    """Shards of many keys: an iterable of str/bytes (not one str: TypeError), or an Arrow
    layout pair ``(int32 offsets of n + 1 entries, data buffer)``."""

@final
class Int64Interner:
    """Dense ids 0, 1, 2, ... for int64 keys, in first-appearance order."""

    # __cinit__ in Cython: the arguments belong to __new__ (__init__ is object's)
    def __new__(
        cls, capacity: SupportsIndex = 1024, *, seed: SupportsIndex | None = None
    ) -> Self: ...
    def intern(self, values: ArrayLike) -> NDArray[np.int64]: ...
    def lookup(self, values: ArrayLike) -> NDArray[np.int64]: ...
    def intern_one(self, key: SupportsIndex) -> int: ...
    def get(self, key: SupportsIndex, default: SupportsIndex = -1) -> int: ...
    def extend(self, keys: ArrayLike) -> None: ...
    def keys(self) -> NDArray[np.int64]: ...
    def key_of(self, ids: ArrayLike) -> NDArray[np.int64]: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: object, /) -> bool: ...  # TypeError unless an integer
    def __setstate__(self, keys: ArrayLike) -> None: ...
