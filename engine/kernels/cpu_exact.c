/* Exact products against GGUF block-quantized weights, for an explicit --dtype (engine/layers/gguf_packed.py,
   ExactPackedWeight): float32 activations and accumulation on the dequantized weights, so the result is
   the dense product up to summation order (transformers-exact greedy decoding in float32). --dtype auto
   uses the faster integer products of cpu_quant.c instead.

   y[r, n] = sum_k x[r, k] * W[n, k] (+ bias[n]), W row by row in GGUF's blocks of 32:
   - "u4" blocks: 16 bytes of nibbles (byte j holds weight j in its low half and weight j + 16 in its high
     half, GGUF's Q4_0/Q4_1 order), a float32 scale d and a float32 offset m: w = d * q + m;
   - "i8" blocks: 32 signed bytes and a float32 scale d: w = d * q (GGUF's Q8_0). */

#include <stdint.h>

#include "cpu_simd.h"

#if W == 16
#define TILE 8 /* 16 accumulators, the block's 2 weight vectors and 2 activation vectors: 32 zmm */
/* Weights 0-15 and 16-31 of a u4 block as floats (before scale and offset). */
static inline void u4_unpack(const uint8_t *q, vf out[2]) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    out[0] = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)));
    out[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
}
static inline void i8_unpack(const int8_t *q, vf out[2]) {
    out[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
    out[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16))));
}
#else
#define TILE 4 /* 8 accumulators + 4 weights + 1 activation */
static inline void u4_unpack(const uint8_t *q, vf out[4]) {
    const __m256i lo8 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));
    const __m256i hi8 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8)));
    const __m256i mask = _mm256_set1_epi32(15);
    out[0] = _mm256_cvtepi32_ps(_mm256_and_si256(lo8, mask)); /* weights 0-7 */
    out[1] = _mm256_cvtepi32_ps(_mm256_and_si256(hi8, mask)); /* 8-15 */
    out[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(lo8, 4));   /* 16-23 */
    out[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(hi8, 4));   /* 24-31 */
}
static inline void i8_unpack(const int8_t *q, vf out[4]) {
    for (int i = 0; i < 4; i++)
        out[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * i))));
}
#endif

#define NV (32 / W) /* vectors per block */

/* sum_i a[i] * b[i] over n floats. */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    vf acc = vzero();
    int64_t i = 0;
    for (; i + W <= n; i += W) acc = vfma(vload(a + i), vload(b + i), acc);
    float s = vsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* One weight row (nb blocks) against rows [0, R) of x (row stride K); results to y with row stride ldy.
   u4 rows pass their offsets m and the per-block sums of x (xsum, row stride nb); i8 rows pass NULL.
   Each row keeps two accumulators, so consecutive FMAs do not wait on each other's latency. */
static inline __attribute__((always_inline)) void dot_row(const float *x, int64_t K, const void *q, int is_u4,
                                                         const float *d, const float *m, const float *xsum,
                                                         int64_t nb, float *y, int64_t ldy, float bias,
                                                         const int R) {
    vf acc[TILE][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = vzero();
    for (int64_t b = 0; b < nb; b++) {
        vf w[NV];
        if (is_u4)
            u4_unpack((const uint8_t *)q + 16 * b, w);
        else
            i8_unpack((const int8_t *)q + 32 * b, w);
        const vf scale = vset1(d[b]);
        for (int i = 0; i < NV; i++) w[i] = vmul(w[i], scale);
        for (int r = 0; r < R; r++) {
            const float *xb = x + r * K + 32 * b;
            for (int i = 0; i < NV; i++) acc[r][i & 1] = vfma(w[i], vload(xb + W * i), acc[r][i & 1]);
        }
    }
    for (int r = 0; r < R; r++) {
        float offset = is_u4 ? dot_f32(m, xsum + r * nb, nb) : 0.0f;
        y[r * ldy] = vsum(acc[r][0]) + vsum(acc[r][1]) + offset + bias;
    }
}

/* All rows of x against weight row n, TILE rows at a time. */
static inline __attribute__((always_inline)) void dot_rows(const float *x, int64_t rows, int64_t K,
                                                          const void *q, int is_u4, const float *d,
                                                          const float *m, const float *xsum, int64_t nb,
                                                          float *y, int64_t N, float bias) {
    int64_t r = 0;
    for (; r + TILE <= rows; r += TILE)
        dot_row(x + r * K, K, q, is_u4, d, m, xsum + r * nb, nb, y + r * N, N, bias, TILE);
    switch (rows - r) {
#define TAIL(R)                                                                          \
    case R:                                                                              \
        dot_row(x + r * K, K, q, is_u4, d, m, xsum + r * nb, nb, y + r * N, N, bias, R); \
        break;
        TAIL(1)
        TAIL(2)
        TAIL(3)
#if TILE > 4
        TAIL(4)
        TAIL(5)
        TAIL(6)
        TAIL(7)
#endif
        default:
            break;
    }
}

/* x [rows, K] float32, K a multiple of 32; q [N, K / 2]; d, m [N, K / 32]; xsum [rows, K / 32] scratch;
   y [rows, N] float32; bias [N] or NULL. */
void tandem_u4_matmul_exact(const float *x, int64_t rows, int64_t K, const uint8_t *q, const float *d,
                      const float *m, int64_t N, const float *bias, float *xsum, float *y) {
    const int64_t nb = K / 32;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < nb; b++) {
            float s = 0.0f;
            for (int i = 0; i < 32; i++) s += x[r * K + 32 * b + i];
            xsum[r * nb + b] = s;
        }
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        dot_rows(x, rows, K, q + n * (K / 2), 1, d + n * nb, m + n * nb, xsum, nb, y + n, N,
                 bias ? bias[n] : 0.0f);
}

/* x [rows, K] float32, K a multiple of 32; q [N, K] int8; d [N, K / 32]; y [rows, N]; bias [N] or NULL. */
void tandem_i8_matmul_exact(const float *x, int64_t rows, int64_t K, const int8_t *q, const float *d, int64_t N,
                      const float *bias, float *y) {
    const int64_t nb = K / 32;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        dot_rows(x, rows, K, q + n * K, 0, d + n * nb, NULL, NULL, nb, y + n, N, bias ? bias[n] : 0.0f);
}
