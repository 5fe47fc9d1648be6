/*
 * int4_q8.c: x · Wᵀ over group-wise int4 weights with int8 activations, on AVX2 integer dot products.
 *
 *     y[m, n] = Σ_g  scale[n, g] · dx[m, g] · Σ_{k in g} q[n, k] · xq[m, k]   +   minimum[n, g] · sx[m, g]
 *
 * where the weight is W[n, k] = scale[n, g] · q[n, k] + minimum[n, g] (q ∈ [0, 15], groups g of 32
 * inputs: GGUF's Q4_1 blocks exactly) and each group of 32 activations of a row is quantized to
 * int8 with its own scale, x[m, k] ≈ dx[m, g] · xq[m, k], dx = max|x| / 127 (llama.cpp's Q4_1 x Q8_1
 * scheme); sx[m, g] = dx[m, g] · Σ_{k in g} xq[m, k], the quantized activations' sum, so that
 * y is exactly W times the quantized activations: each output is off by Σ_k W[n, k] · (x - dx · xq)
 * (with the activations' exact sum instead, the error would follow scale · q, twice as large).
 *
 *     x  [M, K]  fp32 or bf16, row stride x_rs (elements), unit column stride
 *     y  [M, N]  fp32 or bf16, row stride y_rs, overwritten
 *     w  int4: [ceil(N / 8), K / 32, 192] bytes, outputs in blocks of 8 (the last one padded with
 *          zeros), per block and group: 128 bytes of codes, then the 8 outputs' fp32 scales, then
 *          their 8 fp32 minimums. Byte 32·j + 4·o + i of the codes holds input 4·j + i of the
 *          group for output o in its low nibble and input 16 + 4·j + i in its high one (j < 4).
 *        int8 (GGUF's Q8_0, W[n, k] = scale[n, g] · q[n, k], no minimum): [N / 8, K / 32, 288]
 *          bytes, per block and group 256 bytes of codes, then the 8 outputs' fp32 scales; byte
 *          32·j + 4·o + i of the codes is input 4·j + i of the group for output o (j < 8).
 *
 * int4: one vpmaddubsw multiplies 4 inputs of 8 outputs (unsigned codes times one row's 4 int8
 * activations, broadcast) into int16 pair sums; the 8 of a group add up in int16 (at most
 * 8 · 2 · 15 · 127 = 30480: no overflow) before one vpmaddwd widens them, so the int32 lanes ARE
 * the 8 outputs: the group's scales and minimums apply as vectors, with no horizontal sums
 * (the layout of llama.cpp's repacked Q4_0 8x8 kernels). A block's 8 outputs and their weights
 * stay in L1 while every row of x passes over them, INT4_ROWS rows at a time. With AVX-VNNI, vpdpbusd
 * accumulates in int32 instead.
 * int8: the same blocks, |code| times the activations given the code's sign (vpsignb: vpmaddubsw
 * takes one unsigned operand); pair sums reach 2 · 127 · 127, so each vpmaddubsw is widened by its
 * own vpmaddwd.
 * Decode is a few rows, so the kernel reads 0.75 (int4) or 1.125 (int8) bytes per weight where a
 * dense fp32 GEMM reads 4.
 *
 * Built where the compiler targets AVX2 and FMA (-march=native); elsewhere int4_q8_available()
 * says 0. The caller (int4_q8.py) checks shapes: this file trusts them (N >= 1, K % 32 == 0).
 * Blocks of outputs are shared by up to `threads` threads (OpenMP, torch's own runtime in the
 * process), in chunks taken as each thread comes free.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_common.h"

#define GROUP 32
#define TILE 8 /* rows of x side by side per group in the quantized activations */
#ifndef INT4_ROWS
#define INT4_ROWS 4 /* rows of x per pass over a block of int4 outputs (1 to TILE) */
#endif
#ifndef INT8_ROWS
#define INT8_ROWS 8 /* the same over int8 outputs (8: the LM head 14 % faster at 8 tokens on a Zen 3;
                       for int4, 4, 6 and 8 measured the same) */
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <omp.h>

int int4_q8_available(void) { return 1; }

typedef struct {
    const int8_t *xq; /* [ceil(M / TILE), G, TILE, 32]: each tile's rows side by side per group */
    const float *dx;  /* [M, G] */
    const float *sx;  /* [M, G] */
    const uint8_t *w;
    void *y;
    int64_t y_rs, M, N, K;
    int y_bf16;
    int w_int8; /* the weights are int8 codes (GGUF's Q8_0) rather than int4 */
} Job;

#define BLOCK_OUTS 8                     /* outputs per block, one per int32 lane */
#define INT4_GROUP_BYTES (128 + 32 + 32) /* a block's int4 codes, scales and minimums per group */
#define INT8_GROUP_BYTES (256 + 32)      /* a block's int8 codes and scales per group */

/* The 32 int8 activations of row m, group g. */
static inline const int8_t *xq_at(const Job *j, int64_t m, int64_t g) {
    return j->xq + ((m / TILE * (j->K / GROUP) + g) * TILE + m % TILE) * GROUP;
}

static inline __m256 load8(const void *src, int is_bf16) {
    if (is_bf16) {
        const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)src));
        return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
    }
    return _mm256_loadu_ps((const float *)src);
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One row of x: per group its int8 codes, scale dx and the sum of its quantized values sx = dx · Σ xq. */
static void quantize_row(const void *x, int is_bf16, int64_t K, int8_t *xq, int64_t xq_group_stride, float *dx,
                         float *sx) {
    const size_t esize = elem_size(is_bf16);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t g = 0; g < K / GROUP; g++) {
        const char *src = (const char *)x + (size_t)(g * GROUP) * esize;
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = load8(src + (size_t)(8 * i) * esize, is_bf16);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        const float max_abs = _mm_cvtss_f32(m);
        const float d = max_abs / 127.0f;
        const __m256 inv = _mm256_set1_ps(max_abs > 0.0f ? 127.0f / max_abs : 0.0f);
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)); /* nearest even */
        const __m256i qsum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        const __m256i q01 = _mm256_packs_epi32(q[0], q[1]), q23 = _mm256_packs_epi32(q[2], q[3]);
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q01, q23), order);
        _mm256_storeu_si256((__m256i *)(xq + g * xq_group_stride), bytes);
        dx[g] = d;
        sx[g] = d * hsum8(_mm256_cvtepi32_ps(qsum));
    }
}

static inline void store(const Job *j, int64_t m, int64_t n, float v) {
    const int64_t at = m * j->y_rs + n;
    if (j->y_bf16)
        ((bf16_t *)j->y)[at] = f32_to_bf16(v);
    else
        ((float *)j->y)[at] = v;
}

/* Rows m0 .. m0 + rows of block b's outputs (the last block may hold fewer than 8). */
static inline void store_block(const Job *j, int64_t b, int64_t m0, int rows, const __m256 *acc) {
    const int64_t n0 = b * BLOCK_OUTS, outs = j->N - n0 < BLOCK_OUTS ? j->N - n0 : BLOCK_OUTS;
    for (int r = 0; r < rows; r++) {
        float out[BLOCK_OUTS];
        _mm256_storeu_ps(out, acc[r]);
        for (int64_t o = 0; o < outs; o++) store(j, m0 + r, n0 + o, out[o]);
    }
}

/* int4 block b (outputs 8b .. 8b + 7) for rows m0 .. m0 + rows (1 to TILE, a constant at every call
 * site): per group, 8 vpmaddubsw per row sum into int16 lanes of output pairs. */
static inline __attribute__((always_inline)) void int4_block_rows(const Job *j, int64_t b, int64_t m0, int rows) {
    const int64_t G = j->K / GROUP;
    const uint8_t *block = j->w + b * G * INT4_GROUP_BYTES;
    const __m256i nibble = _mm256_set1_epi8(15);
    __m256 acc[TILE];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *codes = block + g * INT4_GROUP_BYTES;
        const int8_t *xg[TILE];
        for (int r = 0; r < rows; r++) xg[r] = xq_at(j, m0 + r, g);
        __m256i sum[TILE];
        for (int r = 0; r < rows; r++) sum[r] = _mm256_setzero_si256();
        for (int q = 0; q < 4; q++) {
            const __m256i packed = _mm256_loadu_si256((const __m256i *)(codes + 32 * q));
            const __m256i low = _mm256_and_si256(packed, nibble);  /* inputs 4q .. 4q + 3 */
            const __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble); /* 16 + 4q .. */
            for (int r = 0; r < rows; r++) {
                int32_t lo4, hi4;
                memcpy(&lo4, xg[r] + 4 * q, 4), memcpy(&hi4, xg[r] + 16 + 4 * q, 4);
                const __m256i xl = _mm256_set1_epi32(lo4), xh = _mm256_set1_epi32(hi4);
#if defined(__AVXVNNI__)
                sum[r] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(sum[r], low, xl), high, xh);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
                sum[r] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(sum[r], low, xl), high, xh);
#else
                const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, xl), _mm256_maddubs_epi16(high, xh));
                sum[r] = _mm256_add_epi16(sum[r], pairs);
#endif
            }
        }
        const __m256 scale = _mm256_loadu_ps((const float *)(codes + 128));
        const __m256 minimum = _mm256_loadu_ps((const float *)(codes + 160));
        for (int r = 0; r < rows; r++) {
            const int64_t at = (m0 + r) * G + g;
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
            const __m256i dots = sum[r];
#else
            const __m256i dots = _mm256_madd_epi16(sum[r], _mm256_set1_epi16(1));
#endif
            const __m256 s = _mm256_mul_ps(scale, _mm256_set1_ps(j->dx[at]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), s, acc[r]);
            acc[r] = _mm256_fmadd_ps(minimum, _mm256_set1_ps(j->sx[at]), acc[r]);
        }
    }
    store_block(j, b, m0, rows, acc);
}

/* int8 block b for rows m0 .. m0 + rows (1 to TILE, a constant at every call site). */
static inline __attribute__((always_inline)) void int8_block_rows(const Job *j, int64_t b, int64_t m0, int rows) {
    const int64_t G = j->K / GROUP;
    const uint8_t *block = j->w + b * G * INT8_GROUP_BYTES;
    __m256 acc[TILE];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *codes = block + g * INT8_GROUP_BYTES;
        const int8_t *xg[TILE];
        for (int r = 0; r < rows; r++) xg[r] = xq_at(j, m0 + r, g);
        __m256i sum[TILE];
        for (int r = 0; r < rows; r++) sum[r] = _mm256_setzero_si256();
        for (int q = 0; q < 8; q++) {
            const __m256i signed_codes = _mm256_loadu_si256((const __m256i *)(codes + 32 * q));
            const __m256i magnitude = _mm256_sign_epi8(signed_codes, signed_codes); /* inputs 4q .. 4q + 3 */
            for (int r = 0; r < rows; r++) {
                int32_t x4;
                memcpy(&x4, xg[r] + 4 * q, 4);
                const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(x4), signed_codes);
#if defined(__AVXVNNI__)
                sum[r] = _mm256_dpbusd_avx_epi32(sum[r], magnitude, xs);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
                sum[r] = _mm256_dpbusd_epi32(sum[r], magnitude, xs);
#else
                const __m256i pairs = _mm256_maddubs_epi16(magnitude, xs);
                sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
            }
        }
        const __m256 scale = _mm256_loadu_ps((const float *)(codes + 256));
        for (int r = 0; r < rows; r++) {
            const __m256 s = _mm256_mul_ps(scale, _mm256_set1_ps(j->dx[(m0 + r) * G + g]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), s, acc[r]);
        }
    }
    store_block(j, b, m0, rows, acc);
}

/* FN over rows m0 .. m0 + min(M - m0, R) with the count a constant (R <= TILE). */
#define BLOCK_ROWS_CASES(FN, R)                          \
    switch (j->M - m0 < (R) ? j->M - m0 : (R)) {         \
        case 1: FN(j, b, m0, 1); break;                  \
        case 2: FN(j, b, m0, 2); break;                  \
        case 3: FN(j, b, m0, 3); break;                  \
        case 4: FN(j, b, m0, 4); break;                  \
        case 5: FN(j, b, m0, 5 <= (R) ? 5 : 1); break;   \
        case 6: FN(j, b, m0, 6 <= (R) ? 6 : 1); break;   \
        case 7: FN(j, b, m0, 7 <= (R) ? 7 : 1); break;   \
        default: FN(j, b, m0, 8 <= (R) ? 8 : 1); break;  \
    }

/* Blocks [first, end) of 8 outputs, all rows. */
static void run_outputs(const Job *j, int64_t first, int64_t end) {
    for (int64_t b = first; b < end; b++) {
        if (j->w_int8) {
            for (int64_t m0 = 0; m0 < j->M; m0 += INT8_ROWS) BLOCK_ROWS_CASES(int8_block_rows, INT8_ROWS)
        } else {
            for (int64_t m0 = 0; m0 < j->M; m0 += INT4_ROWS) BLOCK_ROWS_CASES(int4_block_rows, INT4_ROWS)
        }
    }
}

/*
 * args (int64): y, y row stride, x, x row stride, w, M, N, K, y is bf16 (0/1), x is bf16 (0/1), threads,
 * weights are int8 (0: int4 blocks, 1: int8 blocks, GGUF's Q8_0).
 * Returns 0, or -1 when the scratch buffers cannot be allocated (y is then not written).
 */
int int4_q8_matmul(const int64_t *args) {
    const int64_t M = args[5], N = args[6], K = args[7], G = K / GROUP, x_rs = args[3];
    const int x_bf16 = (int)args[9], threads = (int)args[10];
    const char *x = (const char *)(intptr_t)args[2];
    const int64_t tiles = (M + TILE - 1) / TILE;
    int8_t *xq = (int8_t *)malloc((size_t)(tiles * TILE * K));
    float *dx = (float *)malloc((size_t)(2 * M * G) * sizeof(float));
    if (xq == NULL || dx == NULL) {
        free(xq), free(dx);
        return -1;
    }
    float *sx = dx + M * G;
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + (size_t)(m * x_rs) * elem_size(x_bf16), x_bf16, K,
                     xq + ((m / TILE) * G * TILE + m % TILE) * GROUP, TILE * GROUP, dx + m * G, sx + m * G);
    const Job j = {xq, dx, sx, (const uint8_t *)(intptr_t)args[4], (void *)(intptr_t)args[0], args[1], M, N, K,
                   (int)args[8], (int)args[11]};
    const int64_t units = (N + BLOCK_OUTS - 1) / BLOCK_OUTS;
    if (threads <= 1) {
        run_outputs(&j, 0, units);
    } else {
        /* chunks of blocks handed out as threads come free: a thread the OS runs late (the
         * HTTP side shares the cores) takes fewer, instead of the whole call waiting on its share */
        const int64_t per = units / (8 * (int64_t)threads) > 0 ? units / (8 * (int64_t)threads) : 1;
        const int64_t chunks = (units + per - 1) / per;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
        for (int64_t c = 0; c < chunks; c++) run_outputs(&j, c * per, (c + 1) * per < units ? (c + 1) * per : units);
    }
    free(xq), free(dx);
    return 0;
}

#else

int int4_q8_available(void) { return 0; }
int int4_q8_matmul(const int64_t *args) {
    (void)args;
    return -1;
}

#endif
