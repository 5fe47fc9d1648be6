/*
 * native_common.h: what the C kernels of server/ops share (bf16 by bits, fp32 tree sums, row loads).
 * Included by lora_native.c and attention_native.c; its bytes are part of their build keys.
 */
#ifndef LORAPLEX_NATIVE_COMMON_H
#define LORAPLEX_NATIVE_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define LANES 16 /* fp32 partial sums per row of a dot product: 1-2 vector registers */

typedef uint16_t bf16_t;

static inline float bf16_to_f32(bf16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even; NaN stays a (quiet) NaN. */
static inline bf16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    uint32_t quiet_nan = (u >> 16) | 0x40u;
    return (bf16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
}

/* Sum of LANES partial sums as a tree: vectorizable, where an in-order sum is a serial chain. */
static inline float hsum(float *a) {
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int j = 0; j < width; j++) a[j] += a[j + width];
    return a[0];
}

/* Bytes of one element: bf16 or fp32. */
static inline size_t elem_size(int is_bf16) { return is_bf16 ? sizeof(bf16_t) : sizeof(float); }

/* dst[k] = fp32(src[k]) for a row of bf16 or fp32. */
static inline void load_row(float *restrict dst, const void *src, int64_t len, int is_bf16) {
    if (is_bf16) {
        const bf16_t *restrict s = (const bf16_t *)src;
        for (int64_t k = 0; k < len; k++) dst[k] = bf16_to_f32(s[k]);
    } else {
        memcpy(dst, src, (size_t)len * sizeof(float));
    }
}

#endif
