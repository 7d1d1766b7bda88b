#ifndef CN_KERNELS_H
#define CN_KERNELS_H
/* C helpers of cnorm's Cython kernels (_kernels.pyx).

   1. Half-precision storage: float16 and bfloat16 as 16-bit patterns,
      converted to and from float32 bit-exactly (round to nearest even,
      subnormals kept, NaN stays NaN, overflow gives Inf) by branch-free
      integer code that GCC and clang vectorize.
   2. The lane-wise reductions ("runs") every statistics and gradient sweep
      is made of, for each storage type. They live in C for one reason: the
      loop over the CN_LANES double accumulators must stay a loop (not be
      unrolled into scalar code) for GCC's loop vectorizer to turn it into
      float->double conversions and vector adds, which Cython cannot ask for.
      Accumulator j holds the elements i with i % CN_LANES == j, in order:
      the result depends on positions only, never on threads or alignment. */
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
/* Cython emits every combination of the kernels' two fused types (storage x
   statistics); only four are called, the rest are dead code by design. */
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wunused-function"
#endif
#include <string.h>
typedef struct { uint16_t v; } cn_bf16;
typedef struct { uint16_t v; } cn_f16;
static inline float cn_u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t cn_f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float cn_bf16_to_f32(cn_bf16 h) { return cn_u2f((uint32_t)h.v << 16); }
static inline cn_bf16 cn_f32_to_bf16(float f) {
    uint32_t u = cn_f2u(f);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t q = (u >> 16) | 0x40u;
    uint32_t mn = 0u - (uint32_t)((u & 0x7fffffffu) > 0x7f800000u);
    cn_bf16 h; h.v = (uint16_t)((q & mn) | (r & ~mn)); return h;
}
static inline float cn_f16_to_f32(cn_f16 h) {
    uint32_t x = h.v, em = x & 0x7fffu, sign = (x & 0x8000u) << 16;
    uint32_t n = (em << 13) + ((127u - 15u) << 23);
    uint32_t inf = n + ((128u - 16u) << 23);
    float sub = (float)em * 5.9604644775390625e-08f;   /* em * 2^-24 exactly */
    uint32_t minf = 0u - (uint32_t)(em >= 0x7c00u), msub = 0u - (uint32_t)(em < 0x0400u);
    uint32_t o = (inf & minf) | (~minf & ((cn_f2u(sub) & msub) | (n & ~msub)));
    return cn_u2f(o | sign);
}
static inline cn_f16 cn_f32_to_f16(float f) {
    uint32_t u = cn_f2u(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    /* Inf; NaN keeps its top payload bits with the quiet bit set, as F16C's vcvtps2ph does */
    uint32_t big = 0x7c00u | ((0u - (uint32_t)(a > 0x7f800000u)) & (0x200u | ((a >> 13) & 0x3ffu)));
    float den = cn_u2f(a) + 0.5f;                      /* magic: result in low bits, RNE by the FPU */
    uint32_t sub = cn_f2u(den) - 0x3f000000u;
    uint32_t nrm = (a + ((uint32_t)(15 - 127) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    uint32_t mbig = 0u - (uint32_t)(a >= 0x47800000u), msub = 0u - (uint32_t)(a < 0x38800000u);
    uint32_t o = (big & mbig) | (~mbig & ((sub & msub) | (nrm & ~msub)));
    cn_f16 h; h.v = (uint16_t)(o | sign); return h;
}
/* ------------------------------------------------------------------ runs -- */
#include <stddef.h>
#define CN_LANES 16
#if defined(__GNUC__) && !defined(__clang__)
#define CN_KEEP_LOOP _Pragma("GCC unroll 1")
#else
#define CN_KEEP_LOOP
#endif

#define CN_LD_float(p) ((double)*(p))
#define CN_LD_double(p) (*(p))
#define CN_LD_cn_bf16(p) ((double)cn_bf16_to_f32(*(p)))
#define CN_LD_cn_f16(p) ((double)cn_f16_to_f32(*(p)))
#define CN_LDF_float(p) (*(p))
#define CN_LDF_cn_bf16(p) cn_bf16_to_f32(*(p))
#define CN_LDF_cn_f16(p) cn_f16_to_f32(*(p))

/* T: storage type */
#define CN_RUNS(T)                                                                     \
/* acc[i % L] += x[i] - piv */                                                            \
static inline void cn_sum_run_##T(const T* x, ptrdiff_t n, double piv, double* acc) {     \
    double a[CN_LANES]; ptrdiff_t i, j, nv = n - n % CN_LANES;                            \
    for (j = 0; j < CN_LANES; j++) a[j] = acc[j];                                         \
    for (i = 0; i < nv; i += CN_LANES) {                                                  \
        CN_KEEP_LOOP                                                                      \
        for (j = 0; j < CN_LANES; j++) a[j] += CN_LD_##T(x + i + j) - piv;                \
    }                                                                                     \
    for (j = 0; j < n - nv; j++) a[j] += CN_LD_##T(x + nv + j) - piv;                     \
    for (j = 0; j < CN_LANES; j++) acc[j] = a[j];                                         \
}                                                                                         \
/* acc[i % L] += (x[i] - m)^2 */                                                          \
static inline void cn_sq_run_##T(const T* x, ptrdiff_t n, double m, double* acc) {        \
    double a[CN_LANES]; ptrdiff_t i, j, nv = n - n % CN_LANES;                            \
    for (j = 0; j < CN_LANES; j++) a[j] = acc[j];                                         \
    for (i = 0; i < nv; i += CN_LANES) {                                                  \
        CN_KEEP_LOOP                                                                      \
        for (j = 0; j < CN_LANES; j++) {                                                  \
            double d = CN_LD_##T(x + i + j) - m; a[j] += d * d;                           \
        }                                                                                 \
    }                                                                                     \
    for (j = 0; j < n - nv; j++) { double d = CN_LD_##T(x + nv + j) - m; a[j] += d * d; } \
    for (j = 0; j < CN_LANES; j++) acc[j] = a[j];                                         \
}                                                                                         \
/* ag += g, agx += g (x - m), ax += x - m */                                              \
static inline void cn_grad_run_##T(const T* g, const T* x, ptrdiff_t n, double m,         \
                                   double* ag, double* agx, double* ax) {                 \
    double a[CN_LANES], b[CN_LANES], c[CN_LANES]; ptrdiff_t i, j, nv = n - n % CN_LANES;  \
    for (j = 0; j < CN_LANES; j++) { a[j] = ag[j]; b[j] = agx[j]; c[j] = ax[j]; }         \
    for (i = 0; i < nv; i += CN_LANES) {                                                  \
        CN_KEEP_LOOP                                                                      \
        for (j = 0; j < CN_LANES; j++) {                                                  \
            double gv = CN_LD_##T(g + i + j), d = CN_LD_##T(x + i + j) - m;               \
            a[j] += gv; b[j] += gv * d; c[j] += d;                                        \
        }                                                                                 \
    }                                                                                     \
    for (j = 0; j < n - nv; j++) {                                                        \
        double gv = CN_LD_##T(g + nv + j), d = CN_LD_##T(x + nv + j) - m;                 \
        a[j] += gv; b[j] += gv * d; c[j] += d;                                            \
    }                                                                                     \
    for (j = 0; j < CN_LANES; j++) { ag[j] = a[j]; agx[j] = b[j]; ax[j] = c[j]; }         \
}

/* 16 stored values as float, for loops that would otherwise widen 16-bit
   data element by element (poorly vectorized): a tile converted at once, in
   hardware where the build has AVX-512 (same values as the integer code). */
static inline void cn_cvt16_cn_bf16(const cn_bf16* p, float* o) {
#if defined(__AVX512F__)
    __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    _mm512_storeu_ps(o, _mm512_castsi512_ps(_mm512_slli_epi32(u, 16)));
#else
    int j; for (j = 0; j < 16; j++) o[j] = cn_bf16_to_f32(p[j]);
#endif
}
static inline void cn_cvt16_cn_f16(const cn_f16* p, float* o) {
#if defined(__AVX512F__)
    _mm512_storeu_ps(o, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)));
#else
    int j; for (j = 0; j < 16; j++) o[j] = cn_f16_to_f32(p[j]);
#endif
}
#define CN_TILE_float(t, src) const float* t = (src)
#define CN_TILE_double(t, src) const double* t = (src)
#define CN_TILE_cn_bf16(t, src) float t##_[16]; cn_cvt16_cn_bf16((src), t##_); const float* t = t##_
#define CN_TILE_cn_f16(t, src) float t##_[16]; cn_cvt16_cn_f16((src), t##_); const float* t = t##_

/* Rows of a per-element-affine problem (LayerNorm), split so that every loop
   vectorizes: per-row lane sums (a reduction), then the dweight/dbias column
   sums of up to four rows per pass (elementwise, no reduction), which reads
   and writes the double partials pb/pw once per four rows instead of once
   per row. Row k: values g + k*stride, x + k*stride, centre m[k] + dl[k]. */
#define CN_LNROWS(T, P)                                                                   \
/* awg += w g, awgx += w g (x - m), ax += x - m, lane-wise */                           \
static inline void cn_wsums_##T(const T* g, const T* x, const P* w, ptrdiff_t n, double m, \
                                double* awg, double* awgx, double* ax) {                  \
    double a[CN_LANES], b[CN_LANES], c[CN_LANES]; ptrdiff_t i, j, nv = n - n % CN_LANES;  \
    for (j = 0; j < CN_LANES; j++) { a[j] = awg[j]; b[j] = awgx[j]; c[j] = ax[j]; }       \
    for (i = 0; i < nv; i += CN_LANES) {                                                  \
        CN_TILE_##T(tg, g + i); CN_TILE_##T(tx, x + i);                                   \
        CN_KEEP_LOOP                                                                      \
        for (j = 0; j < CN_LANES; j++) {                                                  \
            double wg = (double)w[i + j] * (double)tg[j], d = (double)tx[j] - m;          \
            a[j] += wg; b[j] += wg * d; c[j] += d;                                        \
        }                                                                                 \
    }                                                                                     \
    for (j = 0; j < n - nv; j++) {                                                        \
        double wg = (double)w[nv + j] * CN_LD_##T(g + nv + j), d = CN_LD_##T(x + nv + j) - m; \
        a[j] += wg; b[j] += wg * d; c[j] += d;                                            \
    }                                                                                     \
    for (j = 0; j < CN_LANES; j++) { awg[j] = a[j]; awgx[j] = b[j]; ax[j] = c[j]; }       \
}                                                                                         \
/* pb[i] += sum_k g_k[i], pw[i] += sum_k g_k[i] (x_k[i] - m[k] - dl[k]) r[k], k < rows <= 4 */ \
static inline void cn_colsums_##T(const T* g, const T* x, ptrdiff_t stride, int rows,     \
                                  ptrdiff_t n, const double* m, const double* dl,         \
                                  const double* r, double* pb, double* pw) {              \
    ptrdiff_t i, j, nv = n - n % 16;                                                      \
    if (rows == 4) {                                                                      \
        const T *g1 = g + stride, *g2 = g + 2 * stride, *g3 = g + 3 * stride;             \
        const T *x1 = x + stride, *x2 = x + 2 * stride, *x3 = x + 3 * stride;             \
        for (i = 0; i < nv; i += 16) {                                                    \
            CN_TILE_##T(ta, g + i); CN_TILE_##T(tb, g1 + i);                              \
            CN_TILE_##T(tc, g2 + i); CN_TILE_##T(td, g3 + i);                             \
            CN_TILE_##T(ua, x + i); CN_TILE_##T(ub, x1 + i);                              \
            CN_TILE_##T(uc, x2 + i); CN_TILE_##T(ud, x3 + i);                             \
            for (j = 0; j < 16; j++) {                                                    \
                double a0 = ta[j], a1 = tb[j], a2 = tc[j], a3 = td[j];                    \
                pb[i + j] += (a0 + a1) + (a2 + a3);                                       \
                pw[i + j] += (a0 * (((double)ua[j] - m[0]) - dl[0]) * r[0]                \
                              + a1 * (((double)ub[j] - m[1]) - dl[1]) * r[1])             \
                           + (a2 * (((double)uc[j] - m[2]) - dl[2]) * r[2]                \
                              + a3 * (((double)ud[j] - m[3]) - dl[3]) * r[3]);            \
            }                                                                             \
        }                                                                                 \
        for (i = nv; i < n; i++) {                                                        \
            double a0 = CN_LD_##T(g + i), a1 = CN_LD_##T(g1 + i);                         \
            double a2 = CN_LD_##T(g2 + i), a3 = CN_LD_##T(g3 + i);                        \
            pb[i] += (a0 + a1) + (a2 + a3);                                               \
            pw[i] += (a0 * ((CN_LD_##T(x + i) - m[0]) - dl[0]) * r[0]                     \
                      + a1 * ((CN_LD_##T(x1 + i) - m[1]) - dl[1]) * r[1])                 \
                   + (a2 * ((CN_LD_##T(x2 + i) - m[2]) - dl[2]) * r[2]                    \
                      + a3 * ((CN_LD_##T(x3 + i) - m[3]) - dl[3]) * r[3]);                \
        }                                                                                 \
        return;                                                                           \
    }                                                                                     \
    for (int k = 0; k < rows; k++) {                                                      \
        const T *gk = g + k * stride, *xk = x + k * stride;                               \
        for (i = 0; i < n; i++) {                                                         \
            double a0 = CN_LD_##T(gk + i);                                                \
            pb[i] += a0;                                                                  \
            pw[i] += a0 * ((CN_LD_##T(xk + i) - m[k]) - dl[k]) * r[k];                    \
        }                                                                                 \
    }                                                                                     \
}

CN_RUNS(float)
CN_RUNS(double)
CN_RUNS(cn_bf16)
CN_RUNS(cn_f16)
/* Half-precision data (and float32 gradient runs): the same runs with float
   arithmetic in CN_FL float lanes over chunks of CN_CHUNK elements (16 terms
   per lane), each chunk then added into double lanes - the widening of 16-bit
   data straight to double vectorizes poorly, and double lanes take four times
   the vector operations of float ones. A run whose float partials are not finite (bfloat16
   |x| ~ 1e30 squares overflow float) is redone by the double version above:
   overflow never reaches the statistics and NaN/Inf inputs still propagate.
   Positions alone decide lanes and chunks: deterministic. */
#define CN_FL 32
#define CN_CHUNK 512
static inline int cn_dlanes_finite(const double* a) {
    double s = 0.0; int j;
    for (j = 0; j < CN_LANES; j++) s += a[j] * 0.0;   /* NaN iff some lane is Inf or NaN */
    return s == 0.0;
}
/* 32 stored values -> float: hardware (F16C/AVX-512) for float16 where the
   build has it, the bit-exact integer conversion otherwise (identical values). */
static inline void cn_cvt32_cn_bf16(const cn_bf16* p, float* o) {
#if defined(__AVX512F__)
    __m512i u0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    __m512i u1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(p + 16)));
    _mm512_storeu_ps(o, _mm512_castsi512_ps(_mm512_slli_epi32(u0, 16)));
    _mm512_storeu_ps(o + 16, _mm512_castsi512_ps(_mm512_slli_epi32(u1, 16)));
#else
    int j; for (j = 0; j < 32; j++) o[j] = cn_bf16_to_f32(p[j]);
#endif
}
static inline void cn_cvt32_cn_f16(const cn_f16* p, float* o) {
#if defined(__AVX512F__)
    _mm512_storeu_ps(o, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)));
    _mm512_storeu_ps(o + 16, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + 16))));
#else
    int j; for (j = 0; j < 32; j++) o[j] = cn_f16_to_f32(p[j]);
#endif
}
static inline void cn_cvt32_float(const float* p, float* o) { memcpy(o, p, 32 * sizeof(float)); }
#define CN_HRUNS(T)                                                                       \
static inline void cn_hsum_run_s_##T(const T* x, ptrdiff_t n, double piv, double* acc) {    \
    const float pf = (float)piv; ptrdiff_t i0, i, j; double da[CN_LANES];                 \
    for (j = 0; j < CN_LANES; j++) da[j] = 0.0;                                           \
    for (i0 = 0; i0 < n; i0 += CN_CHUNK) {                                                \
        const T* xc = x + i0; ptrdiff_t m = n - i0 < CN_CHUNK ? n - i0 : CN_CHUNK;        \
        ptrdiff_t nv = m - m % CN_FL; float a[CN_FL];                                     \
        for (j = 0; j < CN_FL; j++) a[j] = 0.0f;                                          \
        for (i = 0; i < nv; i += CN_FL) {                                                 \
            float t_[CN_FL]; cn_cvt32_##T(xc + i, t_);                                    \
            CN_KEEP_LOOP                                                                  \
            for (j = 0; j < CN_FL; j++) a[j] += t_[j] - pf;                               \
        }                                                                                 \
        for (j = 0; j < m - nv; j++) a[j] += CN_LDF_##T(xc + nv + j) - pf;                \
        for (j = 0; j < CN_LANES; j++) da[j] += (double)a[j] + (double)a[j + CN_LANES];   \
    }                                                                                     \
    if (!cn_dlanes_finite(da)) { cn_sum_run_##T(x, n, piv, acc); return; }                \
    for (j = 0; j < CN_LANES; j++) acc[j] += da[j];                                       \
    acc[0] += (double)n * ((double)pf - piv);  /* exact for any piv */                    \
}                                                                                         \
static inline void cn_hsq_run_s_##T(const T* x, ptrdiff_t n, double m, double* acc) {       \
    const float mf = (float)m; const double dm = m - (double)mf; ptrdiff_t i0, i, j;      \
    double da[CN_LANES], sb = 0.0;                                                        \
    for (j = 0; j < CN_LANES; j++) da[j] = 0.0;                                           \
    for (i0 = 0; i0 < n; i0 += CN_CHUNK) {                                                \
        const T* xc = x + i0; ptrdiff_t k = n - i0 < CN_CHUNK ? n - i0 : CN_CHUNK;        \
        ptrdiff_t nv = k - k % CN_FL; float a[CN_FL], b[CN_FL];                           \
        for (j = 0; j < CN_FL; j++) { a[j] = 0.0f; b[j] = 0.0f; }                         \
        for (i = 0; i < nv; i += CN_FL) {                                                 \
            float t_[CN_FL]; cn_cvt32_##T(xc + i, t_);                                    \
            CN_KEEP_LOOP                                                                  \
            for (j = 0; j < CN_FL; j++) {                                                 \
                float d = t_[j] - mf; a[j] += d * d; b[j] += d;                           \
            }                                                                             \
        }                                                                                 \
        for (j = 0; j < k - nv; j++) {                                                    \
            float d = CN_LDF_##T(xc + nv + j) - mf; a[j] += d * d; b[j] += d;             \
        }                                                                                 \
        for (j = 0; j < CN_LANES; j++) {                                                  \
            da[j] += (double)a[j] + (double)a[j + CN_LANES];                              \
            sb += (double)b[j] + (double)b[j + CN_LANES];                                 \
        }                                                                                 \
    }                                                                                     \
    if (!cn_dlanes_finite(da) || sb - sb != 0.0) { cn_sq_run_##T(x, n, m, acc); return; } \
    for (j = 0; j < CN_LANES; j++) acc[j] += da[j];                                       \
    acc[0] += dm * ((double)n * dm - 2.0 * sb);  /* exact for the centre's rounding */    \
}
/* the gradient run (float32 too: its double lanes took four times the operations) */
#define CN_HGRAD_RUN(T)                                                                   \
static inline void cn_hgrad_run_s_##T(const T* g, const T* x, ptrdiff_t n, double m,        \
                                    double* ag, double* agx, double* ax) {                \
    const float mf = (float)m; ptrdiff_t i0, i, j;                                        \
    double da[CN_LANES], db[CN_LANES], dc[CN_LANES];                                      \
    if ((double)mf != m) { cn_grad_run_##T(g, x, n, m, ag, agx, ax); return; }            \
    for (j = 0; j < CN_LANES; j++) { da[j] = 0.0; db[j] = 0.0; dc[j] = 0.0; }             \
    for (i0 = 0; i0 < n; i0 += CN_CHUNK) {                                                \
        const T* gc = g + i0; const T* xc = x + i0;                                       \
        ptrdiff_t k = n - i0 < CN_CHUNK ? n - i0 : CN_CHUNK, nv = k - k % CN_FL;          \
        float a[CN_FL], b[CN_FL], c[CN_FL];                                               \
        for (j = 0; j < CN_FL; j++) { a[j] = 0.0f; b[j] = 0.0f; c[j] = 0.0f; }            \
        for (i = 0; i < nv; i += CN_FL) {                                                 \
            float tg_[CN_FL], tx_[CN_FL]; cn_cvt32_##T(gc + i, tg_); cn_cvt32_##T(xc + i, tx_); \
            CN_KEEP_LOOP                                                                  \
            for (j = 0; j < CN_FL; j++) {                                                 \
                float gv = tg_[j], d = tx_[j] - mf;                                       \
                a[j] += gv; b[j] += gv * d; c[j] += d;                                    \
            }                                                                             \
        }                                                                                 \
        for (j = 0; j < k - nv; j++) {                                                    \
            float gv = CN_LDF_##T(gc + nv + j), d = CN_LDF_##T(xc + nv + j) - mf;         \
            a[j] += gv; b[j] += gv * d; c[j] += d;                                        \
        }                                                                                 \
        for (j = 0; j < CN_LANES; j++) {                                                  \
            da[j] += (double)a[j] + (double)a[j + CN_LANES];                              \
            db[j] += (double)b[j] + (double)b[j + CN_LANES];                              \
            dc[j] += (double)c[j] + (double)c[j + CN_LANES];                              \
        }                                                                                 \
    }                                                                                     \
    if (!(cn_dlanes_finite(da) && cn_dlanes_finite(db) && cn_dlanes_finite(dc))) {       \
        cn_grad_run_##T(g, x, n, m, ag, agx, ax); return;                                 \
    }                                                                                     \
    for (j = 0; j < CN_LANES; j++) { ag[j] += da[j]; agx[j] += db[j]; ax[j] += dc[j]; }   \
}
CN_HRUNS(cn_bf16)
CN_HRUNS(cn_f16)
CN_HGRAD_RUN(float)
CN_HGRAD_RUN(cn_bf16)
CN_HGRAD_RUN(cn_f16)

CN_LNROWS(float, float)
CN_LNROWS(double, double)
CN_LNROWS(cn_bf16, float)
CN_LNROWS(cn_f16, float)

/* ---------------------------------------------------------- elementwise --
   The normalization and dx sweeps for float32 and the half types, in float:
   16-wide AVX-512 with the conversions in hardware (F16C for float16) where
   the build has AVX-512, the same operations one element at a time
   elsewhere (head, tail, other builds) - fused multiply-adds both ways, so
   where an element falls never changes its value.

   When cn_nt_store is set (outputs much larger than the caches), full
   vectors are written with non-temporal (streaming) stores: the output then
   costs one write to memory instead of a read-for-ownership plus a write.
   Whoever sets it calls cn_sfence() on every thread that stored, before the
   output is read. */
#include <math.h>
#include <stdint.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define CN_AVX512 1
#endif
#if defined(__FMA__) || defined(__AVX512F__)
#define CN_FMA(a, b, c) fmaf((a), (b), (c))
#else
#define CN_FMA(a, b, c) ((a) * (b) + (c))
#endif

static int cn_nt_store = 0;

/* Hint: bring [p, p + bytes) toward this core (L1/L2) ahead of its use, so
   that a sweep that is busy elsewhere (normalizing the previous channel from
   L2) keeps memory reads in flight. No effect on results; a no-op where the
   compiler has no prefetch builtin. */
#if defined(__GNUC__) || defined(__clang__)
#define CN_PREFETCH_RANGE(p, bytes, locality) do {                                        \
    const char* c_ = (const char*)(p); ptrdiff_t i_;                                      \
    for (i_ = 0; i_ < (bytes); i_ += 64) __builtin_prefetch(c_ + i_, 0, locality);        \
} while (0)
#else
#define CN_PREFETCH_RANGE(p, bytes, locality) do { (void)(p); (void)(bytes); } while (0)
#endif
static inline void cn_prefetch(const void* p, ptrdiff_t bytes) { CN_PREFETCH_RANGE(p, bytes, 3); }
/* the same toward L2 only (prefetcht1): for data needed after the current
   working set, which an L1 prefetch would evict */
static inline void cn_prefetch_l2(const void* p, ptrdiff_t bytes) { CN_PREFETCH_RANGE(p, bytes, 2); }


static inline void cn_sfence(void) {
#if defined(CN_AVX512)
    _mm_sfence();
#endif
}

/* dst = src, n bytes, whole lines by streaming stores (what the kernels'
   outputs cost): the benchmark's memory floor, so that library memcpy's
   choice of stores at a given size does not decide it. */
static inline void cn_stream_copy(const char* src, char* dst, ptrdiff_t n) {
#if defined(CN_AVX512)
    ptrdiff_t h = (ptrdiff_t)((64 - (uintptr_t)dst % 64) % 64), i;
    if (h > n) h = n;
    memcpy(dst, src, (size_t)h);
    for (i = h; i + 64 <= n; i += 64)
        _mm512_stream_si512((__m512i*)(dst + i), _mm512_loadu_si512((const void*)(src + i)));
    memcpy(dst + i, src + i, (size_t)(n - i));
#else
    memcpy(dst, src, (size_t)n);
#endif
}

static inline void cn_st1_float(float* p, float v) { *p = v; }
static inline void cn_st1_cn_bf16(cn_bf16* p, float v) { *p = cn_f32_to_bf16(v); }
static inline void cn_st1_cn_f16(cn_f16* p, float v) { *p = cn_f32_to_f16(v); }

#if defined(CN_AVX512)
/* Streaming stores fill whole 64-byte lines: a line written partly by
   streaming and partly by ordinary stores costs far more than either. So the
   head runs to a line boundary and the body moves a line per step: one
   16-float vector, or two 16-half vectors. */
#define CN_ALIGN_float 64
#define CN_ALIGN_cn_bf16 64
#define CN_ALIGN_cn_f16 64
/* shorter runs (channels-last rows of few channels) keep ordinary stores:
   their scalar head and tail would cost more than streaming saves */
#define CN_NT_MIN 256
#define CN_VN_float 1
#define CN_VN_cn_bf16 2
#define CN_VN_cn_f16 2
static inline __m512 cn_vld_float(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 cn_vld_cn_bf16(const cn_bf16* p) {
    __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
static inline __m512 cn_vld_cn_f16(const cn_f16* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
}
/* the first min(max(r, 0), 16) lanes */
static inline __mmask16 cn_mask16(ptrdiff_t r) {
    return r >= 16 ? (__mmask16)0xffff : r <= 0 ? (__mmask16)0 : (__mmask16)((1u << r) - 1u);
}
/* masked loads: lanes outside k read nothing and are 0.0f */
static inline __m512 cn_vldm_float(__mmask16 k, const float* p) { return _mm512_maskz_loadu_ps(k, p); }
static inline __m512 cn_vldm_cn_bf16(__mmask16 k, const cn_bf16* p) {
    __m512i u = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
static inline __m512 cn_vldm_cn_f16(__mmask16 k, const cn_f16* p) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}
/* 32 values as two float vectors, for sums (where a value lands among the
   lanes only has to depend on its position): positions 0-15 and 16-31, but
   for bfloat16 the even and the odd positions - one load, a shift and a
   mask, no widening shuffle (on Zen 4 the shuffle costs twice the rest). */
static inline void cn_vld2_float(const float* p, __m512* a, __m512* b) {
    *a = _mm512_loadu_ps(p); *b = _mm512_loadu_ps(p + 16);
}
static inline void cn_vld2_cn_f16(const cn_f16* p, __m512* a, __m512* b) {
    *a = cn_vld_cn_f16(p); *b = cn_vld_cn_f16(p + 16);
}
static inline void cn_vld2_cn_bf16(const cn_bf16* p, __m512* a, __m512* b) {
    __m512i u = _mm512_loadu_si512((const void*)p);
    *a = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
    *b = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}
/* the same for the first r (0 < r < 32) values: absent lanes are 0.0f and
   left out of *ka, *kb */
static inline void cn_vld2m_float(ptrdiff_t r, const float* p, __m512* a, __m512* b,
                                  __mmask16* ka, __mmask16* kb) {
    *ka = cn_mask16(r); *kb = cn_mask16(r - 16);
    *a = cn_vldm_float(*ka, p); *b = cn_vldm_float(*kb, p + 16);
}
static inline void cn_vld2m_cn_f16(ptrdiff_t r, const cn_f16* p, __m512* a, __m512* b,
                                   __mmask16* ka, __mmask16* kb) {
    *ka = cn_mask16(r); *kb = cn_mask16(r - 16);
    *a = cn_vldm_cn_f16(*ka, p); *b = cn_vldm_cn_f16(*kb, p + 16);
}
static inline void cn_vld2m_cn_bf16(ptrdiff_t r, const cn_bf16* p, __m512* a, __m512* b,
                                    __mmask16* ka, __mmask16* kb) {
    __m512i u = _mm512_maskz_loadu_epi16((__mmask32)(r >= 32 ? 0xffffffffu : (1u << r) - 1u), p);
    *ka = cn_mask16((r + 1) / 2); *kb = cn_mask16(r / 2);
    *a = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
    *b = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}
static inline void cn_vst_float(float* p, __m512 v, int nt) {
    if (nt) _mm512_stream_ps(p, v); else _mm512_storeu_ps(p, v);
}
/* 16 (32) 16-bit values, streaming or not */
static inline void cn_vst16(void* p, __m256i h, int nt) {
    if (nt) _mm256_stream_si256((__m256i*)p, h); else _mm256_storeu_si256((__m256i*)p, h);
}
static inline void cn_vst32(void* p, __m512i w, int nt) {
    if (nt) _mm512_stream_si512((__m512i*)p, w); else _mm512_storeu_si512(p, w);
}
static inline __m256i cn_bf16_round16(__m512 v) {   /* as cn_f32_to_bf16, 16 lanes */
    __m512i u = _mm512_castps_si512(v);
    __m512i hi = _mm512_srli_epi32(u, 16);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                                   _mm512_and_si512(hi, _mm512_set1_epi32(1))), 16);
    __m512i q = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, q));
}
/* 16 floats to bfloat16, rounded to nearest even */
static inline __m256i cn_bf16_cvt16(__m512 v) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
    /* AVX512-BF16 rounds to nearest even and quiets NaN as the integer code
       does, but reads subnormal inputs as zero: vectors holding one (|v| <
       2^-126, not 0) take the integer code, so every value stays bit-exact. */
    __mmask16 sub = _mm512_fpclass_ps_mask(v, 0x20);   /* 0x20: subnormal */
    if (__builtin_expect(sub == 0, 1)) return (__m256i)_mm512_cvtneps_pbh(v);
#endif
    return cn_bf16_round16(v);
}
static inline void cn_vst_cn_bf16(cn_bf16* p, __m512 v, int nt) { cn_vst16(p, cn_bf16_cvt16(v), nt); }
static inline void cn_vst_cn_f16(cn_f16* p, __m512 v, int nt) {
    cn_vst16(p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), nt);
}
/* 32 floats to bfloat16 (a's 16, then b's) as cn_bf16_cvt16, one subnormal
   check for both */
static inline __m512i cn_bf16_cvt32(__m512 a, __m512 b) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
    if (__builtin_expect(_kortestz_mask16_u8(_mm512_fpclass_ps_mask(a, 0x20), _mm512_fpclass_ps_mask(b, 0x20)), 1))
        return (__m512i)_mm512_cvtne2ps_pbh(b, a);
#endif
    return _mm512_inserti64x4(_mm512_castsi256_si512(cn_bf16_round16(a)), cn_bf16_round16(b), 1);
}
/* 32 values given as cn_vld2 loads them, stored in order (whole lines when
   streaming: p is then 64-byte aligned). bfloat16: one conversion of both
   vectors and one permutation back from even/odd positions; the hardware
   conversion reads subnormals as zero, so 32 values holding one take the
   integer rounding (one check per 32 values: a check per vector cost as
   much as the conversion). */
static inline void cn_vst2_float(float* p, __m512 a, __m512 b, int nt) {
    cn_vst_float(p, a, nt); cn_vst_float(p + 16, b, nt);
}
static inline void cn_vst2_cn_f16(cn_f16* p, __m512 a, __m512 b, int nt) {
    cn_vst_cn_f16(p, a, nt); cn_vst_cn_f16(p + 16, b, nt);
}
static inline void cn_vst2_cn_bf16(cn_bf16* p, __m512 a, __m512 b, int nt) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                                24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    cn_vst32(p, _mm512_permutexvar_epi16(interleave, cn_bf16_cvt32(a, b)), nt);
}
/* 32 consecutive values given as two vectors in order (a: the first 16):
   cn_vst2 without the permutation */
static inline void cn_vstp_float(float* p, __m512 a, __m512 b, int nt) { cn_vst2_float(p, a, b, nt); }
static inline void cn_vstp_cn_f16(cn_f16* p, __m512 a, __m512 b, int nt) { cn_vst2_cn_f16(p, a, b, nt); }
static inline void cn_vstp_cn_bf16(cn_bf16* p, __m512 a, __m512 b, int nt) {
    cn_vst32(p, cn_bf16_cvt32(a, b), nt);
}
/* masked stores: lanes outside k are not written */
static inline void cn_vstm_float(float* p, __mmask16 k, __m512 v) { _mm512_mask_storeu_ps(p, k, v); }
static inline void cn_vstm_cn_bf16(cn_bf16* p, __mmask16 k, __m512 v) {
    _mm256_mask_storeu_epi16(p, k, cn_bf16_cvt16(v));
}
static inline void cn_vstm_cn_f16(cn_f16* p, __mmask16 k, __m512 v) {
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
/* elements before y reaches the streaming stores' alignment */
#define CN_HEAD(T, y, n) ({                                                               \
    uintptr_t a_ = (uintptr_t)(y), k_ = CN_ALIGN_##T;                                      \
    ptrdiff_t h_ = (a_ % sizeof(T)) ? (n) : (ptrdiff_t)(((k_ - a_ % k_) % k_) / sizeof(T)); \
    h_ < (n) ? h_ : (n); })
#define CN_P(p, i) _mm512_loadu_ps((p) + (i))
#define CN_S(v) _mm512_set1_ps(v)
#endif


#if defined(CN_AVX512)
#define CN_BODY(T, y, n, SCALAR, VECTOR) do {                                             \
    const int nt_ = cn_nt_store && (n) >= CN_NT_MIN;                                      \
    ptrdiff_t i0_ = 0, h_ = nt_ ? CN_HEAD(T, y, n) : 0;                                   \
    for (; i0_ < h_; i0_++) { ptrdiff_t i = i0_; SCALAR; }                                \
    for (; i0_ + 16 * CN_VN_##T <= (n); i0_ += 16 * CN_VN_##T) {                          \
        for (int v_ = 0; v_ < CN_VN_##T; v_++) { ptrdiff_t i = i0_ + 16 * v_; VECTOR; }   \
    }                                                                                     \
    for (; i0_ < (n); i0_++) { ptrdiff_t i = i0_; SCALAR; }                               \
} while (0)
#else
#define CN_BODY(T, y, n, SCALAR, VECTOR) do {                                             \
    ptrdiff_t i; for (i = 0; i < (n); i++) { SCALAR; }                                    \
} while (0)
#endif

/* CN_BODY by 32 values per step (VECTOR2 handles [i, i + 32) through
   cn_vld2/cn_vst2), for the sweeps whose constants are scalars */
#if defined(CN_AVX512)
#define CN_BODY2(T, y, n, SCALAR, VECTOR2) do {                                           \
    const int nt_ = cn_nt_store && (n) >= CN_NT_MIN;                                      \
    ptrdiff_t i0_ = 0, h_ = nt_ ? CN_HEAD(T, y, n) : 0;                                   \
    for (; i0_ < h_; i0_++) { ptrdiff_t i = i0_; SCALAR; }                                \
    for (; i0_ + 32 <= (n); i0_ += 32) { ptrdiff_t i = i0_; VECTOR2; }                    \
    for (; i0_ < (n); i0_++) { ptrdiff_t i = i0_; SCALAR; }                               \
} while (0)
#else
#define CN_BODY2(T, y, n, SCALAR, VECTOR2) CN_BODY(T, y, n, SCALAR, VECTOR2)
#endif
#define CN_EW(T)                                                                          \
/* y = (x - mh) a + b */                                                                  \
static inline void cn_norm_run_##T(const T* x, T* y, ptrdiff_t n, float mh, float a,      \
                                   float b) {                                             \
    CN_BODY2(T, y, n,                                                                     \
        cn_st1_##T(y + i, CN_FMA(CN_LDF_##T(x + i) - mh, a, b)),                          \
        __m512 u0; __m512 u1; cn_vld2_##T(x + i, &u0, &u1);                               \
        cn_vst2_##T(y + i, _mm512_fmadd_ps(_mm512_sub_ps(u0, CN_S(mh)), CN_S(a), CN_S(b)), \
                    _mm512_fmadd_ps(_mm512_sub_ps(u1, CN_S(mh)), CN_S(a), CN_S(b)), nt_)); \
}                                                                                         \
/* y = x a + b */                                                                         \
static inline void cn_scale_run_##T(const T* x, T* y, ptrdiff_t n, float a, float b) {    \
    CN_BODY2(T, y, n,                                                                     \
        cn_st1_##T(y + i, CN_FMA(CN_LDF_##T(x + i), a, b)),                               \
        __m512 u0; __m512 u1; cn_vld2_##T(x + i, &u0, &u1);                               \
        cn_vst2_##T(y + i, _mm512_fmadd_ps(u0, CN_S(a), CN_S(b)),                         \
                    _mm512_fmadd_ps(u1, CN_S(a), CN_S(b)), nt_));                         \
}                                                                                         \
/* dx = g ka + ((x - mh) kb + kc) */                                                      \
static inline void cn_dx_run_##T(const T* g, const T* x, T* dx, ptrdiff_t n, float ka,    \
                                 float mh, float kb, float kc) {                          \
    CN_BODY2(T, dx, n,                                                                    \
        cn_st1_##T(dx + i, CN_FMA(CN_LDF_##T(g + i), ka,                                  \
                                  CN_FMA(CN_LDF_##T(x + i) - mh, kb, kc))),               \
        __m512 g0; __m512 g1; __m512 u0; __m512 u1;                                       \
        cn_vld2_##T(g + i, &g0, &g1); cn_vld2_##T(x + i, &u0, &u1);                       \
        cn_vst2_##T(dx + i, _mm512_fmadd_ps(g0, CN_S(ka), _mm512_fmadd_ps(                \
                        _mm512_sub_ps(u0, CN_S(mh)), CN_S(kb), CN_S(kc))),                \
                    _mm512_fmadd_ps(g1, CN_S(ka), _mm512_fmadd_ps(                        \
                        _mm512_sub_ps(u1, CN_S(mh)), CN_S(kb), CN_S(kc))), nt_));         \
}                                                                                         \
/* channels-last row: y[c] = (x[c] - mh[c]) a[c] + b[c] */                                \
static inline void cn_row_norm_##T(const T* x, T* y, ptrdiff_t n, const float* mh,       \
                                   const float* a, const float* b) {                      \
    CN_BODY(T, y, n,                                                                      \
        cn_st1_##T(y + i, CN_FMA(CN_LDF_##T(x + i) - mh[i], a[i], b[i])),                 \
        cn_vst_##T(y + i, _mm512_fmadd_ps(_mm512_sub_ps(cn_vld_##T(x + i), CN_P(mh, i)),  \
                                          CN_P(a, i), CN_P(b, i)), nt_));                 \
}                                                                                         \
/* channels-last row: y[c] = x[c] a[c] + b[c] */                                          \
static inline void cn_row_affine_##T(const T* x, T* y, ptrdiff_t n, const float* a,      \
                                     const float* b) {                                    \
    CN_BODY2(T, y, n,                                                                     \
        cn_st1_##T(y + i, CN_FMA(CN_LDF_##T(x + i), a[i], b[i])),                         \
        cn_vstp_##T(y + i, _mm512_fmadd_ps(cn_vld_##T(x + i), CN_P(a, i), CN_P(b, i)),    \
                    _mm512_fmadd_ps(cn_vld_##T(x + i + 16), CN_P(a, i + 16),              \
                                    CN_P(b, i + 16)), nt_));                              \
}                                                                                         \
/* channels-last row: dx[c] = g[c] ka[c] + ((x[c] - mh[c]) kb[c] + kc[c]) */              \
static inline void cn_row_dx_##T(const T* g, const T* x, T* dx, ptrdiff_t n,             \
                                 const float* ka, const float* mh, const float* kb,       \
                                 const float* kc) {                                       \
    CN_BODY(T, dx, n,                                                                     \
        cn_st1_##T(dx + i, CN_FMA(CN_LDF_##T(g + i), ka[i],                               \
                                  CN_FMA(CN_LDF_##T(x + i) - mh[i], kb[i], kc[i]))),      \
        cn_vst_##T(dx + i, _mm512_fmadd_ps(cn_vld_##T(g + i), CN_P(ka, i),                \
            _mm512_fmadd_ps(_mm512_sub_ps(cn_vld_##T(x + i), CN_P(mh, i)), CN_P(kb, i),   \
                            CN_P(kc, i))), nt_));                                         \
}                                                                                         \
/* LayerNorm row: y[i] = ((x[i] - mh) rf - ml rf) w[i] + b[i], two FMAs */               \
static inline void cn_ln_fwd_##T(const T* x, T* y, ptrdiff_t n, float mh, float ml,       \
                                 float rf, const float* w, const float* b) {              \
    const float mlr = -ml * rf;                                                           \
    CN_BODY2(T, y, n,                                                                     \
        cn_st1_##T(y + i, CN_FMA(CN_FMA(CN_LDF_##T(x + i) - mh, rf, mlr), w[i], b[i])),   \
        cn_vstp_##T(y + i, _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_sub_ps(                 \
            cn_vld_##T(x + i), CN_S(mh)), CN_S(rf), CN_S(mlr)), CN_P(w, i), CN_P(b, i)),  \
            _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_sub_ps(cn_vld_##T(x + i + 16), CN_S(mh)), \
            CN_S(rf), CN_S(mlr)), CN_P(w, i + 16), CN_P(b, i + 16)), nt_));               \
}                                                                                         \
/* LayerNorm row: dx[i] = (w[i] g[i]) rf + (((x[i] - mh) - ml) kb + kc) */                \
static inline void cn_ln_dx_##T(const T* g, const T* x, T* dx, ptrdiff_t n,              \
                                const float* w, float rf, float mh, float ml, float kb,   \
                                float kc) {                                               \
    CN_BODY(T, dx, n,                                                                     \
        cn_st1_##T(dx + i, CN_FMA(w[i] * CN_LDF_##T(g + i), rf,                           \
                                  CN_FMA((CN_LDF_##T(x + i) - mh) - ml, kb, kc))),        \
        cn_vst_##T(dx + i, _mm512_fmadd_ps(_mm512_mul_ps(CN_P(w, i), cn_vld_##T(g + i)),  \
            CN_S(rf), _mm512_fmadd_ps(_mm512_sub_ps(_mm512_sub_ps(cn_vld_##T(x + i),      \
            CN_S(mh)), CN_S(ml)), CN_S(kb), CN_S(kc))), nt_));                            \
}

CN_EW(float)
CN_EW(cn_bf16)
CN_EW(cn_f16)

/* Channels-last spans: n consecutive values starting at channel 0 of rows
   of C, normalized (or dx) as one stream - no call per row, whole lines for
   streaming stores whatever C is. The constants are "extended":
   k[i] = k0[i % C] for i < C + 16, so the 16 channels of any vector are one
   unaligned load. Same fused multiply-adds as cn_row_norm / cn_row_dx. */
#define CN_CLSPANS(T)                                                                     \
static inline void cn_cl_norm_span_##T(const T* x, T* y, ptrdiff_t n, ptrdiff_t C,       \
                                       const float* mh, const float* a, const float* b) { \
    ptrdiff_t c = 0;                                                                      \
    CN_BODY2(T, y, n,                                                                      \
        cn_st1_##T(y + i, CN_FMA(CN_LDF_##T(x + i) - mh[c], a[c], b[c]));                 \
        if (++c == C) c = 0,                                                              \
        __m512 v0 = _mm512_fmadd_ps(_mm512_sub_ps(cn_vld_##T(x + i), CN_P(mh, c)),       \
                                    CN_P(a, c), CN_P(b, c));                              \
        c += 16; while (c >= C) c -= C;                                                   \
        __m512 v1 = _mm512_fmadd_ps(_mm512_sub_ps(cn_vld_##T(x + i + 16), CN_P(mh, c)),  \
                                    CN_P(a, c), CN_P(b, c));                              \
        c += 16; while (c >= C) c -= C;                                                   \
        cn_vstp_##T(y + i, v0, v1, nt_));                                                 \
}                                                                                         \
static inline void cn_cl_dx_span_##T(const T* g, const T* x, T* dx, ptrdiff_t n,         \
                                     ptrdiff_t C, const float* ka, const float* mh,       \
                                     const float* kb, const float* kc) {                  \
    ptrdiff_t c = 0;                                                                      \
    CN_BODY2(T, dx, n,                                                                     \
        cn_st1_##T(dx + i, CN_FMA(CN_LDF_##T(g + i), ka[c],                               \
                                  CN_FMA(CN_LDF_##T(x + i) - mh[c], kb[c], kc[c])));      \
        if (++c == C) c = 0,                                                              \
        __m512 v0 = _mm512_fmadd_ps(cn_vld_##T(g + i), CN_P(ka, c),                       \
            _mm512_fmadd_ps(_mm512_sub_ps(cn_vld_##T(x + i), CN_P(mh, c)), CN_P(kb, c),   \
                            CN_P(kc, c)));                                                \
        c += 16; while (c >= C) c -= C;                                                   \
        __m512 v1 = _mm512_fmadd_ps(cn_vld_##T(g + i + 16), CN_P(ka, c),                  \
            _mm512_fmadd_ps(_mm512_sub_ps(cn_vld_##T(x + i + 16), CN_P(mh, c)), CN_P(kb, c), \
                            CN_P(kc, c)));                                                \
        c += 16; while (c >= C) c -= C;                                                   \
        cn_vstp_##T(dx + i, v0, v1, nt_));                                                \
}
CN_CLSPANS(float)
CN_CLSPANS(cn_bf16)
CN_CLSPANS(cn_f16)

/* Column statistics of a block of nr channels-last rows of C (float32 and
   half data), two-pass in float while the block is in L2: pass 1 sums
   deviations from the first row (a data value: exact), pass 2 sums squared
   deviations from the float-rounded mean mf, corrected exactly for that
   rounding (S(x-m)^2 = S(x-mf)^2 - 2 dm S(x-mf) + nr dm^2, dm = m - mf).
   Four rows per update of the column accumulators; float partials cover at
   most CN_FROWS rows before they are added into double, so accuracy does not
   depend on nr. Returns 0, leaving m/q unspecified, when a float sum
   overflowed (|x| ~ 1e30): the caller redoes the block in double.
   ws: 3*C doubles of scratch. */
#define CN_FROWS 64
static inline int cn_finite_f(const float* a, ptrdiff_t n) {
    uint32_t bad = 0, u; ptrdiff_t j;
    for (j = 0; j < n; j++) { memcpy(&u, a + j, 4); bad |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u); }
    return bad == 0;
}
/* q[c] (squares summed around the float mean mf[c]) re-centred exactly on the
   double mean m[c]: S(x-m)^2 = S(x-mf)^2 - 2 dm S(x-mf) + nr dm^2, dm = m - mf
   (se[c] = S(x-mf)); rounding below 0 clamps to 0. */
static inline void cn_m2_recentre(ptrdiff_t C, ptrdiff_t nr, const double* m, const float* mf,
                                  const double* se, double* q) {
    ptrdiff_t c;
    for (c = 0; c < C; c++) {
        double dm = m[c] - (double)mf[c];
        double v = q[c] + dm * ((double)nr * dm - 2.0 * se[c]);
        q[c] = v > 0.0 ? v : 0.0;
    }
}
/* One pass where it is as exact: the row statistics of cn_ln_row_stats (and
   the channels-last column statistics) sum x - p and (x - p)^2 around a pivot
   p close to the mean and form M2 = S2 - S1^2/n in double. M2's rounding error
   is the float S2's times S2/M2 = 1 + (p - mean)^2/var; above CN_ONEPASS_MAX
   (p far from the mean: drifting data, outliers where p was taken) the
   two-pass sweep redoes it. The pivot is a pairwise float mean of 16 (rows)
   or 8 (columns) values: exactly the value of a constant run, within about
   std/3 of the mean of most data. */
#define CN_ONEPASS_MAX 16.0
#define CN_CLSTATS(T)                                                                     \
static inline int cn_cl_stats_##T(const T* restrict x, ptrdiff_t nr, ptrdiff_t C,         \
                                  double* restrict m, double* restrict q, double* ws) {   \
    float *restrict a = (float*)ws, *restrict b = a + C, *restrict e = a + 2 * C;        \
    double *restrict se = ws + 2 * C; ptrdiff_t r, r1, c;                                 \
    for (c = 0; c < C; c++) m[c] = 0.0;                                                   \
    for (r1 = 0; r1 < nr; ) {                                                             \
        ptrdiff_t rend = nr - r1 < CN_FROWS ? nr : r1 + CN_FROWS;                         \
        for (c = 0; c < C; c++) a[c] = 0.0f;                                              \
        for (r = r1; r + 4 <= rend; r += 4) {                                             \
            const T* p = x + r * C;                                                       \
            for (c = 0; c < C; c++) {                                                     \
                float pv = CN_LDF_##T(x + c);                                             \
                a[c] += ((CN_LDF_##T(p + c) - pv) + (CN_LDF_##T(p + c + C) - pv))         \
                      + ((CN_LDF_##T(p + c + 2 * C) - pv) + (CN_LDF_##T(p + c + 3 * C) - pv)); \
            }                                                                             \
        }                                                                                 \
        for (; r < rend; r++) {                                                           \
            const T* p = x + r * C;                                                       \
            for (c = 0; c < C; c++) a[c] += CN_LDF_##T(p + c) - CN_LDF_##T(x + c);        \
        }                                                                                 \
        for (c = 0; c < C; c++) m[c] += (double)a[c];                                     \
        r1 = rend;                                                                        \
    }                                                                                     \
    for (c = 0; c < C; c++) {                                                             \
        m[c] = (double)CN_LDF_##T(x + c) + m[c] / (double)nr;                             \
        a[c] = (float)m[c];                                                               \
        q[c] = 0.0; se[c] = 0.0;                                                          \
    }                                                                                     \
    for (r1 = 0; r1 < nr; ) {                                                             \
        ptrdiff_t rend = nr - r1 < CN_FROWS ? nr : r1 + CN_FROWS;                         \
        for (c = 0; c < C; c++) { b[c] = 0.0f; e[c] = 0.0f; }                             \
        for (r = r1; r + 4 <= rend; r += 4) {                                             \
            const T* p = x + r * C;                                                       \
            for (c = 0; c < C; c++) {                                                     \
                float mf = a[c], d0 = CN_LDF_##T(p + c) - mf, d1 = CN_LDF_##T(p + c + C) - mf; \
                float d2 = CN_LDF_##T(p + c + 2 * C) - mf, d3 = CN_LDF_##T(p + c + 3 * C) - mf; \
                b[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);                        \
                e[c] += (d0 + d1) + (d2 + d3);                                            \
            }                                                                             \
        }                                                                                 \
        for (; r < rend; r++) {                                                           \
            const T* p = x + r * C;                                                       \
            for (c = 0; c < C; c++) {                                                     \
                float d0 = CN_LDF_##T(p + c) - a[c]; b[c] += d0 * d0; e[c] += d0;         \
            }                                                                             \
        }                                                                                 \
        if (!cn_finite_f(b, C) || !cn_finite_f(e, C)) return 0;                           \
        for (c = 0; c < C; c++) { q[c] += (double)b[c]; se[c] += (double)e[c]; }          \
        r1 = rend;                                                                        \
    }                                                                                     \
    cn_m2_recentre(C, nr, m, a, se, q);                                                   \
    return 1;                                                                             \
}
CN_CLSTATS(float)
CN_CLSTATS(cn_bf16)
CN_CLSTATS(cn_f16)

#if defined(CN_AVX512)
/* cn_cl_stats for rows whose C is a multiple of 16 (AVX-512), and the
   fallback of the one-pass sweep below: the same two-pass algorithm (float
   partials over CN_FROWS rows, exact centring on the float mean), swept
   CN_RC rows at a time (an L1-sized slab); in a slab each tile of nv <= 4 vectors (64 channels) keeps its accumulators in
   registers, two rows per add, and loads/stores the float column partials
   once. Half data are widened in registers (F16C / a shift), 16 at a time.
   Same contract and result layout as cn_cl_stats. */
#define CN_RC 8
/* 16-value vectors per 64-byte line: one prefetch per line */
#define CN_VPL(T) (64 / (int)(16 * sizeof(T)))
/* Rows per slab: 8, but 4 (2) where rows are 2 KB (4 KB) or more apart - 8
   rows of g and x a multiple of 4 KB apart fall into one L1 set (8 ways):
   float32 BatchNorm1d (C = 1024) gradient sums ran at 0.97 cycles per value
   against 0.53 for C = 64, now 0.73 */
#define CN_SLAB(T, C) ((C) * (ptrdiff_t)sizeof(T) >= 4096 ? 2 : (C) * (ptrdiff_t)sizeof(T) >= 2048 ? 4 : CN_RC)
#define CN_CLSTATS_V(T)                                                                   \
static inline __attribute__((always_inline)) void cn_cls_slab_sum_##T(                    \
        const T* restrict x, ptrdiff_t nr, ptrdiff_t C, const int nv,                      \
        const float* restrict pv, float* restrict a, const T* pf) {                        \
    __m512 acc[4], piv[4]; ptrdiff_t r; int v;                                            \
    for (v = 0; v < nv; v++) { acc[v] = _mm512_loadu_ps(a + 16 * v); piv[v] = _mm512_loadu_ps(pv + 16 * v); } \
    for (r = 0; r + 2 <= nr; r += 2) {                                                    \
        const T* p = x + r * C;                                                           \
        for (v = 0; v < nv; v += CN_VPL(T)) _mm_prefetch((const char*)(pf + (r / 2) * C + 16 * v), _MM_HINT_T1); \
        for (v = 0; v < nv; v++)                                                          \
            acc[v] = _mm512_add_ps(acc[v], _mm512_add_ps(_mm512_sub_ps(cn_vld_##T(p + 16 * v), piv[v]), \
                                                         _mm512_sub_ps(cn_vld_##T(p + C + 16 * v), piv[v]))); \
    }                                                                                     \
    for (; r < nr; r++)                                                                   \
        for (v = 0; v < nv; v++)                                                          \
            acc[v] = _mm512_add_ps(acc[v], _mm512_sub_ps(cn_vld_##T(x + r * C + 16 * v), piv[v])); \
    for (v = 0; v < nv; v++) _mm512_storeu_ps(a + 16 * v, acc[v]);                        \
}                                                                                         \
static inline __attribute__((always_inline)) void cn_cls_slab_sums_##T(                     \
        const T* restrict x, ptrdiff_t nr, ptrdiff_t C, const int nv,                      \
        const float* restrict pv, float* restrict a, float* restrict b, const T* pf) {     \
    __m512 p[4], s[4], q0[4], q1[4]; ptrdiff_t r; int v;                                  \
    for (v = 0; v < nv; v++) {                                                            \
        p[v] = _mm512_loadu_ps(pv + 16 * v); s[v] = _mm512_loadu_ps(a + 16 * v);           \
        q0[v] = _mm512_loadu_ps(b + 16 * v); q1[v] = _mm512_setzero_ps();                  \
    }                                                                                     \
    for (r = 0; r + 2 <= nr; r += 2) {                                                    \
        const T* xr = x + r * C;                                                          \
        for (v = 0; v < nv; v += CN_VPL(T)) {                                             \
            _mm_prefetch((const char*)(pf + r * C + 16 * v), _MM_HINT_T1);                \
            _mm_prefetch((const char*)(pf + (r + 1) * C + 16 * v), _MM_HINT_T1);          \
        }                                                                                 \
        for (v = 0; v < nv; v++) {                                                        \
            __m512 d0 = _mm512_sub_ps(cn_vld_##T(xr + 16 * v), p[v]);                     \
            __m512 d1 = _mm512_sub_ps(cn_vld_##T(xr + C + 16 * v), p[v]);                 \
            s[v] = _mm512_add_ps(s[v], _mm512_add_ps(d0, d1));                            \
            q0[v] = _mm512_fmadd_ps(d0, d0, q0[v]);                                       \
            q1[v] = _mm512_fmadd_ps(d1, d1, q1[v]);                                       \
        }                                                                                 \
    }                                                                                     \
    for (; r < nr; r++)                                                                   \
        for (v = 0; v < nv; v++) {                                                        \
            __m512 d0 = _mm512_sub_ps(cn_vld_##T(x + r * C + 16 * v), p[v]);              \
            s[v] = _mm512_add_ps(s[v], d0);                                               \
            q0[v] = _mm512_fmadd_ps(d0, d0, q0[v]);                                       \
        }                                                                                 \
    for (v = 0; v < nv; v++) {                                                            \
        _mm512_storeu_ps(a + 16 * v, s[v]);                                               \
        _mm512_storeu_ps(b + 16 * v, _mm512_add_ps(q0[v], q1[v]));                        \
    }                                                                                     \
}                                                                                         \
/* Per-column sums of x - ctr (into s1, unless NULL) and (x - ctr)^2 (into s2)  \
   over nr rows, set: float partials (fa, fb: C floats each) over CN_FROWS     \
   rows, slabs of `slab` rows, each prefetching its rows of the next nr rows.  \
   0 when a float partial is not finite. */                                    \
static inline int cn_cls_sweep_##T(const T* restrict x, ptrdiff_t nr, ptrdiff_t C,        \
                                   ptrdiff_t slab, const float* restrict ctr,             \
                                   float* restrict fa, float* restrict fb, double* s1,    \
                                   double* restrict s2) {                                 \
    ptrdiff_t c, c0, r1, rs;                                                              \
    for (c = 0; c < C; c++) { if (s1) s1[c] = 0.0; s2[c] = 0.0; }                         \
    for (r1 = 0; r1 < nr; ) {                                                             \
        ptrdiff_t rend = nr - r1 < CN_FROWS ? nr : r1 + CN_FROWS;                         \
        for (c = 0; c < C; c++) { fa[c] = 0.0f; fb[c] = 0.0f; }                           \
        for (rs = r1; rs < rend; rs += slab) {                                            \
            ptrdiff_t k = rend - rs < slab ? rend - rs : slab;                            \
            const T* pf = x + (nr + rs) * C;                                              \
            for (c0 = 0; c0 + 64 <= C; c0 += 64)                                          \
                cn_cls_slab_sums_##T(x + rs * C + c0, k, C, 4, ctr + c0, fa + c0, fb + c0, pf + c0); \
            for (; c0 < C; c0 += 16)                                                      \
                cn_cls_slab_sums_##T(x + rs * C + c0, k, C, 1, ctr + c0, fa + c0, fb + c0, pf + c0); \
        }                                                                                 \
        if (!cn_finite_f(fa, C) || !cn_finite_f(fb, C)) return 0;                         \
        for (c = 0; c < C; c++) { if (s1) s1[c] += (double)fa[c]; s2[c] += (double)fb[c]; } \
        r1 = rend;                                                                        \
    }                                                                                     \
    return 1;                                                                             \
}                                                                                         \
/* Both passes prefetch the next nr rows into L2 (pass 1 the first half, pass  \
   2 all of them), so memory keeps streaming while this thread computes;      \
   prefetches past the data are harmless. Pass 2 (the one-pass sweep's slab,  \
   e: its unused sums) keeps only the squares: the sum of deviations from mf  \
   that the exact correction needs is pass 1's, re-centred in double:         \
   S(x - mf) = S(x - p) + nr (p - mf). */                                      \
static inline int cn_cl_stats_2p_##T(const T* restrict x, ptrdiff_t nr, ptrdiff_t C,      \
                                    double* restrict m, double* restrict q, double* ws) { \
    float* restrict mf = (float*)ws; float* restrict a = mf + C, * restrict e = a + C;    \
    double* restrict se = ws + 2 * C; ptrdiff_t c, c0, r1, rs;                            \
    for (c = 0; c < C; c++) { m[c] = 0.0; q[c] = 0.0; mf[c] = CN_LDF_##T(x + c); }        \
    for (r1 = 0; r1 < nr; ) {                                                             \
        ptrdiff_t rend = nr - r1 < CN_FROWS ? nr : r1 + CN_FROWS;                         \
        for (c = 0; c < C; c++) a[c] = 0.0f;                                              \
        for (rs = r1; rs < rend; rs += CN_RC) {                                           \
            ptrdiff_t k = rend - rs < CN_RC ? rend - rs : CN_RC;                          \
            const T* pf = x + (nr + rs / 2) * C;                                          \
            for (c0 = 0; c0 + 64 <= C; c0 += 64) cn_cls_slab_sum_##T(x + rs * C + c0, k, C, 4, mf + c0, a + c0, pf + c0); \
            for (; c0 < C; c0 += 16) cn_cls_slab_sum_##T(x + rs * C + c0, k, C, 1, mf + c0, a + c0, pf + c0); \
        }                                                                                 \
        for (c = 0; c < C; c++) m[c] += (double)a[c];                                     \
        r1 = rend;                                                                        \
    }                                                                                     \
    if (!cn_finite_f(a, C)) return 0;                                                     \
    for (c = 0; c < C; c++) {                                                             \
        double p = (double)CN_LDF_##T(x + c), s1 = m[c];                                  \
        m[c] = p + s1 / (double)nr;                                                       \
        mf[c] = (float)m[c];                                                              \
        se[c] = s1 + (double)nr * (p - (double)mf[c]);                                    \
    }                                                                                     \
    if (!cn_cls_sweep_##T(x, nr, C, CN_SLAB(T, C), mf, e, a, NULL, q)) return 0;         \
    cn_m2_recentre(C, nr, m, mf, se, q);                                                  \
    return 1;                                                                             \
}
CN_CLSTATS_V(float)
CN_CLSTATS_V(cn_bf16)
CN_CLSTATS_V(cn_f16)
/* The channels-last block sweep in one pass (compute-bound on half data, each
   pass widening every value again): the pivot is the pairwise mean of the
   block's first CN_RC rows, a column above CN_ONEPASS_MAX sends the whole
   block to the two-pass sweep. Float partials over CN_FROWS rows, as there;
   same contract. */
#define CN_CLSTATS_1P(T)                                                                  \
static inline int cn_cl_stats_v_##T(const T* restrict x, ptrdiff_t nr, ptrdiff_t C,       \
                                    double* restrict m, double* restrict q, double* ws) { \
    float* restrict pv = (float*)ws; float* restrict a = pv + C; float* restrict b = a + C; \
    ptrdiff_t c, slab = CN_SLAB(T, C); int ok = 1;                                        \
    if (nr < CN_RC) return cn_cl_stats_2p_##T(x, nr, C, m, q, ws);                        \
    for (c = 0; c < C; c += 16) {                                                         \
        const T* p = x + c;                                                               \
        __m512 s01 = _mm512_add_ps(cn_vld_##T(p), cn_vld_##T(p + C));                     \
        __m512 s23 = _mm512_add_ps(cn_vld_##T(p + 2 * C), cn_vld_##T(p + 3 * C));         \
        __m512 s45 = _mm512_add_ps(cn_vld_##T(p + 4 * C), cn_vld_##T(p + 5 * C));         \
        __m512 s67 = _mm512_add_ps(cn_vld_##T(p + 6 * C), cn_vld_##T(p + 7 * C));         \
        _mm512_storeu_ps(pv + c, _mm512_mul_ps(_mm512_add_ps(_mm512_add_ps(s01, s23),     \
                                               _mm512_add_ps(s45, s67)), CN_S(0.125f)));  \
    }                                                                                     \
    if (!cn_finite_f(pv, C)) return 0;                                                    \
    if (!cn_cls_sweep_##T(x, nr, C, slab, pv, a, b, m, q)) return 0;                     \
    for (c = 0; c < C; c++) {                                                             \
        double s1 = m[c], s2 = q[c], d = s1 / (double)nr, m2 = s2 - s1 * d;               \
        ok &= s2 <= CN_ONEPASS_MAX * m2;                                                  \
        m[c] = (double)pv[c] + d;                                                         \
        q[c] = m2 > 0.0 ? m2 : 0.0;                                                       \
    }                                                                                     \
    return ok ? 1 : cn_cl_stats_2p_##T(x, nr, C, m, q, ws);                               \
}
CN_CLSTATS_1P(float)
CN_CLSTATS_1P(cn_bf16)
CN_CLSTATS_1P(cn_f16)
#define CN_CL_STATS(T, x, nr, C, m, q, ws) \
    (((C) % 16 == 0) ? cn_cl_stats_v_##T((x), (nr), (C), (m), (q), (ws)) : cn_cl_stats_##T((x), (nr), (C), (m), (q), (ws)))
#else
#define CN_CL_STATS(T, x, nr, C, m, q, ws) cn_cl_stats_##T((x), (nr), (C), (m), (q), (ws))
#endif
#if defined(CN_AVX512)
/* Channels-last gradient sums of nr rows of C (C a multiple of 16, at most
   CN_CLG_MAXC): sg = S g, sgx = S g (x - mu), sx = S (x - mu) per column
   (set, not added). Swept as cn_cl_stats_v: slabs of CN_RC rows, 64-column
   tiles with float accumulators in registers, float column partials flushed
   into double every CN_FROWS rows (positions alone decide the grouping).
   Each row prefetches the same row of the next nr rows into L2. Returns 0,
   with sg/sgx/sx unspecified, when a mean is not a float value (the float
   centre would round it) or a float partial overflowed. */
#define CN_CLG_MAXC 2048
#define CN_CLGRAD(T)                                                                      \
static inline __attribute__((always_inline)) void cn_clg_slab_##T(                        \
        const T* restrict g, const T* restrict x, ptrdiff_t nr, ptrdiff_t C, const int nv, \
        const float* restrict mf, float* restrict fa, float* restrict fb, float* restrict fc, \
        ptrdiff_t pd) {                                                                    \
    __m512 va[4], vb[4], vc[4], mv[4]; ptrdiff_t r; int v;                                \
    for (v = 0; v < nv; v++) {                                                            \
        mv[v] = _mm512_loadu_ps(mf + 16 * v); va[v] = _mm512_loadu_ps(fa + 16 * v);       \
        vb[v] = _mm512_loadu_ps(fb + 16 * v); vc[v] = _mm512_loadu_ps(fc + 16 * v);       \
    }                                                                                     \
    for (r = 0; r < nr; r++) {                                                            \
        const T* pg = g + r * C; const T* px = x + r * C;                                 \
        for (v = 0; v < nv; v += CN_VPL(T)) {                                             \
            _mm_prefetch((const char*)(pg + pd + 16 * v), _MM_HINT_T1);                   \
            _mm_prefetch((const char*)(px + pd + 16 * v), _MM_HINT_T1);                   \
        }                                                                                 \
        for (v = 0; v < nv; v++) {                                                        \
            __m512 gv = cn_vld_##T(pg + 16 * v);                                          \
            __m512 d = _mm512_sub_ps(cn_vld_##T(px + 16 * v), mv[v]);                     \
            va[v] = _mm512_add_ps(va[v], gv);                                             \
            vb[v] = _mm512_fmadd_ps(gv, d, vb[v]);                                        \
            vc[v] = _mm512_add_ps(vc[v], d);                                              \
        }                                                                                 \
    }                                                                                     \
    for (v = 0; v < nv; v++) {                                                            \
        _mm512_storeu_ps(fa + 16 * v, va[v]); _mm512_storeu_ps(fb + 16 * v, vb[v]);       \
        _mm512_storeu_ps(fc + 16 * v, vc[v]);                                             \
    }                                                                                     \
}                                                                                         \
static inline int cn_cl_grad_##T(const T* restrict g, const T* restrict x, ptrdiff_t nr,  \
                                 ptrdiff_t C, const double* mu, double* restrict sg,      \
                                 double* restrict sgx, double* restrict sx) {             \
    float mf[CN_CLG_MAXC], f[3 * CN_CLG_MAXC]; ptrdiff_t c, c0, r1, rs, slab = CN_SLAB(T, C);\
    if (C % 16 != 0 || C > CN_CLG_MAXC) return 0;                                         \
    for (c = 0; c < C; c++) {                                                             \
        mf[c] = (float)mu[c];                                                             \
        if ((double)mf[c] != mu[c]) return 0;                                             \
        sg[c] = 0.0; sgx[c] = 0.0; sx[c] = 0.0;                                           \
    }                                                                                     \
    for (r1 = 0; r1 < nr; ) {                                                             \
        ptrdiff_t rend = nr - r1 < CN_FROWS ? nr : r1 + CN_FROWS;                         \
        for (c = 0; c < 3 * C; c++) f[c] = 0.0f;                                          \
        for (rs = r1; rs < rend; rs += slab) {                                            \
            ptrdiff_t k = rend - rs < slab ? rend - rs : slab;                            \
            const T* gs = g + rs * C; const T* xs = x + rs * C;                           \
            for (c0 = 0; c0 + 64 <= C; c0 += 64)                                          \
                cn_clg_slab_##T(gs + c0, xs + c0, k, C, 4, mf + c0, f + c0, f + C + c0, f + 2 * C + c0, nr * C); \
            for (; c0 < C; c0 += 16)                                                      \
                cn_clg_slab_##T(gs + c0, xs + c0, k, C, 1, mf + c0, f + c0, f + C + c0, f + 2 * C + c0, nr * C); \
        }                                                                                 \
        if (!cn_finite_f(f, 3 * C)) return 0;                                             \
        for (c = 0; c < C; c++) {                                                         \
            sg[c] += (double)f[c]; sgx[c] += (double)f[C + c]; sx[c] += (double)f[2 * C + c]; \
        }                                                                                 \
        r1 = rend;                                                                        \
    }                                                                                     \
    return 1;                                                                             \
}
CN_CLGRAD(float)
CN_CLGRAD(cn_bf16)
CN_CLGRAD(cn_f16)
#else
#define CN_CLGRAD_NONE(T) static inline int cn_cl_grad_##T(const T* g, const T* x, ptrdiff_t nr, \
    ptrdiff_t C, const double* mu, double* sg, double* sgx, double* sx) { return 0; }
CN_CLGRAD_NONE(float)
CN_CLGRAD_NONE(cn_bf16)
CN_CLGRAD_NONE(cn_f16)
#endif
/* column statistics of a channels-last block (see cn_cl_stats): 1, or 0 when a float sum overflowed */
static inline int cn_cl_block_stats_float(const float* x, ptrdiff_t nr, ptrdiff_t C, double* m, double* q, double* ws) {
    return CN_CL_STATS(float, x, nr, C, m, q, ws);
}
static inline int cn_cl_block_stats_cn_bf16(const cn_bf16* x, ptrdiff_t nr, ptrdiff_t C, double* m, double* q, double* ws) {
    return CN_CL_STATS(cn_bf16, x, nr, C, m, q, ws);
}
static inline int cn_cl_block_stats_cn_f16(const cn_f16* x, ptrdiff_t nr, ptrdiff_t C, double* m, double* q, double* ws) {
    return CN_CL_STATS(cn_f16, x, nr, C, m, q, ws);
}

/* ------------------------------------------------ LayerNorm backward, f32 --
   Rows n0..n1-1 of a per-element-affine problem (S == 1) in one sweep per
   row: pass A (from memory) sums w g, w g (x - mu), x - mu in 32 float lanes
   (the saved float mean mu is the centre: exact subtraction near the data);
   pass B (the row is in L1/L2) writes dx and adds g and g xhat into float
   column partials, flushed into the double pb/pw every CN_LNK rows counted
   from n0 (shape-determined: bit-identical for any thread count). A row
   whose float sums are not finite, or a chunk whose float column partials
   are not, is redone in double (overflow never reaches the result). Pass B
   prefetches the next row into L2, so memory streams during the compute. */
#define CN_LNF 32
#define CN_LNK 16
static inline double cn_ftotal32(const float* a) {
    double s[8]; int j;
    for (j = 0; j < 8; j++) s[j] = ((double)a[j] + (double)a[j + 16]) + ((double)a[j + 8] + (double)a[j + 24]);
    return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}
static inline double cn_dtotal16(const double* a) {
    double s8[8]; int j;
    for (j = 0; j < 8; j++) s8[j] = a[j] + a[j + 8];
    return ((s8[0] + s8[4]) + (s8[2] + s8[6])) + ((s8[1] + s8[5]) + (s8[3] + s8[7]));
}
#if defined(CN_AVX512)
/* d0 (lanes 0-7) += lo(a0) + lo(a1), d1 (lanes 8-15) += hi(a0) + hi(a1): (double)a[j] + (double)a[j + 16] */
#define CN_FOLD(d0, d1, a0, a1) do {                                                      \
    d0 = _mm512_add_pd(d0, _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(a0)),     \
                                         _mm512_cvtps_pd(_mm512_castps512_ps256(a1))));   \
    d1 = _mm512_add_pd(d1, _mm512_add_pd(                                                 \
        _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a0), 1))), \
        _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a1), 1))))); \
} while (0)
/* acc[0..16) += (d0, d1) */
static inline void cn_vacc16(double* acc, __m512d d0, __m512d d1) {
    _mm512_storeu_pd(acc, _mm512_add_pd(_mm512_loadu_pd(acc), d0));
    _mm512_storeu_pd(acc + 8, _mm512_add_pd(_mm512_loadu_pd(acc + 8), d1));
}
/* lanes j and j + 16 of a0 and of a1 widened to double, summed in a fixed order */
static inline double cn_vtotal32(__m512 a0, __m512 a1) {
    __m512d lo = _mm512_setzero_pd(), hi = lo;
    CN_FOLD(lo, hi, a0, a1);
    return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
}
#define CN_LNB_SUMS(T)                                                                    \
static inline void cn_lnb_sums_##T(const T* restrict g, const T* restrict x,              \
                                   const float* restrict w, ptrdiff_t n, float mu,        \
                                   double* swg, double* swgx, double* sx) {               \
    ptrdiff_t i = 0;                                                                      \
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0;         \
    const __m512 vm = _mm512_set1_ps(mu);                                                 \
    for (; i + CN_LNF <= n; i += CN_LNF) {                                                \
        __m512 wg0 = _mm512_mul_ps(_mm512_loadu_ps(w + i), cn_vld_##T(g + i));            \
        __m512 wg1 = _mm512_mul_ps(_mm512_loadu_ps(w + i + 16), cn_vld_##T(g + i + 16));  \
        __m512 d0 = _mm512_sub_ps(cn_vld_##T(x + i), vm);                                 \
        __m512 d1 = _mm512_sub_ps(cn_vld_##T(x + i + 16), vm);                            \
        a0 = _mm512_add_ps(a0, wg0); a1 = _mm512_add_ps(a1, wg1);                         \
        b0 = _mm512_fmadd_ps(wg0, d0, b0); b1 = _mm512_fmadd_ps(wg1, d1, b1);             \
        c0 = _mm512_add_ps(c0, d0); c1 = _mm512_add_ps(c1, d1);                           \
    }                                                                                     \
    if (i < n) {  /* tail by masked loads: absent lanes add zeros */                      \
        __mmask16 k0 = cn_mask16(n - i), k1 = cn_mask16(n - i - 16);                      \
        __m512 wg0 = _mm512_mul_ps(_mm512_maskz_loadu_ps(k0, w + i), cn_vldm_##T(k0, g + i)); \
        __m512 wg1 = _mm512_mul_ps(_mm512_maskz_loadu_ps(k1, w + i + 16), cn_vldm_##T(k1, g + i + 16)); \
        __m512 d0 = _mm512_maskz_sub_ps(k0, cn_vldm_##T(k0, x + i), vm);                  \
        __m512 d1 = _mm512_maskz_sub_ps(k1, cn_vldm_##T(k1, x + i + 16), vm);             \
        a0 = _mm512_add_ps(a0, wg0); a1 = _mm512_add_ps(a1, wg1);                         \
        b0 = _mm512_fmadd_ps(wg0, d0, b0); b1 = _mm512_fmadd_ps(wg1, d1, b1);             \
        c0 = _mm512_add_ps(c0, d0); c1 = _mm512_add_ps(c1, d1);                           \
    }                                                                                     \
    *swg = cn_vtotal32(a0, a1); *swgx = cn_vtotal32(b0, b1); *sx = cn_vtotal32(c0, c1);   \
}
#else
#define CN_LNB_SUMS(T)                                                                    \
static inline void cn_lnb_sums_##T(const T* restrict g, const T* restrict x,              \
                                   const float* restrict w, ptrdiff_t n, float mu,        \
                                   double* swg, double* swgx, double* sx) {               \
    float a[CN_LNF], b[CN_LNF], c[CN_LNF]; ptrdiff_t i, j;                                \
    for (j = 0; j < CN_LNF; j++) { a[j] = 0.0f; b[j] = 0.0f; c[j] = 0.0f; }               \
    for (i = 0; i < n; i++) {                                                             \
        float wg = w[i] * CN_LDF_##T(g + i), d = CN_LDF_##T(x + i) - mu;                  \
        j = i % CN_LNF; a[j] += wg; b[j] = CN_FMA(wg, d, b[j]); c[j] += d;                \
    }                                                                                     \
    *swg = cn_ftotal32(a); *swgx = cn_ftotal32(b); *sx = cn_ftotal32(c);                  \
}
#endif
static inline int cn_dfinite3(double a, double b, double c) {
    return (a * 0.0 + b * 0.0 + c * 0.0) == 0.0;
}

/* LayerNorm forward row statistics in 32 float lanes, each 512-element
   chunk's lanes added into double: one pass around a pivot (see
   CN_ONEPASS_MAX), else two - pass 1 sums x - x[0] (exact pivot), pass 2 sums
   (x - mf)^2 and x - mf around the float-rounded mean mf, corrected exactly
   for that rounding (as cn_cl_stats). Positions alone decide lanes and
   chunks. Returns 0 when a float sum overflowed: the caller redoes the row in
   double. Half data are widened in registers. */
#define CN_RCH 512
#if defined(CN_AVX512)
/* tails by masked loads; lanes kept as vectors: (lanes j and j + 16 in
   float) widened into 8+8 double lanes per chunk, one fixed-order reduction
   at the end */
#define CN_ROW_LANES(T)                                                                   \
static inline void cn_row_lanes_##T(const T* restrict x, ptrdiff_t n, float c, int sq,    \
                                    double* s1, double* s2) {                             \
    const __m512 vc = _mm512_set1_ps(c);                                                  \
    __m512d p1 = _mm512_setzero_pd(), q1 = p1, p2 = p1, q2 = p1;                          \
    ptrdiff_t i0, i;                                                                      \
    for (i0 = 0; i0 < n; i0 += CN_RCH) {                                                  \
        ptrdiff_t m = n - i0 < CN_RCH ? n - i0 : CN_RCH; const T* xc = x + i0;            \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                       \
        __m512 b0 = a0, b1 = a0, b2 = a0, b3 = a0;                                        \
        for (i = 0; i + 64 <= m; i += 64) {  /* four accumulators: add latency hidden */  \
            __m512 e0, e1, e2, e3;                                                        \
            cn_vld2_##T(xc + i, &e0, &e1); cn_vld2_##T(xc + i + 32, &e2, &e3);            \
            e0 = _mm512_sub_ps(e0, vc); e1 = _mm512_sub_ps(e1, vc);                       \
            e2 = _mm512_sub_ps(e2, vc); e3 = _mm512_sub_ps(e3, vc);                       \
            if (sq) {                                                                     \
                a0 = _mm512_fmadd_ps(e0, e0, a0); a1 = _mm512_fmadd_ps(e1, e1, a1);       \
                a2 = _mm512_fmadd_ps(e2, e2, a2); a3 = _mm512_fmadd_ps(e3, e3, a3);       \
                b0 = _mm512_add_ps(b0, e0); b1 = _mm512_add_ps(b1, e1);                   \
                b2 = _mm512_add_ps(b2, e2); b3 = _mm512_add_ps(b3, e3);                   \
            } else {                                                                      \
                a0 = _mm512_add_ps(a0, e0); a1 = _mm512_add_ps(a1, e1);                   \
                a2 = _mm512_add_ps(a2, e2); a3 = _mm512_add_ps(a3, e3);                   \
            }                                                                             \
        }                                                                                 \
        for (; i < m; i += 32) {  /* tail, by masked loads, into a0 and a1 */             \
            __m512 e0, e1; __mmask16 k0, k1;                                              \
            cn_vld2m_##T(m - i, xc + i, &e0, &e1, &k0, &k1);                              \
            e0 = _mm512_maskz_sub_ps(k0, e0, vc); e1 = _mm512_maskz_sub_ps(k1, e1, vc);   \
            if (sq) {                                                                     \
                a0 = _mm512_fmadd_ps(e0, e0, a0); a1 = _mm512_fmadd_ps(e1, e1, a1);       \
                b0 = _mm512_add_ps(b0, e0); b1 = _mm512_add_ps(b1, e1);                   \
            } else {                                                                      \
                a0 = _mm512_add_ps(a0, e0); a1 = _mm512_add_ps(a1, e1);                   \
            }                                                                             \
        }                                                                                 \
        a0 = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));                 \
        p1 = _mm512_add_pd(p1, _mm512_cvtps_pd(_mm512_castps512_ps256(a0)));              \
        q1 = _mm512_add_pd(q1, _mm512_cvtps_pd(_mm256_castpd_ps(                          \
                 _mm512_extractf64x4_pd(_mm512_castps_pd(a0), 1))));                      \
        if (sq) {                                                                         \
            b0 = _mm512_add_ps(_mm512_add_ps(b0, b1), _mm512_add_ps(b2, b3));             \
            p2 = _mm512_add_pd(p2, _mm512_cvtps_pd(_mm512_castps512_ps256(b0)));          \
            q2 = _mm512_add_pd(q2, _mm512_cvtps_pd(_mm256_castpd_ps(                      \
                     _mm512_extractf64x4_pd(_mm512_castps_pd(b0), 1))));                  \
        }                                                                                 \
    }                                                                                     \
    *s1 = _mm512_reduce_add_pd(_mm512_add_pd(p1, q1));                                    \
    *s2 = sq ? _mm512_reduce_add_pd(_mm512_add_pd(p2, q2)) : 0.0;                         \
}
#else
#define CN_ROW_LANES(T)                                                                   \
static inline void cn_row_lanes_##T(const T* restrict x, ptrdiff_t n, float c, int sq,    \
                                    double* s1, double* s2) {                             \
    ptrdiff_t i0, i, j; double d1 = 0.0, d2 = 0.0;                                        \
    for (i0 = 0; i0 < n; i0 += CN_RCH) {                                                  \
        ptrdiff_t m = n - i0 < CN_RCH ? n - i0 : CN_RCH; const T* xc = x + i0;            \
        float a[32], b[32];                                                               \
        for (j = 0; j < 32; j++) { a[j] = 0.0f; b[j] = 0.0f; }                            \
        for (i = 0; i < m; i++) {                                                         \
            float e = CN_LDF_##T(xc + i) - c;                                             \
            if (sq) { a[i % 32] = CN_FMA(e, e, a[i % 32]); b[i % 32] += e; } else a[i % 32] += e; \
        }                                                                                 \
        d1 += cn_ftotal32(a);                                                             \
        if (sq) d2 += cn_ftotal32(b);                                                     \
    }                                                                                     \
    *s1 = d1; *s2 = d2;                                                                   \
}
#endif
#if defined(CN_AVX512)
/* Rows of at most 128 values (per-token LayerNorm): the same two passes and
   correction from registers - the row is loaded once, 16 float lanes of at
   most 8 terms each, widened into 8+8 double lanes and reduced in a fixed
   order. Loop and chunk overhead otherwise dominate such short rows. */
#define CN_SHORT_MAX 128
static inline double cn_reduce16(__m512 a) {
    return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(a)),
        _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)))));
}
/* nb <= 8 consecutive short rows (row j at x + j n, n <= CN_SHORT_MAX) at
   once, each step for all rows before the next: the rows' latency chains
   (two reductions and a division each) overlap instead of running one after
   another; one row (nb = 1) is cn_ln_row_stats' short-row case, with the same
   arithmetic, so a row's values never depend on its batch. Returns a bit mask
   of the rows whose float sums overflowed (to redo in double). */
#define CN_SHORT_ROWS(T)                                                                  \
static inline int cn_short_rows_stats_##T(const T* x, ptrdiff_t n, int nb, double* mu,    \
                                          double* m2) {                                   \
    __m512 a[8], q[8], e[8]; __mmask16 k[8]; float p[8], mf[8]; double s[8], m[8];        \
    int j, v, bad = 0, nv = (int)((n + 15) / 16);                                         \
    for (v = 0; v < nv; v++) {                                                            \
        k[v] = cn_mask16(n - 16 * v);                                                     \
    }                                                                                     \
    for (j = 0; j < nb; j++) {                                                            \
        const T* xr = x + j * n; __m512 vp;                                               \
        p[j] = CN_LDF_##T(xr); vp = _mm512_set1_ps(p[j]); a[j] = _mm512_setzero_ps();     \
        for (v = 0; v < nv; v++)                                                          \
            a[j] = _mm512_add_ps(a[j], _mm512_maskz_sub_ps(k[v], cn_vldm_##T(k[v], xr + 16 * v), vp)); \
    }                                                                                     \
    for (j = 0; j < nb; j++) s[j] = cn_reduce16(a[j]);                                    \
    for (j = 0; j < nb; j++) { m[j] = (double)p[j] + s[j] / (double)n; mf[j] = (float)m[j]; } \
    for (j = 0; j < nb; j++) {                                                            \
        const T* xr = x + j * n; __m512 vm = _mm512_set1_ps(mf[j]);                       \
        q[j] = _mm512_setzero_ps(); e[j] = q[j];                                          \
        for (v = 0; v < nv; v++) {                                                        \
            __m512 d = _mm512_maskz_sub_ps(k[v], cn_vldm_##T(k[v], xr + 16 * v), vm);     \
            q[j] = _mm512_fmadd_ps(d, d, q[j]); e[j] = _mm512_add_ps(e[j], d);            \
        }                                                                                 \
    }                                                                                     \
    for (j = 0; j < nb; j++) {                                                            \
        double sq = cn_reduce16(q[j]), se = cn_reduce16(e[j]), dm = m[j] - (double)mf[j]; \
        if ((sq * 0.0 + se * 0.0 + m[j] * 0.0) != 0.0) { bad |= 1 << j; continue; }      \
        sq = sq + dm * ((double)n * dm - 2.0 * se);                                       \
        mu[j] = m[j]; m2[j] = sq > 0.0 ? sq : 0.0;                                        \
    }                                                                                     \
    return bad;                                                                           \
}
#define CN_SHORT_ROW_CALL(T, x, n, mu, m2) \
    if ((n) <= CN_SHORT_MAX) return !cn_short_rows_stats_##T((x), (n), 1, (mu), (m2));
#else
#define CN_SHORT_MAX 0
#define CN_SHORT_ROWS(T)                                                                  \
static inline int cn_short_rows_stats_##T(const T* x, ptrdiff_t n, int nb, double* mu,    \
                                          double* m2) { return (1 << nb) - 1; }
#define CN_SHORT_ROW_CALL(T, x, n, mu, m2)
#endif
#define CN_PIVOT16(T)                                                                     \
static inline float cn_pivot16_##T(const T* x) {                                          \
    float a[8]; int j;                                                                    \
    for (j = 0; j < 8; j++) a[j] = CN_LDF_##T(x + 2 * j) + CN_LDF_##T(x + 2 * j + 1);     \
    return (((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))) * 0.0625f; \
}
#define CN_ROWSTATS(T)                                                                    \
CN_PIVOT16(T)                                                                             \
CN_ROW_LANES(T)                                                                           \
CN_SHORT_ROWS(T)                                                                          \
static inline int cn_ln_row_stats_##T(const T* x, ptrdiff_t n, double* mu, double* m2) {  \
    double s, q, se, m, dm; float mf, p = CN_LDF_##T(x);                                  \
    CN_SHORT_ROW_CALL(T, x, n, mu, m2)                                                    \
    if (n >= 16) {  /* one pass around the mean of the first 16 values */                 \
        const float pv = cn_pivot16_##T(x);                                               \
        cn_row_lanes_##T(x, n, pv, 1, &q, &se);                                           \
        if ((q * 0.0 + se * 0.0) != 0.0) return 0;                                        \
        s = se / (double)n;                                                               \
        dm = q - se * s;                                                                  \
        if (q <= CN_ONEPASS_MAX * dm) { *mu = (double)pv + s; *m2 = dm; return 1; }       \
    }                                                                                     \
    cn_row_lanes_##T(x, n, p, 0, &s, &se);                                                \
    m = (double)p + s / (double)n;                                                        \
    mf = (float)m;                                                                        \
    cn_row_lanes_##T(x, n, mf, 1, &q, &se);                                               \
    if ((q * 0.0 + se * 0.0 + m * 0.0) != 0.0) return 0;                                  \
    dm = m - (double)mf;                                                                  \
    q = q + dm * ((double)n * dm - 2.0 * se);                                             \
    *mu = m; *m2 = q > 0.0 ? q : 0.0;                                                     \
    return 1;                                                                             \
}
CN_ROWSTATS(float)
CN_ROWSTATS(cn_bf16)
CN_ROWSTATS(cn_f16)
CN_LNB_SUMS(float)
CN_LNB_SUMS(cn_bf16)
CN_LNB_SUMS(cn_f16)
#if defined(CN_AVX512)
/* Pass B, tile by tile: columns [0, 16 nv) of `rows` rows (row n at offset
   n C; the last vector masked by kt), the tile's w and its dweight/dbias
   accumulators in registers across the rows (rows in order: the same float
   sums as row-by-row column partials), so the partials cost one store per
   tile instead of a load and a store per row. k5: per row mu, dl, rf, kb,
   kc. Each row prefetches its lines of the next chunk (pf rows ahead). */
#define CN_LNB_TILE(T)                                                                    \
static inline __attribute__((always_inline)) void cn_lnb_tile_##T(                        \
        const T* g, const T* x, T* dx, ptrdiff_t C, ptrdiff_t rows, const float* w,        \
        const float* k5, const int nv, __mmask16 kt, int nt, float* cb, float* cw,         \
        ptrdiff_t pf) {                                                                    \
    __m512 ab[4], aw[4], wv[4]; __mmask16 km[4]; ptrdiff_t n; int v;                      \
    for (v = 0; v < nv; v++) {                                                            \
        km[v] = v == nv - 1 ? kt : (__mmask16)0xffff;                                     \
        ab[v] = _mm512_setzero_ps(); aw[v] = ab[v];                                       \
        wv[v] = _mm512_maskz_loadu_ps(km[v], w + 16 * v);                                 \
    }                                                                                     \
    for (n = 0; n < rows; n++) {                                                          \
        const T* gr = g + n * C; const T* xr = x + n * C; const float* k = k5 + 5 * n;    \
        const __m512 mu = _mm512_set1_ps(k[0]), dl = _mm512_set1_ps(k[1]);                \
        const __m512 rf = _mm512_set1_ps(k[2]), kb = _mm512_set1_ps(k[3]), kc = _mm512_set1_ps(k[4]); \
        for (v = 0; v < nv; v += CN_VPL(T)) {                                             \
            _mm_prefetch((const char*)(gr + pf + 16 * v), _MM_HINT_T1);                   \
            _mm_prefetch((const char*)(xr + pf + 16 * v), _MM_HINT_T1);                   \
        }                                                                                 \
        __m512 o[4];                                                                      \
        for (v = 0; v < nv; v++) {                                                        \
            __m512 gv = cn_vldm_##T(km[v], gr + 16 * v), q = _mm512_mul_ps(gv, rf);       \
            __m512 d = _mm512_maskz_sub_ps(km[v], _mm512_sub_ps(cn_vldm_##T(km[v], xr + 16 * v), mu), dl); \
            /* dx = w (g rf) + (d kb + kc): four FMA-unit operations, not five */         \
            o[v] = _mm512_fmadd_ps(wv[v], q, _mm512_fmadd_ps(d, kb, kc));                 \
            ab[v] = _mm512_add_ps(ab[v], gv);                                             \
            aw[v] = _mm512_fmadd_ps(q, d, aw[v]);                                         \
        }                                                                                 \
        if (dx != NULL) {  /* full tiles by pairs: one conversion for two vectors */      \
            if (nv == 4 && km[3] == (__mmask16)0xffff) {                                  \
                cn_vstp_##T(dx + n * C, o[0], o[1], nt);                                  \
                cn_vstp_##T(dx + n * C + 32, o[2], o[3], nt);                             \
            } else {                                                                      \
                for (v = 0; v < nv; v++) {                                                \
                    if (km[v] == (__mmask16)0xffff) cn_vst_##T(dx + n * C + 16 * v, o[v], nt); \
                    else cn_vstm_##T(dx + n * C + 16 * v, km[v], o[v]);                   \
                }                                                                         \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
    for (v = 0; v < nv; v++) {                                                            \
        _mm512_mask_storeu_ps(cb + 16 * v, km[v], ab[v]);                                 \
        _mm512_mask_storeu_ps(cw + 16 * v, km[v], aw[v]);                                 \
    }                                                                                     \
}
CN_LNB_TILE(float)
CN_LNB_TILE(cn_bf16)
CN_LNB_TILE(cn_f16)
#endif

/* Pass A of one row: dl (the re-centring of the saved mean), swg and the
   re-centred swgx, from float lanes (cn_lnb_sums), redone in double when a
   float sum is not finite. */
#define CN_LNB_ROW(T)                                                                     \
static inline void cn_lnb_row_##T(const T* gr, const T* xr, const float* w, ptrdiff_t cg, \
                                  float mu, double* dl, double* swg, double* swgx) {      \
    double sx;                                                                            \
    cn_lnb_sums_##T(gr, xr, w, cg, mu, swg, swgx, &sx);                                   \
    if (!cn_dfinite3(*swg, *swgx, sx)) {                                                  \
        double a[CN_LANES], b[CN_LANES], c[CN_LANES]; int j;                              \
        for (j = 0; j < CN_LANES; j++) { a[j] = 0.0; b[j] = 0.0; c[j] = 0.0; }            \
        cn_wsums_##T(gr, xr, w, cg, (double)mu, a, b, c);                                 \
        *swg = cn_dtotal16(a); *swgx = cn_dtotal16(b); sx = cn_dtotal16(c);               \
    }                                                                                     \
    *dl = sx / (double)cg;                                                                \
    *swgx -= *dl * *swg;                                                                  \
}                                                                                         \
/* A chunk's float column partials into the double pb/pw, or, when one is not   \
   finite, the chunk's column sums redone in double (rows of g and x C apart). */ \
static inline void cn_lnb_flush_##T(const T* g, const T* x, ptrdiff_t C, ptrdiff_t rows,  \
                                    ptrdiff_t cg, const float* cb, const float* cw,       \
                                    const double* mk, const double* dk, const double* rk, \
                                    double* pb, double* pw) {                             \
    ptrdiff_t i, n, k;                                                                    \
    if (cn_finite_f(cb, cg) && cn_finite_f(cw, cg)) {                                     \
        for (i = 0; i < cg; i++) { pb[i] += (double)cb[i]; pw[i] += (double)cw[i]; }      \
        return;                                                                           \
    }                                                                                     \
    for (n = 0; n < rows; n += 4) {                                                       \
        k = rows - n < 4 ? rows - n : 4;                                                  \
        cn_colsums_##T(g + n * C, x + n * C, C, (int)k, cg, mk + n, dk + n, rk + n, pb, pw); \
    }                                                                                     \
}
CN_LNB_ROW(float)
CN_LNB_ROW(cn_bf16)
CN_LNB_ROW(cn_f16)

/* Rows n0..n1-1 of a per-element-affine problem (S == 1) in chunks of CN_LNK
   rows: pass A (from memory) per row (cn_lnb_row; the saved float mean mu is
   the centre: exact subtraction near the data); pass B (the chunk is in
   L1/L2) writes dx and sums g and g xhat per column into float partials,
   flushed into the double pb/pw per chunk (chunks count from n0: shape-
   determined, bit-identical for any thread count). AVX-512 builds sweep
   pass B tile by tile (cn_lnb_tile) with streaming stores after a head that
   reaches a line boundary; others a row at a time. fb: 2 cg floats. */
#if defined(CN_AVX512)
#define CN_LNB_PASS_B(T)                                                                  \
        {                                                                                 \
            const int nt = cn_nt_store && dx != NULL && (C * (ptrdiff_t)sizeof(T)) % 64 == 0; \
            ptrdiff_t c, h = nt ? CN_HEAD(T, dx + off0, cg) : 0;                          \
            for (c = 0; c < h; c += 16)  /* head, to the first line boundary of dx */     \
                cn_lnb_tile_##T(g + off0 + c, x + off0 + c, dx + off0 + c, C, r1 - r0, w + c, k5, \
                                1, cn_mask16(h - c), 0, cb + c, cw + c, CN_LNK * C);      \
            for (c = h; c + 64 <= cg; c += 64)  /* nv a constant: the tile stays in registers */ \
                cn_lnb_tile_##T(g + off0 + c, x + off0 + c, dx == NULL ? NULL : dx + off0 + c, C, \
                                r1 - r0, w + c, k5, 4, (__mmask16)0xffff, nt, cb + c, cw + c, CN_LNK * C); \
            for (; c < cg; c += 16)  /* tail: whole lines only for float32 vectors */      \
                cn_lnb_tile_##T(g + off0 + c, x + off0 + c, dx == NULL ? NULL : dx + off0 + c, C, \
                                r1 - r0, w + c, k5, 1, cn_mask16(cg - c), sizeof(T) == 4 ? nt : 0, \
                                cb + c, cw + c, CN_LNK * C);                              \
        }
#else
#define CN_LNB_PASS_B(T)                                                                  \
        for (i = 0; i < cg; i++) { cb[i] = 0.0f; cw[i] = 0.0f; }                          \
        for (n = r0; n < r1; n++) {                                                       \
            const float* k = k5 + 5 * (n - r0); const ptrdiff_t o = off0 + (n - r0) * C;  \
            for (i = 0; i < cg; i++) {                                                    \
                float gv = CN_LDF_##T(g + o + i), d = (CN_LDF_##T(x + o + i) - k[0]) - k[1]; \
                if (dx != NULL) cn_st1_##T(dx + o + i, CN_FMA(w[i], gv * k[2], CN_FMA(d, k[3], k[4]))); \
                cb[i] += gv; cw[i] = CN_FMA(gv * k[2], d, cw[i]);                         \
            }                                                                             \
        }
#endif
#define CN_LNBWD(T)                                                                       \
static void cn_ln_bwd_rows_##T(const T* g, const T* x, T* dx, ptrdiff_t C,                \
                                 ptrdiff_t cg, ptrdiff_t G, ptrdiff_t gi, ptrdiff_t n0,   \
                                 ptrdiff_t n1, const float* mean, const float* rstd,      \
                                 const float* w, double* pw, double* pb, float* fb) {     \
    const ptrdiff_t c0 = gi * cg; const double m = (double)cg;                            \
    float* restrict cb = fb; float* restrict cw = fb + cg;                                \
    double mk[CN_LNK], dk[CN_LNK], rk[CN_LNK]; float k5[5 * CN_LNK];                      \
    ptrdiff_t r0, n, i;                                                                   \
    (void)i;  /* the portable pass B's column index */                                    \
    w += c0; pw += c0; pb += c0;                                                          \
    for (r0 = n0; r0 < n1; r0 += CN_LNK) {                                                \
        const ptrdiff_t r1 = n1 - r0 < CN_LNK ? n1 : r0 + CN_LNK, off0 = r0 * C + c0;     \
        for (n = r0; n < r1; n++) {                                                       \
            const float mu = mean[n * G + gi]; const double r = (double)rstd[n * G + gi]; \
            double dl, swg, swgx;                                                         \
            cn_lnb_row_##T(g + n * C + c0, x + n * C + c0, w, cg, mu, &dl, &swg, &swgx);  \
            mk[n - r0] = (double)mu; dk[n - r0] = dl; rk[n - r0] = r;                     \
            k5[5 * (n - r0)] = mu; k5[5 * (n - r0) + 1] = (float)dl;                      \
            k5[5 * (n - r0) + 2] = (float)r;                                              \
            k5[5 * (n - r0) + 3] = (float)(-r * r * r * swgx / m);                        \
            k5[5 * (n - r0) + 4] = (float)(-r * swg / m);                                 \
        }                                                                                 \
        CN_LNB_PASS_B(T)                                                                  \
        cn_lnb_flush_##T(g + off0, x + off0, C, r1 - r0, cg, cb, cw, mk, dk, rk, pb, pw); \
    }                                                                                     \
}
CN_LNBWD(float)
CN_LNBWD(cn_bf16)
CN_LNBWD(cn_f16)


/* ------------------------------------------------- half runs, AVX-512 --
   cn_hsum_run / cn_hsq_run / cn_hgrad_run for half data with the float lanes
   and double lanes kept in registers: the same chunking (CN_CHUNK elements,
   CN_FL float lanes, lane j + 16 folded onto lane j in double), tails by
   masked loads, the overflow check once per run. The scalar versions above
   spill and reload every lane at each chunk's end, which costs as much as
   the chunk's arithmetic. */
#if defined(CN_AVX512)
static inline int cn_vfinite(__m512d a, __m512d b) {
    __m512d z = _mm512_setzero_pd();
    return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_mul_pd(a, z), _mm512_mul_pd(b, z))) == 0.0;
}
#define CN_VHRUNS(T)                                                                      \
static inline void cn_hsum_run_v_##T(const T* x, ptrdiff_t n, double piv, double* acc) {  \
    const float pf = (float)piv; const __m512 vp = _mm512_set1_ps(pf);                    \
    __m512d d0 = _mm512_setzero_pd(), d1 = d0; ptrdiff_t i0, i;                           \
    for (i0 = 0; i0 < n; i0 += CN_CHUNK) {                                                \
        const T* xc = x + i0; ptrdiff_t m = n - i0 < CN_CHUNK ? n - i0 : CN_CHUNK;        \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;                                         \
        for (i = 0; i + CN_FL <= m; i += CN_FL) {                                         \
            a0 = _mm512_add_ps(a0, _mm512_sub_ps(cn_vld_##T(xc + i), vp));                \
            a1 = _mm512_add_ps(a1, _mm512_sub_ps(cn_vld_##T(xc + i + 16), vp));           \
        }                                                                                 \
        if (i < m) {                                                                      \
            __mmask16 k0 = cn_mask16(m - i), k1 = cn_mask16(m - i - 16);                  \
            a0 = _mm512_mask_add_ps(a0, k0, a0, _mm512_sub_ps(cn_vldm_##T(k0, xc + i), vp)); \
            a1 = _mm512_mask_add_ps(a1, k1, a1, _mm512_sub_ps(cn_vldm_##T(k1, xc + i + 16), vp)); \
        }                                                                                 \
        CN_FOLD(d0, d1, a0, a1);                                                          \
    }                                                                                     \
    if (!cn_vfinite(d0, d1)) { cn_sum_run_##T(x, n, piv, acc); return; }                  \
    cn_vacc16(acc, d0, d1);                                                               \
    acc[0] += (double)n * ((double)pf - piv);  /* exact for any piv */                    \
}                                                                                         \
static inline void cn_hsq_run_v_##T(const T* x, ptrdiff_t n, double m, double* acc) {     \
    const float mf = (float)m; const double dm = m - (double)mf;                          \
    const __m512 vm = _mm512_set1_ps(mf);                                                 \
    __m512d d0 = _mm512_setzero_pd(), d1 = d0, e0 = d0, e1 = d0; ptrdiff_t i0, i; double sb; \
    for (i0 = 0; i0 < n; i0 += CN_CHUNK) {                                                \
        const T* xc = x + i0; ptrdiff_t k = n - i0 < CN_CHUNK ? n - i0 : CN_CHUNK;        \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;                       \
        for (i = 0; i + CN_FL <= k; i += CN_FL) {                                         \
            __m512 u0 = _mm512_sub_ps(cn_vld_##T(xc + i), vm);                            \
            __m512 u1 = _mm512_sub_ps(cn_vld_##T(xc + i + 16), vm);                       \
            a0 = _mm512_fmadd_ps(u0, u0, a0); a1 = _mm512_fmadd_ps(u1, u1, a1);           \
            b0 = _mm512_add_ps(b0, u0); b1 = _mm512_add_ps(b1, u1);                       \
        }                                                                                 \
        if (i < k) {                                                                      \
            __mmask16 k0 = cn_mask16(k - i), k1 = cn_mask16(k - i - 16);                  \
            __m512 u0 = _mm512_maskz_sub_ps(k0, cn_vldm_##T(k0, xc + i), vm);             \
            __m512 u1 = _mm512_maskz_sub_ps(k1, cn_vldm_##T(k1, xc + i + 16), vm);        \
            a0 = _mm512_fmadd_ps(u0, u0, a0); a1 = _mm512_fmadd_ps(u1, u1, a1);           \
            b0 = _mm512_add_ps(b0, u0); b1 = _mm512_add_ps(b1, u1);                       \
        }                                                                                 \
        CN_FOLD(d0, d1, a0, a1); CN_FOLD(e0, e1, b0, b1);                                 \
    }                                                                                     \
    sb = _mm512_reduce_add_pd(_mm512_add_pd(e0, e1));                                     \
    if (!cn_vfinite(d0, d1) || sb - sb != 0.0) { cn_sq_run_##T(x, n, m, acc); return; }   \
    cn_vacc16(acc, d0, d1);                                                               \
    acc[0] += dm * ((double)n * dm - 2.0 * sb);  /* exact for the centre's rounding */    \
}
#define CN_VHGRAD_RUN(T)                                                                  \
static inline void cn_hgrad_run_v_##T(const T* g, const T* x, ptrdiff_t n, double m,      \
                                      double* ag, double* agx, double* ax) {              \
    const float mf = (float)m; const __m512 vm = _mm512_set1_ps(mf); ptrdiff_t i0, i;     \
    __m512d p0 = _mm512_setzero_pd(), p1 = p0, q0 = p0, q1 = p0, r0 = p0, r1 = p0;        \
    if ((double)mf != m) { cn_grad_run_##T(g, x, n, m, ag, agx, ax); return; }            \
    for (i0 = 0; i0 < n; i0 += CN_CHUNK) {                                                \
        const T* gc = g + i0; const T* xc = x + i0;                                       \
        ptrdiff_t k = n - i0 < CN_CHUNK ? n - i0 : CN_CHUNK;                              \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0;     \
        for (i = 0; i + CN_FL <= k; i += CN_FL) {                                         \
            __m512 g0, g1, u0, u1;                                                        \
            cn_vld2_##T(gc + i, &g0, &g1); cn_vld2_##T(xc + i, &u0, &u1);                 \
            u0 = _mm512_sub_ps(u0, vm); u1 = _mm512_sub_ps(u1, vm);                       \
            a0 = _mm512_add_ps(a0, g0); a1 = _mm512_add_ps(a1, g1);                       \
            b0 = _mm512_fmadd_ps(g0, u0, b0); b1 = _mm512_fmadd_ps(g1, u1, b1);           \
            c0 = _mm512_add_ps(c0, u0); c1 = _mm512_add_ps(c1, u1);                       \
        }                                                                                 \
        if (i < k) {                                                                      \
            __m512 g0, g1, u0, u1; __mmask16 k0, k1;                                      \
            cn_vld2m_##T(k - i, gc + i, &g0, &g1, &k0, &k1);                              \
            cn_vld2m_##T(k - i, xc + i, &u0, &u1, &k0, &k1);                              \
            u0 = _mm512_maskz_sub_ps(k0, u0, vm); u1 = _mm512_maskz_sub_ps(k1, u1, vm);   \
            a0 = _mm512_add_ps(a0, g0); a1 = _mm512_add_ps(a1, g1);                       \
            b0 = _mm512_fmadd_ps(g0, u0, b0); b1 = _mm512_fmadd_ps(g1, u1, b1);           \
            c0 = _mm512_add_ps(c0, u0); c1 = _mm512_add_ps(c1, u1);                       \
        }                                                                                 \
        CN_FOLD(p0, p1, a0, a1); CN_FOLD(q0, q1, b0, b1); CN_FOLD(r0, r1, c0, c1);        \
    }                                                                                     \
    if (!(cn_vfinite(p0, p1) && cn_vfinite(q0, q1) && cn_vfinite(r0, r1))) {              \
        cn_grad_run_##T(g, x, n, m, ag, agx, ax); return;                                 \
    }                                                                                     \
    cn_vacc16(ag, p0, p1); cn_vacc16(agx, q0, q1); cn_vacc16(ax, r0, r1);                 \
}
CN_VHRUNS(cn_bf16)
CN_VHRUNS(cn_f16)
CN_VHGRAD_RUN(float)
CN_VHGRAD_RUN(cn_bf16)
CN_VHGRAD_RUN(cn_f16)
#define CN_HRUN_IMPL(T) v_##T
#else
#define CN_HRUN_IMPL(T) s_##T
#endif
#define CN_HRUN_PICK(name, impl) CN_HRUN_PICK_(name, impl)
#define CN_HRUN_PICK_(name, impl) name##impl
/* the runs the kernels call: the vector versions where the build has them */
#define CN_HRUN_API(T)                                                                    \
static inline void cn_hsum_run_##T(const T* x, ptrdiff_t n, double piv, double* acc) {    \
    CN_HRUN_PICK(cn_hsum_run_, CN_HRUN_IMPL(T))(x, n, piv, acc);                          \
}                                                                                         \
static inline void cn_hsq_run_##T(const T* x, ptrdiff_t n, double m, double* acc) {       \
    CN_HRUN_PICK(cn_hsq_run_, CN_HRUN_IMPL(T))(x, n, m, acc);                             \
}
#define CN_HGRAD_RUN_API(T)                                                               \
static inline void cn_hgrad_run_##T(const T* g, const T* x, ptrdiff_t n, double m,        \
                                    double* ag, double* agx, double* ax) {                \
    CN_HRUN_PICK(cn_hgrad_run_, CN_HRUN_IMPL(T))(g, x, n, m, ag, agx, ax);                \
}
CN_HRUN_API(cn_bf16)
CN_HRUN_API(cn_f16)
CN_HGRAD_RUN_API(float)
CN_HGRAD_RUN_API(cn_bf16)
CN_HGRAD_RUN_API(cn_f16)

#endif
