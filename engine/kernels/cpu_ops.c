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
   the torch path computes it after upcasting the cache. D % W == 0, D <= 256.

   Work goes by runs: up to RUN consecutive tokens of one sequence, each seeing one more position than the
   last (a prompt chunk), against one KV head. Each K and V row is read (and converted from float16) once
   per run for its tokens' Hq / Hkv query heads sharing it: per token, a 2,048-token prompt read every
   layer's K and V from L3 for each of its tokens and spent two thirds of its prefill here (2.9 of 4.4 s).
   Each query's arithmetic is the same whatever run it is in (its own scores, softmax and sums, in the same
   order), so results do not depend on how a prompt is chunked or batched. Everything it reads is behind
   the pointers (lengths too), so a recorded call replays on new contents (engine/cpu_graphs.py).
   Returns 0, or -1 when scratch cannot be allocated. */
static inline vf load_row(const void *cache, int is_f16, int64_t off, int64_t i) {
    return is_f16 ? vload_h((const uint16_t *)cache + off + i) : vload((const float *)cache + off + i);
}

#define RUN 16           /* query tokens per run */
#define HEADS_PER_PASS 4 /* query heads whose V sums stay in registers together */

/* Tokens [t0, t0 + nt) of one sequence (token t0 + i attends to lens[i] positions), query heads
   [h * group, (h + 1) * group) of each, against `len` = max(lens) positions of KV head h. scores: nt * group
   rows of `stride` floats; inv_total: nt * group floats. nv = D / W vectors per row and hp heads per V pass
   are constants where attend() inlines it, so the K/V rows and V sums stay in registers: with them
   variable the sums went through the stack on every position. */
static inline __attribute__((always_inline)) void attend_rows(
    const float *q, int64_t t0, int64_t nt, const int32_t *lens, int64_t Hq, int64_t group, const int64_t nv,
    const int64_t hp, int64_t Hkv, int64_t h, const void *cache, int is_f16, int64_t half, int64_t block_size,
    const int32_t *blocks, float scale, float *scores, float *inv_total, int64_t stride, float *out) {
    const int64_t D = nv * W, nq = nt * group;
    int64_t len = 0;
    for (int64_t i = 0; i < nt; i++) {
        len = lens[i] > len ? lens[i] : len;
        if (lens[i] <= 0) memset(out + ((t0 + i) * Hq + h * group) * D, 0, (size_t)(group * D) * sizeof(float));
    }
    for (int64_t p = 0; p < len; p++) {
        const int64_t slot = (int64_t)blocks[p / block_size] * block_size + p % block_size;
        const int64_t off = (slot * Hkv + h) * D;
        vf k[256 / W];
        for (int64_t i = 0; i < nv; i++) k[i] = load_row(cache, is_f16, off, W * i);
        for (int64_t i = 0; i < nt; i++) {
            if (p >= lens[i]) continue;
            for (int64_t g = 0; g < group; g++) {
                const float *qh = q + ((t0 + i) * Hq + h * group + g) * D;
                vf acc = vzero();
                for (int64_t c = 0; c < nv; c++) acc = vfma(vload(qh + W * c), k[c], acc);
                scores[(i * group + g) * stride + p] = vsum(acc) * scale;
            }
        }
    }
    for (int64_t j = 0; j < nq; j++) { /* softmax numerators, vectorized past the tail */
        const int64_t n = lens[j / group];
        if (n <= 0) continue;
        float *s = scores + j * stride;
        for (int64_t p = n; p % W; p++) s[p] = -INFINITY;
        vf top = vset1(-INFINITY), total = vzero();
        for (int64_t p = 0; p < n; p += W) top = vmax(top, vload(s + p));
        float m = -INFINITY, lanes[W];
        vstore(lanes, top);
        for (int i = 0; i < W; i++) m = lanes[i] > m ? lanes[i] : m;
        for (int64_t p = 0; p < n; p += W) {
            const vf e = vexp(vadd(vload(s + p), vset1(-m)));
            vstore(s + p, e);
            total = vadd(total, e);
        }
        inv_total[j] = 1.0f / vsum(total); /* the tail's exp(-inf - m) clamps to ~1e-38: unseen */
    }
    for (int64_t j0 = 0; j0 < nq; j0 += hp) {
        const int64_t heads = nq - j0 < hp ? nq - j0 : hp;
        int64_t n[HEADS_PER_PASS], pass_len = 0;
        for (int64_t g = 0; g < heads; g++) {
            n[g] = lens[(j0 + g) / group];
            pass_len = n[g] > pass_len ? n[g] : pass_len;
        }
        vf acc[HEADS_PER_PASS][256 / W];
        for (int64_t g = 0; g < heads; g++)
            for (int64_t i = 0; i < nv; i++) acc[g][i] = vzero();
        for (int64_t p = 0; p < pass_len; p++) {
            const int64_t slot = (int64_t)blocks[p / block_size] * block_size + p % block_size;
            const int64_t off = half + (slot * Hkv + h) * D;
            vf v[256 / W];
            for (int64_t i = 0; i < nv; i++) v[i] = load_row(cache, is_f16, off, W * i);
            for (int64_t g = 0; g < heads; g++) {
                if (p >= n[g]) continue;
                const vf weight = vset1(scores[(j0 + g) * stride + p]);
                for (int64_t i = 0; i < nv; i++) acc[g][i] = vfma(weight, v[i], acc[g][i]);
            }
        }
        for (int64_t g = 0; g < heads; g++) {
            if (n[g] <= 0) continue;
            const int64_t j = j0 + g, token = t0 + j / group;
            const vf inv = vset1(inv_total[j]);
            float *o = out + (token * Hq + h * group + j % group) * D;
            for (int64_t i = 0; i < nv; i++) vstore(o + W * i, vmul(acc[g][i], inv));
        }
    }
}

static void attend(const float *q, int64_t t0, int64_t nt, const int32_t *lens, int64_t Hq, int64_t group,
                   int64_t D, int64_t Hkv, int64_t h, const void *cache, int is_f16, int64_t half,
                   int64_t block_size, const int32_t *blocks, float scale, float *scores, float *inv_total,
                   int64_t stride, float *out) {
#define ATTEND_ROWS(nv, hp)                                                                                 \
    attend_rows(q, t0, nt, lens, Hq, group, nv, hp, Hkv, h, cache, is_f16, half, block_size, blocks, scale, \
                scores, inv_total, stride, out)
    if (D == 4 * W)
        ATTEND_ROWS(4, HEADS_PER_PASS); /* 64 (AVX-512) or 32 dims */
    else if (D == 8 * W)
        ATTEND_ROWS(8, HEADS_PER_PASS / 2); /* 128 or 64: 16 V sums */
    else
        ATTEND_ROWS(D / W, HEADS_PER_PASS);
#undef ATTEND_ROWS
}

int tandem_paged_attention(const float *q, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, const void *cache,
                           int is_f16, int64_t half, int64_t block_size, const int32_t *block_table,
                           int64_t bt_stride, const int32_t *token_seq, const int32_t *token_len, float scale,
                           float *out) {
    const int64_t group = Hq / Hkv;
    int64_t max_len = 0;
    for (int64_t t = 0; t < T; t++) max_len = token_len[t] > max_len ? token_len[t] : max_len;
    /* Score rows padded to whole vectors, plus one: a run writes its 48 (say) rows' scores of a position
       together, and rows a power of two apart would all fall in the same L1 sets. */
    const int64_t stride = (max_len + W - 1) / W * W + W;
    /* Runs: consecutive tokens of one sequence, each seeing one more position than the one before. */
    int64_t *run_start = malloc((size_t)(T > 0 ? T : 1) * sizeof(int64_t)), num_runs = 0;
    if (run_start == NULL) return -1;
    for (int64_t t = 0; t < T; t++) {
        const int64_t r = num_runs - 1;
        const int joins = num_runs > 0 && token_seq != NULL && t - run_start[r] < RUN &&
                          token_seq[t] == token_seq[t - 1] && token_len[t - 1] > 0 &&
                          token_len[t] == token_len[t - 1] + 1;
        if (!joins) run_start[num_runs++] = t;
    }
    int failed = 0;
#pragma omp parallel if (T > 1)
    {
        float *scores = malloc((size_t)(RUN * group * (stride + 1) + W) * sizeof(float));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < num_runs * Hkv; item++) {
            if (scores == NULL) continue;
            const int64_t r = item / Hkv, h = item % Hkv, t0 = run_start[r];
            const int64_t nt = (r + 1 < num_runs ? run_start[r + 1] : T) - t0;
            const int32_t *blocks = block_table + (token_seq ? token_seq[t0] : t0) * bt_stride;
            attend(q, t0, nt, token_len + t0, Hq, group, D, Hkv, h, cache, is_f16, half, block_size, blocks,
                   scale, scores, scores + RUN * group * stride, stride, out);
        }
        free(scores);
    }
    free(run_start);
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
