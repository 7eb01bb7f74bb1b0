/* lq int8 training on CPUs: the quantization passes and the GEMM output stage of an int8 Linear step in C.
 *
 * Built at first use by lq/ops/native_quant.py (lq/native.py: cc -O3 -fopenmp -ffp-contract=off
 * -fno-trapping-math) and called through ctypes. Each function computes, bit for bit, what the fp32 torch ops
 * of lq.ops.fused / lq.ops.grad_quant / lq.ops.int8_mm compute (tests/test_native_quant.py compares them), in
 * one or two passes over the rows instead of Inductor's reduction-then-pointwise loops and a compiled call
 * (~0.9 ms for a 1024 x 1024 quantization on the 2-core AVX-512 host, against ~0.1 ms of memory traffic):
 *
 *   eq. 6-7 (Wu et al. 2020), a scale per row:  s = (1 / max(amax, eps)) * qmax       (torch's qmax / t is
 *                                                 q = clamp(rint(x * s), -qmax, qmax)     reciprocal(t) * qmax)
 *                                                 step = 1 / s
 *   gradients (Zhu et al. 2020), ratio r found by lq.ops.grad_quant's clip search:
 *                                                 s = (1 / max(amax * r, eps)) * qmax
 *                                                 q = clamp(floor(y * s + u), -qmax, qmax)  (stochastic rounding)
 *                                                 u = frac(b / 128 + shift), b the noise byte (fused.noise_bits)
 *   eq. 10's output stage:                        out = ((float)acc * a_step[i]) * b_step[j] + bias[j]
 *
 * rint is round half to even (torch.round). The max of |x| is taken on the bit patterns: for non-negative floats
 * the integer order is the float order, and every NaN orders above +inf, so a row holding a NaN gets a NaN amax
 * (torch's amax propagates NaN too) and the caller raises. The row loops are plain C that GCC vectorizes per
 * instruction set (target_clones: AVX-512, AVX2, baseline; -fno-trapping-math lets it use vector floor); the
 * OpenMP loops over rows call them.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__)
#include "lq_simd.h"
#define LQ_SSE2 1
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LQ_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define LQ_CLONES
#endif

#define ABS_BITS 0x7fffffffu
/* floats per call of the row loops where rows are short (lq_grad_conv's channels-last spans) */
#define SPAN_FLOATS 1024

static inline uint32_t bits_of(float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    return b;
}

static inline float float_of(uint32_t b) {
    float v;
    memcpy(&v, &b, 4);
    return v;
}

/* torch.clamp(r, lo, hi) then the cast to int8 (r integral) */
static inline int8_t to_int8(float r, float lo, float hi) {
    r = r < lo ? lo : r;
    r = r > hi ? hi : r;
    return (int8_t)(int32_t)r;
}

/* stochastic rounding's u = frac(b / 128 + shift) of noise byte b (fused.noise_bits; exact in fp32) */
static inline float noise_u(int8_t noise, float shift) {
    int32_t b = noise;
    float w = (float)b * (1.0f / 128) + shift;
    return w - floorf(w);
}

/* scale_from_amax: (1 / max(a, eps)) * qmax (a NaN stays NaN, as torch's clamp_min keeps it) */
static inline float scale_of(float a, float eps, int32_t qmax) {
    float c = a < eps ? eps : a;
    return (1.0f / c) * (float)qmax;
}

/* ------------------------------------------------------------------------------------------ row loops */

LQ_CLONES static uint32_t row_amax(const float *x, int64_t n) {
    const uint32_t *b = (const uint32_t *)x;
    uint32_t m = 0;
    for (int64_t j = 0; j < n; j++) {
        uint32_t a = b[j] & ABS_BITS;
        m = a > m ? a : m;
    }
    return m;
}

/* max_j |x[j] * mult[j]| (bits) */
LQ_CLONES static uint32_t row_amax_mul(const float *x, const float *mult, int64_t n) {
    uint32_t m = 0;
    for (int64_t j = 0; j < n; j++) {
        float y = x[j] * mult[j];
        uint32_t a = bits_of(y) & ABS_BITS;
        m = a > m ? a : m;
    }
    return m;
}

/* cols[j] = max(cols[j], |x[j] * c|) (bits) */
LQ_CLONES static void col_amax_mul(const float *x, float c, int64_t n, uint32_t *cols) {
    for (int64_t j = 0; j < n; j++) {
        float y = x[j] * c;
        uint32_t a = bits_of(y) & ABS_BITS;
        cols[j] = a > cols[j] ? a : cols[j];
    }
}

LQ_CLONES static void row_round(const float *x, float s, float lo, float hi, int64_t n, int8_t *q) {
    for (int64_t j = 0; j < n; j++) q[j] = to_int8(rintf(x[j] * s), lo, hi);
}

/* per-row scale s, per-column multiplier: y = x[j] * mult[j] */
LQ_CLONES static void row_round_mul(const float *x, const float *mult, float s, float lo, float hi, int64_t n,
                                    int8_t *q) {
    for (int64_t j = 0; j < n; j++) q[j] = to_int8(rintf(x[j] * mult[j] * s), lo, hi);
}

LQ_CLONES static void row_floor_mul(const float *x, const float *mult, float s, const int8_t *noise, float shift,
                                    float lo, float hi, int64_t n, int8_t *q) {
    for (int64_t j = 0; j < n; j++) {
        float u = noise_u(noise[j], shift);
        q[j] = to_int8(floorf(x[j] * mult[j] * s + u), lo, hi);
    }
}

/* per-column scales s[j], one multiplier c for the row: y = x[j] * c */
LQ_CLONES static void col_round_mul(const float *x, float c, const float *s, float lo, float hi, int64_t n,
                                    int8_t *q) {
    for (int64_t j = 0; j < n; j++) q[j] = to_int8(rintf(x[j] * c * s[j]), lo, hi);
}

LQ_CLONES static void col_floor_mul(const float *x, float c, const float *s, const int8_t *noise, float shift,
                                    float lo, float hi, int64_t n, int8_t *q) {
    for (int64_t j = 0; j < n; j++) {
        float u = noise_u(noise[j], shift);
        q[j] = to_int8(floorf(x[j] * c * s[j] + u), lo, hi);
    }
}

/* one multiplier c and one scale s for the row: y = x[j] * c */
LQ_CLONES static void row_round_cs(const float *x, float c, float s, float lo, float hi, int64_t n, int8_t *q) {
    for (int64_t j = 0; j < n; j++) q[j] = to_int8(rintf(x[j] * c * s), lo, hi);
}

LQ_CLONES static void row_floor_cs(const float *x, float c, float s, const int8_t *noise, float shift, float lo,
                                   float hi, int64_t n, int8_t *q) {
    for (int64_t j = 0; j < n; j++) {
        float u = noise_u(noise[j], shift);
        q[j] = to_int8(floorf(x[j] * c * s + u), lo, hi);
    }
}

/* eq. 7 as fp32 integers: out[j] = clamp(rint(x[j] * s), lo, hi) (out may be x); returns max |x[j] * s| as bits
   (a NaN orders above +inf), so the caller sees a product that is not finite */
LQ_CLONES static uint32_t row_grid(const float *x, float s, float lo, float hi, int64_t n, float *out) {
    uint32_t m = 0;
    for (int64_t j = 0; j < n; j++) {
        float t = x[j] * s;
        uint32_t a = bits_of(t) & ABS_BITS;
        m = a > m ? a : m;
        float r = rintf(t);
        r = r < lo ? lo : r;
        out[j] = r > hi ? hi : r;
    }
    return m;
}

LQ_CLONES static void row_scale(const int32_t *acc, float a, const float *b, const float *bias, int64_t n,
                                float *out) {
    if (bias) {
        for (int64_t j = 0; j < n; j++) out[j] = (float)acc[j] * a * b[j] + bias[j];
    } else {
        for (int64_t j = 0; j < n; j++) out[j] = (float)acc[j] * a * b[j];
    }
}

static inline int thread_num(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* per-thread partial maxima (zeroed) and one float per column or channel; 0 (nothing allocated) on failure */
static int partials(int32_t threads, int64_t n, uint32_t **part, float **scales) {
    *part = (uint32_t *)calloc((size_t)threads * (size_t)(n > 0 ? n : 1), sizeof(uint32_t));
    *scales = (float *)malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    if (*part && *scales) return 1;
    free(*part);
    free(*scales);
    return 0;
}

static int all_finite(const float *a, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(a[i])) return 0;
    return 1;
}

/* entry j of the threads' partial maxima (bits; thread u's n entries at part + u * n) */
static inline uint32_t merged_max(const uint32_t *part, int32_t threads, int64_t n, int64_t j) {
    uint32_t m = 0;
    for (int u = 0; u < threads; u++) {
        uint32_t v = part[(size_t)u * (size_t)n + j];
        m = v > m ? v : m;
    }
    return m;
}

/* the length of piece i when n items are cut into pieces of `size` (the last one shorter) */
static inline int64_t piece(int64_t n, int64_t size, int64_t i) { return n - i * size < size ? n - i * size : size; }

/* flat loops over n dense floats run in chunks of this many (one call of a row loop each) */
#define CHUNK ((int64_t)1 << 14)

/* whole rows of `cols` floats per call of a row loop where rows are short (~SPAN_FLOATS floats a call) */
static inline int64_t span_rows(int64_t cols) { return cols < SPAN_FLOATS ? SPAN_FLOATS / cols : 1; }

/* dst[j] = src[j % period] for j < n (a per-channel vector repeated over a span; dst may be src: the first period
   entries are rewritten with themselves) */
static void repeat(float *dst, const float *src, int64_t n, int64_t period) {
    for (int64_t j = 0; j < n; j++) dst[j] = src[j % period];
}

/* eq. 7 with one scale s for n dense floats, in chunks over the threads */
static void round_chunks(const float *x, int64_t n, float s, int32_t qmax, int8_t *q, int32_t threads) {
    const float lo = -(float)qmax, hi = (float)qmax;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < (n + CHUNK - 1) / CHUNK; c++)
        row_round(x + c * CHUNK, s, lo, hi, piece(n, CHUNK, c), q + c * CHUNK);
}

/* ------------------------------------------------------------------------------------------ entry points */

/* fused.quantize_dynamic(x, qmax, keep_dim=0) of a row-major x [m, k] (row stride ldx): q [m, k] contiguous,
   step, amax [m]. Returns the number of rows whose amax is not finite (their q and step are meaningless). */
int64_t lq_quant_rows(const float *x, int64_t m, int64_t k, int64_t ldx, int32_t qmax, float eps, int8_t *q,
                      float *step, float *amax, int32_t threads) {
    const float lo = -(float)qmax, hi = (float)qmax;
    int64_t bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : bad)
    for (int64_t i = 0; i < m; i++) {
        const float *xi = x + i * ldx;
        float a = float_of(row_amax(xi, k));
        float s = scale_of(a, eps, qmax);
        amax[i] = a;
        step[i] = 1.0f / s;
        bad += !isfinite(a);
        row_round(xi, s, lo, hi, k, q + i * k);
    }
    return bad;
}

/* fused.quantize_dynamic(x, qmax, keep_dim=None[, amax]) of n dense floats (any memory order: one scale for all):
   amax of all of them, s from it or, with has_calibrated, from calibrated (a static amax: Wu et al. eq. 7 clips
   beyond it), q in the same memory order. Returns 1 when the data's amax is not finite. */
int64_t lq_quant_tensor(const float *x, int64_t n, int32_t qmax, float eps, int32_t has_calibrated, float calibrated,
                        int8_t *q, float *step, float *amax, int32_t threads) {
    uint32_t m = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(max : m)
    for (int64_t c = 0; c < (n + CHUNK - 1) / CHUNK; c++) {
        uint32_t v = row_amax(x + c * CHUNK, piece(n, CHUNK, c));
        m = v > m ? v : m;
    }
    float a = float_of(m);
    float s = scale_of(has_calibrated ? calibrated : a, eps, qmax);
    *amax = a;
    *step = 1.0f / s;
    round_chunks(x, n, s, qmax, q, threads);
    return !isfinite(a);
}

/* lq.deploy.kernels.quantize_to_grid: eq. 7 of n dense floats with one scale s, clip [lo, hi], written as fp32
   integers (out may be x: the converted layers' float-in kernels and their hand-over to the next layer). Returns 1
   when some x * s is not finite (NaN, Inf, or a product that overflows; out is then meaningless), else 0. */
int64_t lq_grid(const float *x, int64_t n, float s, float lo, float hi, float *out, int32_t threads) {
    uint32_t m = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(max : m)
    for (int64_t c = 0; c < (n + CHUNK - 1) / CHUNK; c++) {
        int64_t at = c * CHUNK;
        uint32_t v = row_grid(x + at, s, lo, hi, piece(n, CHUNK, c), out + at);
        m = v > m ? v : m;
    }
    return !isfinite(float_of(m));
}

/* float bits -> an int32 with the float order (negative floats' magnitude bits flipped); its own inverse */
static inline int32_t order_key(uint32_t b) { return (int32_t)(b ^ ((uint32_t)((int32_t)b >> 31) & ABS_BITS)); }

/* the order keys' minimum and maximum of x, and whether any element is not finite (exponent bits all set) */
LQ_CLONES static void row_minmax(const float *x, int64_t n, int32_t *mn, int32_t *mx, uint32_t *nonfinite) {
    const uint32_t *b = (const uint32_t *)x;
    int32_t lo = *mn, hi = *mx;
    uint32_t bad = 0;
    for (int64_t j = 0; j < n; j++) {
        int32_t k = order_key(b[j]);
        lo = k < lo ? k : lo;
        hi = k > hi ? k : hi;
        bad |= (b[j] & 0x7f800000u) == 0x7f800000u;
    }
    *mn = lo;
    *mx = hi;
    *nonfinite |= bad;
}

/* A saved activation of n dense floats (lq.ops.saved_int8), in one or two passes: its minimum and maximum; when
   every element is finite and the minimum is >= 0 (a ReLU's output, the next int8 conv's input), eq. 6-7 with one
   scale from the maximum (= max |x|), q and step exactly as lq_quant_tensor makes them. Returns 0 (quantized), 1
   (a negative element: nothing written but lo / hi), 2 (NaN or Inf: nothing written). */
int64_t lq_pack_activation(const float *x, int64_t n, int32_t qmax, float eps, int8_t *q, float *step, float *lo,
                           float *hi, int32_t threads) {
    int32_t mn = INT32_MAX, mx = INT32_MIN;
    uint32_t bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(min : mn) reduction(max : mx) \
    reduction(| : bad)
    for (int64_t c = 0; c < (n + CHUNK - 1) / CHUNK; c++) row_minmax(x + c * CHUNK, piece(n, CHUNK, c), &mn, &mx, &bad);
    if (bad) return 2;
    *lo = float_of((uint32_t)order_key((uint32_t)mn));
    *hi = float_of((uint32_t)order_key((uint32_t)mx));
    if (*lo < 0.0f) return 1;
    const float s = scale_of(*hi, eps, qmax);
    *step = 1.0f / s;
    round_chunks(x, n, s, qmax, q, threads);
    return 0;
}

LQ_CLONES static void row_dequant(const int8_t *q, const float *step, int64_t step_stride, int64_t n, float *out) {
    for (int64_t j = 0; j < n; j++) out[j] = (float)q[j] * step[j * step_stride];
}

/* Eq. 8 in one pass, out = (float)q * step (lq.ops.quantize.dequantize_along; torch's q.float() * step takes two):
   q dense as rows x cols; one step for all (channels 0), or a step per channel on the columns (channel_on_cols:
   channels-last [N, H, W, C] or [M, C]; cols = channels) or on the rows (row-major [N, C, H, W]: row r's channel is
   r % channels). */
void lq_dequant(const int8_t *q, int64_t rows, int64_t cols, int64_t channels, int32_t channel_on_cols,
                const float *step, float *out, int32_t threads) {
    if (channels == 0) { /* one step: flat chunks */
        const int64_t n = rows * cols;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t c = 0; c < (n + CHUNK - 1) / CHUNK; c++)
            row_dequant(q + c * CHUNK, step, 0, piece(n, CHUNK, c), out + c * CHUNK);
        return;
    }
    if (!channel_on_cols) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t i = 0; i < rows; i++) row_dequant(q + i * cols, step + i % channels, 0, cols, out + i * cols);
        return;
    }
    /* spans of whole rows with the per-channel steps repeated over a span (short rows: lq_grad_conv's reason) */
    const int64_t per = span_rows(cols), span = per * cols;
    float *rep = (float *)malloc((size_t)span * sizeof(float));
    if (!rep) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t i = 0; i < rows; i++) row_dequant(q + i * cols, step, 1, cols, out + i * cols);
        return;
    }
    repeat(rep, step, span, cols);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < (rows + per - 1) / per; i++)
        row_dequant(q + i * span, rep, 1, piece(rows, per, i) * cols, out + i * span);
    free(rep);
}

/* Both backward operands of one output gradient g [m, n] (row stride ldg), each skipped when its q is NULL:
     A (grad_input's): y = g[i, j] * mult_a[j], a scale per row i    -> qa [m, n], step_a / amax_a [m]
     B (grad_weight's): y = g[i, j] * mult_b[i * mult_b_stride], a scale per column j -> qb [m, n], step_b /
        amax_b [n]
   with the clip ratios ratio_a / ratio_b; noise_x [m * n] bytes with level shift shift_x (stochastic
   rounding) or NULL (round half to even). Returns bit 0 set when an amax of A is not finite, bit 1 for B,
   4 when the column partials could not be allocated (nothing written). */
int64_t lq_grad_pair(const float *g, int64_t m, int64_t n, int64_t ldg, int32_t qmax, float eps,
                     const float *mult_a, float ratio_a, const int8_t *noise_a, float shift_a, int8_t *qa,
                     float *step_a, float *amax_a,
                     const float *mult_b, int64_t mult_b_stride, float ratio_b, const int8_t *noise_b, float shift_b,
                     int8_t *qb, float *step_b, float *amax_b, int32_t threads) {
    const float lo = -(float)qmax, hi = (float)qmax;
    int64_t result = 0;
    uint32_t *cols = NULL;
    float *s_b = NULL;
    if (qb && !partials(threads, n, &cols, &s_b)) return 4;
    int64_t bad_a = 0;
#pragma omp parallel num_threads(threads)
    {
        int t = thread_num();
        uint32_t *mine = cols ? cols + (size_t)t * (size_t)n : NULL;
        /* pass 1: the row amaxes of A, each thread's column amaxes of B */
#pragma omp for schedule(static) reduction(+ : bad_a)
        for (int64_t i = 0; i < m; i++) {
            const float *gi = g + i * ldg;
            if (qa) {
                float a = float_of(row_amax_mul(gi, mult_a, n));
                amax_a[i] = a;
                step_a[i] = 1.0f / scale_of(a * ratio_a, eps, qmax);
                bad_a += !isfinite(a);
            }
            if (qb) col_amax_mul(gi, mult_b[i * mult_b_stride], n, mine);
        }
        /* the column amaxes of B (the threads' partials merged) and their scales */
        if (qb) {
#pragma omp for schedule(static)
            for (int64_t j = 0; j < n; j++) {
                float a = float_of(merged_max(cols, threads, n, j));
                amax_b[j] = a;
                s_b[j] = scale_of(a * ratio_b, eps, qmax);
                step_b[j] = 1.0f / s_b[j];
            }
        }
        /* pass 2: the integers */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) {
            const float *gi = g + i * ldg;
            if (qa) {
                float s = scale_of(amax_a[i] * ratio_a, eps, qmax);
                if (noise_a)
                    row_floor_mul(gi, mult_a, s, noise_a + i * n, shift_a, lo, hi, n, qa + i * n);
                else
                    row_round_mul(gi, mult_a, s, lo, hi, n, qa + i * n);
            }
            if (qb) {
                float c = mult_b[i * mult_b_stride];
                if (noise_b)
                    col_floor_mul(gi, c, s_b, noise_b + i * n, shift_b, lo, hi, n, qb + i * n);
                else
                    col_round_mul(gi, c, s_b, lo, hi, n, qb + i * n);
            }
        }
    }
    if (bad_a) result |= 1;
    if (qb && !all_finite(amax_b, n)) result |= 2;
    free(cols);
    free(s_b);
    return result;
}

/* A convolution gradient's channel maxima of |g|, each thread's into mine (an orphaned worksharing loop over the
   enclosing region's threads): channels-last rows (channel_on_cols) in spans of `per` whole rows of `cols` floats, per
   span position (one call of the row loop each: 16-float rows one call each cost 12x their memory traffic), row-major
   rows one at a time (row r's channel r % channels). */
static void channel_maxima(const float *g, int64_t rows, int64_t cols, int32_t channel_on_cols, int64_t channels,
                           int64_t per, uint32_t *mine) {
    const int64_t span = per * cols, spans = (rows + per - 1) / per;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < spans; i++) {
        if (channel_on_cols) {
            col_amax_mul(g + i * span, 1.0f, piece(rows, per, i) * cols, mine);
        } else {
            uint32_t v = row_amax(g + i * cols, cols);
            int64_t o = i % channels;
            mine[o] = v > mine[o] ? v : mine[o];
        }
    }
}

/* channel o's maximum (bits) from the threads' partial maxima of channel_maxima (span entries a thread) */
static uint32_t channel_max(const uint32_t *part, int32_t threads, int64_t span, int64_t channels, int64_t o) {
    uint32_t m = 0;
    for (int64_t r = o; r < span; r += channels) {
        uint32_t v = merged_max(part, threads, span, r);
        m = v > m ? v : m;
    }
    return m;
}

/* Both backward operands of a convolution's output gradient g [N, O, H, W] (lq.ops.int8_conv), each skipped when
   its q is NULL:
     A (grad_input's): y = g * mult_a[o], one scale for the tensor  -> qa, step_a / amax_a [1]
     B (grad_weight's): y = g, a scale per channel o                   -> qb, step_b / amax_b [O]
   g dense in memory as rows x cols with the channel on the columns (channels-last: rows = N * H * W, cols = O)
   or on the rows (row-major: rows = N * O, cols = H * W, the channel of row r is r % O); qa and qb in g's memory
   order, noise_x likewise. A's amax comes from the channel maxima: max |g * m| = max_o fl(max |g| * |m_o|),
   because rounding a product by a positive factor is monotonic. Returns bit 0 / bit 1 when A's / B's amax is not
   finite, 4 when the scratch could not be allocated (nothing written). */
int64_t lq_grad_conv(const float *g, int64_t rows, int64_t cols, int32_t channel_on_cols, int64_t channels,
                     int32_t qmax, float eps, const float *mult_a, float ratio_a, const int8_t *noise_a, float shift_a,
                     int8_t *qa, float *step_a, float *amax_a, float ratio_b, const int8_t *noise_b, float shift_b,
                     int8_t *qb, float *step_b, float *amax_b, int32_t threads) {
    const float lo = -(float)qmax, hi = (float)qmax;
    /* Channels-last rows are cut into spans of `per` whole rows (span = per * cols floats, ~SPAN_FLOATS), each
       one call of the row loops with the per-channel vectors repeated per row: a SmallResNet gradient has 16-64
       channels, and one call per 16-float row cost 12x its memory traffic. Row-major rows are single rows. */
    const int64_t per = channel_on_cols ? span_rows(cols) : 1;
    const int64_t span = channel_on_cols ? per * cols : channels, spans = (rows + per - 1) / per;
    uint32_t *part;
    float *s_b;
    float *m_a = (float *)malloc((size_t)span * sizeof(float));
    if (!m_a || !partials(threads, span, &part, &s_b)) {
        free(m_a);
        return 4;
    }
    if (channel_on_cols && qa) repeat(m_a, mult_a, span, cols);
    float s_a = 0.0f;
#pragma omp parallel num_threads(threads)
    {
        int t = thread_num();
        uint32_t *mine = part + (size_t)t * (size_t)span;
        /* pass 1: each thread's maxima of |g| per channel (channels-last: per span position) */
        channel_maxima(g, rows, cols, channel_on_cols, channels, per, mine);
        /* the channel maxima merged, B's scales, A's amax and scale (one thread) */
#pragma omp single
        {
            uint32_t a_bits = 0;
            for (int64_t o = 0; o < channels; o++) {
                float amax = float_of(channel_max(part, threads, span, channels, o));
                if (qb) {
                    amax_b[o] = amax;
                    s_b[o] = scale_of(amax * ratio_b, eps, qmax);
                    step_b[o] = 1.0f / s_b[o];
                }
                if (qa) {
                    uint32_t v = bits_of(amax * fabsf(mult_a[o])) & ABS_BITS;
                    a_bits = v > a_bits ? v : a_bits;
                }
            }
            if (qb && channel_on_cols) repeat(s_b, s_b, span, channels);
            if (qa) {
                amax_a[0] = float_of(a_bits);
                s_a = scale_of(amax_a[0] * ratio_a, eps, qmax);
                step_a[0] = 1.0f / s_a;
            }
        }
        /* pass 2: the integers, in g's memory order */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < spans; i++) {
            if (channel_on_cols) {
                int64_t at = i * span, width = piece(rows, per, i) * cols;
                const float *gi = g + at;
                if (qa) {
                    if (noise_a)
                        row_floor_mul(gi, m_a, s_a, noise_a + at, shift_a, lo, hi, width, qa + at);
                    else
                        row_round_mul(gi, m_a, s_a, lo, hi, width, qa + at);
                }
                if (qb) {
                    if (noise_b)
                        col_floor_mul(gi, 1.0f, s_b, noise_b + at, shift_b, lo, hi, width, qb + at);
                    else
                        col_round_mul(gi, 1.0f, s_b, lo, hi, width, qb + at);
                }
            } else {
                int64_t at = i * cols, o = i % channels;
                const float *gi = g + at;
                if (qa) {
                    if (noise_a)
                        row_floor_cs(gi, mult_a[o], s_a, noise_a + at, shift_a, lo, hi, cols, qa + at);
                    else
                        row_round_cs(gi, mult_a[o], s_a, lo, hi, cols, qa + at);
                }
                if (qb) {
                    if (noise_b)
                        row_floor_cs(gi, 1.0f, s_b[o], noise_b + at, shift_b, lo, hi, cols, qb + at);
                    else
                        row_round_cs(gi, 1.0f, s_b[o], lo, hi, cols, qb + at);
                }
            }
        }
    }
    int64_t result = 0;
    if (qa && !isfinite(amax_a[0])) result |= 1;
    if (qb && !all_finite(amax_b, channels)) result |= 2;
    free(part);
    free(s_b);
    free(m_a);
    return result;
}

/* lanes of the clip search's sums (independent double accumulators: a vectorizable loop without reassociation) */
#define LANES 16

/* the clip search's sums of one candidate over n floats y[j] = x[j] * mult[j] (mult NULL: * c): dot[l] +=
   Q(y) y, nq[l] += Q(y)^2 with Q(y) = clamp(rint(y / st), lo, hi) * st (fp32 products, double sums per lane, kept in
   registers for the call) */
#define CLIP_BODY(Y)                                                                                                   \
    do {                                                                                                               \
        float y = (Y), q = rintf(y / st);                                                                              \
        q = q < lo ? lo : q;                                                                                           \
        q = q > hi ? hi : q;                                                                                           \
        float dq = q * st;                                                                                             \
        d[l] += (double)(dq * y);                                                                                      \
        e[l] += (double)(dq * dq);                                                                                     \
    } while (0)
LQ_CLONES static void clip_sums(const float *restrict x, const float *restrict mult, float c, int64_t n, float st,
                                float lo, float hi, double *restrict dot, double *restrict nq) {
    double d[LANES] = {0}, e[LANES] = {0};
    int64_t j = 0;
    if (mult) {
        for (; j + LANES <= n; j += LANES)
            for (int l = 0; l < LANES; l++) CLIP_BODY(x[j + l] * mult[j + l]);
        for (int l = 0; j < n; j++, l++) CLIP_BODY(x[j] * mult[j]);
    } else {
        for (; j + LANES <= n; j += LANES)
            for (int l = 0; l < LANES; l++) CLIP_BODY(x[j + l] * c);
        for (int l = 0; j < n; j++, l++) CLIP_BODY(x[j] * c);
    }
    for (int l = 0; l < LANES; l++) {
        dot[l] += d[l];
        nq[l] += e[l];
    }
}
#undef CLIP_BODY

/* ny[l] += y^2 over n floats y[j] = x[j] * mult[j] (mult NULL: * c), per lane */
LQ_CLONES static void square_sums(const float *restrict x, const float *restrict mult, float c, int64_t n,
                                  double *restrict ny) {
    double a[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) {
            float y = x[j + l] * (mult ? mult[j + l] : c);
            a[l] += (double)(y * y);
        }
    for (int l = 0; j < n; j++, l++) {
        float y = x[j] * (mult ? mult[j] : c);
        a[l] += (double)(y * y);
    }
    for (int l = 0; l < LANES; l++) ny[l] += a[l];
}

/* cos[k] of a clip search from the threads' lane sums (thread u's at sums + u * stride, LANES doubles each of dot [nr],
   nq [nr], ny): dot / sqrt(nq ny), 1 where that norm is 0 (torch.where(norm > 0, dot / norm.clamp_min(1e-30), 1)) */
static void lane_cosines(const double *sums, int32_t threads, int64_t stride, int64_t nr, double *cos) {
    double tot[2 * 64 + 1];
    for (int64_t e = 0; e < 2 * nr + 1; e++) {
        double v = 0.0;
        for (int u = 0; u < threads; u++)
            for (int l = 0; l < LANES; l++) v += sums[(size_t)u * (size_t)stride + e * LANES + l];
        tot[e] = v;
    }
    for (int64_t k = 0; k < nr; k++) {
        double norm = sqrt(tot[nr + k] * tot[2 * nr]);
        cos[k] = norm > 0 ? tot[k] / (norm > 1e-30 ? norm : 1e-30) : 1.0;
    }
}

/* Zhu et al.'s direction-sensitive clip search (Sec. 4.1; lq.ops.grad_quant) for a convolution's two gradient operands
   as grad_quant._fused_search scores them: A (grad_input's: y = g * mult_a[o], one scale for the tensor) and B
   (grad_weight's: y = g, a scale per channel). Candidate k clips at ratios[k] * amax: step_k = max(ratios[k] * amax,
   eps) / qmax (amax_a for A, amax_b[o] per channel for B), Q_k(y) = clamp(rint(y / step_k), -qmax, qmax) * step_k,
   cos_k = sum(Q_k(y) y) / sqrt(sum(Q_k(y)^2) sum(y^2)) (1 where that norm is 0), the sums over A's sample (whole
   images sel_a[0 .. na)) and B's (whole channels sel_b[0 .. nb)), the products in fp32 as torch forms them, the sums
   in double (torch's fp32 sums agree to ~1e-7: only candidates that close could be ranked differently). amax from
   every element (the channel maxima, as lq_grad_conv). g as in lq_grad_conv (channel_on_cols: [n * hw, o]
   channels-last, else [n * o, hw]); mult_a [o]. Writes amax_a [1] and cos_a [nr] when cos_a is not NULL, amax_b [o]
   and cos_b [nr] when cos_b is not NULL; returns 4 when scratch could not be allocated. */
int64_t lq_grad_conv_search(const float *g, int64_t n, int64_t hw, int64_t o, int32_t channel_on_cols, int32_t qmax,
                            float eps, const float *mult_a, const int64_t *sel_a, int64_t na, const int64_t *sel_b,
                            int64_t nb, const float *ratios, int64_t nr, float *amax_a, float *amax_b, double *cos_a,
                            double *cos_b, int32_t threads) {
    if (nr < 1 || nr > 64) return 8;
    const int64_t rows = channel_on_cols ? n * hw : n * o, cols = channel_on_cols ? o : hw;
    const int64_t per = (2 * nr + 1) * LANES;          /* one operand's lane sums: dot [nr], nq [nr], ny */
    const int64_t chunk = 1024;                         /* B's channel column gathered this many rows at a time */
    const int64_t per_rows = span_rows(o); /* channels-last rows per call of the row loops (as lq_grad_conv) */
    const int64_t mspan = channel_on_cols ? per_rows * o : o;
    uint32_t *part = (uint32_t *)calloc((size_t)threads * (size_t)mspan, sizeof(uint32_t));
    float *chmax = (float *)malloc((size_t)o * sizeof(float));
    float *steps = (float *)malloc((size_t)(nr * (o + 1)) * sizeof(float)); /* [nr] for A, then [nr][o] for B */
    double *sums = (double *)calloc((size_t)threads * (size_t)(2 * per), sizeof(double));
    float *cbuf = (float *)malloc((size_t)threads * (size_t)chunk * sizeof(float));
    float *m_rep = (float *)malloc((size_t)(per_rows * o) * sizeof(float));
    int64_t result = 0;
    if (!part || !chmax || !steps || !sums || !cbuf || !m_rep) {
        result = 4;
        goto done;
    }
    repeat(m_rep, mult_a, per_rows * o, o);
    const float fq = (float)qmax, lo = -fq, hi = fq;
#pragma omp parallel num_threads(threads)
    {
        int t = thread_num();
        uint32_t *mine = part + (size_t)t * (size_t)mspan;
        channel_maxima(g, rows, cols, channel_on_cols, o, channel_on_cols ? per_rows : 1, mine); /* as lq_grad_conv */
#pragma omp single
        {
            uint32_t a_bits = 0;
            for (int64_t c = 0; c < o; c++) {
                chmax[c] = float_of(channel_max(part, threads, mspan, o, c));
                uint32_t v = bits_of(chmax[c] * fabsf(mult_a[c])) & ABS_BITS;
                a_bits = v > a_bits ? v : a_bits;
            }
            float aa = float_of(a_bits);
            for (int64_t k = 0; k < nr; k++) {
                float v = ratios[k] * aa;
                steps[k] = (v < eps ? eps : v) / fq;
                for (int64_t c = 0; c < o; c++) {
                    float w = ratios[k] * chmax[c];
                    steps[nr + k * o + c] = (w < eps ? eps : w) / fq;
                }
            }
            if (cos_a) amax_a[0] = aa;
            if (cos_b) memcpy(amax_b, chmax, (size_t)o * sizeof(float));
        }
        double *sa = sums + (size_t)t * (size_t)(2 * per), *sb = sa + per;
        if (cos_a) { /* A over the sampled images: channels-last in spans of whole rows (mult repeated over a span: one
                        call per ~SPAN_FLOATS floats, not per 16-float row), row-major row by row (one channel each) */
            const int64_t pieces = channel_on_cols ? (hw + per_rows - 1) / per_rows : o;
#pragma omp for schedule(static)
            for (int64_t e = 0; e < na * pieces; e++) {
                int64_t img = sel_a[e / pieces], p = e % pieces, len;
                const float *gr, *m;
                float c1;
                if (channel_on_cols) {
                    len = piece(hw, per_rows, p) * o;
                    gr = g + (img * hw + p * per_rows) * o;
                    m = m_rep;
                    c1 = 1.0f;
                } else {
                    len = hw;
                    gr = g + (img * o + p) * hw;
                    m = NULL;
                    c1 = mult_a[p];
                }
                square_sums(gr, m, c1, len, sa + 2 * nr * LANES);
                for (int64_t k = 0; k < nr; k++)
                    clip_sums(gr, m, c1, len, steps[k], lo, hi, sa + k * LANES, sa + (nr + k) * LANES);
            }
        }
        if (cos_b) { /* B over the sampled channels (channels-last: the channel's column gathered in chunks of rows) */
            float *buf = cbuf + (size_t)t * (size_t)chunk;
            const int64_t pieces = channel_on_cols ? (rows + chunk - 1) / chunk : n;
#pragma omp for schedule(static)
            for (int64_t e = 0; e < nb * pieces; e++) {
                int64_t c = sel_b[e / pieces], p = e % pieces, len;
                const float *src;
                if (channel_on_cols) {
                    len = piece(rows, chunk, p);
                    for (int64_t j = 0; j < len; j++) buf[j] = g[(p * chunk + j) * cols + c];
                    src = buf;
                } else {
                    len = hw;
                    src = g + (p * o + c) * hw;
                }
                square_sums(src, NULL, 1.0f, len, sb + 2 * nr * LANES);
                for (int64_t k = 0; k < nr; k++)
                    clip_sums(src, NULL, 1.0f, len, steps[nr + k * o + c], lo, hi, sb + k * LANES,
                              sb + (nr + k) * LANES);
            }
        }
    }
    if (cos_a) lane_cosines(sums, threads, 2 * per, nr, cos_a);
    if (cos_b) lane_cosines(sums + per, threads, 2 * per, nr, cos_b);
done:
    free(part);
    free(chmax);
    free(steps);
    free(sums);
    free(cbuf);
    free(m_rep);
    return result;
}

/* lq_grad_conv_search for a Linear's gradient g [m, n] (row-major, row stride ldg): one operand's candidates scored on
   whole slices, as grad_quant._fused_search scores a per-row or per-column scale. by_row = 1 (grad_input's, a scale
   per row): y = g[i, j] * mult[j] (mult [n] or NULL) on the rows sel[0 .. ns); by_row = 0 (grad_weight's, a scale per
   column): y = g[i, j] * mult[i * mult_stride] (mult [m] or one value, or NULL) on the columns sel[0 .. ns). Each
   sampled slice's amax from the whole slice (written to amax[0 .. ns)), step_k = max(ratios[k] * amax, eps) / qmax,
   cos [nr] as lq_grad_conv_search. Returns 4 when scratch could not be allocated, 8 for nr outside 1 .. 64. */
int64_t lq_grad_rows_search(const float *g, int64_t m, int64_t n, int64_t ldg, int32_t by_row, int32_t qmax, float eps,
                            const float *mult, int64_t mult_stride, const int64_t *sel, int64_t ns,
                            const float *ratios, int64_t nr, float *amax, double *cos, int32_t threads) {
    if (nr < 1 || nr > 64) return 8;
    const int64_t per = (2 * nr + 1) * LANES, len = by_row ? n : m, chunk = 1024;
    double *sums = (double *)calloc((size_t)threads * (size_t)per, sizeof(double));
    float *cbuf = (float *)malloc((size_t)threads * (size_t)chunk * sizeof(float));
    if (!sums || !cbuf) {
        free(sums);
        free(cbuf);
        return 4;
    }
    const float fq = (float)qmax, lo = -fq, hi = fq;
#pragma omp parallel num_threads(threads)
    {
        int t = thread_num();
        double *acc = sums + (size_t)t * (size_t)per;
        float *buf = cbuf + (size_t)t * (size_t)chunk;
#pragma omp for schedule(static)
        for (int64_t e = 0; e < ns; e++) {
            int64_t s = sel[e];
            uint32_t mb = 0;
            if (by_row) {
                mb = mult ? row_amax_mul(g + s * ldg, mult, n) : row_amax(g + s * ldg, n);
            } else {
                for (int64_t i = 0; i < m; i++) {
                    float y = g[i * ldg + s] * (mult ? mult[i * mult_stride] : 1.0f);
                    uint32_t a = bits_of(y) & ABS_BITS;
                    mb = a > mb ? a : mb;
                }
            }
            float a = float_of(mb);
            amax[e] = a;
            for (int64_t p = 0; p < len; p += chunk) {
                int64_t w = len - p < chunk ? len - p : chunk;
                const float *src, *mm = NULL;
                if (by_row) {
                    src = g + s * ldg + p;
                    mm = mult ? mult + p : NULL;
                } else {
                    for (int64_t j = 0; j < w; j++)
                        buf[j] = g[(p + j) * ldg + s] * (mult ? mult[(p + j) * mult_stride] : 1.0f);
                    src = buf;
                }
                square_sums(src, mm, 1.0f, w, acc + 2 * nr * LANES);
                for (int64_t k = 0; k < nr; k++) {
                    float v = ratios[k] * a, st = (v < eps ? eps : v) / fq;
                    clip_sums(src, mm, 1.0f, w, st, lo, hi, acc + k * LANES, acc + (nr + k) * LANES);
                }
            }
        }
    }
    lane_cosines(sums, threads, per, nr, cos);
    free(sums);
    free(cbuf);
    return 0;
}

/* A channels-last int8 output gradient g [N, Ho, Wo, O] (memory order) laid out on a convolution's grid as channel
   rows (lq.ops.int8_conv_kernels._grad_weight_taps): dst [rows, width] row-major gets
   dst[o, lead + n * hs * ws + a * ws + b] = g[n, a, b, o] for a < Ho, b < Wo, and zeros everywhere else (the lead,
   the grid positions without an output, the tail, rows o >= O). 16 x 16 byte transposes: torch's strided copy of the
   same permutation took 5 ms for a 32 x 64 x 56 x 56 gradient on the 2-core host. With flip = 0x80 every byte is
   written xor-ed with 0x80 (the unsigned operand of amx.c's VNNI kernels: value + 128, zeros as 0x80).
   The zeros: one fill of the whole buffer, split between the threads by bytes, then the gradient over it (its bytes
   are written twice). Filling only the bytes without an output took a memset per grid row and channel (32,768 of
   2 bytes for a 64 x 32 x 14 x 14 gradient): with rows narrower than 16, which took the scalar loop, most of the
   call (0.12 ms there, 0.07 ms for 64 x 64 x 7 x 7). Rows narrower than 16 positions now take the transposes too
   where there are 16 channels or more: 16 positions from the row's first (the next rows' beyond it, while inside g)
   into a buffer, the row's bytes copied per channel. */
void lq_grid_rows(const int8_t *g, int64_t n, int64_t ho, int64_t wo, int64_t o, int64_t hs, int64_t ws, int64_t lead,
                  int64_t width, int64_t rows, int8_t *dst, int32_t flip, int32_t threads) {
    const int fill = flip & 0xff; /* the byte of a zero: 0, or 0x80 with flip (every byte xor-ed with 0x80) */
    const int64_t total = rows * width, positions = n * ho * wo;
#pragma omp parallel num_threads(threads)
    {
        int nt = 1, t = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads();
        t = omp_get_thread_num();
#endif
        int64_t z0 = total * t / nt, z1 = total * (t + 1) / nt;
        memset(dst + z0, fill, (size_t)(z1 - z0));
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n * ho; r++) {
            const int8_t *src = g + r * wo * o;
            int8_t *at = dst + lead + (r / ho) * hs * ws + (r % ho) * ws;
            for (int64_t b0 = 0; b0 < wo; b0 += 16) {
                for (int64_t o0 = 0; o0 < o; o0 += 16) {
#ifdef LQ_SSE2
                    /* a partial block at the end of a row or of the channels, where there are 16: the last full block
                       (overlapping the previous one: those bytes are written twice, alike). 28-wide rows had 12 of
                       their 28 columns in the scalar loop below. */
                    int64_t bb = b0 + 16 <= wo ? b0 : wo - 16, oo0 = o0 + 16 <= o ? o0 : o - 16;
                    if (bb >= 0 && oo0 >= 0) {
                        transpose16(src + bb * o + oo0, o, at + oo0 * width + bb, width, (int8_t)fill);
                        continue;
                    }
                    if (oo0 >= 0 && r * wo + b0 + 16 <= positions) { /* a row narrower than 16 */
                        int8_t buf[256];
                        transpose16(src + b0 * o + oo0, o, buf, 16, (int8_t)fill);
                        for (int64_t k = 0; k < 16; k++) memcpy(at + (oo0 + k) * width + b0, buf + 16 * k, (size_t)wo);
                        continue;
                    }
#endif
                    for (int64_t oo = o0; oo < o && oo < o0 + 16; oo++)
                        for (int64_t b = b0; b < wo && b < b0 + 16; b++)
                            at[oo * width + b] = (int8_t)(src[b * o + oo] ^ fill);
                }
            }
        }
    }
}

/* dst [N, HW, C] = src [N, C, HW]: an int8 tensor from row-major (NCHW) to channels-last (NHWC) in 16 x 16 byte
   transposes, a channel tail as an overlapping last block (those bytes written twice, alike, by the same thread), a
   position tail bytewise; parallel over images x blocks of 16 positions. torch's permuted copy of int8 ran at
   ~2.5 GB/s (1.3 ms for 32 x 128 x 28 x 28), slower than of fp32. */
void lq_to_nhwc_i8(const int8_t *src, int64_t n, int64_t c, int64_t hw, int8_t *dst, int32_t threads) {
    const int64_t pb = (hw + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t e = 0; e < n * pb; e++) {
        const int64_t img = e / pb, p0 = (e % pb) * 16, pw = hw - p0 < 16 ? hw - p0 : 16;
        const int8_t *s = src + img * c * hw;
        int8_t *d = dst + img * hw * c;
        for (int64_t c0 = 0; c0 < c; c0 += 16) {
#ifdef LQ_SSE2
            int64_t cc0 = c0 + 16 <= c ? c0 : c - 16;
            if (pw == 16 && cc0 >= 0) {
                transpose16(s + cc0 * hw + p0, hw, d + p0 * c + cc0, c, 0);
                continue;
            }
#endif
            for (int64_t cc = c0; cc < c && cc < c0 + 16; cc++)
                for (int64_t p = p0; p < p0 + pw; p++) d[p * c + cc] = s[cc * hw + p];
        }
    }
}

/* eq. 10's output stage: out [m, n] = ((float)acc * a_step[i * a_stride]) * b_step[j] + bias[j] (bias may be
   NULL); acc row stride lda; out contiguous, and may be acc's own memory (each element is read before it is
   written, by the same thread). */
void lq_scale_sums(const int32_t *acc, int64_t m, int64_t n, int64_t lda, const float *a_step, int64_t a_stride,
                   const float *b_step, const float *bias, float *out, int32_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < m; i++) row_scale(acc + i * lda, a_step[i * a_stride], b_step, bias, n, out + i * n);
}
