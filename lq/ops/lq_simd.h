/* lq's C kernels: SSE2 helpers shared by lq/ops/quant.c and lq/ops/amx.c (included; lq/native.py hashes this file
 * with each source, so a change rebuilds both). */
#ifndef LQ_SIMD_H
#define LQ_SIMD_H
#include <emmintrin.h>
#include <stdint.h>

/* dst row c (16 bytes, row stride ds) = column c of the 16 x 16 bytes at src (row stride ss), each byte xor-ed with
   flip (0, or 0x80: a signed byte as its unsigned value + 128, for the VNNI kernels of amx.c): four rounds of
   unpacks (bytes, words, dwords, qwords) */
static inline void transpose16(const int8_t *src, int64_t ss, int8_t *dst, int64_t ds, int8_t flip) {
    __m128i x[16], t[16], u[16], v[16], mask = _mm_set1_epi8(flip);
    for (int i = 0; i < 16; i++) x[i] = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(src + i * ss)), mask);
    for (int i = 0; i < 8; i++) { /* rows 2i, 2i + 1 paired: columns 0-7, 8-15 */
        t[i] = _mm_unpacklo_epi8(x[2 * i], x[2 * i + 1]);
        t[i + 8] = _mm_unpackhi_epi8(x[2 * i], x[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* u[4g + i]: rows 4i..4i+3 of columns 4g..4g+3 */
        u[i] = _mm_unpacklo_epi16(t[2 * i], t[2 * i + 1]);
        u[i + 4] = _mm_unpackhi_epi16(t[2 * i], t[2 * i + 1]);
        u[i + 8] = _mm_unpacklo_epi16(t[8 + 2 * i], t[8 + 2 * i + 1]);
        u[i + 12] = _mm_unpackhi_epi16(t[8 + 2 * i], t[8 + 2 * i + 1]);
    }
    for (int g = 0; g < 4; g++) {
        v[4 * g] = _mm_unpacklo_epi32(u[4 * g], u[4 * g + 1]);     /* rows 0-7, columns 4g, 4g+1 */
        v[4 * g + 1] = _mm_unpackhi_epi32(u[4 * g], u[4 * g + 1]); /* rows 0-7, columns 4g+2, 4g+3 */
        v[4 * g + 2] = _mm_unpacklo_epi32(u[4 * g + 2], u[4 * g + 3]);
        v[4 * g + 3] = _mm_unpackhi_epi32(u[4 * g + 2], u[4 * g + 3]);
        _mm_storeu_si128((__m128i *)(dst + (4 * g) * ds), _mm_unpacklo_epi64(v[4 * g], v[4 * g + 2]));
        _mm_storeu_si128((__m128i *)(dst + (4 * g + 1) * ds), _mm_unpackhi_epi64(v[4 * g], v[4 * g + 2]));
        _mm_storeu_si128((__m128i *)(dst + (4 * g + 2) * ds), _mm_unpacklo_epi64(v[4 * g + 1], v[4 * g + 3]));
        _mm_storeu_si128((__m128i *)(dst + (4 * g + 3) * ds), _mm_unpackhi_epi64(v[4 * g + 1], v[4 * g + 3]));
    }
}

#endif
