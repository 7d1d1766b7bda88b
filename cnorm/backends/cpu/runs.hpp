/* Lane-wise reductions over one contiguous run: the channels-first statistics
   and gradient sweeps (BatchNorm channels, GroupNorm/InstanceNorm groups) and
   the per-element-affine (LayerNorm) fallbacks in double.

   Two kinds:
   - double lanes (cn_sum_run, cn_sq_run, cn_grad_run; any storage type):
     lane j accumulates the elements i with i % 16 == j, in order. The loop
     over the 16 lanes stays a loop (GCC unroll 1) so the compiler turns it
     into vector conversions and adds; float64 data use only these.
   - float lanes (cn_hsum_run, cn_hsq_run, cn_hgrad_run; float32 and half
     data): the same sums in 32 float lanes over chunks of CN_CHUNK elements,
     each chunk then folded into the 16 double lanes (lane j + 16 onto j).
     Double lanes cost four times the vector operations; a chunk bounds the
     float rounding. A run whose float partials are not finite (bfloat16
     |x| ~ 1e30 squared overflows float) is redone in double: overflow never
     reaches the statistics and NaN/Inf inputs still propagate.
   Positions alone decide lanes and chunks: bit-identical for any thread
   count, alignment or level with FMA. */
#ifndef CN_RUNS_HPP
#define CN_RUNS_HPP
#include "vec/vec.hpp"

#if defined(__GNUC__) && !defined(__clang__)
#define CN_KEEP_LOOP _Pragma("GCC unroll 1")
#else
#define CN_KEEP_LOOP
#endif

namespace {

constexpr int CN_LANES = 16;
constexpr ptrdiff_t CN_CHUNK = 512;

/* acc[i % 16] += f(x[i]) over the run */
template <class T, class F>
CN_INLINE void cn_lane_run(const T* x, ptrdiff_t n, double* acc, F f) {
    double a[CN_LANES];
    ptrdiff_t i, nv = n - n % CN_LANES;
    int j;
    for (j = 0; j < CN_LANES; j++) a[j] = acc[j];
    for (i = 0; i < nv; i += CN_LANES) {
        CN_KEEP_LOOP
        for (j = 0; j < CN_LANES; j++) a[j] += f(cn_ldd(x + i + j));
    }
    for (j = 0; j < n - nv; j++) a[j] += f(cn_ldd(x + nv + j));
    for (j = 0; j < CN_LANES; j++) acc[j] = a[j];
}

/* acc[i % 16] += x[i] - piv */
template <class T>
inline void cn_sum_run(const T* x, ptrdiff_t n, double piv, double* acc) {
    cn_lane_run(x, n, acc, [piv](double v) CN_LAMBDA { return v - piv; });
}

/* acc[i % 16] += (x[i] - m)^2 */
template <class T>
inline void cn_sq_run(const T* x, ptrdiff_t n, double m, double* acc) {
    cn_lane_run(x, n, acc, [m](double v) CN_LAMBDA { double d = v - m; return d * d; });
}

/* ag += w(i) g, agx += w(i) g (x - m), ax += x - m, lane-wise */
template <class T, class W>
CN_INLINE void cn_lane_grad_run(const T* g, const T* x, ptrdiff_t n, double m, W w, double* ag, double* agx,
                                double* ax) {
    double a[CN_LANES], b[CN_LANES], c[CN_LANES];
    ptrdiff_t i, nv = n - n % CN_LANES;
    int j;
    for (j = 0; j < CN_LANES; j++) { a[j] = ag[j]; b[j] = agx[j]; c[j] = ax[j]; }
    for (i = 0; i < nv; i += CN_LANES) {
        CN_KEEP_LOOP
        for (j = 0; j < CN_LANES; j++) {
            double wg = w(i + j) * cn_ldd(g + i + j), d = cn_ldd(x + i + j) - m;
            a[j] += wg; b[j] += wg * d; c[j] += d;
        }
    }
    for (j = 0; j < n - nv; j++) {
        double wg = w(nv + j) * cn_ldd(g + nv + j), d = cn_ldd(x + nv + j) - m;
        a[j] += wg; b[j] += wg * d; c[j] += d;
    }
    for (j = 0; j < CN_LANES; j++) { ag[j] = a[j]; agx[j] = b[j]; ax[j] = c[j]; }
}

/* ag += g, agx += g (x - m), ax += x - m, lane-wise */
template <class T>
inline void cn_grad_run(const T* g, const T* x, ptrdiff_t n, double m, double* ag, double* agx, double* ax) {
    cn_lane_grad_run(g, x, n, m, [](ptrdiff_t) CN_LAMBDA { return 1.0; }, ag, agx, ax);
}

/* acc[0..16) += d */
CN_INLINE void cn_acc16(double* acc, VD d) { vdstore(acc, vdload(acc) + d); }

/* cn_sum_run in float lanes (half data) */
template <class T>
inline void cn_hsum_run(const T* x, ptrdiff_t n, double piv, double* acc) {
    const float pf = (float)piv;
    const VF vp = vset(pf);
    VD d = vdzero();
    for (ptrdiff_t i0 = 0; i0 < n; i0 += CN_CHUNK) {
        const T* xc = x + i0;
        ptrdiff_t m = n - i0 < CN_CHUNK ? n - i0 : CN_CHUNK, i;
        VF a0 = vzero(), a1 = vzero();
        CN_UNROLL(16)
        for (i = 0; i + 32 <= m; i += 32) {
            a0 = a0 + (vload(xc + i) - vp);
            a1 = a1 + (vload(xc + i + 16) - vp);
        }
        if (i < m) {  /* tail: absent lanes add zeros */
            a0 = a0 + vkeep(vload_n(xc + i, m - i) - vp, m - i);
            a1 = a1 + vkeep(vload_n(xc + i + 16, m - i - 16) - vp, m - i - 16);
        }
        d = d + vfold(a0, a1);
    }
    if (!vfinite(d)) { cn_sum_run(x, n, piv, acc); return; }
    cn_acc16(acc, d);
    acc[0] += (double)n * ((double)pf - piv);  /* exact for any piv */
}

/* cn_sq_run in float lanes around the float-rounded centre, corrected
   exactly for its rounding: S(x-m)^2 = S(x-mf)^2 - 2 dm S(x-mf) + n dm^2 */
template <class T>
inline void cn_hsq_run(const T* x, ptrdiff_t n, double m, double* acc) {
    const float mf = (float)m;
    const double dm = m - (double)mf;
    const VF vm = vset(mf);
    VD d = vdzero(), e = vdzero();
    for (ptrdiff_t i0 = 0; i0 < n; i0 += CN_CHUNK) {
        const T* xc = x + i0;
        ptrdiff_t k = n - i0 < CN_CHUNK ? n - i0 : CN_CHUNK, i;
        VF a0 = vzero(), a1 = vzero(), b0 = vzero(), b1 = vzero();
        CN_UNROLL(16)
        for (i = 0; i + 32 <= k; i += 32) {
            VF u0 = vload(xc + i) - vm, u1 = vload(xc + i + 16) - vm;
            a0 = vfma(u0, u0, a0); a1 = vfma(u1, u1, a1);
            b0 = b0 + u0; b1 = b1 + u1;
        }
        if (i < k) {
            VF u0 = vkeep(vload_n(xc + i, k - i) - vm, k - i);
            VF u1 = vkeep(vload_n(xc + i + 16, k - i - 16) - vm, k - i - 16);
            a0 = vfma(u0, u0, a0); a1 = vfma(u1, u1, a1);
            b0 = b0 + u0; b1 = b1 + u1;
        }
        d = d + vfold(a0, a1);
        e = e + vfold(b0, b1);
    }
    double sb = vhsum(e);
    if (!vfinite(d) || sb - sb != 0.0) { cn_sq_run(x, n, m, acc); return; }
    cn_acc16(acc, d);
    acc[0] += dm * ((double)n * dm - 2.0 * sb);  /* exact for the centre's rounding */
}

/* cn_grad_run in float lanes (float32 and half data); the centre must be a
   float value (else the double version) */
template <class T>
inline void cn_hgrad_run(const T* g, const T* x, ptrdiff_t n, double m, double* ag, double* agx, double* ax) {
    const float mf = (float)m;
    if ((double)mf != m) { cn_grad_run(g, x, n, m, ag, agx, ax); return; }
    const VF vm = vset(mf);
    VD p = vdzero(), q = vdzero(), r = vdzero();
    for (ptrdiff_t i0 = 0; i0 < n; i0 += CN_CHUNK) {
        const T* gc = g + i0;
        const T* xc = x + i0;
        ptrdiff_t k = n - i0 < CN_CHUNK ? n - i0 : CN_CHUNK, i;
        VF a0 = vzero(), a1 = vzero(), b0 = vzero(), b1 = vzero(), c0 = vzero(), c1 = vzero();
        CN_UNROLL(16)
        for (i = 0; i + 32 <= k; i += 32) {
            VF g0, g1, u0, u1;
            vload2(gc + i, g0, g1);
            vload2(xc + i, u0, u1);
            u0 = u0 - vm; u1 = u1 - vm;
            a0 = a0 + g0; a1 = a1 + g1;
            b0 = vfma(g0, u0, b0); b1 = vfma(g1, u1, b1);
            c0 = c0 + u0; c1 = c1 + u1;
        }
        if (i < k) {
            VF g0, g1, u0, u1;
            vload2_n(gc + i, k - i, g0, g1);
            vload2_n(xc + i, k - i, u0, u1);
            u0 = vkeep(u0 - vm, vcount2_a(xc, k - i));
            u1 = vkeep(u1 - vm, vcount2_b(xc, k - i));
            a0 = a0 + g0; a1 = a1 + g1;
            b0 = vfma(g0, u0, b0); b1 = vfma(g1, u1, b1);
            c0 = c0 + u0; c1 = c1 + u1;
        }
        p = p + vfold(a0, a1);
        q = q + vfold(b0, b1);
        r = r + vfold(c0, c1);
    }
    if (!(vfinite(p) && vfinite(q) && vfinite(r))) { cn_grad_run(g, x, n, m, ag, agx, ax); return; }
    cn_acc16(ag, p);
    cn_acc16(agx, q);
    cn_acc16(ax, r);
}

/* ---- per-element-affine rows (LayerNorm) in double ----
   Split so that every loop vectorizes: per-row lane sums (a reduction), then
   the dweight/dbias column sums of up to four rows per pass (elementwise, no
   reduction), which reads and writes the double partials pb/pw once per four
   rows instead of once per row. The float32/half LayerNorm backward
   (rows.hpp) redoes a row or a chunk here only when its float sums overflow;
   float64 data use these always. */

/* awg += w g, awgx += w g (x - m), ax += x - m, lane-wise */
template <class T, class P>
inline void cn_wsums(const T* g, const T* x, const P* w, ptrdiff_t n, double m, double* awg, double* awgx, double* ax) {
    cn_lane_grad_run(g, x, n, m, [w](ptrdiff_t i) CN_LAMBDA { return (double)w[i]; }, awg, awgx, ax);
}

/* pb[i] += Σ_k g_k[i], pw[i] += Σ_k g_k[i] (x_k[i] - m[k] - dl[k]) r[k] over
   rows k < rows <= 4 (row k at g + k stride, x + k stride) */
template <class T>
inline void cn_colsums(const T* g, const T* x, ptrdiff_t stride, int rows, ptrdiff_t n, const double* m,
                       const double* dl, const double* r, double* pb, double* pw) {
    ptrdiff_t i;
    if (rows == 4) {
        const T *g1 = g + stride, *g2 = g + 2 * stride, *g3 = g + 3 * stride;
        const T *x1 = x + stride, *x2 = x + 2 * stride, *x3 = x + 3 * stride;
        for (i = 0; i < n; i++) {
            double a0 = cn_ldd(g + i), a1 = cn_ldd(g1 + i), a2 = cn_ldd(g2 + i), a3 = cn_ldd(g3 + i);
            pb[i] += (a0 + a1) + (a2 + a3);
            pw[i] += (a0 * ((cn_ldd(x + i) - m[0]) - dl[0]) * r[0] + a1 * ((cn_ldd(x1 + i) - m[1]) - dl[1]) * r[1])
                   + (a2 * ((cn_ldd(x2 + i) - m[2]) - dl[2]) * r[2] + a3 * ((cn_ldd(x3 + i) - m[3]) - dl[3]) * r[3]);
        }
        return;
    }
    for (int k = 0; k < rows; k++) {
        const T* gk = g + k * stride;
        const T* xk = x + k * stride;
        for (i = 0; i < n; i++) {
            double a0 = cn_ldd(gk + i);
            pb[i] += a0;
            pw[i] += a0 * ((cn_ldd(xk + i) - m[k]) - dl[k]) * r[k];
        }
    }
}

}  // namespace
#endif
