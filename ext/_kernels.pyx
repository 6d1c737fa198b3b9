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
    "watch_diff", "watched_unique", "fan_out", "topk", "topk_push", "topk_read", "point_read",
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


# ---- point reads ------------------------------------------------------------------------------

def point_read(dict arrays, tuple names, Py_ssize_t kid, tuple zeros):
    """``{name: arrays[name][kid]}`` as Python scalars, for each name in ``names``; a column with
    ``kid >= len(column)`` (or ``kid < 0``) gives ``zeros[i]`` instead.

    One call per ``Store.get``: 1-D int64 / float64 columns (strided views of a row group
    included) are read by pointer, anything else through ``ndarray.item``."""
    cdef dict out = {}
    cdef Py_ssize_t i, n = len(names)
    cdef object col
    cdef cnp.ndarray a
    cdef char* p
    cdef int t
    if len(zeros) != n:
        raise ValueError(f"zeros has {len(zeros)} entries but names has {n}")
    for i in range(n):
        name = names[i]
        col = arrays[name]
        if not cnp.PyArray_Check(col) or cnp.PyArray_NDIM(<cnp.ndarray>col) != 1:
            raise TypeError(f"column {name!r} must be a 1-D numpy array")
        a = <cnp.ndarray>col
        if kid < 0 or kid >= cnp.PyArray_DIM(a, 0):
            out[name] = zeros[i]
            continue
        t = cnp.PyArray_TYPE(a)
        p = <char*>cnp.PyArray_DATA(a) + kid * cnp.PyArray_STRIDE(a, 0)
        if t == cnp.NPY_INT64 and cnp.PyArray_ISNOTSWAPPED(a):
            out[name] = (<int64_t*>p)[0]
        elif t == cnp.NPY_FLOAT64 and cnp.PyArray_ISNOTSWAPPED(a):
            out[name] = (<double*>p)[0]
        else:
            out[name] = a.item(kid)
    return out


# The rest of the module, one file per concept (textual includes: the same compiled module,
# sharing the rows checks, loops and prefetching above).
include "_kernels_watch.pxi"
include "_kernels_topk.pxi"
include "_kernels_fanout.pxi"
