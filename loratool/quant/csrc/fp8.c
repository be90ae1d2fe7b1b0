/*
 * FP8 merge kernels: decode and requantize float8 (e4m3fn, e5m2) weights with per-tile float32
 * scales, the elementwise work of loratool.quant.fp8.merge_fp8_rows in three passes instead of a dozen.
 *
 * Plain C, loaded with ctypes (no Python or torch headers, so no ABI to match) and compiled by
 * hatch_build.py when a C compiler is present; without it loratool runs the same arithmetic as
 * torch passes. Both give the same bytes (tests/test_native.py): every value that reaches a code
 * or a scale is one IEEE float32 operation done as torch does it, in round-to-nearest-even.
 *
 * A weight (rows, cols) has one scale per tile of bo x bi elements, stored row-major as
 * (ceil(rows / bo), ceil(cols / bi)); per-channel scales are tiles of (1, cols). The functions take
 * `rows` rows whose first is row `row0` of the scale arrays' rows (in units of rows, not tiles), so
 * that callers can split a step across threads.
 *
 * Build flags matter: -ffp-contract=off (a fused multiply-add rounds once, torch twice), and never
 * -ffast-math (the rounding trick below must not be simplified away).
 */
#include "common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LT_AVX2 1 /* AVX2 (and F16C) paths besides the portable ones, chosen at run time */
#include <immintrin.h>
#endif


/* -- the arithmetic, one element at a time -------------------------------------------------------- */

/* The float32 value of an e5m2 code, Inf and NaN included (it is a float16's top byte). */
static inline float decode_e5m2(uint32_t code) {
    uint32_t mag = code & 0x7Fu;
    float normal = float_of((mag << 21) + (112u << 23)); /* exponent bias 15 -> 127 */
    float special = float_of(0x7F800000u | ((mag & 3u) << 21));
    float sub = (float)(int32_t)mag * 0x1p-16f; /* 0.mm x 2^-14 */
    float v = mag < 4u ? sub : (mag >= 0x7Cu ? special : normal);
    return float_of(bits_of(v) | ((code & 0x80u) << 24));
}

/* -- runs of one tile row, portable ------------------------------------------------------------ */

/* Decodes q[0..n) times s into out; returns whether an e4m3fn NaN code was among them. */
static int decode_run(const uint8_t *q, float *out, int64_t n, float s, int32_t fmt) {
    int nan = 0;
    if (fmt == LT_E4M3FN) {
        for (int64_t j = 0; j < n; j++) {
            out[j] = decode_e4m3(q[j]) * s;
            nan |= (q[j] & 0x7Fu) == 0x7Fu;
        }
    } else {
        for (int64_t j = 0; j < n; j++) out[j] = decode_e5m2(q[j]) * s;
    }
    return nan;
}

/* The largest of m and the bits of |w[0..n)|. */
static uint32_t max_bits(const float *w, int64_t n, uint32_t m) {
    for (int64_t j = 0; j < n; j++) {
        uint32_t a = bits_of(w[j]) & 0x7FFFFFFFu;
        m = a > m ? a : m;
    }
    return m;
}

/* What an encode run takes besides its weights: the rounding rule and its stream (the run's row's
 * hash and first column), and the base's codes and scale for the kept sums (base NULL: none). */
typedef struct {
    int stochastic;
    uint32_t row_hash;
    uint32_t col0;
    const uint8_t *base;
    float base_scale;
} Run;

/* A run's sums in its tile's scaled units: err = w / s - stored, delta = w - base (real units). */
typedef struct {
    float ee, ed, dd;
} Sums;

static inline float decode_fmt(uint32_t code, int32_t fmt) {
    return fmt == LT_E4M3FN ? decode_e4m3(code) : decode_e5m2(code);
}

/* Encodes w[0..n) / s into q, nearest (ties to even) or stochastically: up with probability equal
 * to the fraction of the spacing 2^(e - m) that |w / s| lies above the grid value below it, against
 * the element's draw. Every step is exact in float32 (the spacing is a power of two), so both give
 * the same code as rounding.round_to_grid in torch. */
static void encode_run(const float *w, uint8_t *q, int64_t n, float s, int32_t fmt, const Run *r, Sums *acc) {
    const Format f = FORMATS[fmt];
    const uint32_t mbits = (23u - f.shift) << 23;
    for (int64_t j = 0; j < n; j++) {
        uint32_t b = bits_of(w[j] / s);
        float a = float_of(b & 0x7FFFFFFFu);
        float ac = a < f.top ? a : f.top;
        uint32_t e = bits_of(ac) & 0x7F800000u;
        e = e > f.min_exp ? e : f.min_exp;
        float c = float_of(e + (f.shift << 23));
        float sum;
        if (r->stochastic) {
            float spacing = float_of(e - mbits);
            float y = ac / spacing;
            float below = (float)(int32_t)y;
            float u = (float)(mix32(r->row_hash ^ (r->col0 + (uint32_t)j)) >> 8) * 0x1p-24f;
            sum = (below + (u < y - below ? 1.0f : 0.0f)) * spacing + c;
        } else {
            sum = ac + c;
        }
        uint32_t code = (e >> f.shift) - (f.min_exp >> f.shift) + (bits_of(sum) & 0xFFu);
        q[j] = (uint8_t)(code | ((b >> 24) & 0x80u));
        float d = a - (sum - c);
        acc->ee += d * d;
        if (r->base) {
            float delta = w[j] - decode_fmt(r->base[j], fmt) * r->base_scale;
            acc->ed += float_of(bits_of(d) ^ (b & 0x80000000u)) * delta; /* sign(x) d = x - stored */
            acc->dd += delta * delta;
        }
    }
}

/* The subspace rule along one row (loratool.quant.rounding.round_subspace): column by column, the
 * value plus its feedback g . a_j (products summed pairwise over the padded width) rounded to
 * nearest, and g -= err gain_j. basis and gain are (cols, width); srow is the row's tile scales. */
static void subspace_row(const float *w, uint8_t *q, int64_t cols, const float *srow, int64_t bi, int32_t fmt,
                         const float *basis, const float *gain, int64_t width, int64_t rank, float *g, float *p) {
    for (int64_t k = 0; k < width; k++) g[k] = 0.0f;
    for (int64_t j = 0; j < cols; j++) {
        const float *a = basis + j * width, *u = gain + j * width;
        float v = w[j];
        if (rank) {
            for (int64_t k = 0; k < width; k++) p[k] = g[k] * a[k];
            for (int64_t n = width / 2; n >= 1; n /= 2)
                for (int64_t k = 0; k < n; k++) p[k] = p[2 * k] + p[2 * k + 1];
            v = v + p[0];
        }
        float s = srow[j / bi], stored;
        q[j] = nearest_code(v / s, fmt, &stored);
        float err = stored * s - v;
        for (int64_t k = 0; k < width; k++) g[k] -= err * u[k];
    }
}

/* One run of kept_sums, portable. */
static void kept_run(const float *w, const uint8_t *q, const uint8_t *base, int64_t n, float s, float sb, int32_t fmt,
                     float *acc) {
    for (int64_t j = 0; j < n; j++) {
        float delta = w[j] - decode_fmt(base[j], fmt) * sb, off = w[j] - decode_fmt(q[j], fmt) * s;
        acc[0] += delta * delta;
        acc[1] += off * delta;
        acc[2] += off * off;
    }
}

/* -- the same runs with AVX2 (and F16C), eight or sixteen elements at a time ---------------------- */
#ifdef LT_AVX2
/* F16C converts float16 to float32 exactly, Inf, NaN and subnormals included, so a code becomes a
 * float16 in a few integer operations: e5m2 is a float16's top byte; an e4m3fn code's exponent and
 * mantissa placed in a float16's (sign moved from bit 7 to bit 15) read as its value times 2^-8,
 * which the scale takes back: x * (256 s) rounds the same real number as (256 x) * s, once, for
 * every scale with 256 s finite (the other scales take the portable path). */
__attribute__((target("avx2,f16c"))) static int decode_run_avx2(const uint8_t *q, float *out, int64_t n, float s,
                                                                int32_t fmt) {
    const int e4 = fmt == LT_E4M3FN;
    const float s256 = s * 256.0f;
    if (e4 && !(s256 <= FLT_MAX && s256 >= -FLT_MAX)) return decode_run(q, out, n, s, fmt);
    const __m256 vs = _mm256_set1_ps(e4 ? s256 : s);
    const __m256i sign = _mm256_set1_epi16(0x80);
    const __m128i low7 = _mm_set1_epi8(0x7F);
    __m128i nan = _mm_setzero_si128();
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m128i code = _mm_loadu_si128((const __m128i *)(const void *)(q + j));
        __m256i c = _mm256_cvtepu8_epi16(code);
        __m256i h = e4 ? _mm256_slli_epi16(_mm256_add_epi16(c, _mm256_and_si256(c, sign)), 7) /* bit 7 -> 15 */
                       : _mm256_slli_epi16(c, 8);
        _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), vs));
        _mm256_storeu_ps(out + j + 8, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), vs));
        nan = _mm_or_si128(nan, _mm_cmpeq_epi8(_mm_and_si128(code, low7), low7));
    }
    return decode_run(q + j, out + j, n - j, s, fmt) | (e4 && !_mm_testz_si128(nan, nan));
}

static inline float hsum_avx(__m256 v) __attribute__((target("avx2")));
static inline float hsum_avx(__m256 v) {
    float lanes[8], total = 0.0f;
    _mm256_storeu_ps(lanes, v);
    for (int k = 0; k < 8; k++) total += lanes[k];
    return total;
}

__attribute__((target("avx2,f16c"))) static void encode_run_avx2(const float *w, uint8_t *q, int64_t n, float s,
                                                                int32_t fmt, const Run *r, Sums *acc) {
    const Format f = FORMATS[fmt];
    const int e4 = fmt == LT_E4M3FN;
    const float sb = r->base ? (e4 ? r->base_scale * 256.0f : r->base_scale) : 1.0f;
    if (!(sb <= FLT_MAX && sb >= -FLT_MAX)) { /* the base's decode through F16C needs 256 s finite */
        encode_run(w, q, n, s, fmt, r, acc);
        return;
    }
    const __m256 vs = _mm256_set1_ps(s), top = _mm256_set1_ps(f.top), vsb = _mm256_set1_ps(sb);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
    const __m256i exp_mask = _mm256_set1_epi32(0x7F800000), min_exp = _mm256_set1_epi32((int)f.min_exp);
    const __m256i shift = _mm256_set1_epi32((int)(f.shift << 23)), low8 = _mm256_set1_epi32(0xFF);
    const __m256i mbits = _mm256_set1_epi32((int)((23u - f.shift) << 23));
    const __m256i base = _mm256_set1_epi32((int)(f.min_exp >> f.shift)), bit7 = _mm256_set1_epi32(0x80);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), row_hash = _mm256_set1_epi32((int)r->row_hash);
    const __m256i mul1 = _mm256_set1_epi32(0x21F0AAAD), mul2 = _mm256_set1_epi32(0x735A2D97);
    const __m256 unit = _mm256_set1_ps(0x1p-24f), one = _mm256_set1_ps(1.0f);
    const __m128i count = _mm_cvtsi32_si128((int)f.shift), sign8 = _mm_set1_epi16(0x80);
    __m256 vee = _mm256_setzero_ps(), ved = _mm256_setzero_ps(), vdd = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 wv = _mm256_loadu_ps(w + j);
        __m256 x = _mm256_div_ps(wv, vs);
        __m256 a = _mm256_and_ps(x, abs_mask);
        __m256 ac = _mm256_min_ps(a, top);
        __m256i e = _mm256_max_epu32(_mm256_and_si256(_mm256_castps_si256(ac), exp_mask), min_exp);
        __m256 c = _mm256_castsi256_ps(_mm256_add_epi32(e, shift));
        __m256 sum;
        if (r->stochastic) {
            __m256 spacing = _mm256_castsi256_ps(_mm256_sub_epi32(e, mbits));
            __m256 y = _mm256_div_ps(ac, spacing);
            __m256 below = _mm256_round_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            __m256i h = _mm256_xor_si256(row_hash, _mm256_add_epi32(_mm256_set1_epi32((int)(r->col0 + (uint32_t)j)), lane));
            h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
            h = _mm256_mullo_epi32(h, mul1);
            h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
            h = _mm256_mullo_epi32(h, mul2);
            h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
            __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), unit);
            __m256 up = _mm256_and_ps(_mm256_cmp_ps(u, _mm256_sub_ps(y, below), _CMP_LT_OQ), one);
            sum = _mm256_add_ps(_mm256_mul_ps(_mm256_add_ps(below, up), spacing), c);
        } else {
            sum = _mm256_add_ps(ac, c);
        }
        __m256i code = _mm256_add_epi32(_mm256_sub_epi32(_mm256_srl_epi32(e, count), base),
                                        _mm256_and_si256(_mm256_castps_si256(sum), low8));
        code = _mm256_or_si256(code, _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(x), 24), bit7));
        __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
        _mm_storel_epi64((__m128i *)(void *)(q + j), _mm_packus_epi16(words, words));
        __m256 d = _mm256_sub_ps(a, _mm256_sub_ps(sum, c));
        vee = _mm256_add_ps(vee, _mm256_mul_ps(d, d));
        if (r->base) { /* the base's codes through float16, as decode_run_avx2 */
            __m128i cb = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(const void *)(r->base + j)));
            __m128i hb = e4 ? _mm_slli_epi16(_mm_add_epi16(cb, _mm_and_si128(cb, sign8)), 7) : _mm_slli_epi16(cb, 8);
            __m256 delta = _mm256_sub_ps(wv, _mm256_mul_ps(_mm256_cvtph_ps(hb), vsb));
            __m256 err = _mm256_xor_ps(d, _mm256_and_ps(x, sign_mask)); /* sign(x) d = x - stored */
            ved = _mm256_add_ps(ved, _mm256_mul_ps(err, delta));
            vdd = _mm256_add_ps(vdd, _mm256_mul_ps(delta, delta));
        }
    }
    Run rest = *r;
    rest.col0 += (uint32_t)j;
    rest.base = r->base ? r->base + j : NULL;
    encode_run(w + j, q + j, n - j, s, fmt, &rest, acc);
    acc->ee += hsum_avx(vee);
    acc->ed += hsum_avx(ved);
    acc->dd += hsum_avx(vdd);
}

/* 8 rows of 8 floats (row l at in + l * stride) stored as 8 columns of 8 (column c at out + c * step). */
__attribute__((target("avx2"))) static inline void transpose8(const float *in, int64_t stride, float *out, int64_t step) {
    __m256 r0 = _mm256_loadu_ps(in), r1 = _mm256_loadu_ps(in + stride), r2 = _mm256_loadu_ps(in + 2 * stride);
    __m256 r3 = _mm256_loadu_ps(in + 3 * stride), r4 = _mm256_loadu_ps(in + 4 * stride);
    __m256 r5 = _mm256_loadu_ps(in + 5 * stride), r6 = _mm256_loadu_ps(in + 6 * stride);
    __m256 r7 = _mm256_loadu_ps(in + 7 * stride);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3);
    __m256 t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(out + step, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(out + 2 * step, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(out + 3 * step, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(out + 4 * step, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(out + 5 * step, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(out + 6 * step, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(out + 7 * step, _mm256_permute2f128_ps(u3, u7, 0x31));
}

/* Codes gathered column by column (ct: cols x lanes bytes) back to their rows of q: 8 columns of
 * 16 lanes at a time by byte, word and dword unpacks, the rest one by one. */
__attribute__((target("avx2"))) static void write_codes(const uint8_t *ct, int64_t lanes, int64_t cols, uint8_t *q,
                                                        int64_t stride) {
    int64_t j0 = 0;
    if (lanes % 16 == 0)
        for (; j0 + 8 <= cols; j0 += 8)
            for (int64_t lb = 0; lb < lanes; lb += 16) {
                __m128i a[8], b[8], c[8];
                for (int k = 0; k < 8; k++) a[k] = _mm_loadu_si128((const __m128i *)(const void *)(ct + (j0 + k) * lanes + lb));
                for (int k = 0; k < 4; k++) {
                    b[2 * k] = _mm_unpacklo_epi8(a[2 * k], a[2 * k + 1]);     /* lanes 0-7, columns 2k, 2k+1 */
                    b[2 * k + 1] = _mm_unpackhi_epi8(a[2 * k], a[2 * k + 1]); /* lanes 8-15 */
                }
                for (int h = 0; h < 2; h++) { /* columns 0-3 (h = 0) and 4-7 */
                    c[4 * h] = _mm_unpacklo_epi16(b[4 * h], b[4 * h + 2]);         /* lanes 0-3 */
                    c[4 * h + 1] = _mm_unpackhi_epi16(b[4 * h], b[4 * h + 2]);     /* lanes 4-7 */
                    c[4 * h + 2] = _mm_unpacklo_epi16(b[4 * h + 1], b[4 * h + 3]); /* lanes 8-11 */
                    c[4 * h + 3] = _mm_unpackhi_epi16(b[4 * h + 1], b[4 * h + 3]); /* lanes 12-15 */
                }
                for (int k = 0; k < 4; k++) { /* lanes 4k .. 4k+3, all 8 columns: two lanes per vector */
                    __m128i lo = _mm_unpacklo_epi32(c[k], c[4 + k]), hi = _mm_unpackhi_epi32(c[k], c[4 + k]);
                    uint8_t *row = q + (lb + 4 * k) * stride + j0;
                    _mm_storel_epi64((__m128i *)(void *)row, lo);
                    _mm_storeh_pi((__m64 *)(void *)(row + stride), _mm_castsi128_ps(lo));
                    _mm_storel_epi64((__m128i *)(void *)(row + 2 * stride), hi);
                    _mm_storeh_pi((__m64 *)(void *)(row + 3 * stride), _mm_castsi128_ps(hi));
                }
            }
    for (int64_t l = 0; l < lanes; l++)
        for (int64_t j = j0; j < cols; j++) q[l * stride + j] = ct[j * lanes + l];
}

/* subspace_row for N groups of 8 rows at once, a row per lane: the same operations in the same
 * order, so the same bytes. The rows are first laid out column by column in wt (cols x 8N floats:
 * rows a power-of-two stride apart would share cache sets), and their codes gathered in ct (cols x
 * 8N bytes) before they go back to their rows. The groups' chains are independent, which hides the
 * latency of each column's dependent steps. g and p hold width x N vectors of 8. */
#define LT_GROUPS 4
__attribute__((target("avx2"), always_inline)) static inline void subspace_rows(
    const float *w, uint8_t *q, int64_t stride, int64_t cols, const float *const *srows, int64_t bi, int32_t fmt,
    const float *basis, const float *gain, int64_t width, int64_t rank, __m256 *g, __m256 *p, float *wt, uint8_t *ct,
    const int n) {
    const Format f = FORMATS[fmt];
    const int64_t lanes = 8 * n;
    const __m256 top = _mm256_set1_ps(f.top);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
    const __m256i exp_mask = _mm256_set1_epi32(0x7F800000), min_exp = _mm256_set1_epi32((int)f.min_exp);
    const __m256i shift = _mm256_set1_epi32((int)(f.shift << 23)), low8 = _mm256_set1_epi32(0xFF);
    const __m256i first = _mm256_set1_epi32((int)(f.min_exp >> f.shift)), bit7 = _mm256_set1_epi32(0x80);
    const __m128i count = _mm_cvtsi32_si128((int)f.shift);
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8)
        for (int b = 0; b < n; b++) transpose8(w + 8 * b * stride + j, stride, wt + j * lanes + 8 * b, lanes);
    for (; j < cols; j++)
        for (int64_t l = 0; l < lanes; l++) wt[j * lanes + l] = w[l * stride + j];
    for (int64_t k = 0; k < width * n; k++) g[k] = _mm256_setzero_ps();
    __m256 s[LT_GROUPS] = {0}, v[LT_GROUPS];
    float scales[8];
    int64_t tile = -1, next = 0; /* the tile of column j, and where the next begins */
    for (j = 0; j < cols; j++) {
        if (j == next) { /* a new tile: each lane's scale */
            tile++;
            next += bi;
            for (int b = 0; b < n; b++) {
                for (int l = 0; l < 8; l++) scales[l] = srows[8 * b + l][tile];
                s[b] = _mm256_loadu_ps(scales);
            }
        }
        const float *a = basis + j * width, *u = gain + j * width;
        for (int b = 0; b < n; b++) {
            v[b] = _mm256_loadu_ps(wt + j * lanes + 8 * b);
            if (!rank) continue;
            for (int64_t c = 0; c < width / 8; c++) { /* 8 products summed pairwise, in registers */
                const __m256 *gc = g + 8 * c * n + b;
                const float *ac = a + 8 * c;
                __m256 p0 = _mm256_mul_ps(gc[0], _mm256_broadcast_ss(ac)), p1 = _mm256_mul_ps(gc[n], _mm256_broadcast_ss(ac + 1));
                __m256 p2 = _mm256_mul_ps(gc[2 * n], _mm256_broadcast_ss(ac + 2));
                __m256 p3 = _mm256_mul_ps(gc[3 * n], _mm256_broadcast_ss(ac + 3));
                __m256 p4 = _mm256_mul_ps(gc[4 * n], _mm256_broadcast_ss(ac + 4));
                __m256 p5 = _mm256_mul_ps(gc[5 * n], _mm256_broadcast_ss(ac + 5));
                __m256 p6 = _mm256_mul_ps(gc[6 * n], _mm256_broadcast_ss(ac + 6));
                __m256 p7 = _mm256_mul_ps(gc[7 * n], _mm256_broadcast_ss(ac + 7));
                p[c * n + b] = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(p0, p1), _mm256_add_ps(p2, p3)),
                                             _mm256_add_ps(_mm256_add_ps(p4, p5), _mm256_add_ps(p6, p7)));
            }
            for (int64_t m = width / 16; m >= 1; m /= 2) /* the chunks' sums, pairwise */
                for (int64_t k = 0; k < m; k++) p[k * n + b] = _mm256_add_ps(p[2 * k * n + b], p[(2 * k + 1) * n + b]);
            v[b] = _mm256_add_ps(v[b], p[b]);
        }
        for (int b = 0; b < n; b++) {
            __m256 x = _mm256_div_ps(v[b], s[b]);
            __m256 ac = _mm256_min_ps(_mm256_and_ps(x, abs_mask), top);
            __m256i e = _mm256_max_epu32(_mm256_and_si256(_mm256_castps_si256(ac), exp_mask), min_exp);
            __m256 c = _mm256_castsi256_ps(_mm256_add_epi32(e, shift));
            __m256 sum = _mm256_add_ps(ac, c);
            __m256 stored = _mm256_or_ps(_mm256_sub_ps(sum, c), _mm256_and_ps(x, sign_mask));
            __m256i code = _mm256_add_epi32(_mm256_sub_epi32(_mm256_srl_epi32(e, count), first),
                                            _mm256_and_si256(_mm256_castps_si256(sum), low8));
            code = _mm256_or_si256(code, _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(x), 24), bit7));
            __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
            _mm_storel_epi64((__m128i *)(void *)(ct + j * lanes + 8 * b), _mm_packus_epi16(words, words));
            v[b] = _mm256_sub_ps(_mm256_mul_ps(stored, s[b]), v[b]); /* the error */
        }
        for (int64_t k = 0; k < width; k++) {
            __m256 uk = _mm256_set1_ps(u[k]);
            for (int b = 0; b < n; b++) g[k * n + b] = _mm256_sub_ps(g[k * n + b], _mm256_mul_ps(v[b], uk));
        }
    }
    write_codes(ct, lanes, cols, q, stride);
}

__attribute__((target("avx2"))) static void subspace_rows_many(const float *w, uint8_t *q, int64_t stride,
                                                               int64_t cols, const float *const *srows, int64_t bi,
                                                               int32_t fmt, const float *basis, const float *gain,
                                                               int64_t width, int64_t rank, __m256 *g, __m256 *p,
                                                               float *wt, uint8_t *ct) {
    subspace_rows(w, q, stride, cols, srows, bi, fmt, basis, gain, width, rank, g, p, wt, ct, LT_GROUPS);
}

__attribute__((target("avx2"))) static void subspace_rows_one(const float *w, uint8_t *q, int64_t stride,
                                                              int64_t cols, const float *const *srows, int64_t bi,
                                                              int32_t fmt, const float *basis, const float *gain,
                                                              int64_t width, int64_t rank, __m256 *g, __m256 *p,
                                                              float *wt, uint8_t *ct) {
    subspace_rows(w, q, stride, cols, srows, bi, fmt, basis, gain, width, rank, g, p, wt, ct, 1);
}

/* kept_sums over one run of n elements of one tile (scales s, sb), eight at a time: both codes
 * decoded through float16 (as decode_run_avx2), float sums per run. Needs 256 s and 256 sb finite. */
__attribute__((target("avx2,f16c"))) static void kept_run_avx2(const float *w, const uint8_t *q, const uint8_t *base,
                                                              int64_t n, float s, float sb, int32_t fmt, float *acc) {
    const int e4 = fmt == LT_E4M3FN;
    const __m256 vs = _mm256_set1_ps(e4 ? s * 256.0f : s), vsb = _mm256_set1_ps(e4 ? sb * 256.0f : sb);
    const __m128i sign8 = _mm_set1_epi16(0x80);
    __m256 dd = _mm256_setzero_ps(), ed = _mm256_setzero_ps(), ee = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m128i cq = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(const void *)(q + j)));
        __m128i cb = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(const void *)(base + j)));
        __m128i hq = e4 ? _mm_slli_epi16(_mm_add_epi16(cq, _mm_and_si128(cq, sign8)), 7) : _mm_slli_epi16(cq, 8);
        __m128i hb = e4 ? _mm_slli_epi16(_mm_add_epi16(cb, _mm_and_si128(cb, sign8)), 7) : _mm_slli_epi16(cb, 8);
        __m256 wv = _mm256_loadu_ps(w + j);
        __m256 delta = _mm256_sub_ps(wv, _mm256_mul_ps(_mm256_cvtph_ps(hb), vsb));
        __m256 off = _mm256_sub_ps(wv, _mm256_mul_ps(_mm256_cvtph_ps(hq), vs));
        dd = _mm256_add_ps(dd, _mm256_mul_ps(delta, delta));
        ed = _mm256_add_ps(ed, _mm256_mul_ps(off, delta));
        ee = _mm256_add_ps(ee, _mm256_mul_ps(off, off));
    }
    acc[0] += hsum_avx(dd);
    acc[1] += hsum_avx(ed);
    acc[2] += hsum_avx(ee);
    for (; j < n; j++) {
        float delta = w[j] - decode_fmt(base[j], fmt) * sb, off = w[j] - decode_fmt(q[j], fmt) * s;
        acc[0] += delta * delta;
        acc[1] += off * delta;
        acc[2] += off * off;
    }
}

__attribute__((target("avx2"))) static uint32_t max_bits_avx2(const float *w, int64_t n, uint32_t m) {
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
    __m256i vm = _mm256_set1_epi32((int)m);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        vm = _mm256_max_epu32(vm, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(const void *)(w + j)), abs_mask));
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i *)(void *)lanes, vm);
    for (int k = 0; k < 8; k++) m = lanes[k] > m ? lanes[k] : m;
    return max_bits(w + j, n - j, m);
}

static int simd_allowed = 2;

/* The CPU's SIMD level: 0 none of use, 1 AVX2 and F16C, 2 also AVX-512 (F, BW, DQ, VL: lowbit.c's
 * variants); capped by lt_fp8_simd. */
static int simd_level(void) {
    static int known = -1;
    if (known < 0) {
        known = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") ? 1 : 0;
        if (known && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
            known = 2;
    }
    return known < simd_allowed ? known : simd_allowed;
}
static int simd_usable(void) { return simd_level() > 0; }
int lt_simd_usable(void) { return simd_level(); } /* lowbit.c's too (hidden: not exported) */
#define DECODE_RUN (simd_usable() ? decode_run_avx2 : decode_run)
#define MAX_BITS (simd_usable() ? max_bits_avx2 : max_bits)
#define ENCODE_RUN (simd_usable() ? encode_run_avx2 : encode_run)
#else
#define DECODE_RUN decode_run
#define MAX_BITS max_bits
#define ENCODE_RUN encode_run
#endif

/* The kept sums of written codes q against the merged w and the base's codes (real units), added
 * to sums: <delta, delta>, <err, delta>, <err, err> with delta = w - base, err = w - stored. */
static void kept_sums(const float *w, const uint8_t *q, const uint8_t *base, int64_t rows, int64_t cols, int64_t row0,
                      const float *scale, const float *base_scale, int64_t bo, int64_t bi, int32_t fmt,
                      double *sums) {
    int64_t nb = (cols + bi - 1) / bi;
    for (int64_t i = 0; i < rows; i++) {
        const float *srow = scale + ((row0 + i) / bo) * nb, *brow = base_scale + ((row0 + i) / bo) * nb;
        for (int64_t t = 0; t < nb; t++) {
            int64_t j1 = (t + 1) * bi < cols ? (t + 1) * bi : cols;
            float s = srow[t], sb = brow[t];
            int simd = 0;
#ifdef LT_AVX2
            float s256 = s * 256.0f, sb256 = sb * 256.0f;
            simd = simd_usable() && s256 <= FLT_MAX && sb256 <= FLT_MAX;
#endif
            for (int64_t j = t * bi; j < j1; j += LT_RUN) { /* float runs, double sums */
                int64_t n = j1 - j < LT_RUN ? j1 - j : LT_RUN, at = i * cols + j;
                float acc[3] = {0.0f, 0.0f, 0.0f};
#ifdef LT_AVX2
                if (simd) kept_run_avx2(w + at, q + at, base + at, n, s, sb, fmt, acc);
                else
#endif
                    kept_run(w + at, q + at, base + at, n, s, sb, fmt, acc);
                for (int m = 0; m < 3; m++) sums[m] += acc[m];
            }
        }
    }
}

/* -- the entry points: rows of tiles ------------------------------------------------------------ */

/* Raised with any change to an entry point's signature or meaning: loratool.quant.native loads only its own. */
LT_EXPORT int32_t lt_fp8_abi(void) { return 11; } /* lowbit.c's entry points included */

/* The highest SIMD level to use where the CPU has it (see simd_level; tests run each, the portable
 * C too); returns the level used now. */
LT_EXPORT int32_t lt_fp8_simd(int32_t allow) {
#ifdef LT_AVX2
    simd_allowed = allow;
    return simd_level();
#else
    (void)allow;
    return 0;
#endif
}

/* out[i][j] = decode(q[i][j]) * the scale of its tile. Returns whether any code was one of e4m3fn's
 * NaNs, which come out as +-480 times the scale. */
LT_EXPORT int32_t lt_fp8_decode(const uint8_t *q, float *out, int64_t rows, int64_t cols, int64_t row0,
                                const float *scale, int64_t bo, int64_t bi, int32_t fmt) {
    int (*run)(const uint8_t *, float *, int64_t, float, int32_t) = DECODE_RUN;
    int64_t nb = (cols + bi - 1) / bi;
    int nan = 0;
    for (int64_t i = 0; i < rows; i++) {
        const float *srow = scale + ((row0 + i) / bo) * nb;
        for (int64_t t = 0; t < nb; t++) {
            int64_t j0 = t * bi, n = cols - j0 < bi ? cols - j0 : bi;
            nan |= run(q + i * cols + j0, out + i * cols + j0, n, srow[t], fmt);
        }
    }
    return nan;
}

/* scale[(row0 + i) / bo][t] = the largest |w[i][j]| of the tile over the format's largest value,
 * or 1 for a tile of zeros: the new scales, as torch's amax, division and where would give them,
 * for whole tiles (rows start a block row). Returns 1 where a tile holds an Inf or a NaN, the scale
 * array then holding bit patterns, not scales. */
LT_EXPORT int32_t lt_fp8_scales(const float *w, int64_t rows, int64_t cols, int64_t row0, int64_t bo, int64_t bi,
                                int32_t fmt, float *scale) {
    uint32_t (*run)(const float *, int64_t, uint32_t) = MAX_BITS;
    int64_t nb = (cols + bi - 1) / bi, first = row0 / bo, last = (row0 + rows - 1) / bo;
    uint32_t *maxima = (uint32_t *)(void *)(scale + first * nb); /* each tile's maximum, as bits, in place */
    memset(maxima, 0, (size_t)((last - first + 1) * nb) * sizeof *maxima);
    for (int64_t i = 0; i < rows; i++) {
        uint32_t *mrow = maxima + ((row0 + i) / bo - first) * nb;
        for (int64_t t = 0; t < nb; t++) {
            int64_t j0 = t * bi, n = cols - j0 < bi ? cols - j0 : bi;
            mrow[t] = run(w + i * cols + j0, n, mrow[t]);
        }
    }
    const float top = FORMATS[fmt].top;
    for (int64_t k = 0; k < (last - first + 1) * nb; k++)
        if (maxima[k] >= 0x7F800000u) return 1;
    for (int64_t k = 0; k < (last - first + 1) * nb; k++) {
        float s = float_of(maxima[k]) / top;
        scale[first * nb + k] = s > 0.0f ? s : 1.0f;
    }
    return 0;
}

/* q[i][j] = w[i][j] / the scale of its tile as an FP8 code: nearest (ties to even) or, with
 * `stochastic`, by the stream of `key` for rows first_row.. of the whole weight (saturating either
 * way). Returns the squared requantization error, the sum of (w / scale - stored)^2 * scale^2. w
 * must be finite (the tile maxima show it). Where `base` (the base's codes, w's shape) and
 * `base_scale` (its scales, tiled as `scale`) are given, adds to sums[0..3) the kept sums over
 * these elements, with delta = w - base and err = w - stored: <delta, delta>, <err, delta>,
 * <err, err>. */
LT_EXPORT double lt_fp8_encode(const float *w, uint8_t *q, int64_t rows, int64_t cols, int64_t row0,
                               const float *scale, int64_t bo, int64_t bi, int32_t fmt, const uint8_t *base,
                               const float *base_scale, uint32_t key, int64_t first_row, int32_t stochastic,
                               double *sums) {
    void (*run)(const float *, uint8_t *, int64_t, float, int32_t, const Run *, Sums *) = ENCODE_RUN;
    int64_t nb = (cols + bi - 1) / bi;
    double ee = 0.0, ed = 0.0, dd = 0.0;
    for (int64_t i = 0; i < rows; i++) {
        const float *srow = scale + ((row0 + i) / bo) * nb;
        const float *brow = base ? base_scale + ((row0 + i) / bo) * nb : NULL;
        Run r = {stochastic, mix32((uint32_t)(first_row + i) ^ key), 0u, NULL, 1.0f};
        for (int64_t t = 0; t < nb; t++) {
            int64_t j1 = (t + 1) * bi < cols ? (t + 1) * bi : cols;
            double s = srow[t], tee = 0.0, ted = 0.0, tdd = 0.0;
            for (int64_t j = t * bi; j < j1; j += LT_RUN) {
                int64_t n = j1 - j < LT_RUN ? j1 - j : LT_RUN;
                Sums acc = {0.0f, 0.0f, 0.0f};
                r.col0 = (uint32_t)j;
                r.base = base ? base + i * cols + j : NULL;
                r.base_scale = brow ? brow[t] : 1.0f;
                run(w + i * cols + j, q + i * cols + j, n, srow[t], fmt, &r, &acc);
                tee += acc.ee;
                ted += acc.ed;
                tdd += acc.dd;
            }
            ee += tee * s * s;
            ed += ted * s;
            dd += tdd;
        }
    }
    if (sums) {
        sums[0] += dd;
        sums[1] += ed;
        sums[2] += ee;
    }
    return ee;
}

/* q = w / scale rounded by the subspace rule (loratool.quant.rounding.round_subspace) with the
 * weight's `basis` and `gain` ((cols, width) each, width a power of two, zero past `rank`), row by
 * row; rows are independent, so a caller may split them across threads. `base` and `base_scale`
 * (the base's codes and scales, tiled as `scale`; NULL: none) give the kept sums, added to sums[0..3)
 * as lt_fp8_encode's. Returns 0, or 1 where its working memory could not be had (nothing written). */
LT_EXPORT int32_t lt_fp8_subspace(const float *w, uint8_t *q, int64_t rows, int64_t cols, int64_t row0,
                                  const float *scale, int64_t bo, int64_t bi, int32_t fmt, const uint8_t *base,
                                  const float *base_scale, const float *basis, const float *gain, int64_t width,
                                  int64_t rank, double *sums) {
    int64_t nb = (cols + bi - 1) / bi;
    size_t vectors = (size_t)(8 * 4 * width); /* g and p for 4 groups of 8 rows */
    size_t floats = 2 * vectors + (size_t)(cols * 32) + (size_t)(cols * 32 + 31) / 4; /* and wt, ct */
    float *work = (float *)aligned_alloc(32, (floats + 7) / 8 * 8 * sizeof(float));
    if (!work) return 1;
    int64_t i = 0;
#ifdef LT_AVX2
    if (simd_usable()) {
        const float *srows[8 * LT_GROUPS];
        __m256 *g = (__m256 *)(void *)work, *p = (__m256 *)(void *)(work + vectors);
        float *wt = work + 2 * vectors;
        uint8_t *ct = (uint8_t *)(void *)(wt + cols * 32);
        for (; i + 8 <= rows;) {
            int n = i + 8 * LT_GROUPS <= rows ? LT_GROUPS : 1;
            for (int l = 0; l < 8 * n; l++) srows[l] = scale + ((row0 + i + l) / bo) * nb;
            (n == LT_GROUPS ? subspace_rows_many : subspace_rows_one)(w + i * cols, q + i * cols, cols, cols, srows, bi,
                                                                      fmt, basis, gain, width, rank, g, p, wt, ct);
            i += 8 * n;
        }
    }
#endif
    for (; i < rows; i++)
        subspace_row(w + i * cols, q + i * cols, cols, scale + ((row0 + i) / bo) * nb, bi, fmt, basis, gain, width,
                     rank, work, work + width);
    if (base) kept_sums(w, q, base, rows, cols, row0, scale, base_scale, bo, bi, fmt, sums);
    free(work);
    return 0;
}

/* unmerge --check over bfloat16 tensors of n elements, in one pass (ops/merge/check.py's RoundTripCheck.add
 * does the same in torch passes): sums[0] += sum r^2 and sums[1] += sum (o - r)^2 (runs of LT_RUN summed in
 * float, then double), sums[2] = max(sums[2], |o - r|), sums[3] = max(sums[3], |o - r| / unit) where unit is
 * bfloat16's spacing at max(|r|, |m|), 2^(exponent - 7); every difference and quotient is exact in float.
 * o: the restored values, r: the original's, m: the merged input's. Returns how many elements differ. */
/* One element of lt_check_bf16, branch-free (a differing element is as cheap as an equal one, so the
 * lanes below vectorize): its square into base, its difference's into diff, the maxima, the count. */
static inline void check_one(uint16_t o, uint16_t r, uint16_t m, float *base, float *diff, float *max_abs,
                             float *max_units, int32_t *differing) {
    uint32_t rb = (uint32_t)r << 16, mb = (uint32_t)m << 16;
    float rf = float_of(rb), d = float_of((uint32_t)o << 16) - rf;
    float ad = float_of(bits_of(d) & 0x7FFFFFFFu);
    uint32_t ar = rb & 0x7FFFFFFFu, am = mb & 0x7FFFFFFFu; /* magnitudes compare as integers */
    uint32_t mag = ar > am ? ar : am;
    mag = mag < 0x00800000u ? 0x00800000u : mag; /* FLT_MIN, bfloat16's smallest normal too */
    float units = ad / (float_of(mag & 0x7F800000u) * 0x1p-7f);
    *base += rf * rf;
    *diff += d * d;
    *max_abs = ad > *max_abs ? ad : *max_abs;
    *max_units = units > *max_units ? units : *max_units;
    *differing += d != 0.0f;
}

LT_EXPORT int64_t lt_check_bf16(const uint16_t *o, const uint16_t *r, const uint16_t *m, int64_t n, double *sums) {
    enum { LANES = 8 };
    int64_t differing = 0;
    float max_abs[LANES], max_units[LANES];
    for (int l = 0; l < LANES; l++) max_abs[l] = (float)sums[2], max_units[l] = (float)sums[3];
    for (int64_t start = 0; start < n; start += LT_RUN) {
        int64_t stop = start + LT_RUN < n ? start + LT_RUN : n, i = start;
        float base[LANES] = {0}, diff[LANES] = {0};
        int32_t count[LANES] = {0};
        for (; i + LANES <= stop; i += LANES)
            for (int l = 0; l < LANES; l++)
                check_one(o[i + l], r[i + l], m[i + l], &base[l], &diff[l], &max_abs[l], &max_units[l], &count[l]);
        for (; i < stop; i++) check_one(o[i], r[i], m[i], &base[0], &diff[0], &max_abs[0], &max_units[0], &count[0]);
        for (int l = 0; l < LANES; l++) sums[0] += base[l], sums[1] += diff[l], differing += count[l];
    }
    for (int l = 0; l < LANES; l++) {
        if (max_abs[l] > sums[2]) sums[2] = max_abs[l];
        if (max_units[l] > sums[3]) sums[3] = max_units[l];
    }
    return differing;
}
