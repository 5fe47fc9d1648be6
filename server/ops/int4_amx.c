/*
 * int4_amx.c: x · Wᵀ over group-wise int4 weights on Intel AMX (bf16 tiles), for batches of rows.
 *
 *     y[m, n] = Σ_k x[m, k] · bf16(scale[n, g] · q[n, k] + minimum[n, g]),   g = k / 32,  q ∈ [0, 15]
 *
 *     x  [M, K]  bf16, row stride x_rs (elements), unit column stride
 *     y  [M, N]  fp32 or bf16, row stride y_rs, overwritten
 *     w  [N/16, K/32] records of RECORD_BYTES, one per block of 16 outputs and group of 32 inputs:
 *          256 bytes of codes: 16 rows (input pairs r: inputs 2r and 2r+1 of the group) of 16 bytes;
 *            byte b of row r holds, for output c = b / 2 and input 2r + b % 2, the code of output c
 *            in its low nibble and the code of output 8 + c in its high one;
 *          then the 16 outputs' scales and their 16 minimums, fp32.
 *
 * Per record the 512 weights are dequantized in fp32 (one multiply-add each), rounded once to
 * bf16 straight into AMX's pair-interleaved B layout, and one tdpbf16ps per 16 rows of x
 * multiplies them in with fp32 accumulation: the products of the dense bf16 model, and a cost
 * that hardly grows with M, where torch's int4 kernel grows linearly (on a 2-core Sapphire Rapids:
 * 9.2 against 15.3 ms per SmolLM2 decode pass at 8 rows, 9.4 against 27.3 at 16).
 *
 * Built only where the compiler targets AMX-BF16 (-march=native on such a CPU); elsewhere
 * int4_amx_available() says 0. The caller (int4_amx.py) checks shapes: this file trusts them.
 * Outputs are shared by up to `threads` threads of torch's own OpenMP team (see lora_native.c).
 */
#include <stdint.h>
#include <string.h>

#include "native_common.h"

#define GROUP 32
#define OUT_TILE 16                    /* outputs per record and per C tile */
#define RECORD_BYTES (256 + 2 * 64)    /* codes, 16 scales, 16 minimums */
#define ROW_TILE 16                    /* rows of x per A and C tile */
#define CHUNK_ROWS (4 * ROW_TILE)      /* C tiles 0-3: rows of x per pass over the weights */

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

int int4_amx_available(void) { return 1; }

/* Ask the kernel for the AMX tile state (once per process; oneDNN may have done it already). 0: granted. */
int int4_amx_init(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

typedef struct __attribute__((packed, aligned(64))) {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Tiles: C0-C3 the outputs of up to four row tiles, 4 a full A (16 rows), 5 the last partial A, 6 B. */
static void configure(int64_t rows) {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette_id = 1;
    for (int t = 0; t < 4; t++) {
        const int64_t left = rows - (int64_t)t * ROW_TILE;
        c.rows[t] = (uint8_t)(left <= 0 ? 1 : left < ROW_TILE ? left : ROW_TILE), c.colsb[t] = 64;
    }
    c.rows[4] = ROW_TILE, c.colsb[4] = 64;
    c.rows[5] = (uint8_t)(rows % ROW_TILE ? rows % ROW_TILE : ROW_TILE), c.colsb[5] = 64;
    c.rows[6] = GROUP / 2, c.colsb[6] = 64;
    _tile_loadconfig(&c);
}

/* One record's 512 weights as the B tile: row r, bytes 4c.. = (W[c][2r], W[c][2r+1]) in bf16. */
static inline void build_b(const uint8_t *rec, __m512bh b[GROUP / 2]) {
    const __m512 scale = _mm512_loadu_ps((const float *)(rec + 256));
    const __m512 minimum = _mm512_loadu_ps((const float *)(rec + 320));
    const __m512i low_outputs = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i high_outputs = _mm512_add_epi32(low_outputs, _mm512_set1_epi32(8));
    const __m512 s_lo = _mm512_permutexvar_ps(low_outputs, scale), s_hi = _mm512_permutexvar_ps(high_outputs, scale);
    const __m512 m_lo = _mm512_permutexvar_ps(low_outputs, minimum);
    const __m512 m_hi = _mm512_permutexvar_ps(high_outputs, minimum);
    const __m512i nibble = _mm512_set1_epi32(15);
    for (int r = 0; r < GROUP / 2; r++) {
        const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(rec + 16 * r)));
        const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(codes, nibble)), s_lo, m_lo);
        const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(codes, 4)), s_hi, m_hi);
        b[r] = _mm512_cvtne2ps_pbh(hi, lo); /* outputs 0-7 in the low half, 8-15 in the high one */
    }
}

/* C_t += A(row tile t of x at group g) · B. Tile numbers are immediates: one case per C tile. */
static inline void multiply_row_tile(int t, int partial, const bf16_t *a, int64_t stride_bytes) {
    if (partial)
        _tile_loadd(5, a, stride_bytes);
    else
        _tile_loadd(4, a, stride_bytes);
#define DOT(C)                     \
    do {                           \
        if (partial)               \
            _tile_dpbf16ps(C, 5, 6); \
        else                       \
            _tile_dpbf16ps(C, 4, 6); \
    } while (0)
    switch (t) {
        case 0: DOT(0); break;
        case 1: DOT(1); break;
        case 2: DOT(2); break;
        default: DOT(3); break;
    }
#undef DOT
}

static inline void store_row_tile(int t, float *c) {
    switch (t) {
        case 0: _tile_stored(0, c, 64); break;
        case 1: _tile_stored(1, c, 64); break;
        case 2: _tile_stored(2, c, 64); break;
        default: _tile_stored(3, c, 64); break;
    }
}

typedef struct {
    const bf16_t *x;
    int64_t x_rs;
    const uint8_t *w;
    void *y;
    int64_t y_rs, N, K;
    int y_bf16;
} Job;

/* Outputs of block nb (16 outputs) for rows m0 .. m0 + rows (at most CHUNK_ROWS). */
static void output_block(const Job *j, int64_t nb, int64_t m0, int64_t rows) {
    const int64_t groups = j->K / GROUP, tiles = (rows + ROW_TILE - 1) / ROW_TILE;
    const uint8_t *rec = j->w + nb * groups * RECORD_BYTES;
    __m512bh b[GROUP / 2];
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t g = 0; g < groups; g++, rec += RECORD_BYTES) {
        build_b(rec, b);
        _tile_loadd(6, b, 64);
        for (int t = 0; t < tiles; t++) {
            const int partial = (t + 1) * ROW_TILE > rows;
            multiply_row_tile(t, partial, j->x + (m0 + t * ROW_TILE) * j->x_rs + g * GROUP,
                              j->x_rs * (int64_t)sizeof(bf16_t));
        }
    }
    float c[ROW_TILE * OUT_TILE];
    for (int t = 0; t < tiles; t++) {
        store_row_tile(t, c);
        const int64_t n_rows = rows - t * ROW_TILE < ROW_TILE ? rows - t * ROW_TILE : ROW_TILE;
        for (int64_t r = 0; r < n_rows; r++) {
            const int64_t at = (m0 + t * ROW_TILE + r) * j->y_rs + nb * OUT_TILE;
            if (j->y_bf16)
                for (int o = 0; o < OUT_TILE; o++) ((bf16_t *)j->y)[at + o] = f32_to_bf16(c[r * OUT_TILE + o]);
            else
                memcpy((float *)j->y + at, c + r * OUT_TILE, OUT_TILE * sizeof(float));
        }
    }
}

static void run_chunk(const Job *j, int64_t first_block, int64_t end_block, int64_t m0, int64_t rows) {
    configure(rows);
    for (int64_t nb = first_block; nb < end_block; nb++) output_block(j, nb, m0, rows);
    _tile_release();
}

/*
 * args (int64): y, y row stride, x, x row stride, w, M, N, K, y is bf16 (0/1), threads.
 * Returns 0 (the caller has checked N % 16 == 0, K % 32 == 0 and the AMX permission).
 */
int int4_amx_matmul(const int64_t *args) {
    const Job j = {(const bf16_t *)(intptr_t)args[2], args[3], (const uint8_t *)(intptr_t)args[4],
                   (void *)(intptr_t)args[0], args[1], args[6], args[7], (int)args[8]};
    const int64_t M = args[5], blocks = j.N / OUT_TILE;
    const int threads = (int)args[9];
    for (int64_t m0 = 0; m0 < M; m0 += CHUNK_ROWS) {
        const int64_t rows = M - m0 < CHUNK_ROWS ? M - m0 : CHUNK_ROWS;
        if (threads <= 1) {
            run_chunk(&j, 0, blocks, m0, rows);
            continue;
        }
#pragma omp parallel num_threads(threads)
        {
            const int64_t n_threads = omp_get_num_threads(), me = omp_get_thread_num();
            const int64_t per = (blocks + n_threads - 1) / n_threads;
            const int64_t first = me * per, end = first + per < blocks ? first + per : blocks;
            if (first < end) run_chunk(&j, first, end, m0, rows);
        }
    }
    return 0;
}

#else

int int4_amx_available(void) { return 0; }
int int4_amx_init(void) { return -1; }
int int4_amx_matmul(const int64_t *args) {
    (void)args;
    return -1;
}

#endif
