"""Type stubs of the native ``engine._dispatch`` (ext/_dispatch.pyx); twin: engine/_dispatch_py.py.

Hand-written and checked against the compiled module by ``python -m mypy.stubtest`` (see
tests/test_stubs.py). A type is the tuple ``(type_id, field_kinds, partition_index)``;
``field_kinds`` are names from ``KINDS``. Type ids given to ``add``/``dispatcher`` must be
exact ``int`` (numpy integers are rejected at run time), shards anything with ``__index__``.
"""

from collections.abc import Callable, Iterable
from typing import Any, Final, Self, SupportsIndex, TypeAlias

import numpy as np
from numpy.typing import NDArray
from typing_extensions import disjoint_base

__all__ = ["RowBuffer", "Dispatcher", "KINDS"]

KINDS: Final[tuple[str, ...]]  # the index of a kind is its code in the native module

_TypeSpec: TypeAlias = tuple[SupportsIndex, Iterable[str], SupportsIndex]
_Range: TypeAlias = tuple[SupportsIndex, SupportsIndex] | None  # inclusive (lo, hi), int kinds only

@disjoint_base
class RowBuffer:
    """Per-shard, in-order buffer of single actions of several types."""

    # __cinit__ in Cython: the arguments belong to __new__ (__init__ is object's)
    def __new__(
        cls,
        shards: SupportsIndex,
        types: list[_TypeSpec] | tuple[_TypeSpec, ...],
        flush_at: SupportsIndex = 8192,
        on_full: Callable[[], object] | None = None,
    ) -> Self: ...
    @property
    def shards(self) -> int: ...
    @property
    def total(self) -> int:
        """Actions buffered over all shards."""

    @property
    def flush_at(self) -> int: ...
    @property
    def last_shard(self) -> int:
        """Shard of the last action added, -1 before any."""
    full: bool  # set when total reaches flush_at; take() clears it below
    on_full: Callable[[], object] | None  # called after an append that leaves it full

    def add(self, type_id: int, row: tuple[Any, ...]) -> tuple[int, int]:
        """Buffer a row as ActionType.validate_one returns it; (shard, index in the shard)."""

    def add_offset(self, type_id: int, row: tuple[Any, ...]) -> int: ...
    def shard_of_last(self) -> int: ...
    def dispatcher(
        self,
        type_id: int,
        ranges: list[_Range] | tuple[_Range, ...],
        fallback: Callable[..., tuple[Any, ...]],
        *,
        string_bytes_max: SupportsIndex = 1048576,
    ) -> Dispatcher: ...
    def count(self, shard: SupportsIndex) -> int: ...
    def set_base(self, shard: SupportsIndex, offset: SupportsIndex) -> None: ...
    def take(self, shard: SupportsIndex) -> tuple[NDArray[np.uint16] | None, dict[int, list[Any]]]:
        """(uint16 type column, or None with fewer than two types, {type id: columns}).

        A column is a numpy array of the field's dtype, or a list of str/bytes for string,
        bytes and str-key fields (hence ``list[Any]``)."""

@disjoint_base
class Dispatcher:
    """``d(*values)`` -> offset of one action of one type; made by ``RowBuffer.dispatcher``."""

    def __init__(self) -> None: ...  # always raises TypeError: use RowBuffer.dispatcher()
    @property
    def type_id(self) -> int: ...
    def __call__(self, *values: Any) -> int: ...
