/* CPU matrix products against GGUF block-quantized weights, as integer dot products
   (engine/kernels/cpu_quant.py calls them; engine/layers/gguf_packed.py lays the weights out).

   y[r, n] = sum_k x[r, k] * W[n, k] (+ bias[n]). W is stored in GGUF's blocks of 32 weights along k:
   - "u4" (Q4_0, Q4_1): 4-bit q, w = d * q + m (Q4_0 is d * (q - 8): m = -8 d);
   - "i8" (Q8_0): int8 q, w = d * q;
   with d and m float16, as in the file.

   Activations. Each row's block of 32 floats is written as s * (a1 + a2 / 256): s = max|x| / 127,
   a1 = round(x / s) and a2 = the remainder rounded to 256ths of s, both int8. That keeps about 15 bits of
   each value: on the default model the top-1 agreement with float32 activations is 100% of positions
   (benchmarks/int8_fidelity.py), where one int8 level (llama.cpp's Q8 activations) agreed on 96.7%.
   Each block's product is then an exact integer dot product, scaled once: d * s / 256 * sum q (256 a1 + a2),
   plus m * sum x for u4 (with the exact float sum). Each output's arithmetic does not depend on how many
   rows share the call.

   Weight layout, "g16": output rows in groups of 16 (the last one padded with zero rows). Within a group,
   block by block, the 16 rows' quads (4 consecutive weights) lie side by side, so one 64-byte vector holds
   one quad of each row and a dot-product instruction (AVX-512 VNNI vpdpbusd; AVX2 vpmaddubsw) multiplies
   it by one broadcast quad of activations: the 16 lanes are the 16 outputs, with no horizontal sums.
   - u4: per group and block 4 x 64 bytes; byte (j, i, t) holds row i's weight 4j + t in its low nibble and
     weight 4(j + 4) + t in its high nibble.
   - i8: per group and block 8 x 64 bytes; byte (j, i, t) is row i's weight 4j + t.
   - d (and m for u4): per group and block, 16 float16. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_simd.h"

#define GROUP 16 /* output rows per group */
/* Weight bytes to prefetch ahead: 0-4096 measured alike within noise on the Zen 4 VM (12.6-15.2 GB/s at one
   row, benchmarks/RESULTS.md); 2048 kept. */
#define PREFETCH 2048

/* The activations, quantized once per call. */
typedef struct {
    int64_t K, nb;
    const int8_t *a1, *a2; /* [rows, K] */
    const float *scale;    /* [rows, nb]: s / 256 */
    const float *sum;      /* [rows, nb]: the block's sum of x, for u4 offsets */
    const int32_t *fix;    /* [rows, nb]: 128 * sum (256 a1 + a2), for i8 weights biased to unsigned */
} acts_t;

/* Vectorized, and in parallel only for big calls: a block costs a few nanoseconds, where waking a passive
   OpenMP thread for a parallel region costs 50-100 us (engine/cpu_threads.py). The scalar loop this
   replaced took half of a 14-row down projection's time (K = 1536, N = 576). */
static void quantize_rows(const float *x, int64_t rows, int64_t K, int8_t *a1, int8_t *a2, float *scale,
                          float *sum, int32_t *fix) {
    const int64_t nb = K / 32;
#pragma omp parallel for schedule(static) if (rows > 256)
    for (int64_t rb = 0; rb < rows * nb; rb++) {
        const float *xb = x + rb * 32; /* rows are K = 32 nb floats apart: block rb of the flat array */
        vf top = vzero(), total = vzero();
        for (int i = 0; i < 32; i += W) {
            top = vmax(top, vabs(vload(xb + i)));
            total = vadd(total, vload(xb + i));
        }
        const float amax = vmaxall(top);
        const vf inv = vset1(amax > 0.0f ? 127.0f / amax : 0.0f);
        vf sum1 = vzero(), sum2 = vzero(); /* integers below 2^13: exact in float */
        for (int i = 0; i < 32; i += W) {
            const vf v = vmul(vload(xb + i), inv);
            const vf hi = vround(v);
            /* the remainder in 256ths; 128 only on an exact tie */
            const vf lo = vmin(vmax(vround(vmul(vsub(v, hi), vset1(256.0f))), vset1(-127.0f)), vset1(127.0f));
            vstore_i8(a1 + rb * 32 + i, hi);
            vstore_i8(a2 + rb * 32 + i, lo);
            sum1 = vadd(sum1, hi);
            sum2 = vadd(sum2, lo);
        }
        scale[rb] = amax / 127.0f / 256.0f;
        sum[rb] = vsum(total);
        fix[rb] = 128 * (256 * (int32_t)vsum(sum1) + (int32_t)vsum(sum2));
    }
}

static inline int32_t quad(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define TILE 8 /* activation rows per pass over a group's weights: 8 weight + 8 accumulator zmm */

/* Rows [r0, r0 + R) of the activations against one group (16 output rows starting at n0). */
static inline __attribute__((always_inline)) void group_tile(const acts_t *a, int64_t r0, const int R,
                                                            const uint8_t *q, const uint16_t *d,
                                                            const uint16_t *m, const int is_u4,
                                                            const float *bias, int64_t n0, int64_t N,
                                                            float *y) {
    __m512 acc[TILE];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(15), flip = _mm512_set1_epi8((char)0x80);
    for (int64_t b = 0; b < a->nb; b++) {
        __m512i w[8];
        if (is_u4) {
            for (int j = 0; j < 4; j++) {
                _mm_prefetch((const char *)(q + 256 * b + 64 * j + PREFETCH), _MM_HINT_T0);
                const __m512i v = _mm512_loadu_si512(q + 256 * b + 64 * j);
                w[j] = _mm512_and_si512(v, low);
                w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
        } else { /* vpdpbusd multiplies unsigned by signed bytes: w + 128, corrected by `fix` */
            for (int j = 0; j < 8; j++) {
                _mm_prefetch((const char *)(q + 512 * b + 64 * j + PREFETCH), _MM_HINT_T0);
                w[j] = _mm512_xor_si512(_mm512_loadu_si512(q + 512 * b + 64 * j), flip);
            }
        }
        const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + 16 * b)));
        __m512 mv = dv;
        if (is_u4) mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m + 16 * b)));
        for (int r = 0; r < R; r++) {
            const int64_t at = (r0 + r) * a->K + 32 * b, blk = (r0 + r) * a->nb + b;
            /* four independent chains (even and odd quads), so the dot products' latency overlaps */
            __m512i hi[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()}, lo[2] = {hi[0], hi[0]};
            for (int j = 0; j < 8; j++) {
                const __m512i x1 = _mm512_broadcastd_epi32(_mm_loadu_si32(a->a1 + at + 4 * j));
                const __m512i x2 = _mm512_broadcastd_epi32(_mm_loadu_si32(a->a2 + at + 4 * j));
                hi[j & 1] = _mm512_dpbusd_epi32(hi[j & 1], w[j], x1);
                lo[j & 1] = _mm512_dpbusd_epi32(lo[j & 1], w[j], x2);
            }
            __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(hi[0], hi[1]), 8),
                                           _mm512_add_epi32(lo[0], lo[1]));
            if (!is_u4) dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(a->fix[blk]));
            const __m512 scale = _mm512_mul_ps(dv, _mm512_set1_ps(a->scale[blk]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
            if (is_u4) acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(a->sum[blk]), acc[r]);
        }
    }
    const int64_t valid = N - n0 < GROUP ? N - n0 : GROUP;
    const __mmask16 mask = (__mmask16)((1u << valid) - 1u);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
    for (int r = 0; r < R; r++) _mm512_mask_storeu_ps(y + (r0 + r) * N + n0, mask, _mm512_add_ps(acc[r], bv));
}

#else /* AVX2: a group is two halves of 8 rows, each half 32 bytes of every 64-byte quad vector */
#define TILE 4

/* sum over the block of q * a for one half: 8 lanes (rows), int32. */
static inline __m256i half_dot(const uint8_t *qb, const __m256i w[8], const int8_t *act, const int is_u4) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (is_u4) { /* |q a| <= 15 * 127: eight pair sums fit int16 (30480) before one widening */
        __m256i s = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[j], _mm256_set1_epi32(quad(act + 4 * j))));
        return _mm256_madd_epi16(s, ones);
    }
    /* signed weights: |w| times a with w's sign (a in [-127, 127], so no overflow), widened per quad */
    __m256i s = _mm256_setzero_si256();
    for (int j = 0; j < 8; j++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(qb + 64 * j));
        const __m256i t = _mm256_maddubs_epi16(_mm256_abs_epi8(v), _mm256_sign_epi8(_mm256_set1_epi32(quad(act + 4 * j)), v));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(t, ones));
    }
    return s;
}

static inline __attribute__((always_inline)) void group_tile(const acts_t *a, int64_t r0, const int R,
                                                            const uint8_t *q, const uint16_t *d,
                                                            const uint16_t *m, const int is_u4,
                                                            const float *bias, int64_t n0, int64_t N,
                                                            float *y) {
    for (int h = 0; h < 2; h++) {
        const int64_t start = n0 + 8 * h;
        if (start >= N) break;
        __m256 acc[TILE];
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
        const __m256i low = _mm256_set1_epi8(15);
        for (int64_t b = 0; b < a->nb; b++) {
            const uint8_t *qb = q + (is_u4 ? 256 : 512) * b + 32 * h;
            __m256i w[8];
            if (is_u4) {
                for (int j = 0; j < 4; j++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(qb + 64 * j));
                    w[j] = _mm256_and_si256(v, low);
                    w[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                }
            }
            const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + 16 * b + 8 * h)));
            __m256 mv = dv;
            if (is_u4) mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + 16 * b + 8 * h)));
            for (int r = 0; r < R; r++) {
                const int64_t at = (r0 + r) * a->K + 32 * b, blk = (r0 + r) * a->nb + b;
                const __m256i hi = half_dot(qb, w, a->a1 + at, is_u4), lo = half_dot(qb, w, a->a2 + at, is_u4);
                const __m256i dot = _mm256_add_epi32(_mm256_slli_epi32(hi, 8), lo);
                const __m256 scale = _mm256_mul_ps(dv, _mm256_set1_ps(a->scale[blk]));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r]);
                if (is_u4) acc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(a->sum[blk]), acc[r]);
            }
        }
        const int64_t valid = N - start < 8 ? N - start : 8;
        for (int r = 0; r < R; r++) {
            float out[8];
            _mm256_storeu_ps(out, acc[r]);
            float *yr = y + (r0 + r) * N + start;
            for (int64_t i = 0; i < valid; i++) yr[i] = out[i] + (bias ? bias[start + i] : 0.0f);
        }
    }
}
#endif

/* 1 when this build's products use AVX-512 VNNI, 0 for AVX2 (gguf_packed.py routes by row count). */
int tandem_block_vnni(void) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    return 1;
#else
    return 0;
#endif
}

/* Rows [r_begin, r_end) of the activations against group g, TILE rows at a time. */
static inline __attribute__((always_inline)) void group_rows(const acts_t *a, int64_t r_begin, int64_t r_end,
                                                            int64_t g, const uint8_t *q, const uint16_t *d,
                                                            const uint16_t *m, const int is_u4,
                                                            const float *bias, int64_t N, float *y) {
    const int64_t nb = a->nb;
    const uint8_t *qg = q + g * nb * (is_u4 ? 256 : 512);
    const uint16_t *dg = d + g * nb * GROUP, *mg = is_u4 ? m + g * nb * GROUP : NULL;
    int64_t r0 = r_begin;
    for (; r0 + TILE <= r_end; r0 += TILE) group_tile(a, r0, TILE, qg, dg, mg, is_u4, bias, g * GROUP, N, y);
    switch (r_end - r0) {
#define TAIL(R)                                                                \
    case R:                                                                    \
        group_tile(a, r0, R, qg, dg, mg, is_u4, bias, g * GROUP, N, y);        \
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

/* Rows are taken in chunks of at most ROW_CHUNK against every group: a chunk's quantized activations (at
   most 64 x K x 2 bytes) stay in cache while the weights stream past, whatever the row count. The chunks
   are of equal size: the threads split chunks x groups in order, so 80 rows as 64 + 16 gave one thread
   four times the other's work and took as long as 128 rows. */
#define ROW_CHUNK 64

/* x [rows, K] float32 (K a multiple of 32) @ W^T -> y [rows, N] float32 (+ bias [N] or NULL). W in the
   g16 layout: q of ceil(N / 16) groups; d and m (u4; NULL for i8) [groups, K / 32, 16] float16.
   Returns 0, or -1 when the scratch for the quantized activations cannot be allocated. */
int tandem_block_matmul(const float *x, int64_t rows, int64_t K, const uint8_t *q, const uint16_t *d,
                        const uint16_t *m, int64_t N, const float *bias, float *y) {
    const int64_t nb = K / 32, groups = (N + GROUP - 1) / GROUP, chunks = (rows + ROW_CHUNK - 1) / ROW_CHUNK;
    const int64_t per_chunk = (rows + chunks - 1) / chunks;
    char *scratch = malloc((size_t)(rows * K * 2 + rows * nb * 12));
    if (scratch == NULL) return -1;
    int8_t *a1 = (int8_t *)scratch, *a2 = a1 + rows * K;
    float *scale = (float *)(a2 + rows * K), *sum = scale + rows * nb;
    int32_t *fix = (int32_t *)(sum + rows * nb);
    quantize_rows(x, rows, K, a1, a2, scale, sum, fix);
    const acts_t acts = {K, nb, a1, a2, scale, sum, fix};
#pragma omp parallel for schedule(static)
    for (int64_t item = 0; item < chunks * groups; item++) {
        const int64_t chunk = item / groups, g = item % groups, r_begin = chunk * per_chunk;
        const int64_t r_end = r_begin + per_chunk < rows ? r_begin + per_chunk : rows;
        if (r_begin >= rows) continue;
        if (m != NULL)
            group_rows(&acts, r_begin, r_end, g, q, d, m, 1, bias, N, y);
        else
            group_rows(&acts, r_begin, r_end, g, q, d, NULL, 0, bias, N, y);
    }
    free(scratch);
    return 0;
}
