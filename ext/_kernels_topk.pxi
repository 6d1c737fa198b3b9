# Included by _kernels.pyx (one compiled module): per-key top k.

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
