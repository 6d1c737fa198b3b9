# Included by _kernels.pyx (one compiled module): the subscription kernels.

# ---- subscriptions: watched keys --------------------------------------------------------------

@cython.boundscheck(False)  # &view[0] of an empty view: an address, never read
cdef Rows _watch_rows(object ids, Py_ssize_t watchable, Py_ssize_t bytes_per_key) except *:
    """The rows of a watch call: any id >= 0 is valid (ids from `watchable` on are simply not
    watched), a negative one is a ValueError. r.keys = watchable bounds reads and prefetches.
    The caller holds `ids` while any loop uses the pointer."""
    cdef const int64_t[::1] iv = ids
    return _watch_rows_at(ids, &iv[0], iv.shape[0], watchable, bytes_per_key)


cdef Rows _watch_rows_at(object ids, const int64_t* p, Py_ssize_t n, Py_ssize_t watchable,
                         Py_ssize_t bytes_per_key) except *:
    """`_watch_rows` over a raw pointer to the n ids of `ids` (the caller holds it)."""
    cdef Rows r
    cdef Py_ssize_t row
    r.ids, r.n, r.mask, r.keys = p, n, NULL, (<uint64_t>1) << 63
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
    cdef Py_ssize_t n, keys, stride, cap
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
            r = _watch_rows_at(ids, <const int64_t*>_data(ids), n, keys, 17)
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
