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
    uint32_t big = 0x7c00u | ((uint32_t)(a > 0x7f800000u) << 9);
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

/* T: storage type, P: parameter type (float, or double for double data). */
#define CN_RUNS(T, P)                                                                     \
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
}                                                                                         \
/* per-element affine (LayerNorm) row: awg += w g, awgx += w g (x-m-dl) lane-wise;        \
   pb[i] += g, pw[i] += g (x-m-dl) r */                                                   \
static inline void cn_elem_grad_run_##T(const T* g, const T* x, const P* w, ptrdiff_t n,  \
                                        double m, double dl, double r, double* awg,       \
                                        double* awgx, double* pb, double* pw) {           \
    double a[CN_LANES], b[CN_LANES]; ptrdiff_t i, j, nv = n - n % CN_LANES;               \
    for (j = 0; j < CN_LANES; j++) { a[j] = awg[j]; b[j] = awgx[j]; }                     \
    for (i = 0; i < nv; i += CN_LANES) {                                                  \
        CN_KEEP_LOOP                                                                      \
        for (j = 0; j < CN_LANES; j++) {                                                  \
            double gv = CN_LD_##T(g + i + j), wv = w[i + j];                              \
            double d = ((CN_LD_##T(x + i + j) - m) - dl) * gv;                            \
            a[j] += wv * gv; b[j] += wv * d; pb[i + j] += gv; pw[i + j] += d * r;         \
        }                                                                                 \
    }                                                                                     \
    for (j = 0; j < n - nv; j++) {                                                        \
        double gv = CN_LD_##T(g + nv + j), wv = w[nv + j];                                \
        double d = ((CN_LD_##T(x + nv + j) - m) - dl) * gv;                               \
        a[j] += wv * gv; b[j] += wv * d; pb[nv + j] += gv; pw[nv + j] += d * r;           \
    }                                                                                     \
    for (j = 0; j < CN_LANES; j++) { awg[j] = a[j]; awgx[j] = b[j]; }                     \
}

CN_RUNS(float, float)
CN_RUNS(double, double)
CN_RUNS(cn_bf16, float)
CN_RUNS(cn_f16, float)

#endif
