/*
 * attention_native.c: the CPU decode step's attention around the paged KV cache, one call each.
 *
 * Same meaning as server/ops/attention_torch.py (the layouts are documented there):
 *
 * loraplex_rope_and_cache: for every token t of the step,
 *     q heads   qkv[t, h]        <- rope(qkv[t, h], cos[t], sin[t])        (in place, h < H)
 *     k heads   K[g, rows[t]]    <- rope(qkv[t, H + g], cos[t], sin[t])    (g < H_kv)
 *     v heads   V[g, rows[t]]    <- qkv[t, H + H_kv + g]
 *   rope(x)[i] = x[i]·cos[i] + rot(x)[i]·sin[i], rot(x) = (-x[D/2:], x[:D/2]) (rotate-half).
 *
 * loraplex_decode_attention: for every decode sequence b and query head h (kv head g = h / G),
 *     out[b, h] = softmax_l(scale · q[b, h] · K[g, idx[b, l]]) · V[g, idx[b, l]],  l < len[b]
 *   scores, softmax and the weighted sum in fp32; out rounded once.
 *
 *     qkv  [T, (H + 2·H_kv)·D]  row stride qkv_rs, heads contiguous
 *     cos, sin [T, D]           contiguous, the dtype of qkv
 *     K, V [H_kv, rows, D]      head stride kv_hs, row stride D
 *     q, out [Bd, H, D]         row strides q_rs, out_rs, heads contiguous
 *     idx  [Bd, Lmax] int64     row stride idx_rs; len [Bd] int64
 *
 * fp32 or bf16 (one flag for the activations, one for the cache). Compiled with
 * -ffp-contract=off, so that fp32 RoPE rounds exactly as torch's separate multiplies and add;
 * decode attention (7 % faster with FMAs on a Zen 3) turns contraction back on for itself.
 * The caller (attention_native.py) validates shapes, strides and index bounds: this file trusts
 * them. Decode attention splits its (sequence, kv head) pairs over up to `threads` threads
 * (OpenMP: torch's own runtime in the process); RoPE and the cache writes run on one.
 */
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_common.h"

#define MAX_HEAD_DIM 256
#define MAX_GROUP 32 /* query heads per kv head */

static inline void store_vec(void *dst, const float *restrict src, int64_t n, int is_bf16) {
    if (is_bf16) {
        bf16_t *restrict d = dst;
        for (int64_t i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

/* A cache row as fp32: converted into `scratch` (bf16), or the row itself (fp32: no copy). */
static inline const float *cache_row(float *restrict scratch, const void *src, int64_t n, int is_bf16) {
    if (!is_bf16) return (const float *)src;
    load_row(scratch, src, n, 1);
    return scratch;
}


/* ---------------------------------------------------------------- RoPE + KV write */

typedef struct {
    int64_t qkv, qkv_rs, num_tokens, num_heads, num_kv_heads, head_dim;
    int64_t cos, sin, k_cache, v_cache, kv_hs, rows, act_bf16, cache_bf16;
} RopeArgs;

/* out = x·cos + rot(x)·sin, each product and the sum rounded as torch does in fp32. */
static void rope_row(float *restrict out, const float *restrict x, const float *restrict c,
                     const float *restrict s, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) out[i] = x[i] * c[i] + (-x[i + half]) * s[i];
    for (int64_t i = half; i < d; i++) out[i] = x[i] * c[i] + x[i - half] * s[i];
}

int loraplex_rope_and_cache(const RopeArgs *a) {
    const int64_t D = a->head_dim, H = a->num_heads, HKV = a->num_kv_heads;
    const size_t ae = elem_size((int)a->act_bf16), ce = elem_size((int)a->cache_bf16);
    const int64_t *rows = (const int64_t *)a->rows;
    float c[MAX_HEAD_DIM], s[MAX_HEAD_DIM], x[MAX_HEAD_DIM], y[MAX_HEAD_DIM];
    for (int64_t t = 0; t < a->num_tokens; t++) {
        char *tok = (char *)a->qkv + (size_t)(t * a->qkv_rs) * ae;
        load_row(c, (const char *)a->cos + (size_t)(t * D) * ae, D, (int)a->act_bf16);
        load_row(s, (const char *)a->sin + (size_t)(t * D) * ae, D, (int)a->act_bf16);
        const int64_t row = rows[t];
        for (int64_t h = 0; h < H + HKV; h++) {
            load_row(x, tok + (size_t)(h * D) * ae, D, (int)a->act_bf16);
            rope_row(y, x, c, s, D);
            if (h < H) {
                store_vec(tok + (size_t)(h * D) * ae, y, D, (int)a->act_bf16);
            } else {
                char *k = (char *)a->k_cache + (size_t)((h - H) * a->kv_hs + row * D) * ce;
                store_vec(k, y, D, (int)a->cache_bf16);
            }
        }
        for (int64_t g = 0; g < HKV; g++) {
            load_row(x, tok + (size_t)((H + HKV + g) * D) * ae, D, (int)a->act_bf16);
            store_vec((char *)a->v_cache + (size_t)(g * a->kv_hs + row * D) * ce, x, D, (int)a->cache_bf16);
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- decode attention */

/* Attention need not round as torch does (its sums run in another order anyway): from here on,
 * products and sums may fuse into FMAs. */
#pragma GCC optimize("fp-contract=fast")

typedef struct {
    int64_t out, out_rs, q, q_rs, num_seqs, num_heads, num_kv_heads, head_dim;
    int64_t k_cache, v_cache, kv_hs, idx, idx_rs, lens, scale_bits, act_bf16, cache_bf16, threads;
} DecodeArgs;

/*
 * e^x for x <= 0 (scores minus their max), to ~1 ulp: x = n·ln2 + r, |r| <= ln2/2, e^r by its
 * degree-7 Taylor polynomial (error < 1e-8 relative), 2^n by building the exponent bits.
 * Branch-free, so the softmax loop vectorizes (glibc's expf does not without -ffast-math).
 */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* GCC/Clang vector types: one AVX-512 register, two AVX2 or four NEON ones, whatever -march says. */
typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

static inline v16f load16(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Sum of the 16 lanes by halves (8 + 8, 4 + 4, then pairs), in registers (GCC >= 12, Clang). */
static inline float hsum16(v16f v) {
    const v8f s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const v4f s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    v16f acc = {0};
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) acc += load16(a + k) * load16(b + k);
    float sum = hsum16(acc);
    for (; k < n; k++) sum += a[k] * b[k];
    return sum;
}

/* max and sum of n floats with 16 independent lanes (an in-order loop does not vectorize). */
static float max_of(const float *x, int64_t n) {
    float peak = x[0];
    int64_t l = 0;
    if (n >= 16) {
        float m[16];
        memcpy(m, x, sizeof m);
        for (l = 16; l + 16 <= n; l += 16)
            for (int j = 0; j < 16; j++) m[j] = x[l + j] > m[j] ? x[l + j] : m[j];
        for (int j = 0; j < 16; j++) peak = m[j] > peak ? m[j] : peak;
    }
    for (; l < n; l++) peak = x[l] > peak ? x[l] : peak;
    return peak;
}

static float sum_of(const float *x, int64_t n) {
    v16f acc = {0};
    int64_t l = 0;
    for (; l + 16 <= n; l += 16) acc += load16(x + l);
    float sum = hsum16(acc);
    for (; l < n; l++) sum += x[l];
    return sum;
}

/* Scratch for one call: scores [G][Lmax] (grown as needed, kept per thread). */
static _Thread_local float *scores_buf;
static _Thread_local int64_t scores_cap;

static float *scores_scratch(int64_t floats) {
    if (floats > scores_cap) {
        float *grown = realloc(scores_buf, (size_t)floats * sizeof(float));
        if (grown == NULL) return NULL;
        scores_buf = grown, scores_cap = floats;
    }
    return scores_buf;
}

/*
 * One (sequence, kv head): its G query heads against its len cached rows. Always inlined into
 * variants with the head size and the two dtype flags as constants (below), so the short loops
 * over D compile to straight vector code instead of runtime-length loops with their set-up.
 */
static inline __attribute__((always_inline)) void attend_group(const DecodeArgs *a, int64_t b, int64_t g,
                                                               float scale, float *scores, const int64_t D,
                                                               const int act_bf16, const int cache_bf16) {
    const int64_t G = a->num_heads / a->num_kv_heads, L = ((const int64_t *)a->lens)[b];
    const size_t ae = elem_size(act_bf16), ce = elem_size(cache_bf16);
    const int64_t *idx = (const int64_t *)a->idx + b * a->idx_rs;
    const char *kbase = (const char *)a->k_cache + (size_t)(g * a->kv_hs) * ce;
    const char *vbase = (const char *)a->v_cache + (size_t)(g * a->kv_hs) * ce;
    float q[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM], row[MAX_HEAD_DIM];
    float total[MAX_GROUP];
    for (int64_t i = 0; i < G; i++) {
        const char *qh = (const char *)a->q + (size_t)(b * a->q_rs + (g * G + i) * D) * ae;
        load_row(q[i], qh, D, act_bf16);
    }
    for (int64_t l = 0; l < L; l++) {
        const float *k = cache_row(row, kbase + (size_t)(idx[l] * D) * ce, D, cache_bf16);
        for (int64_t i = 0; i < G; i++) scores[i * L + l] = dot(q[i], k, D) * scale;
    }
    for (int64_t i = 0; i < G; i++) {
        float *si = scores + i * L;
        const float peak = max_of(si, L);
        for (int64_t l = 0; l < L; l++) si[l] = exp_nonpositive(si[l] - peak);
        total[i] = sum_of(si, L);
        memset(acc[i], 0, (size_t)D * sizeof(float));
    }
    for (int64_t l = 0; l < L; l++) {
        const float *v = cache_row(row, vbase + (size_t)(idx[l] * D) * ce, D, cache_bf16);
        for (int64_t i = 0; i < G; i++) {
            const float p = scores[i * L + l];
            for (int64_t d = 0; d < D; d++) acc[i][d] += p * v[d];
        }
    }
    for (int64_t i = 0; i < G; i++) {
        const float inv = 1.0f / total[i];
        for (int64_t d = 0; d < D; d++) acc[i][d] *= inv;
        char *oh = (char *)a->out + (size_t)(b * a->out_rs + (g * G + i) * D) * ae;
        store_vec(oh, acc[i], D, act_bf16);
    }
}

typedef void (*attend_fn)(const DecodeArgs *, int64_t, int64_t, float, float *);

/* attend_<D>_<act bf16><cache bf16>; D 0 = any head size (read from the arguments). */
#define ATTEND_VARIANT(DIM, AB, CB)                                                               \
    static void attend_##DIM##_##AB##CB(const DecodeArgs *a, int64_t b, int64_t g, float sc, float *s) { \
        attend_group(a, b, g, sc, s, (DIM) ? (DIM) : a->head_dim, AB, CB);                        \
    }
#define ATTEND_DTYPES(DIM) ATTEND_VARIANT(DIM, 0, 0) ATTEND_VARIANT(DIM, 0, 1) ATTEND_VARIANT(DIM, 1, 0) ATTEND_VARIANT(DIM, 1, 1)
ATTEND_DTYPES(0)
ATTEND_DTYPES(64)
ATTEND_DTYPES(128)

static attend_fn pick_attend(int64_t head_dim, int act_bf16, int cache_bf16) {
    static const attend_fn any[4] = {attend_0_00, attend_0_01, attend_0_10, attend_0_11};
    static const attend_fn d64[4] = {attend_64_00, attend_64_01, attend_64_10, attend_64_11};
    static const attend_fn d128[4] = {attend_128_00, attend_128_01, attend_128_10, attend_128_11};
    const int which = act_bf16 << 1 | cache_bf16;
    return head_dim == 64 ? d64[which] : head_dim == 128 ? d128[which] : any[which];
}

/* Pairs [first, end) of (sequence, kv head), on this thread's scores scratch; 0, or -1 without it. */
static int attend_pairs(const DecodeArgs *a, attend_fn attend, float scale, int64_t scores_floats, int64_t first,
                        int64_t end) {
    float *scores = scores_scratch(scores_floats);
    if (scores == NULL) return -1;
    for (int64_t p = first; p < end; p++) attend(a, p / a->num_kv_heads, p % a->num_kv_heads, scale, scores);
    return 0;
}

/* 0, or -1 when a scores scratch cannot be allocated. */
int loraplex_decode_attention(const DecodeArgs *a) {
    const int64_t G = a->num_heads / a->num_kv_heads, pairs = a->num_seqs * a->num_kv_heads;
    int64_t max_len = 0;
    for (int64_t b = 0; b < a->num_seqs; b++)
        max_len = ((const int64_t *)a->lens)[b] > max_len ? ((const int64_t *)a->lens)[b] : max_len;
    const int64_t scores_floats = G * (max_len > 0 ? max_len : 1);
    float scale;
    const uint32_t bits = (uint32_t)a->scale_bits;
    memcpy(&scale, &bits, sizeof scale);
    const attend_fn attend = pick_attend(a->head_dim, a->act_bf16 != 0, a->cache_bf16 != 0);
    const int threads = (int)(a->threads < pairs ? a->threads : pairs);
    if (threads <= 1) return attend_pairs(a, attend, scale, scores_floats, 0, pairs);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        const int64_t n = omp_get_num_threads(), me = omp_get_thread_num(), per = (pairs + n - 1) / n;
        const int64_t first = me * per, end = first + per < pairs ? first + per : pairs;
        if (first < end) failed |= attend_pairs(a, attend, scale, scores_floats, first, end) != 0;
    }
    return failed ? -1 : 0;
}
