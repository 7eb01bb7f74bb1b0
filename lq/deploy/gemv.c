/* lq batch-1 int8 Linear chains: eq. 7 and eq. 10 of Wu et al. 2020 for a few rows, every layer in one call.
 *
 * Built at first use by lq/deploy/gemv.py (cc -O3 -fopenmp -ffp-contract=off) and called through ctypes. At batch
 * 1 a Linear layer is a matrix-vector product that streams its int8 weight once: the library kernels (fbgemm,
 * oneDNN, torch._int_mm) take 37-57 us for a 1024 x 1024 weight on a 2-core AVX-512 VNNI host, about a quarter of
 * what the cache bandwidth allows, and a chain of them adds a Python call and an output-stage op per layer.
 * Here each thread owns a fixed slice of every layer's output rows (so it streams the same weight rows on every
 * call), computes the exact int32 sums (VNNI u8 x s8 on AVX-512 VNNI, int16 multiply-add on AVX2, plain C
 * elsewhere: the same integers on every path), and writes fbgemm's output stage
 *     y = acc * mult[j] + bias[j]   (one fused multiply-add, or a multiply and an add: lq/deploy/gemv.py finds
 *                                    which one fbgemm computes on this CPU and sets each layer's `mode`)
 * then ReLU and either the next layer's eq. 7 integers clip(round(y * s'), 0, q') or the float output. The first
 * layer's float input is quantized here too: clip(round(x * s), -q, q), round half to even, fp32 product.
 *
 * Integers between layers are stored as u = q + 128 (uint8), the form VNNI's u8 x s8 product takes; each layer's
 * `wsum` (128 * the row sums of its weight) takes the 128 back out. Rows of the weight are padded with zeros to a
 * multiple of 64 bytes (`kp`), the integer buffers with 128 (the integer 0).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LQ_X86 1
#endif

typedef struct {
    const int8_t *w;      /* n x kp, row-major, zero padded */
    const int32_t *wsum;  /* n: 128 * sum_k w[j, k] */
    const float *mult;    /* n: eq. 10's factor step_x * step_w[j] (fp32) */
    const float *bias;    /* n, or NULL */
    int64_t n, k, kp;
    int32_t relu;         /* ReLU on y */
    float next_s;         /* the next layer's input scale s' (its eq. 7); 0: float output */
    int32_t next_qmax;
    /* how the output stage rounds (Linear: as fbgemm, found once; convolutions: as oneDNN, found per layer and
       input size): 0 acc * mult + bias, 1 fma(acc, mult, bias), 2 (acc * sx) * wstep[j] + bias */
    int32_t mode;
    float sx;
    const float *wstep;
} lq_layer;

enum { LQ_SCALAR = 0, LQ_AVX2 = 1, LQ_VNNI = 2 };

int32_t lq_isa(void) {
#ifdef LQ_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
        return LQ_VNNI;
    if (__builtin_cpu_supports("avx2")) return LQ_AVX2;
#endif
    return LQ_SCALAR;
}

/* sum of u (uint8, kp bytes) with one weight row (before the 128 correction) */
static inline int32_t dot1(const uint8_t *u, const int8_t *w, int64_t kp) {
    int32_t a = 0;
    for (int64_t k = 0; k < kp; k++) a += (int32_t)u[k] * (int32_t)w[k];
    return a;
}

/* ... with four weight rows w, w + kp, w + 2 kp, w + 3 kp */
static void dot4_scalar(const uint8_t *u, const int8_t *w, int64_t kp, int32_t *acc) {
    for (int r = 0; r < 4; r++) acc[r] = dot1(u, w + r * kp, kp);
}

static void dot4x4_scalar(const uint8_t *u, int64_t ldu, const int8_t *w, int64_t kp, int32_t acc[4][4]) {
    for (int r = 0; r < 4; r++) dot4_scalar(u + r * ldu, w, kp, acc[r]);
}

#ifdef LQ_X86
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void dot4_vnni(const uint8_t *u, const int8_t *w, int64_t kp, int32_t *acc) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < kp; k += 64) {  /* vpdpbusd: four u8 x s8 products per int32 lane, no saturation */
        __m512i uv = _mm512_loadu_si512((const void *)(u + k));
        a0 = _mm512_dpbusd_epi32(a0, uv, _mm512_loadu_si512((const void *)(w + k)));
        a1 = _mm512_dpbusd_epi32(a1, uv, _mm512_loadu_si512((const void *)(w + kp + k)));
        a2 = _mm512_dpbusd_epi32(a2, uv, _mm512_loadu_si512((const void *)(w + 2 * kp + k)));
        a3 = _mm512_dpbusd_epi32(a3, uv, _mm512_loadu_si512((const void *)(w + 3 * kp + k)));
    }
    acc[0] = _mm512_reduce_add_epi32(a0);
    acc[1] = _mm512_reduce_add_epi32(a1);
    acc[2] = _mm512_reduce_add_epi32(a2);
    acc[3] = _mm512_reduce_add_epi32(a3);
}

/* four input rows (stride ldu) with four weight rows: acc[r][c]; the weights are read once for the four rows */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void dot4x4_vnni(const uint8_t *u, int64_t ldu, const int8_t *w, int64_t kp, int32_t acc[4][4]) {
    __m512i a[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) a[r][c] = _mm512_setzero_si512();
    for (int64_t k = 0; k < kp; k += 64) {
        __m512i wv[4];
        for (int c = 0; c < 4; c++) wv[c] = _mm512_loadu_si512((const void *)(w + c * kp + k));
        for (int r = 0; r < 4; r++) {
            __m512i uv = _mm512_loadu_si512((const void *)(u + r * ldu + k));
            for (int c = 0; c < 4; c++) a[r][c] = _mm512_dpbusd_epi32(a[r][c], uv, wv[c]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_reduce_add_epi32(a[r][c]);
}

__attribute__((target("avx2")))
static inline __m256i madd16(const uint8_t *u, const int8_t *w) {
    /* 16 products widened to int16 (exact), pairs summed into int32 (|255 * 128 * 2| fits): no saturation,
       unlike _mm256_maddubs_epi16 (u8 x s8 -> saturated int16) */
    __m256i uv = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)u));
    __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
    return _mm256_madd_epi16(uv, wv);
}

__attribute__((target("avx2")))
static inline int32_t hsum8(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

__attribute__((target("avx2")))
static void dot4_avx2(const uint8_t *u, const int8_t *w, int64_t kp, int32_t *acc) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < kp; k += 16) {
        a0 = _mm256_add_epi32(a0, madd16(u + k, w + k));
        a1 = _mm256_add_epi32(a1, madd16(u + k, w + kp + k));
        a2 = _mm256_add_epi32(a2, madd16(u + k, w + 2 * kp + k));
        a3 = _mm256_add_epi32(a3, madd16(u + k, w + 3 * kp + k));
    }
    acc[0] = hsum8(a0);
    acc[1] = hsum8(a1);
    acc[2] = hsum8(a2);
    acc[3] = hsum8(a3);
}

__attribute__((target("avx2")))
static void dot4x4_avx2(const uint8_t *u, int64_t ldu, const int8_t *w, int64_t kp, int32_t acc[4][4]) {
    for (int r = 0; r < 4; r++) dot4_avx2(u + r * ldu, w, kp, acc[r]);
}
#endif

static inline float clampf(float t, float lo, float hi) { return t < lo ? lo : (t > hi ? hi : t); }

/* eq. 10 + ReLU for output j of a layer from its raw u8 x s8 sum, rounded as L->mode says (0, 1, 2 above) */
static inline float output(const lq_layer *L, int64_t j, int32_t raw) {
    float a = (float)(raw - L->wsum[j]), y;
    if (L->mode == 2) {
        y = (a * L->sx) * L->wstep[j];
        if (L->bias) y = y + L->bias[j];
    } else if (L->bias) y = L->mode ? fmaf(a, L->mult[j], L->bias[j]) : a * L->mult[j] + L->bias[j];
    else y = a * L->mult[j];
    if (L->relu && !(y > 0.0f)) y = 0.0f;
    return y;
}

/* The per-instruction-set parts, each compiled for its target (so that fmaf and nearbyintf are instructions
 * there, not library calls): eq. 7 of a float row, and outputs j0 .. j0 + cnt - 1 of a layer for all rows. */
#define LQ_QUANTIZE_ROW                                                                  \
    for (int64_t i = 0; i < k; i++) {                                                    \
        float t = x[i] * s;                                                              \
        if (!isfinite(t)) return 1 + i;                                                  \
        u[i] = (uint8_t)((int32_t)clampf(nearbyintf(t), -q, q) + 128);                   \
    }                                                                                    \
    return 0;

/* outputs j0 .. j0 + cnt - 1 of layer L for all m rows (row r's integers at cur + r * width; its hand-over
 * integers at nxt + r * ldn, its float outputs at out + r * ldo) */
#define LQ_STORE(R, C, ACC)                                                                             \
    {                                                                                                   \
        float y = output(L, j0 + (C), (ACC));                                                           \
        if (L->next_s != 0.0f) /* y >= 0 (ReLU): the next layer's eq. 7, lower clip 0 */                \
            nxt[(R) * ldn + j0 + (C)] =                                                                 \
                (uint8_t)((int32_t)clampf(nearbyintf(y * L->next_s), 0.0f, (float)L->next_qmax) + 128); \
        else                                                                                            \
            out[(R) * ldo + j0 + (C)] = y;                                                              \
    }

#define LQ_BLOCK(DOT4, DOT4X4)                                                                          \
    const int8_t *w = L->w + j0 * L->kp;                                                                \
    int64_t r = 0;                                                                                      \
    if (cnt == 4)                                                                                       \
        for (; r + 4 <= m; r += 4) {                                                                    \
            int32_t acc[4][4];                                                                          \
            DOT4X4(cur + r * width, width, w, L->kp, acc);                                              \
            for (int64_t i = 0; i < 4; i++)                                                             \
                for (int64_t c = 0; c < 4; c++) LQ_STORE(r + i, c, acc[i][c])                           \
        }                                                                                               \
    for (; r < m; r++) {                                                                                \
        int32_t acc[4];                                                                                 \
        const uint8_t *u = cur + r * width;                                                             \
        if (cnt == 4) DOT4(u, w, L->kp, acc);                                                           \
        else for (int64_t c = 0; c < cnt; c++) acc[c] = dot1(u, w + c * L->kp, L->kp);                  \
        for (int64_t c = 0; c < cnt; c++) LQ_STORE(r, c, acc[c])                                        \
    }

typedef int64_t (*quantize_fn)(const float *x, int64_t k, float s, float q, uint8_t *u);
#define LQ_BLOCK_ARGS                                                                                   \
    const lq_layer *L, int64_t j0, int64_t cnt, const uint8_t *cur, uint8_t *nxt, float *out, int64_t m,     \
        int64_t width, int64_t ldn, int64_t ldo
typedef void (*block_fn)(LQ_BLOCK_ARGS);

static int64_t quantize_scalar(const float *x, int64_t k, float s, float q, uint8_t *u) { LQ_QUANTIZE_ROW }
static void block_scalar(LQ_BLOCK_ARGS) { LQ_BLOCK(dot4_scalar, dot4x4_scalar) }
#ifdef LQ_X86
__attribute__((target("avx2,fma")))
static int64_t quantize_avx2(const float *x, int64_t k, float s, float q, uint8_t *u) { LQ_QUANTIZE_ROW }
__attribute__((target("avx2,fma")))
static void block_avx2(LQ_BLOCK_ARGS) { LQ_BLOCK(dot4_avx2, dot4x4_avx2) }
__attribute__((target("avx512f,avx512bw,avx512vnni,fma")))
static void block_vnni(LQ_BLOCK_ARGS) { LQ_BLOCK(dot4_vnni, dot4x4_vnni) }
#endif

/* One call for the whole chain on m rows of x (row stride ldx floats): returns 0, or 1 + the flat index
 * (row * k + column) of the first input whose x * s is not finite (NaN, Inf, or an overflowing product:
 * eq. 7 cannot represent it; the caller raises, naming the layer). `out` is m x n_last (row stride n_last);
 * `work` holds 2 * m * width bytes, width >= every layer's kp. `isa` <= lq_isa(). */
int64_t lq_chain(const lq_layer *layers, int32_t nl, int64_t m, const float *x, int64_t ldx, float s, int32_t qmax,
                 float *out, uint8_t *work, int64_t width, int32_t isa, int32_t threads) {
    quantize_fn quantize = quantize_scalar;
    block_fn block = block_scalar;
#ifdef LQ_X86
    if (isa >= LQ_AVX2) quantize = quantize_avx2;
    if (isa == LQ_AVX2) block = block_avx2;
    if (isa == LQ_VNNI) block = block_vnni;
#endif
    const lq_layer *first = &layers[0];
    uint8_t *buf[2] = {work, work + m * width};
    for (int64_t r = 0; r < m; r++) {
        uint8_t *u = buf[0] + r * width;
        int64_t bad = quantize(x + r * ldx, first->k, s, (float)qmax, u);
        if (bad) return r * first->k + bad;
        memset(u + first->k, 128, (size_t)(first->kp - first->k));
    }
    int64_t n_last = layers[nl - 1].n;
#pragma omp parallel num_threads(threads)
    {
        for (int32_t l = 0; l < nl; l++) {
            const lq_layer *L = &layers[l];
            const uint8_t *cur = buf[l % 2];
            uint8_t *nxt = buf[(l + 1) % 2];
            int64_t blocks = (L->n + 3) / 4;
#pragma omp for schedule(static)
            for (int64_t b = 0; b < blocks; b++) {  /* each thread: the same output rows on every call */
                int64_t j0 = 4 * b, cnt = L->n - j0 < 4 ? L->n - j0 : 4;
                block(L, j0, cnt, cur, nxt, out, m, width, width, n_last);
            }
            /* (implicit barrier: the layer's integers are all written) */
            if (l + 1 < nl) {
                int64_t pad = layers[l + 1].kp - L->n;
#pragma omp for schedule(static)
                for (int64_t r = 0; r < m; r++) memset(nxt + r * width + L->n, 128, (size_t)pad);
            }
        }
    }
    return 0;
}


/* ------------------------------------------------------------------------------------------------------------
 * Conv2d chains (a Sequential of int8 Conv2d, ReLU, MaxPool2d at small batches): eq. 7 on the float input, then
 * per convolution an im2col of the uint8 NHWC integers (taps ordered (kh, kw, cin); padding is the integer 0,
 * i.e. 128) and the (pixels x output channels) product (conv_rows_vnni; elsewhere the Linear chain's blocks), max
 * pooling on the integers (it commutes with the quantizer; u = q + 128 keeps the order), and a float output at
 * the end. At batch 1 a
 * convolution is a few million MACs: oneDNN's per-call set-up (~60-100 us a convolution) is what costs.
 */
typedef struct {
    int32_t kind;         /* 0: convolution, 1: max pooling */
    lq_layer gemm;        /* convolution: w [cout, kp] with k = kh * kw * cin; n = cout; next_s / relu as above */
    int64_t cin, h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw;  /* (pooling: cin channels, window kh x kw) */
    /* the weight again for the VNNI kernel, output channels in the lanes: [ceil(cout / 16)][kp / 4][16][4] int8
       (zero channels past cout), with wsum / mult / bias padded to 16 * ceil(cout / 16) */
    const int8_t *wv;
    const int32_t *wsum16;
    const float *mult16, *bias16, *wstep16;
    int64_t kq;           /* k rounded up to 4: the VNNI kernel's im2col row (no padding to 64 bytes) */
} lq_conv_op;

#ifdef LQ_X86
/* Rows r0 .. r0 + 3 of the (pixels x channels) product of a convolution, every output channel: 16 channels per
 * register (vpdpbusd of four broadcast input bytes with the packed weights), so the output stage runs on whole
 * registers (eq. 10 with fbgemm's / oneDNN's rounding, ReLU, the next layer's eq. 7). Rows past m are computed
 * from the buffer's spare rows and not stored. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
static void conv_rows_vnni(const lq_conv_op *op, const uint8_t *col, int64_t r0, int64_t m, uint8_t *nxt,
                           float *out, int32_t nchw) {
    const lq_layer *L = &op->gemm;
    const int32_t mode = L->mode;
    const __m512 sx = _mm512_set1_ps(L->sx);
    int64_t kp = op->kq, groups = (L->n + 15) / 16;
    const __m512 zero = _mm512_setzero_ps(), top = _mm512_set1_ps((float)L->next_qmax);
    const __m512 s = _mm512_set1_ps(L->next_s);
    const __m512i zp = _mm512_set1_epi32(128);
    const int64_t hw = op->oh * op->ow;
    const __m512i lanes = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32((int32_t)hw));  /* NCHW: channel j0 + i at i * hw */
    for (int64_t g0 = 0; g0 < groups; g0 += 4) {
        int64_t gn = groups - g0 < 4 ? groups - g0 : 4;
        __m512i acc[4][4];
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_si512();
        for (int64_t k4 = 0; k4 < kp / 4; k4++) {
            __m512i wv[4];
            for (int c = 0; c < gn; c++)
                wv[c] = _mm512_loadu_si512((const void *)(op->wv + ((g0 + c) * (kp / 4) + k4) * 64));
            for (int r = 0; r < 4; r++) {
                int32_t four;
                memcpy(&four, col + (r0 + r) * kp + 4 * k4, 4);
                __m512i ub = _mm512_set1_epi32(four);
                for (int c = 0; c < gn; c++) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], ub, wv[c]);
            }
        }
        for (int c = 0; c < gn; c++) {
            int64_t j0 = (g0 + c) * 16;
            __mmask16 keep = L->n - j0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (L->n - j0)) - 1);
            __m512i ws = _mm512_loadu_si512((const void *)(op->wsum16 + j0));
            __m512 mu = _mm512_loadu_ps(op->mult16 + j0);
            __m512 bi = op->bias16 ? _mm512_loadu_ps(op->bias16 + j0) : zero;
            __m512 sw = mode == 2 ? _mm512_loadu_ps(op->wstep16 + j0) : zero;
            for (int r = 0; r < 4 && r0 + r < m; r++) {
                __m512 a = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][c], ws)), y;
                if (mode == 2) {
                    y = _mm512_mul_ps(_mm512_mul_ps(a, sx), sw);
                    if (op->bias16) y = _mm512_add_ps(y, bi);
                } else if (!op->bias16) y = _mm512_mul_ps(a, mu);
                else y = mode ? _mm512_fmadd_ps(a, mu, bi) : _mm512_add_ps(_mm512_mul_ps(a, mu), bi);
                if (L->relu) y = _mm512_max_ps(y, zero);
                int64_t row = (r0 + r) * L->n + j0;
                if (L->next_s != 0.0f) {
                    __m512 t = _mm512_roundscale_ps(_mm512_mul_ps(y, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    t = _mm512_min_ps(_mm512_max_ps(t, zero), top);
                    __m512i u = _mm512_add_epi32(_mm512_cvtps_epi32(t), zp);
                    _mm_mask_storeu_epi8(nxt + row, keep, _mm512_cvtepi32_epi8(u));
                } else if (nchw) {  /* (row r0 + r is pixel p of image b: element (b, j, p)) */
                    int64_t b = (r0 + r) / hw, p = (r0 + r) % hw;
                    _mm512_mask_i32scatter_ps(out + (b * L->n + j0) * hw + p, keep, lanes, y, 4);
                } else {
                    _mm512_mask_storeu_ps(out + row, keep, y);
                }
            }
        }
    }
}
#endif

static void im2col(const lq_conv_op *op, int64_t n, const uint8_t *src, uint8_t *col, int64_t ld) {
    const lq_layer *L = &op->gemm;
    int64_t rows = n * op->oh * op->ow;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        int64_t b = r / (op->oh * op->ow), oy = (r / op->ow) % op->oh, ox = r % op->ow;
        uint8_t *dst = col + r * ld;
        for (int64_t i = 0; i < op->kh; i++) {
            int64_t iy = oy * op->sh - op->ph + i * op->dh;
            for (int64_t j = 0; j < op->kw; j++) {
                int64_t ix = ox * op->sw - op->pw + j * op->dw;
                uint8_t *d = dst + (i * op->kw + j) * op->cin;
                if (iy < 0 || iy >= op->h || ix < 0 || ix >= op->w) {
                    for (int64_t c = 0; c < op->cin; c++) d[c] = 128;
                } else {
                    const uint8_t *sp = src + ((b * op->h + iy) * op->w + ix) * op->cin;
                    if (op->cin < 16) for (int64_t c = 0; c < op->cin; c++) d[c] = sp[c];  /* (no call per tap) */
                    else memcpy(d, sp, (size_t)op->cin);
                }
            }
        }
        for (int64_t c = L->k; c < ld; c++) dst[c] = 128;
    }
}

static void max_pool(const lq_conv_op *op, int64_t n, const uint8_t *src, uint8_t *dst) {
    int64_t rows = n * op->oh * op->ow, c = op->cin;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        int64_t b = r / (op->oh * op->ow), oy = (r / op->ow) % op->oh, ox = r % op->ow;
        uint8_t *d = dst + r * c;
        memset(d, 0, (size_t)c);
        for (int64_t i = 0; i < op->kh; i++) {
            int64_t iy = oy * op->sh - op->ph + i * op->dh;
            if (iy < 0 || iy >= op->h) continue;  /* (padding never wins a max: torch pads with -inf) */
            for (int64_t j = 0; j < op->kw; j++) {
                int64_t ix = ox * op->sw - op->pw + j * op->dw;
                if (ix < 0 || ix >= op->w) continue;
                const uint8_t *sp = src + ((b * op->h + iy) * op->w + ix) * c;
                for (int64_t ch = 0; ch < c; ch++) d[ch] = sp[ch] > d[ch] ? sp[ch] : d[ch];
            }
        }
    }
}

/* x: the float input, element (b, c, y, x) at x[b * xs0 + c * xs1 + y * xs2 + x * xs3] (any layout); `act` holds
 * two buffers of act_size bytes (the largest NHWC integer tensor), `col` col_size bytes (the largest im2col);
 * `out` the last convolution's float output, NHWC (NCHW with `nchw`, which only the VNNI kernel takes). `col` has 3 spare rows (the VNNI kernel reads rows in fours). Returns 0 or 1 + the flat NCHW index of the first input whose
 * x * s is not finite. */
int64_t lq_conv_chain(const lq_conv_op *ops, int32_t nops, int64_t n, const float *x, int64_t xs0, int64_t xs1,
                      int64_t xs2, int64_t xs3, float s, int32_t qmax, float *out, uint8_t *act, int64_t act_size,
                      uint8_t *col, int32_t isa, int32_t threads, int32_t nchw) {
    block_fn block = block_scalar;
#ifdef LQ_X86
    if (isa == LQ_AVX2) block = block_avx2;
    if (isa == LQ_VNNI) block = block_vnni;
#endif
    const lq_conv_op *first = &ops[0];
    int64_t c0 = first->cin, h0 = first->h, w0 = first->w;
    float q = (float)qmax;
    for (int64_t b = 0; b < n; b++)  /* eq. 7, NCHW index order for the error; NHWC integers */
        for (int64_t c = 0; c < c0; c++)
            for (int64_t y = 0; y < h0; y++)
                for (int64_t xx = 0; xx < w0; xx++) {
                    float t = x[b * xs0 + c * xs1 + y * xs2 + xx * xs3] * s;
                    if (!isfinite(t)) return 1 + ((b * c0 + c) * h0 + y) * w0 + xx;
                    act[((b * h0 + y) * w0 + xx) * c0 + c] = (uint8_t)((int32_t)clampf(nearbyintf(t), -q, q) + 128);
                }
    uint8_t *buf[2] = {act, act + act_size};
#pragma omp parallel num_threads(threads)
    {
        int cur = 0;
        for (int32_t i = 0; i < nops; i++) {
            const lq_conv_op *op = &ops[i];
            if (op->kind == 1) {
                max_pool(op, n, buf[cur], buf[1 - cur]);
            } else {
                const lq_layer *L = &op->gemm;
                int64_t rows = n * op->oh * op->ow, blocks = (L->n + 3) / 4;
                im2col(op, n, buf[cur], col, isa == LQ_VNNI ? op->kq : L->kp);  /* (ends with its barrier) */
#ifdef LQ_X86
                if (isa == LQ_VNNI) {
#pragma omp for schedule(static)
                    for (int64_t r0 = 0; r0 < rows; r0 += 4)
                        conv_rows_vnni(op, col, r0, rows, buf[1 - cur], out, nchw);
                } else
#endif
                {
#pragma omp for schedule(static)
                    for (int64_t bl = 0; bl < blocks; bl++) {
                        int64_t j0 = 4 * bl, cnt = L->n - j0 < 4 ? L->n - j0 : 4;
                        block(L, j0, cnt, col, buf[1 - cur], out, rows, L->kp, L->n, L->n);
                    }
                }
            }
            cur = 1 - cur;
        }
    }
    return 0;
}
