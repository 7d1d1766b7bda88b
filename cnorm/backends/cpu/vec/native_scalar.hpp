/* The portable native "register": 4 floats in plain C++, for CPUs without a
   vector level of their own (and the definition of what every level
   computes). The compiler vectorizes what it can; nothing here needs more
   than the C++ standard. a*b + c rounds twice (the file is compiled with
   -ffp-contract=off), as cn_fma1. */
#ifndef CN_NATIVE_SCALAR_HPP
#define CN_NATIVE_SCALAR_HPP

#define CN_VEC_LEVEL "baseline"
#define CN_VEC_FMA 0

namespace {

constexpr int CN_W = 4;
struct nf { float v[4]; };
struct nd { double v[2]; };

inline void cn_native_init() {}

CN_INLINE float cn_fma1(float a, float b, float c) { return a * b + c; }

#define CN_NF_MAP(expr) nf r; for (int j = 0; j < 4; j++) r.v[j] = (expr); return r
CN_INLINE nf nf_zero() { CN_NF_MAP(0.0f); }
CN_INLINE nf nf_set1(float a) { CN_NF_MAP(a); }
CN_INLINE nf nf_add(nf a, nf b) { CN_NF_MAP(a.v[j] + b.v[j]); }
CN_INLINE nf nf_sub(nf a, nf b) { CN_NF_MAP(a.v[j] - b.v[j]); }
CN_INLINE nf nf_mul(nf a, nf b) { CN_NF_MAP(a.v[j] * b.v[j]); }
CN_INLINE nf nf_fma(nf a, nf b, nf c) { CN_NF_MAP(a.v[j] * b.v[j] + c.v[j]); }
/* the operations of native_avx512.hpp for activations (x86's max/min rule: b
   where either is NaN) */
CN_INLINE nf nf_max(nf a, nf b) { CN_NF_MAP(a.v[j] > b.v[j] ? a.v[j] : b.v[j]); }
CN_INLINE nf nf_min(nf a, nf b) { CN_NF_MAP(a.v[j] < b.v[j] ? a.v[j] : b.v[j]); }
CN_INLINE nf nf_div(nf a, nf b) { CN_NF_MAP(a.v[j] / b.v[j]); }
CN_INLINE nf nf_sel_gt(nf a, nf b, nf t, nf f) { CN_NF_MAP(a.v[j] > b.v[j] ? t.v[j] : f.v[j]); }
CN_INLINE nf nf_mul_neg(nf a, nf b) { CN_NF_MAP((cn_f2u(a.v[j]) >> 31) ? a.v[j] * b.v[j] : a.v[j]); }
CN_INLINE nf nf_nabs(nf a) { CN_NF_MAP(cn_u2f(cn_f2u(a.v[j]) | 0x80000000u)); }
CN_INLINE nf nf_exp2i32(nf t) { CN_NF_MAP(cn_u2f((cn_f2u(t.v[j]) << 23) + (159u << 23))); }
CN_INLINE nf nf_keep(nf a, ptrdiff_t m) { CN_NF_MAP(j < m ? a.v[j] : 0.0f); }
template <class T>
CN_INLINE nf nf_load(const T* p) { CN_NF_MAP(cn_ldf(p + j)); }
template <class T>
CN_INLINE nf nf_load_n(const T* p, ptrdiff_t m) { CN_NF_MAP(j < m ? cn_ldf(p + j) : 0.0f); }
#undef CN_NF_MAP
CN_INLINE void nf_load_eo(const cn_bf16* p, nf& e, nf& o) {
    for (int j = 0; j < 4; j++) { e.v[j] = cn_ldf(p + 2 * j); o.v[j] = cn_ldf(p + 2 * j + 1); }
}
CN_INLINE void nf_load_eo_n(const cn_bf16* p, ptrdiff_t m, nf& e, nf& o) {
    for (int j = 0; j < 4; j++) {
        e.v[j] = 2 * j < m ? cn_ldf(p + 2 * j) : 0.0f;
        o.v[j] = 2 * j + 1 < m ? cn_ldf(p + 2 * j + 1) : 0.0f;
    }
}
template <class T>
CN_INLINE void nf_store(T* p, nf v, bool) { for (int j = 0; j < 4; j++) cn_stf(p + j, v.v[j]); }
template <class T>
CN_INLINE void nf_store2(T* p, nf a, nf b, bool nt) { nf_store(p, a, nt); nf_store(p + 4, b, nt); }
template <class T>
CN_INLINE void nf_store_n(T* p, nf v, ptrdiff_t m) { for (int j = 0; j < 4 && j < m; j++) cn_stf(p + j, v.v[j]); }
CN_INLINE void nf_store_eo(cn_bf16* p, nf e, nf o, bool) {
    for (int j = 0; j < 4; j++) { cn_stf(p + 2 * j, e.v[j]); cn_stf(p + 2 * j + 1, o.v[j]); }
}
CN_INLINE void nf_store_eo_n(cn_bf16* p, nf e, nf o, ptrdiff_t m) {
    for (int j = 0; j < 4; j++) {
        if (2 * j < m) cn_stf(p + 2 * j, e.v[j]);
        if (2 * j + 1 < m) cn_stf(p + 2 * j + 1, o.v[j]);
    }
}

CN_INLINE nd nd_zero() { nd r = {{0.0, 0.0}}; return r; }
CN_INLINE nd nd_add(nd a, nd b) { nd r = {{a.v[0] + b.v[0], a.v[1] + b.v[1]}}; return r; }
CN_INLINE nd nd_mul(nd a, nd b) { nd r = {{a.v[0] * b.v[0], a.v[1] * b.v[1]}}; return r; }
CN_INLINE nd nd_load(const double* p) { nd r = {{p[0], p[1]}}; return r; }
CN_INLINE void nd_store(double* p, nd v) { p[0] = v.v[0]; p[1] = v.v[1]; }
CN_INLINE void nf_widen(nf v, nd& lo, nd& hi) {
    lo.v[0] = v.v[0]; lo.v[1] = v.v[1]; hi.v[0] = v.v[2]; hi.v[1] = v.v[3];
}
CN_INLINE double nd_hsum(nd v) { return v.v[0] + v.v[1]; }

CN_INLINE void cn_copy_line_nt(char* dst, const char* src) { memcpy(dst, src, 64); }

}  // namespace
#endif
