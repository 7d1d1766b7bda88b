/* cnorm's vector layer: one 16-lane float vector type (VF) and a 16-lane
   double type (VD) that every kernel is written against, built from one
   level's native register (native_*.hpp: AVX-512 holds a VF in one register,
   AVX2 in two, SSE, NEON and the portable level in four).

   Lanes are logical: lane j of a VF loaded from p holds p[j] whatever the
   level, sums fold and reduce lanes in one fixed order (vhsum), and the
   tails (first m values) are loaded and stored without touching memory past
   them. So a kernel computes the same values at every level that has FMA
   (avx2, avx512, neon); the baseline level rounds a*b + c twice.

   The level is chosen by the CN_LEVEL_* macro setup.py defines for each
   compiled copy of the kernels, else by the compiler's own flags. */
#ifndef CN_VEC_HPP
#define CN_VEC_HPP
#include "../half.hpp"

#if defined(CN_LEVEL_AVX512)
#include "native_avx512.hpp"
#elif defined(CN_LEVEL_AVX2)
#include "native_avx2.hpp"
#elif defined(CN_LEVEL_NEON)
#include "native_neon.hpp"
#elif defined(CN_LEVEL_BASELINE) && (defined(__x86_64__) || defined(_M_X64))
#include "native_sse.hpp"
#elif defined(CN_LEVEL_BASELINE) || defined(CN_LEVEL_SCALAR)
#include "native_scalar.hpp"
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#include "native_avx512.hpp"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "native_avx2.hpp"
#elif defined(__SSE4_2__)
#include "native_sse.hpp"
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include "native_neon.hpp"
#else
#include "native_scalar.hpp"
#endif
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#include <xmmintrin.h>
#endif

namespace {

constexpr int CN_K = 16 / CN_W;   /* native registers per VF */

struct VF { nf v[CN_K]; };
struct VD { nd v[2 * CN_K]; };   /* 16 doubles: VF lane j widens to VD lane j */

/* ---- arithmetic ---- */
CN_INLINE VF vzero() { VF r; for (int i = 0; i < CN_K; i++) r.v[i] = nf_zero(); return r; }
CN_INLINE VF vset(float a) { VF r; for (int i = 0; i < CN_K; i++) r.v[i] = nf_set1(a); return r; }
CN_INLINE VF operator+(VF a, VF b) { for (int i = 0; i < CN_K; i++) a.v[i] = nf_add(a.v[i], b.v[i]); return a; }
CN_INLINE VF operator-(VF a, VF b) { for (int i = 0; i < CN_K; i++) a.v[i] = nf_sub(a.v[i], b.v[i]); return a; }
CN_INLINE VF operator*(VF a, VF b) { for (int i = 0; i < CN_K; i++) a.v[i] = nf_mul(a.v[i], b.v[i]); return a; }
/* a*b + c: one rounding where the level has FMA (cn_fma1 is its scalar twin) */
CN_INLINE VF vfma(VF a, VF b, VF c) {
    for (int i = 0; i < CN_K; i++) a.v[i] = nf_fma(a.v[i], b.v[i], c.v[i]);
    return a;
}
/* lanes [m, 16) zeroed */
CN_INLINE VF vkeep(VF a, ptrdiff_t m) {
    for (int i = 0; i < CN_K; i++) a.v[i] = nf_keep(a.v[i], m - CN_W * i);
    return a;
}

CN_INLINE VF operator/(VF a, VF b) { for (int i = 0; i < CN_K; i++) a.v[i] = nf_div(a.v[i], b.v[i]); return a; }
/* a > b ? a : b (vmax) and a < b ? a : b (vmin): b where either is NaN */
CN_INLINE VF vmax(VF a, VF b) { for (int i = 0; i < CN_K; i++) a.v[i] = nf_max(a.v[i], b.v[i]); return a; }
CN_INLINE VF vmin(VF a, VF b) { for (int i = 0; i < CN_K; i++) a.v[i] = nf_min(a.v[i], b.v[i]); return a; }
/* a > b ? t : f (f where a or b is NaN) */
CN_INLINE VF vsel_gt(VF a, VF b, VF t, VF f) {
    for (int i = 0; i < CN_K; i++) t.v[i] = nf_sel_gt(a.v[i], b.v[i], t.v[i], f.v[i]);
    return t;
}

/* -|a| */
CN_INLINE VF vnabs(VF a) { for (int i = 0; i < CN_K; i++) a.v[i] = nf_nabs(a.v[i]); return a; }
/* -min(|a|, c) (c > 0), that is max(-c, -|a|); NaN stays NaN */
CN_INLINE VF vnabs_min(VF a, float c) {
#ifdef CN_VEC_RANGE
    for (int i = 0; i < CN_K; i++) a.v[i] = nf_nabs_min(a.v[i], nf_set1(c));
    return a;
#else
    return vmax(vset(-c), vnabs(a));
#endif
}
/* a·b where a's sign bit is set (negative, -0, negative NaN), else a */
CN_INLINE VF vmul_neg(VF a, VF b) { for (int i = 0; i < CN_K; i++) a.v[i] = nf_mul_neg(a.v[i], b.v[i]); return a; }

/* e^x for x = -|z| (what the activations need: e^-|z|), written once for the
   vector type (as PyTorch's Vectorized<float>::exp) after Cephes' expf: x =
   k·ln2 + r, k = round(x·log2 e) by the 1.5·2^23 trick, ln2 in two parts
   (k·0.693359375 is exact), |r| <= ln2/2; e^r = 1 + r·Q(r) with Q of degree 5
   by Horner (six FMAs in all; Q a near-minimax fit of (e^r - 1)/r on the
   interval, by Lawson's iterations: 0.62 ulp on it with FMA, Cephes' P was
   0.59 in two more operations), evaluated scaled by 2^-32 (every coefficient:
   exact, nothing underflows), then times 2^(k + 32) built from k's integer
   bits (nf_exp2i32: a normal number for every k in [-150, 0]), whose one
   rounding gives results below FLT_MIN as the correctly rounded subnormal or
   0. x is clamped to -104 first (e^x rounds to 0 below), so -inf gives 0;
   NaN passes the clamp (vmax keeps its second operand) and the polynomial.
   At avx512 -|z| and the clamp are one vrangeps (CN_VEC_RANGE): the same
   values, 5% less time in a cache-resident SiLU sweep.
   Where the level has vscalef (avx512: CN_VEC_SCALEF), the polynomial runs
   unscaled and p·2^k is that one instruction: the scaling by 2^-32 is exact
   (no coefficient or partial result is subnormal), so round(p·2^k) is the
   same number as round(2^-32·p · 2^(k + 32)), and 2 of the about 21
   operations per vector of a SiLU sweep go (5% in a cache-resident sweep).
   No table, no libm call: the same values at every level, so avx2 and
   avx512 and neon give the same bits (baseline rounds a*b + c twice, as everywhere). */
CN_INLINE VF vexp_nabs(VF z) {
    const VF big = vset(12582912.0f);   /* 1.5·2^23 */
#ifdef CN_VEC_SCALEF
    const float sc = 1.0f;   /* the polynomial's scale */
#else
    const float sc = 2.3283064365386963e-10f;   /* 2^-32 */
#endif
    const VF x = vnabs_min(z, 104.0f);   /* -|z|, at least -104 */
    VF t = vfma(x, vset(1.44269504088896341f), big);   /* 1.5·2^23 + k */
    VF k = t - big;
    VF r = vfma(k, vset(-0.693359375f), x);
    r = vfma(k, vset(2.12194440e-4f), r);
    VF q = vset(0.0013843653723597527f * sc);
    q = vfma(q, r, vset(0.00837415549904108f * sc));
    q = vfma(q, r, vset(0.04166800156235695f * sc));
    q = vfma(q, r, vset(0.16666431725025177f * sc));
    q = vfma(q, r, vset(0.4999999403953552f * sc));
    q = vfma(q, r, vset(sc));
    VF p = vfma(q, r, vset(sc));   /* 2^-32·e^r (e^r with CN_VEC_SCALEF) */
#ifdef CN_VEC_SCALEF
    for (int i = 0; i < CN_K; i++) p.v[i] = nf_scalef(p.v[i], k.v[i]);
    return p;
#else
    VF s;
    for (int i = 0; i < CN_K; i++) s.v[i] = nf_exp2i32(t.v[i]);
    return p * s;
#endif
}

CN_INLINE ptrdiff_t cn_clamp(ptrdiff_t m, ptrdiff_t hi) { return m < 0 ? 0 : m > hi ? hi : m; }

/* ---- loads and stores of 16 values (T: float, cn_bf16, cn_f16) ---- */
template <class T>
CN_INLINE VF vload(const T* p) { VF r; for (int i = 0; i < CN_K; i++) r.v[i] = nf_load(p + CN_W * i); return r; }
/* vload_n: the first m values (clamped to [0, 16]); the other lanes are 0,
   memory past p + m untouched. The _n forms take any m: whole vectors too. */
template <class T>
CN_INLINE VF vload_n(const T* p, ptrdiff_t m) {
    if (m >= 16) return vload(p);
    VF r;
    for (int i = 0; i < CN_K; i++) {
        ptrdiff_t mi = m - CN_W * i;
        r.v[i] = mi >= CN_W ? nf_load(p + CN_W * i) : mi <= 0 ? nf_zero() : nf_load_n(p + CN_W * i, mi);
    }
    return r;
}
/* nt: streaming stores, p then 64-byte aligned (a line written by streaming
   and ordinary stores together costs more than either) */
CN_INLINE void vstore(float* p, VF v, bool nt) { for (int i = 0; i < CN_K; i++) nf_store(p + CN_W * i, v.v[i], nt); }
template <class H>
CN_INLINE void vstore(H* p, VF v, bool nt) {   /* 16-bit data: natives by pairs, a register each */
    if (CN_K == 1) { nf_store(p, v.v[0], nt); return; }
    for (int i = 0; i + 1 < CN_K; i += 2) nf_store2(p + CN_W * i, v.v[i], v.v[i + 1], nt);
}
/* the first m values (ordinary stores) */
template <class T>
CN_INLINE void vstore_n(T* p, VF v, ptrdiff_t m) {
    if (m >= 16) { vstore(p, v, false); return; }
    for (int i = 0; i < CN_K; i++) {
        ptrdiff_t mi = m - CN_W * i;
        if (mi >= CN_W) nf_store(p + CN_W * i, v.v[i], false);
        else if (mi > 0) nf_store_n(p + CN_W * i, v.v[i], mi);
    }
}
/* 32 consecutive values: a's, then b's */
CN_INLINE void vstore_pair(float* p, VF a, VF b, bool nt) { vstore(p, a, nt); vstore(p + 16, b, nt); }
template <class H>
CN_INLINE void vstore_pair(H* p, VF a, VF b, bool nt) {
    if (CN_K == 1) { nf_store2(p, a.v[0], b.v[0], nt); return; }   /* one conversion of both (AVX512-BF16) */
    vstore(p, a, nt);
    vstore(p + 16, b, nt);
}
template <class T>
CN_INLINE void vstore_pair_n(T* p, VF a, VF b, ptrdiff_t m, bool nt) {
    if (m >= 32) { vstore_pair(p, a, b, nt); return; }
    vstore_n(p, a, m);
    vstore_n(p + 16, b, m - 16);
}

/* 32 values as two vectors, for loops where a value's lane only has to
   depend on its position: positions 0-15 and 16-31, but bfloat16 as even and
   odd positions (nf_load_eo: no widening shuffle). vstore2 is the inverse. */
template <class T>
CN_INLINE void vload2(const T* p, VF& a, VF& b) { a = vload(p); b = vload(p + 16); }
CN_INLINE void vload2(const cn_bf16* p, VF& a, VF& b) {
    for (int i = 0; i < CN_K; i++) nf_load_eo(p + 2 * CN_W * i, a.v[i], b.v[i]);
}
/* the first m of 32 values (clamped); lanes of absent values are 0: a keeps
   vcount2_a(m) lanes, b vcount2_b(m) */
template <class T>
CN_INLINE void vload2_n(const T* p, ptrdiff_t m, VF& a, VF& b) {
    if (m >= 32) { vload2(p, a, b); return; }
    a = vload_n(p, m);
    b = vload_n(p + 16, m - 16);
}
CN_INLINE void vload2_n(const cn_bf16* p, ptrdiff_t m, VF& a, VF& b) {
    if (m >= 32) { vload2(p, a, b); return; }
    for (int i = 0; i < CN_K; i++) nf_load_eo_n(p + 2 * CN_W * i, cn_clamp(m - 2 * CN_W * i, 2 * CN_W), a.v[i], b.v[i]);
}
template <class T> CN_INLINE ptrdiff_t vcount2_a(const T*, ptrdiff_t m) { return cn_clamp(m, 16); }
template <class T> CN_INLINE ptrdiff_t vcount2_b(const T*, ptrdiff_t m) { return cn_clamp(m - 16, 16); }
CN_INLINE ptrdiff_t vcount2_a(const cn_bf16*, ptrdiff_t m) { return cn_clamp((m + 1) / 2, 16); }
CN_INLINE ptrdiff_t vcount2_b(const cn_bf16*, ptrdiff_t m) { return cn_clamp(m / 2, 16); }
template <class T>
CN_INLINE void vstore2(T* p, VF a, VF b, bool nt) { vstore_pair(p, a, b, nt); }
CN_INLINE void vstore2(cn_bf16* p, VF a, VF b, bool nt) {
    for (int i = 0; i < CN_K; i++) nf_store_eo(p + 2 * CN_W * i, a.v[i], b.v[i], nt);
}
template <class T>
CN_INLINE void vstore2_n(T* p, VF a, VF b, ptrdiff_t m, bool nt) {
    if (m >= 32) { vstore2(p, a, b, nt); return; }
    vstore_pair_n(p, a, b, m, false);
}
CN_INLINE void vstore2_n(cn_bf16* p, VF a, VF b, ptrdiff_t m, bool nt) {
    if (m >= 32) { vstore2(p, a, b, nt); return; }
    for (int i = 0; i < CN_K; i++) {
        ptrdiff_t mi = m - 2 * CN_W * i;
        if (mi > 0) nf_store_eo_n(p + 2 * CN_W * i, a.v[i], b.v[i], cn_clamp(mi, 2 * CN_W));
    }
}

/* relu's gradient for 32 values: g = z > 0 ? dy : +0 (NaN z gives 0), z0 and
   z1 as vload2_n splits positions. g is dy's value or 0, so no rounding is
   needed: for bfloat16, levels with CN_VEC_EO_MASK (avx2, avx512) copy dy's
   bits under a 16-bit mask built from z's comparisons, with no conversion
   of dy to float and back (two operations per native pair where the
   rounding store alone takes five to eleven); elsewhere the float select
   and the rounding store, which leaves such values as they are (a
   signalling NaN in dy is the one value whose bits differ: quieted there,
   copied here - g is NaN either way). */
template <class T>
CN_INLINE void vrelu_grad2_n(T* g, const T* dy, VF z0, VF z1, ptrdiff_t m, bool nt) {
    VF d0, d1;
    vload2_n(dy, m, d0, d1);
    vstore2_n(g, vsel_gt(z0, vzero(), d0, vzero()), vsel_gt(z1, vzero(), d1, vzero()), m, nt);
}
#ifdef CN_VEC_EO_MASK
CN_INLINE void vrelu_grad2_n(cn_bf16* g, const cn_bf16* dy, VF z0, VF z1, ptrdiff_t m, bool nt) {
    if (m >= 32) {
        for (int i = 0; i < CN_K; i++) nf_copy_eo_gt0(g + 2 * CN_W * i, dy + 2 * CN_W * i, z0.v[i], z1.v[i], nt);
        return;
    }
    for (int i = 0; i < CN_K; i++) {
        ptrdiff_t mi = m - 2 * CN_W * i;
        if (mi > 0) nf_copy_eo_gt0_n(g + 2 * CN_W * i, dy + 2 * CN_W * i, z0.v[i], z1.v[i], cn_clamp(mi, 2 * CN_W));
    }
}
#endif

/* ---- double lanes ---- */
CN_INLINE VD vdzero() { VD r; for (int i = 0; i < 2 * CN_K; i++) r.v[i] = nd_zero(); return r; }
CN_INLINE VD operator+(VD a, VD b) { for (int i = 0; i < 2 * CN_K; i++) a.v[i] = nd_add(a.v[i], b.v[i]); return a; }
CN_INLINE VD vdload(const double* p) {
    VD r;
    for (int i = 0; i < 2 * CN_K; i++) r.v[i] = nd_load(p + CN_W / 2 * i);
    return r;
}
CN_INLINE void vdstore(double* p, VD v) { for (int i = 0; i < 2 * CN_K; i++) nd_store(p + CN_W / 2 * i, v.v[i]); }
/* lane j: (double)a[j] */
CN_INLINE VD vwiden(VF a) {
    VD r;
    for (int i = 0; i < CN_K; i++) nf_widen(a.v[i], r.v[2 * i], r.v[2 * i + 1]);
    return r;
}
/* lane j: (double)a[j] + (double)b[j] - two float vectors folded into double */
CN_INLINE VD vfold(VF a, VF b) { return vwiden(a) + vwiden(b); }
/* the 16 lanes summed in one fixed order at every level: lane j + lane j + 8,
   then j + 4, j + 2, j + 1 */
CN_INLINE double vhsum(VD d) {
    for (int n = CN_K; n >= 1; n /= 2)
        for (int i = 0; i < n; i++) d.v[i] = nd_add(d.v[i], d.v[i + n]);
    return nd_hsum(d.v[0]);
}
/* every lane finite (0*x is NaN for Inf and NaN) */
CN_INLINE bool vfinite(VD d) {
    nd z = nd_zero(), s = nd_zero();
    for (int i = 0; i < 2 * CN_K; i++) s = nd_add(s, nd_mul(d.v[i], z));
    return nd_hsum(s) == 0.0;
}
/* Σ_j (double)a[j] + (double)b[j] (32 float lanes), and Σ_j (double)a[j] */
CN_INLINE double vtotal(VF a, VF b) { return vhsum(vfold(a, b)); }
CN_INLINE double vtotal(VF a) { return vhsum(vwiden(a)); }

/* ---- memory hints ---- */
/* bring a line, or [p, p + bytes), toward this core's L2 (prefetcht1) ahead
   of its use: for data needed after the current working set, which an L1
   prefetch would evict. Hints: no value depends on them. */
CN_INLINE void cn_prefetch_line_l1(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(p, 0, 3);
#elif defined(_M_X64) || defined(_M_IX86)
    _mm_prefetch((const char*)p, _MM_HINT_T0);   /* MSVC: the same hint */
#else
    (void)p;
#endif
}
CN_INLINE void cn_prefetch_line_l2(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(p, 0, 2);
#elif defined(_M_X64) || defined(_M_IX86)
    _mm_prefetch((const char*)p, _MM_HINT_T1);   /* MSVC: the same hint */
#else
    (void)p;
#endif
}
inline void cn_prefetch_l2(const void* p, ptrdiff_t bytes) {
    for (ptrdiff_t i = 0; i < bytes; i += 64) cn_prefetch_line_l2((const char*)p + i);
}
/* order this thread's streaming stores before others read the output */
inline void cn_sfence() {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
    _mm_sfence();
#endif
}

}  // namespace
#endif
