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
 * between the caller and up to MAX_THREADS - 1 persistent pthread workers (no OpenMP: torch
 * ships its own runtime); see "persistent worker pool" below.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

/* dst[k] = fp32(src[k]): one activation row. */
static void load_row(float *restrict dst, const void *src, int64_t len, int is_bf16) {
    if (is_bf16) {
        const bf16_t *restrict s = (const bf16_t *)src;
        for (int64_t k = 0; k < len; k++) dst[k] = bf16_to_f32(s[k]);
    } else {
        memcpy(dst, src, (size_t)len * sizeof(float));
    }
}

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

static size_t elem_size(int is_bf16) { return is_bf16 ? sizeof(bf16_t) : sizeof(float); }

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

/* ---------------------------------------------------------------- persistent worker pool */

/*
 * Work sharing by claiming, so that a worker that wakes late costs nothing: the caller posts
 * the call as `work` = generation << 32 | next chunk << 16 | chunks and then claims chunks
 * itself, one at a time; woken workers claim what is left. A claim is a CAS on `work` that
 * checks the generation, so a worker still holding an old generation never touches a newer
 * call. A call ends when `done` == chunks; until then its Job (on the caller's stack) lives.
 * Waking a sleeping vCPU costs tens of µs in a VM: the caller never waits for the wake-up.
 */
#define GENERATION(w) ((uint32_t)((w) >> 32))
#define NEXT_CHUNK(w) ((int64_t)(((w) >> 16) & 0xFFFF))
#define NUM_CHUNKS(w) ((int64_t)((w) & 0xFFFF))
#define MAX_POOLED_CHUNKS 0xFFFF

static struct {
    pthread_mutex_t call_lock; /* held by the one call that uses the workers */
    pthread_mutex_t lock;      /* guards the condition variables */
    pthread_cond_t start_cv, done_cv;
    int num_workers;
    uint64_t work;      /* atomic: see above */
    const Job *job;     /* the current call; read only by a thread that holds one of its chunks */
    int64_t done;       /* atomic: chunks of the current call finished */
    int rc;             /* atomic: OR of the chunks' return codes */
} pool = {.call_lock = PTHREAD_MUTEX_INITIALIZER,
          .lock = PTHREAD_MUTEX_INITIALIZER,
          .start_cv = PTHREAD_COND_INITIALIZER,
          .done_cv = PTHREAD_COND_INITIALIZER};

/* How long an idle worker spins for the next call before sleeping; spinning takes the core from torch. */
static int64_t spin_ns = 0;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Claim the next chunk of generation `gen`; -1 when that call has none left (or is over). */
static int64_t claim_chunk(uint32_t gen) {
    uint64_t w = __atomic_load_n(&pool.work, __ATOMIC_ACQUIRE);
    for (;;) {
        if (GENERATION(w) != gen || NEXT_CHUNK(w) >= NUM_CHUNKS(w)) return -1;
        if (__atomic_compare_exchange_n(&pool.work, &w, w + (1u << 16), 1, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return NEXT_CHUNK(w);
    }
}

/* Run chunks of generation `gen` until none is left; the last one done wakes the caller. */
static void help(uint32_t gen, int64_t chunks) {
    for (int64_t c; (c = claim_chunk(gen)) >= 0;) {
        const int rc = run_chunk(pool.job, c); /* pool.job is this call's: our chunk keeps it alive */
        if (rc) __atomic_or_fetch(&pool.rc, rc, __ATOMIC_RELAXED);
        if (__atomic_add_fetch(&pool.done, 1, __ATOMIC_ACQ_REL) == chunks) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_broadcast(&pool.done_cv);
            pthread_mutex_unlock(&pool.lock);
        }
    }
}

/* Block until `work` carries a generation other than `seen` (spinning spin_ns first). */
static uint64_t wait_for_work(uint32_t seen) {
    const int64_t deadline = spin_ns > 0 ? now_ns() + spin_ns : 0;
    for (int i = 1; deadline; i++) {
        uint64_t w = __atomic_load_n(&pool.work, __ATOMIC_ACQUIRE);
        if (GENERATION(w) != seen) return w;
        if ((i & 63) == 0 && now_ns() >= deadline) break;
        cpu_relax();
    }
    uint64_t w;
    pthread_mutex_lock(&pool.lock);
    while (GENERATION(w = __atomic_load_n(&pool.work, __ATOMIC_ACQUIRE)) == seen)
        pthread_cond_wait(&pool.start_cv, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    return w;
}

static void *worker_main(void *arg) {
    uint32_t seen = (uint32_t)(uintptr_t)arg; /* the generation when this worker was created */
    for (;;) {
        const uint64_t w = wait_for_work(seen);
        seen = GENERATION(w);
        help(seen, NUM_CHUNKS(w));
    }
    return NULL;
}

/* A forked child has none of the parent's threads: start over. */
static void pool_after_fork_child(void) {
    pthread_mutex_init(&pool.call_lock, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.start_cv, NULL);
    pthread_cond_init(&pool.done_cv, NULL);
    pool.num_workers = 0;
}

/* Grow the pool to `wanted` threads in all (caller included); returns how many there are. */
static int pool_reserve(int wanted) {
    static int atfork_done = 0;
    if (!atfork_done) atfork_done = pthread_atfork(NULL, NULL, pool_after_fork_child) == 0;
    while (pool.num_workers + 1 < wanted) {
        pthread_t tid;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        /* Stable while we hold call_lock: only a call that holds it posts a new generation. */
        void *gen = (void *)(uintptr_t)GENERATION(__atomic_load_n(&pool.work, __ATOMIC_ACQUIRE));
        int failed = pthread_create(&tid, &attr, worker_main, gen);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.num_workers++;
    }
    return pool.num_workers + 1;
}

/* Post the call to the workers, claim chunks alongside them, and wait until all are done. */
static int run_pooled(const Job *j, int64_t chunks) {
    const uint32_t gen = GENERATION(__atomic_load_n(&pool.work, __ATOMIC_ACQUIRE)) + 1;
    pool.job = j;
    __atomic_store_n(&pool.done, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.rc, 0, __ATOMIC_RELAXED);
    pthread_mutex_lock(&pool.lock);
    __atomic_store_n(&pool.work, (uint64_t)gen << 32 | (uint64_t)chunks, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&pool.start_cv);
    pthread_mutex_unlock(&pool.lock);
    help(gen, chunks);
    /* Only chunks a worker has claimed and is running are left: wait for them. */
    for (int i = 0; i < 4096 && __atomic_load_n(&pool.done, __ATOMIC_ACQUIRE) != chunks; i++) cpu_relax();
    pthread_mutex_lock(&pool.lock);
    while (__atomic_load_n(&pool.done, __ATOMIC_ACQUIRE) != chunks) pthread_cond_wait(&pool.done_cv, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    return __atomic_load_n(&pool.rc, __ATOMIC_RELAXED);
}

/* ---------------------------------------------------------------- exported entry points */

/* Set how long idle workers spin before sleeping (ns, >= 0; default 0). */
void lora_native_set_spin_ns(int64_t ns) { spin_ns = ns < 0 ? 0 : ns; }

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
 * alignment). Returns 0, or 1 when out of memory for the scratch buffers. When another call
 * holds the worker threads, this one runs on the calling thread alone.
 */
int lora_native_add(const void *packed) {
    CallArgs c;
    memcpy(&c, packed, sizeof c);
    if (c.rank <= 0 || c.num_slices <= 0 || c.in_features <= 0) return 0;
    const Job j = job_of(&c);
    const int64_t chunks = count_chunks(&j);
    if (c.num_threads <= 1 || chunks <= 1 || chunks > MAX_POOLED_CHUNKS) return run_all(&j, chunks);
    if (pthread_mutex_trylock(&pool.call_lock) != 0) return run_all(&j, chunks); /* workers busy */
    int threads = pool_reserve((int)(c.num_threads < MAX_THREADS ? c.num_threads : MAX_THREADS));
    int rc = threads > 1 ? run_pooled(&j, chunks) : run_all(&j, chunks);
    pthread_mutex_unlock(&pool.call_lock);
    return rc;
}
