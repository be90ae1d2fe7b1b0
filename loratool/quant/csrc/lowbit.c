/*
 * Packed low-bit merge kernels: MXFP4 and NVFP4 (E2M1 codes, two a byte) and compressed-tensors'
 * pack-quantized integers (4 or 8 bits, consecutive groups), a strip of rows at a time. Decode a
 * weight's codes to float32; requantize a merged strip keeping the base's scales wherever a group
 * still fits them, nearest or stochastically, adding the kept sums: the elementwise work of
 * loratool.quant.packed.dequantize and .requantize in two passes instead of some thirty. The same
 * bytes as those torch passes (tests/test_native.py); the sums in another order.
 *
 * A weight's codes are rows of `row_bytes` bytes, element j in the low nibble of byte j / 2 for
 * even j and the high one for odd j (E2M1 and 4-bit integers alike; an 8-bit integer is byte j).
 * Scales are (rows, groups), row-major: MXFP4's E8M0 exponents and NVFP4's e4m3fn codes as bytes,
 * the integers' float32 (holding values of their own dtype), zero points int32 codes.
 */
#include <math.h>

#include "common.h"

enum { LT_MXFP4 = 0, LT_NVFP4 = 1, LT_INT = 2 };
enum { LT_OK = 0, LT_FRESH = 1, LT_NONFINITE = 2 }; /* encode's answers; decode's: OK or NONFINITE */
enum { LT_SCALE_F32 = 0, LT_SCALE_BF16 = 1 };       /* the integers' scale dtype */

/* One weight's layout (loratool.quant.native.LowBitSpec mirrors it field by field). */
typedef struct {
    int64_t cols;       /* the values a row holds */
    int64_t row_bytes;  /* the bytes of codes a row takes, padding included */
    int64_t group;      /* values per scale */
    int64_t groups;     /* scales per row */
    int32_t fmt;        /* LT_MXFP4, LT_NVFP4, LT_INT */
    int32_t bits;       /* LT_INT: 4 or 8 */
    int32_t divide;     /* LT_NVFP4: the tensor scale divides (compressed-tensors) or multiplies (ModelOpt) */
    int32_t scale_kind; /* LT_INT: LT_SCALE_F32 or LT_SCALE_BF16 */
    float second;       /* LT_NVFP4: the tensor scale */
    int32_t unused;
} Spec;

static const float E2M1[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

static inline uint32_t nibble(const uint8_t *row, int64_t j) { return (row[j >> 1] >> ((j & 1) * 4)) & 0xFu; }

static inline int finite(float x) { return (bits_of(x) & 0x7F800000u) != 0x7F800000u; }

/* 2^(e - 127), MXFP4's E8M0 scale (e = 0: 2^-127, a subnormal; 255: Inf, as torch.ldexp gives). */
static inline float e8m0(uint32_t e) { return e ? float_of(e << 23) : float_of(0x00400000u); }

/* NVFP4's element scale of a block scale code, under the tensor scale. */
static inline float nv_scale(const Spec *sp, uint32_t code) {
    float block = decode_e4m3(code);
    return sp->divide ? block / sp->second : block * sp->second;
}

/* NVFP4's per-code figures under one tensor scale, computed once a call: each block scale code's
 * element scale, and the reach 7 * (block * multiply) past which a group no longer fits it. */
typedef struct {
    float scale[256], reach[256], multiply;
} NvTables;

static void nv_tables(const Spec *sp, NvTables *t) {
    t->multiply = sp->divide ? 1.0f / sp->second : sp->second;
    for (uint32_t code = 0; code < 256; code++) {
        t->scale[code] = nv_scale(sp, code);
        t->reach[code] = 7.0f * (decode_e4m3(code) * t->multiply);
    }
}

/* A float32 rounded to the integers' scale dtype (to nearest, ties to even), still a float32. */
static inline float to_kind(float x, int32_t kind) {
    if (kind == LT_SCALE_F32) return x;
    uint32_t b = bits_of(x);
    return float_of((b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u);
}

/* The element scale of scale k (NVFP4's from its tables). */
static inline float group_scale(const Spec *sp, const NvTables *nv, const void *scale, int64_t k) {
    if (sp->fmt == LT_MXFP4) return e8m0(((const uint8_t *)scale)[k]);
    if (sp->fmt == LT_NVFP4) return nv->scale[((const uint8_t *)scale)[k]];
    return ((const float *)scale)[k];
}

/* Element j's base value in a row whose group scale is s (and zero point z, integers). */
static inline float base_value(const Spec *sp, const uint8_t *row, int64_t j, float s, float z, int has_zero) {
    if (sp->fmt != LT_INT) return E2M1[nibble(row, j)] * s;
    int32_t off = 1 << (sp->bits - 1);
    float q = (float)((sp->bits == 4 ? (int32_t)nibble(row, j) : (int32_t)row[j]) - off);
    return (has_zero ? q - z : q) * s;
}

/* x on E2M1's grid (rounding.round_to_grid with rounding.E2M1), signed: |x| clamped to 6, its
 * spacing 2^(exponent - 1) (0.5 below 2), nearest (ties to even) or up against the draw u. */
static inline float e2m1_round(float x, int stochastic, float u) {
    float a = fabsf(x);
    a = a < 6.0f ? a : 6.0f;
    uint32_t field = bits_of(a) >> 23;
    field = field > 127u ? field : 127u;
    float spacing = float_of((field - 1u) << 23), y = a / spacing, r;
    if (stochastic) {
        float below = floorf(y);
        r = below + (u < y - below ? 1.0f : 0.0f);
    } else {
        r = rintf(y);
    }
    return copysignf(r * spacing, x);
}

/* requantize's scale for one group of merged values w[j0..j1) (its amax and min/max given): the old
 * one where the group still fits it (keep), else the format's quantizer's. Writes the new scale
 * (and zero point) out and returns the element scale; *fresh set where NVFP4 cannot keep its tensor scale. */
static float new_scale(const Spec *sp, const NvTables *nv, int64_t k, float amax, float lo, float hi, const void *scale_in,
                       const int32_t *zero_in, void *scale_out, int32_t *zero_out, int keep, float *zp, int *fresh) {
    if (sp->fmt == LT_MXFP4) {
        uint32_t old = ((const uint8_t *)scale_in)[k];
        uint32_t e = ((bits_of(amax / 6.0f) + 0x007FFFFFu) & 0x7F800000u) >> 23; /* rounded up to a power of two */
        e = keep && amax <= 7.0f * e8m0(old) ? old : e;
        ((uint8_t *)scale_out)[k] = (uint8_t)e;
        return e8m0(e);
    }
    if (sp->fmt == LT_NVFP4) {
        uint32_t code = ((const uint8_t *)scale_in)[k];
        if (!(keep && amax <= nv->reach[code])) {
            float needed = (amax / 6.0f) / nv->multiply, stored;
            if (needed > 448.0f) *fresh = 1;
            code = nearest_code(needed, LT_E4M3FN, &stored);
        }
        ((uint8_t *)scale_out)[k] = (uint8_t)code;
        return nv->scale[code];
    }
    const float glo = -(float)(1 << (sp->bits - 1)), ghi = (float)((1 << (sp->bits - 1)) - 1);
    float s = ((const float *)scale_in)[k], z = zero_in ? (float)zero_in[k] : 0.0f;
    float safe = s > 0.0f ? s : 1.0f, l = lo / safe, h = hi / safe;
    if (zero_in) l = l + z, h = h + z;
    if (!(keep && l >= glo - 0.5f && h <= ghi + 0.5f && s > 0.0f)) { /* intpack.int_qparams */
        float lo0 = lo < 0.0f ? lo : 0.0f, hi0 = hi > 0.0f ? hi : 0.0f;
        float span = ghi - glo;
        float top = -lo0 > hi0 ? -lo0 : hi0; /* torch.maximum(|lo|, hi) */
        float raw = zero_in ? (hi0 - lo0) / span : top / (span / 2.0f);
        s = to_kind(raw, sp->scale_kind);
        if (s == 0.0f) s = sp->scale_kind == LT_SCALE_F32 ? FLT_EPSILON : 0x1p-7f;
        if (zero_in) {
            z = rintf(glo - lo0 / s);
            z = z < glo ? glo : (z > ghi ? ghi : z);
        }
    }
    ((float *)scale_out)[k] = s;
    if (zero_in) zero_out[k] = (int32_t)z;
    *zp = z;
    return s;
}

/* A float's bits as an int32 that orders as the float does (-0 just below +0). */
static inline int32_t order_key(uint32_t b) { return (int32_t)(b ^ ((uint32_t)((int32_t)b >> 31) & 0x7FFFFFFFu)); }
static inline float key_float(int32_t k) { return float_of((uint32_t)k ^ ((uint32_t)(k >> 31) & 0x7FFFFFFFu)); }

enum { LT_CHUNK = 64 }; /* elements whose values, codes and sums are formed together, in lanes */

#define LT_INLINE static inline __attribute__((always_inline))

/* The draw of element j of a row (rounding.uniforms). */
LT_INLINE float draw(uint32_t row_hash, uint32_t j) {
    return (float)(int32_t)(mix32(row_hash ^ j) >> 8) * 0x1p-24f;
}

/* n <= LT_CHUNK merged values w of an integer group with scale s (> 0) and zero point z on its grid:
 * codes (offset, unsigned) and the values written. Branch-free, so that the compiler vectorizes it;
 * `stochastic` and `has_zero` are constants where it is inlined. */
LT_INLINE void int_chunk(const float *restrict w, int64_t n, float s, float z, int has_zero, int32_t off,
                         int stochastic, uint32_t row_hash, uint32_t j0, uint8_t *restrict code,
                         float *restrict written) {
    const float glo = -(float)off, ghi = (float)(off - 1);
    for (int64_t j = 0; j < n; j++) {
        float x = has_zero ? w[j] / s + z : w[j] / s, q;
        if (stochastic) {
            float below = floorf(x);
            q = below + (draw(row_hash, j0 + (uint32_t)j) < x - below ? 1.0f : 0.0f);
        } else {
            q = rintf(x);
        }
        q = q < glo ? glo : (q > ghi ? ghi : q);
        written[j] = (has_zero ? q - z : q) * s;
        code[j] = (uint8_t)((int32_t)q + off);
    }
}

/* The same for an E2M1 group whose element scale is s: |w / s| clamped to 6, its spacing 2^(field -
 * 128) (0.5 below 2: a power of two, so y = a / spacing is a product and exact), rounded; 0 where
 * the scale is 0 (torch.where(scales > 0, codes, 0)). The code's index from the value's bits: 0.5
 * is 1, from 1 on (bits >> 22) - 252 (1 -> 2, 1.5 -> 3, 2 -> 4, 3 -> 5, 4 -> 6, 6 -> 7). */
LT_INLINE void e2m1_chunk(const float *restrict w, int64_t n, float s, int stochastic, uint32_t row_hash, uint32_t j0,
                          uint8_t *restrict code, float *restrict written) {
    const float safe = s > 0.0f ? s : 1.0f;
    const uint32_t live = s > 0.0f ? 0xFFFFFFFFu : 0u;
    for (int64_t j = 0; j < n; j++) {
        float x = w[j] / safe, a = fabsf(x);
        a = a < 6.0f ? a : 6.0f;
        uint32_t field = bits_of(a) >> 23;
        field = field > 127u ? field : 127u;
        float spacing = float_of((field - 1u) << 23), y = a * float_of((255u - field) << 23), r;
        if (stochastic) {
            float below = floorf(y);
            r = below + (draw(row_hash, j0 + (uint32_t)j) < y - below ? 1.0f : 0.0f);
        } else {
            r = rintf(y);
        }
        uint32_t mb = bits_of(r * spacing) & live;
        uint32_t neg = (bits_of(x) >> 31) & live & 1u;
        int32_t idx = mb >= 0x3F800000u ? (int32_t)(mb >> 22) - 252 : (int32_t)(mb != 0u);
        written[j] = float_of(mb | (neg << 31)) * s;
        code[j] = (uint8_t)((uint32_t)idx | (neg << 3));
    }
}

/* The kept sums' terms of n elements in float lanes: delta = w - b (the base), err = w - written. */
LT_INLINE void kept_lanes(const float *restrict w, const float *restrict b, const float *restrict written, int64_t n,
                          float acc[restrict 3][8]) {
    int64_t full = n & ~(int64_t)7;
    for (int64_t j = 0; j < full; j += 8) {
        for (int l = 0; l < 8; l++) {
            float delta = w[j + l] - b[j + l], err = w[j + l] - written[j + l];
            acc[0][l] += delta * delta;
            acc[1][l] += err * delta;
            acc[2][l] += err * err;
        }
    }
    for (int64_t j = full; j < n; j++) {
        float delta = w[j] - b[j], err = w[j] - written[j];
        acc[0][j & 7] += delta * delta;
        acc[1][j & 7] += err * delta;
        acc[2][j & 7] += err * err;
    }
}

/* The base's values of elements c0..c0+n of a row (c0 even), its group scale s (zero point z): as
 * base_value, in lanes. An E2M1 magnitude from its index m: m / 2 below 2, else 2^(m / 2 - 1) times
 * 1.5 for odd m, built from bits (2 -> 1, 3 -> 1.5, 4 -> 2, 5 -> 3, 6 -> 4, 7 -> 6). */
LT_INLINE void base_chunk(const Spec *sp, const uint8_t *restrict row, int64_t c0, int64_t n, float s, float z, int has_zero,
                          float *restrict b) {
    uint8_t nib[LT_CHUNK];
    if (sp->fmt == LT_INT && sp->bits == 8) {
        memcpy(nib, row + c0, (size_t)n);
    } else {
        const uint8_t *p = row + (c0 >> 1);
        for (int64_t k = 0; k < (n + 1) / 2; k++) {
            nib[2 * k] = p[k] & 0xFu;
            nib[2 * k + 1] = (uint8_t)(p[k] >> 4);
        }
    }
    if (sp->fmt == LT_INT) {
        const int32_t off = 1 << (sp->bits - 1);
        for (int64_t j = 0; j < n; j++) {
            float q = (float)((int32_t)nib[j] - off);
            b[j] = (has_zero ? q - z : q) * s;
        }
        return;
    }
    for (int64_t j = 0; j < n; j++) {
        uint32_t m = nib[j] & 7u;
        float mag = m < 2u ? (float)(int32_t)m * 0.5f : float_of((((m >> 1) + 126u) << 23) | ((m & 1u) << 22));
        b[j] = float_of(bits_of(mag) | ((uint32_t)(nib[j] & 8u) << 28)) * s;
    }
}

/* out = the codes of rows decoded (packed.dequantize); NONFINITE where an NVFP4 scale is a NaN code. */
LT_INLINE int32_t decode_rows(const Spec *sp, const uint8_t *codes, const void *scale, const int32_t *zero,
                              int64_t rows, float *out) {
    NvTables nv;
    if (sp->fmt == LT_NVFP4) nv_tables(sp, &nv);
    for (int64_t i = 0; i < rows; i++) {
        const uint8_t *row = codes + i * sp->row_bytes;
        for (int64_t g = 0; g < sp->groups; g++) {
            int64_t k = i * sp->groups + g, j1 = (g + 1) * sp->group < sp->cols ? (g + 1) * sp->group : sp->cols;
            if (sp->fmt == LT_NVFP4 && (((const uint8_t *)scale)[k] & 0x7Fu) == 0x7Fu) return LT_NONFINITE;
            float s = group_scale(sp, &nv, scale, k), z = zero ? (float)zero[k] : 0.0f;
            for (int64_t c0 = g * sp->group; c0 < j1; c0 += LT_CHUNK) {
                int64_t n = j1 - c0 < LT_CHUNK ? j1 - c0 : LT_CHUNK;
                float *o = out + i * sp->cols + c0;
                if (n == 16)
                    base_chunk(sp, row, c0, 16, s, z, zero != 0, o);
                else if (n == 32)
                    base_chunk(sp, row, c0, 32, s, z, zero != 0, o);
                else
                    base_chunk(sp, row, c0, n, s, z, zero != 0, o);
            }
        }
    }
    return LT_OK;
}

/* One chunk's work in encode_rows: what it shares with the chunk function. */
typedef struct {
    const Spec *sp;
    const float *w;      /* the row's merged values */
    const uint8_t *base; /* the row's base codes */
    uint8_t *out;        /* the row's new codes */
    int64_t c0;          /* the chunk's first column */
    float s_old, z_old;  /* the base's group scale and zero point */
    float s, z;          /* the new ones */
    int has_zero, stochastic;
    uint32_t row_hash;
} Chunk;

/* Elements c0..c0+n of a row: the base's values, the codes and values written, the kept sums' lanes,
 * the codes packed. Inlined where n is a constant too, for whole vectors without remainder loops. */
LT_INLINE void encode_chunk(const Chunk *c, int64_t n, float *b, float *written, uint8_t *code, float acc[3][8]) {
    const Spec *sp = c->sp;
    const int32_t off = sp->fmt == LT_INT ? 1 << (sp->bits - 1) : 0;
    const float *w = c->w + c->c0;
    const uint32_t at = (uint32_t)c->c0;
    base_chunk(sp, c->base, c->c0, n, c->s_old, c->z_old, c->has_zero, b);
    if (sp->fmt != LT_INT) {
        if (c->stochastic)
            e2m1_chunk(w, n, c->s, 1, c->row_hash, at, code, written);
        else
            e2m1_chunk(w, n, c->s, 0, c->row_hash, at, code, written);
    } else if (c->has_zero) {
        if (c->stochastic)
            int_chunk(w, n, c->s, c->z, 1, off, 1, c->row_hash, at, code, written);
        else
            int_chunk(w, n, c->s, c->z, 1, off, 0, c->row_hash, at, code, written);
    } else if (c->stochastic) {
        int_chunk(w, n, c->s, c->z, 0, off, 1, c->row_hash, at, code, written);
    } else {
        int_chunk(w, n, c->s, c->z, 0, off, 0, c->row_hash, at, code, written);
    }
    kept_lanes(w, b, written, n, acc);
    if (sp->fmt == LT_INT && sp->bits == 8) {
        memcpy(c->out + c->c0, code, (size_t)n);
    } else {
        uint8_t *q = c->out + (c->c0 >> 1);
        for (int64_t k = 0; k < n / 2; k++) q[k] = (uint8_t)(code[2 * k] | (code[2 * k + 1] << 4));
        if (n & 1) q[n / 2] = code[n - 1]; /* the row's last value: padding beside it */
    }
}

/* The float lanes' sums added to the double totals, and the lanes cleared (every LT_RUN elements or so). */
LT_INLINE void flush(float acc[3][8], double total[3]) {
    for (int t = 0; t < 3; t++) {
        for (int l = 0; l < 8; l++) total[t] += acc[t][l];
        for (int l = 0; l < 8; l++) acc[t][l] = 0.0f;
    }
}

/* The merged rows (float32, rows x cols, rows row0.. of the weight) requantized into codes_out and
 * scale_out (zero_out) with the base's codes, scales and zero points kept where they fit
 * (packed.requantize with keep_scales), nearest or stochastically with the stream `key`; adds
 * <delta, delta>, <err, delta>, <err, err> to sums (delta = merged - base, err = merged - written;
 * float lanes over LT_RUN elements or so, then double). Returns LT_FRESH where an NVFP4 block needs a scale past
 * e4m3's under the tensor scale, and LT_NONFINITE where a merged value is not finite (the outputs
 * are then incomplete). */
LT_INLINE int32_t encode_rows(const Spec *sp, const float *merged, int64_t rows, int64_t row0, const uint8_t *codes_in,
                           const void *scale_in, const int32_t *zero_in, uint8_t *codes_out, void *scale_out,
                           int32_t *zero_out, int32_t keep, int32_t stochastic, uint32_t key, double *sums) {
    int fresh = 0;
    double total[3] = {0.0, 0.0, 0.0};
    NvTables nv;
    if (sp->fmt == LT_NVFP4) nv_tables(sp, &nv);
    float b[LT_CHUNK], written[LT_CHUNK], acc[3][8] = {{0.0f}};
    int64_t pending = 0; /* elements in acc */
    uint8_t code[LT_CHUNK];
    for (int64_t i = 0; i < rows; i++) {
        const float *w = merged + i * sp->cols;
        const uint8_t *base = codes_in + i * sp->row_bytes;
        uint8_t *out = codes_out + i * sp->row_bytes;
        uint32_t row_hash = mix32((uint32_t)(row0 + i) ^ key);
        memset(out, 0, (size_t)sp->row_bytes);
        for (int64_t g = 0; g < sp->groups; g++) {
            int64_t k = i * sp->groups + g, j0 = g * sp->group;
            int64_t j1 = j0 + sp->group < sp->cols ? j0 + sp->group : sp->cols;
            uint32_t top = 0;
            int32_t lo = INT32_MAX, hi = INT32_MIN;
            for (int64_t j = j0; j < j1; j++) { /* in integers: lanes, and no NaN to order */
                uint32_t bits = bits_of(w[j]), a = bits & 0x7FFFFFFFu;
                int32_t o = order_key(bits);
                top = a > top ? a : top;
                lo = o < lo ? o : lo;
                hi = o > hi ? o : hi;
            }
            if (top >= 0x7F800000u) return LT_NONFINITE;
            if (sp->fmt == LT_NVFP4 && (((const uint8_t *)scale_in)[k] & 0x7Fu) == 0x7Fu) return LT_NONFINITE;
            float s_old = group_scale(sp, &nv, scale_in, k), z_old = zero_in ? (float)zero_in[k] : 0.0f, z = 0.0f;
            float s = new_scale(sp, &nv, k, float_of(top), key_float(lo), key_float(hi), scale_in, zero_in, scale_out,
                                zero_out, keep, &z, &fresh);
            for (int64_t c0 = j0; c0 < j1; c0 += LT_CHUNK) {
                int64_t n = j1 - c0 < LT_CHUNK ? j1 - c0 : LT_CHUNK;
                const Chunk ch = {sp, w, base, out, c0, s_old, z_old, s, z, zero_in != 0, stochastic, row_hash};
                if (n == 16) /* NVFP4's groups, MXFP4's halves, ...: constant trip counts, whole vectors */
                    encode_chunk(&ch, 16, b, written, code, acc);
                else if (n == 32)
                    encode_chunk(&ch, 32, b, written, code, acc);
                else if (n == LT_CHUNK)
                    encode_chunk(&ch, LT_CHUNK, b, written, code, acc);
                else
                    encode_chunk(&ch, n, b, written, code, acc);
            }
            if ((pending += j1 - j0) >= LT_RUN || g == sp->groups - 1) flush(acc, total), pending = 0;
        }
    }
    for (int t = 0; t < 3; t++) sums[t] += total[t];
    return fresh ? LT_FRESH : LT_OK;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2"))) static int32_t decode_rows_avx2(const Spec *sp, const uint8_t *codes,
                                                                const void *scale, const int32_t *zero, int64_t rows,
                                                                float *out) {
    return decode_rows(sp, codes, scale, zero, rows, out);
}

/* The same, compiled for AVX2 (eight lanes; the rounding is IEEE's either way: the same bytes). */
__attribute__((target("avx2"))) static int32_t encode_rows_avx2(
    const Spec *sp, const float *merged, int64_t rows, int64_t row0, const uint8_t *codes_in, const void *scale_in,
    const int32_t *zero_in, uint8_t *codes_out, void *scale_out, int32_t *zero_out, int32_t keep,
    int32_t stochastic, uint32_t key, double *sums) {
    return encode_rows(sp, merged, rows, row0, codes_in, scale_in, zero_in, codes_out, scale_out, zero_out, keep,
                       stochastic, key, sums);
}
#endif

LT_EXPORT int32_t lt_lowbit_decode(const Spec *sp, const uint8_t *codes, const void *scale, const int32_t *zero,
                                   int64_t rows, float *out) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (lt_simd_usable()) return decode_rows_avx2(sp, codes, scale, zero, rows, out);
#endif
    return decode_rows(sp, codes, scale, zero, rows, out);
}

LT_EXPORT int32_t lt_lowbit_encode(const Spec *sp, const float *merged, int64_t rows, int64_t row0,
                                   const uint8_t *codes_in, const void *scale_in, const int32_t *zero_in,
                                   uint8_t *codes_out, void *scale_out, int32_t *zero_out, int32_t keep,
                                   int32_t stochastic, uint32_t key, double *sums) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (lt_simd_usable())
        return encode_rows_avx2(sp, merged, rows, row0, codes_in, scale_in, zero_in, codes_out, scale_out, zero_out,
                                keep, stochastic, key, sums);
#endif
    return encode_rows(sp, merged, rows, row0, codes_in, scale_in, zero_in, codes_out, scale_out, zero_out, keep,
                       stochastic, key, sums);
}
