/* The avx2 level's native register: 8 floats (x86-64-v3: AVX2, FMA, F16C).
   The operations of native_avx512.hpp; tails of 16-bit data go through a
   small stack buffer (AVX2 has masked loads and stores for 32-bit lanes only). */
#ifndef CN_NATIVE_AVX2_HPP
#define CN_NATIVE_AVX2_HPP
#if defined(__GNUC__) && !(defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#error "the avx2 level is compiled with the x86-64-v3 feature flags (setup.py)"
#endif
#include <immintrin.h>
#include <math.h>

#define CN_VEC_LEVEL "avx2"
#define CN_VEC_FMA 1

namespace {

constexpr int CN_W = 8;
typedef __m256 nf;
typedef __m256d nd;

inline void cn_native_init() {}

CN_INLINE float cn_fma1(float a, float b, float c) { return fmaf(a, b, c); }   /* one instruction with FMA */

CN_INLINE nf nf_zero() { return _mm256_setzero_ps(); }
CN_INLINE nf nf_set1(float a) { return _mm256_set1_ps(a); }
CN_INLINE nf nf_add(nf a, nf b) { return _mm256_add_ps(a, b); }
CN_INLINE nf nf_sub(nf a, nf b) { return _mm256_sub_ps(a, b); }
CN_INLINE nf nf_mul(nf a, nf b) { return _mm256_mul_ps(a, b); }
CN_INLINE nf nf_fma(nf a, nf b, nf c) { return _mm256_fmadd_ps(a, b, c); }

/* the operations of native_avx512.hpp for activations */
CN_INLINE nf nf_max(nf a, nf b) { return _mm256_max_ps(a, b); }
CN_INLINE nf nf_min(nf a, nf b) { return _mm256_min_ps(a, b); }
CN_INLINE nf nf_div(nf a, nf b) { return _mm256_div_ps(a, b); }
CN_INLINE nf nf_sel_gt(nf a, nf b, nf t, nf f) { return _mm256_blendv_ps(f, t, _mm256_cmp_ps(a, b, _CMP_GT_OQ)); }
CN_INLINE nf nf_mul_neg(nf a, nf b) { return _mm256_blendv_ps(a, _mm256_mul_ps(a, b), a); }
CN_INLINE nf nf_nabs(nf v) { return _mm256_or_ps(v, _mm256_set1_ps(-0.0f)); }
CN_INLINE nf nf_exp2i32(nf t) {
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(t), 23),
                                                _mm256_set1_epi32(159 << 23)));
}

/* all-ones in the first m lanes (m clamped to [0, 8]): a window of a table */
const int32_t cn_mask_tab[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
CN_INLINE __m256i cn_k8(ptrdiff_t m) {
    m = m < 0 ? 0 : m > 8 ? 8 : m;
    return _mm256_loadu_si256((const __m256i*)(cn_mask_tab + 8 - m));
}
CN_INLINE nf nf_keep(nf v, ptrdiff_t m) { return _mm256_and_ps(v, _mm256_castsi256_ps(cn_k8(m))); }

/* ---- loads ---- */
CN_INLINE nf cn_widen_bf16(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
CN_INLINE nf nf_load(const float* p) { return _mm256_loadu_ps(p); }
CN_INLINE nf nf_load(const cn_bf16* p) { return cn_widen_bf16(_mm_loadu_si128((const __m128i*)p)); }
CN_INLINE nf nf_load(const cn_f16* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
CN_INLINE nf nf_load_n(const float* p, ptrdiff_t m) { return _mm256_maskload_ps(p, cn_k8(m)); }
template <class H>
CN_INLINE nf cn_load_n16(const H* p, ptrdiff_t m) {
    uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    memcpy(t, p, (size_t)(m < 0 ? 0 : m > 8 ? 8 : m) * 2);
    return nf_load((const H*)t);
}
CN_INLINE nf nf_load_n(const cn_bf16* p, ptrdiff_t m) { return cn_load_n16(p, m); }
CN_INLINE nf nf_load_n(const cn_f16* p, ptrdiff_t m) { return cn_load_n16(p, m); }
CN_INLINE void cn_split_bf16(__m256i u, nf& e, nf& o) {
    e = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
    o = _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u)));
}
CN_INLINE void nf_load_eo(const cn_bf16* p, nf& e, nf& o) {
    cn_split_bf16(_mm256_loadu_si256((const __m256i*)p), e, o);
}
CN_INLINE void nf_load_eo_n(const cn_bf16* p, ptrdiff_t m, nf& e, nf& o) {
    uint16_t t[16] = {0};
    memcpy(t, p, (size_t)(m < 0 ? 0 : m > 16 ? 16 : m) * 2);
    nf_load_eo((const cn_bf16*)t, e, o);
}

/* ---- stores ---- */
CN_INLINE void cn_st128(void* p, __m128i h, bool nt) {
    if (nt) _mm_stream_si128((__m128i*)p, h); else _mm_storeu_si128((__m128i*)p, h);
}
CN_INLINE void cn_st256(void* p, __m256i h, bool nt) {
    if (nt) _mm256_stream_si256((__m256i*)p, h); else _mm256_storeu_si256((__m256i*)p, h);
}
CN_INLINE void nf_store(float* p, nf v, bool nt) {
    if (nt) _mm256_stream_ps(p, v); else _mm256_storeu_ps(p, v);
}
/* float -> bfloat16 as cn_f32_to_bf16, the result in the high half of each
   32-bit lane (the low half is garbage): round to nearest even by adding
   0x7fff plus the kept lowest bit - right for every value but NaN, which
   cn_bf16_nan_fix gives its top payload bits with the quiet bit set. The
   fix-up runs only for vectors holding a NaN (one test per pair of
   vectors): 20% fewer operations in the AVX2 bfloat16 stores. */
CN_INLINE __m256i cn_bf16_rne_hi(nf v) {
    __m256i u = _mm256_castps_si256(v);
    return _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                            _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)));
}
CN_INLINE __m256i cn_bf16_nan_fix(nf v, __m256i r) {
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x400000)), nan);
}
CN_INLINE bool cn_any_nan(nf a, nf b) {
    __m256 n = _mm256_or_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q), _mm256_cmp_ps(b, b, _CMP_UNORD_Q));
    return !_mm256_testz_ps(n, n);
}
/* a and b rounded, results in the high halves */
CN_INLINE void cn_bf16_round2_hi(nf a, nf b, __m256i& ra, __m256i& rb) {
    ra = cn_bf16_rne_hi(a);
    rb = cn_bf16_rne_hi(b);
    if (!CN_LIKELY(!cn_any_nan(a, b))) { ra = cn_bf16_nan_fix(a, ra); rb = cn_bf16_nan_fix(b, rb); }
}
/* 32-bit lanes holding 16-bit values: a's 8, then b's 8, as 16 packed values */
CN_INLINE __m256i cn_pack2(__m256i a, __m256i b) {
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xd8);
}
CN_INLINE __m128i cn_pack1(__m256i a) { return _mm256_castsi256_si128(cn_pack2(a, a)); }
CN_INLINE __m128i cn_f16_pack(nf v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
CN_INLINE void nf_store(cn_bf16* p, nf v, bool nt) {
    __m256i r, unused;
    cn_bf16_round2_hi(v, v, r, unused);
    cn_st128(p, cn_pack1(_mm256_srli_epi32(r, 16)), nt);
}
CN_INLINE void nf_store(cn_f16* p, nf v, bool nt) { cn_st128(p, cn_f16_pack(v), nt); }
CN_INLINE void nf_store2(cn_bf16* p, nf a, nf b, bool nt) {
    __m256i ra, rb;
    cn_bf16_round2_hi(a, b, ra, rb);
    cn_st256(p, cn_pack2(_mm256_srli_epi32(ra, 16), _mm256_srli_epi32(rb, 16)), nt);
}
CN_INLINE void nf_store2(cn_f16* p, nf a, nf b, bool nt) {
    cn_st256(p, _mm256_set_m128i(cn_f16_pack(b), cn_f16_pack(a)), nt);
}
/* even and odd positions back in place: odd values in the high halves of the lanes */
CN_INLINE __m256i cn_merge_eo(nf e, nf o) {
    __m256i re, ro;
    cn_bf16_round2_hi(e, o, re, ro);
    return _mm256_blend_epi16(_mm256_srli_epi32(re, 16), ro, 0xaa);
}
CN_INLINE void nf_store_eo(cn_bf16* p, nf e, nf o, bool nt) { cn_st256(p, cn_merge_eo(e, o), nt); }
/* vrelu_grad2_n: dy's 2W bfloat16 values where the z of their position (e:
   even, o: odd, as nf_load_eo splits them) is > 0, else +0; each 32-bit
   lane's mask takes its low half from e's comparison, its high half from o's */
#define CN_VEC_EO_MASK 1
CN_INLINE __m256i cn_eo_mask_gt0(nf e, nf o) {
    const nf z = _mm256_setzero_ps();
    return _mm256_blend_epi16(_mm256_castps_si256(_mm256_cmp_ps(e, z, _CMP_GT_OQ)),
                              _mm256_castps_si256(_mm256_cmp_ps(o, z, _CMP_GT_OQ)), 0xaa);
}
CN_INLINE void nf_copy_eo_gt0(cn_bf16* g, const cn_bf16* dy, nf e, nf o, bool nt) {
    cn_st256(g, _mm256_and_si256(_mm256_loadu_si256((const __m256i*)dy), cn_eo_mask_gt0(e, o)), nt);
}
CN_INLINE void nf_copy_eo_gt0_n(cn_bf16* g, const cn_bf16* dy, nf e, nf o, ptrdiff_t m) {
    uint16_t t[16] = {0};
    const size_t bytes = (size_t)(m < 0 ? 0 : m > 16 ? 16 : m) * 2;
    memcpy(t, dy, bytes);
    _mm256_storeu_si256((__m256i*)t, _mm256_and_si256(_mm256_loadu_si256((const __m256i*)t), cn_eo_mask_gt0(e, o)));
    memcpy(g, t, bytes);
}
CN_INLINE void nf_store_n(float* p, nf v, ptrdiff_t m) { _mm256_maskstore_ps(p, cn_k8(m), v); }
template <class H>
CN_INLINE void cn_store_n16(H* p, nf v, ptrdiff_t m) {
    uint16_t t[8];
    nf_store((H*)t, v, false);
    memcpy(p, t, (size_t)(m < 0 ? 0 : m > 8 ? 8 : m) * 2);
}
CN_INLINE void nf_store_n(cn_bf16* p, nf v, ptrdiff_t m) { cn_store_n16(p, v, m); }
CN_INLINE void nf_store_n(cn_f16* p, nf v, ptrdiff_t m) { cn_store_n16(p, v, m); }
CN_INLINE void nf_store_eo_n(cn_bf16* p, nf e, nf o, ptrdiff_t m) {
    uint16_t t[16];
    _mm256_storeu_si256((__m256i*)t, cn_merge_eo(e, o));
    memcpy(p, t, (size_t)(m < 0 ? 0 : m > 16 ? 16 : m) * 2);
}

/* ---- doubles ---- */
CN_INLINE nd nd_zero() { return _mm256_setzero_pd(); }
CN_INLINE nd nd_add(nd a, nd b) { return _mm256_add_pd(a, b); }
CN_INLINE nd nd_mul(nd a, nd b) { return _mm256_mul_pd(a, b); }
CN_INLINE nd nd_load(const double* p) { return _mm256_loadu_pd(p); }
CN_INLINE void nd_store(double* p, nd v) { _mm256_storeu_pd(p, v); }
CN_INLINE void nf_widen(nf v, nd& lo, nd& hi) {
    lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
}
CN_INLINE double nd_hsum(nd v) {
    __m128d q = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(q, _mm_unpackhi_pd(q, q)));
}

CN_INLINE void cn_copy_line_nt(char* dst, const char* src) {
    _mm256_stream_si256((__m256i*)dst, _mm256_loadu_si256((const __m256i*)src));
    _mm256_stream_si256((__m256i*)(dst + 32), _mm256_loadu_si256((const __m256i*)(src + 32)));
}

}  // namespace
#endif
