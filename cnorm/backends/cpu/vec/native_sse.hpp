/* The baseline level's native register on x86-64: 4 floats (x86-64-v2: up to
   SSE4.2, what NumPy 2 itself requires). No FMA: a*b + c rounds twice, here
   and in the scalar cn_fma1, so where a value falls never changes it. No F16C:
   float16 converts with the integer code of half.hpp, four lanes at a time. */
#ifndef CN_NATIVE_SSE_HPP
#define CN_NATIVE_SSE_HPP
#if defined(__GNUC__) && !(defined(__SSE4_1__) && defined(__SSE4_2__))
#error "the baseline level is compiled with the x86-64-v2 feature flags (setup.py)"
#endif
#include <smmintrin.h>

#define CN_VEC_LEVEL "baseline"
#define CN_VEC_FMA 0

namespace {

constexpr int CN_W = 4;
typedef __m128 nf;
typedef __m128d nd;

inline void cn_native_init() {}

CN_INLINE float cn_fma1(float a, float b, float c) { return a * b + c; }   /* two roundings, as nf_fma */

CN_INLINE nf nf_zero() { return _mm_setzero_ps(); }
CN_INLINE nf nf_set1(float a) { return _mm_set1_ps(a); }
CN_INLINE nf nf_add(nf a, nf b) { return _mm_add_ps(a, b); }
CN_INLINE nf nf_sub(nf a, nf b) { return _mm_sub_ps(a, b); }
CN_INLINE nf nf_mul(nf a, nf b) { return _mm_mul_ps(a, b); }
CN_INLINE nf nf_fma(nf a, nf b, nf c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }

/* the operations of native_avx512.hpp for activations */
CN_INLINE nf nf_max(nf a, nf b) { return _mm_max_ps(a, b); }
CN_INLINE nf nf_min(nf a, nf b) { return _mm_min_ps(a, b); }
CN_INLINE nf nf_div(nf a, nf b) { return _mm_div_ps(a, b); }
CN_INLINE nf nf_sel_gt(nf a, nf b, nf t, nf f) { return _mm_blendv_ps(f, t, _mm_cmpgt_ps(a, b)); }
CN_INLINE nf nf_mul_neg(nf a, nf b) { return _mm_blendv_ps(a, _mm_mul_ps(a, b), a); }
CN_INLINE nf nf_nabs(nf v) { return _mm_or_ps(v, _mm_set1_ps(-0.0f)); }
CN_INLINE nf nf_exp2i32(nf t) {
    return _mm_castsi128_ps(_mm_add_epi32(_mm_slli_epi32(_mm_castps_si128(t), 23), _mm_set1_epi32(159 << 23)));
}

const int32_t cn_mask_tab[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
CN_INLINE __m128i cn_k4(ptrdiff_t m) {
    m = m < 0 ? 0 : m > 4 ? 4 : m;
    return _mm_loadu_si128((const __m128i*)(cn_mask_tab + 4 - m));
}
CN_INLINE nf nf_keep(nf v, ptrdiff_t m) { return _mm_and_ps(v, _mm_castsi128_ps(cn_k4(m))); }

CN_INLINE __m128i cn_i(int v) { return _mm_set1_epi32(v); }

/* ---- loads ---- */
CN_INLINE nf cn_bf16_widen(__m128i h4) {   /* four 16-bit values in the low 64 bits */
    return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h4), 16));
}
/* float16 -> float in integer code, as cn_f16_to_f32 */
CN_INLINE nf cn_f16_widen(__m128i h4) {
    __m128i x = _mm_cvtepu16_epi32(h4);
    __m128i em = _mm_and_si128(x, cn_i(0x7fff));
    __m128i sign = _mm_slli_epi32(_mm_and_si128(x, cn_i(0x8000)), 16);
    __m128i n = _mm_add_epi32(_mm_slli_epi32(em, 13), cn_i((127 - 15) << 23));
    __m128i inf = _mm_add_epi32(n, cn_i((128 - 16) << 23));
    __m128i sub = _mm_castps_si128(_mm_mul_ps(_mm_cvtepi32_ps(em), _mm_set1_ps(5.9604644775390625e-08f)));
    __m128i minf = _mm_cmpgt_epi32(em, cn_i(0x7bff)), msub = _mm_cmplt_epi32(em, cn_i(0x0400));
    __m128i o = _mm_blendv_epi8(_mm_blendv_epi8(n, sub, msub), inf, minf);
    return _mm_castsi128_ps(_mm_or_si128(o, sign));
}
CN_INLINE __m128i cn_ld64(const void* p) { return _mm_loadl_epi64((const __m128i*)p); }
CN_INLINE nf nf_load(const float* p) { return _mm_loadu_ps(p); }
CN_INLINE nf nf_load(const cn_bf16* p) { return cn_bf16_widen(cn_ld64(p)); }
CN_INLINE nf nf_load(const cn_f16* p) { return cn_f16_widen(cn_ld64(p)); }
template <class T>
CN_INLINE nf nf_load_n(const T* p, ptrdiff_t m) {
    T t[4];
    memset(t, 0, sizeof t);
    memcpy(t, p, (size_t)(m < 0 ? 0 : m > 4 ? 4 : m) * sizeof(T));
    return nf_load(t);
}
CN_INLINE void cn_split_bf16(__m128i u, nf& e, nf& o) {
    e = _mm_castsi128_ps(_mm_slli_epi32(u, 16));
    o = _mm_castsi128_ps(_mm_and_si128(u, cn_i((int)0xffff0000u)));
}
CN_INLINE void nf_load_eo(const cn_bf16* p, nf& e, nf& o) { cn_split_bf16(_mm_loadu_si128((const __m128i*)p), e, o); }
CN_INLINE void nf_load_eo_n(const cn_bf16* p, ptrdiff_t m, nf& e, nf& o) {
    uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    memcpy(t, p, (size_t)(m < 0 ? 0 : m > 8 ? 8 : m) * 2);
    nf_load_eo((const cn_bf16*)t, e, o);
}

/* ---- stores ---- */
CN_INLINE void cn_st128(void* p, __m128i h, bool nt) {
    if (nt) _mm_stream_si128((__m128i*)p, h); else _mm_storeu_si128((__m128i*)p, h);
}
CN_INLINE void cn_st64(void* p, __m128i h, bool nt) {
#if defined(__x86_64__) || defined(_M_X64)
    if (nt) { _mm_stream_si64((long long*)p, _mm_cvtsi128_si64(h)); return; }
#endif
    (void)nt;
    _mm_storel_epi64((__m128i*)p, h);
}
CN_INLINE void nf_store(float* p, nf v, bool nt) {
    if (nt) _mm_stream_ps(p, v); else _mm_storeu_ps(p, v);
}
/* float -> bfloat16 as cn_f32_to_bf16, in the high half of each lane, the
   NaN fix-up only for vectors holding a NaN (see native_avx2.hpp) */
CN_INLINE __m128i cn_bf16_rne_hi(nf v) {
    __m128i u = _mm_castps_si128(v);
    return _mm_add_epi32(_mm_add_epi32(u, cn_i(0x7fff)), _mm_and_si128(_mm_srli_epi32(u, 16), cn_i(1)));
}
CN_INLINE __m128i cn_bf16_nan_fix(nf v, __m128i r) {
    __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(v, v));
    return _mm_blendv_epi8(r, _mm_or_si128(_mm_castps_si128(v), cn_i(0x400000)), nan);
}
CN_INLINE void cn_bf16_round2_hi(nf a, nf b, __m128i& ra, __m128i& rb) {
    ra = cn_bf16_rne_hi(a);
    rb = cn_bf16_rne_hi(b);
    if (!CN_LIKELY(_mm_movemask_ps(_mm_or_ps(_mm_cmpunord_ps(a, a), _mm_cmpunord_ps(b, b))) == 0)) {
        ra = cn_bf16_nan_fix(a, ra);
        rb = cn_bf16_nan_fix(b, rb);
    }
}
/* float -> float16 bits in the low half of each lane, as cn_f32_to_f16 */
CN_INLINE __m128i cn_f16_round(nf v) {
    __m128i u = _mm_castps_si128(v);
    __m128i sign = _mm_and_si128(_mm_srli_epi32(u, 16), cn_i(0x8000));
    __m128i a = _mm_and_si128(u, cn_i(0x7fffffff));
    __m128i nan = _mm_cmpgt_epi32(a, cn_i(0x7f800000));
    __m128i big = _mm_or_si128(cn_i(0x7c00),
                               _mm_and_si128(nan, _mm_or_si128(cn_i(0x200), _mm_and_si128(_mm_srli_epi32(a, 13),
                                                                                         cn_i(0x3ff)))));
    __m128i sub = _mm_sub_epi32(_mm_castps_si128(_mm_add_ps(_mm_castsi128_ps(a), _mm_set1_ps(0.5f))),
                                cn_i(0x3f000000));
    __m128i nrm = _mm_srli_epi32(_mm_add_epi32(_mm_add_epi32(a, cn_i((int)((uint32_t)(15 - 127) << 23) + 0xfff)),
                                               _mm_and_si128(_mm_srli_epi32(a, 13), cn_i(1))), 13);
    __m128i mbig = _mm_cmpgt_epi32(a, cn_i(0x477fffff)), msub = _mm_cmplt_epi32(a, cn_i(0x38800000));
    __m128i o = _mm_blendv_epi8(_mm_blendv_epi8(nrm, sub, msub), big, mbig);
    return _mm_or_si128(o, sign);
}
/* a and b rounded to 16-bit values in the low halves of the lanes */
CN_INLINE void cn_round16(const cn_bf16*, nf a, nf b, __m128i& ra, __m128i& rb) {
    cn_bf16_round2_hi(a, b, ra, rb);
    ra = _mm_srli_epi32(ra, 16);
    rb = _mm_srli_epi32(rb, 16);
}
CN_INLINE void cn_round16(const cn_f16*, nf a, nf b, __m128i& ra, __m128i& rb) {
    ra = cn_f16_round(a);
    rb = cn_f16_round(b);
}
template <class H>
CN_INLINE void nf_store(H* p, nf v, bool nt) {
    __m128i r, unused;
    cn_round16(p, v, v, r, unused);
    cn_st64(p, _mm_packus_epi32(r, r), nt);
}
template <class H>
CN_INLINE void nf_store2(H* p, nf a, nf b, bool nt) {
    __m128i ra, rb;
    cn_round16(p, a, b, ra, rb);
    cn_st128(p, _mm_packus_epi32(ra, rb), nt);
}
CN_INLINE __m128i cn_merge_eo(nf e, nf o) {
    __m128i re, ro;
    cn_bf16_round2_hi(e, o, re, ro);
    return _mm_blend_epi16(_mm_srli_epi32(re, 16), ro, 0xaa);
}
CN_INLINE void nf_store_eo(cn_bf16* p, nf e, nf o, bool nt) { cn_st128(p, cn_merge_eo(e, o), nt); }
template <class T>
CN_INLINE void nf_store_n(T* p, nf v, ptrdiff_t m) {
    T t[4];
    nf_store(t, v, false);
    memcpy(p, t, (size_t)(m < 0 ? 0 : m > 4 ? 4 : m) * sizeof(T));
}
CN_INLINE void nf_store_eo_n(cn_bf16* p, nf e, nf o, ptrdiff_t m) {
    uint16_t t[8];
    _mm_storeu_si128((__m128i*)t, cn_merge_eo(e, o));
    memcpy(p, t, (size_t)(m < 0 ? 0 : m > 8 ? 8 : m) * 2);
}

/* ---- doubles ---- */
CN_INLINE nd nd_zero() { return _mm_setzero_pd(); }
CN_INLINE nd nd_add(nd a, nd b) { return _mm_add_pd(a, b); }
CN_INLINE nd nd_mul(nd a, nd b) { return _mm_mul_pd(a, b); }
CN_INLINE nd nd_load(const double* p) { return _mm_loadu_pd(p); }
CN_INLINE void nd_store(double* p, nd v) { _mm_storeu_pd(p, v); }
CN_INLINE void nf_widen(nf v, nd& lo, nd& hi) {
    lo = _mm_cvtps_pd(v);
    hi = _mm_cvtps_pd(_mm_movehl_ps(v, v));
}
CN_INLINE double nd_hsum(nd q) { return _mm_cvtsd_f64(_mm_add_sd(q, _mm_unpackhi_pd(q, q))); }

CN_INLINE void cn_copy_line_nt(char* dst, const char* src) {
    for (int k = 0; k < 64; k += 16)
        _mm_stream_si128((__m128i*)(dst + k), _mm_loadu_si128((const __m128i*)(src + k)));
}

}  // namespace
#endif
