/* CPU kernels: matrix products against GGUF block-quantized weights (float32 activations and
   accumulation), and, at the end, fused RMSNorm and rotary embedding for float32 rows.

   y[r, n] = sum_k x[r, k] * W[n, k] (+ bias[n]), where W's rows are stored in blocks of 32 weights:
   - "u4" blocks: 16 bytes of nibbles (byte j holds weight j in its low half and weight j + 16 in its high
     half, GGUF's Q4_0/Q4_1 order), a float32 scale d and a float32 offset m: w = d * q + m. Q4_1 is this
     exactly; Q4_0 is d * (q - 8), i.e. m = -8 d.
   - "i8" blocks: 32 signed bytes and a float32 scale d: w = d * q (GGUF's Q8_0).
   So the product is the dequantized weights' product up to float32 summation order: no activation
   rounding (llama.cpp quantizes activations to 8 bits; this does not).

   Compiled by engine/kernels/cpu_quant.py with -march=native: AVX-512 where the CPU has it, else AVX2
   with FMA (the build fails on other CPUs and the engine keeps its torch path). OpenMP splits the output
   features across threads; the library names libgomp by soname, so inside the engine it shares torch's
   runtime, threads and wait policy. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
/* One vector holds 16 floats: a block of 32 weights is two. Tiles of 8 rows keep 16 accumulators, the
   block's 2 weight vectors and 2 activation vectors in registers (32 zmm). */
#define W 16
#define TILE 8
typedef __m512 vf;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
/* Weights 0-15 and 16-31 of a u4 block as floats (before scale and offset). */
static inline void u4_unpack(const uint8_t *q, vf out[2]) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    out[0] = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)));
    out[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
}
static inline vf vload_h(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline void i8_unpack(const int8_t *q, vf out[2]) {
    out[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
    out[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16))));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
/* One vector holds 8 floats: a block is four. 4-row tiles: 8 accumulators + 4 weights + 1 activation. */
#define W 8
#define TILE 4
typedef __m256 vf;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vf a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
static inline void u4_unpack(const uint8_t *q, vf out[4]) {
    const __m256i lo8 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));
    const __m256i hi8 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8)));
    const __m256i mask = _mm256_set1_epi32(15);
    out[0] = _mm256_cvtepi32_ps(_mm256_and_si256(lo8, mask)); /* weights 0-7 */
    out[1] = _mm256_cvtepi32_ps(_mm256_and_si256(hi8, mask)); /* 8-15 */
    out[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(lo8, 4));   /* 16-23 */
    out[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(hi8, 4));   /* 24-31 */
}
static inline vf vload_h(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline void i8_unpack(const int8_t *q, vf out[4]) {
    for (int i = 0; i < 4; i++)
        out[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * i))));
}
#else
#error "tandem cpu_quant needs AVX2 with FMA and F16C, or AVX-512"
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
void tandem_u4_matmul(const float *x, int64_t rows, int64_t K, const uint8_t *q, const float *d,
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
void tandem_i8_matmul(const float *x, int64_t rows, int64_t K, const int8_t *q, const float *d, int64_t N,
                      const float *bias, float *y) {
    const int64_t nb = K / 32;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        dot_rows(x, rows, K, q + n * K, 0, d + n * nb, NULL, NULL, nb, y + n, N, bias ? bias[n] : 0.0f);
}

/* ---- Fused elementwise ops on float32 rows, one call where torch runs five to fifteen small ops ---- */

/* RMSNorm of each row of H floats: out = s * rsqrt(mean(s^2) + eps) * w, where s = x, or s = x + residual
   (then also written to sum_out). Rows are split across threads only when there are many. */
void tandem_rms_norm(const float *x, const float *residual, const float *w, float eps, int64_t rows,
                     int64_t H, float *out, float *sum_out) {
#pragma omp parallel for schedule(static) if (rows > 64)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * H;
        const float *src = xr;
        if (residual) {
            float *sr = sum_out + r * H;
            const float *rr = residual + r * H;
            for (int64_t i = 0; i < H; i++) sr[i] = xr[i] + rr[i];
            src = sr;
        }
        vf acc = vzero();
        int64_t i = 0;
        for (; i + W <= H; i += W) {
            const vf v = vload(src + i);
            acc = vfma(v, v, acc);
        }
        float ss = vsum(acc);
        for (; i < H; i++) ss += src[i] * src[i];
        const float scale = 1.0f / sqrtf(ss / (float)H + eps);
        float *o = out + r * H;
        for (i = 0; i < H; i++) o[i] = src[i] * scale * w[i];
    }
}

/* Neox-style rotary embedding of the first `rot` dims of every head: for token t at position p, with
   cos = cache[p, :rot/2] and sin = cache[p, rot/2:rot], x1 = x[:rot/2], x2 = x[rot/2:rot]:
   out = (x1 cos - x2 sin, x2 cos + x1 sin, x[rot:]). x is [T, heads, D] with token stride x_stride (a view
   into the merged qkv output); out is contiguous [T, heads, D]. */
static void rotate_neox(const int64_t *positions, int64_t T, const float *x, int64_t x_stride, int64_t heads,
                        int64_t D, const float *cache, int64_t rot, float *out) {
    const int64_t half = rot / 2;
#pragma omp parallel for schedule(static) if (T > 64)
    for (int64_t t = 0; t < T; t++) {
        const float *cos_t = cache + positions[t] * rot;
        const float *sin_t = cos_t + half;
        for (int64_t h = 0; h < heads; h++) {
            const float *xh = x + t * x_stride + h * D;
            float *oh = out + (t * heads + h) * D;
            for (int64_t i = 0; i < half; i++) {
                const float x1 = xh[i], x2 = xh[i + half];
                oh[i] = x1 * cos_t[i] - x2 * sin_t[i];
                oh[i + half] = x2 * cos_t[i] + x1 * sin_t[i];
            }
            for (int64_t i = rot; i < D; i++) oh[i] = xh[i];
        }
    }
}

void tandem_rotary_neox(const int64_t *positions, int64_t T, const float *q, int64_t q_stride, int64_t q_heads,
                        const float *k, int64_t k_stride, int64_t k_heads, int64_t D, const float *cache,
                        int64_t rot, float *q_out, float *k_out) {
    rotate_neox(positions, T, q, q_stride, q_heads, D, cache, rot, q_out);
    rotate_neox(positions, T, k, k_stride, k_heads, D, cache, rot, k_out);
}

/* Decode attention over the paged cache, one query token per sequence (every row of the step a decode).
   q [B, Hq, D] float32; the cache holds K then V, each [num_blocks, block_size, Hkv, D] in float16
   (is_f16) or float32, `half` elements apart; block_table [B, bt_stride] int32; seq_lens [B] int32.
   The `Hq / Hkv` query heads of a KV head share its K/V reads. Softmax in float32, as the torch path
   computes it after upcasting the cache. scores: scratch of B * Hq * max_len floats. D % W == 0, D <= 256. */
static inline vf load_row(const void *cache, int is_f16, int64_t off, int64_t i) {
    return is_f16 ? vload_h((const uint16_t *)cache + off + i) : vload((const float *)cache + off + i);
}

void tandem_decode_attention(const float *q, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, const void *cache,
                             int is_f16, int64_t half, int64_t block_size, const int32_t *block_table,
                             int64_t bt_stride, const int32_t *seq_lens, float scale, float *scores,
                             int64_t max_len, float *out) {
    const int64_t group = Hq / Hkv, nv = D / W;
#pragma omp parallel for schedule(static) if (B > 1)
    for (int64_t item = 0; item < B * Hkv; item++) {
        const int64_t b = item / Hkv, h = item % Hkv, len = seq_lens[b];
        const int32_t *blocks = block_table + b * bt_stride;
        const int64_t head0 = b * Hq + h * group; /* first query head of this KV head, flat */
        for (int64_t p = 0; p < len; p++) {
            const int64_t slot = (int64_t)blocks[p / block_size] * block_size + p % block_size;
            const int64_t off = (slot * Hkv + h) * D;
            for (int64_t g = 0; g < group; g++) {
                const float *qh = q + (head0 + g) * D;
                vf acc = vzero();
                for (int64_t i = 0; i < nv; i++) acc = vfma(vload(qh + W * i), load_row(cache, is_f16, off, W * i), acc);
                scores[(head0 + g) * max_len + p] = vsum(acc) * scale;
            }
        }
        for (int64_t g = 0; g < group; g++) {
            float *s = scores + (head0 + g) * max_len;
            float top = s[0];
            for (int64_t p = 1; p < len; p++) top = s[p] > top ? s[p] : top;
            float total = 0.0f;
            for (int64_t p = 0; p < len; p++) {
                s[p] = expf(s[p] - top);
                total += s[p];
            }
            vf acc[256 / W];
            for (int64_t i = 0; i < nv; i++) acc[i] = vzero();
            for (int64_t p = 0; p < len; p++) {
                const int64_t slot = (int64_t)blocks[p / block_size] * block_size + p % block_size;
                const int64_t off = half + (slot * Hkv + h) * D;
                const vf weight = vset1(s[p]);
                for (int64_t i = 0; i < nv; i++) acc[i] = vfma(weight, load_row(cache, is_f16, off, W * i), acc[i]);
            }
            const vf inv = vset1(1.0f / total);
            float *o = out + (head0 + g) * D;
            for (int64_t i = 0; i < nv; i++) {
                const vf v = vmul(acc[i], inv);
                memcpy(o + W * i, &v, sizeof v);
            }
        }
    }
}
