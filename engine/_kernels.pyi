"""Type stubs of the native ``engine._kernels`` (ext/_kernels.pyx); twin: engine/_kernels_py.py.

Hand-written and checked against the compiled module by ``python -m mypy.stubtest`` (see
tests/test_stubs.py). Outputs are caller-owned, writeable, C-contiguous numpy arrays updated
in place, so they are typed as arrays of their exact dtype; value outputs are int64 or float64
and must share one dtype (the ``_V`` type variable). Inputs (key ids, values, masks) are
anything numpy sees as 1-D: ``ArrayLike``.
"""

from typing import Any, SupportsIndex, TypeAlias, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "reduce_count",
    "reduce_sum",
    "reduce_min",
    "reduce_max",
    "reduce_first",
    "reduce_last",
    "fold_count_sum_last",
    "fold_count_sum_last_rows",
    "ring_push",
    "ring_read",
    "watch_diff",
    "watched_unique",
    "fan_out",
    "topk",
    "topk_push",
    "topk_read",
    "point_read",
]

_V = TypeVar("_V", np.int64, np.float64)  # the dtype of values and value outputs
_Seen: TypeAlias = NDArray[np.bool_] | NDArray[np.uint8]
_Mask: TypeAlias = ArrayLike | None  # bool or uint8, one per row; rows where it is 0 are skipped

# ---- reducers
def reduce_count(count: NDArray[np.int64], key_ids: ArrayLike, mask: _Mask = None) -> None: ...
def reduce_sum(
    sum: NDArray[_V], key_ids: ArrayLike, values: ArrayLike, mask: _Mask = None
) -> None: ...
def reduce_min(
    out: NDArray[_V], seen: _Seen, key_ids: ArrayLike, values: ArrayLike, mask: _Mask = None
) -> None: ...
def reduce_max(
    out: NDArray[_V], seen: _Seen, key_ids: ArrayLike, values: ArrayLike, mask: _Mask = None
) -> None: ...
def reduce_first(
    out: NDArray[_V], seen: _Seen, key_ids: ArrayLike, values: ArrayLike, mask: _Mask = None
) -> None: ...
def reduce_last(
    out: NDArray[_V], seen: _Seen, key_ids: ArrayLike, values: ArrayLike, mask: _Mask = None
) -> None: ...
def fold_count_sum_last(
    count: NDArray[np.int64],
    sum: NDArray[_V],
    last: NDArray[_V],
    key_ids: ArrayLike,
    values: ArrayLike,
    mask: _Mask = None,
) -> None: ...
def fold_count_sum_last_rows(
    state: NDArray[_V], key_ids: ArrayLike, values: ArrayLike, mask: _Mask = None
) -> None:
    """``state`` is (nkeys, >= 3): [count, sum, last] per key, in the values' dtype."""

# ---- rings of the last N values (int64 only)
def ring_push(
    ring: NDArray[np.int64],
    head: NDArray[np.int64],
    key_ids: ArrayLike,
    values: ArrayLike,
    mask: _Mask = None,
) -> None: ...
def ring_read(
    ring: NDArray[np.int64], head: NDArray[np.int64], key: SupportsIndex
) -> NDArray[np.int64]: ...

# ---- subscriptions: watched keys
def watch_diff(
    ids: ArrayLike,
    watched: ArrayLike,  # bool or uint8
    state: ArrayLike,  # int64 or float64, strided is fine; shadow/out_old/out_new share its dtype
    shadow: NDArray[_V],
    out_ids: NDArray[np.int64],
    out_old: NDArray[_V],
    out_new: NDArray[_V],
) -> int:
    """The number j of changed watched keys written to ``out_*[:j]``."""

def watched_unique(ids: ArrayLike, watched: ArrayLike) -> NDArray[np.int64]: ...

# ---- derivations: fan-out over CSR lists
def fan_out(
    offsets: ArrayLike, values: ArrayLike, cap: SupportsIndex
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(out, row): the first ``cap`` values of each CSR row, and the row each came from."""

# ---- ranking
def topk(values: ArrayLike, k: SupportsIndex, mask: _Mask = None) -> NDArray[np.int64]:
    """Ids (positions) of the ``k`` largest values, largest first."""

def topk_push(
    top: NDArray[_V],
    fill: NDArray[np.int64],
    key_ids: ArrayLike,
    values: ArrayLike,
    mask: _Mask = None,
) -> None: ...
def topk_read(top: NDArray[_V], fill: NDArray[np.int64], key: SupportsIndex) -> NDArray[_V]: ...
def point_read(
    arrays: dict[str, Any], names: tuple[str, ...], kid: SupportsIndex, zeros: tuple[Any, ...]
) -> dict[str, Any]: ...
