"""Per-shard dispatch buffer of single actions; the reference twin is engine/_dispatch_py.py.

Design
------
``RowBuffer`` keeps, per shard, a uint16 type column and, per (type, field), a growing C array:
of the field's numpy dtype for fixed-width fields, of owned ``PyObject*`` for string, bytes and
str-key fields. Every column of one (shard, type) shares one row count and one capacity, which
doubles, so an append is amortized O(1) and allocates no Python object but the returned offset.
``take`` copies a shard's columns out as numpy arrays / lists and empties it.

``Dispatcher.__call__`` is the fast path. Pass 1 checks every value in C against exactly what
``ActionType.validate_one`` accepts without conversion (the list is in the twin's module doc)
into a row on the C stack; a value it cannot take sends the whole call to ``fallback(*values)``
(``ActionType.validate_row``), whose normalized row is stored as ``add`` stores it. Pass 2
(``_append``) routes, reserves room, stores and commits.

Threads: from routing to commit an append runs no Python code (no callbacks, no allocation of
GC-tracked objects), so under the GIL it is atomic. ``take`` mallocs its snapshot first, then
detaches the shard in one pure-C step, and only then builds Python objects.

Routing equals engine._keys: splitmix64 of the int64 bits (uint64 keys: their bits, as
``Log._route`` casts columns), FNV-1a 64 of the UTF-8 bytes then splitmix64 for str/bytes.
The tests pin it against both ``_keys`` modules.
"""

from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.math cimport isfinite, isinf
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memset

cimport numpy as cnp

from engine._dispatch_py import (
    FIELDS_MAX as _FIELDS_MAX, KINDS, bad_shard, check_fallback, check_ranges, check_types,
    row_error, unknown_type,
)

cnp.import_array()

__all__ = ["RowBuffer", "Dispatcher", "KINDS"]

cdef extern from "Python.h":
    # Declared without exception specs: the fast path checks and clears errors itself.
    bint PyLong_CheckExact(PyObject*)
    bint PyFloat_CheckExact(PyObject*)
    bint PyUnicode_CheckExact(PyObject*)
    bint PyBytes_CheckExact(PyObject*)
    long long PyLong_AsLongLongAndOverflow(PyObject*, int*)
    unsigned long long PyLong_AsUnsignedLongLong(PyObject*)
    double PyFloat_AS_DOUBLE(PyObject*)
    const char* _utf8_or_null "PyUnicode_AsUTF8AndSize"(PyObject*, Py_ssize_t*)
    char* PyBytes_AS_STRING(PyObject*)
    Py_ssize_t PyBytes_GET_SIZE(PyObject*)
    Py_ssize_t PyTuple_GET_SIZE(object)
    PyObject* PyTuple_GET_ITEM(object, Py_ssize_t)
    PyObject* PyErr_Occurred()
    void PyErr_Clear()
    void Py_INCREF(PyObject*)
    void Py_DECREF(PyObject*)
    PyObject* Py_True
    PyObject* Py_False
    Py_ssize_t PY_SSIZE_T_MAX
    object PyList_New(Py_ssize_t)
    void PyList_SET_ITEM(object, Py_ssize_t, PyObject*)  # steals the reference

cdef enum:
    FIELDS_MAX = 256  # = the twin's; one row of values lives on the C stack
    CAP_MIN = 16  # rows; first allocation of a (shard, type)

cdef enum Kind:  # the index of the kind's name in KINDS
    K_I8, K_I16, K_I32, K_I64, K_U8, K_U16, K_U32, K_U64, K_F32, K_F64, K_BOOL, K_TS, K_KEY_INT,
    K_STR, K_BYTES, K_KEY_STR

assert FIELDS_MAX == _FIELDS_MAX and len(KINDS) == K_KEY_STR + 1
cdef int[16] ITEMSIZE = [1, 2, 4, 8, 1, 2, 4, 8, 4, 8, 1, 8, 8, 0, 0, 0]  # 0: PyObject*
cdef int[16] TYPENUM = [
    cnp.NPY_INT8, cnp.NPY_INT16, cnp.NPY_INT32, cnp.NPY_INT64, cnp.NPY_UINT8, cnp.NPY_UINT16,
    cnp.NPY_UINT32, cnp.NPY_UINT64, cnp.NPY_FLOAT32, cnp.NPY_FLOAT64, cnp.NPY_BOOL,
    cnp.NPY_INT64, cnp.NPY_INT64, -1, -1, -1,
]

cdef struct Field:
    int kind
    Py_ssize_t itemsize  # bytes per value in its column
    int64_t lo, hi  # inclusive range of int kinds; uint64: the bits of uint64 bounds

cdef struct TypeInfo:
    int tid
    int nf
    int part  # index of the partition field
    int first  # index of its first field in RowBuffer.fields and Shard.data

cdef struct Shard:
    char** data  # per flat field: its column (NULL until the first append)
    Py_ssize_t* rows  # per type: actions buffered; every column of the type has this many
    Py_ssize_t* cap  # per type: rows allocated in each of its columns
    uint16_t* tcol  # type id per buffered action, in order
    Py_ssize_t n  # actions buffered
    Py_ssize_t tcap
    int64_t base  # offset of the first buffered action; take() advances it


# ---- routing (= engine._keys; fixed forever) --------------------------------------------------

cdef inline uint64_t _mix(uint64_t z) noexcept nogil:
    z += 0x9E3779B97F4A7C15ULL
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline uint64_t _fnv1a(const char* p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = 0xCBF29CE484222325ULL
    cdef Py_ssize_t j
    for j in range(n):
        h = (h ^ <uint8_t>p[j]) * 0x100000001B3ULL
    return h


# ---- value checks: 1 = take it (row value in *out), 0 = not here ------------------------------

cdef inline bint _int_value(const Field* f, PyObject* v, uint64_t* out) noexcept:
    """An exact int within [lo, hi]. Never leaves an exception set."""
    cdef int over
    cdef long long x
    cdef unsigned long long u
    if not PyLong_CheckExact(v):
        return False
    x = PyLong_AsLongLongAndOverflow(v, &over)
    if f.kind != K_U64:
        if over or x < f.lo or x > f.hi:
            return False
        out[0] = <uint64_t>x
        return True
    if over > 0:
        u = PyLong_AsUnsignedLongLong(v)
        if PyErr_Occurred() != NULL:
            PyErr_Clear()
            return False
    elif over < 0 or x < 0:
        return False
    else:
        u = <unsigned long long>x
    if u < <uint64_t>f.lo or u > <uint64_t>f.hi:
        return False
    out[0] = u
    return True


cdef inline bint _float_value(int kind, PyObject* v, bint ints, uint64_t* out) noexcept:
    """An exact float (or, if ``ints``, an int64 int) cast as numpy casts it; no overflow."""
    cdef int over
    cdef long long x
    cdef double d
    cdef float s
    if PyFloat_CheckExact(v):
        d = PyFloat_AS_DOUBLE(v)
        if kind == K_F32:
            s = <float>d
            if isinf(s) and isfinite(d):
                return False
            d = s
    elif ints and PyLong_CheckExact(v):
        x = PyLong_AsLongLongAndOverflow(v, &over)
        if over:
            return False
        d = <float>x if kind == K_F32 else <double>x  # int64 -> float32 rounds once, as numpy
    else:
        return False
    memcpy(out, &d, sizeof(double))
    return True


cdef inline bint _str_value(PyObject* v, Py_ssize_t size_max) noexcept:
    """An exact str of at most size_max UTF-8 bytes (caches its UTF-8, as engine._keys does)."""
    cdef Py_ssize_t size
    if not PyUnicode_CheckExact(v):
        return False
    if _utf8_or_null(v, &size) == NULL:  # lone surrogates
        PyErr_Clear()
        return False
    return size <= size_max


cdef inline bint _value(const Field* f, PyObject* v, bint fast, Py_ssize_t size_max,
                        uint64_t* out) noexcept:
    """Pass 1 for one value. ``fast``: the dispatcher (ints for floats too), else add()."""
    cdef int k = f.kind
    if k <= K_U64 or k == K_TS or k == K_KEY_INT:
        return _int_value(f, v, out)
    if k == K_F32 or k == K_F64:
        return _float_value(k, v, fast, out)
    if k == K_BOOL:
        out[0] = v == Py_True
        return v == Py_True or v == Py_False
    if k == K_BYTES:
        return PyBytes_CheckExact(v) and PyBytes_GET_SIZE(v) <= size_max
    return _str_value(v, size_max)


cdef inline void _store(int kind, char* col, Py_ssize_t i, uint64_t v, PyObject* o) noexcept:
    cdef double d
    if kind == K_I64 or kind == K_U64 or kind == K_TS or kind == K_KEY_INT:
        (<uint64_t*>col)[i] = v
    elif kind == K_F64:
        memcpy(&(<double*>col)[i], &v, sizeof(double))
    elif kind == K_F32:
        memcpy(&d, &v, sizeof(double))
        (<float*>col)[i] = <float>d  # exact: d came from a float
    elif kind == K_I8 or kind == K_U8 or kind == K_BOOL:
        (<uint8_t*>col)[i] = <uint8_t>v
    elif kind == K_I16 or kind == K_U16:
        (<uint16_t*>col)[i] = <uint16_t>v
    elif kind == K_I32 or kind == K_U32:
        (<uint32_t*>col)[i] = <uint32_t>v
    else:
        Py_INCREF(o)
        (<PyObject**>col)[i] = o


cdef void _free_column(const Field* f, char* col, Py_ssize_t rows) noexcept:
    cdef Py_ssize_t i
    if f.kind >= K_STR:  # owned references
        for i in range(rows):
            Py_DECREF((<PyObject**>col)[i])
    free(col)


# ---- the buffer -------------------------------------------------------------------------------

cdef class RowBuffer:
    """Per-shard, in-order buffer of single actions of several types (see the twin's doc).

    ``RowBuffer(shards, types, flush_at=8192, on_full=None)``; a type is the tuple
    ``(type_id, field_kinds, partition_index)``.
    """

    cdef readonly int shards
    cdef readonly Py_ssize_t total  # actions buffered over all shards
    cdef readonly Py_ssize_t flush_at  # actions; `full` is set when total reaches it
    cdef readonly int last_shard  # shard of the last action added, -1 before any
    cdef public bint full
    cdef public object on_full  # called with no arguments after an append that leaves it full
    cdef int ntypes, nflat, ntid
    cdef TypeInfo* types
    cdef Field* fields  # every type's fields, flat; ranges are the kinds' (what add() stores)
    cdef int* tindex  # type id -> index in types, or -1; ntid entries
    cdef Shard* sh
    cdef tuple _ids  # type ids in declaration order
    cdef dict _kinds  # type id -> tuple of kind names

    def __cinit__(self, shards, types, flush_at=8192, on_full=None):
        cdef int i, f
        cdef Shard* sh
        s, specs, self.flush_at = check_types(shards, types, flush_at)
        self._ids = tuple(t for t, _, _ in specs)
        self._kinds = {t: k for t, k, _ in specs}
        self.on_full, self.last_shard = on_full, -1
        self.ntypes, self.ntid = len(specs), max(self._ids) + 1
        self.nflat = sum(len(k) for _, k, _ in specs)
        self.types = <TypeInfo*>calloc(self.ntypes, sizeof(TypeInfo))
        self.fields = <Field*>calloc(self.nflat, sizeof(Field))
        self.tindex = <int*>malloc(self.ntid * sizeof(int))
        self.sh = <Shard*>calloc(s, sizeof(Shard))
        if not (self.types and self.fields and self.tindex and self.sh):
            raise MemoryError()
        memset(self.tindex, 0xFF, self.ntid * sizeof(int))  # -1
        first = 0
        for i, (tid, kinds, part) in enumerate(specs):
            self.tindex[tid] = i
            self.types[i] = TypeInfo(tid, len(kinds), part, first)
            for f, lim in enumerate(check_ranges(kinds, [None] * len(kinds))):
                _set_field(&self.fields[first + f], KINDS.index(kinds[f]), lim)
            first += len(kinds)
        for i in range(s):
            sh = &self.sh[i]
            sh.data = <char**>calloc(self.nflat, sizeof(char*))
            sh.rows = <Py_ssize_t*>calloc(self.ntypes, sizeof(Py_ssize_t))
            sh.cap = <Py_ssize_t*>calloc(self.ntypes, sizeof(Py_ssize_t))
            self.shards = i + 1  # __dealloc__ frees shards [0, shards)
            if not (sh.data and sh.rows and sh.cap):
                raise MemoryError()

    def __dealloc__(self):
        cdef int i, t, f
        cdef Shard* sh
        if self.sh != NULL:
            for i in range(self.shards):
                sh = &self.sh[i]
                for t in range(self.ntypes):
                    for f in range(self.types[t].first, self.types[t].first + self.types[t].nf):
                        if sh.data != NULL and sh.data[f] != NULL:
                            _free_column(&self.fields[f], sh.data[f], sh.rows[t])
                free(sh.data); free(sh.rows); free(sh.cap); free(sh.tcol)
        free(self.sh); free(self.types); free(self.fields); free(self.tindex)

    cdef Py_ssize_t _type_index(self, object type_id) except -1:
        if type(type_id) is int and 0 <= type_id < self.ntid and self.tindex[<int>type_id] >= 0:
            return self.tindex[<int>type_id]
        raise unknown_type(type_id, self._ids)

    cdef Shard* _shard(self, Py_ssize_t shard) except NULL:
        if not 0 <= shard < self.shards:
            raise bad_shard(shard, self.shards)
        return &self.sh[shard]

    cdef int _route(self, const TypeInfo* t, const uint64_t* vals, tuple objs) except -1:
        cdef PyObject* o
        cdef const char* p
        cdef Py_ssize_t size
        if self.shards == 1:
            return 0
        if self.fields[t.first + t.part].kind < K_STR:
            return <int>(_mix(vals[t.part]) % <uint64_t>self.shards)
        o = PyTuple_GET_ITEM(objs, t.part)
        if PyBytes_CheckExact(o):
            p, size = PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o)
        else:
            p = PyUnicode_AsUTF8AndSize(<object>o, &size)
        return <int>(_mix(_fnv1a(p, size)) % <uint64_t>self.shards)

    cdef int _reserve(self, Shard* sh, const TypeInfo* t, Py_ssize_t ti) except -1:
        """Room for one more action of type ti; on failure the buffer is as it was."""
        cdef Py_ssize_t cap, f
        cdef void* p
        if sh.n == sh.tcap:
            cap = 2 * sh.tcap if sh.tcap else CAP_MIN
            p = realloc(sh.tcol, cap * sizeof(uint16_t))
            if p == NULL:
                raise MemoryError()
            sh.tcol, sh.tcap = <uint16_t*>p, cap
        if sh.rows[ti] == sh.cap[ti]:
            cap = 2 * sh.cap[ti] if sh.cap[ti] else CAP_MIN
            for f in range(t.first, t.first + t.nf):
                p = realloc(sh.data[f], cap * self.fields[f].itemsize)
                if p == NULL:
                    raise MemoryError()
                sh.data[f] = <char*>p
            sh.cap[ti] = cap
        return 0

    cdef object _append(self, Py_ssize_t ti, const uint64_t* vals, tuple objs, bint as_offset):
        """Store a row in stored form (``objs`` holds its objects); (shard, index) or offset."""
        cdef const TypeInfo* t = &self.types[ti]
        cdef int s = self._route(t, vals, objs)
        cdef Shard* sh = &self.sh[s]
        cdef Py_ssize_t f, row, index
        cdef int64_t offset
        self._reserve(sh, t, ti)
        row = sh.rows[ti]
        for f in range(t.nf):  # no Python code from here to the commit
            _store(self.fields[t.first + f].kind, sh.data[t.first + f], row, vals[f],
                   PyTuple_GET_ITEM(objs, f))
        sh.rows[ti] = row + 1
        index = sh.n
        sh.tcol[index] = <uint16_t>t.tid
        sh.n = index + 1
        self.total += 1
        self.last_shard = s
        offset = sh.base + index
        if self.total >= self.flush_at:
            self.full = True
            if self.on_full is not None:
                self.on_full()
        if as_offset:
            return offset
        return s, index

    cdef object _add_valid(self, Py_ssize_t ti, object row, bint as_offset):
        cdef uint64_t vals[FIELDS_MAX]
        cdef const TypeInfo* t = &self.types[ti]
        cdef int i
        if type(row) is not tuple:
            raise TypeError(f"add(): a row is the tuple ActionType.validate_one returns, not "
                            f"{type(row).__name__}")
        if PyTuple_GET_SIZE(row) != t.nf:
            raise ValueError(f"add(): type {t.tid} has {t.nf} fields but the row has {len(row)} "
                             "values")
        for i in range(t.nf):
            if not _value(&self.fields[t.first + i], PyTuple_GET_ITEM(row, i), False,
                          PY_SSIZE_T_MAX, &vals[i]):
                raise row_error(i, t.tid, KINDS[self.fields[t.first + i].kind], row[i])
        return self._append(ti, vals, row, as_offset)

    def add(self, type_id, row):
        """Buffer a row as validate_one returns it; returns (shard, index in the shard)."""
        return self._add_valid(self._type_index(type_id), row, False)

    def add_offset(self, type_id, row):
        """``add``, returning base[shard] + index; ``last_shard`` tells the shard."""
        return self._add_valid(self._type_index(type_id), row, True)

    def shard_of_last(self):
        return self.last_shard

    def dispatcher(self, type_id, ranges, fallback, *, string_bytes_max=1 << 20):
        """The fast path for one type: ``d(*values)`` -> offset (see the twin's module doc)."""
        cdef Py_ssize_t ti = self._type_index(type_id)
        cdef const TypeInfo* t = &self.types[ti]
        cdef Dispatcher d = Dispatcher.__new__(Dispatcher)
        cdef int f
        lims = check_ranges(self._kinds[type_id], ranges)
        d.string_bytes_max = check_fallback(fallback, string_bytes_max)
        d.buf, d.ti, d.nf, d.type_id, d.fallback = self, ti, t.nf, t.tid, fallback
        d.fields = <Field*>malloc(t.nf * sizeof(Field))
        if d.fields == NULL:
            raise MemoryError()
        for f in range(t.nf):
            _set_field(&d.fields[f], self.fields[t.first + f].kind, lims[f])
        return d

    def count(self, Py_ssize_t shard):
        """Actions buffered for ``shard``."""
        return self._shard(shard).n

    def set_base(self, Py_ssize_t shard, int64_t offset):
        """The offset of the shard's first buffered action (next after a take())."""
        self._shard(shard).base = offset

    def take(self, Py_ssize_t shard):
        """(uint16 type column or None if one type, {type id: columns}); see the twin."""
        cdef Shard* sh = self._shard(shard)
        cdef Py_ssize_t n = sh.n, t, f, i, rows
        cdef char** data
        cdef Py_ssize_t* nrows
        cdef uint16_t* tcol
        cdef cnp.npy_intp dims
        if n == 0:
            return None, {}
        data = <char**>malloc(self.nflat * sizeof(char*))
        nrows = <Py_ssize_t*>malloc(self.ntypes * sizeof(Py_ssize_t))
        if data == NULL or nrows == NULL:
            free(data); free(nrows)
            raise MemoryError()
        # Detach in pure C: no Python code may run until the shard is consistent again.
        memcpy(data, sh.data, self.nflat * sizeof(char*))
        memcpy(nrows, sh.rows, self.ntypes * sizeof(Py_ssize_t))
        memset(sh.data, 0, self.nflat * sizeof(char*))
        memset(sh.rows, 0, self.ntypes * sizeof(Py_ssize_t))
        memset(sh.cap, 0, self.ntypes * sizeof(Py_ssize_t))
        tcol, sh.tcol, sh.n, sh.tcap = sh.tcol, NULL, 0, 0
        sh.base += n
        self.total -= n
        self.full = self.full and self.total >= self.flush_at
        out = {}
        try:
            for t in range(self.ntypes):
                rows = nrows[t]
                if rows == 0:
                    continue
                cols = []
                for f in range(self.types[t].first, self.types[t].first + self.types[t].nf):
                    if self.fields[f].kind >= K_STR:
                        col = PyList_New(rows)
                        for i in range(rows):  # the list takes over the column's references
                            PyList_SET_ITEM(col, i, (<PyObject**>data[f])[i])
                        free(data[f])
                        data[f] = NULL  # its references now belong to the list
                    else:
                        dims = rows
                        col = cnp.PyArray_EMPTY(1, &dims, TYPENUM[self.fields[f].kind], 0)
                        memcpy(cnp.PyArray_DATA(col), data[f], rows * self.fields[f].itemsize)
                    cols.append(col)
                out[self.types[t].tid] = cols
            types_col = None
            if len(out) > 1:
                dims = n
                types_col = cnp.PyArray_EMPTY(1, &dims, cnp.NPY_UINT16, 0)
                memcpy(cnp.PyArray_DATA(types_col), tcol, n * sizeof(uint16_t))
        finally:
            for t in range(self.ntypes):
                for f in range(self.types[t].first, self.types[t].first + self.types[t].nf):
                    if data[f] != NULL:
                        _free_column(&self.fields[f], data[f], nrows[t])
            free(data); free(nrows); free(tcol)
        return types_col, out

    def __repr__(self):
        return f"RowBuffer(shards={self.shards}, types={list(self._ids)}, total={self.total})"


cdef void _set_field(Field* f, int kind, object lim):
    f.kind = kind
    f.itemsize = ITEMSIZE[kind] if ITEMSIZE[kind] else sizeof(PyObject*)
    if lim is None:
        f.lo, f.hi = 0, 0
    elif kind == K_U64:
        f.lo, f.hi = <int64_t><uint64_t>lim[0], <int64_t><uint64_t>lim[1]
    else:
        f.lo, f.hi = lim[0], lim[1]


cdef class Dispatcher:
    """``d(*values)`` -> offset of one action of one type, values in field order."""

    cdef RowBuffer buf
    cdef Py_ssize_t ti
    cdef int nf
    cdef Field* fields  # this dispatcher's ranges
    cdef object fallback
    cdef Py_ssize_t string_bytes_max
    cdef readonly int type_id

    def __init__(self):
        raise TypeError("create a Dispatcher with RowBuffer.dispatcher()")

    def __dealloc__(self):
        free(self.fields)

    cdef bint _check(self, tuple args, uint64_t* vals) noexcept:
        cdef int i
        for i in range(self.nf):
            if not _value(&self.fields[i], PyTuple_GET_ITEM(args, i), True,
                          self.string_bytes_max, &vals[i]):
                return False
        return True

    def __call__(self, *args):
        cdef uint64_t vals[FIELDS_MAX]
        if PyTuple_GET_SIZE(args) == self.nf and self._check(args, vals):
            return self.buf._append(self.ti, vals, args, True)
        return self.buf._add_valid(self.ti, self.fallback(*args), True)
