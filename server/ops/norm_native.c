/*
 * norm_native.c: the decoder layer's element-wise glue, one C call each (norm_torch.py's meaning).
 *
 *   add_rms_norm:  r = residual + hidden (r = hidden without a residual), rounded to the
 *                  activations' dtype; out = r · (mean(r²) + eps)^-1/2 · weight, in fp32, rounded once.
 *   silu_mul:      out[t, i] = silu(g) · u with g = gate_up[t, i], u = gate_up[t, I + i].
 *
 * Rows are contiguous, fp32 or bf16 (one dtype per call, the weight's too). Torch runs four to
 * six small ops for each (every one a dispatch and an allocation, ~5-30 us at decode sizes); these
 * run one loop over the rows. The sum of squares is kept in LANES partial sums (native_common.h);
 * exp for SiLU is a Cephes-style polynomial on AVX2 (relative error ~2e-7), libm's expf elsewhere.
 * Single-threaded: a decode step's rows are a few KiB.
 */
#include <math.h>
#include <stdint.h>

#include "native_common.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

static inline float load1(const void *src, int64_t i, int is_bf16) {
    return is_bf16 ? bf16_to_f32(((const bf16_t *)src)[i]) : ((const float *)src)[i];
}

static inline void store1(void *dst, int64_t i, float v, int is_bf16) {
    if (is_bf16)
        ((bf16_t *)dst)[i] = f32_to_bf16(v);
    else
        ((float *)dst)[i] = v;
}

/* One row: r = res + h (or h) into r_out (which may be res itself), then out = norm(r) · w. */
static void add_rms_norm_row(void *out, void *r_out, const void *h, const void *res, const void *w, int64_t H,
                             float eps, int bf16) {
    float sums[LANES] = {0};
    for (int64_t i = 0; i < H; i++) {
        float r = load1(h, i, bf16);
        if (res != NULL) {
            r += load1(res, i, bf16);
            store1(r_out, i, r, bf16);
            r = load1(r_out, i, bf16); /* the norm reads the rounded residual, as torch's next op does */
        }
        sums[i % LANES] += r * r;
    }
    const float scale = 1.0f / sqrtf(hsum(sums) / (float)H + eps);
    const void *r_in = res != NULL ? r_out : h;
    for (int64_t i = 0; i < H; i++) store1(out, i, load1(r_in, i, bf16) * scale * load1(w, i, bf16), bf16);
}

/*
 * args (int64): out, residual out (0: none written), hidden, residual in (0: none), weight, rows, H,
 * eps (fp32 bits), bf16 (0/1). All [rows, H] contiguous; weight [H]. The residual out may be the
 * residual in (the sum is written over it).
 */
int loraplex_add_rms_norm(const int64_t *args) {
    char *out = (char *)(intptr_t)args[0], *r_out = (char *)(intptr_t)args[1];
    const char *h = (const char *)(intptr_t)args[2], *res = (const char *)(intptr_t)args[3];
    const void *w = (const void *)(intptr_t)args[4];
    const int64_t rows = args[5], H = args[6];
    const uint32_t eps_bits = (uint32_t)args[7];
    float eps;
    memcpy(&eps, &eps_bits, sizeof eps);
    const int bf16 = (int)args[8];
    const size_t row = (size_t)H * elem_size(bf16);
    for (int64_t t = 0; t < rows; t++)
        add_rms_norm_row(out + t * row, res ? r_out + t * row : NULL, h + t * row, res ? res + t * row : NULL, w,
                         H, eps, bf16);
    return 0;
}

#if defined(__AVX2__) && defined(__FMA__)
/* e^x for 8 lanes: x = n·ln2 + f, |f| <= ln2 / 2, e^f by a degree-7 polynomial (Cephes expf). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(f, f), _mm256_add_ps(f, _mm256_set1_ps(1.0f)));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

static inline __m256 load8(const void *src, int64_t i, int bf16) {
    if (bf16) {
        const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const bf16_t *)src + i)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    }
    return _mm256_loadu_ps((const float *)src + i);
}
#endif

/* silu(g) · u for one row of I outputs. */
static void silu_mul_row(void *out, const void *gate, const void *up, int64_t I, int bf16) {
    int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    float buf[8];
    for (; i + 8 <= I; i += 8) {
        const __m256 g = load8(gate, i, bf16), u = load8(up, i, bf16);
        const __m256 sig = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        const __m256 y = _mm256_mul_ps(sig, u);
        if (bf16) {
            _mm256_storeu_ps(buf, y);
            for (int k = 0; k < 8; k++) store1(out, i + k, buf[k], 1);
        } else {
            _mm256_storeu_ps((float *)out + i, y);
        }
    }
#endif
    for (; i < I; i++) {
        const float g = load1(gate, i, bf16);
        store1(out, i, g / (1.0f + expf(-g)) * load1(up, i, bf16), bf16);
    }
}

/* args (int64): out [rows, I], gate_up [rows, 2·I] (row stride gate_up_rs elements), rows, I, bf16. */
int loraplex_silu_mul(const int64_t *args) {
    char *out = (char *)(intptr_t)args[0];
    const char *gate_up = (const char *)(intptr_t)args[1];
    const int64_t gate_up_rs = args[2], rows = args[3], I = args[4];
    const int bf16 = (int)args[5];
    const size_t esize = elem_size(bf16);
    for (int64_t t = 0; t < rows; t++) {
        const char *g = gate_up + (size_t)(t * gate_up_rs) * esize;
        silu_mul_row(out + (size_t)(t * I) * esize, g, g + (size_t)I * esize, I, bf16);
    }
    return 0;
}
