"""Type stubs of the native ``engine._multimap`` (ext/_multimap.pyx); twin: engine/_multimap_py.py.

Hand-written and checked against the compiled module by ``python -m mypy.stubtest`` (see
tests/test_stubs.py). Keys are dense key ids (int64 in [0, KEY_MAX)), values int64.
"""

from typing import Any, Final, Self, SupportsIndex, final

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["MultiMap", "KEY_MAX"]

KEY_MAX: Final = 1099511627776  # 1 << 40

@final
class MultiMap:
    """key id -> list of int64 values, in insertion order."""

    # __cinit__ in Cython: the arguments belong to __new__ (__init__ is object's)
    def __new__(cls, *, seed: SupportsIndex | None = None) -> Self: ...
    def add(self, keys: ArrayLike, values: ArrayLike, distinct: bool = True) -> NDArray[np.bool_]:
        """Append ``values[i]`` to ``keys[i]``'s list; the mask of the rows added."""

    def get(self, key: SupportsIndex) -> NDArray[np.int64]: ...
    def get_many(
        self, keys: ArrayLike, limit: int | np.integer[Any] | None = None
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """CSR (offsets, values): ``values[offsets[i]:offsets[i + 1]]`` belong to ``keys[i]``."""

    def length(self, key: SupportsIndex) -> int: ...
    def lengths(self, nkeys: SupportsIndex) -> NDArray[np.int64]: ...
    def __len__(self) -> int: ...
    def pairs(self) -> tuple[NDArray[np.int64], NDArray[np.int64]]: ...
    @classmethod
    def from_pairs(cls, keys: ArrayLike, values: ArrayLike) -> Self: ...
