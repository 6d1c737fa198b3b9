"""Pure-numpy reference twin of ``engine._kernels`` (ext/_kernels.pyx): same names, same bits.

Every kernel has one shape: ``reduce_<op>(out..., key_ids, values, mask=None) -> None``. The
outputs belong to the caller, are indexed by key id and are updated in place, so folding a log
in any batching gives the same state as one call. ``mask`` (bool or uint8, one per row) skips
the rows where it is 0. Values and value outputs share one dtype, int64 or float64.

Contract shared with the native module, row by row as a plain loop would do it:

- int64 sums wrap modulo 2**64 (like numpy); float64 sums add in row order;
- ``reduce_min``/``reduce_max``: the first value seen for a key initialises it; a later value
  replaces it only when strictly smaller/larger, so among equal values (0.0 and -0.0 too) the
  first one stays; NaN loses to every number and, when all are NaN, the first NaN stays;
- a key id outside ``[0, len(output))`` in a kept row is a ValueError raised before anything
  is written (rows the mask drops are not checked, so ``lookup()``'s -1 can be masked out);
- outputs are writeable, C-contiguous numpy arrays (memmaps too); inputs are anything numpy
  sees as 1-D, read-only and memmapped included, copied only when strided;
- ``topk_push``: ``top[k, :fill[k]]`` holds key k's largest values, largest first. A value is
  inserted after every value that is not smaller than it (ties keep arrival order, -0.0 and
  0.0 are equal); when the key is full it goes in only if larger than the smallest kept, which
  drops out. NaN is never inserted. Slots from ``fill[k]`` on are never read;
- ``watch_diff`` / ``watched_unique``: any id >= 0 is valid (ids past ``watched`` are not
  watched, ids past ``state`` read as value 0); a negative id is a ValueError raised before
  anything is written. Values compare as numbers, NaN == NaN, -0.0 == 0.0.

This module is the test oracle first: it is vectorised numpy, not a Python loop, so it is also
a usable fallback (``ENGINE_NO_EXTENSIONS=1``). The argument checks here are imported by the
native module, so both reject bad input with the same exception and message.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

__all__ = [
    "reduce_count", "reduce_sum", "reduce_min", "reduce_max", "reduce_first", "reduce_last",
    "fold_count_sum_last", "fold_count_sum_last_rows", "ring_push", "ring_read",
    "watch_diff", "watched_unique", "fan_out", "topk", "topk_push", "topk_read", "point_read",
]  # fmt: skip

_INT64 = np.dtype(np.int64)
_FLOAT64 = np.dtype(np.float64)
_UINT8 = np.dtype(np.uint8)
_BOOL = np.dtype(np.bool_)
_VALUE_DTYPES = (_INT64, _FLOAT64)
_INT64_MIN = np.int64(-(1 << 63))
_INT64_MAX = np.int64((1 << 63) - 1)
ROW_COLUMNS = 3  # fold_count_sum_last_rows: state[k] = [count, sum, last, (padding...)]


# ---- argument checks (imported by ext/_kernels.pyx) -------------------------------------------


def _vector(arr: Any, name: str) -> np.ndarray:
    """A 1-D input as a C-contiguous array: a view when it already is one, else a copy."""
    a = np.asarray(arr)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got {a.ndim} dimensions")
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _key_ids(key_ids: Any, name: str = "key_ids") -> np.ndarray:
    """1-D int64 key ids (copied only if strided); an empty array of any dtype is accepted."""
    ids = _vector(key_ids, name)
    if ids.dtype != _INT64:
        if ids.shape[0] == 0:
            return np.empty(0, dtype=_INT64)
        raise TypeError(
            f"{name} must be an int64 array, got dtype {ids.dtype}; cast with .astype(np.int64)"
        )
    return ids


def _values(values: Any, rows: int, dtype: np.dtype, name: str = "values") -> np.ndarray:
    """1-D ``values`` of ``dtype`` with one entry per row (an empty array is cast)."""
    v = _vector(values, name)
    if v.shape[0] != rows:
        raise ValueError(f"{name} has {v.shape[0]} rows but key_ids has {rows}")
    if v.dtype != dtype:
        if v.shape[0] == 0:
            return np.empty(0, dtype=dtype)
        raise TypeError(
            f"{name} has dtype {v.dtype} but the output is {dtype}: values and outputs must "
            f"share one dtype (int64 or float64); cast with .astype(np.{dtype})"
        )
    return v


def _mask(mask: Any, rows: int, of: str = "key_ids") -> np.ndarray | None:
    """None, or the mask as a uint8 view (bool is viewed, not copied) with one entry per row."""
    if mask is None:
        return None
    m = _vector(mask, "mask")
    if m.dtype not in (_BOOL, _UINT8):
        raise TypeError(f"mask must be a bool or uint8 array, got dtype {m.dtype}")
    if m.shape[0] != rows:
        raise ValueError(f"mask has {m.shape[0]} rows but {of} has {rows}")
    return m.view(_UINT8)


def _out(arr: Any, name: str, dtypes: tuple[np.dtype, ...], ndim: int = 1) -> np.ndarray:
    """A caller-owned, writeable, C-contiguous output array (bool comes back as a uint8 view).

    Contiguity is required because the native loops index outputs as plain C arrays (with
    byte strides they ran ~1.5x slower); a strided output cannot be copied and written back
    without surprising the caller.
    """
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy array owned by the caller, got {type(arr).__name__}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {arr.ndim} dimensions")
    if arr.dtype not in dtypes:
        wanted = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {wanted}, got {arr.dtype}")
    if not arr.flags.writeable:
        raise ValueError(f"{name} is read-only: outputs must be writeable arrays")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (strides {arr.strides}): pass a "
                         f"contiguous array, e.g. np.ascontiguousarray({name}), and keep that")
    return arr.view(_UINT8) if arr.dtype == _BOOL else arr


def _value_outs(outs: dict[str, Any]) -> tuple[list[np.ndarray], np.dtype]:
    """Value outputs (int64 or float64, all of one dtype) and that dtype."""
    arrays = [_out(a, name, _VALUE_DTYPES) for name, a in outs.items()]
    dtype = arrays[0].dtype
    for name, a in zip(outs, arrays):
        if a.dtype != dtype:
            first = next(iter(outs))
            raise TypeError(f"{name} has dtype {a.dtype} but {first} has {dtype}: use one dtype")
    return arrays, dtype


def _seen(seen: Any) -> np.ndarray:
    return _out(seen, "seen", (_UINT8, _BOOL))


def _range_error(ids: np.ndarray, row: int, keys: int, outputs: str) -> ValueError:
    return ValueError(
        f"key_ids[{row}] = {ids[row]} is outside the outputs ({outputs}: {keys} keys); size "
        f"every output to at least max(key_ids) + 1; nothing was written"
    )


def _first_bad_row(ids: np.ndarray, m: np.ndarray | None, keys: int) -> int:
    """The first kept row whose id is outside [0, keys), or -1."""
    bad = ids.view(np.uint64) >= np.uint64(keys)  # negative ids are huge as uint64
    if m is not None:
        bad &= m != 0
    return int(np.argmax(bad)) if bad.any() else -1


def _check_range(ids: np.ndarray, m: np.ndarray | None, keys: int, outputs: str) -> None:
    row = _first_bad_row(ids, m, keys)
    if row >= 0:
        raise _range_error(ids, row, keys, outputs)


def _kept(ids: np.ndarray, values: np.ndarray | None, m: np.ndarray | None):
    if m is None:
        return ids, values
    keep = m != 0
    return ids[keep], (None if values is None else values[keep])


def _lengths(*arrays: np.ndarray) -> int:
    return min(a.shape[0] for a in arrays)


def _order_key(values: np.ndarray, nan: np.int64) -> np.ndarray:
    """int64 keys ordered like ``values``; -0.0 == 0.0 and every NaN maps to ``nan``.

    Floats: the IEEE bits with the magnitude bits flipped for negatives give a total order.
    """
    if values.dtype == _INT64:
        return values
    bits = (values + 0.0).view(_INT64)  # + 0.0 turns -0.0 into 0.0
    key = np.where(bits < 0, bits ^ _INT64_MAX, bits)
    key[np.isnan(values)] = nan
    return key


# ---- reducers ----------------------------------------------------------------------------------


def reduce_count(count: np.ndarray, key_ids: Any, mask: Any = None) -> None:
    """``count[k] += 1`` for every kept row with key id ``k``."""
    c = _out(count, "count", (_INT64,))
    ids = _key_ids(key_ids)
    m = _mask(mask, ids.shape[0])
    _check_range(ids, m, c.shape[0], "count")
    ids, _ = _kept(ids, None, m)
    np.add.at(c, ids, 1)  # O(rows); a bincount would cost O(keys) per batch


def reduce_sum(sum: np.ndarray, key_ids: Any, values: Any, mask: Any = None) -> None:  # noqa: A002
    """``sum[k] += v`` in row order (int64 wraps modulo 2**64)."""
    (s,), dtype = _value_outs({"sum": sum})
    ids = _key_ids(key_ids)
    v = _values(values, ids.shape[0], dtype)
    m = _mask(mask, ids.shape[0])
    _check_range(ids, m, s.shape[0], "sum")
    ids, v = _kept(ids, v, m)
    with np.errstate(all="ignore"):  # inf - inf and overflow to inf are results, not errors
        np.add.at(s, ids, v)  # unbuffered, in row order


def _extreme(out: Any, seen: Any, key_ids: Any, values: Any, mask: Any, largest: bool) -> None:
    (o,), dtype = _value_outs({"out": out})
    s = _seen(seen)
    ids = _key_ids(key_ids)
    v = _values(values, ids.shape[0], dtype)
    m = _mask(mask, ids.shape[0])
    _check_range(ids, m, _lengths(o, s), "out, seen")
    ids, v = _kept(ids, v, m)
    if ids.shape[0] == 0:
        return
    touched = np.unique(ids)
    prior = touched[s[touched] != 0]  # their current value competes as "row -1"
    cand_ids = np.concatenate([prior, ids])
    cand = np.concatenate([o[prior], v])
    # lower rank wins; NaN gets the worst rank either way
    rank = ~_order_key(cand, _INT64_MIN) if largest else _order_key(cand, _INT64_MAX)
    order = np.lexsort((rank, cand_ids))  # stable: among equal ranks the earliest row wins
    sorted_ids = cand_ids[order]
    first = np.ones(order.shape[0], dtype=bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    win = order[first]
    o[cand_ids[win]] = cand[win]
    s[touched] = 1


def reduce_min(out: np.ndarray, seen: np.ndarray, key_ids: Any, values: Any,
               mask: Any = None) -> None:
    """Smallest value per key; ``seen[k]`` set once a key has a value (see module notes)."""
    _extreme(out, seen, key_ids, values, mask, largest=False)


def reduce_max(out: np.ndarray, seen: np.ndarray, key_ids: Any, values: Any,
               mask: Any = None) -> None:
    """Largest value per key; ``seen[k]`` set once a key has a value (see module notes)."""
    _extreme(out, seen, key_ids, values, mask, largest=True)


def reduce_first(out: np.ndarray, seen: np.ndarray, key_ids: Any, values: Any,
                 mask: Any = None) -> None:
    """The first value per key: written only where ``seen[k]`` is 0, then ``seen[k] = 1``."""
    (o,), dtype = _value_outs({"out": out})
    s = _seen(seen)
    ids = _key_ids(key_ids)
    v = _values(values, ids.shape[0], dtype)
    m = _mask(mask, ids.shape[0])
    _check_range(ids, m, _lengths(o, s), "out, seen")
    ids, v = _kept(ids, v, m)
    keys, rows = np.unique(ids, return_index=True)  # rows: first occurrence
    new = s[keys] == 0
    o[keys[new]] = v[rows[new]]
    s[keys] = 1


def _assign_last(o: np.ndarray, ids: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``o[k] = v`` of the last row of each key; returns the keys written."""
    n = ids.shape[0]
    keys, back = np.unique(ids[::-1], return_index=True)  # first from the end = last
    o[keys] = v[n - 1 - back]
    return keys


def reduce_last(out: np.ndarray, seen: np.ndarray, key_ids: Any, values: Any,
                mask: Any = None) -> None:
    """The last value per key, ``seen[k] = 1``."""
    (o,), dtype = _value_outs({"out": out})
    s = _seen(seen)
    ids = _key_ids(key_ids)
    v = _values(values, ids.shape[0], dtype)
    m = _mask(mask, ids.shape[0])
    _check_range(ids, m, _lengths(o, s), "out, seen")
    ids, v = _kept(ids, v, m)
    s[_assign_last(o, ids, v)] = 1


def fold_count_sum_last(count: np.ndarray, sum: np.ndarray, last: np.ndarray,  # noqa: A002
                        key_ids: Any, values: Any, mask: Any = None) -> None:
    """count, sum and last per key in one pass (``count[k] > 0`` tells that ``last[k]`` is set)."""
    c = _out(count, "count", (_INT64,))
    (s, last_), dtype = _value_outs({"sum": sum, "last": last})
    ids = _key_ids(key_ids)
    v = _values(values, ids.shape[0], dtype)
    m = _mask(mask, ids.shape[0])
    _check_range(ids, m, _lengths(c, s, last_), "count, sum, last")
    ids, v = _kept(ids, v, m)
    np.add.at(c, ids, 1)  # O(rows); a bincount would cost O(keys) per batch
    with np.errstate(all="ignore"):
        np.add.at(s, ids, v)
    _assign_last(last_, ids, v)


def _row_state(state: Any) -> np.ndarray:
    st = _out(state, "state", _VALUE_DTYPES, ndim=2)
    if st.shape[1] < ROW_COLUMNS:
        raise ValueError(f"state must be an (nkeys, {ROW_COLUMNS}) array (extra columns are "
                         f"padding), got shape {st.shape}")
    return st


def fold_count_sum_last_rows(state: np.ndarray, key_ids: Any, values: Any,
                             mask: Any = None) -> None:
    """``fold_count_sum_last`` with ``state[k] = [count, sum, last]`` together in one row.

    One key's three numbers share a cache line (the fastest layout on 1M keys). ``state`` has
    the values' dtype: with float64 values the count is a float64 too, exact up to 2**53, and
    grows by adding 1.0 per row. ``state`` may have more than 3 columns (e.g. 4, so that a row
    never straddles two cache lines); the extra columns are left alone.
    """
    st = _row_state(state)
    ids = _key_ids(key_ids)
    v = _values(values, ids.shape[0], st.dtype)
    m = _mask(mask, ids.shape[0])
    _check_range(ids, m, st.shape[0], "state")
    ids, v = _kept(ids, v, m)
    with np.errstate(all="ignore"):
        # one at a time: a float count past 2**53 rounds, as in the native loop
        np.add.at(st[:, 0], ids, st.dtype.type(1))
        np.add.at(st[:, 1], ids, v)
    keys, back = np.unique(ids[::-1], return_index=True)
    st[keys, 2] = v[ids.shape[0] - 1 - back]


# ---- rings of the last N values ----------------------------------------------------------------


def _ring(ring: Any, head: Any) -> tuple[np.ndarray, np.ndarray]:
    r = _out(ring, "ring", (_INT64,), ndim=2)
    if r.shape[1] < 1:
        raise ValueError(f"ring must be an (nkeys, N >= 1) int64 array, got shape {r.shape}")
    return r, _out(head, "head", (_INT64,))


def ring_push(ring: np.ndarray, head: np.ndarray, key_ids: Any, values: Any,
              mask: Any = None) -> None:
    """Push each kept value into its key's ring: ``ring[k, head[k] % N] = v; head[k] += 1``.

    ``head[k]`` counts every push to key ``k`` (an unsigned 64-bit count that wraps), so the
    ring holds the last ``min(head[k], N)`` values; ``ring_read`` gives them newest first.
    """
    r, h = _ring(ring, head)
    ids = _key_ids(key_ids)
    v = _values(values, ids.shape[0], _INT64)
    m = _mask(mask, ids.shape[0])
    _check_range(ids, m, _lengths(r, h), "ring, head")
    ids, v = _kept(ids, v, m)
    if ids.shape[0] == 0:
        return
    width = np.uint64(r.shape[1])
    order = np.argsort(ids, kind="stable")
    sid, sv = ids[order], v[order]
    starts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])
    counts = np.diff(np.r_[starts, sid.shape[0]])
    rank = np.arange(sid.shape[0]) - np.repeat(starts, counts)  # k-th push of its key here
    survives = rank >= np.repeat(counts, counts) - r.shape[1]  # older ones are overwritten
    hu = h.view(np.uint64)
    slot = (hu[sid] + rank.astype(np.uint64)) % width
    r[sid[survives], slot[survives].astype(np.intp)] = sv[survives]
    hu[sid[starts]] += counts.astype(np.uint64)


def _ring_read_args(ring: Any, head: Any, key: Any) -> tuple[np.ndarray, np.ndarray, int]:
    r = np.asarray(ring)
    h = np.asarray(head)
    k = operator.index(key)
    if r.ndim != 2 or h.ndim != 1 or r.dtype != _INT64 or h.dtype != _INT64 or r.shape[1] < 1:
        raise ValueError("ring_read needs an (nkeys, N >= 1) int64 ring and a 1-D int64 head")
    keys = _lengths(r, h)
    if not 0 <= k < keys:
        raise ValueError(f"key {k} is outside the ring (ring, head: {keys} keys)")
    return r, h, k


def ring_read(ring: np.ndarray, head: np.ndarray, key: int) -> np.ndarray:
    """The values in ``key``'s ring, newest first (a copy; at most N of them)."""
    r, h, k = _ring_read_args(ring, head, key)
    pushes = int(h[k]) & ((1 << 64) - 1)
    n = min(pushes, r.shape[1])
    slots = [(pushes - 1 - i) % r.shape[1] for i in range(n)]
    return r[k, np.array(slots, dtype=np.intp)]


# ---- ranking -----------------------------------------------------------------------------------


def _topk_args(values: Any, k: Any, mask: Any) -> tuple[np.ndarray, int, np.ndarray | None]:
    v = _vector(values, "values")
    if v.dtype not in _VALUE_DTYPES:
        if v.shape[0] != 0:
            raise TypeError(f"values must be int64 or float64, got dtype {v.dtype}")
        v = np.empty(0, dtype=_INT64)
    k = operator.index(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return v, k, _mask(mask, v.shape[0], "values")


def topk(values: Any, k: int, mask: Any = None) -> np.ndarray:
    """Ids (positions) of the ``k`` largest values, largest first, ties by smaller id.

    Ids where ``mask`` is 0 are left out; NaN ranks below every number; fewer than ``k`` ids
    come back when there are fewer candidates.
    """
    v, k, m = _topk_args(values, k, mask)
    ids = np.arange(v.shape[0], dtype=_INT64)
    rank = ~_order_key(v, _INT64_MIN)  # ascending rank = descending value, NaN last
    if m is not None:
        keep = m != 0
        ids, rank = ids[keep], rank[keep]
    if k == 0 or ids.shape[0] == 0:
        return np.empty(0, dtype=_INT64)
    if k < ids.shape[0]:  # keep everything tied with the k-th, then sort those exactly
        kth = np.partition(rank, k - 1)[k - 1]
        near = rank <= kth
        ids, rank = ids[near], rank[near]
    return ids[np.lexsort((ids, rank))][:k]


# ---- subscriptions: watched keys ---------------------------------------------------------------


def _negative_error(ids: np.ndarray, row: int) -> ValueError:
    return ValueError(
        f"ids[{row}] = {ids[row]} is negative: key ids are >= 0 (ids past watched or state are "
        f"fine); nothing was written"
    )


def _check_negative(ids: np.ndarray) -> None:
    row = _first_bad_row(ids, None, 1 << 63)  # as uint64, only negative ids reach 2**63
    if row >= 0:
        raise _negative_error(ids, row)


def _watch_ids(ids: Any, watched: Any) -> tuple[np.ndarray, np.ndarray]:
    """int64 ids and the watched mask as a uint8 view (bool is viewed, not copied)."""
    i = _key_ids(ids, "ids")
    w = _vector(watched, "watched")
    if w.dtype not in (_BOOL, _UINT8):
        if w.shape[0] != 0:
            raise TypeError(f"watched must be a bool or uint8 array, got dtype {w.dtype}")
        w = np.empty(0, dtype=_UINT8)
    return i, w.view(_UINT8)


def _watch_args(ids: Any, watched: Any, state: Any, shadow: Any, out_ids: Any, out_old: Any,
                out_new: Any) -> tuple[np.ndarray, ...]:
    i, w = _watch_ids(ids, watched)
    s = np.asarray(state)  # strided is fine (a column of a row group): read in place
    if s.ndim != 1:
        raise ValueError(f"state must be 1-D, got {s.ndim} dimensions")
    if s.shape[0] and (s.strides[0] <= 0 or s.strides[0] % s.itemsize):
        s = np.ascontiguousarray(s)
    if s.dtype not in _VALUE_DTYPES:
        raise TypeError(f"state must be int64 or float64, got dtype {s.dtype}")
    sh = _out(shadow, "shadow", _VALUE_DTYPES)
    oi = _out(out_ids, "out_ids", (_INT64,))
    oo = _out(out_old, "out_old", _VALUE_DTYPES)
    on = _out(out_new, "out_new", _VALUE_DTYPES)
    for name, a in (("shadow", sh), ("out_old", oo), ("out_new", on)):
        if a.dtype != s.dtype:
            raise TypeError(f"{name} has dtype {a.dtype} but state has {s.dtype}: shadow, "
                            f"out_old and out_new take the state's dtype")
    if sh.shape[0] < w.shape[0]:
        raise ValueError(f"shadow has {sh.shape[0]} keys but watched has {w.shape[0]}: every "
                         f"watchable key needs a shadow value (len(shadow) >= len(watched))")
    for name, a in (("out_ids", oi), ("out_old", oo), ("out_new", on)):
        if a.shape[0] < i.shape[0]:
            raise ValueError(f"{name} has {a.shape[0]} entries but ids has {i.shape[0]}: size "
                             f"out_ids, out_old and out_new to at least len(ids)")
    return i, w, s, sh, oi, oo, on


def _first_watched(ids: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The distinct watched ids in first-appearance order (ids already >= 0)."""
    cand = ids[ids < w.shape[0]]
    cand = cand[w[cand] != 0]
    _, first = np.unique(cand, return_index=True)
    return cand[np.sort(first)]


def watch_diff(ids: Any, watched: Any, state: Any, shadow: np.ndarray, out_ids: np.ndarray,
               out_old: np.ndarray, out_new: np.ndarray) -> int:
    """Report and absorb the changes of the watched keys among ``ids``; returns their count j.

    Row by row: a key ``k`` is watched iff ``k < len(watched)`` and ``watched[k] != 0``; its
    value is ``state[k]``, or 0 when ``k >= len(state)``. When that differs from ``shadow[k]``
    (NaN == NaN, -0.0 == 0.0), ``(k, shadow[k], value)`` goes to
    ``out_ids[j], out_old[j], out_new[j]``, then ``shadow[k] = value`` and ``j += 1``; so a key
    is reported at most once, in first-appearance order. ``shadow`` (``len >= len(watched)``)
    and the outputs (``len >= len(ids)``) are writeable, C-contiguous and of the state's dtype
    (``out_ids``: int64); entries from ``j`` to ``len(ids)`` are scratch (the native loop is
    branch-free and stores every row's candidate), nothing past ``len(ids)`` is written.
    """
    i, w, s, sh, oi, oo, on = _watch_args(ids, watched, state, shadow, out_ids, out_old, out_new)
    _check_negative(i)
    keys = _first_watched(i, w)
    new = np.zeros(keys.shape[0], dtype=s.dtype)
    inside = keys < s.shape[0]
    new[inside] = s[keys[inside]]
    old = sh[keys]
    diff = old != new
    if s.dtype == _FLOAT64:
        diff &= ~(np.isnan(old) & np.isnan(new))
    keys, old, new = keys[diff], old[diff], new[diff]
    j = keys.shape[0]
    oi[:j], oo[:j], on[:j] = keys, old, new
    sh[keys] = new
    return j


def watched_unique(ids: Any, watched: Any) -> np.ndarray:
    """The distinct ids among ``ids`` that are watched (``k < len(watched)`` and
    ``watched[k] != 0``), in first-appearance order; a negative id is a ValueError."""
    i, w = _watch_ids(ids, watched)
    _check_negative(i)
    return _first_watched(i, w)


# ---- per-key top k -----------------------------------------------------------------------------


def _topk_state(top: Any, fill: Any) -> tuple[np.ndarray, np.ndarray]:
    t = _out(top, "top", _VALUE_DTYPES, ndim=2)
    if t.shape[1] < 1:
        raise ValueError(f"top must be an (nkeys, k >= 1) array, got shape {t.shape}")
    return t, _out(fill, "fill", (_INT64,))


def _fill_error(ids: np.ndarray, row: int, fill: np.ndarray, width: int) -> ValueError:
    key = int(ids[row])
    return ValueError(
        f"fill[{key}] = {int(fill[key])} (key_ids[{row}]) is outside [0, {width}]: fill[k] counts "
        f"the used slots of top[k], at most top.shape[1]; nothing was written"
    )


def _first_bad_fill(ids: np.ndarray, m: np.ndarray | None, fill: np.ndarray, width: int) -> int:
    """The first kept row whose key's fill is outside [0, width], or -1 (ids already checked)."""
    rows = np.arange(ids.shape[0]) if m is None else np.flatnonzero(m)
    bad = fill[ids[rows]].view(np.uint64) > np.uint64(width)  # a negative fill is huge
    return int(rows[np.argmax(bad)]) if bad.any() else -1


def _topk_insert(row: np.ndarray, fill: np.ndarray, key: int, x: Any) -> None:
    """One insertion exactly as the native loop does it (any state, sorted or not)."""
    width = row.shape[0]
    f = int(fill[key])
    if f < width:
        i = f
        fill[key] = f + 1
    elif row[width - 1] < x:
        i = width - 1
    else:
        return
    j = i
    while j > 0 and row[j - 1] < x:
        j -= 1
    row[j + 1 : i + 1] = row[j:i]  # numpy copies overlapping slices through a buffer
    row[j] = x


def topk_push(top: np.ndarray, fill: np.ndarray, key_ids: Any, values: Any,
              mask: Any = None) -> None:
    """Keep the k = ``top.shape[1]`` largest values per key in ``top[k, :fill[k]]``, largest first.

    Row by row: a value goes in after every kept value not smaller than it (ties keep arrival
    order), then ``fill[k] += 1`` while ``fill[k] < k``; a full key takes it only if it is
    larger than its smallest kept value, which drops out. NaN is never inserted. ``fill``
    starts at 0 (``top`` may hold anything); a kept row whose key's ``fill`` is outside
    ``[0, k]`` is a ValueError raised before anything is written.
    """
    t, f = _topk_state(top, fill)
    ids = _key_ids(key_ids)
    v = _values(values, ids.shape[0], t.dtype)
    m = _mask(mask, ids.shape[0])
    width = t.shape[1]
    _check_range(ids, m, _lengths(t, f), "top, fill")
    row = _first_bad_fill(ids, m, f, width)
    if row >= 0:
        raise _fill_error(ids, row, f, width)
    ids, v = _kept(ids, v, m)
    if v.dtype == _FLOAT64:
        number = ~np.isnan(v)
        ids, v = ids[number], v[number]
    if ids.shape[0] == 0:
        return
    touched = np.unique(ids)
    n0 = f[touched]
    prefix = t[touched]
    used = np.arange(width) < n0[:, None]
    # A kept prefix that rises or holds NaN was not written by this function; such keys take
    # the row-by-row path so that the result is still the native loop's, bit for bit.
    odd = ((prefix[:, :-1] < prefix[:, 1:]) & used[:, 1:]).any(axis=1)
    if v.dtype == _FLOAT64:
        odd |= (np.isnan(prefix) & used).any(axis=1)
    if odd.any():
        row_odd = odd[np.searchsorted(touched, ids)]
        for key, x in zip(ids[row_odd].tolist(), v[row_odd]):
            _topk_insert(t[key], f, key, x)
        ids, v = ids[~row_odd], v[~row_odd]
        touched, n0 = touched[~odd], n0[~odd]
    if ids.shape[0] == 0:
        return
    # Sorted prefixes: the result is the stable descending sort of (kept values, then the new
    # rows in order), cut to k. Candidates are laid out in that arrival order, key by key.
    old_keys = np.repeat(touched, n0)
    old_slots = np.arange(old_keys.shape[0]) - np.repeat(np.cumsum(n0) - n0, n0)
    cand_keys = np.concatenate([old_keys, ids])
    cand = np.concatenate([t[old_keys, old_slots], v])
    order = np.lexsort((~_order_key(cand, _INT64_MIN), cand_keys))  # stable: arrival breaks ties
    sk = cand_keys[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    counts = np.diff(np.r_[starts, sk.shape[0]])
    slot = np.arange(sk.shape[0]) - np.repeat(starts, counts)
    keep = slot < width
    t[sk[keep], slot[keep]] = cand[order[keep]]
    f[sk[starts]] = np.minimum(counts, width)


def _topk_read_args(top: Any, fill: Any, key: Any) -> tuple[np.ndarray, int, int]:
    """(top, key, n): ``top[key, :n]`` is the answer; n = 0 for a key outside the arrays."""
    t = np.asarray(top)
    f = np.asarray(fill)
    k = operator.index(key)
    if (t.ndim != 2 or f.ndim != 1 or t.dtype not in _VALUE_DTYPES or f.dtype != _INT64
            or t.shape[1] < 1):
        raise ValueError("topk_read needs an (nkeys, k >= 1) int64 or float64 top and a 1-D "
                         "int64 fill")
    if not 0 <= k < _lengths(t, f):
        return t, 0, 0
    n = int(f[k])
    if not 0 <= n <= t.shape[1]:
        raise ValueError(f"fill[{k}] = {n} is outside [0, {t.shape[1]}]: fill[k] counts the "
                         f"used slots of top[k], at most top.shape[1]")
    return t, k, n


def topk_read(top: np.ndarray, fill: np.ndarray, key: int) -> np.ndarray:
    """``top[key, :fill[key]]`` as a new array, largest first; empty for a key outside
    ``[0, min(len(top), len(fill)))``."""
    t, k, n = _topk_read_args(top, fill, key)
    return np.array(t[k, :n]) if n else np.empty(0, t.dtype)


# ---- derivations: fan-out over CSR lists --------------------------------------------------------

def _fan_out_args(offsets: Any, values: Any, cap: Any) -> tuple[np.ndarray, np.ndarray, int]:
    off = _vector(offsets, "offsets")
    val = _vector(values, "values")
    if off.dtype != _INT64 or val.dtype != _INT64:
        raise TypeError("fan_out takes int64 offsets and values")
    if off.shape[0] < 1:
        raise ValueError("offsets needs at least one entry (offsets[0] = 0)")
    if int(cap) < 0:
        raise ValueError(f"cap must be >= 0, got {cap}")
    d = np.diff(off)
    if off[0] != 0 or (d < 0).any() or off[-1] > val.shape[0]:
        raise ValueError("offsets must start at 0, never decrease and end within values (a CSR)")
    return off, val, min(int(cap), 1 << 62)


def fan_out(offsets: Any, values: Any, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Expand a CSR: for each row i its first ``min(cap, offsets[i+1] - offsets[i])`` values.

    Returns ``(out, row)``: the values in row order and, for each, the row it came from.
    """
    off, val, c = _fan_out_args(offsets, values, cap)
    counts = np.minimum(np.diff(off), c)
    row = np.repeat(np.arange(counts.shape[0], dtype=np.int64), counts)
    starts = np.zeros(counts.shape[0], np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    pos = np.arange(row.shape[0], dtype=np.int64) - starts[row]
    return val[off[:-1][row] + pos], row


# ---- point reads -------------------------------------------------------------------------------


def point_read(arrays: dict[str, Any], names: tuple[str, ...], kid: int,
               zeros: tuple[Any, ...]) -> dict[str, Any]:
    """``{name: arrays[name][kid]}`` as Python scalars, for each name in ``names``; a column with
    ``kid >= len(column)`` (or ``kid < 0``) gives ``zeros[i]`` instead.

    One call per ``Store.get``: 1-D int64 / float64 columns (strided views of a row group
    included) are read by pointer, anything else through ``ndarray.item``."""
    if len(zeros) != len(names):
        raise ValueError(f"zeros has {len(zeros)} entries but names has {len(names)}")
    out: dict[str, Any] = {}
    for name, zero in zip(names, zeros):
        col = arrays[name]
        if not isinstance(col, np.ndarray) or col.ndim != 1:
            raise TypeError(f"column {name!r} must be a 1-D numpy array")
        out[name] = col.item(kid) if 0 <= kid < col.shape[0] else zero
    return out
