# Included by _kernels.pyx (one compiled module): the derivations' fan-out.

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
