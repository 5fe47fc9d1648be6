/*
 * lora_native.c: the fused CPU LoRA side path, one call per projection module.
 *
 * Same meaning as server/ops/lora_torch.py::add_lora (the layouts are documented there):
 *
 *     for every token t of a segment (start, end, slot), for every output slice n = (lo, hi):
 *         y[t, lo:hi] += (A[slot, :, n] @ x[t]) @ B[slot, :, lo:hi]
 *
 *     x  [T, in]            fp32 or bf16, row stride x_rs, unit column stride
 *     y  [T, out]           fp32 or bf16, row stride y_rs, unit column stride, updated in place
 *     A  [S, R, N, in]      fp32 or bf16, strides (a_ss, a_rs, a_ns, 1)
 *     B  [S, R, out_total]  same dtype as A, strides (b_ss, b_rs, 1)
 *
 * All strides are in elements. Products accumulate in fp32; each y element is rounded once
 * (bf16: round to nearest even). Tokens outside the segments are never read or written.
 * The caller (lora_native.py) validates shapes, strides and bounds: this file trusts them.
 *
 * Compiled on the machine that runs it with -O3 -march=native: the inner loops below run over
 * contiguous memory with fixed-width lane arrays so that gcc vectorizes them for whatever ISA
 * the CPU has (AVX2, AVX-512, NEON) without intrinsics or -ffast-math.
 *
 * Threads: the chunks of a call (one segment's tokens, up to token_block at a time) may be shared
 * by up to MAX_THREADS OpenMP threads of torch's own runtime; see run_parallel below.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_common.h"

#define ROWS 4          /* rows of A (shrink) or of B (expand) per pass over x or the accumulators */
#define TOKEN_BLOCK 8   /* at most this many tokens of one segment share each weight row in L1 */
#define ACC_FLOATS 8192 /* fp32 accumulators of a token block (32 KiB): tokens x output columns */
#define MAX_THREADS 8

/*
 * Software prefetch PREFETCH_AHEAD bytes ahead into L2 while reading A's rows. Measured on a
 * 2-core Zen 5 VM (SmolLM2-135M decode pass, bf16 slots): 0 to 10% faster than the hardware
 * prefetchers alone, within the noise at 512-4096 B; it costs nothing where it does not help.
 * A step's reads are short runs (one slot's rank rows, 20-100 KB, then a jump to the next slot),
 * which a single core streams at ~15 GB/s there versus ~35 GB/s for one long run.
 * -DPREFETCH_AHEAD=0 switches it off.
 */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 1024
#endif
#if PREFETCH_AHEAD > 0
#define PREFETCH(p) __builtin_prefetch((const char *)(p) + PREFETCH_AHEAD, 0, 1)
#else
#define PREFETCH(p) ((void)0)
#endif

/*
 * out[i] = rows[i] . x for ROWS rows of A at once (each row contiguous, `len` long): x is loaded
 * once per ROWS rows, and each row has LANES independent fp32 partial sums.
 */
#define DEFINE_DOTS(name, wtype, load)                                                         \
    static void name(const void *const rows[ROWS], const float *restrict x, int64_t len,        \
                     float out[ROWS]) {                                                         \
        const wtype *restrict w0 = rows[0], *restrict w1 = rows[1];                             \
        const wtype *restrict w2 = rows[2], *restrict w3 = rows[3];                             \
        float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};               \
        int64_t k = 0;                                                                          \
        for (; k + LANES <= len; k += LANES) {                                                  \
            PREFETCH(w0 + k), PREFETCH(w1 + k), PREFETCH(w2 + k), PREFETCH(w3 + k);              \
            for (int j = 0; j < LANES; j++) {                                                   \
                const float xv = x[k + j];                                                      \
                a0[j] += load(w0[k + j]) * xv;                                                  \
                a1[j] += load(w1[k + j]) * xv;                                                  \
                a2[j] += load(w2[k + j]) * xv;                                                  \
                a3[j] += load(w3[k + j]) * xv;                                                  \
            }                                                                                   \
        }                                                                                       \
        for (int j = 0; k < len; k++, j++) { /* tail: fewer than LANES left */                  \
            a0[j] += load(w0[k]) * x[k];                                                        \
            a1[j] += load(w1[k]) * x[k];                                                        \
            a2[j] += load(w2[k]) * x[k];                                                        \
            a3[j] += load(w3[k]) * x[k];                                                        \
        }                                                                                       \
        out[0] = hsum(a0), out[1] = hsum(a1), out[2] = hsum(a2), out[3] = hsum(a3);             \
    }

/* acc[c] += sum_i h[i] * rows[i][c] for ROWS rank rows of B (contiguous, `len` long). */
#define DEFINE_AXPYS(name, wtype, load)                                                        \
    static void name(float *restrict acc, const float h[ROWS], const void *const rows[ROWS],    \
                     int64_t len) {                                                             \
        const wtype *restrict w0 = rows[0], *restrict w1 = rows[1];                             \
        const wtype *restrict w2 = rows[2], *restrict w3 = rows[3];                             \
        const float h0 = h[0], h1 = h[1], h2 = h[2], h3 = h[3];                                 \
        for (int64_t c = 0; c < len; c++)                                                       \
            acc[c] += h0 * load(w0[c]) + h1 * load(w1[c]) + h2 * load(w2[c]) + h3 * load(w3[c]); \
    }

/* acc[c] += h * row[c]: one rank row of B (the rows past the last full group of ROWS). */
#define DEFINE_AXPY(name, wtype, load)                                                         \
    static void name(float *restrict acc, float h, const void *row, int64_t len) {              \
        const wtype *restrict w = row;                                                          \
        for (int64_t c = 0; c < len; c++) acc[c] += h * load(w[c]);                             \
    }

#define LOAD_F32(v) (v)
DEFINE_DOTS(dots_f32, float, LOAD_F32)
DEFINE_DOTS(dots_bf16, bf16_t, bf16_to_f32)
DEFINE_AXPYS(axpys_f32, float, LOAD_F32)
DEFINE_AXPYS(axpys_bf16, bf16_t, bf16_to_f32)
DEFINE_AXPY(axpy_f32, float, LOAD_F32)
DEFINE_AXPY(axpy_bf16, bf16_t, bf16_to_f32)

typedef void (*dots_fn)(const void *const[ROWS], const float *restrict, int64_t, float[ROWS]);
typedef void (*axpys_fn)(float *restrict, const float[ROWS], const void *const[ROWS], int64_t);
typedef void (*axpy_fn)(float *restrict, float, const void *, int64_t);

/* dst[c] += acc[c], rounded once into dst's dtype. */
static void add_into_row(void *dst, const float *restrict acc, int64_t len, int is_bf16) {
    if (is_bf16) {
        bf16_t *restrict d = (bf16_t *)dst;
        for (int64_t c = 0; c < len; c++) d[c] = f32_to_bf16(bf16_to_f32(d[c]) + acc[c]);
    } else {
        float *restrict d = (float *)dst;
        for (int64_t c = 0; c < len; c++) d[c] += acc[c];
    }
}

/* ---------------------------------------------------------------- one call's work */

typedef struct {
    char *y;
    int64_t y_rs;
    int y_bf16;
    const char *x;
    int64_t x_rs;
    int x_bf16;
    const char *a, *b;
    int64_t a_ss, a_rs, a_ns, b_ss, b_rs;
    int w_bf16;
    int64_t rank, num_slices, in_features;
    const int64_t *slices;     /* [N][2]: (lo, hi) output columns of each slice */
    const int64_t *segs;       /* [G][3]: (start, end, slot) of each LoRA segment */
    int64_t num_segs;
    int64_t col_lo, col_span;  /* the slices' columns lie in col_lo .. col_lo + col_span - 1 */
    int64_t token_block;       /* tokens per block: token_block * col_span <= ACC_FLOATS */
    dots_fn dots;
    axpys_fn axpys;
    axpy_fn axpy;
} Job;

/* Scratch of one thread: x rows [TB][in], shrunk h [TB][N][R], accumulators [TB][col_span]. */
typedef struct {
    float *x, *h, *acc;
} Scratch;


/*
 * h[tb][n][r] = A[slot, r, n] . x[t0 + tb] for the nt tokens of one block. The R*N rows (r, n)
 * go ROWS at a time; a short last group repeats its last row and drops the extra results.
 */
static void shrink_block(const Job *j, int64_t slot, int64_t nt, const Scratch *s) {
    const int64_t R = j->rank, N = j->num_slices, K = j->in_features, we = elem_size(j->w_bf16);
    const char *a_slot = j->a + slot * j->a_ss * we;
    for (int64_t i0 = 0; i0 < R * N; i0 += ROWS) {
        const void *rows[ROWS];
        for (int i = 0; i < ROWS; i++) {
            const int64_t row = i0 + i < R * N ? i0 + i : R * N - 1, r = row / N, n = row % N;
            rows[i] = a_slot + (r * j->a_rs + n * j->a_ns) * we; /* [in], contiguous */
        }
        for (int64_t tb = 0; tb < nt; tb++) {
            float out[ROWS];
            j->dots(rows, s->x + tb * K, K, out);
            for (int i = 0; i < ROWS && i0 + i < R * N; i++)
                s->h[(tb * N + (i0 + i) % N) * R + (i0 + i) / N] = out[i];
        }
    }
}

/*
 * True when every token of the block has h[n][r0 .. r0+m-1] == 0: B's rows there add nothing
 * (the rows above a lower-rank slot's own rank, in a step whose largest rank is higher).
 */
static int rank_rows_are_zero(const Job *j, const Scratch *s, int64_t nt, int64_t n, int64_t r0, int64_t m) {
    for (int64_t tb = 0; tb < nt; tb++)
        for (int64_t i = 0; i < m; i++)
            if (s->h[(tb * j->num_slices + n) * j->rank + r0 + i] != 0.0f) return 0;
    return 1;
}

/* acc[tb][lo:hi] += sum_{r in r0 .. r0+m-1} h[tb][n][r] * B[slot, r, lo:hi] for slice n = (lo, hi). */
static void expand_rows(const Job *j, int64_t slot, int64_t nt, int64_t n, int64_t r0, int64_t m,
                        const Scratch *s) {
    if (rank_rows_are_zero(j, s, nt, n, r0, m)) return;
    const int64_t lo = j->slices[2 * n], width = j->slices[2 * n + 1] - lo, we = elem_size(j->w_bf16);
    const char *b0 = j->b + (slot * j->b_ss + r0 * j->b_rs + lo) * we; /* row r0, column lo */
    float *acc = s->acc + lo - j->col_lo;
    const float *h = s->h + n * j->rank + r0;
    const int64_t acc_stride = j->col_span, h_stride = j->num_slices * j->rank; /* per token */
    if (m == ROWS) {
        const void *rows[ROWS] = {b0, b0 + j->b_rs * we, b0 + 2 * j->b_rs * we, b0 + 3 * j->b_rs * we};
        for (int64_t tb = 0; tb < nt; tb++) j->axpys(acc + tb * acc_stride, h + tb * h_stride, rows, width);
        return;
    }
    for (int64_t i = 0; i < m; i++)
        for (int64_t tb = 0; tb < nt; tb++)
            j->axpy(acc + tb * acc_stride, h[tb * h_stride + i], b0 + i * j->b_rs * we, width);
}

/*
 * y[t0 + tb, lo:hi] += h[tb][n] @ B[slot, :, lo:hi] for every slice. ROWS rank rows at a time
 * sweep all the slices' columns, so B's rows are read front to back, as few sequential streams.
 */
static void expand_block(const Job *j, int64_t slot, int64_t t0, int64_t nt, const Scratch *s) {
    const int64_t R = j->rank, N = j->num_slices, span = j->col_span, ye = elem_size(j->y_bf16);
    memset(s->acc, 0, (size_t)(nt * span) * sizeof(float));
    for (int64_t r0 = 0; r0 < R; r0 += ROWS)
        for (int64_t n = 0; n < N; n++) expand_rows(j, slot, nt, n, r0, R - r0 < ROWS ? R - r0 : ROWS, s);
    for (int64_t tb = 0; tb < nt; tb++)
        for (int64_t n = 0; n < N; n++) {
            const int64_t lo = j->slices[2 * n], hi = j->slices[2 * n + 1];
            void *dst = j->y + ((t0 + tb) * j->y_rs + lo) * ye;
            add_into_row(dst, s->acc + tb * span + lo - j->col_lo, hi - lo, j->y_bf16);
        }
}

/* The nt (<= token_block) consecutive tokens t0.. of one segment on adapter slot `slot`. */
static void run_block(const Job *j, int64_t slot, int64_t t0, int64_t nt, const Scratch *s) {
    const int64_t K = j->in_features, xe = elem_size(j->x_bf16);
    for (int64_t tb = 0; tb < nt; tb++) load_row(s->x + tb * K, j->x + (t0 + tb) * j->x_rs * xe, K, j->x_bf16);
    shrink_block(j, slot, nt, s);
    expand_block(j, slot, t0, nt, s);
}

/* ---------------------------------------------------------------- per-thread scratch */

typedef struct {
    size_t capacity; /* floats */
    float data[];
} ScratchBuffer;

static pthread_key_t scratch_key;
static int scratch_key_ok;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_key_init(void) { scratch_key_ok = pthread_key_create(&scratch_key, free) == 0; }

/* A buffer of at least `floats` floats owned by the calling thread (freed when it exits); NULL if OOM. */
static float *thread_scratch(size_t floats) {
    pthread_once(&scratch_once, scratch_key_init);
    if (!scratch_key_ok) return NULL;
    ScratchBuffer *buf = pthread_getspecific(scratch_key);
    if (buf && buf->capacity >= floats) return buf->data;
    free(buf);
    buf = malloc(sizeof(ScratchBuffer) + floats * sizeof(float));
    if (buf) buf->capacity = floats;
    pthread_setspecific(scratch_key, buf);
    return buf ? buf->data : NULL;
}

/* ---------------------------------------------------------------- chunks: (segment, token block) */

/* Number of chunks of a call: each segment's tokens in blocks of token_block. */
static int64_t count_chunks(const Job *j) {
    int64_t chunks = 0;
    for (int64_t g = 0; g < j->num_segs; g++)
        chunks += (j->segs[3 * g + 1] - j->segs[3 * g] + j->token_block - 1) / j->token_block;
    return chunks;
}

/* Run chunk c (counted over the segments in order). Returns 0, or 1 when out of memory. */
static int run_chunk(const Job *j, int64_t c) {
    const int64_t TB = j->token_block, K = j->in_features, RN = j->rank * j->num_slices;
    float *mem = thread_scratch((size_t)(TB * (K + RN + j->col_span)));
    if (!mem) return 1;
    const Scratch s = {mem, mem + TB * K, mem + TB * (K + RN)};
    for (int64_t g = 0; g < j->num_segs; g++) {
        const int64_t start = j->segs[3 * g], end = j->segs[3 * g + 1], blocks = (end - start + TB - 1) / TB;
        if (c >= blocks) {
            c -= blocks;
            continue;
        }
        const int64_t t0 = start + c * TB;
        run_block(j, j->segs[3 * g + 2], t0, end - t0 < TB ? end - t0 : TB, &s);
        return 0;
    }
    return 0;
}

/* Every chunk of the call on the calling thread. */
static int run_all(const Job *j, int64_t chunks) {
    int rc = 0;
    for (int64_t c = 0; c < chunks; c++) rc |= run_chunk(j, c);
    return rc;
}

/*
 * The chunks shared by `threads` OpenMP threads. Built with -fopenmp, this library needs
 * libgomp.so.1, and the loader resolves that to the libgomp torch has already loaded: the same
 * thread team as torch's GEMMs, whose workers are still spinning from the last one when a call
 * starts (a pool of our own had to wait for that spin to end before its workers got the core).
 */
static int run_parallel(const Job *j, int64_t chunks, int threads) {
    int rc = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(| : rc)
    for (int64_t c = 0; c < chunks; c++) rc |= run_chunk(j, c);
    return rc;
}

/* ---------------------------------------------------------------- exported entry points */

/*
 * The arguments of one call as the Python side packs them: 19 int64, pointers as integers
 * (one packed buffer costs far less to pass through ctypes than 19 converted arguments).
 */
typedef struct {
    int64_t y, y_rs, x, x_rs;         /* y [T, out] and x [T, in]: pointers and row strides */
    int64_t a, a_ss, a_rs, a_ns;      /* A [S, R, N, in]: pointer, slot / rank / slice strides */
    int64_t b, b_ss, b_rs;            /* B [S, R, out_total]: pointer, slot / rank strides */
    int64_t dtypes;                   /* bit 0: y is bf16, bit 1: x is bf16, bit 2: A and B are bf16 */
    int64_t rank, num_slices, in_features;
    int64_t slices, segs, num_segs;   /* int64 [N][2] (lo, hi) and [G][3] (start, end, slot) */
    int64_t num_threads;
} CallArgs;

/* The Job of a call: its arguments plus the slices' column range and the token block size. */
static Job job_of(const CallArgs *c) {
    const int64_t *slices = (const int64_t *)(intptr_t)c->slices;
    int64_t col_lo = INT64_MAX, col_hi = 0;
    for (int64_t n = 0; n < c->num_slices; n++) {
        col_lo = slices[2 * n] < col_lo ? slices[2 * n] : col_lo;
        col_hi = slices[2 * n + 1] > col_hi ? slices[2 * n + 1] : col_hi;
    }
    const int64_t span = col_hi > col_lo ? col_hi - col_lo : 1, fit = ACC_FLOATS / span;
    const int w_bf16 = (c->dtypes >> 2) & 1;
    return (Job){(char *)(intptr_t)c->y, c->y_rs, (int)(c->dtypes & 1), (const char *)(intptr_t)c->x,
                 c->x_rs, (int)((c->dtypes >> 1) & 1), (const char *)(intptr_t)c->a,
                 (const char *)(intptr_t)c->b, c->a_ss, c->a_rs, c->a_ns, c->b_ss, c->b_rs, w_bf16,
                 c->rank, c->num_slices, c->in_features, slices, (const int64_t *)(intptr_t)c->segs,
                 c->num_segs, col_lo, span, fit < 1 ? 1 : fit > TOKEN_BLOCK ? TOKEN_BLOCK : fit,
                 w_bf16 ? dots_bf16 : dots_f32, w_bf16 ? axpys_bf16 : axpys_f32,
                 w_bf16 ? axpy_bf16 : axpy_f32};
}

/*
 * y += LoRA(x) for the segments; see the top of this file. `packed` holds a CallArgs (any
 * alignment). Returns 0, or 1 when out of memory for the scratch buffers. Safe to call from
 * several threads at once (OpenMP gives each calling thread its own team).
 */
int lora_native_add(const void *packed) {
    CallArgs c;
    memcpy(&c, packed, sizeof c);
    if (c.rank <= 0 || c.num_slices <= 0 || c.in_features <= 0) return 0;
    const Job j = job_of(&c);
    const int64_t chunks = count_chunks(&j);
    if (c.num_threads <= 1 || chunks <= 1) return run_all(&j, chunks);
    return run_parallel(&j, chunks, (int)(c.num_threads < MAX_THREADS ? c.num_threads : MAX_THREADS));
}
