/*
 * Packed low-bit merge kernels: MXFP4 and NVFP4 (E2M1 codes, two a byte) and compressed-tensors'
 * pack-quantized integers (4 or 8 bits, consecutive groups), a strip of rows at a time. Decode a
 * weight's codes to float32 (packed.dequantize); requantize base + delta (the terms' sum, torch's
 * addmm) keeping the base's scales wherever a group still fits them, nearest or stochastically,
 * adding the kept sums: the elementwise work of packed.requantize in one pass instead of some
 * thirty. The same bytes as those torch passes (tests/test_native.py); the sums in another order.
 *
 * A weight's codes are rows of `row_bytes` bytes, element j in the low nibble of byte j / 2 for
 * even j and the high one for odd j (E2M1 and 4-bit integers alike; an 8-bit integer is byte j).
 * Scales are (rows, groups), row-major: MXFP4's E8M0 exponents and NVFP4's e4m3fn codes as bytes,
 * the integers' float32 (holding values of their own dtype), zero points int32 codes.
 */
#include <math.h>

#include "common.h"

enum { LT_MXFP4 = 0, LT_NVFP4 = 1, LT_INT = 2 };
enum { LT_OK = 0, LT_FRESH = 1, LT_NONFINITE = 2, LT_NOMEM = 3 }; /* the passes' answers */
enum { LT_SCALE_F32 = 0, LT_SCALE_BF16 = 1 };                     /* the integers' scale dtype */

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

/* requantize's scale for one group of merged values w[j0..j1) (its amax and min/max given): the old
 * one where the group still fits it (keep), else the format's quantizer's. Writes the new scale
 * (and zero point) out and returns the element scale; *fresh set where NVFP4 cannot keep its tensor scale. */
static float new_scale(const Spec *sp, const NvTables *nv, int64_t k, float amax, float lo, float hi,
                       const void *scale_in, const int32_t *zero_in, void *scale_out, int32_t *zero_out, int keep,
                       float *zp, int *fresh) {
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

#define LT_INLINE static inline __attribute__((always_inline))

/* The draw of element j of a row (rounding.uniforms). */
LT_INLINE float draw(uint32_t row_hash, uint32_t j) {
    return (float)(int32_t)(mix32(row_hash ^ j) >> 8) * 0x1p-24f;
}

/* A row works in arrays of its length (the codes unpacked, each element's scales, the values), so
 * that every element loop is one long branch-free loop the compiler vectorizes; the groups' own
 * work (ranges, scales) goes a group at a time. */
typedef struct {
    uint8_t *nib, *code;                            /* the base's codes unpacked, the new ones */
    float *s_old, *z_old, *s, *z, *base, *merged, *written; /* per element */
} Row;

static void row_free(Row *r) {
    free(r->nib);
    free(r->code);
    free(r->s_old);
}

static int row_alloc(Row *r, int64_t cols) {
    size_t n = (size_t)cols + 8;
    r->nib = malloc(n);
    r->code = malloc(n);
    r->s_old = malloc(7 * n * sizeof(float));
    if (!r->nib || !r->code || !r->s_old) {
        row_free(r);
        return 0;
    }
    r->z_old = r->s_old + n, r->s = r->z_old + n, r->z = r->s + n, r->base = r->z + n, r->merged = r->base + n;
    r->written = r->merged + n;
    return 1;
}

/* A row's codes unpacked into nib[0..cols) (4 bits: element j in byte j / 2, low nibble first). */
LT_INLINE void unpack_row(const Spec *sp, const uint8_t *restrict row, uint8_t *restrict nib) {
    if (sp->fmt == LT_INT && sp->bits == 8) {
        memcpy(nib, row, (size_t)sp->cols);
        return;
    }
    for (int64_t k = 0; k < (sp->cols + 1) / 2; k++) {
        nib[2 * k] = row[k] & 0xFu;
        nib[2 * k + 1] = (uint8_t)(row[k] >> 4);
    }
}

/* The codes packed back into a row of row_bytes bytes, the padding zero. */
LT_INLINE void pack_row(const Spec *sp, const uint8_t *restrict code, uint8_t *restrict row) {
    int64_t used = sp->fmt == LT_INT && sp->bits == 8 ? sp->cols : (sp->cols + 1) / 2;
    if (sp->fmt == LT_INT && sp->bits == 8) {
        memcpy(row, code, (size_t)sp->cols);
    } else {
        for (int64_t k = 0; k < sp->cols / 2; k++) row[k] = (uint8_t)(code[2 * k] | (code[2 * k + 1] << 4));
        if (sp->cols & 1) row[sp->cols / 2] = code[sp->cols - 1];
    }
    memset(row + used, 0, (size_t)(sp->row_bytes - used));
}

/* Element values b[j] of codes nib[j] under their scales s[j] (zero points z[j]): packed.dequantize's
 * arithmetic. An E2M1 magnitude from its index m: m / 2 below 2, else 2^(m / 2 - 1), times 1.5 for
 * odd m, built from bits (2 -> 1, 3 -> 1.5, 4 -> 2, 5 -> 3, 6 -> 4, 7 -> 6). */
LT_INLINE void values_row(const Spec *sp, const uint8_t *restrict nib, const float *restrict s,
                          const float *restrict z, int has_zero, float *restrict b) {
    if (sp->fmt == LT_INT) {
        const int32_t off = 1 << (sp->bits - 1);
        for (int64_t j = 0; j < sp->cols; j++) {
            float q = (float)((int32_t)nib[j] - off);
            b[j] = (has_zero ? q - z[j] : q) * s[j];
        }
        return;
    }
    for (int64_t j = 0; j < sp->cols; j++) {
        uint32_t m = nib[j] & 7u;
        float mag = m < 2u ? (float)(int32_t)m * 0.5f : float_of((((m >> 1) + 126u) << 23) | ((m & 1u) << 22));
        b[j] = float_of(bits_of(mag) | ((uint32_t)(nib[j] & 8u) << 28)) * s[j];
    }
}

/* Integer codes (offset, unsigned) and the values written for merged values w under scales s (> 0)
 * and zero points z: round(w / s + z) clamped to the grid, nearest or against the draws. */
LT_INLINE void int_row(const float *restrict w, int64_t n, const float *restrict s, const float *restrict z,
                       int has_zero, int32_t off, int stochastic, uint32_t row_hash, uint8_t *restrict code,
                       float *restrict written) {
    const float glo = -(float)off, ghi = (float)(off - 1);
    for (int64_t j = 0; j < n; j++) {
        float x = has_zero ? w[j] / s[j] + z[j] : w[j] / s[j], q;
        if (stochastic) {
            float below = floorf(x);
            q = below + (draw(row_hash, (uint32_t)j) < x - below ? 1.0f : 0.0f);
        } else {
            q = rintf(x);
        }
        q = q < glo ? glo : (q > ghi ? ghi : q);
        written[j] = (has_zero ? q - z[j] : q) * s[j];
        code[j] = (uint8_t)((int32_t)q + off);
    }
}

/* The same for E2M1 under element scales s (rounding.round_to_grid with rounding.E2M1): |w / s|
 * clamped to 6, its spacing 2^(field - 128) (0.5 below 2: a power of two, so y = a / spacing is a
 * product and exact), rounded; 0 where the scale is 0 (torch.where(scales > 0, codes, 0)). The code's
 * index from the value's bits: 0.5 is 1, from 1 on (bits >> 22) - 252 (1 -> 2, 1.5 -> 3, ... 6 -> 7). */
LT_INLINE void e2m1_row(const float *restrict w, int64_t n, const float *restrict s, int stochastic,
                        uint32_t row_hash, uint8_t *restrict code, float *restrict written) {
    for (int64_t j = 0; j < n; j++) {
        const uint32_t live = s[j] > 0.0f ? 0xFFFFFFFFu : 0u;
        float x = w[j] / (s[j] > 0.0f ? s[j] : 1.0f), a = fabsf(x);
        a = a < 6.0f ? a : 6.0f;
        uint32_t field = bits_of(a) >> 23;
        field = field > 127u ? field : 127u;
        float spacing = float_of((field - 1u) << 23), y = a * float_of((255u - field) << 23), r;
        if (stochastic) {
            float below = floorf(y);
            r = below + (draw(row_hash, (uint32_t)j) < y - below ? 1.0f : 0.0f);
        } else {
            r = rintf(y);
        }
        uint32_t mb = bits_of(r * spacing) & live;
        uint32_t neg = (bits_of(x) >> 31) & live & 1u;
        int32_t idx = mb >= 0x3F800000u ? (int32_t)(mb >> 22) - 252 : (int32_t)(mb != 0u);
        written[j] = float_of(mb | (neg << 31)) * s[j];
        code[j] = (uint8_t)((uint32_t)idx | (neg << 3));
    }
}

/* The kept sums of a row, <delta, delta>, <err, delta>, <err, err> (delta = w - b, err = w - written),
 * in eight float lanes over runs of LT_RUN elements, each run added to the double totals. */
LT_INLINE void kept_row(const float *restrict w, const float *restrict b, const float *restrict written, int64_t n,
                        double total[3]) {
    for (int64_t j0 = 0; j0 < n; j0 += LT_RUN) {
        int64_t m = n - j0 < LT_RUN ? n - j0 : LT_RUN, full = m & ~(int64_t)7;
        float acc[3][8] = {{0.0f}};
        for (int64_t j = j0; j < j0 + full; j += 8) {
            for (int l = 0; l < 8; l++) {
                float delta = w[j + l] - b[j + l], err = w[j + l] - written[j + l];
                acc[0][l] += delta * delta;
                acc[1][l] += err * delta;
                acc[2][l] += err * err;
            }
        }
        for (int64_t j = j0 + full; j < j0 + m; j++) {
            float delta = w[j] - b[j], err = w[j] - written[j];
            acc[0][0] += delta * delta;
            acc[1][0] += err * delta;
            acc[2][0] += err * err;
        }
        for (int t = 0; t < 3; t++)
            for (int l = 0; l < 8; l++) total[t] += acc[t][l];
    }
}

/* v in x[0..n): a group's scale or zero point for each of its elements. */
LT_INLINE void fill(float *restrict x, int64_t n, float v) {
    for (int64_t j = 0; j < n; j++) x[j] = v;
}

/* A group's range: the largest magnitude's bits and the least and greatest values' order keys
 * (in integers: lanes, and no NaN to order); top >= 0x7F800000 where one is not finite. */
LT_INLINE void group_range(const float *restrict w, int64_t n, uint32_t *top, int32_t *lo, int32_t *hi) {
    uint32_t t = 0;
    int32_t l = INT32_MAX, h = INT32_MIN;
    for (int64_t j = 0; j < n; j++) {
        uint32_t bits = bits_of(w[j]), a = bits & 0x7FFFFFFFu;
        int32_t o = order_key(bits);
        t = a > t ? a : t;
        l = o < l ? o : l;
        h = o > h ? o : h;
    }
    *top = t, *lo = l, *hi = h;
}

/* The decode pass: out = the codes of rows decoded (packed.dequantize); NONFINITE where an NVFP4
 * scale is a NaN code. */
LT_INLINE int32_t decode_rows(const Spec *sp, const uint8_t *codes, const void *scale, const int32_t *zero,
                              int64_t rows, float *out) {
    NvTables nv;
    if (sp->fmt == LT_NVFP4) nv_tables(sp, &nv);
    Row r;
    if (!row_alloc(&r, sp->cols)) return LT_NOMEM;
    int32_t answer = LT_OK;
    for (int64_t i = 0; i < rows && answer == LT_OK; i++) {
        unpack_row(sp, codes + i * sp->row_bytes, r.nib);
        for (int64_t g = 0; g < sp->groups; g++) {
            int64_t k = i * sp->groups + g, j0 = g * sp->group;
            int64_t n = (j0 + sp->group < sp->cols ? j0 + sp->group : sp->cols) - j0;
            if (sp->fmt == LT_NVFP4 && (((const uint8_t *)scale)[k] & 0x7Fu) == 0x7Fu) answer = LT_NONFINITE;
            fill(r.s_old + j0, n, group_scale(sp, &nv, scale, k));
            if (zero) fill(r.z_old + j0, n, (float)zero[k]);
        }
        if (zero)
            values_row(sp, r.nib, r.s_old, r.z_old, 1, out + i * sp->cols);
        else
            values_row(sp, r.nib, r.s_old, r.z_old, 0, out + i * sp->cols);
    }
    row_free(&r);
    return answer;
}

/* merged = base + delta, element by element (torch's before + delta); whether every sum is finite. */
LT_INLINE int add_row(const float *restrict b, const float *restrict d, int64_t n, float *restrict m) {
    uint32_t top = 0;
    for (int64_t j = 0; j < n; j++) {
        m[j] = b[j] + d[j];
        uint32_t a = bits_of(m[j]) & 0x7FFFFFFFu;
        top = a > top ? a : top;
    }
    return top < 0x7F800000u;
}

/* The encode pass: rows row0.. of a weight, base + delta (float32, rows x cols), requantized into
 * codes_out and scale_out (zero_out) with the base's codes, scales and zero points kept where they
 * fit (packed.requantize with keep_scales), nearest or stochastically with the stream `key`; adds
 * <delta, delta>, <err, delta>, <err, err> to sums (delta = merged - base, err = merged - written).
 * Returns LT_FRESH where an NVFP4 block needs a scale past e4m3's under the tensor scale,
 * LT_NONFINITE where a merged value is not finite or an NVFP4 scale a NaN code (the outputs are then
 * incomplete), LT_NOMEM. */
LT_INLINE int32_t encode_rows(const Spec *sp, const float *delta, int64_t rows, int64_t row0,
                              const uint8_t *codes_in, const void *scale_in, const int32_t *zero_in,
                              uint8_t *codes_out, void *scale_out, int32_t *zero_out, int32_t keep,
                              int32_t stochastic, uint32_t key, double *sums) {
    const int32_t off = sp->fmt == LT_INT ? 1 << (sp->bits - 1) : 0;
    const int has_zero = zero_in != 0;
    int fresh = 0;
    int32_t answer = LT_OK;
    double total[3] = {0.0, 0.0, 0.0};
    NvTables nv;
    if (sp->fmt == LT_NVFP4) nv_tables(sp, &nv);
    Row r;
    if (!row_alloc(&r, sp->cols)) return LT_NOMEM;
    for (int64_t i = 0; i < rows && answer == LT_OK; i++) {
        const float *w = r.merged;
        uint32_t row_hash = mix32((uint32_t)(row0 + i) ^ key);
        for (int64_t g = 0; g < sp->groups; g++) { /* the base's scales, for its values */
            int64_t k = i * sp->groups + g, j0 = g * sp->group;
            int64_t n = (j0 + sp->group < sp->cols ? j0 + sp->group : sp->cols) - j0;
            if (sp->fmt == LT_NVFP4 && (((const uint8_t *)scale_in)[k] & 0x7Fu) == 0x7Fu) answer = LT_NONFINITE;
            fill(r.s_old + j0, n, group_scale(sp, &nv, scale_in, k));
            if (has_zero) fill(r.z_old + j0, n, (float)zero_in[k]);
        }
        unpack_row(sp, codes_in + i * sp->row_bytes, r.nib);
        if (has_zero)
            values_row(sp, r.nib, r.s_old, r.z_old, 1, r.base);
        else
            values_row(sp, r.nib, r.s_old, r.z_old, 0, r.base);
        if (!add_row(r.base, delta + i * sp->cols, sp->cols, r.merged)) answer = LT_NONFINITE;
        if (answer != LT_OK) break;
        for (int64_t g = 0; g < sp->groups; g++) { /* each group's range, and its scale kept or anew */
            int64_t k = i * sp->groups + g, j0 = g * sp->group;
            int64_t n = (j0 + sp->group < sp->cols ? j0 + sp->group : sp->cols) - j0;
            uint32_t top;
            int32_t lo, hi;
            if (n == 16) /* NVFP4's groups, MXFP4's: constant trip counts, whole vectors */
                group_range(w + j0, 16, &top, &lo, &hi);
            else if (n == 32)
                group_range(w + j0, 32, &top, &lo, &hi);
            else
                group_range(w + j0, n, &top, &lo, &hi);
            float z = has_zero ? r.z_old[j0] : 0.0f;
            float s = new_scale(sp, &nv, k, float_of(top), key_float(lo), key_float(hi), scale_in, zero_in, scale_out,
                                zero_out, keep, &z, &fresh);
            fill(r.s + j0, n, s);
            if (has_zero) fill(r.z + j0, n, z);
        }
        if (sp->fmt != LT_INT) {
            if (stochastic)
                e2m1_row(w, sp->cols, r.s, 1, row_hash, r.code, r.written);
            else
                e2m1_row(w, sp->cols, r.s, 0, row_hash, r.code, r.written);
        } else if (has_zero) {
            if (stochastic)
                int_row(w, sp->cols, r.s, r.z, 1, off, 1, row_hash, r.code, r.written);
            else
                int_row(w, sp->cols, r.s, r.z, 1, off, 0, row_hash, r.code, r.written);
        } else if (stochastic) {
            int_row(w, sp->cols, r.s, r.z, 0, off, 1, row_hash, r.code, r.written);
        } else {
            int_row(w, sp->cols, r.s, r.z, 0, off, 0, row_hash, r.code, r.written);
        }
        kept_row(w, r.base, r.written, sp->cols, total);
        pack_row(sp, r.code, codes_out + i * sp->row_bytes);
    }
    row_free(&r);
    for (int t = 0; t < 3; t++) sums[t] += total[t];
    return answer != LT_OK ? answer : fresh ? LT_FRESH : LT_OK;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* The same two passes compiled for AVX2 (eight lanes; the rounding is IEEE's either way: the same bytes). */
__attribute__((target("avx2"))) static int32_t decode_rows_avx2(const Spec *sp, const uint8_t *codes,
                                                                const void *scale, const int32_t *zero, int64_t rows,
                                                                float *out) {
    return decode_rows(sp, codes, scale, zero, rows, out);
}

__attribute__((target("avx2"))) static int32_t encode_rows_avx2(
    const Spec *sp, const float *delta, int64_t rows, int64_t row0, const uint8_t *codes_in, const void *scale_in,
    const int32_t *zero_in, uint8_t *codes_out, void *scale_out, int32_t *zero_out, int32_t keep,
    int32_t stochastic, uint32_t key, double *sums) {
    return encode_rows(sp, delta, rows, row0, codes_in, scale_in, zero_in, codes_out, scale_out, zero_out, keep,
                       stochastic, key, sums);
}
#define LT_LOWBIT_AVX2 1
#endif

/* out = the codes of `rows` rows decoded; LT_NONFINITE where an NVFP4 scale is a NaN code, LT_NOMEM. */
LT_EXPORT int32_t lt_lowbit_decode(const Spec *sp, const uint8_t *codes, const void *scale, const int32_t *zero,
                                   int64_t rows, float *out) {
#ifdef LT_LOWBIT_AVX2
    if (lt_simd_usable()) return decode_rows_avx2(sp, codes, scale, zero, rows, out);
#endif
    return decode_rows(sp, codes, scale, zero, rows, out);
}

/* See encode_rows; also LT_NOMEM. */
LT_EXPORT int32_t lt_lowbit_encode(const Spec *sp, const float *delta, int64_t rows, int64_t row0,
                                   const uint8_t *codes_in, const void *scale_in, const int32_t *zero_in,
                                   uint8_t *codes_out, void *scale_out, int32_t *zero_out, int32_t keep,
                                   int32_t stochastic, uint32_t key, double *sums) {
#ifdef LT_LOWBIT_AVX2
    if (lt_simd_usable())
        return encode_rows_avx2(sp, delta, rows, row0, codes_in, scale_in, zero_in, codes_out, scale_out, zero_out,
                                keep, stochastic, key, sums);
#endif
    return encode_rows(sp, delta, rows, row0, codes_in, scale_in, zero_in, codes_out, scale_out, zero_out, keep,
                       stochastic, key, sums);
}
