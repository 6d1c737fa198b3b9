/* CRC32C (Castagnoli): reflected polynomial 0x82F63B78, init and xorout 0xFFFFFFFF.
 *
 * Same results and chaining convention as the PyPI `crc32c` package and iSCSI:
 *   engine_crc32c(0, "", 0) == 0
 *   engine_crc32c(0, "123456789", 9) == 0xE3069283
 *   engine_crc32c(engine_crc32c(0, a, na), b, nb) == engine_crc32c(0, a || b, na + nb)
 *
 * Design note.
 * - Hardware path (x86_64 only): SSE4.2 `crc32` in a function compiled with
 *   __attribute__((target("sse4.2"))), so no -msse4.2 / -march flag is needed. Long buffers are
 *   cut into three interleaved streams (the crc32 instruction has 3-cycle latency and 1-cycle
 *   throughput) whose states are merged with precomputed "append N zero bytes" operators
 *   (after Mark Adler's crc32c.c). Short buffers run one stream.
 * - Software path (everywhere): slicing-by-8 tables. `engine_crc32c_sw` forces it (tests).
 * - The tables and the hardware check are built once, by a load-time constructor, before any
 *   code of the including shared object runs; so the hot functions read immutable data and are
 *   safe to call from any thread without the GIL. Requires GCC or Clang.
 * - Every function is `static`: each translation unit that includes this header gets its own
 *   copy (the tables are 16 KiB).
 */
#ifndef ENGINE_CRC32C_H
#define ENGINE_CRC32C_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Define ENGINE_CRC32C_NO_HW to compile only the software path (as on non-x86 hosts). */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(ENGINE_CRC32C_NO_HW)
#define ENGINE_CRC32C_X86 1
#include <nmmintrin.h>
#else
#define ENGINE_CRC32C_X86 0
#endif

#define ENGINE_CRC32C_POLY 0x82F63B78u
#define ENGINE_CRC32C_LONG 8192  /* bytes per stream of a long 3-way block */
#define ENGINE_CRC32C_SHORT 256  /* bytes per stream of a short 3-way block */
#define ENGINE_CRC32C_AHEAD 2048 /* bytes each stream prefetches ahead: 256 MB from memory 16 -> 23 GB/s (512: 18, 4096: 20) */

static uint32_t engine_crc32c_sw_table[8][256];    /* slicing-by-8 */
static uint32_t engine_crc32c_long_op[4][256];     /* appends LONG zero bytes to a state */
static uint32_t engine_crc32c_short_op[4][256];    /* appends SHORT zero bytes to a state */
static int engine_crc32c_hw_enabled;               /* 1 when SSE4.2 is usable; set once */
static volatile int engine_crc32c_ready;           /* 1 once the tables above are built */

/* ---- GF(2) 32x32 matrices: the linear map "append zero bits" on a CRC state ---------------- */

static uint32_t engine_crc32c_gf2_times(const uint32_t *mat, uint32_t vec) {
    uint32_t sum = 0;
    for (; vec; vec >>= 1, mat++)
        if (vec & 1) sum ^= *mat;
    return sum;
}

static void engine_crc32c_gf2_square(uint32_t *square, const uint32_t *mat) {
    for (int n = 0; n < 32; n++) square[n] = engine_crc32c_gf2_times(mat, mat[n]);
}

/* Operator tables that append `len` zero bytes (a power of two) to a raw CRC state, applied
 * a byte of the state at a time. */
static void engine_crc32c_zeros_op(uint32_t table[4][256], size_t len) {
    uint32_t even[32], odd[32];
    odd[0] = ENGINE_CRC32C_POLY;  /* operator for one zero bit */
    for (int n = 1; n < 32; n++) odd[n] = 1u << (n - 1);
    engine_crc32c_gf2_square(even, odd);  /* two zero bits */
    engine_crc32c_gf2_square(odd, even);  /* four zero bits */
    uint32_t *op = odd;
    for (;;) {  /* squaring doubles the number of zero bits: 1, 2, 4, ... bytes */
        engine_crc32c_gf2_square(even, odd);
        op = even;
        if ((len >>= 1) == 0) break;
        engine_crc32c_gf2_square(odd, even);
        op = odd;
        if ((len >>= 1) == 0) break;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 0; k < 4; k++) table[k][n] = engine_crc32c_gf2_times(op, n << (8 * k));
}

static inline uint32_t engine_crc32c_shift(uint32_t table[4][256], uint32_t crc) {
    return table[0][crc & 0xff] ^ table[1][(crc >> 8) & 0xff] ^
           table[2][(crc >> 16) & 0xff] ^ table[3][crc >> 24];
}

/* Idempotent; normally run once by the constructor at load time. */
__attribute__((constructor, unused)) static void engine_crc32c_init(void) {
    if (engine_crc32c_ready) return;
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = n;
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (ENGINE_CRC32C_POLY & (0u - (crc & 1)));
        engine_crc32c_sw_table[0][n] = crc;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 1; k < 8; k++) {
            uint32_t prev = engine_crc32c_sw_table[k - 1][n];
            engine_crc32c_sw_table[k][n] = (prev >> 8) ^ engine_crc32c_sw_table[0][prev & 0xff];
        }
    engine_crc32c_zeros_op(engine_crc32c_long_op, ENGINE_CRC32C_LONG);
    engine_crc32c_zeros_op(engine_crc32c_short_op, ENGINE_CRC32C_SHORT);
#if ENGINE_CRC32C_X86
    __builtin_cpu_init();  /* required when called from a constructor */
    engine_crc32c_hw_enabled = __builtin_cpu_supports("sse4.2") ? 1 : 0;
#endif
    __atomic_store_n(&engine_crc32c_ready, 1, __ATOMIC_RELEASE);
}

/* Little-endian 64-bit load from any address, on any host byte order (one mov on x86). */
static inline uint64_t engine_crc32c_le64(const uint8_t *p) {
    uint64_t w;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(&w, p, 8);
#else
    w = (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24 |
        (uint64_t)p[4] << 32 | (uint64_t)p[5] << 40 | (uint64_t)p[6] << 48 | (uint64_t)p[7] << 56;
#endif
    return w;
}

/* ---- software path: slicing-by-8 ------------------------------------------------------------ */

__attribute__((unused)) static uint32_t engine_crc32c_sw(uint32_t crc, const uint8_t *p, size_t n) {
    const uint32_t (*t)[256] = (const uint32_t (*)[256])engine_crc32c_sw_table;
    if (!__atomic_load_n(&engine_crc32c_ready, __ATOMIC_ACQUIRE)) engine_crc32c_init();
    crc = ~crc;
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t w = engine_crc32c_le64(p) ^ crc;
        uint32_t lo = (uint32_t)w, hi = (uint32_t)(w >> 32);
        crc = t[7][lo & 0xff] ^ t[6][(lo >> 8) & 0xff] ^ t[5][(lo >> 16) & 0xff] ^ t[4][lo >> 24] ^
              t[3][hi & 0xff] ^ t[2][(hi >> 8) & 0xff] ^ t[1][(hi >> 16) & 0xff] ^ t[0][hi >> 24];
    }
    for (; n; n--, p++) crc = (crc >> 8) ^ t[0][(crc ^ *p) & 0xff];
    return ~crc;
}

/* ---- hardware path: SSE4.2, three interleaved streams ---------------------------------------- */

#if ENGINE_CRC32C_X86
/* Runs LEN bytes in each of three adjacent streams, then folds them into one state. */
#define ENGINE_CRC32C_3WAY(LEN, OP)                                                          \
    while (n >= 3 * (size_t)(LEN)) {                                                         \
        uint64_t c1 = 0, c2 = 0;                                                             \
        const uint8_t *stop = p + (LEN);                                                     \
        do {  /* a cache line per stream per turn, the next ones prefetched */              \
            __builtin_prefetch(p + ENGINE_CRC32C_AHEAD);                                     \
            __builtin_prefetch(p + (LEN) + ENGINE_CRC32C_AHEAD);                             \
            __builtin_prefetch(p + 2 * (LEN) + ENGINE_CRC32C_AHEAD);                         \
            for (int w = 0; w < 64; w += 8) {                                                \
                c0 = _mm_crc32_u64(c0, engine_crc32c_le64(p + w));                           \
                c1 = _mm_crc32_u64(c1, engine_crc32c_le64(p + (LEN) + w));                   \
                c2 = _mm_crc32_u64(c2, engine_crc32c_le64(p + 2 * (LEN) + w));               \
            }                                                                                \
            p += 64;                                                                         \
        } while (p < stop);                                                                  \
        c0 = engine_crc32c_shift((OP), (uint32_t)c0) ^ c1;                                   \
        c0 = engine_crc32c_shift((OP), (uint32_t)c0) ^ c2;                                   \
        p += 2 * (LEN);                                                                      \
        n -= 3 * (size_t)(LEN);                                                              \
    }

__attribute__((target("sse4.2"), unused))
static uint32_t engine_crc32c_hw(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t c0 = ~crc;
    for (; n && ((uintptr_t)p & 7); n--, p++) c0 = _mm_crc32_u8((uint32_t)c0, *p);  /* align */
    ENGINE_CRC32C_3WAY(ENGINE_CRC32C_LONG, engine_crc32c_long_op)
    ENGINE_CRC32C_3WAY(ENGINE_CRC32C_SHORT, engine_crc32c_short_op)
    for (; n >= 8; n -= 8, p += 8) c0 = _mm_crc32_u64(c0, engine_crc32c_le64(p));
    for (; n; n--, p++) c0 = _mm_crc32_u8((uint32_t)c0, *p);
    return ~(uint32_t)c0;
}
#undef ENGINE_CRC32C_3WAY
#endif

/* 1 when engine_crc32c uses the SSE4.2 path on this machine. */
__attribute__((unused)) static int engine_crc32c_hw_available(void) {
    if (!__atomic_load_n(&engine_crc32c_ready, __ATOMIC_ACQUIRE)) engine_crc32c_init();
    return engine_crc32c_hw_enabled;
}

/* CRC32C of p[0:n], continuing from `crc` (0 to start). Thread-safe, never allocates. */
__attribute__((unused)) static uint32_t engine_crc32c(uint32_t crc, const uint8_t *p, size_t n) {
#if ENGINE_CRC32C_X86
    if (engine_crc32c_hw_available()) return engine_crc32c_hw(crc, p, n);
#endif
    return engine_crc32c_sw(crc, p, n);
}

#endif /* ENGINE_CRC32C_H */
