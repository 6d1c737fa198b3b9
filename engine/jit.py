"""The numba tier: the reducer kernels as ``@njit(nogil=True, cache=True)``, and ``@kernel``.

The ``*_numba`` kernels have the native kernels' shape and results (``engine._kernels``, whose
contract is the docstring of ``engine._kernels_py``): ``reduce_<op>_numba(out..., key_ids,
values, mask=None) -> None``, outputs owned by the caller, int64 sums wrapping, the same NaN
rules. They are the ``limit-kernel`` of the benchmarks and a template to copy for your own
kernels; being numba dispatchers, they can be called from other ``@njit`` code. Like the native
loops they prefetch the outputs of the row PREFETCH_AHEAD rows on once the outputs outgrow the
L2 (~2x faster on 1M keys); ``prefetch_write`` is the intrinsic, for your kernels too.

Unlike the native module they do not check dtypes: numba compiles a specialisation for
whatever it is given. They do check, before any write, that every kept key id indexes the
outputs (numba itself never bounds-checks), raising ValueError like the native kernels.

Specialisations. numba compiles one machine-code version per argument *type*, and an array's
type includes its dtype, layout and whether it is read-only: a read-only array or an
``np.memmap(mode="r")`` is a separate specialisation from a writeable one, and so are
``mask=None``, a bool mask and a uint8 mask. Each costs one compile (0.2-0.5 s, or a cache
hit of ~0.1 s). ``cache=True`` writes next to this file; for a read-only install set
``NUMBA_CACHE_DIR``.

numba is an optional dependency (``pip install 'engine[jit]'``); importing this module
without it raises ImportError saying so.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

try:
    import numba
    from llvmlite import ir
    from llvmlite.binding import llvm_version_info
    from numba.core import cgutils, types
    from numba.extending import intrinsic
except ImportError as exc:  # pragma: no cover - exercised only without numba
    raise ImportError(
        "engine.jit needs numba: pip install 'engine[jit]' (or use engine._kernels)"
    ) from exc

__all__ = [
    "kernel", "Kernel",
    "reduce_count_numba", "reduce_sum_numba", "reduce_min_numba", "reduce_max_numba",
    "reduce_first_numba", "reduce_last_numba", "fold_count_sum_last_numba",
    "fold_count_sum_last_rows_numba", "ring_push_numba", "topk_push_numba", "check_key_ids_numba",
    "prefetch_write",
]  # fmt: skip

_njit = numba.njit(nogil=True, cache=True)

# rows; see ext/_kernels.pyx: without prefetching a fold over 1M keys is ~2x slower
PREFETCH_AHEAD = 128
PREFETCH_MIN_BYTES = 1 << 20  # outputs smaller than this (L2) stay in cache anyway
_PREFETCH_FN = "llvm.prefetch.p0" if llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"


@intrinsic
def prefetch_write(typingctx, arr, index):  # type: ignore[no-untyped-def]
    """Hint that ``arr[index]`` (an int, or a tuple for 2-D) will be written soon. ``index``
    must be in bounds (the address is computed; a prefetch itself never faults)."""
    if not isinstance(arr, types.Array):
        return None
    if isinstance(index, types.Integer):
        if arr.ndim != 1:
            return None
    elif not (isinstance(index, types.UniTuple) and index.count == arr.ndim
              and isinstance(index.dtype, types.Integer)):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        aryty, idxty = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        if isinstance(idxty, types.Integer):
            idx = [context.cast(builder, args[1], idxty, types.intp)]
        else:
            idx = [context.cast(builder, x, idxty.dtype, types.intp)
                   for x in cgutils.unpack_tuple(builder, args[1], idxty.count)]
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, idx, wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), _PREFETCH_FN)
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(1), i32(3), i32(1)])  # write, keep
        return context.get_dummy_value()

    return types.void(arr, index), codegen


@_njit
def _ahead(keys, bytes_per_key):  # type: ignore[no-untyped-def]
    return PREFETCH_AHEAD if keys * bytes_per_key >= PREFETCH_MIN_BYTES else 0


@_njit
def check_key_ids_numba(key_ids, mask, keys):  # type: ignore[no-untyped-def]
    """Raise ValueError unless every kept id is in [0, keys). One unsigned compare per row."""
    bad = False
    n = key_ids.shape[0]
    limit = np.uint64(keys)
    for i in range(n):
        if mask is not None and mask[i] == 0:
            continue
        bad |= np.uint64(key_ids[i]) >= limit
    if bad:
        for i in range(n):
            if (mask is None or mask[i] != 0) and np.uint64(key_ids[i]) >= limit:
                raise ValueError(
                    "key_ids[" + str(i) + "] = " + str(key_ids[i]) + " is outside the outputs ("
                    + str(keys) + " keys); size every output to at least max(key_ids) + 1; "
                    "nothing was written"
                )


@_njit
def _next_id(key_ids, i, ahead, keys):  # type: ignore[no-untyped-def]
    """The id ``ahead`` rows on if prefetching is on and it is in range (masked rows are not
    checked), else -1."""
    j = i + ahead
    if ahead == 0 or j >= key_ids.shape[0]:
        return -1
    k = key_ids[j]
    return k if 0 <= k < keys else -1


@_njit
def _better(x, cur, largest):  # type: ignore[no-untyped-def]
    """x replaces cur: strictly smaller (largest: larger); NaN loses to every number."""
    if cur != cur:  # only a float NaN differs from itself
        return x == x
    return x > cur if largest else x < cur


@_njit
def reduce_count_numba(count, key_ids, mask=None):  # type: ignore[no-untyped-def]
    keys = count.shape[0]
    check_key_ids_numba(key_ids, mask, keys)
    ahead = _ahead(keys, 8)
    for i in range(key_ids.shape[0]):
        kp = _next_id(key_ids, i, ahead, keys)
        if kp >= 0:
            prefetch_write(count, kp)
        if mask is not None and mask[i] == 0:
            continue
        count[key_ids[i]] += 1


@_njit
def reduce_sum_numba(sum, key_ids, values, mask=None):  # type: ignore[no-untyped-def]  # noqa: A002
    keys = sum.shape[0]
    check_key_ids_numba(key_ids, mask, keys)
    ahead = _ahead(keys, 8)
    for i in range(key_ids.shape[0]):
        kp = _next_id(key_ids, i, ahead, keys)
        if kp >= 0:
            prefetch_write(sum, kp)
        if mask is not None and mask[i] == 0:
            continue
        sum[key_ids[i]] += values[i]  # int64 wraps, floats add in row order


@_njit
def _seen_op(op, out, seen, key_ids, values, mask):  # type: ignore[no-untyped-def]
    """op: 0 min, 1 max, 2 first, 3 last."""
    keys = min(out.shape[0], seen.shape[0])
    check_key_ids_numba(key_ids, mask, keys)
    ahead = _ahead(keys, 9)
    for i in range(key_ids.shape[0]):
        kp = _next_id(key_ids, i, ahead, keys)
        if kp >= 0:
            prefetch_write(out, kp)
            prefetch_write(seen, kp)
        if mask is not None and mask[i] == 0:
            continue
        k = key_ids[i]
        if op == 3 or seen[k] == 0:
            out[k] = values[i]
            seen[k] = 1
        elif op < 2 and _better(values[i], out[k], op == 1):
            out[k] = values[i]


@_njit
def reduce_min_numba(out, seen, key_ids, values, mask=None):  # type: ignore[no-untyped-def]
    _seen_op(0, out, seen, key_ids, values, mask)


@_njit
def reduce_max_numba(out, seen, key_ids, values, mask=None):  # type: ignore[no-untyped-def]
    _seen_op(1, out, seen, key_ids, values, mask)


@_njit
def reduce_first_numba(out, seen, key_ids, values, mask=None):  # type: ignore[no-untyped-def]
    _seen_op(2, out, seen, key_ids, values, mask)


@_njit
def reduce_last_numba(out, seen, key_ids, values, mask=None):  # type: ignore[no-untyped-def]
    _seen_op(3, out, seen, key_ids, values, mask)


@_njit
def fold_count_sum_last_numba(count, sum, last, key_ids, values, mask=None):  # type: ignore[no-untyped-def]  # noqa: A002,E501
    keys = min(count.shape[0], sum.shape[0], last.shape[0])
    check_key_ids_numba(key_ids, mask, keys)
    ahead = _ahead(keys, 24)
    for i in range(key_ids.shape[0]):
        kp = _next_id(key_ids, i, ahead, keys)
        if kp >= 0:  # three random lines per row: ask for them early
            prefetch_write(count, kp)
            prefetch_write(sum, kp)
            prefetch_write(last, kp)
        if mask is not None and mask[i] == 0:
            continue
        k = key_ids[i]
        count[k] += 1
        sum[k] += values[i]
        last[k] = values[i]


@_njit
def fold_count_sum_last_rows_numba(state, key_ids, values, mask=None):  # type: ignore[no-untyped-def]  # noqa: E501
    """state: (nkeys, >= 3) of the values' dtype, row k = [count, sum, last, (padding)]."""
    keys = state.shape[0]
    check_key_ids_numba(key_ids, mask, keys)
    ahead = _ahead(keys, 8 * state.shape[1])
    for i in range(key_ids.shape[0]):
        kp = _next_id(key_ids, i, ahead, keys)
        if kp >= 0:  # a 24-byte row may straddle two cache lines
            prefetch_write(state, (kp, 0))
            prefetch_write(state, (kp, 2))
        if mask is not None and mask[i] == 0:
            continue
        k = key_ids[i]
        state[k, 0] += 1
        state[k, 1] += values[i]
        state[k, 2] = values[i]


@_njit
def ring_push_numba(ring, head, key_ids, values, mask=None):  # type: ignore[no-untyped-def]
    keys = min(ring.shape[0], head.shape[0])
    check_key_ids_numba(key_ids, mask, keys)
    ahead = _ahead(keys, 8)
    width = np.uint64(ring.shape[1])
    for i in range(key_ids.shape[0]):
        kp = _next_id(key_ids, i, ahead, keys)
        if kp >= 0:
            prefetch_write(head, kp)
        if mask is not None and mask[i] == 0:
            continue
        k = key_ids[i]
        pushes = np.uint64(head[k])  # an unsigned count, as in the native kernel
        ring[k, pushes % width] = values[i]
        head[k] = np.int64(pushes + np.uint64(1))


@_njit
def _check_fill(fill, key_ids, mask, width):  # type: ignore[no-untyped-def]
    """Raise ValueError unless every kept row's key has 0 <= fill <= width (ids checked)."""
    for i in range(key_ids.shape[0]):
        if mask is not None and mask[i] == 0:
            continue
        k = key_ids[i]
        if not 0 <= fill[k] <= width:
            raise ValueError(
                "fill[" + str(k) + "] = " + str(fill[k]) + " (key_ids[" + str(i) + "]) is "
                "outside [0, " + str(width) + "]: fill[k] counts the used slots of top[k], at "
                "most top.shape[1]; nothing was written"
            )


@_njit
def topk_push_numba(top, fill, key_ids, values, mask=None):  # type: ignore[no-untyped-def]
    """top: (nkeys, k >= 1) of the values' dtype, fill: int64; see engine._kernels.topk_push."""
    width = top.shape[1]
    if width < 1:
        raise ValueError("top must be an (nkeys, k >= 1) array")
    keys = min(top.shape[0], fill.shape[0])
    check_key_ids_numba(key_ids, mask, keys)
    _check_fill(fill, key_ids, mask, width)
    ahead = _ahead(keys, 8 * width + 8)
    for i in range(key_ids.shape[0]):
        kp = _next_id(key_ids, i, ahead, keys)
        if kp >= 0:  # fill, and the row's first and last slot (a full key compares the last)
            prefetch_write(fill, kp)
            prefetch_write(top, (kp, 0))
            prefetch_write(top, (kp, width - 1))
        if mask is not None and mask[i] == 0:
            continue
        x = values[i]
        if x != x:  # NaN is never inserted
            continue
        k = key_ids[i]
        f = fill[k]
        if f < width:
            j = f
            fill[k] = f + 1
        elif top[k, width - 1] < x:
            j = width - 1
        else:
            continue
        while j > 0 and top[k, j - 1] < x:
            top[k, j] = top[k, j - 1]
            j -= 1
        top[k, j] = x


# ---- user kernels ------------------------------------------------------------------------------


class Kernel:
    """A user kernel compiled by :func:`kernel`; call it as ``k(state, key_ids, columns, mask)``.

    ``dispatcher`` is the numba dispatcher itself (no checks), for calls from other ``@njit``
    code; ``py_func`` is the original Python function.
    """

    def __init__(self, fn: Callable[..., None], *, cache: bool = True) -> None:
        self.py_func = fn
        try:
            self.dispatcher = numba.njit(nogil=True, cache=cache)(fn)
        except RuntimeError:  # no file to cache next to (defined in a REPL or exec)
            self.dispatcher = numba.njit(nogil=True)(fn)
        functools.update_wrapper(self, fn)

    def __call__(self, state: Any, key_ids: Any, columns: Any, mask: Any = None) -> None:
        state = tuple(state)
        columns = tuple(np.asarray(c) for c in columns)  # numba takes arrays, not lists
        ids = np.asarray(key_ids)
        name = getattr(self.py_func, "__name__", "kernel")
        if ids.ndim != 1 or (ids.dtype != np.int64 and ids.shape[0]):
            raise TypeError(f"{name}: key_ids must be a 1-D int64 array, got {ids.dtype} "
                            f"with {ids.ndim} dimensions")
        ids = ids.astype(np.int64, copy=False)
        if not state:
            raise ValueError(f"{name}: state must be a non-empty tuple of arrays")
        for j, a in enumerate(state):
            if not isinstance(a, np.ndarray) or a.ndim < 1 or not a.flags.writeable:
                raise TypeError(f"{name}: state[{j}] must be a writeable numpy array indexed "
                                f"by key id, got {type(a).__name__}")
        for j, c in enumerate(columns):
            if c.ndim < 1 or c.shape[0] != ids.shape[0]:
                raise ValueError(f"{name}: columns[{j}] must have one entry per key id "
                                 f"({ids.shape[0]}), got shape {c.shape}")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.dtype not in (np.bool_, np.uint8) or mask.shape != ids.shape:
                raise ValueError(f"{name}: mask must be a bool or uint8 array with one entry "
                                 f"per key id, got {mask.dtype} {mask.shape}")
        keys = min(a.shape[0] for a in state)
        try:
            check_key_ids_numba(ids, mask, keys)
        except ValueError as exc:
            lengths = ", ".join(f"state[{j}]: {a.shape[0]}" for j, a in enumerate(state))
            raise ValueError(f"{name}: {exc} (state lengths {lengths})") from None
        self.dispatcher(state, ids, columns, mask)


def kernel(fn: Callable[..., None] | None = None, *, cache: bool = True) -> Any:
    """Compile a user kernel ``fn(state, key_ids, columns, mask) -> None`` with numba.

    ``state`` is a tuple of arrays indexed by key id (first axis) and updated in place;
    ``key_ids`` int64; ``columns`` a tuple of arrays with one entry per key id; ``mask`` a
    bool/uint8 array (rows where it is 0 are to be skipped) or None. ``fn`` is compiled with
    ``numba.njit(nogil=True, cache=True)`` on its first call with each new argument types.

    Every call checks, before running ``fn``, that every state array is long enough for every
    kept key id (numba does not bounds-check: a short state would be written out of bounds),
    that each column has one entry per key id, and raises a ValueError naming the lengths.

    As with every numba function, read-only inputs (``np.memmap(mode="r")``, arrays with
    ``writeable=False``) are a separate specialisation from writeable ones: the first call
    with them compiles again. Use as ``@kernel`` or ``@kernel(cache=False)``.
    """
    if fn is None:
        return lambda f: Kernel(f, cache=cache)
    return Kernel(fn, cache=cache)
