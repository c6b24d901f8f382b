/* BGR uint8 row -> float32 luma row, d[x] = wb*B + wg*G + wr*R (evaluated in that
 * order, in float, with no fused multiply-add: the same bits as the scalar loop).
 *
 * With SSSE3 (every x86-64 CPU since 2006; setup.py asks for it on x86-64) 16 pixels
 * at a time are de-interleaved with three byte shuffles per channel, widened to
 * float and weighted; GCC cannot vectorise the stride-3 loads by itself. Where the
 * CPU has AVX2 (checked once at run time) the widening and weighting run 8 floats
 * wide, which is what keeps up with OpenCV's cvtColor. Elsewhere, and for the tail
 * of a row, the plain loop. */
#ifndef FB_BGR_GRAY_H
#define FB_BGR_GRAY_H
#include <stddef.h>
#include <stdint.h>
#ifdef __SSSE3__
#include <tmmintrin.h>
#endif

#ifdef __SSSE3__
/* B, G and R of the 16 pixels at p (48 bytes) as three u8x16 vectors. */
static inline void fb_deinterleave16(const uint8_t *p, __m128i *B, __m128i *G, __m128i *R) {
    const __m128i b0 = _mm_setr_epi8(0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m128i b1 = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14, -1, -1, -1, -1, -1);
    const __m128i b2 = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 1, 4, 7, 10, 13);
    const __m128i g0 = _mm_setr_epi8(1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m128i g1 = _mm_setr_epi8(-1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1);
    const __m128i g2 = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14);
    const __m128i r0 = _mm_setr_epi8(2, 5, 8, 11, 14, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m128i r1 = _mm_setr_epi8(-1, -1, -1, -1, -1, 1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1);
    const __m128i r2 = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15);
    __m128i a = _mm_loadu_si128((const __m128i *)p);
    __m128i b = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i c = _mm_loadu_si128((const __m128i *)(p + 32));
    *B = _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(a, b0), _mm_shuffle_epi8(b, b1)),
                      _mm_shuffle_epi8(c, b2));
    *G = _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(a, g0), _mm_shuffle_epi8(b, g1)),
                      _mm_shuffle_epi8(c, g2));
    *R = _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(a, r0), _mm_shuffle_epi8(b, r1)),
                      _mm_shuffle_epi8(c, r2));
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FB_HAVE_AVX2_PATH 1
/* Pixels [0, n16) of the row, n16 a multiple of 16, with AVX2. */
__attribute__((target("avx2")))
static void fb_gray_avx2(const uint8_t *s, float *d, ptrdiff_t n16, float wb, float wg,
                         float wr) {
    const __m256 vb = _mm256_set1_ps(wb), vg = _mm256_set1_ps(wg), vr = _mm256_set1_ps(wr);
    for (ptrdiff_t x = 0; x < n16; x += 16) {
        __m128i B, G, R;
        fb_deinterleave16(s + 3 * x, &B, &G, &R);
        for (int h = 0; h < 2; h++) {
            __m256 fb = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(B));
            __m256 fg = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(G));
            __m256 fr = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(R));
            __m256 acc = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(vb, fb), _mm256_mul_ps(vg, fg)),
                                       _mm256_mul_ps(vr, fr));
            _mm256_storeu_ps(d + x + 8 * h, acc);
            B = _mm_srli_si128(B, 8);
            G = _mm_srli_si128(G, 8);
            R = _mm_srli_si128(R, 8);
        }
    }
}
#endif

static inline void fb_widen_store(__m128i v, __m128 w, __m128 acc[4], int first) {
    const __m128i zero = _mm_setzero_si128();
    __m128i lo = _mm_unpacklo_epi8(v, zero), hi = _mm_unpackhi_epi8(v, zero);
    __m128 f[4] = {_mm_cvtepi32_ps(_mm_unpacklo_epi16(lo, zero)),
                   _mm_cvtepi32_ps(_mm_unpackhi_epi16(lo, zero)),
                   _mm_cvtepi32_ps(_mm_unpacklo_epi16(hi, zero)),
                   _mm_cvtepi32_ps(_mm_unpackhi_epi16(hi, zero))};
    for (int k = 0; k < 4; k++)
        acc[k] = first ? _mm_mul_ps(w, f[k]) : _mm_add_ps(acc[k], _mm_mul_ps(w, f[k]));
}
#endif

static inline void fb_bgr_to_gray_row_u8(const uint8_t *s, float *d, ptrdiff_t cols,
                                         float wb, float wg, float wr) {
    ptrdiff_t x = 0;
#ifdef __SSSE3__
#ifdef FB_HAVE_AVX2_PATH
    static int avx2 = -1;
    if (avx2 < 0)
        avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
    if (avx2) {
        x = cols & ~(ptrdiff_t)15;
        fb_gray_avx2(s, d, x, wb, wg, wr);
    }
#endif
    const __m128 vb = _mm_set1_ps(wb), vg = _mm_set1_ps(wg), vr = _mm_set1_ps(wr);
    for (; x + 16 <= cols; x += 16) {
        __m128i B, G, R;
        fb_deinterleave16(s + 3 * x, &B, &G, &R);
        __m128 acc[4];
        fb_widen_store(B, vb, acc, 1);
        fb_widen_store(G, vg, acc, 0);
        fb_widen_store(R, vr, acc, 0);
        for (int k = 0; k < 4; k++)
            _mm_storeu_ps(d + x + 4 * k, acc[k]);
    }
#endif
    for (; x < cols; x++)
        d[x] = wb * (float)s[3 * x] + wg * (float)s[3 * x + 1] + wr * (float)s[3 * x + 2];
}
#endif
