/*
 * Packed low-bit merge kernels: MXFP4 and NVFP4 (E2M1 codes, two a byte) and compressed-tensors'
 * pack-quantized integers (4 or 8 bits, consecutive groups), rows at a time. Decode a weight's
 * codes to float32 (packed.dequantize); requantize base + delta, the delta formed here from the
 * terms' factors (left @ right, each element's products added in order: packed.LowRank), keeping
 * the base's scales wherever a group still fits them, nearest or stochastically, adding the kept
 * sums: the work of a matrix product and of packed.requantize's some thirty elementwise passes in
 * one pass over each chunk of a row, its arrays in the first-level cache (the chunks of columns
 * outermost, so that the factors' rows of a chunk serve every row of a strip while in the cache).
 * The same bytes as those torch passes (tests/test_native.py); the kept sums in another order.
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

#define LT_INLINE static inline __attribute__((always_inline))

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
LT_INLINE float new_scale(const Spec *sp, const NvTables *nv, int64_t k, float amax, float lo, float hi,
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

/* The draw of element j of a row (rounding.uniforms). */
LT_INLINE float draw(uint32_t row_hash, uint32_t j) {
    return (float)(int32_t)(mix32(row_hash ^ j) >> 8) * 0x1p-24f;
}

/* The decode pass works a row at a time in arrays of its length (the codes unpacked, each element's
 * scale and zero point), so that its element loop is one long branch-free loop the compiler vectorizes. */
typedef struct {
    uint8_t *nib;
    float *s_old, *z_old;
} Row;

static void row_free(Row *r) {
    free(r->nib);
    free(r->s_old);
}

static int row_alloc(Row *r, int64_t cols) {
    size_t n = (size_t)cols + 8;
    r->nib = malloc(n);
    r->s_old = malloc(2 * n * sizeof(float));
    if (!r->nib || !r->s_old) {
        row_free(r);
        return 0;
    }
    r->z_old = r->s_old + n;
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

/* Codes j0..j0 + n of a row (j0 even) unpacked to 32-bit codes (the encode pass's element loops then
 * hold one type: whole vectors). */
LT_INLINE void unpack_run32(const Spec *sp, const uint8_t *restrict row, int64_t j0, int64_t n,
                            uint32_t *restrict nib) {
    if (sp->fmt == LT_INT && sp->bits == 8) {
        for (int64_t j = 0; j < n; j++) nib[j] = row[j0 + j];
        return;
    }
    const uint8_t *restrict from = row + j0 / 2;
    for (int64_t k = 0; k < (n + 1) / 2; k++) {
        nib[2 * k] = from[k] & 0xFu;
        nib[2 * k + 1] = (uint32_t)from[k] >> 4;
    }
}

/* 32-bit codes of a row's columns j0..j0 + n (j0 even) packed back into it (two 4-bit codes a byte, the
 * first low); where the run ends the row, its padding zeroed. */
LT_INLINE void pack_run32(const Spec *sp, const uint32_t *restrict code, int64_t j0, int64_t n,
                          uint8_t *restrict row) {
    const int wide = sp->fmt == LT_INT && sp->bits == 8;
    if (wide) {
        for (int64_t j = 0; j < n; j++) row[j0 + j] = (uint8_t)code[j];
    } else {
        uint8_t *restrict to = row + j0 / 2;
        for (int64_t k = 0; k < n / 2; k++) to[k] = (uint8_t)(code[2 * k] | (code[2 * k + 1] << 4));
        if (n & 1) to[n / 2] = (uint8_t)code[n - 1];
    }
    if (j0 + n == sp->cols) {
        const int64_t used = wide ? sp->cols : (sp->cols + 1) / 2;
        memset(row + used, 0, (size_t)(sp->row_bytes - used));
    }
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

/* The kept sums of n values, <delta, delta>, <err, delta>, <err, err> (delta = w - b, err = w -
 * written), in sixteen float lanes over runs of LT_RUN elements, each run's lanes added to the
 * double totals. */
LT_INLINE void kept_row(const float *restrict w, const float *restrict b, const float *restrict written, int64_t n,
                        double total[3]) {
    for (int64_t j0 = 0; j0 < n; j0 += LT_RUN) {
        const int64_t m = n - j0 < LT_RUN ? n - j0 : LT_RUN, full = m & ~(int64_t)15;
        float dd[16] = {0.0f}, ed[16] = {0.0f}, ee[16] = {0.0f};
        for (int64_t j = j0; j < j0 + full; j += 16) {
            for (int l = 0; l < 16; l++) {
                const float delta = w[j + l] - b[j + l], err = w[j + l] - written[j + l];
                dd[l] = dd[l] + delta * delta;
                ed[l] = ed[l] + err * delta;
                ee[l] = ee[l] + err * err;
            }
        }
        for (int64_t j = j0 + full; j < j0 + m; j++) {
            const float delta = w[j] - b[j], err = w[j] - written[j];
            dd[0] = dd[0] + delta * delta;
            ed[0] = ed[0] + err * delta;
            ee[0] = ee[0] + err * err;
        }
        double s0 = 0.0, s1 = 0.0, s2 = 0.0;
        for (int l = 0; l < 16; l++) s0 += dd[l], s1 += ed[l], s2 += ee[l];
        total[0] += s0, total[1] += s1, total[2] += s2;
    }
}

/* v in x[0..n): a group's scale or zero point for each of its elements. */
LT_INLINE void fill(float *restrict x, int64_t n, float v) {
    for (int64_t j = 0; j < n; j++) x[j] = v;
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

/* ---- the encode pass ------------------------------------------------------------------------- */

/* A row goes through in chunks of whole groups, about LT_CHUNK values, whose float arrays (the
 * delta, the base's values, the merged values, those written) stay in the first-level cache; each
 * group's work is done with its scale as a scalar, in loops of the group's length (16, 32 and 128
 * compiled for their constant trip counts). */
enum { LT_CHUNK = 512 };

/* d[0..n) = the terms' delta at columns j0.. of one row: the sum over t of lrow[t] * right[t][j],
 * each product rounded and added in order of t from zero (packed.LowRank.delta's order: the same
 * bytes). Blocks of 64 columns keep their sums in registers across the terms (the term loop kept
 * rolled: unrolled, GCC spills the sums). */
LT_INLINE void delta_run(const float *restrict lrow, const float *restrict right, int64_t k, int64_t cols,
                         int64_t j0, int64_t n, float *restrict d) {
    int64_t j = 0;
    for (; j + 64 <= n; j += 64) {
        float acc[64];
        for (int u = 0; u < 64; u++) acc[u] = 0.0f;
#pragma GCC unroll 1
        for (int64_t t = 0; t < k; t++) {
            const float l = lrow[t];
            const float *restrict r = right + t * cols + j0 + j;
            for (int u = 0; u < 64; u++) acc[u] = acc[u] + l * r[u];
        }
        for (int u = 0; u < 64; u++) d[j + u] = acc[u];
    }
    for (; j < n; j++) {
        float acc = 0.0f;
        for (int64_t t = 0; t < k; t++) acc = acc + lrow[t] * right[t * cols + j0 + j];
        d[j] = acc;
    }
}

enum { LT_ROWS_AT_ONCE = 4 }; /* rows whose deltas are formed together: each load of `right` serves four */

/* The factors of LT_ROWS_AT_ONCE consecutive rows (lrows: theirs, k apart) interleaved term by term into
 * lt (lt[4 t + r] = row r's factor of term t), so that the product loop holds one pointer for them. */
LT_INLINE void interleave4(const float *restrict lrows, int64_t k, float *restrict lt) {
    for (int64_t t = 0; t < k; t++)
        for (int r = 0; r < LT_ROWS_AT_ONCE; r++) lt[LT_ROWS_AT_ONCE * t + r] = lrows[r * k + t];
}

/* Floats as one value, in the registers the target has (GCC's and Clang's vector extensions), moved
 * from and to any float's address by memcpy: sixteen for AVX-512, eight for AVX2. */
typedef float lt_v16 __attribute__((vector_size(64)));
typedef float lt_v8 __attribute__((vector_size(32)));

/* delta_block's columns j.. in blocks of two vectors V (LANES floats each) a row, 4 rows x 2 vectors
 * of sums held in registers across the terms (arrays of floats are not: GCC keeps them on the
 * stack); returns the column it reached. */
#define LT_DELTA_VECTORS(NAME, V, LANES)                                                                        \
    LT_INLINE int64_t NAME(const float *restrict lt, const float *restrict right, int64_t k, int64_t cols,     \
                           int64_t j0, int64_t j, int64_t n, float *restrict d, int64_t ds) {                  \
        for (; j + 2 * (LANES) <= n; j += 2 * (LANES)) {                                                        \
            V a[LT_ROWS_AT_ONCE][2];                                                                            \
            for (int r = 0; r < LT_ROWS_AT_ONCE; r++) a[r][0] = a[r][1] = (V){0};                              \
            _Pragma("GCC unroll 1") for (int64_t t = 0; t < k; t++) {                                          \
                V x[2];                                                                                         \
                memcpy(&x[0], right + t * cols + j0 + j, sizeof x[0]);                                          \
                memcpy(&x[1], right + t * cols + j0 + j + (LANES), sizeof x[1]);                                \
                for (int r = 0; r < LT_ROWS_AT_ONCE; r++) {                                                     \
                    const float l = lt[LT_ROWS_AT_ONCE * t + r];                                                \
                    a[r][0] = a[r][0] + l * x[0];                                                               \
                    a[r][1] = a[r][1] + l * x[1];                                                               \
                }                                                                                               \
            }                                                                                                   \
            for (int r = 0; r < LT_ROWS_AT_ONCE; r++) {                                                         \
                memcpy(d + r * ds + j, &a[r][0], sizeof a[r][0]);                                               \
                memcpy(d + r * ds + j + (LANES), &a[r][1], sizeof a[r][1]);                                     \
            }                                                                                                   \
        }                                                                                                       \
        return j;                                                                                               \
    }
LT_DELTA_VECTORS(delta_vectors16, lt_v16, 16)
LT_DELTA_VECTORS(delta_vectors8, lt_v8, 8)
#undef LT_DELTA_VECTORS

/* delta_run for LT_ROWS_AT_ONCE consecutive rows (their factors interleaved in lt, as interleave4
 * writes them; their deltas d, ds apart), the four rows sharing each load of right: in vectors of
 * `lanes` floats (16, 8: constant in each compiled variant), or 0: sixteen columns at a time in
 * arrays the compiler vectorizes. The same sums, in the same order, as delta_run. */
LT_INLINE void delta_block(const float *restrict lt, const float *restrict right, int64_t k, int64_t cols,
                           int64_t j0, int64_t n, float *restrict d, int64_t ds, const int lanes) {
    int64_t j = lanes == 16 ? delta_vectors16(lt, right, k, cols, j0, 0, n, d, ds)
                : lanes == 8 ? delta_vectors8(lt, right, k, cols, j0, 0, n, d, ds)
                             : 0;
    for (; j + 16 <= n; j += 16) {
        float a0[16], a1[16], a2[16], a3[16];
        for (int u = 0; u < 16; u++) a0[u] = a1[u] = a2[u] = a3[u] = 0.0f;
#pragma GCC unroll 1
        for (int64_t t = 0; t < k; t++) {
            const float *restrict r = right + t * cols + j0 + j;
            const float *l = lt + LT_ROWS_AT_ONCE * t;
            const float l0 = l[0], l1 = l[1], l2 = l[2], l3 = l[3];
            for (int u = 0; u < 16; u++) {
                a0[u] = a0[u] + l0 * r[u];
                a1[u] = a1[u] + l1 * r[u];
                a2[u] = a2[u] + l2 * r[u];
                a3[u] = a3[u] + l3 * r[u];
            }
        }
        for (int u = 0; u < 16; u++) {
            d[j + u] = a0[u];
            d[ds + j + u] = a1[u];
            d[2 * ds + j + u] = a2[u];
            d[3 * ds + j + u] = a3[u];
        }
    }
    for (; j < n; j++) {
        float a[LT_ROWS_AT_ONCE] = {0.0f};
        for (int64_t t = 0; t < k; t++) {
            const float x = right[t * cols + j0 + j];
            for (int r = 0; r < LT_ROWS_AT_ONCE; r++) a[r] = a[r] + lt[LT_ROWS_AT_ONCE * t + r] * x;
        }
        for (int r = 0; r < LT_ROWS_AT_ONCE; r++) d[r * ds + j] = a[r];
    }
}

/* The deltas of `nrows` (<= LT_ROWS_AT_ONCE) consecutive rows (delta_block where there are four, with
 * their factors interleaved in lt; else delta_run, from lrows). */
LT_INLINE void delta_rows_at(const float *restrict lrows, const float *restrict lt, int64_t nrows,
                             const float *restrict right, int64_t k, int64_t cols, int64_t j0, int64_t n,
                             float *restrict d, int64_t ds, const int lanes) {
    if (nrows == LT_ROWS_AT_ONCE)
        delta_block(lt, right, k, cols, j0, n, d, ds, lanes);
    else
        for (int64_t i = 0; i < nrows; i++) delta_run(lrows + i * k, right, k, cols, j0, n, d + i * ds);
}

/* A group's base values b = its codes under the scale s_old (and zero point z_old: values_row's
 * arithmetic), the merged values m = b + d, and their range: the largest magnitude's bits (top >=
 * 0x7F800000 where one is not finite) and, for the integers, the least and greatest values' order keys. */
LT_INLINE uint32_t merge_group(int is_int, const uint32_t *restrict nib, const float *restrict d, int64_t n,
                               float s_old, float z_old, int has_zero, int32_t off, float *restrict b,
                               float *restrict m, int32_t *lo, int32_t *hi) {
    uint32_t top = 0;
    int32_t l = INT32_MAX, h = INT32_MIN;
    for (int64_t j = 0; j < n; j++) {
        float v;
        if (is_int) {
            float q = (float)((int32_t)nib[j] - off);
            v = (has_zero ? q - z_old : q) * s_old;
        } else {
            uint32_t c = nib[j], mi = c & 7u;
            float mag = mi < 2u ? (float)(int32_t)mi * 0.5f : float_of((((mi >> 1) + 126u) << 23) | ((mi & 1u) << 22));
            v = float_of(bits_of(mag) | ((c & 8u) << 28)) * s_old;
        }
        b[j] = v;
        float x = v + d[j];
        m[j] = x;
        uint32_t bits = bits_of(x), a = bits & 0x7FFFFFFFu;
        top = a > top ? a : top;
        if (is_int) {
            int32_t o = order_key(bits);
            l = o < l ? o : l;
            h = o > h ? o : h;
        }
    }
    *lo = l, *hi = h;
    return top;
}

/* A group's merged values m under its new scale s (> 0 for the integers; zero point z): codes and
 * the values written (into w). E2M1 (rounding.round_to_grid with rounding.E2M1): |m / s| clamped to
 * 6, its spacing 2^(field - 128) (0.5 below 2: a power of two, so y = a / spacing is a product and
 * exact), rounded; 0 where the scale is 0 (torch.where(scales > 0, codes, 0)). The code's index from
 * the value's bits: 0.5 is 1, from 1 on (bits >> 22) - 252 (1 -> 2, 1.5 -> 3, ... 6 -> 7). The
 * integers: round(m / s + z) clamped to the grid. Nearest, or against the draws of the row's
 * elements jg.. */
LT_INLINE void code_group(int is_int, const float *restrict m, int64_t n, float s, float z, int has_zero,
                          int32_t off, int stochastic, uint32_t row_hash, uint32_t jg, uint32_t *restrict code,
                          float *restrict w) {
    if (is_int) {
        const float glo = -(float)off, ghi = (float)(off - 1);
        for (int64_t j = 0; j < n; j++) {
            float x = has_zero ? m[j] / s + z : m[j] / s, q;
            if (stochastic) {
                float below = floorf(x);
                q = below + (draw(row_hash, jg + (uint32_t)j) < x - below ? 1.0f : 0.0f);
            } else {
                q = rintf(x);
            }
            q = glo > q ? glo : q; /* clamped in two steps, each one vmaxps / vminps (q is finite) */
            q = ghi < q ? ghi : q;
            w[j] = (has_zero ? q - z : q) * s;
            code[j] = (uint32_t)((int32_t)q + off);
        }
        return;
    }
    const uint32_t live = s > 0.0f ? 0xFFFFFFFFu : 0u;
    const float safe = s > 0.0f ? s : 1.0f;
    for (int64_t j = 0; j < n; j++) {
        float x = m[j] / safe, a = fabsf(x);
        a = a < 6.0f ? a : 6.0f;
        uint32_t field = bits_of(a) >> 23;
        field = field > 127u ? field : 127u;
        float spacing = float_of((field - 1u) << 23), y = a * float_of((255u - field) << 23), r;
        if (stochastic) {
            float below = floorf(y);
            r = below + (draw(row_hash, jg + (uint32_t)j) < y - below ? 1.0f : 0.0f);
        } else {
            r = rintf(y);
        }
        uint32_t mb = bits_of(r * spacing) & live;
        uint32_t neg = (bits_of(x) >> 31) & live & 1u;
        int32_t idx = mb >= 0x3F800000u ? (int32_t)(mb >> 22) - 252 : (int32_t)(mb != 0u);
        w[j] = float_of(mb | (neg << 31)) * s;
        code[j] = (uint32_t)idx | (neg << 3);
    }
}

/* One group (scale k, n values from column jg of row i): merged, its scale kept or anew
 * (new_scale), coded. LT_NONFINITE where a merged value is not finite or an NVFP4 scale is a NaN code. */
LT_INLINE int32_t encode_group(const Spec *sp, const NvTables *nv, int64_t k, int64_t n, uint32_t jg,
                               const uint32_t *nib, const float *d, float *b, float *m, float *w, uint32_t *code,
                               const void *scale_in, const int32_t *zero_in, void *scale_out, int32_t *zero_out,
                               int32_t keep, int is_int, int stochastic, int has_zero, uint32_t row_hash, int *fresh) {
    const int32_t off = is_int ? 1 << (sp->bits - 1) : 0;
    if (!is_int && sp->fmt == LT_NVFP4 && (((const uint8_t *)scale_in)[k] & 0x7Fu) == 0x7Fu) return LT_NONFINITE;
    float z = has_zero ? (float)zero_in[k] : 0.0f;
    int32_t lo, hi;
    uint32_t top = merge_group(is_int, nib, d, n, group_scale(sp, nv, scale_in, k), z, has_zero, off, b, m, &lo, &hi);
    if (top >= 0x7F800000u) return LT_NONFINITE;
    float s = new_scale(sp, nv, k, float_of(top), key_float(lo), key_float(hi), scale_in, zero_in, scale_out, zero_out,
                        keep, &z, fresh);
    code_group(is_int, m, n, s, z, has_zero, off, stochastic, row_hash, jg, code, w);
    return LT_OK;
}

/* The groups of one chunk (groups g0..g1 of row i; nib, d, code from the chunk's first column on), the
 * common lengths compiled apart. */
LT_INLINE int32_t encode_chunk(const Spec *sp, const NvTables *nv, int64_t i, int64_t g0, int64_t g1,
                               const uint32_t *nib, const float *d, float *b, float *m, float *w, uint32_t *code,
                               const void *scale_in, const int32_t *zero_in, void *scale_out, int32_t *zero_out,
                               int32_t keep, int is_int, int stochastic, int has_zero, uint32_t row_hash,
                               int *fresh) {
    const int64_t base = g0 * sp->group;
    for (int64_t g = g0; g < g1; g++) {
        const int64_t j0 = g * sp->group, n = (j0 + sp->group < sp->cols ? j0 + sp->group : sp->cols) - j0;
        const int64_t k = i * sp->groups + g, c = j0 - base;
#define LT_GROUP(N)                                                                                              \
    encode_group(sp, nv, k, N, (uint32_t)j0, nib + c, d + c, b + c, m + c, w + c, code + c, scale_in, zero_in, \
                 scale_out, zero_out, keep, is_int, stochastic, has_zero, row_hash, fresh)
        int32_t answer = n == 16 ? LT_GROUP(16) : n == 32 ? LT_GROUP(32) : n == 128 ? LT_GROUP(128) : LT_GROUP(n);
#undef LT_GROUP
        if (answer != LT_OK) return answer;
    }
    return LT_OK;
}

/* ---- the encode pass fused, for AVX-512 ------------------------------------------------------ */

/* Where every group of a chunk is whole and 16, 32, 64 or 128 long (4-bit codes), each group goes
 * through in vector registers from its codes to its written codes: decoded, merged with the delta,
 * its range reduced, its scale chosen (new_scale, as a scalar), coded, its kept sums added and its
 * codes packed, without the arrays of the pass above or its separate passes over them. The same
 * operations on each element, in the same order, as encode_group and pack_run32 (one element a lane),
 * so the same bytes; the kept sums in kept_row's sixteen lanes over runs of LT_RUN from the chunk's
 * start, each term added by a fused multiply-add (one rounding, not two: the sums are reported
 * figures, not bytes the torch passes must reproduce). */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LT_FUSED 1
#if defined(__clang__) || __GNUC__ < 8
#define LT_FUSED_TARGET __attribute__((target("avx2,avx512f,avx512bw,avx512dq,avx512vl"), noinline))
#else
#define LT_FUSED_TARGET \
    __attribute__((target("avx2,avx512f,avx512bw,avx512dq,avx512vl,prefer-vector-width=512"), noinline))
#endif
#define LT_FUSED_INLINE \
    static inline __attribute__((always_inline, target("avx2,avx512f,avx512bw,avx512dq,avx512vl")))

/* The E2M1 value of each code 0..15 (values_row's arithmetic, -0 for code 8), for a permute. */
static const float E2M1_VALUES[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                      -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* Sixteen 4-bit codes (8 bytes, element j in the low nibble of byte j / 2 for even j) as int32 lanes. */
LT_FUSED_INLINE __m512i fused_unpack(const uint8_t *p) {
    const __m128i x = _mm_loadl_epi64((const __m128i *)p), low = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(x, low), hi = _mm_and_si128(_mm_srli_epi16(x, 4), low);
    return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
}

/* Sixteen codes 0..15 in int32 lanes packed back into 8 bytes (pack_run32's layout): each 64-bit lane's
 * odd code shifted beside its even one, the lanes' low bytes kept. */
LT_FUSED_INLINE void fused_pack(__m512i code, uint8_t *p) {
    _mm_storel_epi64((__m128i *)p, _mm512_cvtepi64_epi8(_mm512_or_si512(code, _mm512_srli_epi64(code, 28))));
}

/* draw() of the sixteen elements from column j of a row. */
LT_FUSED_INLINE __m512 fused_draws(uint32_t row_hash, uint32_t j) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i col = _mm512_add_epi32(_mm512_set1_epi32((int32_t)j), lane);
    __m512i x = _mm512_xor_si512(_mm512_set1_epi32((int32_t)row_hash), col);
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int32_t)0x21F0AAADu));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int32_t)0x735A2D97u));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(x, 8)), _mm512_set1_ps(0x1p-24f));
}

/* x rounded to an integer: nearest (ties to even, as rintf), or stochastically against the draws u
 * (floorf(x) plus 1 where u < x - floorf(x), else plus 0: code_group's arithmetic, signed zeros included). */
LT_FUSED_INLINE __m512 fused_round(__m512 x, int stochastic, uint32_t row_hash, uint32_t j) {
    if (!stochastic) return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 below = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __mmask16 up = _mm512_cmp_ps_mask(fused_draws(row_hash, j), _mm512_sub_ps(x, below), _CMP_LT_OQ);
    return _mm512_add_ps(below, _mm512_maskz_mov_ps(up, _mm512_set1_ps(1.0f)));
}

/* Sixteen merged values m on E2M1's grid under the scale s (safe: s where s > 0, else 1; live: all ones
 * where s > 0, else 0), nearest or against the draws from column j: code_group's arithmetic. Returns
 * the codes; the values written into *w. */
LT_FUSED_INLINE __m512i fused_e2m1(__m512 m, __m512 s, __m512 safe, __m512i live, int stochastic, uint32_t row_hash,
                                   uint32_t j, __m512 *w) {
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
    const __m512 x = _mm512_div_ps(m, safe);
    const __m512 a = _mm512_min_ps(_mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), magnitude)),
                                   _mm512_set1_ps(6.0f));
    const __m512i field = _mm512_max_epu32(_mm512_srli_epi32(_mm512_castps_si512(a), 23), _mm512_set1_epi32(127));
    const __m512 spacing = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(field, _mm512_set1_epi32(1)), 23));
    const __m512 y =
        _mm512_mul_ps(a, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(_mm512_set1_epi32(255), field), 23)));
    const __m512 r = fused_round(y, stochastic, row_hash, j);
    const __m512i mb = _mm512_and_si512(_mm512_castps_si512(_mm512_mul_ps(r, spacing)), live);
    const __m512i neg =
        _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(x), 31), _mm512_and_si512(live, _mm512_set1_epi32(1)));
    const __mmask16 normal = _mm512_cmpge_epu32_mask(mb, _mm512_set1_epi32(0x3F800000));
    const __m512i small = _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(mb, mb), _mm512_set1_epi32(1));
    const __m512i idx = _mm512_mask_sub_epi32(small, normal, _mm512_srli_epi32(mb, 22), _mm512_set1_epi32(252));
    *w = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(mb, _mm512_slli_epi32(neg, 31))), s);
    return _mm512_or_si512(idx, _mm512_slli_epi32(neg, 3));
}

/* kept_row's sums of sixteen values (merged m, base b, written w) added into its lanes dd, ed, ee, by
 * fused multiply-adds. */
LT_FUSED_INLINE void fused_kept(__m512 m, __m512 b, __m512 w, __m512 *dd, __m512 *ed, __m512 *ee) {
    const __m512 delta = _mm512_sub_ps(m, b), err = _mm512_sub_ps(m, w);
    *dd = _mm512_fmadd_ps(delta, delta, *dd);
    *ed = _mm512_fmadd_ps(err, delta, *ed);
    *ee = _mm512_fmadd_ps(err, err, *ee);
}

/* One whole group of NV vectors (scale k, from column jg; its codes at `in`, its delta d): encode_group,
 * then kept_row's sums into dd, ed, ee and pack_run32's bytes at `out`. */
LT_FUSED_INLINE int32_t fused_group(const Spec *sp, const NvTables *nv, int64_t k, uint32_t jg, const uint8_t *in,
                                    const float *d, uint8_t *out, const void *scale_in, const int32_t *zero_in,
                                    void *scale_out, int32_t *zero_out, int32_t keep, uint32_t row_hash, int *fresh,
                                    __m512 *dd, __m512 *ed, __m512 *ee, const int NV, const int is_int,
                                    const int stochastic, const int has_zero) {
    const int32_t off = is_int ? 1 << (sp->bits - 1) : 0;
    if (!is_int && sp->fmt == LT_NVFP4 && (((const uint8_t *)scale_in)[k] & 0x7Fu) == 0x7Fu) return LT_NONFINITE;
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
    const float s_old = group_scale(sp, nv, scale_in, k);
    float z = has_zero ? (float)zero_in[k] : 0.0f;
    __m512 b[8], m[8];
    __m512i top = _mm512_setzero_si512();
    __m512 lo = _mm512_set1_ps(INFINITY), hi = _mm512_set1_ps(-INFINITY);
    for (int v = 0; v < NV; v++) {
        const __m512i c = fused_unpack(in + 8 * v);
        if (is_int) {
            const __m512 q = _mm512_cvtepi32_ps(_mm512_sub_epi32(c, _mm512_set1_epi32(off)));
            b[v] = _mm512_mul_ps(has_zero ? _mm512_sub_ps(q, _mm512_set1_ps(z)) : q, _mm512_set1_ps(s_old));
        } else {
            b[v] = _mm512_mul_ps(_mm512_permutexvar_ps(c, _mm512_loadu_ps(E2M1_VALUES)), _mm512_set1_ps(s_old));
        }
        m[v] = _mm512_add_ps(b[v], _mm512_loadu_ps(d + 16 * v));
        const __m512i bits = _mm512_castps_si512(m[v]);
        top = _mm512_max_epu32(top, _mm512_and_si512(bits, magnitude));
        if (is_int) { /* the float least and greatest: -0 and +0 may come either way, which new_scale's
                       * comparisons and its max(-lo, 0) and max(hi, 0) do not tell apart (NaN: top refuses it) */
            lo = _mm512_min_ps(lo, m[v]);
            hi = _mm512_max_ps(hi, m[v]);
        }
    }
    const uint32_t t = _mm512_reduce_max_epu32(top);
    if (t >= 0x7F800000u) return LT_NONFINITE;
    const float l = is_int ? _mm512_reduce_min_ps(lo) : 0.0f, h = is_int ? _mm512_reduce_max_ps(hi) : 0.0f;
    const float s = new_scale(sp, nv, k, float_of(t), l, h, scale_in, zero_in, scale_out, zero_out, keep, &z, fresh);
    const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z);
    for (int v = 0; v < NV; v++) {
        const uint32_t j = jg + 16u * (uint32_t)v;
        __m512 w;
        __m512i code;
        if (is_int) {
            __m512 x = _mm512_div_ps(m[v], sv);
            if (has_zero) x = _mm512_add_ps(x, zv);
            __m512 q = fused_round(x, stochastic, row_hash, j);
            q = _mm512_max_ps(_mm512_set1_ps(-(float)off), q);
            q = _mm512_min_ps(_mm512_set1_ps((float)(off - 1)), q);
            w = _mm512_mul_ps(has_zero ? _mm512_sub_ps(q, zv) : q, sv);
            code = _mm512_add_epi32(_mm512_cvttps_epi32(q), _mm512_set1_epi32(off));
        } else {
            code = fused_e2m1(m[v], sv, _mm512_set1_ps(s > 0.0f ? s : 1.0f), _mm512_set1_epi32(s > 0.0f ? -1 : 0),
                              stochastic, row_hash, j, &w);
        }
        fused_kept(m[v], b[v], w, dd, ed, ee);
        fused_pack(code, out + 8 * v);
    }
    return LT_OK;
}

/* kept_row's close of a run: its lanes added in double, in lane order, to the totals; the lanes cleared. */
LT_FUSED_INLINE void fused_flush(__m512 *dd, __m512 *ed, __m512 *ee, double total[3]) {
    float a[3][16];
    _mm512_storeu_ps(a[0], *dd), _mm512_storeu_ps(a[1], *ed), _mm512_storeu_ps(a[2], *ee);
    double s0 = 0.0, s1 = 0.0, s2 = 0.0;
    for (int l = 0; l < 16; l++) s0 += a[0][l], s1 += a[1][l], s2 += a[2][l];
    total[0] += s0, total[1] += s1, total[2] += s2;
    *dd = *ed = *ee = _mm512_setzero_ps();
}

/* The largest of each of sixteen vectors' lanes (as unsigned integers), lane g of the answer from t[g]:
 * pairs of vectors halved into one, four times (shuffles and maxima, no horizontal reduction). */
LT_FUSED_INLINE __m512i fused_max16(const __m512i t[16]) {
    __m512i u[8], v[4], w[2];
    for (int g = 0; g < 8; g++) /* 128-bit lanes 0, 1: t[2g]'s halves' maxima; 2, 3: t[2g + 1]'s */
        u[g] = _mm512_max_epu32(_mm512_shuffle_i32x4(t[2 * g], t[2 * g + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                _mm512_shuffle_i32x4(t[2 * g], t[2 * g + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int g = 0; g < 4; g++) /* 128-bit lane l: t[4g + l]'s four partial maxima */
        v[g] = _mm512_max_epu32(_mm512_shuffle_i32x4(u[2 * g], u[2 * g + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_i32x4(u[2 * g], u[2 * g + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int g = 0; g < 2; g++) /* 128-bit lane l: two partials of t[8g + l], then two of t[8g + 4 + l] */
        w[g] = _mm512_max_epu32(_mm512_unpacklo_epi64(v[2 * g], v[2 * g + 1]),
                                _mm512_unpackhi_epi64(v[2 * g], v[2 * g + 1]));
    const __m512i lo = _mm512_unpacklo_epi32(w[0], w[1]), hi = _mm512_unpackhi_epi32(w[0], w[1]);
    /* m's 128-bit lane l: the maxima of t[l], t[8 + l], t[4 + l], t[12 + l], in that order */
    const __m512i m = _mm512_max_epu32(_mm512_unpacklo_epi64(lo, hi), _mm512_unpackhi_epi64(lo, hi));
    return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 1, 5, 9, 13, 3, 7, 11, 15), m);
}

/* Sixteen whole NVFP4 groups of a row at once (scales k0.., from column jg; codes at `in`, delta d, codes
 * out at `out`): fused_group's operations, group by group the same, with the groups' ranges reduced
 * together (fused_max16) and their scales kept or chosen as vectors (new_scale's arithmetic for each
 * group that does not keep its own); the kept sums into dd, ed, ee. */
LT_FUSED_INLINE int32_t fused_nvfp4_16(const Spec *sp, const NvTables *nv, int64_t k0, uint32_t jg, const uint8_t *in,
                                       const float *d, uint8_t *out, const void *scale_in, void *scale_out,
                                       int32_t keep, uint32_t row_hash, int *fresh, __m512 *dd, __m512 *ed,
                                       __m512 *ee, const int stochastic) {
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
    const __m128i codes8 = _mm_loadu_si128((const __m128i *)((const uint8_t *)scale_in + k0));
    const __m512i code = _mm512_cvtepu8_epi32(codes8);
    if (_mm512_cmpeq_epi32_mask(_mm512_and_si512(code, _mm512_set1_epi32(0x7F)), _mm512_set1_epi32(0x7F)))
        return LT_NONFINITE;
    const __m512 s_old = _mm512_i32gather_ps(code, nv->scale, 4), values = _mm512_loadu_ps(E2M1_VALUES);
    float b[16][16], m[16][16];
    __m512i top[16];
    for (int g = 0; g < 16; g++) {
        const __m512 bv = _mm512_mul_ps(_mm512_permutexvar_ps(fused_unpack(in + 8 * g), values),
                                        _mm512_permutexvar_ps(_mm512_set1_epi32(g), s_old));
        const __m512 mv = _mm512_add_ps(bv, _mm512_loadu_ps(d + 16 * g));
        _mm512_storeu_ps(b[g], bv), _mm512_storeu_ps(m[g], mv);
        top[g] = _mm512_and_si512(_mm512_castps_si512(mv), magnitude);
    }
    const __m512i amax = fused_max16(top);
    if (_mm512_cmpge_epu32_mask(amax, _mm512_set1_epi32(0x7F800000))) return LT_NONFINITE;
    const __mmask16 kept = keep ? _mm512_cmp_ps_mask(_mm512_castsi512_ps(amax), _mm512_i32gather_ps(code, nv->reach, 4),
                                                     _CMP_LE_OQ)
                                : 0;
    _mm_storeu_si128((__m128i *)((uint8_t *)scale_out + k0), codes8);
    __m512 scale = s_old;
    if (kept != 0xFFFF) { /* new_scale for each group that does not keep its scale (it writes the new code out) */
        float s[16];
        uint32_t a[16];
        _mm512_storeu_ps(s, scale), _mm512_storeu_si512(a, amax);
        for (int g = 0; g < 16; g++) {
            if (kept >> g & 1) continue;
            float z = 0.0f;
            s[g] = new_scale(sp, nv, k0 + g, float_of(a[g]), 0.0f, 0.0f, scale_in, NULL, scale_out, NULL, keep, &z,
                             fresh);
        }
        scale = _mm512_loadu_ps(s);
    }
    const __mmask16 positive = _mm512_cmp_ps_mask(scale, _mm512_setzero_ps(), _CMP_GT_OQ);
    const __m512 safe = _mm512_mask_blend_ps(positive, _mm512_set1_ps(1.0f), scale);
    for (int g = 0; g < 16; g++) {
        const __m512i lane = _mm512_set1_epi32(g);
        const __m512 sv = _mm512_permutexvar_ps(lane, scale), mv = _mm512_loadu_ps(m[g]);
        __m512 w;
        const __m512i code = fused_e2m1(mv, sv, _mm512_permutexvar_ps(lane, safe),
                                        _mm512_set1_epi32(positive >> g & 1 ? -1 : 0), stochastic, row_hash,
                                        jg + 16u * (uint32_t)g, &w);
        fused_kept(mv, _mm512_loadu_ps(b[g]), w, dd, ed, ee);
        fused_pack(code, out + 8 * g);
    }
    return LT_OK;
}

/* Groups g0..g1 of row i (each whole; `in` and `out` the row's codes, d the chunk's delta from its
 * first column): encode_chunk, kept_row and pack_run32 in one. */
LT_FUSED_INLINE int32_t fused_chunk_as(const Spec *sp, const NvTables *nv, int64_t i, int64_t g0, int64_t g1,
                                       const uint8_t *in, const float *d, uint8_t *out, const void *scale_in,
                                       const int32_t *zero_in, void *scale_out, int32_t *zero_out, int32_t keep,
                                       uint32_t row_hash, int *fresh, double total[3], const int NV, const int is_int,
                                       const int stochastic, const int has_zero) {
    __m512 dd = _mm512_setzero_ps(), ed = dd, ee = dd;
    const int64_t per_run = LT_RUN / (16 * NV);
    int32_t answer = LT_OK;
    int64_t g = g0;
    if (NV == 1 && !is_int && sp->fmt == LT_NVFP4) /* sixteen groups (one run of the kept sums) at a time */
        for (; g + 16 <= g1 && answer == LT_OK; g += 16) {
            answer = fused_nvfp4_16(sp, nv, i * sp->groups + g, (uint32_t)(g * 16), in + g * 8, d + (g - g0) * 16,
                                    out + g * 8, scale_in, scale_out, keep, row_hash, fresh, &dd, &ed, &ee,
                                    stochastic);
            fused_flush(&dd, &ed, &ee, total);
        }
    for (; g < g1 && answer == LT_OK; g++) {
        const int64_t j0 = g * sp->group;
        answer = fused_group(sp, nv, i * sp->groups + g, (uint32_t)j0, in + j0 / 2, d + (j0 - g0 * sp->group),
                             out + j0 / 2, scale_in, zero_in, scale_out, zero_out, keep, row_hash, fresh, &dd, &ed,
                             &ee, NV, is_int, stochastic, has_zero);
        if ((g - g0 + 1) % per_run == 0 || g + 1 == g1) fused_flush(&dd, &ed, &ee, total);
    }
    if (answer == LT_OK && g1 == sp->groups) memset(out + sp->cols / 2, 0, (size_t)(sp->row_bytes - sp->cols / 2));
    return answer;
}

#define LT_FUSED_KINDS(NV)                                                                                        \
    (!is_int       ? (stochastic ? LT_CHUNK_AS(NV, 0, 1, 0) : LT_CHUNK_AS(NV, 0, 0, 0))                           \
     : has_zero    ? (stochastic ? LT_CHUNK_AS(NV, 1, 1, 1) : LT_CHUNK_AS(NV, 1, 0, 1))                           \
                   : (stochastic ? LT_CHUNK_AS(NV, 1, 1, 0) : LT_CHUNK_AS(NV, 1, 0, 0)))
/* fused_chunk_as for the weight's kind and rule, each compiled apart. */
LT_FUSED_TARGET static int32_t fused_chunk(const Spec *sp, const NvTables *nv, int64_t i, int64_t g0, int64_t g1,
                                           const uint8_t *in, const float *d, uint8_t *out, const void *scale_in,
                                           const int32_t *zero_in, void *scale_out, int32_t *zero_out, int32_t keep,
                                           uint32_t row_hash, int *fresh, double total[3], int is_int,
                                           int stochastic, int has_zero) {
#define LT_CHUNK_AS(NV, INT, STOCHASTIC, ZERO)                                                                 \
    fused_chunk_as(sp, nv, i, g0, g1, in, d, out, scale_in, zero_in, scale_out, zero_out, keep, row_hash, fresh, \
                   total, NV, INT, STOCHASTIC, ZERO)
    switch (sp->group) {
    case 16: return LT_FUSED_KINDS(1);
    case 32: return LT_FUSED_KINDS(2);
    case 64: return LT_FUSED_KINDS(4);
    default: return LT_FUSED_KINDS(8);
    }
#undef LT_CHUNK_AS
}
#undef LT_FUSED_KINDS
#else
#define LT_FUSED 0
#endif

/* Whether fused_chunk serves this weight: 4-bit codes, groups of 16, 32, 64 or 128. */
static int fused_serves(const Spec *sp) {
    const int four = sp->fmt != LT_INT || sp->bits == 4;
    return LT_FUSED && four && (sp->group == 16 || sp->group == 32 || sp->group == 64 || sp->group == 128);
}

/* The encode pass: rows row0.. of a weight (`rows` of them) plus the terms' delta, left @ right
 * (left: these rows' (rows, k) factors, the terms' factors folded in; right: (k, cols); both
 * float32, row-major), requantized into codes_out and scale_out (zero_out) with the base's codes,
 * scales and zero points kept where they fit (packed.requantize with keep_scales), nearest or
 * stochastically with the stream `key`; adds <delta, delta>, <err, delta>, <err, err> to sums
 * (delta = merged - base, err = merged - written). Returns LT_FRESH where an NVFP4 block needs a
 * scale past e4m3's under the tensor scale, LT_NONFINITE where a merged value is not finite or an
 * NVFP4 scale a NaN code (the outputs are then incomplete), LT_NOMEM. */
LT_INLINE int32_t encode_rows_as(const Spec *sp, const float *left, const float *right, int64_t k, int64_t rows,
                                 int64_t row0, const uint8_t *codes_in, const void *scale_in, const int32_t *zero_in,
                                 uint8_t *codes_out, void *scale_out, int32_t *zero_out, int32_t keep, uint32_t key,
                                 double *sums, const int is_int, const int stochastic, const int has_zero,
                                 const int lanes) {
    /* Chunks of columns outermost, so that the chunk's rows of `right` stay in the first-level cache
     * across the strip's rows (an odd group length takes an even number of groups a chunk: each
     * chunk starts a byte). */
    int64_t per = LT_CHUNK / sp->group > 1 ? LT_CHUNK / sp->group : 1;
    per += (sp->group & 1) & (per & 1);
    const int64_t width = per * sp->group;
    int fresh = 0;
    int32_t answer = LT_OK;
    double total[3] = {0.0, 0.0, 0.0};
    NvTables nv = {{0.0f}, {0.0f}, 1.0f};
    if (sp->fmt == LT_NVFP4) nv_tables(sp, &nv);
    const int64_t ds = width + 16, block = LT_ROWS_AT_ONCE;
    uint32_t *nib = malloc((size_t)(2 * block * ds) * 4), *code = nib + block * ds;
    float *d = malloc((size_t)(block + 3) * (size_t)ds * sizeof(float)), *lt = malloc((size_t)(rows * k + 1) * 4);
    if (!nib || !d || !lt) {
        free(nib), free(d), free(lt);
        return LT_NOMEM;
    }
    float *b = d + block * ds, *m = b + ds, *w = m + ds;
    for (int64_t i0 = 0; i0 + block <= rows; i0 += block) interleave4(left + i0 * k, k, lt + i0 * k);
    for (int64_t g0 = 0; g0 < sp->groups && answer == LT_OK; g0 += per) {
        const int64_t g1 = g0 + per < sp->groups ? g0 + per : sp->groups, j0 = g0 * sp->group;
        const int64_t n = (g1 * sp->group < sp->cols ? g1 * sp->group : sp->cols) - j0;
        const int fused = lanes == 16 && fused_serves(sp) && n == (g1 - g0) * sp->group;
        for (int64_t i0 = 0; i0 < rows && answer == LT_OK; i0 += block) {
            const int64_t nrows = rows - i0 < block ? rows - i0 : block;
            if (!fused)
                for (int64_t r = 0; r < nrows; r++)
                    unpack_run32(sp, codes_in + (i0 + r) * sp->row_bytes, j0, n, nib + r * ds);
            delta_rows_at(left + i0 * k, lt + i0 * k, nrows, right, k, sp->cols, j0, n, d, ds, lanes);
            for (int64_t r = 0; r < nrows && answer == LT_OK; r++) {
                const int64_t i = i0 + r;
                const uint32_t row_hash = mix32((uint32_t)(row0 + i) ^ key);
#if LT_FUSED
                if (fused) {
                    answer = fused_chunk(sp, &nv, i, g0, g1, codes_in + i * sp->row_bytes, d + r * ds,
                                         codes_out + i * sp->row_bytes, scale_in, zero_in, scale_out, zero_out, keep,
                                         row_hash, &fresh, total, is_int, stochastic, has_zero);
                    continue;
                }
#endif
                answer = encode_chunk(sp, &nv, i, g0, g1, nib + r * ds, d + r * ds, b, m, w, code + r * ds, scale_in,
                                      zero_in, scale_out, zero_out, keep, is_int, stochastic, has_zero, row_hash,
                                      &fresh);
                if (answer == LT_OK) {
                    kept_row(m, b, w, n, total);
                    pack_run32(sp, code + r * ds, j0, n, codes_out + i * sp->row_bytes);
                }
            }
        }
    }
    free(nib), free(d), free(lt);
    for (int t = 0; t < 3; t++) sums[t] += total[t];
    return answer != LT_OK ? answer : fresh ? LT_FRESH : LT_OK;
}

/* The encode pass: rows row0.. of a weight (`rows` of them) plus the terms' delta, left @ right
 * (left: these rows' (rows, k) factors, the terms' factors folded in; right: (k, cols); both
 * float32, row-major), requantized into codes_out and scale_out (zero_out) with the base's codes,
 * scales and zero points kept where they fit (packed.requantize with keep_scales), nearest or
 * stochastically with the stream `key`; adds <delta, delta>, <err, delta>, <err, err> to sums
 * (delta = merged - base, err = merged - written). Returns LT_FRESH where an NVFP4 block needs a
 * scale past e4m3's under the tensor scale, LT_NONFINITE where a merged value is not finite or an
 * NVFP4 scale a NaN code (the outputs are then incomplete), LT_NOMEM. Each kind of weight and rule
 * is compiled apart (constant arguments), so that no element loop branches on them. */
LT_INLINE int32_t encode_rows(const Spec *sp, const float *left, const float *right, int64_t k, int64_t rows,
                              int64_t row0, const uint8_t *codes_in, const void *scale_in, const int32_t *zero_in,
                              uint8_t *codes_out, void *scale_out, int32_t *zero_out, int32_t keep,
                              int32_t stochastic, uint32_t key, double *sums, const int lanes) {
#define LT_ROWS(INT, STOCHASTIC, ZERO)                                                                          \
    encode_rows_as(sp, left, right, k, rows, row0, codes_in, scale_in, zero_in, codes_out, scale_out, zero_out, \
                   keep, key, sums, INT, STOCHASTIC, ZERO, lanes)
    if (sp->fmt != LT_INT) return stochastic ? LT_ROWS(0, 1, 0) : LT_ROWS(0, 0, 0);
    if (zero_in) return stochastic ? LT_ROWS(1, 1, 1) : LT_ROWS(1, 0, 1);
    return stochastic ? LT_ROWS(1, 1, 0) : LT_ROWS(1, 0, 0);
#undef LT_ROWS
}

/* out = left @ right by encode_rows's order (rows x cols, float32): the torch passes' delta on the CPU
 * (a row at a time where the interleaved factors' few bytes cannot be had). */
LT_INLINE void delta_rows(const float *left, const float *right, int64_t k, int64_t rows, int64_t cols, float *out,
                          const int lanes) {
    float *lt = malloc((size_t)(LT_ROWS_AT_ONCE * k + 1) * sizeof(float));
    for (int64_t i = 0, nrows; i < rows; i += nrows) {
        nrows = lt && rows - i >= LT_ROWS_AT_ONCE ? LT_ROWS_AT_ONCE : 1;
        if (nrows == LT_ROWS_AT_ONCE) interleave4(left + i * k, k, lt);
        delta_rows_at(left + i * k, lt, nrows, right, k, cols, 0, cols, out + i * cols, cols, lanes);
    }
    free(lt);
}

/* ---- the subspace rule on a 4-bit grid -------------------------------------------------------- */

enum { LT_SUB_ROWS = 16 }; /* rows rounded together, a row per lane: their chains are independent */

/* x on E2M1's grid, nearest, ties to even (rounding.round_to_grid with rounding.E2M1): |x| clamped to
 * 6, its spacing 2^(field - 128) (0.5 below 2), so that |x| / spacing and back are exact; x's sign. */
LT_INLINE float e2m1_nearest(float x) {
    float a = fabsf(x);
    a = a < 6.0f ? a : 6.0f;
    uint32_t field = bits_of(a) >> 23;
    field = field > 127u ? field : 127u;
    const float spacing = float_of((field - 1u) << 23);
    return copysignf(rintf(a / spacing) * spacing, x);
}

/* One column's rounding for LT_SUB_ROWS rows (lane r: value v[r], scale s[r], zero point z[r] or none):
 * v / s (+ z) rounded to nearest on E2M1's grid or the integers lo..hi into q, the error in real units
 * into e. */
LT_INLINE void round_lanes(const float *restrict v, const float *restrict s, const float *restrict z,
                           const int is_int, float lo, float hi, float *restrict q, float *restrict e) {
    for (int r = 0; r < LT_SUB_ROWS; r++) {
        const float x = z ? v[r] / s[r] + z[r] : v[r] / s[r];
        float c;
        if (is_int) {
            c = rintf(x);
            c = lo > c ? lo : c;
            c = hi < c ? hi : c;
        } else {
            c = e2m1_nearest(x);
        }
        e[r] = (z ? c - z[r] : c) * s[r] - v[r];
        q[r] = c;
    }
}

/* subspace_lanes's columns for a basis of `width` <= 16, g held in registers: vectors V of LANES floats,
 * LT_SUB_ROWS / LANES of them for the rows of one element of the basis. */
#define LT_SUBSPACE_VECTORS(NAME, V, LANES)                                                                     \
    LT_INLINE void NAME(const float *restrict w, const float *restrict s, const float *restrict z, int64_t cols, \
                        const int is_int, float lo, float hi, const float *restrict basis,                      \
                        const float *restrict gain, const int64_t width, int64_t rank, float *restrict q) {     \
        enum { R = LT_SUB_ROWS, N = LT_SUB_ROWS / (LANES) };                                                     \
        V gv[16][N], pv[16][N], v[N], ev[N];                                                                    \
        for (int64_t k = 0; k < width; k++)                                                                     \
            for (int c = 0; c < N; c++) gv[k][c] = (V){0};                                                      \
        for (int64_t j = 0; j < cols; j++) {                                                                    \
            const float *a = basis + j * width, *u = gain + j * width;                                          \
            memcpy(v, w + j * R, sizeof v);                                                                     \
            if (rank) {                                                                                         \
                for (int64_t k = 0; k < width; k++)                                                             \
                    for (int c = 0; c < N; c++) pv[k][c] = gv[k][c] * a[k];                                     \
                for (int64_t n = width / 2; n >= 1; n /= 2)                                                     \
                    for (int64_t k = 0; k < n; k++)                                                             \
                        for (int c = 0; c < N; c++) pv[k][c] = pv[2 * k][c] + pv[2 * k + 1][c];                 \
                for (int c = 0; c < N; c++) v[c] = v[c] + pv[0][c];                                             \
            }                                                                                                   \
            float vl[R], el[R];                                                                                 \
            memcpy(vl, v, sizeof vl);                                                                           \
            round_lanes(vl, s + j * R, z ? z + j * R : NULL, is_int, lo, hi, q + j * R, el);                    \
            memcpy(ev, el, sizeof ev);                                                                          \
            for (int64_t k = 0; k < width; k++)                                                                 \
                for (int c = 0; c < N; c++) gv[k][c] = gv[k][c] - ev[c] * u[k];                                 \
        }                                                                                                       \
    }
LT_SUBSPACE_VECTORS(subspace_vectors16, lt_v16, 16)
LT_SUBSPACE_VECTORS(subspace_vectors8, lt_v8, 8)
#undef LT_SUBSPACE_VECTORS

/* rounding.round_subspace for LT_SUB_ROWS rows at once, laid out column by column (w, s, z: cols x
 * LT_SUB_ROWS, row r in lane r; z NULL without zero points): column by column, each row's value plus
 * its feedback g . a_j (the products summed pairwise over the padded width), over its scale (plus its
 * zero point), rounded to nearest on E2M1's grid or the integers lo..hi, into q; the error in real
 * units e leaves g -= e gain_j. The same operations in the same order as the torch passes, so the same
 * bytes. A width of 8 or 16 (a rank up to 16) keeps g in vector registers (`lanes` floats a vector:
 * 8 for AVX2, else 16, whichever GCC lowers better there); wider ones go through g and p in memory
 * (width x LT_SUB_ROWS floats each). */
LT_INLINE void subspace_lanes(const float *restrict w, const float *restrict s, const float *restrict z,
                              int64_t cols, const int is_int, float lo, float hi, const float *restrict basis,
                              const float *restrict gain, const int64_t width, int64_t rank, float *restrict g,
                              float *restrict p, float *restrict q, const int lanes) {
    enum { R = LT_SUB_ROWS };
    if (width <= 16) {
        if (lanes == 16)
            subspace_vectors16(w, s, z, cols, is_int, lo, hi, basis, gain, width, rank, q);
        else
            subspace_vectors8(w, s, z, cols, is_int, lo, hi, basis, gain, width, rank, q);
        return;
    }
    for (int64_t k = 0; k < width * R; k++) g[k] = 0.0f;
    for (int64_t j = 0; j < cols; j++) {
        const float *a = basis + j * width, *u = gain + j * width;
        float v[R], e[R];
        for (int r = 0; r < R; r++) v[r] = w[j * R + r];
        if (rank) {
            for (int64_t k = 0; k < width; k++)
                for (int r = 0; r < R; r++) p[k * R + r] = g[k * R + r] * a[k];
            for (int64_t n = width / 2; n >= 1; n /= 2)
                for (int64_t k = 0; k < n; k++)
                    for (int r = 0; r < R; r++) p[k * R + r] = p[2 * k * R + r] + p[(2 * k + 1) * R + r];
            for (int r = 0; r < R; r++) v[r] = v[r] + p[r];
        }
        round_lanes(v, s + j * R, z ? z + j * R : NULL, is_int, lo, hi, q + j * R, e);
        for (int64_t k = 0; k < width; k++)
            for (int r = 0; r < R; r++) g[k * R + r] = g[k * R + r] - e[r] * u[k];
    }
}

/* lt_lowbit_subspace's rows, LT_SUB_ROWS at a time (the last ones padded with zeros under a scale
 * of 1), each kind of grid compiled apart. */
LT_INLINE int32_t subspace_rows4(const float *w, const float *scale, const float *zero, int64_t rows, int64_t cols,
                                 int32_t is_int, float lo, float hi, const float *basis, const float *gain,
                                 int64_t width, int64_t rank, float *out, const int lanes) {
    enum { R = LT_SUB_ROWS };
    float *buf = malloc(((size_t)(4 * cols) + (size_t)(2 * width)) * R * sizeof(float));
    if (!buf) return LT_NOMEM;
    float *wt = buf, *st = wt + cols * R, *zt = st + cols * R, *qt = zt + cols * R, *g = qt + cols * R;
    float *p = g + width * R;
    for (int64_t i0 = 0; i0 < rows; i0 += R) {
        const int64_t n = rows - i0 < R ? rows - i0 : R;
        for (int64_t r = 0; r < R; r++)
            for (int64_t j = 0; j < cols; j++) {
                wt[j * R + r] = r < n ? w[(i0 + r) * cols + j] : 0.0f;
                st[j * R + r] = r < n ? scale[(i0 + r) * cols + j] : 1.0f;
            }
        if (zero)
            for (int64_t r = 0; r < R; r++)
                for (int64_t j = 0; j < cols; j++) zt[j * R + r] = r < n ? zero[(i0 + r) * cols + j] : 0.0f;
#define LT_LANES(WIDTH)                                                                                 \
    (!is_int  ? subspace_lanes(wt, st, NULL, cols, 0, lo, hi, basis, gain, WIDTH, rank, g, p, qt, lanes) \
     : zero   ? subspace_lanes(wt, st, zt, cols, 1, lo, hi, basis, gain, WIDTH, rank, g, p, qt, lanes)   \
              : subspace_lanes(wt, st, NULL, cols, 1, lo, hi, basis, gain, WIDTH, rank, g, p, qt, lanes))
        if (width == 8)
            LT_LANES(8);
        else if (width == 16)
            LT_LANES(16);
        else
            LT_LANES(width);
#undef LT_LANES
        for (int64_t r = 0; r < n; r++)
            for (int64_t j = 0; j < cols; j++) out[(i0 + r) * cols + j] = qt[j * R + r];
    }
    free(buf);
    return LT_OK;
}

/* ---- float32 onto bfloat16's or float16's grid (merge --dtype from a quantized base) ---------- */

enum { LT_BF16 = 0, LT_F16 = 1 }; /* lt_round_half's kinds */

/* The bfloat16 bits of x (finite): nearest, ties to even (torch's cast, which gives Inf beyond
 * bfloat16's range), or stochastically against the draw u24 (rounding.round_to_grid with
 * torch.bfloat16: |x| clamped to the largest value, up where u < the fraction between its two
 * neighbours). That fraction is |x|'s low sixteen bits over 2^16, for normal and subnormal values
 * alike, and u = u24 / 2^24, so u is below it exactly where u24's top sixteen bits are below those
 * bits; going up adds one to the kept bits, carrying into the exponent as the next value does. */
LT_INLINE uint32_t bf16_bits(float x, int stochastic, uint32_t u24) {
    const uint32_t b = bits_of(x);
    if (!stochastic) return (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    uint32_t a = b & 0x7FFFFFFFu;
    a = a < 0x7F7F0000u ? a : 0x7F7F0000u; /* bfloat16's largest value */
    const uint32_t up = (u24 >> 8) < (a & 0xFFFFu) ? 0x10000u : 0u;
    return ((b & 0x80000000u) | ((a & 0xFFFF0000u) + up)) >> 16;
}

/* The float16 bits of x (finite, |x| <= 65504 where nearest: merges refuse more): rounding.round_to_grid
 * with torch.float16, nearest (ties to even on the steps, as torch's cast) or against the draw u24:
 * |x| clamped to 65504, its spacing 2^(max(e, -14) - 10), so that |x| / spacing (a product by a power of
 * two), its floor and its fraction are exact; the rounded value, a float16's, then as float16 bits
 * (a normal's exponent and top ten mantissa bits, a subnormal's multiple of 2^-24). */
LT_INLINE uint32_t f16_bits(float x, int stochastic, uint32_t u24) {
    const uint32_t b = bits_of(x);
    float a = float_of(b & 0x7FFFFFFFu);
    a = a < 65504.0f ? a : 65504.0f;
    uint32_t field = bits_of(a) >> 23;
    field = field > 113u ? field : 113u; /* float16's smallest normal, 2^-14: below it the subnormals' spacing */
    const float spacing = float_of((field - 10u) << 23), y = a * float_of((264u - field) << 23);
    float r;
    if (stochastic) {
        const float below = floorf(y);
        r = below + ((float)(int32_t)u24 * 0x1p-24f < y - below ? 1.0f : 0.0f);
    } else {
        r = rintf(y);
    }
    const float v = r * spacing;
    const uint32_t vb = bits_of(v);
    const uint32_t h = vb >= 0x38800000u ? (((vb >> 23) - 112u) << 10) | ((vb >> 13) & 0x3FFu) : (uint32_t)(v * 0x1p24f);
    return ((b >> 16) & 0x8000u) | h;
}

/* One element of lt_round_half: its bits written, its kept terms added into lane sums dd, ed, ee. */
LT_INLINE void round_half_one(float v, float b, uint32_t row_hash, uint32_t j, const int stochastic, const int kind,
                              uint16_t *restrict o, float *dd, float *ed, float *ee) {
    const uint32_t u24 = mix32(row_hash ^ j) >> 8;
    const uint32_t h = kind == LT_BF16 ? bf16_bits(v, stochastic, u24) : f16_bits(v, stochastic, u24);
    *o = (uint16_t)h;
    float w;
    if (kind == LT_BF16) {
        w = float_of(h << 16);
    } else { /* the value just rounded, back from its bits */
        const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
        const float mag = e ? float_of(((e + 112u) << 23) | (m << 13)) : (float)(int32_t)m * 0x1p-24f;
        w = float_of(bits_of(mag) | ((h & 0x8000u) << 16));
    }
    const float delta = v - b, err = v - w;
    *dd = *dd + delta * delta;
    *ed = *ed + err * delta;
    *ee = *ee + err * err;
}

/* lt_round_half's rows, the rule and kind constant in each compiled copy (no branch in the element loop). */
LT_INLINE void round_half_rows(const float *restrict x, const float *restrict before, uint16_t *restrict out,
                               int64_t rows, int64_t cols, int64_t row0, uint32_t key, const int stochastic,
                               const int kind, double total[3]) {
    for (int64_t i = 0; i < rows; i++) {
        const uint32_t row_hash = mix32((uint32_t)(row0 + i) ^ key);
        const float *xr = x + i * cols, *br = before + i * cols;
        uint16_t *o = out + i * cols;
        for (int64_t j0 = 0; j0 < cols; j0 += LT_RUN) {
            const int64_t n = cols - j0 < LT_RUN ? cols - j0 : LT_RUN, full = j0 + (n & ~(int64_t)15);
            float dd[16] = {0.0f}, ed[16] = {0.0f}, ee[16] = {0.0f};
            for (int64_t j = j0; j < full; j += 16)
                for (int l = 0; l < 16; l++)
                    round_half_one(xr[j + l], br[j + l], row_hash, (uint32_t)(j + l), stochastic, kind, o + j + l,
                                   &dd[l], &ed[l], &ee[l]);
            for (int64_t j = full; j < j0 + n; j++)
                round_half_one(xr[j], br[j], row_hash, (uint32_t)j, stochastic, kind, o + j, &dd[0], &ed[0], &ee[0]);
            double s0 = 0.0, s1 = 0.0, s2 = 0.0;
            for (int l = 0; l < 16; l++) s0 += dd[l], s1 += ed[l], s2 += ee[l];
            total[0] += s0, total[1] += s1, total[2] += s2;
        }
    }
}

LT_INLINE void round_half(const float *x, const float *before, uint16_t *out, int64_t rows, int64_t cols, int64_t row0,
                          uint32_t key, int32_t stochastic, int32_t kind, double *sums) {
    double total[3] = {0.0, 0.0, 0.0};
#define LT_HALF(STOCHASTIC, KIND) round_half_rows(x, before, out, rows, cols, row0, key, STOCHASTIC, KIND, total)
    if (kind == LT_BF16)
        stochastic ? LT_HALF(1, LT_BF16) : LT_HALF(0, LT_BF16);
    else
        stochastic ? LT_HALF(1, LT_F16) : LT_HALF(0, LT_F16);
#undef LT_HALF
    for (int t = 0; t < 3; t++) sums[t] += total[t];
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* The passes compiled for AVX2 (eight lanes) and for AVX-512 (sixteen; an NVFP4 group is one
 * vector), LANES the product loop's vectors: the rounding is IEEE's either way, so the same bytes. */
#define LT_AVX2 __attribute__((target("avx2")))
#if defined(__clang__) || __GNUC__ < 8 /* GCC 8 on prefers 256-bit vectors for AVX-512 unless told */
#define LT_AVX512 __attribute__((target("avx2,avx512f,avx512bw,avx512dq,avx512vl")))
#else
#define LT_AVX512 __attribute__((target("avx2,avx512f,avx512bw,avx512dq,avx512vl,prefer-vector-width=512")))
#endif
#define LT_VARIANTS(ATTR, SUFFIX, LANES)                                                                               \
    ATTR static int32_t decode_rows##SUFFIX(const Spec *sp, const uint8_t *codes, const void *scale,                   \
                                            const int32_t *zero, int64_t rows, float *out) {                           \
        return decode_rows(sp, codes, scale, zero, rows, out);                                                         \
    }                                                                                                                  \
    ATTR static int32_t encode_rows##SUFFIX(const Spec *sp, const float *left, const float *right, int64_t k,          \
                                            int64_t rows, int64_t row0, const uint8_t *codes_in, const void *scale_in, \
                                            const int32_t *zero_in, uint8_t *codes_out, void *scale_out,               \
                                            int32_t *zero_out, int32_t keep, int32_t stochastic, uint32_t key,         \
                                            double *sums) {                                                            \
        return encode_rows(sp, left, right, k, rows, row0, codes_in, scale_in, zero_in, codes_out, scale_out,          \
                           zero_out, keep, stochastic, key, sums, LANES);                                              \
    }                                                                                                                  \
    ATTR static void delta_rows##SUFFIX(const float *left, const float *right, int64_t k, int64_t rows, int64_t cols,  \
                                        float *out) {                                                                  \
        delta_rows(left, right, k, rows, cols, out, LANES);                                                            \
    }                                                                                                                  \
    ATTR static int32_t subspace_rows##SUFFIX(const float *w, const float *scale, const float *zero, int64_t rows,     \
                                              int64_t cols, int32_t is_int, float lo, float hi, const float *basis,    \
                                              const float *gain, int64_t width, int64_t rank, float *out) {            \
        return subspace_rows4(w, scale, zero, rows, cols, is_int, lo, hi, basis, gain, width, rank, out, LANES);       \
    }                                                                                                                  \
    ATTR static void round_half##SUFFIX(const float *x, const float *before, uint16_t *out, int64_t rows,              \
                                        int64_t cols, int64_t row0, uint32_t key, int32_t stochastic, int32_t kind,    \
                                        double *sums) {                                                                \
        round_half(x, before, out, rows, cols, row0, key, stochastic, kind, sums);                                     \
    }
LT_VARIANTS(LT_AVX2, _avx2, 8)
LT_VARIANTS(LT_AVX512, _avx512, 16)
#define LT_SIMD_VARIANTS 1
#endif

/* out = the codes of `rows` rows decoded; LT_NONFINITE where an NVFP4 scale is a NaN code, LT_NOMEM. */
LT_EXPORT int32_t lt_lowbit_decode(const Spec *sp, const uint8_t *codes, const void *scale, const int32_t *zero,
                                   int64_t rows, float *out) {
#ifdef LT_SIMD_VARIANTS
    if (lt_simd_usable() >= 2) return decode_rows_avx512(sp, codes, scale, zero, rows, out);
    if (lt_simd_usable() >= 1) return decode_rows_avx2(sp, codes, scale, zero, rows, out);
#endif
    return decode_rows(sp, codes, scale, zero, rows, out);
}

/* See encode_rows; also LT_NOMEM. */
LT_EXPORT int32_t lt_lowbit_encode(const Spec *sp, const float *left, const float *right, int64_t k, int64_t rows,
                                   int64_t row0, const uint8_t *codes_in, const void *scale_in, const int32_t *zero_in,
                                   uint8_t *codes_out, void *scale_out, int32_t *zero_out, int32_t keep,
                                   int32_t stochastic, uint32_t key, double *sums) {
#ifdef LT_SIMD_VARIANTS
    if (lt_simd_usable() >= 2)
        return encode_rows_avx512(sp, left, right, k, rows, row0, codes_in, scale_in, zero_in, codes_out, scale_out,
                                  zero_out, keep, stochastic, key, sums);
    if (lt_simd_usable() >= 1)
        return encode_rows_avx2(sp, left, right, k, rows, row0, codes_in, scale_in, zero_in, codes_out, scale_out,
                                zero_out, keep, stochastic, key, sums);
#endif
    return encode_rows(sp, left, right, k, rows, row0, codes_in, scale_in, zero_in, codes_out, scale_out, zero_out,
                       keep, stochastic, key, sums, 0);
}

/* lt_lowbit_encode over blocks of `block` rows, taken in turn through the counter *next (zeroed first)
 * by every thread that calls this for the same weight at once (one a core): the core that comes free
 * takes the next block, so that none waits at the end behind a share given to another. Block b's kept
 * sums are added to sums[3b .. 3b + 3), so that their total does not depend on which thread took which
 * block. A block answered otherwise than LT_OK sets *stop, after which no caller takes another; each
 * caller returns the worst answer it met (LT_NOMEM, then LT_NONFINITE, then LT_FRESH). */
LT_EXPORT int32_t lt_lowbit_encode_blocks(const Spec *sp, const float *left, const float *right, int64_t k,
                                          int64_t rows, int64_t row0, const uint8_t *codes_in, const void *scale_in,
                                          const int32_t *zero_in, uint8_t *codes_out, void *scale_out,
                                          int32_t *zero_out, int32_t keep, int32_t stochastic, uint32_t key,
                                          double *sums, int64_t block, int64_t *next, int32_t *stop) {
    const int64_t scale_row = sp->groups * (sp->fmt == LT_INT ? (int64_t)sizeof(float) : 1); /* bytes */
    int32_t worst = LT_OK;
    while (!__atomic_load_n(stop, __ATOMIC_RELAXED)) {
        const int64_t b = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED), r = b * block;
        if (r >= rows) break;
        const int64_t n = rows - r < block ? rows - r : block;
        const int32_t answer = lt_lowbit_encode(
            sp, left + r * k, right, k, n, row0 + r, codes_in + r * sp->row_bytes,
            (const uint8_t *)scale_in + r * scale_row, zero_in ? zero_in + r * sp->groups : NULL,
            codes_out + r * sp->row_bytes, (uint8_t *)scale_out + r * scale_row,
            zero_out ? zero_out + r * sp->groups : NULL, keep, stochastic, key, sums + 3 * b);
        if (answer != LT_OK) {
            __atomic_store_n(stop, 1, __ATOMIC_RELAXED);
            worst = answer > worst ? answer : worst;
        }
    }
    return worst;
}

/* out (rows x cols) = left (rows x k) @ right (k x cols), summed as the encode pass sums the terms. */
LT_EXPORT void lt_lowbit_delta(const float *left, const float *right, int64_t k, int64_t rows, int64_t cols,
                               float *out) {
#ifdef LT_SIMD_VARIANTS
    if (lt_simd_usable() >= 2)
        delta_rows_avx512(left, right, k, rows, cols, out);
    else if (lt_simd_usable() >= 1)
        delta_rows_avx2(left, right, k, rows, cols, out);
    else
#endif
        delta_rows(left, right, k, rows, cols, out, 0);
}

/* out = w / scale (+ zero) rounded by the subspace rule (loratool.quant.rounding.round_subspace) on
 * E2M1's grid or, is_int, the integers lo..hi: every array (rows, cols) row-major float32, zero NULL
 * without zero points; basis and gain (cols, width), width a power of two, zero past rank. Rows are
 * independent, so a caller may split them across threads. Returns LT_OK, or LT_NOMEM (nothing
 * written). */
LT_EXPORT int32_t lt_lowbit_subspace(const float *w, const float *scale, const float *zero, int64_t rows, int64_t cols,
                                     int32_t is_int, float lo, float hi, const float *basis, const float *gain,
                                     int64_t width, int64_t rank, float *out) {
#ifdef LT_SIMD_VARIANTS
    if (lt_simd_usable() >= 2)
        return subspace_rows_avx512(w, scale, zero, rows, cols, is_int, lo, hi, basis, gain, width, rank, out);
    if (lt_simd_usable() >= 1)
        return subspace_rows_avx2(w, scale, zero, rows, cols, is_int, lo, hi, basis, gain, width, rank, out);
#endif
    return subspace_rows4(w, scale, zero, rows, cols, is_int, lo, hi, basis, gain, width, rank, out, 16);
}

/* out (rows x cols, bfloat16 or float16 bits: kind LT_BF16, LT_F16) = x (float32, finite; within
 * float16's range for LT_F16) on that grid: nearest, ties to even, or with `stochastic` against the draws
 * of rows row0.. of the stream `key` (rounding.quantize_values: the same bits); adds to sums[0..3) the
 * kept sums <delta, delta>, <err, delta>, <err, err> (delta = x - before, err = x - out) in float lanes
 * over runs of LT_RUN, then double. Rows are independent, so a caller may split them across threads. */
LT_EXPORT void lt_round_half(const float *x, const float *before, uint16_t *out, int64_t rows, int64_t cols,
                             int64_t row0, uint32_t key, int32_t stochastic, int32_t kind, double *sums) {
#ifdef LT_SIMD_VARIANTS
    if (lt_simd_usable() >= 2)
        round_half_avx512(x, before, out, rows, cols, row0, key, stochastic, kind, sums);
    else if (lt_simd_usable() >= 1)
        round_half_avx2(x, before, out, rows, cols, row0, key, stochastic, kind, sums);
    else
#endif
        round_half(x, before, out, rows, cols, row0, key, stochastic, kind, sums);
}
