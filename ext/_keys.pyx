"""Int64 key interning and stable shard routing; the reference twin is engine/_keys_py.py.

Design. ``Int64Interner`` keeps ``key_at`` (keys in id order: the truth for ids, ``keys()``,
``key_of``) and ``slots``: open addressing, linear probing, power-of-two size, load <= 0.5,
(key, id + 1) pairs with ``ref == 0`` for empty, so calloc'd memory is an empty table. Probes
start at splitmix64(key ^ seed); the seed is random per interner so crafted keys cannot pile
into one probe run, and it changes the layout only, never an id. Bulk loops prefetch the
slot of the key PREFETCH_AHEAD positions on: on a big table the cache misses dominate.
``extend`` is atomic: it reserves room first (nothing resizes while it inserts) and on a
duplicate removes its own inserts newest first; with linear probing and no deletions in
between, each removal restores the table exactly as it was before that insert.
Threads: bulk loops run without the GIL. Such a call sets ``busy`` and holds ``lock``, and
every other call waits for it, so concurrent use is safe and serialised, like a dict.
Routing (``splitmix64``, ``hash_bytes``, ``shard_of_*``) is a pure function of the key's bytes
and must never change: a change moves keys to other shards. Tests pin golden values.
Input checks of array arguments are imported from the twin, so both reject bad input alike.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_GET_SIZE
from cpython.long cimport PyLong_Check
from cpython.number cimport PyNumber_Index
from cpython.pythread cimport WAIT_LOCK, PyThread_acquire_lock, PyThread_release_lock
from cpython.pythread cimport PyThread_allocate_lock, PyThread_free_lock, PyThread_type_lock
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_Check
from libc.stdint cimport INT32_MAX, int32_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcpy

import operator
import os

import numpy as np

from engine._keys_py import _arrow_layout, _byte_view, _int64_vector

__all__ = ["Int64Interner", "splitmix64", "hash_bytes",
           "shard_of_ints", "shard_of_int", "shard_of_strs", "shard_of_str"]

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define ENGINE_PREFETCH(p) __builtin_prefetch((p))
    #else
    #define ENGINE_PREFETCH(p) ((void)(p))
    #endif
    """
    void ENGINE_PREFETCH(const void* p) noexcept nogil

cdef int64_t CAPACITY_MAX = 1 << 40  # keys; a larger pre-size is a typo, not a plan
cdef Py_ssize_t PREFETCH_AHEAD = 16  # keys; 8 was measurably slower on 1M keys, 32 no faster

cdef struct Slot:
    int64_t key
    int64_t ref   # id + 1; 0 marks an empty slot


# ---- routing: fixed forever -----------------------------------------------------------------

cdef inline uint64_t _mix(uint64_t z) noexcept nogil:
    """splitmix64: golden-ratio step, then two xor-shift-multiply rounds."""
    z += 0x9E3779B97F4A7C15ULL
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline uint64_t _fnv1a(const uint8_t* base, Py_ssize_t start, Py_ssize_t end) noexcept nogil:
    """FNV-1a 64 of base[start:end]."""
    cdef uint64_t h = 0xCBF29CE484222325ULL
    cdef Py_ssize_t j
    for j in range(start, end):
        h = (h ^ base[j]) * 0x100000001B3ULL
    return h


cdef inline int64_t _int64(object x) except? -1:   # mirrors _keys_py._int64
    """An int64 argument. Unlike Cython's own conversion, a float is a TypeError (not
    truncated); an int outside int64 is an OverflowError."""
    return x if PyLong_Check(x) else PyNumber_Index(x)


cdef uint64_t _check_shards(object shards_obj) except 0:
    cdef int64_t shards = _int64(shards_obj)
    if shards < 1 or shards > INT32_MAX:
        raise ValueError(f"shards must be between 1 and {INT32_MAX}, got {shards}")
    return <uint64_t>shards


cdef const char* _key_bytes(object key, Py_ssize_t* size, Py_ssize_t i) except NULL:
    """UTF-8 bytes of a str (cached by CPython, no copy) or the bytes themselves."""
    if PyUnicode_Check(key):
        return PyUnicode_AsUTF8AndSize(key, size)
    if PyBytes_Check(key):
        size[0] = PyBytes_GET_SIZE(key)
        return PyBytes_AS_STRING(key)
    name = "key" if i < 0 else f"values[{i}]"
    raise TypeError(f"{name} must be str or bytes, got {type(key).__name__}")


cdef _hash_ints(values, uint64_t shards):
    """splitmix64 of each value as uint64 (shards == 0), or modulo shards as int32."""
    cdef const int64_t[:] v = _int64_vector(values, "values")
    out = np.empty(v.shape[0], dtype=np.uint64 if shards == 0 else np.int32)
    cdef uint64_t[::1] raw
    cdef int32_t[::1] o
    cdef Py_ssize_t i
    if shards == 0:
        raw = out
        with nogil:
            for i in range(v.shape[0]):
                raw[i] = _mix(<uint64_t>v[i])
    else:
        o = out
        with nogil:
            for i in range(v.shape[0]):
                o[i] = <int32_t>(_mix(<uint64_t>v[i]) % shards)
    return out


def splitmix64(values):
    """splitmix64 of each int64 (its two's-complement bits as uint64) -> uint64 array."""
    return _hash_ints(values, 0)


def shard_of_ints(values, shards):
    """``splitmix64(values) % shards`` as int32 shard numbers."""
    return _hash_ints(values, _check_shards(shards))


def shard_of_int(key, shards):
    """Shard of one int64 key; equals ``shard_of_ints([key], shards)[0]``."""
    cdef int64_t k = _int64(key)
    return <int32_t>(_mix(<uint64_t>k) % _check_shards(shards))


def hash_bytes(data):
    """splitmix64 of the FNV-1a 64 hash of ``data`` (bytes-like) -> int in [0, 2**64)."""
    cdef const uint8_t[::1] b
    if PyBytes_Check(data):
        return _mix(_fnv1a(<const uint8_t*>PyBytes_AS_STRING(data), 0, PyBytes_GET_SIZE(data)))
    b = _byte_view(data, "data")
    return _mix(_fnv1a(&b[0] if b.shape[0] else NULL, 0, b.shape[0]))


def shard_of_str(key, shards):
    """Shard of one str (hashed as UTF-8) or bytes key."""
    cdef uint64_t s = _check_shards(shards)
    cdef Py_ssize_t size
    cdef const char* p = _key_bytes(key, &size, -1)
    return <int32_t>(_mix(_fnv1a(<const uint8_t*>p, 0, size)) % s)


def shard_of_strs(values, shards):
    """Shards of many str/bytes keys -> int32 array.

    ``values`` is an iterable of str (hashed as UTF-8) or bytes, or a pair ``(offsets, data)``
    in Arrow layout: int32 offsets of n + 1 entries into a byte buffer. The same strings give
    the same shards whatever the form.
    """
    cdef uint64_t s = _check_shards(shards)
    if (isinstance(values, tuple) and len(values) == 2
            and not isinstance(values[0], (str, bytes))):
        off, buf = _arrow_layout(values[0], values[1])
        return _shard_of_arrow(off, buf, s)
    if isinstance(values, (str, bytes)):
        raise TypeError("values must be a sequence of keys; for one key use shard_of_str()")
    cdef list seq = values if type(values) is list else list(values)
    out = np.empty(len(seq), dtype=np.int32)
    cdef int32_t[::1] o = out
    cdef Py_ssize_t i, size
    cdef const char* p
    for i in range(len(seq)):
        p = _key_bytes(seq[i], &size, i)
        o[i] = <int32_t>(_mix(_fnv1a(<const uint8_t*>p, 0, size)) % s)
    return out


cdef _shard_of_arrow(const int32_t[:] off, const uint8_t[::1] buf, uint64_t s):
    """Offsets already checked by _arrow_layout: non-negative, non-decreasing, in bounds."""
    out = np.empty(off.shape[0] - 1, dtype=np.int32)
    cdef int32_t[::1] o = out
    cdef const uint8_t* base = &buf[0] if buf.shape[0] else NULL  # never read when empty
    cdef Py_ssize_t i
    with nogil:
        for i in range(off.shape[0] - 1):
            o[i] = <int32_t>(_mix(_fnv1a(base, off[i], off[i + 1])) % s)
    return out


# ---- the interner ---------------------------------------------------------------------------

@cython.final
cdef class Int64Interner:
    """Dense ids 0, 1, 2, ... for int64 keys, in first-appearance order.

    ``capacity`` is the number of keys held before the first resize. ``seed`` (random when
    None) only changes the hash table's layout, never an id.
    """

    cdef Slot* slots            # mask + 1 slots, a power of two; at most half are full
    cdef uint64_t mask
    cdef uint64_t seed          # xor-ed into each key before mixing
    cdef int64_t* key_at        # key_at[id] = key for id < n
    cdef Py_ssize_t n           # keys interned; shrinks only when extend undoes its own keys
    cdef Py_ssize_t keys_max    # entries allocated in key_at
    cdef bint busy              # a call runs without the GIL; other calls wait on lock
    cdef PyThread_type_lock lock

    def __cinit__(self, capacity=1024, *, seed=None):
        cdef int64_t keys = _int64(capacity)
        cdef uint64_t size = 16
        if keys < 0 or keys > CAPACITY_MAX:
            raise ValueError(f"capacity must be between 0 and {CAPACITY_MAX} keys, got {keys}")
        seed = int.from_bytes(os.urandom(8), "little") if seed is None else operator.index(seed)
        self.seed = <uint64_t>(seed & 0xFFFFFFFFFFFFFFFF)
        while size < 2 * <uint64_t>keys:
            size *= 2
        self.slots, self.mask = <Slot*>calloc(size, sizeof(Slot)), size - 1
        self.keys_max = max(keys, 8)
        self.key_at = <int64_t*>realloc(NULL, self.keys_max * sizeof(int64_t))
        self.lock = PyThread_allocate_lock()
        if self.slots == NULL or self.key_at == NULL or self.lock == NULL:
            raise MemoryError(f"Int64Interner: cannot allocate room for {keys} keys")

    def __dealloc__(self):
        free(self.slots)
        free(self.key_at)
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    # -- nogil core: no Python objects, no exceptions ---------------------------------------

    cdef inline Py_ssize_t _find(self, int64_t key) noexcept nogil:
        """The slot holding key, or the empty slot where it would go."""
        cdef uint64_t i = _mix(<uint64_t>key ^ self.seed) & self.mask
        while self.slots[i].ref != 0 and self.slots[i].key != key:
            i = (i + 1) & self.mask
        return <Py_ssize_t>i

    cdef inline void _prefetch(self, int64_t key) noexcept nogil:
        """Start loading key's first slot into cache (a hint; it may be a stale table)."""
        ENGINE_PREFETCH(&self.slots[_mix(<uint64_t>key ^ self.seed) & self.mask])

    cdef int _reserve(self, Py_ssize_t keys_needed) noexcept nogil:
        """Room for keys_needed keys at load <= 0.5: 0, or -1 when out of memory."""
        cdef Py_ssize_t m, id, i
        cdef uint64_t size = self.mask + 1
        cdef int64_t* grown
        cdef Slot* table
        if keys_needed > self.keys_max:
            m = max(keys_needed, 2 * self.keys_max)
            grown = <int64_t*>realloc(self.key_at, m * sizeof(int64_t))
            if grown == NULL:
                return -1
            self.key_at, self.keys_max = grown, m
        if 2 * <uint64_t>keys_needed <= size:
            return 0
        while 2 * <uint64_t>keys_needed > size:
            size *= 2
        table = <Slot*>calloc(size, sizeof(Slot))
        if table == NULL:
            return -1
        free(self.slots)
        self.slots, self.mask = table, size - 1
        for id in range(self.n):
            i = self._find(self.key_at[id])
            self.slots[i].key, self.slots[i].ref = self.key_at[id], id + 1
        return 0

    cdef inline int64_t _intern_key(self, int64_t key) noexcept nogil:
        """The id of key, added if unseen; -1 when out of memory (nothing changed)."""
        cdef Py_ssize_t i = self._find(key)
        if self.slots[i].ref != 0:
            return self.slots[i].ref - 1
        if self.n >= self.keys_max or 2 * <uint64_t>(self.n + 1) > self.mask + 1:
            if self._reserve(self.n + 1) < 0:
                return -1
            i = self._find(key)
        self.slots[i].key, self.slots[i].ref = key, self.n + 1
        self.key_at[self.n] = key
        self.n += 1
        return self.n - 1

    cdef Py_ssize_t _extend(self, const int64_t[:] v, int64_t* dup_id) noexcept nogil:
        """Append v's keys: -1 done, -2 out of memory, else the position of the first
        duplicate (its id in dup_id), after undoing every key this call added."""
        cdef Py_ssize_t i, s, n0 = self.n
        if self._reserve(n0 + v.shape[0]) < 0:
            return -2
        for i in range(v.shape[0]):
            if i + PREFETCH_AHEAD < v.shape[0]:  # reopening a log extends by every key: 10M keys 630 -> 490 ms
                self._prefetch(v[i + PREFETCH_AHEAD])
            s = self._find(v[i])
            if self.slots[s].ref != 0:
                dup_id[0] = self.slots[s].ref - 1
                while self.n > n0:   # newest first: each step restores the earlier table
                    self.n -= 1
                    self.slots[self._find(self.key_at[self.n])].ref = 0
                return i
            self.slots[s].key, self.slots[s].ref = v[i], self.n + 1
            self.key_at[self.n] = v[i]
            self.n += 1
        return -1

    # -- thread guard (under the GIL) ---------------------------------------------------------

    cdef inline void _idle(self):
        """Return once no call on this interner runs without the GIL."""
        while self.busy:
            with nogil:
                PyThread_acquire_lock(self.lock, WAIT_LOCK)
                PyThread_release_lock(self.lock)

    cdef inline void _enter(self):
        """Claim the interner before releasing the GIL."""
        self._idle()
        self.busy = True
        PyThread_acquire_lock(self.lock, WAIT_LOCK)  # held at most an instant by a waiter

    cdef inline void _leave(self):
        self.busy = False
        PyThread_release_lock(self.lock)

    # -- Python API ---------------------------------------------------------------------------

    def intern(self, values):
        """Ids of ``values`` (1-D int64); unseen keys get new ids in order of appearance."""
        cdef const int64_t[:] v = _int64_vector(values, "values")
        out = np.empty(v.shape[0], dtype=np.int64)
        cdef int64_t[::1] ids = out
        cdef Py_ssize_t i
        cdef bint failed = False
        self._enter()
        with nogil:
            for i in range(v.shape[0]):
                if i + PREFETCH_AHEAD < v.shape[0]:
                    self._prefetch(v[i + PREFETCH_AHEAD])
                ids[i] = self._intern_key(v[i])
                if ids[i] < 0:   # out of memory; the keys before i stay interned
                    failed = True
                    break
        self._leave()
        if failed:
            raise MemoryError(f"Int64Interner: out of memory growing past {self.n} keys")
        return out

    def lookup(self, values):
        """Ids of ``values`` (1-D int64), -1 where unseen; never adds a key."""
        cdef const int64_t[:] v = _int64_vector(values, "values")
        out = np.empty(v.shape[0], dtype=np.int64)
        cdef int64_t[::1] ids = out
        cdef Py_ssize_t i
        self._enter()
        with nogil:
            for i in range(v.shape[0]):
                if i + PREFETCH_AHEAD < v.shape[0]:
                    self._prefetch(v[i + PREFETCH_AHEAD])
                ids[i] = self.slots[self._find(v[i])].ref - 1   # empty slot: -1
        self._leave()
        return out

    def intern_one(self, key):
        """The id of one key, added if unseen."""
        cdef int64_t k = _int64(key)
        self._idle()
        cdef int64_t id = self._intern_key(k)
        if id < 0:
            raise MemoryError(f"Int64Interner: out of memory growing past {self.n} keys")
        return id

    def get(self, key, default=-1):
        """The id of one key, or ``default`` if unseen."""
        cdef int64_t k = _int64(key), d = _int64(default)
        self._idle()
        cdef int64_t ref = self.slots[self._find(k)].ref
        return ref - 1 if ref != 0 else d

    def extend(self, keys):
        """Append ``keys`` (new and distinct) with the next ids; on a duplicate raise
        ValueError naming it and add nothing."""
        cdef const int64_t[:] v = _int64_vector(keys, "keys")
        cdef Py_ssize_t n0 = self.n, bad
        cdef int64_t dup_id = -1
        self._enter()
        with nogil:
            bad = self._extend(v, &dup_id)
        self._leave()
        if bad == -2:
            raise MemoryError(f"Int64Interner: out of memory growing to {n0 + v.shape[0]} keys")
        if bad >= 0:
            why = (f"is already interned (id {dup_id})" if dup_id < n0
                   else f"repeats position {dup_id - n0}")
            raise ValueError(f"extend(): key {v[bad]} at position {bad} {why}; nothing was added")

    def keys(self):
        """A copy of the keys in id order (int64)."""
        self._idle()
        out = np.empty(self.n, dtype=np.int64)
        cdef int64_t[::1] o = out
        if self.n:
            memcpy(&o[0], self.key_at, self.n * sizeof(int64_t))
        return out

    def key_of(self, ids):
        """The keys of ``ids`` (1-D int64); IndexError if any id is not in [0, len)."""
        cdef const int64_t[:] v = _int64_vector(ids, "ids")
        out = np.empty(v.shape[0], dtype=np.int64)
        cdef int64_t[::1] o = out
        cdef Py_ssize_t i, bad = -1
        self._enter()
        with nogil:
            for i in range(v.shape[0]):
                if v[i] < 0 or v[i] >= self.n:
                    bad = i
                    break
                o[i] = self.key_at[v[i]]
        self._leave()
        if bad >= 0:
            raise IndexError(f"ids[{bad}] = {v[bad]} is out of range for {self.n} keys")
        return out

    def __len__(self):
        self._idle()
        return self.n

    def __contains__(self, key):
        cdef int64_t k
        try:
            k = _int64(key)   # TypeError for non-integers
        except OverflowError:
            return False      # no key lies outside int64
        self._idle()
        return self.slots[self._find(k)].ref != 0

    def __repr__(self):
        return f"Int64Interner(<{len(self)} keys>)"

    def __reduce__(self):   # pickle: the keys in id order; the seed is not kept
        return Int64Interner, (len(self),), self.keys()

    def __setstate__(self, keys):
        self.extend(keys)
