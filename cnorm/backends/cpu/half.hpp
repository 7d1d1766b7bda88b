/* Half-precision storage: float16 and bfloat16 as 16-bit patterns in distinct
   struct types (so overloads and Cython's fused types tell them apart),
   converted to and from float32 bit-exactly - round to nearest even,
   subnormals kept, NaN stays NaN, overflow gives Inf - by branch-free integer
   code. These scalar conversions define the values; every vector level
   (vec/native_*.hpp) reproduces them bit for bit. */
#ifndef CN_HALF_HPP
#define CN_HALF_HPP
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <type_traits>

/* Unroll the next loop n times (the chunk loops of the sums: the full unroll
   GCC used to choose keeps memory reads flowing; measured 8-14% from memory) */
#if defined(__clang__)
#define CN_UNROLL(n) _Pragma(CN_STR(unroll n))
#elif defined(__GNUC__)
#define CN_UNROLL(n) _Pragma(CN_STR(GCC unroll n))
#else
#define CN_UNROLL(n)
#endif
#define CN_STR(x) #x

#if defined(__GNUC__) || defined(__clang__)
#define CN_INLINE inline __attribute__((always_inline))
#define CN_NOINLINE __attribute__((noinline))
#define CN_LAMBDA __attribute__((always_inline))   /* after a lambda's parameter list */
#define CN_RESTRICT __restrict__
#define CN_LIKELY(c) __builtin_expect(!!(c), 1)
#elif defined(_MSC_VER)
#define CN_INLINE __forceinline
#define CN_NOINLINE __declspec(noinline)
#define CN_LAMBDA
#define CN_RESTRICT __restrict
#define CN_LIKELY(c) (c)
#else
#define CN_INLINE inline
#define CN_NOINLINE
#define CN_LAMBDA
#define CN_RESTRICT
#define CN_LIKELY(c) (c)
#endif

struct cn_bf16 { uint16_t v; };
struct cn_f16 { uint16_t v; };

namespace {

inline float cn_u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
inline uint32_t cn_f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

inline float cn_bf16_to_f32(cn_bf16 h) { return cn_u2f((uint32_t)h.v << 16); }

inline cn_bf16 cn_f32_to_bf16(float f) {
    uint32_t u = cn_f2u(f);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;       /* round to nearest even */
    uint32_t q = (u >> 16) | 0x40u;                            /* NaN: truncate, set quiet */
    uint32_t mn = 0u - (uint32_t)((u & 0x7fffffffu) > 0x7f800000u);
    cn_bf16 h; h.v = (uint16_t)((q & mn) | (r & ~mn)); return h;
}

inline float cn_f16_to_f32(cn_f16 h) {
    uint32_t x = h.v, em = x & 0x7fffu, sign = (x & 0x8000u) << 16;
    uint32_t n = (em << 13) + ((127u - 15u) << 23);
    uint32_t inf = n + ((128u - 16u) << 23);
    float sub = (float)em * 5.9604644775390625e-08f;   /* em * 2^-24 exactly */
    uint32_t minf = 0u - (uint32_t)(em >= 0x7c00u), msub = 0u - (uint32_t)(em < 0x0400u);
    uint32_t o = (inf & minf) | (~minf & ((cn_f2u(sub) & msub) | (n & ~msub)));
    return cn_u2f(o | sign);
}

inline cn_f16 cn_f32_to_f16(float f) {
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

/* One stored value as float (exact) or double, and a float result stored. */
CN_INLINE float cn_ldf(const float* p) { return *p; }
CN_INLINE float cn_ldf(const cn_bf16* p) { return cn_bf16_to_f32(*p); }
CN_INLINE float cn_ldf(const cn_f16* p) { return cn_f16_to_f32(*p); }
CN_INLINE double cn_ldd(const double* p) { return *p; }
CN_INLINE double cn_ldd(const float* p) { return (double)*p; }
CN_INLINE double cn_ldd(const cn_bf16* p) { return (double)cn_bf16_to_f32(*p); }
CN_INLINE double cn_ldd(const cn_f16* p) { return (double)cn_f16_to_f32(*p); }
CN_INLINE void cn_stf(float* p, float v) { *p = v; }
CN_INLINE void cn_stf(cn_bf16* p, float v) { *p = cn_f32_to_bf16(v); }
CN_INLINE void cn_stf(cn_f16* p, float v) { *p = cn_f32_to_f16(v); }

}  // namespace
#endif
