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
 *     w  [N, 3K/4] bytes per output row: K/2 bytes of codes (for each group, byte j holds input j
 *          of the group in its low nibble and input 16 + j in its high one), then the row's K/32
 *          fp32 scales, then its K/32 fp32 minimums.
 *
 * The 32 codes of a group are unpacked once per pair of outputs and four rows; one vpmaddubsw
 * (unsigned codes times signed activations, pairs summed in int16: at most 2·15·127, no
 * saturation) and one vpmaddwd multiply 32 weights in, or one vpdpbusd where the CPU has AVX-VNNI.
 * Decode is a few rows, so the kernel reads 0.75 bytes per weight where a dense fp32 GEMM reads 4.
 *
 * Built where the compiler targets AVX2 and FMA (-march=native); elsewhere int4_q8_available()
 * says 0. The caller (int4_q8.py) checks shapes: this file trusts them (N >= 1, K % 32 == 0).
 * Outputs are shared by up to `threads` threads (OpenMP, as int4_amx.c).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_common.h"

#define GROUP 32
#define ROWS 4 /* rows of x per pass over a pair of outputs */

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <omp.h>

int int4_q8_available(void) { return 1; }

typedef struct {
    const int8_t *xq; /* [ceil(M / ROWS), G, ROWS, 32]: each tile's rows side by side per group */
    const float *dx;  /* [M, G] */
    const float *sx;  /* [M, G] */
    const uint8_t *w;
    void *y;
    int64_t y_rs, M, N, K;
    int y_bf16;
    int w_int8; /* the weights are int8 codes (GGUF's Q8_0) rather than int4 */
} Job;

/* Bytes of one output row of weights: codes, then fp32 scales (and fp32 minimums for int4). */
static inline int64_t row_bytes_of(int64_t K, int int8) { return int8 ? K + 4 * (K / GROUP) : K / 2 + 8 * (K / GROUP); }

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

/* The 32 codes of group g of an output row, in input order: bytes 0-15 the low nibbles. */
static inline __m256i unpack_group(const uint8_t *codes) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)codes);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    return _mm256_and_si256(both, _mm256_set1_epi8(15));
}

static inline __m256i dot_group(__m256i q, __m256i xq) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), q, xq);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, xq);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, xq), _mm256_set1_epi16(1));
#endif
}

/* Group g of an output row's codes: int4 unpacked (unsigned, `sign` unused), or int8 as their
 * magnitudes with the codes themselves in `sign` (vpmaddubsw takes one unsigned operand). */
static inline void load_group(const uint8_t *row, int64_t g, int int8, __m256i *q, __m256i *sign) {
    if (int8) {
        const __m256i codes = _mm256_loadu_si256((const __m256i *)(row + g * GROUP));
        *q = _mm256_sign_epi8(codes, codes), *sign = codes;
    } else {
        *q = unpack_group(row + g * (GROUP / 2)), *sign = *q;
    }
}

/* Σ over the group of code · xq, in 8 int32 partial sums: |code| · (xq with the code's sign) for
 * int8 codes (at most 2 · 127 · 127 per int16 pair: no saturation). */
static inline __m256i dot_codes(__m256i q, __m256i sign, __m256i xq, int int8) {
    return dot_group(q, int8 ? _mm256_sign_epi8(xq, sign) : xq);
}

/* Σ_g a[g] · b[g] over G values. */
static inline float dot_floats(const float *a, const float *b, int64_t G) {
    __m256 acc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + g), _mm256_loadu_ps(b + g), acc);
    float s = hsum8(acc);
    for (; g < G; g++) s += a[g] * b[g];
    return s;
}

static inline void store(const Job *j, int64_t m, int64_t n, float v) {
    const int64_t at = m * j->y_rs + n;
    if (j->y_bf16)
        ((bf16_t *)j->y)[at] = f32_to_bf16(v);
    else
        ((float *)j->y)[at] = v;
}

/* Outputs n0 .. n0 + outs (1 or 2) for rows m0 .. m0 + rows (1 to ROWS); `rows` and `outs` are
 * constants at every call site, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile(const Job *j, int64_t n0, int outs, int64_t m0,
                                                       int rows, float *scale_buf, int int8) {
    const int64_t K = j->K, G = K / GROUP, row_bytes = row_bytes_of(K, int8), code_bytes = int8 ? K : K / 2;
    const uint8_t *w[2];
    const float *ws[2], *wm[2];
    for (int o = 0; o < outs; o++) {
        w[o] = j->w + (n0 + o) * row_bytes;
        ws[o] = (const float *)(w[o] + code_bytes);
        wm[o] = ws[o] + G;
    }
    /* scale_buf[(o * ROWS + r) * G + g] = scale[n0 + o, g] · dx[m0 + r, g] */
    for (int o = 0; o < outs; o++)
        for (int r = 0; r < rows; r++) {
            const float *d = j->dx + (m0 + r) * G;
            float *s = scale_buf + (o * ROWS + r) * G;
            for (int64_t g = 0; g < G; g++) s[g] = ws[o][g] * d[g];
        }
    __m256 acc[2][ROWS];
    for (int o = 0; o < 2; o++)
        for (int r = 0; r < ROWS; r++) acc[o][r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m256i q[2], sign[2];
        for (int o = 0; o < outs; o++) load_group(w[o], g, int8, &q[o], &sign[o]);
        for (int r = 0; r < rows; r++) {
            const int8_t *xg = j->xq + ((m0 / ROWS * G + g) * ROWS + r) * GROUP;
            const __m256i xq = _mm256_loadu_si256((const __m256i *)xg);
            for (int o = 0; o < outs; o++) {
                const __m256 s = _mm256_broadcast_ss(scale_buf + (o * ROWS + r) * G + g);
                const __m256i dot = dot_codes(q[o], sign[o], xq, int8);
                acc[o][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[o][r]);
            }
        }
    }
    for (int o = 0; o < outs; o++)
        for (int r = 0; r < rows; r++) {
            const float minimums = int8 ? 0.0f : dot_floats(wm[o], j->sx + (m0 + r) * G, G);
            store(j, m0 + r, n0 + o, hsum8(acc[o][r]) + minimums);
        }
}

/* The common tile, two outputs by four rows, written out so its eight accumulators, two groups of
 * codes and the activations fit AVX2's sixteen registers (the generic `tile` spills them). */
static inline __attribute__((always_inline)) void tile_2x4(const Job *j, int64_t n0, int64_t m0, float *scale_buf,
                                                           int int8) {
    const int64_t K = j->K, G = K / GROUP, row_bytes = row_bytes_of(K, int8), code_bytes = int8 ? K : K / 2;
    const uint8_t *w0 = j->w + n0 * row_bytes, *w1 = w0 + row_bytes;
    const float *ws0 = (const float *)(w0 + code_bytes), *ws1 = (const float *)(w1 + code_bytes);
    /* scale_buf[g][o][r] = scale[n0 + o, g] · dx[m0 + r, g]: one pointer for the loop below */
    for (int r = 0; r < ROWS; r++) {
        const float *d = j->dx + (m0 + r) * G;
        for (int64_t g = 0; g < G; g++) {
            scale_buf[g * 2 * ROWS + r] = ws0[g] * d[g];
            scale_buf[g * 2 * ROWS + ROWS + r] = ws1[g] * d[g];
        }
    }
    const int8_t *xg = j->xq + m0 / ROWS * G * ROWS * GROUP; /* group 0 of this tile's rows */
    const float *sg = scale_buf;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00,
           a13 = a00;
#define STEP(R)                                                                                         \
    do {                                                                                                \
        const __m256i xq = _mm256_loadu_si256((const __m256i *)(xg + (R) * GROUP));                      \
        const __m256i d0 = dot_codes(q0, sign0, xq, int8), d1 = dot_codes(q1, sign1, xq, int8);            \
        a0##R = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_broadcast_ss(sg + (R)), a0##R);            \
        a1##R = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_broadcast_ss(sg + ROWS + (R)), a1##R);     \
    } while (0)
    for (int64_t g = 0; g < G; g++, xg += ROWS * GROUP, sg += 2 * ROWS) {
        __m256i q0, q1, sign0, sign1;
        load_group(w0, g, int8, &q0, &sign0);
        load_group(w1, g, int8, &q1, &sign1);
        STEP(0);
        STEP(1);
        STEP(2);
        STEP(3);
    }
#undef STEP
    const float *wm0 = ws0 + G, *wm1 = ws1 + G;
    const __m256 acc[2][ROWS] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}};
    for (int o = 0; o < 2; o++)
        for (int r = 0; r < ROWS; r++) {
            const float minimums = int8 ? 0.0f : dot_floats(o ? wm1 : wm0, j->sx + (m0 + r) * G, G);
            store(j, m0 + r, n0 + o, hsum8(acc[o][r]) + minimums);
        }
}

#define TILE_CASES(OUTS, INT8)                                                \
    switch (rows) {                                                           \
        case 1: tile(j, n0, OUTS, m0, 1, scale_buf, INT8); break;             \
        case 2: tile(j, n0, OUTS, m0, 2, scale_buf, INT8); break;             \
        case 3: tile(j, n0, OUTS, m0, 3, scale_buf, INT8); break;             \
        default: tile(j, n0, OUTS, m0, 4, scale_buf, INT8); break;            \
    }

/* Output pairs [first, end) (the last pair may be a single output when N is odd), all rows; `int8`
 * a constant, so each weight kind gets its own copy of the loops. */
static inline __attribute__((always_inline)) void run_outputs_of(const Job *j, int64_t first_pair, int64_t end_pair,
                                                                 int int8) {
    const int64_t G = j->K / GROUP;
    float scale_buf[2 * ROWS * G]; /* 32 bytes per input: 32 KiB at K = 1024 */
    for (int64_t p = first_pair; p < end_pair; p++) {
        const int64_t n0 = 2 * p;
        for (int64_t m0 = 0; m0 < j->M; m0 += ROWS) {
            const int rows = (int)(j->M - m0 < ROWS ? j->M - m0 : ROWS);
            if (n0 + 1 < j->N && rows == ROWS) {
                tile_2x4(j, n0, m0, scale_buf, int8);
            } else if (n0 + 1 < j->N) {
                TILE_CASES(2, int8)
            } else {
                TILE_CASES(1, int8)
            }
        }
    }
}

static void run_outputs(const Job *j, int64_t first_pair, int64_t end_pair) {
    if (j->w_int8)
        run_outputs_of(j, first_pair, end_pair, 1);
    else
        run_outputs_of(j, first_pair, end_pair, 0);
}

/*
 * args (int64): y, y row stride, x, x row stride, w, M, N, K, y is bf16 (0/1), x is bf16 (0/1), threads,
 * weights are int8 (0: int4 codes and minimums, 1: int8 codes, GGUF's Q8_0).
 * Returns 0, or -1 when the scratch buffers cannot be allocated (y is then not written).
 */
int int4_q8_matmul(const int64_t *args) {
    const int64_t M = args[5], N = args[6], K = args[7], G = K / GROUP, x_rs = args[3];
    const int x_bf16 = (int)args[9], threads = (int)args[10];
    const char *x = (const char *)(intptr_t)args[2];
    const int64_t tiles = (M + ROWS - 1) / ROWS;
    int8_t *xq = (int8_t *)malloc((size_t)(tiles * ROWS * K));
    float *dx = (float *)malloc((size_t)(2 * M * G) * sizeof(float));
    if (xq == NULL || dx == NULL) {
        free(xq), free(dx);
        return -1;
    }
    float *sx = dx + M * G;
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + (size_t)(m * x_rs) * elem_size(x_bf16), x_bf16, K,
                     xq + ((m / ROWS) * G * ROWS + m % ROWS) * GROUP, ROWS * GROUP, dx + m * G, sx + m * G);
    const Job j = {xq, dx, sx, (const uint8_t *)(intptr_t)args[4], (void *)(intptr_t)args[0], args[1], M, N, K,
                   (int)args[8], (int)args[11]};
    const int64_t pairs = (N + 1) / 2;
    if (threads <= 1) {
        run_outputs(&j, 0, pairs);
    } else {
#pragma omp parallel num_threads(threads)
        {
            const int64_t n_threads = omp_get_num_threads(), me = omp_get_thread_num();
            const int64_t per = (pairs + n_threads - 1) / n_threads;
            const int64_t first = me * per, end = first + per < pairs ? first + per : pairs;
            if (first < end) run_outputs(&j, first, end);
        }
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
