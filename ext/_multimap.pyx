"""MultiMap: key id -> growing list of int64 values; the twin is engine/_multimap_py.py.

Design. Values live in one growing int64 ``pool`` as per-key chains of blocks: a block at
offset b is ``pool[b] = next block (0: none)``, ``pool[b + 1] = capacity``, then its values.
A key's next block holds as many values as the key already has (at least BLOCK_MIN, at most
BLOCK_MAX), so appends are O(1) amortised, a key of n values has O(log n + n / BLOCK_MAX)
blocks, ``get`` is O(n) memcpy's, and at most half of a key's pool space is unused.
``from_pairs`` (reload, unpickle) lays each key out as one exact block instead. Offset 0
is never a block, so a calloc'd chain table is all "no block". ``log`` keeps each pair's key in
global insertion order; ``pairs()`` replays it with one cursor per key. Distinctness is a
hand-written open-addressing set of (key + 1, value) pairs (0 marks an empty slot, so calloc'd
memory is an empty set), linear probing, load <= 0.5, probes starting at splitmix64 of the
pair mixed with a per-map random seed. The set is built on the first ``distinct=True`` add
(from the pairs so far) and kept from then on, so maps that never ask for distinctness never
pay for it.
Threads: bulk loops run without the GIL. Such a call sets ``busy`` and holds ``lock``; every
other call waits for it, so concurrent use is safe and serialised, like a dict.
Input checks are imported from the twin, so both reject bad input alike.
"""

cimport cython
cimport numpy as cnp
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.pythread cimport WAIT_LOCK, PyThread_acquire_lock, PyThread_release_lock
from cpython.pythread cimport PyThread_allocate_lock, PyThread_free_lock, PyThread_type_lock
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcpy

import os

import numpy as np

from engine._multimap_py import KEY_MAX, _int64_column, _key_arg, _nkeys_arg, _pairs_args
from engine._multimap_py import _limit_arg, _seed_arg

__all__ = ["MultiMap", "KEY_MAX"]

cnp.import_array()

cdef int64_t BLOCK_MIN = 2       # values in a key's first block
cdef int64_t BLOCK_MAX = 4096    # values; later blocks stop doubling here (32 KiB)
cdef int64_t HEADER = 2          # int64 words before a block's values: next, capacity
cdef Py_ssize_t PREFETCH_AHEAD = 16  # rows; chains, tail blocks and set slots of a big map
                                     # are cache misses: fetch them this many rows early

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define ENGINE_PREFETCH(p) __builtin_prefetch((p))
    #else
    #define ENGINE_PREFETCH(p) ((void)(p))
    #endif
    """
    void ENGINE_PREFETCH(const void* p) noexcept nogil

cdef struct Chain:
    int64_t head     # pool offset of the first block; 0: no values
    int64_t tail     # pool offset of the last block
    int64_t length   # values
    int64_t used     # values in the tail block

cdef struct Pair:
    int64_t key1     # key + 1; 0 marks an empty slot
    int64_t value


cdef inline cnp.ndarray _empty(Py_ssize_t n):
    cdef cnp.npy_intp dims = n
    return cnp.PyArray_EMPTY(1, &dims, cnp.NPY_INT64, 0)


cdef inline int64_t* _data(cnp.ndarray a) noexcept:
    return <int64_t*>cnp.PyArray_DATA(a)


cdef inline uint64_t _mix(uint64_t z) noexcept nogil:
    """splitmix64 finaliser."""
    z += 0x9E3779B97F4A7C15ULL
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


@cython.final
cdef class MultiMap:
    """key id -> list of int64 values, in insertion order.

    ``seed`` only changes the hash table's layout (random when None), never a result.
    """

    cdef Chain* chains        # chains[k] for k < keys_max; calloc'd: all empty
    cdef int64_t keys_max
    cdef int64_t* pool        # blocks; pool[0:HEADER] is never a block
    cdef int64_t pool_used    # words
    cdef int64_t pool_max
    cdef int64_t* log         # the key of every pair, in insertion order
    cdef int64_t n            # pairs
    cdef int64_t log_max
    cdef int64_t nkeys        # keys with at least one value
    cdef Pair* slots          # NULL until the first distinct add
    cdef uint64_t mask        # slots - 1
    cdef int64_t set_n        # distinct pairs in the set
    cdef uint64_t seed
    cdef bint busy            # a call runs without the GIL; other calls wait on lock
    cdef PyThread_type_lock lock

    def __cinit__(self, *, seed=None):
        seed = _seed_arg(seed)
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self.seed = <uint64_t>(seed & 0xFFFFFFFFFFFFFFFF)
        self.pool_used = self.pool_max = HEADER
        self.pool = <int64_t*>calloc(HEADER, sizeof(int64_t))
        self.lock = PyThread_allocate_lock()
        if self.pool == NULL or self.lock == NULL:
            raise MemoryError("MultiMap: cannot allocate")

    def __dealloc__(self):
        free(self.chains)
        free(self.pool)
        free(self.log)
        free(self.slots)
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    # -- nogil core: no Python objects, no exceptions; -1 means out of memory ----------------

    cdef int _grow_keys(self, int64_t keys_needed) noexcept nogil:
        cdef int64_t m
        cdef Chain* grown
        if keys_needed <= self.keys_max:
            return 0
        m = max(keys_needed, 2 * self.keys_max, 64)
        grown = <Chain*>calloc(m, sizeof(Chain))   # big: fresh zero pages, touched lazily
        if grown == NULL:
            return -1
        if self.keys_max:
            memcpy(grown, self.chains, self.keys_max * sizeof(Chain))
        free(self.chains)
        self.chains, self.keys_max = grown, m
        return 0

    cdef int _grow_log(self, int64_t pairs_needed) noexcept nogil:
        cdef int64_t m
        cdef int64_t* grown
        if pairs_needed <= self.log_max:
            return 0
        m = max(pairs_needed, 2 * self.log_max, 64)
        grown = <int64_t*>realloc(self.log, m * sizeof(int64_t))
        if grown == NULL:
            return -1
        self.log, self.log_max = grown, m
        return 0

    cdef inline uint64_t _slot_of(self, int64_t key, int64_t value) noexcept nogil:
        return _mix(_mix(<uint64_t>key ^ self.seed) ^ <uint64_t>value) & self.mask

    cdef inline uint64_t _find(self, int64_t key, int64_t value) noexcept nogil:
        """The slot holding (key, value), or the empty slot where it would go."""
        cdef uint64_t i = self._slot_of(key, value)
        while self.slots[i].key1 != 0 and (self.slots[i].key1 != key + 1
                                           or self.slots[i].value != value):
            i = (i + 1) & self.mask
        return i

    cdef int _reserve_set(self, int64_t pairs_needed) noexcept nogil:
        """Room for pairs_needed distinct pairs at load <= 0.5 (creates the set if absent)."""
        cdef uint64_t size = 16 if self.slots == NULL else self.mask + 1
        cdef uint64_t j, i
        cdef Pair* old = self.slots
        cdef uint64_t old_size = size if old != NULL else 0
        if old != NULL and 2 * <uint64_t>pairs_needed <= size:
            return 0
        while 2 * <uint64_t>pairs_needed > size:
            size *= 2
        self.slots = <Pair*>calloc(size, sizeof(Pair))
        if self.slots == NULL:
            self.slots = old
            return -1
        self.mask = size - 1
        for j in range(old_size):
            if old[j].key1 != 0:
                i = self._find(old[j].key1 - 1, old[j].value)
                self.slots[i] = old[j]
        free(old)
        return 0

    cdef int _build_set(self) noexcept nogil:
        """The set of every pair so far (the map may hold duplicates from distinct=False)."""
        cdef int64_t k, b, j, count
        cdef uint64_t s
        if self._reserve_set(self.n) < 0:
            return -1
        for k in range(self.keys_max):
            b = self.chains[k].head
            while b != 0:
                count = self.pool[b + 1] if b != self.chains[k].tail else self.chains[k].used
                for j in range(count):
                    s = self._find(k, self.pool[b + HEADER + j])
                    if self.slots[s].key1 == 0:
                        self.slots[s].key1, self.slots[s].value = k + 1, self.pool[b + HEADER + j]
                        self.set_n += 1
                b = self.pool[b]
        return 0

    cdef int _append(self, int64_t key, int64_t value) noexcept nogil:
        """Append value to key's chain (key < keys_max); -1 if out of memory (no change)."""
        cdef Chain* c = &self.chains[key]
        cdef int64_t cap, b, m
        cdef int64_t* grown
        if c.head == 0 or c.used == self.pool[c.tail + 1]:
            cap = min(max(c.length, BLOCK_MIN), BLOCK_MAX)
            if self.pool_used + HEADER + cap > self.pool_max:
                m = max(self.pool_used + HEADER + cap, 2 * self.pool_max)
                grown = <int64_t*>realloc(self.pool, m * sizeof(int64_t))
                if grown == NULL:
                    return -1
                self.pool, self.pool_max = grown, m
            b = self.pool_used
            self.pool_used += HEADER + cap
            self.pool[b], self.pool[b + 1] = 0, cap
            if c.head == 0:
                c.head = b
                self.nkeys += 1
            else:
                self.pool[c.tail] = b
            c.tail, c.used = b, 0
        self.pool[c.tail + HEADER + c.used] = value
        c.used += 1
        c.length += 1
        return 0

    cdef Py_ssize_t _add(self, const int64_t* keys, const int64_t* values, Py_ssize_t n,
                         bint distinct, uint8_t* added) noexcept nogil:
        """Rows in order; -1 when done, else the row where memory ran out (rows before it
        were added). The set, chains and log have room reserved except the pool."""
        cdef Py_ssize_t i, j
        cdef uint64_t s = 0
        cdef bint present = False
        cdef bint use_set = self.slots != NULL
        cdef Chain* c
        for i in range(n):
            j = i + 2 * PREFETCH_AHEAD   # the chain first, its tail block on the next stage
            if j < n:
                ENGINE_PREFETCH(&self.chains[keys[j]])
            j = i + PREFETCH_AHEAD
            if j < n:
                c = &self.chains[keys[j]]
                if c.head != 0:
                    ENGINE_PREFETCH(&self.pool[c.tail + HEADER + c.used])
                if use_set:
                    ENGINE_PREFETCH(&self.slots[self._slot_of(keys[j], values[j])])
            if use_set:
                s = self._find(keys[i], values[i])
                present = self.slots[s].key1 != 0
                if present and distinct:
                    added[i] = 0
                    continue
            if self._append(keys[i], values[i]) < 0:
                return i
            if use_set and not present:
                self.slots[s].key1, self.slots[s].value = keys[i] + 1, values[i]
                self.set_n += 1
            self.log[self.n] = keys[i]
            self.n += 1
            added[i] = 1
        return -1

    cdef int64_t _copy_values(self, int64_t key, int64_t* out, int64_t limit=-1) noexcept nogil:
        """key's first ``limit`` values (all when < 0) into out; returns how many."""
        cdef Chain* c = &self.chains[key]
        cdef int64_t b = c.head, count, done = 0
        while b != 0 and done != limit:
            count = self.pool[b + 1] if b != c.tail else c.used
            if limit >= 0 and count > limit - done:
                count = limit - done
            memcpy(&out[done], &self.pool[b + HEADER], count * sizeof(int64_t))
            done += count
            b = self.pool[b]
        return done

    # -- thread guard (under the GIL) ---------------------------------------------------------

    cdef inline void _idle(self):
        """Return once no call on this map runs without the GIL."""
        while self.busy:
            with nogil:
                PyThread_acquire_lock(self.lock, WAIT_LOCK)
                PyThread_release_lock(self.lock)

    cdef inline void _enter(self):
        self._idle()
        self.busy = True
        PyThread_acquire_lock(self.lock, WAIT_LOCK)  # held at most an instant by a waiter

    cdef inline void _leave(self):
        self.busy = False
        PyThread_release_lock(self.lock)

    cdef inline int64_t _slot_key(self, object key) except -2:
        """A scalar key as an index into chains, or -1 when it has no chain (any other
        integer: negative, huge, unknown); TypeError unless an integer."""
        cdef int overflow = 0
        cdef long long k
        if not PyLong_CheckExact(key):
            key = _key_arg(key)
        k = PyLong_AsLongLongAndOverflow(key, &overflow)
        if overflow or k < 0 or k >= self.keys_max:
            return -1
        return k

    # -- Python API ---------------------------------------------------------------------------

    def add(self, keys, values, distinct=True):
        """Append ``values[i]`` to ``keys[i]``'s list, in row order; return the added mask.

        With ``distinct`` a pair already present (or earlier in the same call) is skipped.
        """
        k, v = _pairs_args(keys, values)
        cdef bint dist = bool(distinct)
        cdef const int64_t[::1] kv = k
        cdef const int64_t[::1] vv = v
        cdef Py_ssize_t n = kv.shape[0], bad = -1
        out = np.zeros(n, dtype=bool)
        cdef uint8_t[::1] added = out.view(np.uint8)
        cdef int64_t top = int(k.max()) + 1 if n else 0
        cdef int ok = 0
        self._enter()
        with nogil:
            ok = self._grow_keys(top)
            if ok == 0:
                ok = self._grow_log(self.n + n)
            if ok == 0 and (dist or self.slots != NULL) and n:
                if self.slots == NULL:
                    ok = self._build_set()
                if ok == 0:
                    ok = self._reserve_set(self.set_n + n)
            if ok == 0 and n:
                bad = self._add(&kv[0], &vv[0], n, dist, &added[0])
        self._leave()
        if ok < 0:
            raise MemoryError(f"MultiMap.add: out of memory growing for {n} more pairs; "
                              f"nothing was added")
        if bad >= 0:
            raise MemoryError(f"MultiMap.add: out of memory at row {bad}; the rows before "
                              f"it were added")
        return out

    def get(self, key):
        """A copy of ``key``'s values in insertion order (empty if unknown)."""
        self._idle()
        cdef int64_t k = self._slot_key(key)
        if k < 0:
            return _empty(0)
        out = _empty(self.chains[k].length)
        self._copy_values(k, _data(out))
        return out

    def get_many(self, keys, limit=None):
        """CSR: ``values[offsets[i]:offsets[i + 1]]`` are the values of ``keys[i]`` (its first
        ``limit`` values when given)."""
        cdef const int64_t[::1] kv = _int64_column(keys, "keys")
        cdef Py_ssize_t i, n = kv.shape[0]
        cdef int64_t lim = _limit_arg(limit)
        offsets = np.empty(n + 1, dtype=np.int64)
        cdef int64_t[::1] off = offsets
        cdef int64_t k, m
        cdef int64_t[::1] vals
        self._enter()   # held across both passes: no add can run in between
        try:
            with nogil:
                off[0] = 0
                for i in range(n):
                    if i + PREFETCH_AHEAD < n:
                        k = kv[i + PREFETCH_AHEAD]
                        if 0 <= k < self.keys_max:
                            ENGINE_PREFETCH(&self.chains[k])
                    k = kv[i]
                    m = self.chains[k].length if 0 <= k < self.keys_max else 0
                    off[i + 1] = off[i] + (m if lim < 0 or m < lim else lim)
            values = np.empty(off[n], dtype=np.int64)
            vals = values
            with nogil:
                for i in range(n):
                    if i + PREFETCH_AHEAD < n:   # every key with values passed pass 1's test
                        k = kv[i + PREFETCH_AHEAD]
                        if off[i + PREFETCH_AHEAD + 1] > off[i + PREFETCH_AHEAD]:
                            ENGINE_PREFETCH(&self.pool[self.chains[k].head])
                    if off[i + 1] > off[i]:
                        self._copy_values(kv[i], &vals[off[i]], lim)
        finally:
            self._leave()
        return offsets, values

    def length(self, key):
        """How many values ``key`` has (0 if unknown)."""
        self._idle()
        cdef int64_t k = self._slot_key(key)
        return self.chains[k].length if k >= 0 else 0

    def lengths(self, nkeys):
        """``length(k)`` for every k in range(nkeys), as int64."""
        cdef int64_t n = _nkeys_arg(nkeys), k
        out = np.zeros(n, dtype=np.int64)
        cdef int64_t[::1] o = out
        self._idle()
        for k in range(min(n, self.keys_max)):
            o[k] = self.chains[k].length
        return out

    def __len__(self):
        """The number of (key, value) pairs."""
        self._idle()
        return self.n

    def pairs(self):
        """Every pair as (keys, values) in global insertion order: ``from_pairs`` rebuilds."""
        self._enter()
        try:
            return self._pairs()
        finally:
            self._leave()

    cdef tuple _pairs(self):
        keys = np.empty(self.n, dtype=np.int64)
        values = np.empty(self.n, dtype=np.int64)
        cdef int64_t[::1] ko = keys
        cdef int64_t[::1] vo = values
        cdef int64_t i, k, b
        cdef int64_t* block = <int64_t*>calloc(max(self.keys_max, 1), sizeof(int64_t))
        cdef int64_t* done = <int64_t*>calloc(max(self.keys_max, 1), sizeof(int64_t))
        if block == NULL or done == NULL:
            free(block)
            free(done)
            raise MemoryError(f"MultiMap.pairs: cannot allocate cursors for {self.keys_max} keys")
        with nogil:
            for i in range(self.n):   # cursor per key: its current block, values taken there
                k = self.log[i]
                b = block[k]
                if b == 0:
                    b = self.chains[k].head
                elif done[k] == self.pool[b + 1]:
                    b, done[k] = self.pool[b], 0
                block[k] = b
                ko[i], vo[i] = k, self.pool[b + HEADER + done[k]]
                done[k] += 1
        free(block)
        free(done)
        return keys, values

    @classmethod
    def from_pairs(cls, keys, values):
        """A MultiMap holding exactly these pairs, in this order (duplicates kept).

        Each key gets one block of exactly its values, so a reloaded map reads every key with
        a single memcpy (appended maps chain O(log n) blocks per key).
        """
        k, v = _pairs_args(keys, values)
        cdef MultiMap mm = cls()
        cdef const int64_t[::1] kv = k
        cdef const int64_t[::1] vv = v
        cdef int64_t n = kv.shape[0], top = int(k.max()) + 1 if n else 0
        cdef int ok
        with nogil:
            ok = mm._grow_keys(top)
            if ok == 0:
                ok = mm._grow_log(n)
            if ok == 0 and n:
                ok = mm._load(&kv[0], &vv[0], n)
        if ok < 0:
            raise MemoryError(f"MultiMap.from_pairs: out of memory for {n} pairs")
        return mm

    cdef int _load(self, const int64_t* keys, const int64_t* values, int64_t n) noexcept nogil:
        """Fill an empty map (chains and log sized): one exact block per key, in key order."""
        cdef int64_t i, k, b, words = HEADER
        cdef int64_t* pool
        cdef Chain* c
        for i in range(n):
            if i + PREFETCH_AHEAD < n:
                ENGINE_PREFETCH(&self.chains[keys[i + PREFETCH_AHEAD]])
            self.chains[keys[i]].length += 1
        for k in range(self.keys_max):
            if self.chains[k].length:
                words += HEADER + self.chains[k].length
        pool = <int64_t*>realloc(self.pool, words * sizeof(int64_t))
        if pool == NULL:
            for k in range(self.keys_max):
                self.chains[k].length = 0
            return -1
        self.pool, self.pool_max, b = pool, words, HEADER
        for k in range(self.keys_max):
            c = &self.chains[k]
            if c.length:
                c.head = c.tail = b
                self.pool[b], self.pool[b + 1] = 0, c.length
                b += HEADER + c.length
                self.nkeys += 1
        self.pool_used = b
        for i in range(n):
            if i + 2 * PREFETCH_AHEAD < n:
                ENGINE_PREFETCH(&self.chains[keys[i + 2 * PREFETCH_AHEAD]])
            if i + PREFETCH_AHEAD < n:
                c = &self.chains[keys[i + PREFETCH_AHEAD]]
                ENGINE_PREFETCH(&self.pool[c.head + HEADER + c.used])
            c = &self.chains[keys[i]]
            self.pool[c.head + HEADER + c.used] = values[i]
            c.used += 1
            self.log[i] = keys[i]
        self.n = n
        return 0

    def __repr__(self):
        return f"MultiMap(<{len(self)} pairs, {self.nkeys} keys>)"

    def __reduce__(self):   # pickle: the pairs in order; the seed is not kept
        return _from_pairs, self.pairs()


def _from_pairs(keys, values):
    """Unpickle (a module-level function, so that pickle can name it)."""
    return MultiMap.from_pairs(keys, values)
