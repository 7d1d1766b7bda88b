/* The avx512 level's native register: 16 floats (AVX-512 F/BW/VL/DQ).

   Every native header defines the same small set of operations on `nf` (W
   floats) and `nd` (W/2 doubles); vec.hpp builds cnorm's 16-lane vector type
   from them. Conversions reproduce half.hpp's scalar ones bit for bit.
   AVX512-BF16 is not part of the level (Zen 4, Cooper Lake and Sapphire
   Rapids have it, Skylake-X and Ice Lake do not): the module asks cpuid once
   (cn_native_init) and uses it through inline assembly, so no compiler flag
   admits it anywhere else. */
#ifndef CN_NATIVE_AVX512_HPP
#define CN_NATIVE_AVX512_HPP
#if defined(__GNUC__) && !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
                           defined(__AVX512DQ__) && defined(__FMA__) && defined(__F16C__))
#error "the avx512 level is compiled with the x86-64-v4 feature flags (setup.py)"
#endif
#if defined(__GNUC__) && !defined(__clang__)
/* GCC 12 reports the _mm*_undefined_*() operands inside its own AVX-512
   headers as uninitialized (a false positive of the headers, not of cnorm) */
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#include <math.h>
#include "../cpu_features.h"

#define CN_VEC_LEVEL "avx512"
#define CN_VEC_FMA 1   /* nf_fma is one rounding */

namespace {

constexpr int CN_W = 16;
typedef __m512 nf;
typedef __m512d nd;

#if defined(__GNUC__) || defined(__clang__)
int cn_hw_bf16 = 0;   /* the CPU has vcvtne(2)ps2bf16: set by cn_native_init */
inline void cn_native_init() { cn_hw_bf16 = (cn_cpu_features() & CN_F_AVX512BF16) != 0; }
#else
const int cn_hw_bf16 = 0;
inline void cn_native_init() {}
#endif

CN_INLINE float cn_fma1(float a, float b, float c) { return fmaf(a, b, c); }   /* one instruction with FMA */

CN_INLINE nf nf_zero() { return _mm512_setzero_ps(); }
CN_INLINE nf nf_set1(float a) { return _mm512_set1_ps(a); }
CN_INLINE nf nf_add(nf a, nf b) { return _mm512_add_ps(a, b); }
CN_INLINE nf nf_sub(nf a, nf b) { return _mm512_sub_ps(a, b); }
CN_INLINE nf nf_mul(nf a, nf b) { return _mm512_mul_ps(a, b); }
CN_INLINE nf nf_fma(nf a, nf b, nf c) { return _mm512_fmadd_ps(a, b, c); }

/* a > b ? a : b and a < b ? a : b lane-wise: b where either is NaN (x86's
   maxps/minps rule, which every level follows) */
CN_INLINE nf nf_max(nf a, nf b) { return _mm512_max_ps(a, b); }
CN_INLINE nf nf_min(nf a, nf b) { return _mm512_min_ps(a, b); }
CN_INLINE nf nf_div(nf a, nf b) { return _mm512_div_ps(a, b); }
/* a > b ? t : f lane-wise (f where a or b is NaN) */
CN_INLINE nf nf_sel_gt(nf a, nf b, nf t, nf f) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), f, t); }
/* a·b where a's sign bit is set, else a */
CN_INLINE nf nf_mul_neg(nf a, nf b) {
    return _mm512_mask_mul_ps(a, _mm512_movepi32_mask(_mm512_castps_si512(a)), a, b);
}
/* -|v| (the sign bit set; NaN stays NaN) */
CN_INLINE nf nf_nabs(nf v) { return _mm512_or_ps(v, _mm512_set1_ps(-0.0f)); }
/* 2^(k + 32) for t = 1.5·2^23 + k, k an integer in [-158, 95]: t's bits are
   0x4b400000 + k, so (bits << 23) + ((127 + 32) << 23) are those of 2^(k + 32) */
CN_INLINE nf nf_exp2i32(nf t) {
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(_mm512_castps_si512(t), 23),
                                                _mm512_set1_epi32(159 << 23)));
}
/* p·2^k (k integer-valued) in one instruction and one rounding: vexp_nabs's last
   step, two operations fewer than 2^(k + 32) from t's bits and a multiply */
#define CN_VEC_SCALEF 1
CN_INLINE nf nf_scalef(nf p, nf k) { return _mm512_scalef_ps(p, k); }
/* -min(|a|, c) for c > 0 in one instruction (vrangeps: the operand of smaller
   magnitude, sign set; a NaN a comes back quieted), vexp_nabs's clamp: the
   same values as max(-c, -|a|) (vnabs, vmax), one operation fewer */
#define CN_VEC_RANGE 1
CN_INLINE nf nf_nabs_min(nf a, nf c) { return _mm512_range_ps(a, c, 0x0e); }

/* the first m lanes (m clamped to [0, 16]) */
CN_INLINE __mmask16 cn_k16(ptrdiff_t m) {
    return m >= 16 ? (__mmask16)0xffff : m <= 0 ? (__mmask16)0 : (__mmask16)((1u << m) - 1u);
}
CN_INLINE __mmask32 cn_k32(ptrdiff_t m) {
    return m >= 32 ? (__mmask32)0xffffffffu : m <= 0 ? (__mmask32)0 : (__mmask32)((1u << m) - 1u);
}
CN_INLINE nf nf_keep(nf v, ptrdiff_t m) { return _mm512_maskz_mov_ps(cn_k16(m), v); }

/* ---- loads: W values widened to float ---- */
CN_INLINE nf cn_widen_bf16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
CN_INLINE nf nf_load(const float* p) { return _mm512_loadu_ps(p); }
CN_INLINE nf nf_load(const cn_bf16* p) { return cn_widen_bf16(_mm256_loadu_si256((const __m256i*)p)); }
CN_INLINE nf nf_load(const cn_f16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
/* the first m values (0 <= m <= W); absent lanes are 0 and nothing past them is read */
CN_INLINE nf nf_load_n(const float* p, ptrdiff_t m) { return _mm512_maskz_loadu_ps(cn_k16(m), p); }
CN_INLINE nf nf_load_n(const cn_bf16* p, ptrdiff_t m) {
    return cn_widen_bf16(_mm256_maskz_loadu_epi16(cn_k16(m), p));
}
CN_INLINE nf nf_load_n(const cn_f16* p, ptrdiff_t m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(cn_k16(m), p));
}
/* 2W bfloat16 values split into the even and the odd positions: one load, a
   shift and a mask - no widening shuffle (on Zen 4 it costs twice the rest) */
CN_INLINE void cn_split_bf16(__m512i u, nf& e, nf& o) {
    e = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
    o = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}
CN_INLINE void nf_load_eo(const cn_bf16* p, nf& e, nf& o) { cn_split_bf16(_mm512_loadu_si512(p), e, o); }
CN_INLINE void nf_load_eo_n(const cn_bf16* p, ptrdiff_t m, nf& e, nf& o) {
    cn_split_bf16(_mm512_maskz_loadu_epi16(cn_k32(m), p), e, o);
}

/* ---- stores: W values rounded to the storage type; nt: streaming (p 64-byte aligned) ---- */
CN_INLINE void cn_st256(void* p, __m256i h, bool nt) {
    if (nt) _mm256_stream_si256((__m256i*)p, h); else _mm256_storeu_si256((__m256i*)p, h);
}
CN_INLINE void cn_st512(void* p, __m512i w, bool nt) {
    if (nt) _mm512_stream_si512((__m512i*)p, w); else _mm512_storeu_si512(p, w);
}
CN_INLINE void nf_store(float* p, nf v, bool nt) {
    if (nt) _mm512_stream_ps(p, v); else _mm512_storeu_ps(p, v);
}
/* float -> bfloat16 in integer code, as cn_f32_to_bf16 (see native_avx2.hpp) */
CN_INLINE __m256i cn_bf16_round(nf v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                 _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}
/* AVX512-BF16 rounds to nearest even and quiets NaN as the integer code does,
   but reads subnormal inputs as zero: vectors holding one (vfpclassps 0x20)
   take the integer code, so every value stays bit-exact. */
CN_INLINE bool cn_no_subnormal(nf v) { return _mm512_fpclass_ps_mask(v, 0x20) == 0; }
CN_INLINE __m256i cn_bf16_pack(nf v) {
#if defined(__GNUC__) || defined(__clang__)
    if (cn_hw_bf16 && CN_LIKELY(cn_no_subnormal(v))) {
        __m256i r;
        /* volatile: a plain asm is a pure function to GCC, which could then run it ahead of the
           cn_hw_bf16 test (if-conversion) and trap on an AVX-512 CPU without AVX512-BF16 */
        __asm__ volatile("vcvtneps2bf16 %1, %0" : "=v"(r) : "v"(v));
        return r;
    }
#endif
    return cn_bf16_round(v);
}
/* 2W values: a's W, then b's, one subnormal check for both (a check per
   vector cost as much as the conversion) */
CN_INLINE __m512i cn_bf16_pack2(nf a, nf b) {
#if defined(__GNUC__) || defined(__clang__)
    if (cn_hw_bf16 && CN_LIKELY(_kortestz_mask16_u8(_mm512_fpclass_ps_mask(a, 0x20),
                                                     _mm512_fpclass_ps_mask(b, 0x20)))) {
        __m512i r;
        __asm__ volatile("vcvtne2ps2bf16 %2, %1, %0" : "=v"(r) : "v"(b), "v"(a));   /* low half: a; volatile: above */
        return r;
    }
#endif
    return _mm512_inserti64x4(_mm512_castsi256_si512(cn_bf16_round(a)), cn_bf16_round(b), 1);
}
CN_INLINE __m256i cn_f16_pack(nf v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
CN_INLINE void nf_store(cn_bf16* p, nf v, bool nt) { cn_st256(p, cn_bf16_pack(v), nt); }
CN_INLINE void nf_store(cn_f16* p, nf v, bool nt) { cn_st256(p, cn_f16_pack(v), nt); }
/* 2W consecutive 16-bit values: a's, then b's */
CN_INLINE void nf_store2(cn_bf16* p, nf a, nf b, bool nt) { cn_st512(p, cn_bf16_pack2(a, b), nt); }
CN_INLINE void nf_store2(cn_f16* p, nf a, nf b, bool nt) {
    cn_st512(p, _mm512_inserti64x4(_mm512_castsi256_si512(cn_f16_pack(a)), cn_f16_pack(b), 1), nt);
}
/* the inverse of nf_load_eo: e and o back to their even and odd positions */
CN_INLINE __m512i cn_interleave16(__m512i w) {
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(idx, w);
}
CN_INLINE void nf_store_eo(cn_bf16* p, nf e, nf o, bool nt) {
    cn_st512(p, cn_interleave16(cn_bf16_pack2(e, o)), nt);
}
/* vrelu_grad2_n: dy's 2W bfloat16 values where the z of their position (e:
   even, o: odd, as nf_load_eo splits them) is > 0, else +0; the two 16-lane
   comparisons become one 32 x 16-bit vector mask (vpmovm2d, then even
   positions from e's, odd from o's) */
#define CN_VEC_EO_MASK 1
CN_INLINE __m512i cn_eo_mask_gt0(nf e, nf o) {
    const nf z = _mm512_setzero_ps();
    return _mm512_mask_blend_epi16(0xAAAAAAAAu, _mm512_movm_epi32(_mm512_cmp_ps_mask(e, z, _CMP_GT_OQ)),
                                   _mm512_movm_epi32(_mm512_cmp_ps_mask(o, z, _CMP_GT_OQ)));
}
CN_INLINE void nf_copy_eo_gt0(cn_bf16* g, const cn_bf16* dy, nf e, nf o, bool nt) {
    cn_st512(g, _mm512_and_si512(_mm512_loadu_si512(dy), cn_eo_mask_gt0(e, o)), nt);
}
/* the first m values (0 <= m <= W, or 2W for the pair forms), ordinary stores */
CN_INLINE void nf_store_n(float* p, nf v, ptrdiff_t m) { _mm512_mask_storeu_ps(p, cn_k16(m), v); }
CN_INLINE void nf_store_n(cn_bf16* p, nf v, ptrdiff_t m) { _mm256_mask_storeu_epi16(p, cn_k16(m), cn_bf16_pack(v)); }
CN_INLINE void nf_store_n(cn_f16* p, nf v, ptrdiff_t m) { _mm256_mask_storeu_epi16(p, cn_k16(m), cn_f16_pack(v)); }
CN_INLINE void nf_store_eo_n(cn_bf16* p, nf e, nf o, ptrdiff_t m) {
    _mm512_mask_storeu_epi16(p, cn_k32(m), cn_interleave16(cn_bf16_pack2(e, o)));
}
CN_INLINE void nf_copy_eo_gt0_n(cn_bf16* g, const cn_bf16* dy, nf e, nf o, ptrdiff_t m) {
    const __mmask32 k = cn_k32(m);
    _mm512_mask_storeu_epi16(g, k, _mm512_and_si512(_mm512_maskz_loadu_epi16(k, dy), cn_eo_mask_gt0(e, o)));
}

/* ---- doubles ---- */
CN_INLINE nd nd_zero() { return _mm512_setzero_pd(); }
CN_INLINE nd nd_add(nd a, nd b) { return _mm512_add_pd(a, b); }
CN_INLINE nd nd_mul(nd a, nd b) { return _mm512_mul_pd(a, b); }
CN_INLINE nd nd_load(const double* p) { return _mm512_loadu_pd(p); }
CN_INLINE void nd_store(double* p, nd v) { _mm512_storeu_pd(p, v); }
/* lanes [0, W/2) and [W/2, W) widened */
CN_INLINE void nf_widen(nf v, nd& lo, nd& hi) {
    lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
/* the lanes' sum, halving: lane j + lane j + 4, then j + 2, then j + 1 */
CN_INLINE double nd_hsum(nd v) {
    __m256d h = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    __m128d q = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
    return _mm_cvtsd_f64(_mm_add_sd(q, _mm_unpackhi_pd(q, q)));
}

/* one 64-byte line, streaming (dst aligned) */
CN_INLINE void cn_copy_line_nt(char* dst, const char* src) {
    _mm512_stream_si512((__m512i*)dst, _mm512_loadu_si512((const void*)src));
}

}  // namespace
#endif
