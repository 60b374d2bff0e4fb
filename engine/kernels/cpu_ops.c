/* Fused elementwise ops and decode attention on float32 rows (engine/kernels/cpu_ops.py): one call where
   torch runs five to fifteen small ops. Built into the same library as cpu_quant.c. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_simd.h"

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

/* Causal attention over the paged cache for a flat batch of T query tokens (decodes and prompt chunks
   alike): token t belongs to sequence token_seq[t] (NULL: sequence t, as in a decode-only step) and attends
   to that sequence's first token_len[t] positions (its own included; 0: a padding token, zeros out).
   q [T, Hq, D] float32; the cache holds K then V, each [num_blocks, block_size, Hkv, D] in float16
   (is_f16) or float32, `half` elements apart; block_table [B, bt_stride] int32. Softmax in float32, as
   the torch path computes it after upcasting the cache. D % W == 0, D <= 256. Each K and V row is read
   (and converted from float16) once for the `Hq / Hkv` query heads sharing it. Everything it reads is
   behind the pointers (lengths too), so a recorded call replays on new contents (engine/cpu_graphs.py).
   Returns 0, or -1 when the scores scratch cannot be allocated. */
static inline vf load_row(const void *cache, int is_f16, int64_t off, int64_t i) {
    return is_f16 ? vload_h((const uint16_t *)cache + off + i) : vload((const float *)cache + off + i);
}

#define HEADS_PER_PASS 4 /* query heads whose V sums stay in registers together */

/* Query heads [head0, head0 + group) of one token against `len` positions of KV head h. */
static void attend(const float *q, int64_t head0, int64_t group, int64_t D, int64_t Hkv, int64_t h,
                   const void *cache, int is_f16, int64_t half, int64_t block_size, const int32_t *blocks,
                   int64_t len, float scale, float *scores, int64_t stride, float *out) {
    const int64_t nv = D / W;
    if (len <= 0) {
        memset(out + head0 * D, 0, (size_t)(group * D) * sizeof(float));
        return;
    }
    for (int64_t p = 0; p < len; p++) {
        const int64_t slot = (int64_t)blocks[p / block_size] * block_size + p % block_size;
        const int64_t off = (slot * Hkv + h) * D;
        vf k[256 / W];
        for (int64_t i = 0; i < nv; i++) k[i] = load_row(cache, is_f16, off, W * i);
        for (int64_t g = 0; g < group; g++) {
            const float *qh = q + (head0 + g) * D;
            vf acc = vzero();
            for (int64_t i = 0; i < nv; i++) acc = vfma(vload(qh + W * i), k[i], acc);
            scores[g * stride + p] = vsum(acc) * scale;
        }
    }
    float inv_total[HEADS_PER_PASS];
    for (int64_t g0 = 0; g0 < group; g0 += HEADS_PER_PASS) {
        const int64_t heads = group - g0 < HEADS_PER_PASS ? group - g0 : HEADS_PER_PASS;
        for (int64_t g = 0; g < heads; g++) { /* softmax numerators, vectorized past the tail */
            float *s = scores + (g0 + g) * stride;
            for (int64_t p = len; p % W; p++) s[p] = -INFINITY;
            vf top = vset1(-INFINITY), total = vzero();
            for (int64_t p = 0; p < len; p += W) top = vmax(top, vload(s + p));
            float m = -INFINITY, lanes[W];
            vstore(lanes, top);
            for (int i = 0; i < W; i++) m = lanes[i] > m ? lanes[i] : m;
            for (int64_t p = 0; p < len; p += W) {
                const vf e = vexp(vadd(vload(s + p), vset1(-m)));
                vstore(s + p, e);
                total = vadd(total, e);
            }
            inv_total[g] = 1.0f / vsum(total); /* the tail's exp(-inf - m) clamps to ~1e-38: unseen */
        }
        vf acc[HEADS_PER_PASS][256 / W];
        for (int64_t g = 0; g < heads; g++)
            for (int64_t i = 0; i < nv; i++) acc[g][i] = vzero();
        for (int64_t p = 0; p < len; p++) {
            const int64_t slot = (int64_t)blocks[p / block_size] * block_size + p % block_size;
            const int64_t off = half + (slot * Hkv + h) * D;
            vf v[256 / W];
            for (int64_t i = 0; i < nv; i++) v[i] = load_row(cache, is_f16, off, W * i);
            for (int64_t g = 0; g < heads; g++) {
                const vf weight = vset1(scores[(g0 + g) * stride + p]);
                for (int64_t i = 0; i < nv; i++) acc[g][i] = vfma(weight, v[i], acc[g][i]);
            }
        }
        for (int64_t g = 0; g < heads; g++) {
            const vf inv = vset1(inv_total[g]);
            float *o = out + (head0 + g0 + g) * D;
            for (int64_t i = 0; i < nv; i++) vstore(o + W * i, vmul(acc[g][i], inv));
        }
    }
}

int tandem_paged_attention(const float *q, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, const void *cache,
                           int is_f16, int64_t half, int64_t block_size, const int32_t *block_table,
                           int64_t bt_stride, const int32_t *token_seq, const int32_t *token_len, float scale,
                           float *out) {
    const int64_t group = Hq / Hkv;
    int64_t max_len = 0;
    for (int64_t t = 0; t < T; t++) max_len = token_len[t] > max_len ? token_len[t] : max_len;
    const int64_t stride = (max_len + W - 1) / W * W; /* score rows padded to whole vectors */
    int failed = 0;
#pragma omp parallel if (T > 1)
    {
        float *scores = malloc((size_t)(group * stride + W) * sizeof(float));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < T * Hkv; item++) {
            if (scores == NULL) continue;
            const int64_t t = item / Hkv, h = item % Hkv;
            const int32_t *blocks = block_table + (token_seq ? token_seq[t] : t) * bt_stride;
            attend(q, t * Hq + h * group, group, D, Hkv, h, cache, is_f16, half, block_size, blocks, token_len[t],
                   scale, scores, stride, out);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

/* silu(x[:, :I]) * x[:, I:] for x [T, 2I] float32 (I % W == 0) -> out [T, I]. */
void tandem_silu_and_mul(const float *x, int64_t T, int64_t I, float *out) {
#pragma omp parallel for schedule(static) if (T > 64)
    for (int64_t t = 0; t < T; t++) {
        const float *gate = x + t * 2 * I, *up = gate + I;
        for (int64_t i = 0; i < I; i += W) {
            const vf g = vload(gate + i);
            const vf silu = vdiv(g, vadd(vset1(1.0f), vexp(vmul(g, vset1(-1.0f)))));
            vstore(out + t * I + i, vmul(silu, vload(up + i)));
        }
    }
}

/* This step's k and v [T, Hkv, D] float32 (token strides k_stride, v_stride; each token's heads
   contiguous) into the paged cache [2, num_blocks, block_size, Hkv, D] (float16 when is_f16, rounded to
   nearest as torch's .to() rounds, else float32) at slots[t]. D % W == 0. */
void tandem_write_kv(const float *k, int64_t k_stride, const float *v, int64_t v_stride, int64_t T,
                     int64_t Hkv, int64_t D, void *cache, int is_f16, int64_t half, const int64_t *slots) {
    const int64_t row = Hkv * D;
    for (int64_t t = 0; t < T; t++) {
        const int64_t off = slots[t] * row;
        const float *src[2] = {k + t * k_stride, v + t * v_stride};
        for (int kv = 0; kv < 2; kv++) {
            const int64_t dst = kv * half + off;
            if (is_f16) {
                uint16_t *c = (uint16_t *)cache + dst;
                for (int64_t i = 0; i < row; i += W) vstore_h(c + i, vload(src[kv] + i));
            } else {
                memcpy((float *)cache + dst, src[kv], (size_t)row * sizeof(float));
            }
        }
    }
}
