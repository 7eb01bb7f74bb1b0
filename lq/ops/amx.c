/* lq::int8_mm on CPUs with AMX: out = (a @ b^T) * a_step[:, None] * b_step[None, :] + bias with the output stage
 * applied to each 32 x 32 block of int32 sums while it is in L1 (Wu et al. 2020 eq. 10).
 *
 * Built at first use by lq/ops/native_quant.py (lq/native.py) and called through ctypes. torch._int_mm (oneDNN)
 * takes ~0.8 ms for a 1024^3 product on the 2-core host and the output stage another ~0.25-0.4 ms over the int32
 * sums in memory; the tile unit does the product in ~0.2 ms at its peak. The sums are exact: TDPBSSD multiplies
 * signed bytes and accumulates in int32 without saturation, exact while K * 128 * 128 < 2^31 (the caller checks).
 *
 * Layouts. Both operands are packed per call into 1 KiB tiles (zero padded to M, N multiples of 32 and K of 64), so
 * every tile load reads 1 KiB in a row: a into 16 rows x 64 bytes (copied row by row when its K is contiguous, 16 x 16
 * byte transposes when its M is: the grad-weight product's transposed gradient); b into the tile unit's B layout,
 * for each 16-column block j and 64-deep step s a tile whose row kk holds b[16j + n][64s + 4kk + i] at byte 4n + i
 * (4-byte words gathered from 16 rows when b's K is contiguous, four rows interleaved byte by byte when its N is).
 * Threads share the 32 x 32 output blocks, row blocks outer.
 *
 * Output stage, the same fp32 operations as lq.ops.int8_mm._epilogue: ((float)acc * a_step[m]) * b_step[n] + bias[n].
 *
 * The convolution kernels (lq_amx_conv, lq_amx_taps) also run on AVX-512 VNNI where there is no tile unit (their
 * vnni argument; see "The same products on AVX-512 VNNI" below): the same packed operands and output stages.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#include "lq_simd.h"
#include <sys/syscall.h>
#include <unistd.h>
#define LQ_AMX 1
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* 1 when the CPU has AMX-INT8 and Linux lets this process use the tile registers (asked once: a process-wide
   permission, which torch's oneDNN asks for too) */
int32_t lq_amx_available(void) {
#ifdef LQ_AMX
    unsigned int eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return 0;
    if (!(edx & (1u << 24)) || !(edx & (1u << 25))) return 0; /* AMX-TILE, AMX-INT8 */
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return 0;
    return 1;
#else
    return 0;
#endif
}

/* 1 when the CPU has AVX-512 F, BW and VNNI (the kernels' VNNI path; GCC's check includes the OS's zmm state) */
int32_t lq_vnni_available(void) {
#ifdef LQ_AMX
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

#ifdef LQ_AMX
typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

__attribute__((target("amx-tile"))) static void configure_tiles(void) {
    tile_config cfg __attribute__((aligned(64)));
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) { /* 0-3: int32 sums 16 x 16; 4-5: a 16 rows x 64 bytes; 6-7: packed b */
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    /* GCC 12 drops the stores above otherwise: it does not see ldtilecfg read them */
    __asm__ volatile("" : : "m"(cfg) : "memory");
    _tile_loadconfig(&cfg);
}

/* The 2 x 2 blocking: tiles 0-3 hold a 32 x 32 block of int32 sums, 4-5 two 16-row a tiles, 6-7 two packed
   16-column b tiles. start: zero the sums or load them from c [32][32]; steps: add `steps` 64-deep steps of a0 / a1
   (step s at a_x + s * a_step, rows lda bytes apart) times b0 / b1 (step s at b_x + s * 1024); store: write them to
   c. */
__attribute__((target("amx-tile"))) static inline void sums_start(const int32_t *c, int add) {
    if (add) {
        _tile_loadd(0, c, 128);
        _tile_loadd(1, c + 16, 128);
        _tile_loadd(2, c + 16 * 32, 128);
        _tile_loadd(3, c + 16 * 32 + 16, 128);
    } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
}

__attribute__((target("amx-tile,amx-int8"))) static inline void sums_steps(const int8_t *a0, const int8_t *a1,
                                                                            int64_t a_step, int64_t lda,
                                                                            const int8_t *b0, const int8_t *b1,
                                                                            int64_t steps) {
    for (int64_t s = 0; s < steps; s++) {
        _tile_loadd(4, a0 + s * a_step, lda);
        _tile_loadd(5, a1 + s * a_step, lda);
        _tile_loadd(6, b0 + s * 1024, 64);
        _tile_loadd(7, b1 + s * 1024, 64);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
    }
}

__attribute__((target("amx-tile"))) static inline void sums_store(int32_t *c) {
    _tile_stored(0, c, 128);
    _tile_stored(1, c + 16, 128);
    _tile_stored(2, c + 16 * 32, 128);
    _tile_stored(3, c + 16 * 32 + 16, 128);
}

/* one 32 x 32 block of sums over `steps` steps into c (added to what c holds when `add`) */
__attribute__((target("amx-tile,amx-int8"))) static void block_sums(const int8_t *a0, const int8_t *a1, int64_t a_step,
                                                                     int64_t lda, const int8_t *b0, const int8_t *b1,
                                                                     int64_t steps, int32_t *c, int add) {
    sums_start(c, add);
    sums_steps(a0, a1, a_step, lda, b0, b1, steps);
    sums_store(c);
}

__attribute__((target("amx-tile"))) static void release_tiles(void) { _tile_release(); }

/* out[j] = ((float)sum[j] * as) * bs[j] (+ bias[j]), sum[j] = c[j] - corr[j] (VNNI's offset; corr NULL: none) in
   wrapping int32 arithmetic */
__attribute__((target("avx512f"))) static inline void finish_row(const int32_t *c, float as, const float *bs,
                                                          const float *bias, int64_t n, float *out,
                                                          const int32_t *corr) {
    if (corr && bias) {
        for (int64_t j = 0; j < n; j++)
            out[j] = (float)(int32_t)((uint32_t)c[j] - (uint32_t)corr[j]) * as * bs[j] + bias[j];
    } else if (corr) {
        for (int64_t j = 0; j < n; j++) out[j] = (float)(int32_t)((uint32_t)c[j] - (uint32_t)corr[j]) * as * bs[j];
    } else if (bias) {
        for (int64_t j = 0; j < n; j++) out[j] = (float)c[j] * as * bs[j] + bias[j];
    } else {
        for (int64_t j = 0; j < n; j++) out[j] = (float)c[j] * as * bs[j];
    }
}

/* ---- The same products on AVX-512 VNNI, for CPUs without the tile unit (AMD Zen 4/5, Intel before Sapphire Rapids).
   VPDPBUSD multiplies unsigned bytes (a register) by signed bytes and adds each four products to an int32 lane,
   without saturation. The packed b tile rows are exactly its signed operand (row kk: 16 columns x 4 bytes of k), so
   b stays as packed for AMX; the a operand is broadcast four bytes at a time and must be unsigned: the callers
   store it xor 0x80, i.e. a + 128 (a zero as 0x80), and subtract 128 * (the sum of b's column over the reduction)
   from each sum (oneDNN's u8 x s8 scheme). The int32 lanes wrap, and so do the corrections (uint32 arithmetic), so
   the difference is the exact sum wherever that fits int32: the same limit as the tile unit's signed products. */
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))

/* c (+)= the sums over `segs` segments of `steps` 64-deep steps each: segment g reads rows of a from a + a_off[g]
   (row r, step s at + r * lda + s * a_step; unsigned) and packed b tiles from b + b_off[g] (step s at + s * b_step,
   the second column block b_col further). A convolution's taps are its segments, so the sums stay in registers over
   all of them (stored once: storing a block per tap cost ~40% of a 64-channel layer). The _rows variants take
   kn: the 4-byte rows of step s of segment g that hold a nonzero weight, kn[g * steps + s] of them, the rest zero in
   every column and skipped (a 3-wide tap row of a 1-channel stem fills 3 of the 16); the plain ones all 16 (a
   variable bound there cost the 64-channel layers ~5%); full steps run the unrolled loop in both. Two register
   blockings, every accumulator a named variable (GCC kept an array of them partly on the stack): 8 rows x 32 columns
   (c [8][ldc], 16 accumulators, 2 b rows) and 16 rows x 16 columns (c [16][ldc]). */
static inline __attribute__((always_inline)) int32_t word_at(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

#define VNNI_LOAD(R, C) __m512i acc##R##C = add ? _mm512_loadu_si512((const void *)(c + R * ldc + 16 * C)) \
                                                : _mm512_setzero_si512();
#define VNNI_STORE(R, C) _mm512_storeu_si512((void *)(c + R * ldc + 16 * C), acc##R##C);
#define VNNI_ROW2(R)                                                                                                \
    {                                                                                                               \
        __m512i av = _mm512_set1_epi32(word_at(as + R * lda + 4 * kk));                                            \
        acc##R##0 = _mm512_dpbusd_epi32(acc##R##0, av, b0);                                                         \
        acc##R##1 = _mm512_dpbusd_epi32(acc##R##1, av, b1);                                                         \
    }
#define VNNI_ROW1(R)                                                                                                \
    acc##R##0 = _mm512_dpbusd_epi32(acc##R##0, _mm512_set1_epi32(word_at(as + R * lda + 4 * kk)), b0);
#define VNNI_SEGMENTS(KEND, BODY)                                                                                   \
    for (int64_t g = 0; g < segs; g++)                                                                              \
        for (int64_t s = 0; s < steps; s++) {                                                                       \
            const int8_t *as = a + a_off[g] + s * a_step, *bs = b + b_off[g] + s * b_step;                          \
            const int kend = KEND;                                                                                  \
            if (kend == 16) {                                                                                       \
                for (int kk = 0; kk < 16; kk++) {                                                                   \
                    BODY                                                                                            \
                }                                                                                                   \
            } else {                                                                                                \
                for (int kk = 0; kk < kend; kk++) {                                                                 \
                    BODY                                                                                            \
                }                                                                                                   \
            }                                                                                                       \
        }

/* NAME: the 8 x 32 blocking with KEND 4-byte rows a step (16: every row, the loop unrolled; kn[g * steps + s]) */
#define VNNI_8X32(NAME, KEND)                                                                                       \
    VNNI_TARGET static void NAME(const int8_t *a, int64_t lda, int64_t a_step, const int8_t *b, int64_t b_step,     \
                                 int64_t b_col, int64_t steps, int64_t segs, const int64_t *a_off,                  \
                                 const int64_t *b_off, const uint8_t *kn, int32_t *c, int64_t ldc, int add) {       \
        (void)kn;                                                                                                   \
        VNNI_LOAD(0, 0) VNNI_LOAD(0, 1) VNNI_LOAD(1, 0) VNNI_LOAD(1, 1) VNNI_LOAD(2, 0) VNNI_LOAD(2, 1)             \
        VNNI_LOAD(3, 0) VNNI_LOAD(3, 1) VNNI_LOAD(4, 0) VNNI_LOAD(4, 1) VNNI_LOAD(5, 0) VNNI_LOAD(5, 1)             \
        VNNI_LOAD(6, 0) VNNI_LOAD(6, 1) VNNI_LOAD(7, 0) VNNI_LOAD(7, 1)                                             \
        VNNI_SEGMENTS(KEND, __m512i b0 = _mm512_loadu_si512((const void *)(bs + kk * 64));                          \
                      __m512i b1 = _mm512_loadu_si512((const void *)(bs + b_col + kk * 64));                        \
                      VNNI_ROW2(0) VNNI_ROW2(1) VNNI_ROW2(2) VNNI_ROW2(3) VNNI_ROW2(4) VNNI_ROW2(5) VNNI_ROW2(6)     \
                      VNNI_ROW2(7))                                                                                 \
        VNNI_STORE(0, 0) VNNI_STORE(0, 1) VNNI_STORE(1, 0) VNNI_STORE(1, 1) VNNI_STORE(2, 0) VNNI_STORE(2, 1)       \
        VNNI_STORE(3, 0) VNNI_STORE(3, 1) VNNI_STORE(4, 0) VNNI_STORE(4, 1) VNNI_STORE(5, 0) VNNI_STORE(5, 1)       \
        VNNI_STORE(6, 0) VNNI_STORE(6, 1) VNNI_STORE(7, 0) VNNI_STORE(7, 1)                                         \
    }

/* NAME: the 16 x 16 blocking, KEND as for VNNI_8X32 */
#define VNNI_16X16(NAME, KEND)                                                                                      \
    VNNI_TARGET static void NAME(const int8_t *a, int64_t lda, int64_t a_step, const int8_t *b, int64_t b_step,     \
                                 int64_t steps, int64_t segs, const int64_t *a_off, const int64_t *b_off,           \
                                 const uint8_t *kn, int32_t *c, int64_t ldc, int add) {                             \
        (void)kn;                                                                                                   \
        VNNI_LOAD(0, 0) VNNI_LOAD(1, 0) VNNI_LOAD(2, 0) VNNI_LOAD(3, 0) VNNI_LOAD(4, 0) VNNI_LOAD(5, 0)             \
        VNNI_LOAD(6, 0) VNNI_LOAD(7, 0) VNNI_LOAD(8, 0) VNNI_LOAD(9, 0) VNNI_LOAD(10, 0) VNNI_LOAD(11, 0)           \
        VNNI_LOAD(12, 0) VNNI_LOAD(13, 0) VNNI_LOAD(14, 0) VNNI_LOAD(15, 0)                                         \
        VNNI_SEGMENTS(KEND, __m512i b0 = _mm512_loadu_si512((const void *)(bs + kk * 64));                          \
                      VNNI_ROW1(0) VNNI_ROW1(1) VNNI_ROW1(2) VNNI_ROW1(3) VNNI_ROW1(4) VNNI_ROW1(5) VNNI_ROW1(6)     \
                      VNNI_ROW1(7) VNNI_ROW1(8) VNNI_ROW1(9) VNNI_ROW1(10) VNNI_ROW1(11) VNNI_ROW1(12)               \
                      VNNI_ROW1(13) VNNI_ROW1(14) VNNI_ROW1(15))                                                    \
        VNNI_STORE(0, 0) VNNI_STORE(1, 0) VNNI_STORE(2, 0) VNNI_STORE(3, 0) VNNI_STORE(4, 0) VNNI_STORE(5, 0)       \
        VNNI_STORE(6, 0) VNNI_STORE(7, 0) VNNI_STORE(8, 0) VNNI_STORE(9, 0) VNNI_STORE(10, 0) VNNI_STORE(11, 0)     \
        VNNI_STORE(12, 0) VNNI_STORE(13, 0) VNNI_STORE(14, 0) VNNI_STORE(15, 0)                                     \
    }

VNNI_8X32(vnni_8x32, 16)
VNNI_8X32(vnni_8x32_rows, kn[g * steps + s])
VNNI_16X16(vnni_16x16, 16)
VNNI_16X16(vnni_16x16_rows, kn[g * steps + s])
#undef VNNI_8X32
#undef VNNI_16X16
#undef VNNI_SEGMENTS
#undef VNNI_LOAD
#undef VNNI_STORE
#undef VNNI_ROW2
#undef VNNI_ROW1

/* block_sums on VNNI: a 32 x 32 block (c [32][32]) as four 8-row blockings, rows 8 rg.. of a at a0 + 8 rg * lda,
   the second 16-column block of b b_col bytes after b0 (block_sums' a1 = a0 + 16 * lda and b1 = b0 + b_col) */
static const int64_t ONE_SEGMENT[1] = {0};

static void vnni_block_sums(const int8_t *a0, int64_t a_step, int64_t lda, const int8_t *b0, int64_t b_col,
                            int64_t steps, int32_t *c, int add) {
    for (int rg = 0; rg < 4; rg++)
        vnni_8x32(a0 + 8 * rg * lda, lda, a_step, b0, 1024, b_col, steps, 1, ONE_SEGMENT, ONE_SEGMENT, NULL,
                  c + 8 * rg * 32, 32, add);
}

/* column sums of a packed b tile: sums[n] += the tile's 64 bytes of column n (VPDPBUSD with ones as the unsigned
   operand) */
VNNI_TARGET static void tile_column_sums(const int8_t *tile, int32_t *sums) {
    __m512i acc = _mm512_loadu_si512((const void *)sums), ones = _mm512_set1_epi8(1);
    for (int kk = 0; kk < 16; kk++)
        acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512((const void *)(tile + kk * 64)));
    _mm512_storeu_si512((void *)sums, acc);
}

/* tile (j, s) of b's packed layout (see above): rows kk = 0..15 hold b[16j + n][64s + 4kk + i] at byte 4n + i;
   b's element (n, k) at b[n * sn + k * sk] with sk == 1 or sn == 1; zero beyond N and K */
static void pack_b_tile(const int8_t *b, int64_t n, int64_t k, int64_t sn, int64_t sk, int64_t j, int64_t s,
                        int8_t *tile) {
    int64_t k0 = 64 * s;
    for (int64_t nn = 0; nn < 16; nn++) {
        int64_t col = 16 * j + nn;
        if (col >= n) {
            for (int64_t kk = 0; kk < 16; kk++) memset(tile + kk * 64 + 4 * nn, 0, 4);
            continue;
        }
        if (sn == 1 && nn == 0 && col + 16 <= n && k0 + 64 <= k) {
            /* N contiguous: rows k of the [K, N] matrix, four interleaved byte by byte per tile row */
            for (int64_t kk = 0; kk < 16; kk++) {
                const int8_t *src = b + (k0 + 4 * kk) * sk + col;
                __m128i r0 = _mm_loadu_si128((const __m128i *)src);
                __m128i r1 = _mm_loadu_si128((const __m128i *)(src + sk));
                __m128i r2 = _mm_loadu_si128((const __m128i *)(src + 2 * sk));
                __m128i r3 = _mm_loadu_si128((const __m128i *)(src + 3 * sk));
                __m128i t0 = _mm_unpacklo_epi8(r0, r1), t1 = _mm_unpackhi_epi8(r0, r1);
                __m128i t2 = _mm_unpacklo_epi8(r2, r3), t3 = _mm_unpackhi_epi8(r2, r3);
                __m128i *dst = (__m128i *)(tile + kk * 64);
                _mm_storeu_si128(dst, _mm_unpacklo_epi16(t0, t2));
                _mm_storeu_si128(dst + 1, _mm_unpackhi_epi16(t0, t2));
                _mm_storeu_si128(dst + 2, _mm_unpacklo_epi16(t1, t3));
                _mm_storeu_si128(dst + 3, _mm_unpackhi_epi16(t1, t3));
            }
            return; /* the whole tile */
        }
        if (sk == 1 && k0 + 64 <= k) {
            const int8_t *src = b + col * sn + k0;
            for (int64_t kk = 0; kk < 16; kk++) memcpy(tile + kk * 64 + 4 * nn, src + 4 * kk, 4);
        } else {
            for (int64_t kk = 0; kk < 16; kk++)
                for (int64_t i = 0; i < 4; i++) {
                    int64_t kx = k0 + 4 * kk + i;
                    tile[kk * 64 + 4 * nn + i] = kx < k ? b[col * sn + kx * sk] : 0;
                }
        }
    }
}

/* b [N, K] into the packed layout with ks = Kp / 64 steps and jn = Np / 16 column blocks (a work-shared loop of
   the caller's parallel region) */
static void pack_b(const int8_t *b, int64_t n, int64_t k, int64_t sn, int64_t sk, int64_t jn, int64_t ks, int8_t *bp) {
#pragma omp for schedule(static) collapse(2)
    for (int64_t j = 0; j < jn; j++)
        for (int64_t s = 0; s < ks; s++) pack_b_tile(b, n, k, sn, sk, j, s, bp + (j * ks + s) * 1024);
}

/* a [M, K] into 16 x 64 tiles: for each 16-row block i and 64-deep step s, 1 KiB holding a[16i + r][64s + c] at
   byte 64r + c; a's element (m, k) at a[m * sm + k * sk] with sk == 1 (copied row by row) or sm == 1 (a transposed
   view of a row-major [K, M]: 16 x 16 byte transposes). Zero beyond M and K. */
static void pack_a(const int8_t *a, int64_t m, int64_t k, int64_t sm, int64_t sk, int64_t im, int64_t ks, int8_t *ap) {
#pragma omp for schedule(static) collapse(2)
    for (int64_t i = 0; i < im; i++) {
        for (int64_t s = 0; s < ks; s++) {
            int8_t *tile = ap + (i * ks + s) * 1024;
            int64_t k0 = 64 * s;
            if (sk != 1 && sm == 1 && 16 * i + 16 <= m && k0 + 64 <= k) {
                for (int q = 0; q < 4; q++) transpose16(a + 16 * i + (k0 + 16 * q) * sk, sk, tile + 16 * q, 64, 0);
                continue;
            }
            for (int64_t r = 0; r < 16; r++) {
                int64_t row = 16 * i + r, len = row < m ? (k - k0 < 64 ? k - k0 : 64) : 0;
                if (sk == 1) {
                    if (len > 0) memcpy(tile + 64 * r, a + row * sm + k0, (size_t)len);
                } else {
                    for (int64_t c = 0; c < len; c++) tile[64 * r + c] = a[row * sm + (k0 + c) * sk];
                }
                if (len < 64) memset(tile + 64 * r + (len > 0 ? len : 0), 0, (size_t)(64 - (len > 0 ? len : 0)));
            }
        }
    }
}

#endif

/* The packed operands' buffers, kept per calling thread and grown as needed: fresh buffers per call cost their
   page faults every time (1 MiB each for a 1024^3 product: ~0.2 ms of a ~0.7 ms call). Freed when the thread
   exits (a thread-specific key's destructor) and after any call that needed more than SCRATCH_KEEP bytes (one
   large product does not pin its buffers for the rest of the process). */
#define SCRATCH_KEEP ((size_t)64 << 20)

typedef struct {
    int8_t *buf[2];
    size_t size[2];
} scratch_t;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_ok;

static void scratch_free(void *p) {
    scratch_t *s = (scratch_t *)p;
    free(s->buf[0]);
    free(s->buf[1]);
    free(s);
}

static void scratch_init(void) { scratch_key_ok = pthread_key_create(&scratch_key, scratch_free) == 0; }

static scratch_t *scratch_of_thread(int create) {
    pthread_once(&scratch_once, scratch_init);
    if (!scratch_key_ok) return NULL;
    scratch_t *s = (scratch_t *)pthread_getspecific(scratch_key);
    if (!s && create) {
        s = (scratch_t *)calloc(1, sizeof(scratch_t));
        if (s && pthread_setspecific(scratch_key, s) != 0) {
            free(s);
            s = NULL;
        }
    }
    return s;
}

static int8_t *scratch(int which, size_t bytes) {
    scratch_t *s = scratch_of_thread(1);
    if (!s) return NULL;
    if (s->size[which] < bytes) {
        free(s->buf[which]);
        size_t size = (bytes + 63) / 64 * 64;
        s->buf[which] = (int8_t *)aligned_alloc(64, size);
        s->size[which] = s->buf[which] ? size : 0;
    }
    return s->buf[which];
}

static void scratch_trim(void) {
    scratch_t *s = scratch_of_thread(0);
    for (int which = 0; s && which < 2; which++)
        if (s->size[which] > SCRATCH_KEEP) {
            free(s->buf[which]);
            s->buf[which] = NULL;
            s->size[which] = 0;
        }
}

/* out [M, N] fp32 contiguous; a's (m, k) at a[m * sam + k * sak], b's (n, k) at b[n * sn + k * sk], each with one of
   its strides 1; a_step [M] (a_stride 1) or [1] (a_stride 0), b_step [N], bias [N] or NULL. Returns 0, or -1 without
   AMX, -2 when a buffer could not be allocated (nothing written). */
int64_t lq_amx_mm(const int8_t *a, int64_t m, int64_t k, int64_t sam, int64_t sak, const int8_t *b, int64_t n,
                  int64_t sn, int64_t sk, const float *a_step, int64_t a_stride, const float *b_step, const float *bias,
                  float *out, int32_t threads) {
#ifndef LQ_AMX
    return -1;
#else
    int64_t mp = (m + 31) / 32 * 32, np = (n + 31) / 32 * 32, kp = (k + 63) / 64 * 64, ks = kp / 64;
    int8_t *bp = scratch(0, (size_t)(np / 16) * (size_t)ks * 1024);
    int8_t *ap = scratch(1, (size_t)mp * (size_t)kp);
    if (!bp || !ap) return -2;
    int64_t mb = mp / 32, nb = np / 32;
#pragma omp parallel num_threads(threads)
    {
        int32_t c[32 * 32] __attribute__((aligned(64)));
        pack_b(b, n, k, sn, sk, np / 16, ks, bp); /* (work-shared loops of this parallel region, each ending in a
                                                     barrier: one region a call instead of three) */
        pack_a(a, m, k, sam, sak, mp / 16, ks, ap);
        configure_tiles();
#pragma omp for schedule(static) collapse(2)
        for (int64_t ib = 0; ib < mb; ib++) {
            for (int64_t jb = 0; jb < nb; jb++) {
                const int8_t *a0 = ap + (2 * ib) * ks * 1024, *b0 = bp + (2 * jb) * ks * 1024;
                block_sums(a0, a0 + ks * 1024, 1024, 64, b0, b0 + ks * 1024, ks, c, 0);
                int64_t rows = m - ib * 32 < 32 ? m - ib * 32 : 32, cols = n - jb * 32 < 32 ? n - jb * 32 : 32;
                for (int64_t r = 0; r < rows; r++) {
                    int64_t i = ib * 32 + r;
                    finish_row(c + r * 32, a_step[i * a_stride], b_step + jb * 32, bias ? bias + jb * 32 : NULL, cols,
                               out + i * n + jb * 32, NULL);
                }
            }
        }
        release_tiles();
    }
    scratch_trim();
    return 0;
#endif
}

#ifdef LQ_AMX
/* one tap of taps_narrow: a 16-row a tile of ge at the tap's shift into tile A, its phase's b tile into tile 7 where
   the previous tap had another phase, the sums of tap slot T (tile T) */
#define NARROW_TAP(T, A)                                                                                           \
    if (T < nk) {                                                                                                  \
        int32_t ph = phase_of[k0 + T];                                                                             \
        if (ph != loaded) {                                                                                        \
            _tile_loadd(7, bchunk + ((ph * jn) * chunk + ss) * 1024, 64);                                          \
            loaded = ph;                                                                                           \
        }                                                                                                          \
        _tile_loadd(A, ge + (lead - off[k0 + T]) + (s0 + ss) * 64, ge_row);                                        \
        _tile_dpbssd(T, A, 7);                                                                                     \
    }

/* The taps of one reduction chunk for at most 16 output and 16 input channels (lq_amx_taps): the 2 x 2 blocking's
   32 x 32 blocks would be 3/4 zeros, so four taps' 16 x 16 sums sit in tiles 0-3 at once, each step one a tile per
   tap and the b tile of its phase (one for all taps at stride 1). The sums live at the top-left of each tap's 32 x 32
   block of acc. */
__attribute__((target("amx-tile,amx-int8"))) static void taps_narrow(const int8_t *ge, int64_t ge_row, int64_t lead,
                                                                      int64_t s0, int64_t steps, int64_t kb,
                                                                      int64_t ke, const int64_t *off,
                                                                      const int32_t *phase_of,
                                                                      const int8_t *bchunk, int64_t jn, int64_t chunk,
                                                                      int32_t *acc) {
    for (int64_t k0 = kb; k0 < ke; k0 += 4) { /* taps kb .. ke, four at a time */
        int64_t nk = ke - k0 < 4 ? ke - k0 : 4;
        int32_t *c = acc + k0 * 1024;
        _tile_loadd(0, c, 128);
        if (nk > 1) _tile_loadd(1, c + 1024, 128);
        if (nk > 2) _tile_loadd(2, c + 2048, 128);
        if (nk > 3) _tile_loadd(3, c + 3072, 128);
        for (int64_t ss = 0; ss < steps; ss++) {
            int32_t loaded = -1; /* (the phase whose step-ss b tile is in tile 7) */
            NARROW_TAP(0, 4)
            NARROW_TAP(1, 5)
            NARROW_TAP(2, 6)
            NARROW_TAP(3, 4)
        }
        _tile_stored(0, c, 128);
        if (nk > 1) _tile_stored(1, c + 1024, 128);
        if (nk > 2) _tile_stored(2, c + 2048, 128);
        if (nk > 3) _tile_stored(3, c + 3072, 128);
    }
}
#undef NARROW_TAP

/* lq_amx_taps' work item `it` of a chunk (steps s0 .. s0 + steps, packed at bchunk): narrow, the group of taps
   4 it .. 4 it + 3; else tap k's 32 x 32 block (i, j) of the sums, it = (k * ob + i) * cb + j */
static void taps_item(const int8_t *ge, int64_t ge_row, int64_t lead, int64_t taps, const int64_t *off,
                      const int32_t *phase_of, int narrow, int64_t ob, int64_t cb, int64_t jn, int64_t it, int64_t s0,
                      int64_t steps, const int8_t *bchunk, int64_t chunk, int32_t *acc, int vnni) {
    if (narrow) {
        int64_t kb = it * 4, ke = kb + 4 < taps ? kb + 4 : taps;
        if (!vnni) {
            taps_narrow(ge, ge_row, lead, s0, steps, kb, ke, off, phase_of, bchunk, jn, chunk, acc);
            return;
        }
        for (int64_t k = kb; k < ke; k++) /* (the 16 x 16 sums at the top-left of tap k's 32 x 32 block) */
            vnni_16x16(ge + (lead - off[k]) + s0 * 64, ge_row, 64, bchunk + (phase_of[k] * jn * chunk) * 1024, 1024,
                       steps, 1, ONE_SEGMENT, ONE_SEGMENT, NULL, acc + k * 1024, 32, 1);
        return;
    }
    int64_t k = it / (ob * cb), i = (it / cb) % ob, j = it % cb;
    const int8_t *a = ge + i * 32 * ge_row + (lead - off[k]) + s0 * 64;
    const int8_t *b0 = bchunk + ((phase_of[k] * jn + 2 * j) * chunk) * 1024;
    if (vnni)
        vnni_block_sums(a, 64, ge_row, b0, chunk * 1024, steps, acc + it * 1024, 1);
    else
        block_sums(a, a + 16 * ge_row, 64, ge_row, b0, b0 + chunk * 1024, steps, acc + it * 1024, 1);
}

/* lq_amx_taps' packing of a phase's tile (pack_b_tile), and on VNNI (csum not NULL) its column sums added to csum */
static void pack_phase_tile(const int8_t *x, int64_t c, int64_t tx, int64_t xc, int64_t xt, int64_t j, int64_t s,
                            int8_t *tile, int32_t *csum) {
    pack_b_tile(x, c, tx, xc, xt, j, s, tile);
    if (csum) tile_column_sums(tile, csum);
}
#endif

/* A convolution's weight gradient by taps (lq.ops.int8_conv_kernels._grad_weight_taps) on the tile unit:
     out[o, c, tap] = (sum_t ge[o, t] * X_p(tap)[t + off[tap], c]) * g_step[o] * x_step
   ge: the output gradient laid out on the (phase) grid, rows o of a row-major buffer with row stride ge_row whose
   columns [lead, lead + T) hold it and are zero elsewhere (lead >= every off, width >= lead + tx rounded up to 64,
   rows >= o rounded up to 32, the extra rows zero). Phase p's input: (c, t) at x[p][c * xc + t * xt] for t in
   [0, tx). Tap k's a operand is ge read from column lead - off[k] (a shifted view: row-major a needs no packing).
   The reduction (~100K positions) is cut into chunks that the threads share: per chunk a thread packs the phases'
   columns once for every tap and adds every tap's 32 x 32 blocks into its own int32 sums (a chunk of a and b stays
   in L2: without the chunks every block streamed both ~3 MB panels from memory, 0.65 TMAC/s); the threads' sums
   are added (exact integers) before the output stage. out [O, C, taps] fp32 (the [O, C, kh, kw] weight gradient).
   vnni = 1: AVX-512 VNNI instead of the tile unit, ge stored xor 0x80 (lq_grid_rows' flip; every byte, the zeros
   too), each tap's sums less 128 * its phase's column sums (taken from the packed tiles).
   Returns 0, -1 without AMX (VNNI), -2 when a buffer could not be allocated. */
int64_t lq_amx_taps(const int8_t *ge, int64_t o, int64_t ge_row, int64_t lead, int64_t taps, const int64_t *off,
                    const int32_t *phase_of, int64_t phases, const int8_t *const *x, int64_t xc, int64_t xt,
                    int64_t c, int64_t tx, const float *g_step, float x_step, float *out, int32_t threads,
                    int32_t vnni) {
#ifndef LQ_AMX
    return -1;
#else
    if (vnni && !lq_vnni_available()) return -1;
    int64_t cp = (c + 31) / 32 * 32, ks = (tx + 63) / 64, ob = (o + 31) / 32, cb = cp / 32, jn = cp / 16;
    int64_t chunk = (int64_t)((1 << 20) / ((ob * 32 + cp * phases) * 64));
    chunk = chunk < 4 ? 4 : chunk > ks ? ks : chunk;
    int64_t chunks = (ks + chunk - 1) / chunk, items = taps * ob * cb;
    if (chunks > 1 && chunks % threads) /* as many chunks per thread (5 chunks on 2 threads ran 3 : 2) */
        chunks = (chunks + threads - 1) / threads * threads;
    /* chunk q: steps q * ks / chunks .. (q + 1) * ks / chunks (sizes differ by 1) */
    chunk = (ks + chunks - 1) / chunks;
    const int narrow = o <= 16 && c <= 16;
    const int64_t jpack = narrow ? 1 : jn; /* column blocks of b that are packed (narrow: c <= 16, the first) */
    /* one chunk (a short reduction, e.g. a 7x7 layer): the threads split the work items instead, sharing one
       packing of the input (one thread did all the work) */
    const int64_t groups = narrow ? (taps + 3) / 4 : items; /* work items of a chunk (taps_item) */
    const int split = chunks == 1 && threads > 1 && groups > 1;
    if (!split && threads > chunks) threads = (int32_t)chunks; /* (a thread without a chunk would only add zeros) */
    const int32_t copies = split ? 1 : threads; /* sets of int32 sums */
    /* copy u's packed chunk at buf + u * per_thread, its int32 sums per_thread_b bytes further */
    size_t per_thread_b = (size_t)(phases * jn * chunk) * 1024, per_thread = per_thread_b + (size_t)items * 32 * 32 * 4;
    int8_t *buf = scratch(0, (size_t)copies * per_thread);
    /* VNNI: each thread's column sums of the tiles it packed, [phases][jn * 16] int32 */
    const int64_t csum_n = phases * jn * 16;
    int32_t *csums = vnni ? (int32_t *)calloc((size_t)(threads * csum_n), sizeof(int32_t)) : NULL;
    if (!buf || (vnni && !csums)) {
        free(csums);
        return -2;
    }
    memset(buf, 0, (size_t)copies * per_thread);
#pragma omp parallel num_threads(threads)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        int32_t *csum = vnni ? csums + t * csum_n : NULL;
        if (split) {
            int32_t *acc = (int32_t *)(buf + per_thread_b);
#pragma omp for schedule(static) collapse(3)
            for (int64_t p = 0; p < phases; p++)
                for (int64_t j = 0; j < jpack; j++)
                    for (int64_t ss = 0; ss < ks; ss++)
                        pack_phase_tile(x[p], c, tx, xc, xt, j, ss, buf + ((p * jn + j) * chunk + ss) * 1024,
                                        csum ? csum + (p * jn + j) * 16 : NULL);
            if (!vnni) configure_tiles();
#pragma omp for schedule(static)
            for (int64_t it = 0; it < groups; it++)
                taps_item(ge, ge_row, lead, taps, off, phase_of, narrow, ob, cb, jn, it, 0, ks, buf, chunk, acc, vnni);
            if (!vnni) release_tiles();
        } else {
            int8_t *bchunk = buf + (size_t)t * per_thread;
            int32_t *acc = (int32_t *)(bchunk + per_thread_b);
            if (!vnni) configure_tiles();
#pragma omp for schedule(static)
            for (int64_t q = 0; q < chunks; q++) {
                int64_t s0 = q * ks / chunks, steps = (q + 1) * ks / chunks - s0;
                for (int64_t p = 0; p < phases; p++)
                    for (int64_t j = 0; j < jpack; j++)
                        for (int64_t ss = 0; ss < steps; ss++)
                            pack_phase_tile(x[p], c, tx, xc, xt, j, s0 + ss,
                                            bchunk + ((p * jn + j) * chunk + ss) * 1024,
                                            csum ? csum + (p * jn + j) * 16 : NULL);
                for (int64_t it = 0; it < groups; it++)
                    taps_item(ge, ge_row, lead, taps, off, phase_of, narrow, ob, cb, jn, it, s0, steps, bchunk, chunk,
                              acc, vnni);
            }
            if (!vnni) release_tiles();
        }
        if (vnni) { /* the threads' column sums, times 128: the offset of the unsigned ge in each sum */
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t e = 0; e < csum_n; e++) {
                uint32_t total = 0;
                for (int u = 0; u < threads; u++) total += (uint32_t)csums[u * csum_n + e];
                csums[e] = (int32_t)(128u * total);
            }
        }
        /* the copies' sums added, then the output stage */
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            int64_t k = it / (ob * cb), i = (it / cb) % ob, j = it % cb;
            int32_t *first = (int32_t *)(buf + per_thread_b) + it * 1024;
            for (int u = 1; u < copies; u++) { /* (wrapping: VNNI's offset sums may pass 2^31) */
                const int32_t *other = (const int32_t *)(buf + (size_t)u * per_thread + per_thread_b) + it * 1024;
                for (int e = 0; e < 1024; e++) first[e] = (int32_t)((uint32_t)first[e] + (uint32_t)other[e]);
            }
            int64_t rows = o - i * 32 < 32 ? o - i * 32 : 32, cols = c - j * 32 < 32 ? c - j * 32 : 32;
            const int32_t *corr = vnni ? csums + phase_of[k] * jn * 16 + j * 32 : NULL;
            for (int64_t r = 0; r < rows; r++) {
                int64_t oo = i * 32 + r;
                float *dst = out + (oo * c + j * 32) * taps + k;
                for (int64_t qq = 0; qq < cols; qq++) {
                    int32_t sum = first[r * 32 + qq];
                    if (corr) sum = (int32_t)((uint32_t)sum - (uint32_t)corr[qq]);
                    dst[qq * taps] = (float)sum * g_step[oo] * x_step;
                }
            }
        }
    }
    free(csums);
    scratch_trim();
    return 0;
#endif
}

#ifdef LQ_AMX
/* the lanes of v added in wrapping int32 arithmetic (_mm512_reduce_add_epi32 ends in a scalar int addition: signed
   overflow when the lanes' offset sums wrap, found by review under UBSan) */
VNNI_TARGET static inline int32_t lanes_sum(__m512i v) {
    __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
    __m128i q = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0x4e));
    q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0xb1));
    return _mm_cvtsi128_si32(q);
}

/* the 64-byte steps of row[0, len): a full load, or the tail masked (nothing read past len) */
VNNI_TARGET static inline __m512i row_step(const int8_t *row, int64_t u, int64_t len) {
    if (len - u >= 64) return _mm512_loadu_si512((const void *)(row + u));
    return _mm512_maskz_loadu_epi8(((__mmask64)1 << (len - u)) - 1, row + u);
}

/* the wrapping int32 sum of the products of two byte rows of len: a unsigned (stored xor 0x80), b signed */
VNNI_TARGET static int32_t vnni_row_dot(const int8_t *a, const int8_t *b, int64_t len) {
    __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
    int64_t u = 0;
    for (; u + 128 <= len; u += 128) {
        s0 = _mm512_dpbusd_epi32(s0, _mm512_loadu_si512((const void *)(a + u)),
                                 _mm512_loadu_si512((const void *)(b + u)));
        s1 = _mm512_dpbusd_epi32(s1, _mm512_loadu_si512((const void *)(a + u + 64)),
                                 _mm512_loadu_si512((const void *)(b + u + 64)));
    }
    for (; u < len; u += 64) s0 = _mm512_dpbusd_epi32(s0, row_step(a, u, len), row_step(b, u, len));
    return lanes_sum(_mm512_add_epi32(s0, s1));
}

/* the wrapping int32 sum of a signed byte row of len (VPDPBUSD with ones as the unsigned operand) */
VNNI_TARGET static int32_t vnni_row_sum(const int8_t *b, int64_t len) {
    __m512i s = _mm512_setzero_si512(), ones = _mm512_set1_epi8(1);
    for (int64_t u = 0; u < len; u += 64) s = _mm512_dpbusd_epi32(s, ones, row_step(b, u, len));
    return lanes_sum(s);
}
#endif

/* The weight gradient by taps for few input channels (lq.ops.int8_conv_kernels._grad_weight_taps where C * taps <= O,
   e.g. a 1-channel stem) as one dot product per output channel, input channel and tap:
     out[o, c, tap] = (sum_(t < tx) ge[o, lead - off[tap] + t] * X_p(tap)[c, t]) * g_step[o] * x_step
   ge as for lq_amx_taps (the gradient on the grid at columns [lead, lead + T), zeros elsewhere, every byte xor 0x80:
   VPDPBUSD's unsigned operand; rows >= o, row stride ge_row >= lead + tx), X_p the phases' channel rows (c, t) at
   x[p][c * tx + t]. Each sum less 128 * sum_t X_p[c, t] (the offset, the same for every tap of a phase), in wrapping
   int32 arithmetic: exact wherever the true sum fits int32 (the caller's limit). The stacked torch._int_mm GEMM this
   replaces ran at ~50 GMAC/s on the stem's 16 x 9 x 57,600 (N = 9). Returns 0, -1 without VNNI, -2 when its
   channel sums could not be allocated. */
int64_t lq_taps_dots(const int8_t *ge, int64_t o, int64_t ge_row, int64_t lead, int64_t taps, const int64_t *off,
                     const int32_t *phase_of, int64_t phases, const int8_t *const *x, int64_t c, int64_t tx,
                     const float *g_step, float x_step, float *out, int32_t threads) {
#ifndef LQ_AMX
    return -1;
#else
    if (!lq_vnni_available()) return -1;
    int32_t *corr = (int32_t *)malloc((size_t)(phases * c) * sizeof(int32_t));
    if (!corr) return -2;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t e = 0; e < phases * c; e++) /* 128 * the sum of each channel row (wrapping) */
            corr[e] = (int32_t)(128u * (uint32_t)vnni_row_sum(x[e / c] + (e % c) * tx, tx));
#pragma omp for schedule(static) collapse(2)
        for (int64_t oo = 0; oo < o; oo++)
            for (int64_t cc = 0; cc < c; cc++)
                for (int64_t k = 0; k < taps; k++) {
                    int32_t p = phase_of[k];
                    uint32_t sum = (uint32_t)vnni_row_dot(ge + oo * ge_row + lead - off[k], x[p] + cc * tx, tx);
                    int32_t exact = (int32_t)(sum - (uint32_t)corr[p * c + cc]);
                    out[(oo * c + cc) * taps + k] = (float)exact * g_step[oo] * x_step;
                }
    }
    free(corr);
    return 0;
#endif
}

#ifdef LQ_AMX
/* the int32 sums of 32 grid positions (rows t0.. of xg, lda bytes apart) with 32 output channels (packed weight
   tiles of column blocks 2jb, 2jb + 1) over every tap (rows shifted by off[k]) and 64-deep step of a row */
__attribute__((target("amx-tile,amx-int8"))) static void conv_block(const int8_t *xg, int64_t lda, int64_t t0,
                                                                     int64_t taps, const int64_t *off,
                                                                     const int8_t *wp, int64_t ks, int64_t jn,
                                                                     int64_t jb, int32_t *c) {
    sums_start(c, 0);
    for (int64_t k = 0; k < taps; k++) {
        const int8_t *a = xg + (t0 + off[k]) * lda;
        const int8_t *b0 = wp + ((k * jn + 2 * jb) * ks) * 1024;
        sums_steps(a, a + 16 * lda, 64, lda, b0, b0 + ks * 1024, ks);
    }
    sums_store(c);
}

/* conv_block for at most 16 output channels: 64 grid positions (four a tiles, rows t0.. of xg) x 16 channels (column
   block 0), four independent sums (fewer would wait on each other's latency) stored as c [64][16] */
__attribute__((target("amx-tile,amx-int8"))) static void conv_block_narrow(const int8_t *xg, int64_t lda, int64_t t0,
                                                                            int64_t taps, const int64_t *off,
                                                                            const int8_t *wp, int64_t ks, int64_t jn,
                                                                            int32_t *c) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < taps; k++) {
        const int8_t *a = xg + (t0 + off[k]) * lda;
        const int8_t *b = wp + (k * jn * ks) * 1024;
        for (int64_t s = 0; s < ks; s++) {
            _tile_loadd(7, b + s * 1024, 64);
            _tile_loadd(4, a + s * 64, lda);
            _tile_loadd(5, a + 16 * lda + s * 64, lda);
            _tile_loadd(6, a + 32 * lda + s * 64, lda);
            _tile_dpbssd(0, 4, 7);
            _tile_dpbssd(1, 5, 7);
            _tile_dpbssd(2, 6, 7);
            _tile_loadd(4, a + 48 * lda + s * 64, lda);
            _tile_dpbssd(3, 4, 7);
        }
    }
    _tile_stored(0, c, 64);
    _tile_stored(1, c + 16 * 16, 64);
    _tile_stored(2, c + 32 * 16, 64);
    _tile_stored(3, c + 48 * 16, 64);
}

/* conv_block / conv_block_narrow on VNNI (xg unsigned: stored xor 0x80): narrow = 0, the 32 positions x 32 channels
   of column blocks 2jb, 2jb + 1 into c [32][32]; narrow = 1, 64 positions x 16 channels into c [64][16]. The taps
   are the kernels' segments: a_off[k] = off[k] * lda, b_off[k] = k * jn * ks * 1024. */
static void conv_block_vnni(const int8_t *xg, int64_t lda, int64_t t0, int64_t taps, const int64_t *a_off,
                            const int64_t *b_off, const uint8_t *kn, const int8_t *wp, int64_t ks, int64_t jb,
                            int narrow, int32_t *c) {
    const int8_t *b = wp + 2 * jb * ks * 1024;
    for (int rg = 0; rg < 4; rg++) {
        if (narrow)
            (kn ? vnni_16x16_rows : vnni_16x16)(xg + (t0 + 16 * rg) * lda, lda, 64, b, 1024, ks, taps, a_off, b_off,
                                                kn, c + 16 * rg * 16, 16, 0);
        else
            (kn ? vnni_8x32_rows : vnni_8x32)(xg + (t0 + 8 * rg) * lda, lda, 64, b, 1024, ks * 1024, ks, taps, a_off,
                                              b_off, kn, c + 8 * rg * 32, 32, 0);
    }
}

/* Where lq_amx_conv writes its outputs: y fp32 channels-last [N, yh, yw, yc], or row-major [N, yc, yh, yw] with nchw
   = 1. Plain (s2d = 0): grid position (a, b) and channel ch to y[n, a, b, ch] (yh = ho, yw = wo, yc = O).
   Depth-to-space (s2d = 1, a stride-2 convolution's input gradient on the space-to-depth grid): channel ch = (2p + q)
   * yc + c to y[n, 2a + p - crop_h, 2b + q - crop_w, c] where that lies inside y. */
typedef struct {
    float *y;
    int64_t yh, yw, yc, crop_h, crop_w;
    int32_t s2d, nchw;
} conv_out;

/* finish_block for a row-major (NCHW) y: each run of outputs along one image row finished into an L1 buffer as
   finish_row does, then copied out channel by channel (strided reads from L1, contiguous stores: the input gradient of
   a row-major input without a separate transposing copy of the whole fp32 result, ~3 ms for 32 x 64 x 56 x 56) */
__attribute__((target("avx512f"))) static void finish_block_nchw(const int32_t *acc, int64_t rows, int64_t lda,
                                                                 int64_t t0, int64_t t_out, int64_t hs, int64_t ws,
                                                                 int64_t ho, int64_t wo, int64_t ch0, int64_t cols,
                                                                 float x_step, const float *bs, const float *bias,
                                                                 const int32_t *corr, const conv_out *out) {
    float tmp[64 * 32] __attribute__((aligned(64))); /* rows <= 64, cols <= 32 */
    const int64_t yc = out->yc, yh = out->yh, yw = out->yw, plane = yh * yw;
    int64_t img = t0 / (hs * ws), rem = t0 % (hs * ws), a = rem / ws, b = rem % ws;
    int64_t r = 0, end = t_out - t0 < rows ? t_out - t0 : rows;
    while (r < end) {
        int64_t len = 1;
        if (a < ho && b < wo) {
            len = wo - b < end - r ? wo - b : end - r;
            for (int64_t k = 0; k < len; k++)
                finish_row(acc + (r + k) * lda, x_step, bs + ch0, bias ? bias + ch0 : NULL, cols, tmp + k * cols,
                           corr ? corr + ch0 : NULL);
            if (!out->s2d) {
                float *dst = out->y + ((img * yc + ch0) * yh + a) * yw + b;
                for (int64_t j = 0; j < cols; j++)
                    for (int64_t k = 0; k < len; k++) dst[j * plane + k] = tmp[k * cols + j];
            } else {
                for (int64_t j = 0; j < cols; j++) {
                    int64_t ch = ch0 + j, pq = ch / yc, cc = ch % yc, yy = 2 * a + pq / 2 - out->crop_h;
                    if (yy < 0 || yy >= yh) continue;
                    float *dst = out->y + (img * yc + cc) * plane + yy * yw;
                    for (int64_t k = 0; k < len; k++) {
                        int64_t xx = 2 * (b + k) + pq % 2 - out->crop_w;
                        if (xx >= 0 && xx < yw) dst[xx] = tmp[k * cols + j];
                    }
                }
            }
        }
        r += len;
        b += len;
        if (b == ws) {
            b = 0;
            if (++a == hs) {
                a = 0;
                img++;
            }
        }
    }
}

/* the output stage of one block of sums acc [rows][lda] (grid positions t0.., channels ch0 .. ch0 + cols) into y:
   the block's first position as (image, row, column), then stepped along (divisions per position were most of a
   16-channel layer's time) */
__attribute__((target("avx512f"))) static void finish_block(const int32_t *acc, int64_t rows, int64_t lda,
                                                            int64_t t0, int64_t t_out, int64_t hs, int64_t ws,
                                                            int64_t ho, int64_t wo, int64_t ch0, int64_t cols,
                                                            float x_step, const float *bs, const float *bias,
                                                            const int32_t *corr, const conv_out *out) {
    if (out->nchw) {
        finish_block_nchw(acc, rows, lda, t0, t_out, hs, ws, ho, wo, ch0, cols, x_step, bs, bias, corr, out);
        return;
    }
    int64_t img = t0 / (hs * ws), rem = t0 % (hs * ws), a = rem / ws, b = rem % ws, yc = out->yc;
    for (int64_t r = 0; r < rows && t0 + r < t_out; r++) {
        if (a < ho && b < wo) {
            const int32_t *c = acc + r * lda;
            if (!out->s2d) {
                finish_row(c, x_step, bs + ch0, bias ? bias + ch0 : NULL, cols,
                           out->y + ((img * out->yh + a) * out->yw + b) * yc + ch0, corr ? corr + ch0 : NULL);
            } else {
                for (int64_t j = 0; j < cols;) { /* runs of channels of one (p, q) */
                    int64_t ch = ch0 + j, pq = ch / yc, cc = ch % yc, run = yc - cc < cols - j ? yc - cc : cols - j;
                    int64_t yy = 2 * a + pq / 2 - out->crop_h, xx = 2 * b + pq % 2 - out->crop_w;
                    if (yy >= 0 && yy < out->yh && xx >= 0 && xx < out->yw)
                        finish_row(c + j, x_step, bs + ch, bias ? bias + ch : NULL, run,
                                   out->y + ((img * out->yh + yy) * out->yw + xx) * yc + cc, corr ? corr + ch : NULL);
                    j += run;
                }
            }
        }
        if (++b == ws) {
            b = 0;
            if (++a == hs) {
                a = 0;
                img++;
            }
        }
    }
}
#endif

/* A stride-1, one-group convolution on the tile unit (implicit GEMM over the input's grid, lq.ops.native_quant):
     y[n, a, b, o] = ((float)(sum_(tap, k < kc) A[t + off[tap], k] * w[o, k, tap]) * x_step) * w_step[o] + bias[o]
   for grid position t = n * hs * ws + a * ws + b (a < ho, b < wo), where A's row t is the kc bytes at xg + t * lda
   (kc a multiple of 64). With lda = kc that is the zero-padded input on the grid, position-major, its channels
   padded to kc; with lda = C < kc = 64 (C dividing 64) a row spans 64 / C neighbouring positions, i.e. as many
   horizontal taps of a kernel row (the caller's weight holds them as one "tap" of 64 channels). xg holds rows up
   to t_out rounded up to 64 plus the largest off (and the bytes a row reads beyond); w: int8 [O, c, taps]
   (row-major; k >= c reads as 0); y: fp32 channels-last, [N, Ho, Wo, O] (s2d = 0; yh = ho, yw = wo) or, with
   s2d = 1, [N, yh, yw, O / 4] written depth-to-space (conv_out); nchw = 1: y row-major, [N, O (/ 4), yh, yw].
   The weight is packed once per call, each
   output block of 32 positions x 32 channels sums every tap and step in the tile registers, and the output stage is
   applied in L1. vnni = 1: AVX-512 VNNI instead of the tile unit, xg stored xor 0x80 (lq_conv_grid's flip: every
   byte a row reads, the zeros too), each sum less 128 * the sum of its output channel's weights.
   Returns 0, -1 without AMX (VNNI), -2 when a buffer could not be allocated. */
int64_t lq_amx_conv(const int8_t *xg, int64_t lda, int64_t kc, int64_t t_out, int64_t taps, const int64_t *off,
                    const int8_t *w, int64_t o, int64_t c, int64_t hs, int64_t ws, int64_t ho, int64_t wo, float x_step,
                    const float *w_step, const float *bias, float *y, int64_t yh, int64_t yw, int32_t s2d,
                    int64_t crop_h, int64_t crop_w, int32_t threads, int32_t vnni, int32_t nchw) {
#ifndef LQ_AMX
    return -1;
#else
    if (vnni && !lq_vnni_available()) return -1;
    int64_t op = (o + 31) / 32 * 32, jn = op / 16, ks = kc / 64, tb = (t_out + 31) / 32, ob = op / 32;
    int8_t *wp = scratch(0, (size_t)(taps * jn * ks) * 1024);
    int32_t *corr = vnni ? (int32_t *)calloc((size_t)op, sizeof(int32_t)) : NULL;
    int64_t *seg = vnni ? (int64_t *)malloc((size_t)(2 * taps) * sizeof(int64_t)) : NULL; /* a_off, b_off */
    /* the used 4-byte rows of each step, per block of 32 output columns: kn[(jb * taps + tap) * ks + step] */
    uint8_t *kn = vnni ? (uint8_t *)malloc((size_t)(ob * taps * ks)) : NULL;
    const uint8_t *kn_use = NULL; /* kn, or NULL where every step is full (set once inside the parallel region) */
    if (!wp || (vnni && (!corr || !seg || !kn))) {
        free(corr);
        free(seg);
        free(kn);
        return -2;
    }
    for (int64_t k = 0; vnni && k < taps; k++) {
        seg[k] = off[k] * lda;
        seg[taps + k] = k * jn * ks * 1024;
    }
    for (int64_t oo = 0; vnni && oo < o; oo++) { /* 128 * the sum of output channel oo's weights (wrapping) */
        uint32_t total = 0;
        for (int64_t e = 0; e < c * taps; e++) total += (uint32_t)(int32_t)w[oo * c * taps + e];
        corr[oo] = (int32_t)(128u * total);
    }
    const conv_out out = {y, yh, yw, s2d ? o / 4 : o, crop_h, crop_w, s2d, nchw};
#pragma omp parallel num_threads(threads)
    {
        int32_t acc[32 * 32] __attribute__((aligned(64)));
#pragma omp for schedule(static) collapse(3)
        for (int64_t k = 0; k < taps; k++)
            for (int64_t j = 0; j < jn; j++)
                for (int64_t s = 0; s < ks; s++)
                    pack_b_tile(w + k, o, c, c * taps, taps, j, s, wp + ((k * jn + j) * ks + s) * 1024);
        if (vnni) { /* per block of 32 output columns, tap and step: 1 + the last 4-byte row with a nonzero weight in
                       any of the block's columns (the rows after it are zero in all of them, so the kernels skip them:
                       no product and no offset correction). Fewer than 64 input channels leave whole rows of a step
                       zero (a 3-wide 1-channel tap 13 of 16); a stride-2 layer's phases leave whole taps zero (its
                       input gradient's output phase (0, 0) needs 1 of the 2 x 2 taps: 9 of 16 overall, phase-major
                       channels, so each block of 32 holds one phase where C >= 32). None (kn_use NULL, the kernels'
                       unrolled 16 rows) where every step is full. */
#pragma omp single
            {
                int partial = 0;
                for (int64_t e = 0; e < ob * taps * ks; e++) {
                    int64_t jb = e / (taps * ks), k = e / ks % taps, st = e % ks;
                    int used = 0;
                    for (int64_t j = 2 * jb; j < 2 * jb + 2 && used < 16; j++) {
                        const int8_t *tile = wp + ((k * jn + j) * ks + st) * 1024;
                        for (int r = 15; r >= used; r--) {
                            uint64_t row[8]; /* (memcpy: the int8 buffer read as words without aliasing it) */
                            memcpy(row, tile + r * 64, sizeof row);
                            if (row[0] | row[1] | row[2] | row[3] | row[4] | row[5] | row[6] | row[7]) {
                                used = r + 1;
                                break;
                            }
                        }
                    }
                    kn[e] = (uint8_t)used;
                    partial |= used < 16;
                }
                kn_use = partial ? kn : NULL;
            }
        }
        if (!vnni) configure_tiles();
        if (o <= 16) {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < (t_out + 63) / 64; i++) {
                if (vnni)
                    conv_block_vnni(xg, lda, i * 64, taps, seg, seg + taps, kn_use, wp, ks, 0, 1, acc);
                else
                    conv_block_narrow(xg, lda, i * 64, taps, off, wp, ks, jn, acc);
                finish_block(acc, 64, 16, i * 64, t_out, hs, ws, ho, wo, 0, o, x_step, w_step, bias, corr, &out);
            }
        } else {
#pragma omp for schedule(static) collapse(2)
            for (int64_t i = 0; i < tb; i++) {
                for (int64_t jb = 0; jb < ob; jb++) {
                    int64_t cols = o - jb * 32 < 32 ? o - jb * 32 : 32;
                    if (vnni)
                        conv_block_vnni(xg, lda, i * 32, taps, seg, seg + taps,
                                        kn_use ? kn_use + jb * taps * ks : NULL, wp, ks, jb, 0, acc);
                    else
                        conv_block(xg, lda, i * 32, taps, off, wp, ks, jn, jb, acc);
                    finish_block(acc, 32, 32, i * 32, t_out, hs, ws, ho, wo, jb * 32, cols, x_step, w_step, bias,
                                 corr, &out);
                }
            }
        }
        if (!vnni) release_tiles();
    }
    free(corr);
    free(seg);
    free(kn);
    scratch_trim();
    return 0;
#endif
}

/* dst = src with every byte xor-ed with fill (0: a copy) */
static inline void copy_flipped(int8_t *dst, const int8_t *src, int64_t len, int fill) {
    if (!fill) {
        memcpy(dst, src, (size_t)len);
        return;
    }
    for (int64_t e = 0; e < len; e++) dst[e] = (int8_t)(src[e] ^ fill);
}

/* out[i] = src[index[i]] for index[i] < numel, else 0: a weight laid out as the kernels' packed-tap operand
   (native_quant._tap_index's positions; numel marks a zero), in one call instead of a chain of torch ops. */
void lq_gather_i8(const int8_t *src, int64_t numel, const int32_t *index, int64_t m, int8_t *out) {
    for (int64_t i = 0; i < m; i++) {
        int32_t k = index[i];
        out[i] = (k >= 0 && k < numel) ? src[k] : 0;
    }
}

/* lq_amx_conv's input grid from a channels-last int8 x [N, H, W, C] (memory order): grid rows of cg bytes (cg >= C,
   or >= 4C with s2d), rows_total of them (the N * hs * ws grid positions first; the rest zero). flip = 0x80: every
   byte xor-ed with 0x80 (the VNNI kernels' unsigned operand; zeros as 0x80).
     s2d = 0: row (n, u, v) holds x[n, u - ph, v - pw, :] (zero outside the image, and bytes C.. of the row)
     s2d = 1: row (n, u, v) holds x[n, 2u + p - ph, 2v + q - pw, :] at bytes (2p + q) * C .. (space-to-depth) */
void lq_conv_grid(const int8_t *x, int64_t n, int64_t h, int64_t w, int64_t c, int64_t ph, int64_t pw, int32_t s2d,
                  int64_t hs, int64_t ws, int64_t cg, int8_t *xg, int64_t rows_total, int32_t flip, int32_t threads) {
    const int64_t f = s2d ? 2 : 1;
    const int fill = flip & 0xff;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t nu = 0; nu < n * hs; nu++) {
            int64_t img = nu / hs, u = nu % hs;
            int8_t *dst = xg + nu * ws * cg;
            if (!s2d && cg == c) { /* the row's image pixels copied, only the borders filled (each byte written once) */
                int64_t r = u - ph, v0 = pw > 0 ? pw : 0, x0 = v0 - pw, len = (w - x0 < ws - v0 ? w - x0 : ws - v0);
                if (r < 0 || r >= h || len <= 0) {
                    memset(dst, fill, (size_t)(ws * cg));
                    continue;
                }
                memset(dst, fill, (size_t)(v0 * cg));
                copy_flipped(dst + v0 * cg, x + ((img * h + r) * w + x0) * c, len * c, fill);
                memset(dst + (v0 + len) * cg, fill, (size_t)((ws - v0 - len) * cg));
                continue;
            }
            memset(dst, fill, (size_t)(ws * cg));
            for (int64_t p = 0; p < f; p++) {
                int64_t r = f * u + p - ph;
                if (r < 0 || r >= h) continue;
                const int8_t *src = x + (img * h + r) * w * c;
                for (int64_t v = 0; v < ws; v++)
                    for (int64_t q = 0; q < f; q++) {
                        int64_t col = f * v + q - pw;
                        if (col >= 0 && col < w) copy_flipped(dst + v * cg + (p * f + q) * c, src + col * c, c, fill);
                    }
            }
        }
#pragma omp single
        memset(xg + n * hs * ws * cg, fill, (size_t)((rows_total - n * hs * ws) * cg));
    }
}
