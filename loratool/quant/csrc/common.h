/*
 * What the compiled kernels share (fp8.c, lowbit.c): float bits, the stochastic stream's hash, and
 * e4m3fn's decoding. Static inline: each translation unit has its own copy.
 */
#ifndef LT_COMMON_H
#define LT_COMMON_H

#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if FLT_EVAL_METHOD != 0
#error "the kernels' rounding needs float arithmetic done in float precision"
#endif

#if defined(_WIN32)
#define LT_EXPORT __declspec(dllexport)
#else
#define LT_EXPORT __attribute__((visibility("default")))
#endif

/* The SIMD level allowed and the CPU has: 0 none, 1 AVX2 (and F16C), 2 also AVX-512 (fp8.c; lt_fp8_simd caps it). */
int lt_simd_usable(void);

static inline uint32_t bits_of(float x) {
    uint32_t b;
    memcpy(&b, &x, sizeof b);
    return b;
}

static inline float float_of(uint32_t b) {
    float x;
    memcpy(&x, &b, sizeof x);
    return x;
}

/* The stochastic stream (loratool.quant.rounding): element (row, col) of a tensor with key k draws
 * mix32(mix32(row ^ k) ^ col) >> 8, times 2^-24. */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x21F0AAADu;
    x ^= x >> 15;
    x *= 0x735A2D97u;
    return x ^ (x >> 15);
}

/* The float32 value of an e4m3fn code. The NaN codes (0x7F, 0xFF) come out as +-480, as in the torch
 * passes; callers settle them first (linalg.fp8_has_nan_codes). */
static inline float decode_e4m3(uint32_t code) {
    uint32_t mag = code & 0x7Fu;
    float normal = float_of((mag << 20) + (120u << 23)); /* exponent bias 7 -> 127 */
    float sub = (float)(int32_t)mag * 0x1p-9f;           /* 0.mmm x 2^-6 */
    return float_of(bits_of(mag < 8u ? sub : normal) | ((code & 0x80u) << 24));
}

enum { LT_E4M3FN = 0, LT_E5M2 = 1 };
enum { LT_RUN = 256 }; /* elements whose squared errors are summed in float before double */

/* Encoding rounds |x| / s to the format: adding c = 2^(e + 23 - m), for e the exponent of |x|
 * (raised to the format's smallest normal exponent, below which the spacing is the subnormals')
 * and m the format's mantissa bits, leaves a float32 whose last place is the FP8 spacing at |x|,
 * so the hardware's round-to-nearest-even rounds as the format does. The sum's low mantissa bits
 * then count FP8 steps above c: 2^m + mantissa for a normal (2^(m+1) where rounding carries into
 * the next binade), the mantissa alone for a subnormal, so the code needs no branch:
 * (e's field >> (23 - m)) - (the smallest normal's, likewise) + those bits. Subtracting c again is
 * exact: the stored value, for the rounding error. Values beyond the format saturate, as torch's
 * clamp-then-convert does. */
typedef struct {
    uint32_t shift;   /* 23 - m */
    uint32_t min_exp; /* the smallest normal's exponent field, in place */
    float top;        /* the largest finite value */
} Format;

static const Format FORMATS[2] = {{20u, (127u - 6u) << 23, 448.0f}, {21u, (127u - 14u) << 23, 57344.0f}};

/* The nearest code of x (scaled units) and, in *stored, its value (signed): fp8.c's encode_run's arithmetic. */
static inline uint8_t nearest_code(float x, int32_t fmt, float *stored) {
    const Format f = FORMATS[fmt];
    uint32_t b = bits_of(x);
    float a = float_of(b & 0x7FFFFFFFu);
    float ac = a < f.top ? a : f.top;
    uint32_t e = bits_of(ac) & 0x7F800000u;
    e = e > f.min_exp ? e : f.min_exp;
    float c = float_of(e + (f.shift << 23));
    float sum = ac + c;
    *stored = float_of(bits_of(sum - c) | (b & 0x80000000u));
    uint32_t code = (e >> f.shift) - (f.min_exp >> f.shift) + (bits_of(sum) & 0xFFu);
    return (uint8_t)(code | ((b >> 24) & 0x80u));
}

#endif
