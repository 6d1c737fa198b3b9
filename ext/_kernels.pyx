"""Reducer kernels: fold (key_ids, values) columns into caller-owned per-key arrays.

The reference twin is engine/_kernels_py.py; its module docstring is the contract (row-order
semantics, int64 wraparound, NaN rules) and its argument checks are imported here, so both
reject bad input with the same exception and message.

Design. Each kernel is a Python wrapper (argument checks, under the GIL) around one
``noexcept nogil`` loop over raw C pointers, specialised for int64 and float64 through the
fused type ``num_t``. Arrays arrive as ``const`` memoryviews (read-only arrays and
``np.memmap(mode="r")`` work without a copy), C-contiguous: outputs must be, strided inputs
are copied by the checks. Plain ``p[k]`` indexing matters: with byte strides the same loops
ran ~1.5x slower. Before any write, one pass over the key ids proves every kept id lies in
``[0, len(output))`` (0.3 ns/row), so the loops run unchecked and never write out of bounds.
With 1M keys the outputs outgrow the caches and every row costs a miss per output array:
the loops prefetch the outputs of the row PREFETCH_AHEAD rows on, which makes them ~2x
faster. int64 sums add as uint64 (wraparound is defined there, signed overflow is not).
Functions that take ``&view[0]`` of a possibly empty view are ``boundscheck(False)`` even in
the debug build: that is an address computation, and no loop reads it when the view is empty.
"""

cimport cython
from libc.stdint cimport INT64_MAX, INT64_MIN, int64_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy

import numpy as np
cimport numpy as cnp

cnp.import_array()

from engine._kernels_py import (
    _fill_error, _key_ids, _lengths, _mask, _negative_error, _out, _range_error,
    _ring, _ring_read_args, _row_state, _seen, _topk_args, _topk_read_args, _topk_state,
    _value_outs, _values, _watch_args, _watch_ids, _fan_out_args,
)

__all__ = [
    "reduce_count", "reduce_sum", "reduce_min", "reduce_max", "reduce_first", "reduce_last",
    "fold_count_sum_last", "fold_count_sum_last_rows", "ring_push", "ring_read",
    "watch_diff", "watched_unique", "fan_out", "topk", "topk_push", "topk_read",
]

ctypedef fused num_t:
    int64_t
    double

cdef object INT64 = np.dtype(np.int64)

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define ENGINE_PREFETCH_W(p) __builtin_prefetch((p), 1, 3)
    #define ENGINE_PREFETCH_R(p) __builtin_prefetch((p), 0, 3)
    #else
    #define ENGINE_PREFETCH_W(p) ((void)(p))
    #define ENGINE_PREFETCH_R(p) ((void)(p))
    #endif
    """
    void ENGINE_PREFETCH_W(const void* p) noexcept nogil
    void ENGINE_PREFETCH_R(const void* p) noexcept nogil

# rows. count + sum + last into 1M keys (3 x 8 MB), 10M rows: 4.3 (Zipf) / 6.6 (uniform)
# ns/row without prefetching, 2.3 / 3.7 with 128 rows ahead; 16-64 ahead were slower, 256+ no
# faster. One-array kernels gain less and may lose a little when the array fits the L3.
cdef Py_ssize_t PREFETCH_AHEAD = 128
cdef Py_ssize_t PREFETCH_MIN_BYTES = 1 << 20  # bytes; smaller outputs stay in L2 anyway


# ---- rows: the checked key ids and mask of one call ------------------------------------------

cdef struct Rows:
    const int64_t* ids
    const uint8_t* mask     # NULL keeps every row
    Py_ssize_t n
    uint64_t keys           # every kept id is below this (checked before any loop runs)
    Py_ssize_t ahead        # prefetch distance in rows; 0 = off
    Py_ssize_t ahead_stop   # rows below this prefetch the row `ahead` on


cdef inline bint _skip(Rows r, Py_ssize_t i) noexcept nogil:
    return r.mask != NULL and r.mask[i] == 0


cdef inline bint _plain(object a, int typenum, bint writeable):
    """``a`` is a 1-D, C-contiguous, native-order ndarray of ``typenum`` (and writeable if
    asked): its data pointer can be used as is. The fast path of small calls — the checking
    helpers shared with the twin cost ~1 µs per call, most of a one-action fold — takes
    arguments that pass this; anything else goes through the helpers (same results)."""
    if not cnp.PyArray_Check(a):
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    return (cnp.PyArray_NDIM(arr) == 1 and cnp.PyArray_TYPE(arr) == typenum
            and cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISNOTSWAPPED(arr)
            and (not writeable or cnp.PyArray_ISWRITEABLE(arr)))


cdef inline void* _data(object a) noexcept:
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline Py_ssize_t _len(object a) noexcept:
    return cnp.PyArray_DIM(<cnp.ndarray>a, 0)


cdef inline int64_t _ahead(Rows r, Py_ssize_t i) noexcept nogil:
    """The id `ahead` rows on, to prefetch; -1 if none (or out of range: rows the mask
    drops are not checked)."""
    cdef int64_t k
    if i >= r.ahead_stop:
        return -1
    k = r.ids[i + r.ahead]
    return k if <uint64_t>k < r.keys else -1


cdef Py_ssize_t _first_bad(Rows r) noexcept nogil:
    """The first kept row whose id is outside [0, keys), or -1. A negative id is huge as a
    uint64, so one unsigned compare per row covers both ends."""
    cdef Py_ssize_t i
    cdef bint bad = False
    if r.mask != NULL:
        for i in range(r.n):
            bad |= (<uint64_t>r.ids[i] >= r.keys) & (r.mask[i] != 0)
    else:
        for i in range(r.n):
            bad |= <uint64_t>r.ids[i] >= r.keys
    if bad:
        for i in range(r.n):
            if <uint64_t>r.ids[i] >= r.keys and not _skip(r, i):
                return i
    return -1


@cython.boundscheck(False)  # &view[0] of an empty view: an address, never read
cdef Rows _rows(object ids, object m, Py_ssize_t keys, str outputs,
                Py_ssize_t bytes_per_key) except *:
    """The checked rows of a call; ValueError naming `outputs` unless every kept id < keys.
    The caller holds `ids` and `m` (C-contiguous arrays) while any loop uses the pointers."""
    cdef const int64_t[::1] iv = ids
    cdef const uint8_t[::1] mv
    cdef const uint8_t* mp = NULL
    if m is not None:
        mv = m
        mp = &mv[0]
    return _checked_rows(ids, &iv[0], mp, iv.shape[0], keys, outputs, bytes_per_key)


cdef Rows _checked_rows(object ids, const int64_t* p, const uint8_t* mask, Py_ssize_t n,
                        Py_ssize_t keys, str outputs, Py_ssize_t bytes_per_key) except *:
    """`_rows` over raw pointers (the caller holds the arrays)."""
    cdef Rows r
    cdef Py_ssize_t row
    r.ids, r.n, r.mask, r.keys = p, n, mask, keys
    r.ahead = PREFETCH_AHEAD if keys * bytes_per_key >= PREFETCH_MIN_BYTES else 0
    r.ahead_stop = r.n - r.ahead if r.ahead and r.n > r.ahead else 0
    with nogil:
        row = _first_bad(r)
    if row >= 0:
        raise _range_error(ids, row, keys, outputs)
    return r


cdef inline num_t _add(num_t a, num_t b) noexcept nogil:
    if num_t is int64_t:
        return <int64_t>(<uint64_t>a + <uint64_t>b)   # wraps modulo 2**64, like numpy
    else:
        return a + b


cdef inline bint _better(num_t x, num_t cur, bint largest) noexcept nogil:
    """x replaces cur: strictly smaller (largest: larger); NaN loses to every number."""
    if num_t is double:
        if cur != cur:
            return x == x
    return x > cur if largest else x < cur


# ---- loops: no Python objects, no GIL, every kept id already checked --------------------------

cdef void _count(Rows r, int64_t* c) noexcept nogil:
    cdef Py_ssize_t i
    cdef int64_t k
    for i in range(r.n):
        k = _ahead(r, i)
        if k >= 0:
            ENGINE_PREFETCH_W(&c[k])
        if not _skip(r, i):
            c[r.ids[i]] += 1


cdef void _sum(Rows r, num_t* s, const num_t* v) noexcept nogil:
    cdef Py_ssize_t i
    cdef int64_t k
    for i in range(r.n):
        k = _ahead(r, i)
        if k >= 0:
            ENGINE_PREFETCH_W(&s[k])
        if not _skip(r, i):
            k = r.ids[i]
            s[k] = _add(s[k], v[i])


cdef void _seen_op(int op, Rows r, num_t* o, uint8_t* seen, const num_t* v) noexcept nogil:
    """op: 0 min, 1 max, 2 first, 3 last."""
    cdef Py_ssize_t i
    cdef int64_t k
    for i in range(r.n):
        k = _ahead(r, i)
        if k >= 0:
            ENGINE_PREFETCH_W(&o[k])
            ENGINE_PREFETCH_W(&seen[k])
        if _skip(r, i):
            continue
        k = r.ids[i]
        if op == 3 or seen[k] == 0:
            o[k] = v[i]
            seen[k] = 1
        elif op < 2 and _better(v[i], o[k], op == 1):
            o[k] = v[i]


cdef void _fold(Rows r, int64_t* c, num_t* s, num_t* l, const num_t* v) noexcept nogil:
    cdef Py_ssize_t i
    cdef int64_t k
    for i in range(r.n):
        k = _ahead(r, i)
        if k >= 0:
            ENGINE_PREFETCH_W(&c[k])
            ENGINE_PREFETCH_W(&s[k])
            ENGINE_PREFETCH_W(&l[k])
        if _skip(r, i):
            continue
        k = r.ids[i]
        c[k] += 1
        s[k] = _add(s[k], v[i])
        l[k] = v[i]


cdef void _fold_rows(Rows r, num_t* st, Py_ssize_t width, const num_t* v) noexcept nogil:
    cdef Py_ssize_t i
    cdef int64_t k
    cdef num_t* p
    for i in range(r.n):
        k = _ahead(r, i)
        if k >= 0:   # the row's first and last word: a 24-byte row may straddle two lines
            ENGINE_PREFETCH_W(&st[k * width])
            ENGINE_PREFETCH_W(&st[k * width + 2])
        if _skip(r, i):
            continue
        p = &st[r.ids[i] * width]
        p[0] += 1
        p[1] = _add(p[1], v[i])
        p[2] = v[i]


cdef void _ring_push(Rows r, int64_t* ring, uint64_t width, int64_t* head,
                     const int64_t* v) noexcept nogil:
    cdef Py_ssize_t i
    cdef int64_t k
    cdef uint64_t pushes
    for i in range(r.n):
        k = _ahead(r, i)
        if k >= 0:
            ENGINE_PREFETCH_W(&head[k])
        if _skip(r, i):
            continue
        k = r.ids[i]
        pushes = <uint64_t>head[k]      # an unsigned count: the slot is always in range
        ring[<uint64_t>k * width + pushes % width] = v[i]
        head[k] = <int64_t>(pushes + 1)


# ---- entries: typed memoryviews (they check dtype and writeability) to pointers -------------

@cython.boundscheck(False)
cdef _sum_entry(Rows r, num_t[::1] s, const num_t[::1] v):
    with nogil:
        _sum(r, &s[0], &v[0])


@cython.boundscheck(False)
cdef _seen_entry(int op, Rows r, num_t[::1] o, uint8_t[::1] seen, const num_t[::1] v):
    with nogil:
        _seen_op(op, r, &o[0], &seen[0], &v[0])


@cython.boundscheck(False)
cdef _fold_entry(Rows r, int64_t[::1] c, num_t[::1] s, num_t[::1] l, const num_t[::1] v):
    with nogil:
        _fold(r, &c[0], &s[0], &l[0], &v[0])


# ---- reducers ---------------------------------------------------------------------------------

@cython.boundscheck(False)
def reduce_count(count, key_ids, mask=None):
    """``count[k] += 1`` for every kept row with key id ``k``."""
    c = _out(count, "count", (INT64,))
    ids = _key_ids(key_ids)
    m = _mask(mask, ids.shape[0])
    cdef Rows r = _rows(ids, m, c.shape[0], "count", 8)
    cdef int64_t[::1] cv = c
    with nogil:
        _count(r, &cv[0])


def reduce_sum(sum, key_ids, values, mask=None):
    """``sum[k] += v`` in row order (int64 wraps modulo 2**64)."""
    (s,), dtype = _value_outs({"sum": sum})
    ids = _key_ids(key_ids)
    v = _values(values, ids.shape[0], dtype)
    m = _mask(mask, ids.shape[0])
    cdef Rows r = _rows(ids, m, s.shape[0], "sum", 8)
    if dtype == INT64:
        _sum_entry[int64_t](r, s, v)
    else:
        _sum_entry[double](r, s, v)


cdef _seen_kernel(int op, out, seen, key_ids, values, mask):
    """reduce_min (op 0) / max (1) / first (2) / last (3): outputs (out, seen)."""
    (o,), dtype = _value_outs({"out": out})
    s = _seen(seen)
    ids = _key_ids(key_ids)
    v = _values(values, ids.shape[0], dtype)
    m = _mask(mask, ids.shape[0])
    cdef Rows r = _rows(ids, m, _lengths(o, s), "out, seen", 9)
    if dtype == INT64:
        _seen_entry[int64_t](op, r, o, s, v)
    else:
        _seen_entry[double](op, r, o, s, v)


def reduce_min(out, seen, key_ids, values, mask=None):
    """Smallest value per key; ``seen[k]`` set once a key has a value (see the twin's notes)."""
    _seen_kernel(0, out, seen, key_ids, values, mask)


def reduce_max(out, seen, key_ids, values, mask=None):
    """Largest value per key; ``seen[k]`` set once a key has a value (see the twin's notes)."""
    _seen_kernel(1, out, seen, key_ids, values, mask)


def reduce_first(out, seen, key_ids, values, mask=None):
    """The first value per key: written only where ``seen[k]`` is 0, then ``seen[k] = 1``."""
    _seen_kernel(2, out, seen, key_ids, values, mask)


def reduce_last(out, seen, key_ids, values, mask=None):
    """The last value per key, ``seen[k] = 1``."""
    _seen_kernel(3, out, seen, key_ids, values, mask)


def fold_count_sum_last(count, sum, last, key_ids, values, mask=None):
    """count, sum and last per key in one pass (``count[k] > 0`` tells that ``last[k]`` is set)."""
    c = _out(count, "count", (INT64,))
    (s, l), dtype = _value_outs({"sum": sum, "last": last})
    ids = _key_ids(key_ids)
    v = _values(values, ids.shape[0], dtype)
    m = _mask(mask, ids.shape[0])
    cdef Rows r = _rows(ids, m, _lengths(c, s, l), "count, sum, last", 24)
    if dtype == INT64:
        _fold_entry[int64_t](r, c, s, l, v)
    else:
        _fold_entry[double](r, c, s, l, v)


@cython.boundscheck(False)
cdef _rows_entry(Rows r, num_t[:, ::1] st, const num_t[::1] v):
    with nogil:
        _fold_rows(r, &st[0, 0], st.shape[1], &v[0])


def fold_count_sum_last_rows(state, key_ids, values, mask=None):
    """``fold_count_sum_last`` with ``state[k] = [count, sum, last]`` together in one row.

    One key's three numbers share a cache line (the fastest layout on 1M keys). ``state`` has
    the values' dtype: with float64 values the count is a float64 too, exact up to 2**53, and
    grows by adding 1.0 per row. ``state`` may have more than 3 columns (e.g. 4, so that a row
    never straddles two cache lines); the extra columns are left alone.
    """
    cdef int vt
    cdef Py_ssize_t width
    cdef Rows r
    cdef void* sp
    cdef void* vp
    if (mask is None and cnp.PyArray_Check(state) and cnp.PyArray_NDIM(<cnp.ndarray>state) == 2
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>state)
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>state)
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>state)):
        vt, width = cnp.PyArray_TYPE(<cnp.ndarray>state), cnp.PyArray_DIM(<cnp.ndarray>state, 1)
        if ((vt == cnp.NPY_INT64 or vt == cnp.NPY_FLOAT64) and width >= 3
                and _plain(key_ids, cnp.NPY_INT64, False) and _plain(values, vt, False)
                and _len(values) == _len(key_ids)):
            r = _checked_rows(key_ids, <const int64_t*>_data(key_ids), NULL, _len(key_ids),
                              cnp.PyArray_DIM(<cnp.ndarray>state, 0), "state", 8 * width)
            sp, vp = _data(state), _data(values)
            with nogil:
                if vt == cnp.NPY_INT64:
                    _fold_rows[int64_t](r, <int64_t*>sp, width, <const int64_t*>vp)
                else:
                    _fold_rows[double](r, <double*>sp, width, <const double*>vp)
            return
    st = _row_state(state)
    ids = _key_ids(key_ids)
    v = _values(values, ids.shape[0], st.dtype)
    m = _mask(mask, ids.shape[0])
    r = _rows(ids, m, st.shape[0], "state", 8 * st.shape[1])
    if st.dtype == INT64:
        _rows_entry[int64_t](r, st, v)
    else:
        _rows_entry[double](r, st, v)


# ---- rings of the last N values ---------------------------------------------------------------

@cython.boundscheck(False)
def ring_push(ring, head, key_ids, values, mask=None):
    """Push each kept value into its key's ring: ``ring[k, head[k] % N] = v; head[k] += 1``.

    ``head[k]`` counts every push to key ``k`` (an unsigned 64-bit count that wraps), so the
    ring holds the last ``min(head[k], N)`` values; ``ring_read`` gives them newest first.
    """
    rg, h = _ring(ring, head)
    ids = _key_ids(key_ids)
    v = _values(values, ids.shape[0], INT64)
    m = _mask(mask, ids.shape[0])
    cdef Rows r = _rows(ids, m, _lengths(rg, h), "ring, head", 8)
    cdef int64_t[:, ::1] rv = rg
    cdef int64_t[::1] hv = h
    cdef const int64_t[::1] vv = v
    with nogil:
        _ring_push(r, &rv[0, 0], rv.shape[1], &hv[0], &vv[0])


def ring_read(ring, head, key):
    """The values in ``key``'s ring, newest first (a copy; at most N of them)."""
    rg, h, key = _ring_read_args(ring, head, key)
    cdef const int64_t[:, :] rv = rg
    cdef const int64_t[:] hv = h
    cdef Py_ssize_t i, k = key
    cdef uint64_t pushes = <uint64_t>hv[k], width = rv.shape[1]
    cdef Py_ssize_t n = <Py_ssize_t>min(pushes, width)
    out = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] o = out
    for i in range(n):
        o[i] = rv[k, (pushes - 1 - <uint64_t>i) % width]
    return out


# ---- ranking ----------------------------------------------------------------------------------

cdef struct Ranked:
    int64_t rank   # larger is better; ties go to the smaller id
    int64_t id


cdef inline bint _worse(Ranked a, Ranked b) noexcept nogil:
    return a.rank < b.rank or (a.rank == b.rank and a.id > b.id)


cdef inline int64_t _rank(num_t x) noexcept nogil:
    """int64 ordered like x: floats by their IEEE bits (magnitude flipped for negatives),
    -0.0 as 0.0, every NaN below every number."""
    cdef double y
    cdef int64_t bits
    if num_t is int64_t:
        return x
    else:
        if x != x:
            return INT64_MIN
        y = x + 0.0               # -0.0 + 0.0 == +0.0
        memcpy(&bits, &y, sizeof(bits))
        return bits ^ INT64_MAX if bits < 0 else bits


cdef void _sift_down(Ranked* h, Py_ssize_t n, Py_ssize_t i) noexcept nogil:
    """Restore the heap below i; the root is the worst kept candidate."""
    cdef Py_ssize_t c
    cdef Ranked t
    while 2 * i + 1 < n:
        c = 2 * i + 1
        if c + 1 < n and _worse(h[c + 1], h[c]):
            c += 1
        if not _worse(h[c], h[i]):
            return
        t = h[c]
        h[c] = h[i]
        h[i] = t
        i = c


cdef void _sift_up(Ranked* h, Py_ssize_t i) noexcept nogil:
    cdef Ranked t
    while i > 0 and _worse(h[i], h[(i - 1) // 2]):
        t = h[i]
        h[i], h[(i - 1) // 2] = h[(i - 1) // 2], t
        i = (i - 1) // 2


cdef Py_ssize_t _topk(const num_t* v, Py_ssize_t n, const uint8_t* m, Ranked* h, Py_ssize_t k,
                      int64_t* out) noexcept nogil:
    """The k best into out (best first) through a size-k heap: O(n log k). Returns how many;
    m (NULL: all) drops ids where it is 0."""
    cdef Py_ssize_t i, size = 0
    cdef Ranked x
    for i in range(n):
        if m != NULL and m[i] == 0:
            continue
        x.rank, x.id = _rank(v[i]), i
        if size < k:
            h[size] = x
            size += 1
            _sift_up(h, size - 1)
        elif _worse(h[0], x):
            h[0] = x
            _sift_down(h, size, 0)
    for i in range(size - 1, -1, -1):   # pop the worst into the back
        out[i] = h[0].id
        h[0] = h[i]
        _sift_down(h, i, 0)
    return size


@cython.boundscheck(False)
cdef Py_ssize_t _topk_entry(const num_t[::1] v, const uint8_t* m, Ranked* h, Py_ssize_t k,
                            int64_t[::1] out):
    with nogil:
        return _topk(&v[0], v.shape[0], m, h, k, &out[0])


@cython.boundscheck(False)
def topk(values, k, mask=None):
    """Ids (positions) of the ``k`` largest values, largest first, ties by smaller id.

    Ids where ``mask`` is 0 are left out; NaN ranks below every number; fewer than ``k`` ids
    come back when there are fewer candidates.
    """
    v, kk, m = _topk_args(values, k, mask)
    cdef Py_ssize_t size = min(kk, v.shape[0]), n
    cdef const uint8_t[::1] mv
    cdef const uint8_t* mp = NULL
    if m is not None:
        mv = m
        mp = &mv[0]
    out = np.empty(max(size, 1), dtype=np.int64)
    cdef Ranked* heap = <Ranked*>malloc(max(size, 1) * sizeof(Ranked))
    if heap == NULL:
        raise MemoryError(f"topk: cannot allocate a heap of {size} entries")
    try:
        if v.dtype == INT64:
            n = _topk_entry[int64_t](v, mp, heap, size, out)
        else:
            n = _topk_entry[double](v, mp, heap, size, out)
    finally:
        free(heap)
    return out[:n].copy() if n < out.shape[0] else out



# ---- subscriptions: watched keys --------------------------------------------------------------

@cython.boundscheck(False)  # &view[0] of an empty view: an address, never read
cdef Rows _watch_rows(object ids, Py_ssize_t watchable, Py_ssize_t bytes_per_key) except *:
    """The rows of a watch call: any id >= 0 is valid (ids from `watchable` on are simply not
    watched), a negative one is a ValueError. r.keys = watchable bounds reads and prefetches.
    The caller holds `ids` while any loop uses the pointer."""
    cdef const int64_t[::1] iv = ids
    cdef Rows r
    cdef Py_ssize_t row
    r.ids, r.n, r.mask, r.keys = &iv[0], iv.shape[0], NULL, (<uint64_t>1) << 63
    with nogil:
        row = _first_bad(r)   # as uint64, only negative ids reach 2**63
    if row >= 0:
        raise _negative_error(ids, row)
    r.keys = watchable
    r.ahead = PREFETCH_AHEAD if watchable * bytes_per_key >= PREFETCH_MIN_BYTES else 0
    r.ahead_stop = r.n - r.ahead if r.ahead and r.n > r.ahead else 0
    return r


cdef Py_ssize_t _watch_diff(Rows r, const uint8_t* watched, const num_t* state, uint64_t cap_s,
                            Py_ssize_t stride, num_t* shadow, int64_t* out_ids, num_t* out_old,
                            num_t* out_new) noexcept nogil:
    """Report and absorb each watched key's change (r.keys = len(watched)); their count.
    ``state[k * stride]`` is key k's value (stride > 1: a column of a row group)."""
    cdef Py_ssize_t i, j = 0
    cdef int64_t k
    cdef num_t old, new
    cdef bint changed
    for i in range(r.n):
        k = _ahead(r, i)
        if k >= 0:
            ENGINE_PREFETCH_R(&watched[k])
            ENGINE_PREFETCH_W(&shadow[k])
            if <uint64_t>k < cap_s:
                ENGINE_PREFETCH_R(&state[k * stride])
        k = r.ids[i]
        if <uint64_t>k >= r.keys:   # past the mask: not watched (rare, predictable)
            continue
        new = state[k * stride] if <uint64_t>k < cap_s else 0   # state not grown that far yet
        old = shadow[k]
        # branch-free: whether this row changes its key is a coin flip the branch predictor
        # loses (first touch in the batch vs a repeat); selects and unconditional stores to
        # the (cached) outputs are cheaper
        changed = (old != new) & (watched[k] != 0)
        if num_t is double:
            changed = changed & ((old == old) | (new == new))   # NaN == NaN: unchanged
        out_ids[j] = k
        out_old[j] = old
        out_new[j] = new
        shadow[k] = new if changed else old
        j += changed
    return j


@cython.boundscheck(False)
cdef Py_ssize_t _watch_entry(Rows r, const uint8_t[::1] w, const num_t[:] s, num_t[::1] sh,
                             int64_t[::1] oi, num_t[::1] oo, num_t[::1] on):
    cdef Py_ssize_t stride = s.strides[0] // <Py_ssize_t>sizeof(num_t)
    if stride * <Py_ssize_t>sizeof(num_t) != s.strides[0] or stride < 1:
        raise ValueError("state must have a positive stride that is a multiple of its item size")
    with nogil:
        return _watch_diff(r, &w[0], &s[0], s.shape[0], stride, &sh[0], &oi[0], &oo[0], &on[0])


def watch_diff(ids, watched, state, shadow, out_ids, out_old, out_new):
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
    cdef int vt = cnp.NPY_INT64
    cdef Py_ssize_t n, keys, stride, row, cap
    cdef Rows r
    cdef const uint8_t* wp
    cdef void* sp
    cdef void* hp
    cdef int64_t* ip
    cdef void* op
    cdef void* np_
    if cnp.PyArray_Check(state) and cnp.PyArray_TYPE(<cnp.ndarray>state) == cnp.NPY_FLOAT64:
        vt = cnp.NPY_FLOAT64
    if (_plain(ids, cnp.NPY_INT64, False) and _plain(watched, cnp.NPY_UINT8, False)
            and cnp.PyArray_Check(state) and cnp.PyArray_NDIM(<cnp.ndarray>state) == 1
            and cnp.PyArray_TYPE(<cnp.ndarray>state) == vt
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>state)
            and _plain(shadow, vt, True) and _plain(out_ids, cnp.NPY_INT64, True)
            and _plain(out_old, vt, True) and _plain(out_new, vt, True)):
        n, keys = _len(ids), _len(watched)
        stride = cnp.PyArray_STRIDE(<cnp.ndarray>state, 0) // 8
        if (_len(shadow) >= keys and _len(out_ids) >= n and _len(out_old) >= n
                and _len(out_new) >= n and stride >= 1
                and stride * 8 == cnp.PyArray_STRIDE(<cnp.ndarray>state, 0)):
            r.ids, r.n, r.mask, r.keys = <const int64_t*>_data(ids), n, NULL, (<uint64_t>1) << 63
            with nogil:
                row = _first_bad(r)   # as uint64, only negative ids reach 2**63
            if row >= 0:
                raise _negative_error(ids, row)
            r.keys = keys
            r.ahead = PREFETCH_AHEAD if keys * 17 >= PREFETCH_MIN_BYTES else 0
            r.ahead_stop = r.n - r.ahead if r.ahead and r.n > r.ahead else 0
            wp, sp, hp = <const uint8_t*>_data(watched), _data(state), _data(shadow)
            ip, op, np_ = <int64_t*>_data(out_ids), _data(out_old), _data(out_new)
            cap = _len(state)
            with nogil:
                if vt == cnp.NPY_INT64:
                    n = _watch_diff[int64_t](r, wp, <const int64_t*>sp, cap, stride, <int64_t*>hp,
                                             ip, <int64_t*>op, <int64_t*>np_)
                else:
                    n = _watch_diff[double](r, wp, <const double*>sp, cap, stride, <double*>hp,
                                            ip, <double*>op, <double*>np_)
            return n
    i, w, s, sh, oi, oo, on = _watch_args(ids, watched, state, shadow, out_ids, out_old, out_new)
    r = _watch_rows(i, w.shape[0], 17)
    if s.dtype == INT64:
        return _watch_entry[int64_t](r, w, s, sh, oi, oo, on)
    return _watch_entry[double](r, w, s, sh, oi, oo, on)


cdef Py_ssize_t _watched_unique(Rows r, const uint8_t* watched, uint8_t* marks,
                                int64_t* out) noexcept nogil:
    """Watched ids (r.keys = len(watched)), each once (marks: one bit per key); their count."""
    cdef Py_ssize_t i, n = 0
    cdef int64_t k
    for i in range(r.n):
        k = _ahead(r, i)
        if k >= 0:
            ENGINE_PREFETCH_R(&watched[k])
        k = r.ids[i]
        if <uint64_t>k >= r.keys or watched[k] == 0:
            continue
        if marks[k >> 3] & (1 << (k & 7)):
            continue
        marks[k >> 3] |= 1 << (k & 7)
        out[n] = k
        n += 1
    return n


@cython.boundscheck(False)
def watched_unique(ids, watched):
    """The distinct ids among ``ids`` that are watched (``k < len(watched)`` and
    ``watched[k] != 0``), in first-appearance order; a negative id is a ValueError."""
    i, w = _watch_ids(ids, watched)
    cdef Py_ssize_t n, keys = w.shape[0]
    cdef Rows r = _watch_rows(i, keys, 1)
    cdef const uint8_t[::1] wv = w
    out = np.empty(max(r.n, 1), dtype=np.int64)
    cdef int64_t[::1] ov = out
    cdef uint8_t* marks = <uint8_t*>calloc((keys >> 3) + 1, 1)
    if marks == NULL:
        raise MemoryError(f"watched_unique: cannot allocate a {keys}-bit key set")
    with nogil:
        n = _watched_unique(r, &wv[0], marks, &ov[0])
    free(marks)
    return out[:n].copy()


# ---- per-key top k ----------------------------------------------------------------------------

cdef Py_ssize_t _first_bad_fill(Rows r, const int64_t* fill, uint64_t width) noexcept nogil:
    """The first kept row whose key's fill is outside [0, width], or -1 (ids already checked;
    a negative fill is huge as a uint64).

    On 1M keys a gather per row costs ~1 ns and a sequential pass over the whole of `fill`
    ~0.25 ns per key (measured break-even: a row per 4-6 keys). So with at least a row per 4
    keys one pass first proves every fill good (the usual case); only if some fill is bad,
    touched or not, do the rows say which."""
    cdef Py_ssize_t i
    cdef int64_t k
    cdef bint bad = False
    if r.keys <= 4 * <uint64_t>r.n:
        for i in range(<Py_ssize_t>r.keys):
            bad |= <uint64_t>fill[i] > width
        if not bad:
            return -1
        bad = False
    for i in range(r.n):
        k = _ahead(r, i)
        if k >= 0:
            ENGINE_PREFETCH_R(&fill[k])
        if not _skip(r, i):
            bad |= <uint64_t>fill[r.ids[i]] > width
    if bad:
        for i in range(r.n):
            if not _skip(r, i) and <uint64_t>fill[r.ids[i]] > width:
                return i
    return -1


cdef void _topk_push(Rows r, num_t* top, Py_ssize_t width, int64_t* fill,
                     const num_t* v) noexcept nogil:
    """One insertion-sort step per row into the key's row of `width` slots."""
    cdef Py_ssize_t i, j
    cdef int64_t k
    cdef uint64_t f
    cdef num_t x
    cdef num_t* p
    for i in range(r.n):
        k = _ahead(r, i)
        if k >= 0:   # fill, and the row's first and last slot (a full key compares the last)
            ENGINE_PREFETCH_W(&fill[k])
            ENGINE_PREFETCH_W(&top[k * width])
            ENGINE_PREFETCH_W(&top[k * width + width - 1])
        if _skip(r, i):
            continue
        x = v[i]
        if num_t is double:
            if x != x:
                continue
        k = r.ids[i]
        p = &top[k * width]
        f = <uint64_t>fill[k]
        if f < <uint64_t>width:
            j = <Py_ssize_t>f
            fill[k] = <int64_t>(f + 1)
        elif f == <uint64_t>width and p[width - 1] < x:
            j = width - 1
        else:            # full and x <= the smallest kept (a bad fill was rejected before)
            continue
        while j > 0 and p[j - 1] < x:
            p[j] = p[j - 1]
            j -= 1
        p[j] = x


@cython.boundscheck(False)
cdef _topk_push_entry(Rows r, num_t[:, ::1] t, int64_t[::1] f, const num_t[::1] v):
    with nogil:
        _topk_push(r, &t[0, 0], t.shape[1], &f[0], &v[0])


@cython.boundscheck(False)
def topk_push(top, fill, key_ids, values, mask=None):
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
    cdef Py_ssize_t row, width = t.shape[1]
    cdef Rows r = _rows(ids, m, _lengths(t, f), "top, fill", 8 * width + 8)
    cdef int64_t[::1] fv = f
    with nogil:
        row = _first_bad_fill(r, &fv[0], width)
    if row >= 0:
        raise _fill_error(ids, row, f, width)
    if t.dtype == INT64:
        _topk_push_entry[int64_t](r, t, fv, v)
    else:
        _topk_push_entry[double](r, t, fv, v)


def topk_read(top, fill, key):
    """``top[key, :fill[key]]`` as a new array, largest first; empty for a key outside
    ``[0, min(len(top), len(fill)))``."""
    t, k, n = _topk_read_args(top, fill, key)
    return np.array(t[k, :n]) if n else np.empty(0, t.dtype)


# ---- derivations: fan-out over CSR lists -------------------------------------------------------

@cython.boundscheck(False)
@cython.wraparound(False)
def fan_out(offsets, values, cap):
    """Expand a CSR: for each row i its first ``min(cap, offsets[i+1] - offsets[i])`` values.

    Returns ``(out, row)``: the values in row order and, for each, the row it came from.
    The checks (shared with the twin) prove the CSR is well formed before the loops run.
    """
    off_a, val_a, c_ = _fan_out_args(offsets, values, cap)
    cdef const int64_t[::1] off = off_a
    cdef const int64_t[::1] val = val_a
    cdef int64_t c = c_
    cdef Py_ssize_t rows = off.shape[0] - 1, i
    cdef int64_t total = 0, m, j, lo
    with nogil:
        for i in range(rows):
            m = off[i + 1] - off[i]
            total += m if m < c else c
    out_a = np.empty(total, np.int64)
    row_a = np.empty(total, np.int64)
    cdef int64_t[::1] out = out_a
    cdef int64_t[::1] row = row_a
    cdef int64_t k = 0
    with nogil:
        for i in range(rows):
            lo = off[i]
            m = off[i + 1] - lo
            if m > c:
                m = c
            for j in range(m):
                out[k + j] = val[lo + j]
                row[k + j] = i
            k += m
    return out_a, row_a
