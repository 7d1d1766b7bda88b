/* Channels-last column sums: the statistics (mean, M2 per column) and the
   gradient sums of a block of nr rows of C channels, float32 and half data
   in float, for BatchNorm channels-last (NHWC, BatchNorm1d) and the
   channels-last per-sample norms.

   Accuracy: float partials cover at most CN_FROWS rows before they are added
   into double; sums are centred (a pivot near the data, or the float-rounded
   mean with an exact correction for its rounding), so |mean| >> std costs
   nothing. A float sum that overflowed (|x| ~ 1e30) makes the function
   return 0: the caller redoes the block in double.

   Speed: rows of C a multiple of 16 are swept CN_RC rows at a time (an
   L1-sized slab); in a slab each tile of columns keeps its accumulators in
   registers and loads/stores the float column partials once. */
#ifndef CN_CL_STATS_HPP
#define CN_CL_STATS_HPP
#include "vec/vec.hpp"

namespace {

constexpr ptrdiff_t CN_FROWS = 64;
constexpr ptrdiff_t CN_RC = 8;
/* VFs per column tile: four native registers per accumulator array (64
   channels with AVX-512, 32 with AVX2, 16 with SSE); tiles change no value */
constexpr int CN_TILE = CN_K >= 4 ? 1 : 4 / CN_K;
/* One pass where it is as exact: sums of x - p and (x - p)^2 around a pivot p
   close to the mean give M2 = S2 - S1^2/n in double, whose rounding error is
   the float S2's times S2/M2 = 1 + (p - mean)^2/var; above CN_ONEPASS_MAX (p
   far from the mean: drifting data, outliers where p was taken) the two-pass
   sweep redoes it. The pivot is a pairwise float mean of 16 (rows) or 8
   (columns) values: exactly the value of a constant run, within about std/3
   of the mean of most data. */
constexpr double CN_ONEPASS_MAX = 16.0;

/* VFs of T per 64-byte line: one prefetch per line */
template <class T> constexpr int cn_vpl() { return 64 / (int)(16 * sizeof(T)); }
/* Rows per slab: CN_RC, but 4 (2) where rows are 2 KB (4 KB) or more apart -
   8 rows of dy and x a multiple of 4 KB apart fall into one 8-way L1 set
   (float32 BatchNorm1d, C = 1024: 0.97 cycles per value against 0.53 for C =
   64, then 0.73) */
template <class T>
CN_INLINE ptrdiff_t cn_slab(ptrdiff_t C) {
    ptrdiff_t b = C * (ptrdiff_t)sizeof(T);
    return b >= 4096 ? 2 : b >= 2048 ? 4 : CN_RC;
}

/* every value of a[0..n) finite */
inline bool cn_finite_f(const float* a, ptrdiff_t n) {
    uint32_t bad = 0, u;
    for (ptrdiff_t j = 0; j < n; j++) {
        memcpy(&u, a + j, 4);
        bad |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
    }
    return bad == 0;
}

/* q[c] (squares summed around the float mean mf[c]) re-centred exactly on the
   double mean m[c]: S(x-m)^2 = S(x-mf)^2 - 2 dm S(x-mf) + nr dm^2, dm = m - mf
   (se[c] = S(x-mf)); rounding below 0 clamps to 0 */
inline void cn_m2_recentre(ptrdiff_t C, ptrdiff_t nr, const double* m, const float* mf, const double* se,
                           double* q) {
    for (ptrdiff_t c = 0; c < C; c++) {
        double dm = m[c] - (double)mf[c];
        double v = q[c] + dm * ((double)nr * dm - 2.0 * se[c]);
        q[c] = v > 0.0 ? v : 0.0;
    }
}

/* Column statistics for any C (scalar code the compiler vectorizes over c):
   pass 1 sums deviations from the first row (a data value: exact), pass 2
   squared deviations from the float-rounded mean mf, corrected exactly for
   that rounding. Four rows per update of the column accumulators. m[C] = mean,
   q[C] = M2; ws: 3 C doubles of scratch. */
template <class T>
inline int cn_cl_stats_scalar(const T* CN_RESTRICT x, ptrdiff_t nr, ptrdiff_t C, double* CN_RESTRICT m,
                              double* CN_RESTRICT q, double* ws) {
    float* CN_RESTRICT a = (float*)ws;
    float* CN_RESTRICT b = a + C;
    float* CN_RESTRICT e = a + 2 * C;
    double* CN_RESTRICT se = ws + 2 * C;
    ptrdiff_t r, r1, c;
    for (c = 0; c < C; c++) m[c] = 0.0;
    for (r1 = 0; r1 < nr;) {
        ptrdiff_t rend = nr - r1 < CN_FROWS ? nr : r1 + CN_FROWS;
        for (c = 0; c < C; c++) a[c] = 0.0f;
        for (r = r1; r + 4 <= rend; r += 4) {
            const T* p = x + r * C;
            for (c = 0; c < C; c++) {
                float pv = cn_ldf(x + c);
                a[c] += ((cn_ldf(p + c) - pv) + (cn_ldf(p + c + C) - pv))
                      + ((cn_ldf(p + c + 2 * C) - pv) + (cn_ldf(p + c + 3 * C) - pv));
            }
        }
        for (; r < rend; r++) {
            const T* p = x + r * C;
            for (c = 0; c < C; c++) a[c] += cn_ldf(p + c) - cn_ldf(x + c);
        }
        for (c = 0; c < C; c++) m[c] += (double)a[c];
        r1 = rend;
    }
    for (c = 0; c < C; c++) {
        m[c] = (double)cn_ldf(x + c) + m[c] / (double)nr;
        a[c] = (float)m[c];
        q[c] = 0.0;
        se[c] = 0.0;
    }
    for (r1 = 0; r1 < nr;) {
        ptrdiff_t rend = nr - r1 < CN_FROWS ? nr : r1 + CN_FROWS;
        for (c = 0; c < C; c++) { b[c] = 0.0f; e[c] = 0.0f; }
        for (r = r1; r + 4 <= rend; r += 4) {
            const T* p = x + r * C;
            for (c = 0; c < C; c++) {
                float mf = a[c], d0 = cn_ldf(p + c) - mf, d1 = cn_ldf(p + c + C) - mf;
                float d2 = cn_ldf(p + c + 2 * C) - mf, d3 = cn_ldf(p + c + 3 * C) - mf;
                b[c] += (cn_fma1(d0, d0, d1 * d1)) + (cn_fma1(d2, d2, d3 * d3));
                e[c] += (d0 + d1) + (d2 + d3);
            }
        }
        for (; r < rend; r++) {
            const T* p = x + r * C;
            for (c = 0; c < C; c++) {
                float d0 = cn_ldf(p + c) - a[c];
                b[c] = cn_fma1(d0, d0, b[c]);
                e[c] += d0;
            }
        }
        if (!cn_finite_f(b, C) || !cn_finite_f(e, C)) return 0;
        for (c = 0; c < C; c++) { q[c] += (double)b[c]; se[c] += (double)e[c]; }
        r1 = rend;
    }
    cn_m2_recentre(C, nr, m, a, se, q);
    return 1;
}

/* ---- C a multiple of 16: slabs and register tiles ---- */

/* a[16 NV] += the deviations of a slab's nr rows from pv, two rows per add;
   prefetches the first half of the next nr rows (pf) into L2 */
template <class T, int NV>
CN_INLINE void cn_cls_slab_sum(const T* CN_RESTRICT x, ptrdiff_t nr, ptrdiff_t C, const float* CN_RESTRICT pv,
                               float* CN_RESTRICT a, const T* pf) {
    VF acc[NV], piv[NV];
    ptrdiff_t r;
    for (int v = 0; v < NV; v++) { acc[v] = vload(a + 16 * v); piv[v] = vload(pv + 16 * v); }
    for (r = 0; r + 2 <= nr; r += 2) {
        const T* p = x + r * C;
        for (int v = 0; v < NV; v += cn_vpl<T>()) cn_prefetch_line_l2(pf + (r / 2) * C + 16 * v);
        for (int v = 0; v < NV; v++)
            acc[v] = acc[v] + ((vload(p + 16 * v) - piv[v]) + (vload(p + C + 16 * v) - piv[v]));
    }
    for (; r < nr; r++)
        for (int v = 0; v < NV; v++) acc[v] = acc[v] + (vload(x + r * C + 16 * v) - piv[v]);
    for (int v = 0; v < NV; v++) vstore(a + 16 * v, acc[v], false);
}

/* a += S(x - pv), b += S(x - pv)^2 over a slab (rows alternate between two
   square accumulators); prefetches the same rows of the next nr rows */
template <class T, int NV>
CN_INLINE void cn_cls_slab_sums(const T* CN_RESTRICT x, ptrdiff_t nr, ptrdiff_t C, const float* CN_RESTRICT pv,
                                float* CN_RESTRICT a, float* CN_RESTRICT b, const T* pf) {
    VF p[NV], s[NV], q0[NV], q1[NV];
    ptrdiff_t r;
    for (int v = 0; v < NV; v++) {
        p[v] = vload(pv + 16 * v); s[v] = vload(a + 16 * v);
        q0[v] = vload(b + 16 * v); q1[v] = vzero();
    }
    for (r = 0; r + 2 <= nr; r += 2) {
        const T* xr = x + r * C;
        for (int v = 0; v < NV; v += cn_vpl<T>()) {
            cn_prefetch_line_l2(pf + r * C + 16 * v);
            cn_prefetch_line_l2(pf + (r + 1) * C + 16 * v);
        }
        for (int v = 0; v < NV; v++) {
            VF d0 = vload(xr + 16 * v) - p[v], d1 = vload(xr + C + 16 * v) - p[v];
            s[v] = s[v] + (d0 + d1);
            q0[v] = vfma(d0, d0, q0[v]);
            q1[v] = vfma(d1, d1, q1[v]);
        }
    }
    for (; r < nr; r++)
        for (int v = 0; v < NV; v++) {
            VF d0 = vload(x + r * C + 16 * v) - p[v];
            s[v] = s[v] + d0;
            q0[v] = vfma(d0, d0, q0[v]);
        }
    for (int v = 0; v < NV; v++) {
        vstore(a + 16 * v, s[v], false);
        vstore(b + 16 * v, q0[v] + q1[v], false);
    }
}

/* f(offset c0, tile width) over the columns of C (a multiple of 16): whole
   tiles, then single vectors */
template <class F>
CN_INLINE void cn_tiles(ptrdiff_t C, F f) {
    ptrdiff_t c0 = 0;
    for (; c0 + 16 * CN_TILE <= C; c0 += 16 * CN_TILE) f(c0, std::integral_constant<int, CN_TILE>());
    for (; c0 < C; c0 += 16) f(c0, std::integral_constant<int, 1>());
}

/* Per-column sums of x - ctr (into s1, unless NULL) and (x - ctr)^2 (into s2)
   over nr rows, set: float partials (fa, fb: C floats each) over CN_FROWS
   rows, slabs of `slab` rows, each prefetching its rows of the next nr rows.
   0 when a float partial is not finite. */
template <class T>
inline int cn_cls_sweep(const T* CN_RESTRICT x, ptrdiff_t nr, ptrdiff_t C, ptrdiff_t slab, const float* CN_RESTRICT ctr,
                        float* CN_RESTRICT fa, float* CN_RESTRICT fb, double* s1, double* CN_RESTRICT s2) {
    ptrdiff_t c, r1, rs;
    for (c = 0; c < C; c++) { if (s1) s1[c] = 0.0; s2[c] = 0.0; }
    for (r1 = 0; r1 < nr;) {
        ptrdiff_t rend = nr - r1 < CN_FROWS ? nr : r1 + CN_FROWS;
        for (c = 0; c < C; c++) { fa[c] = 0.0f; fb[c] = 0.0f; }
        for (rs = r1; rs < rend; rs += slab) {
            ptrdiff_t k = rend - rs < slab ? rend - rs : slab;
            const T* pf = x + (nr + rs) * C;
            cn_tiles(C, [&](ptrdiff_t c0, auto nv) CN_LAMBDA {
                cn_cls_slab_sums<T, decltype(nv)::value>(x + rs * C + c0, k, C, ctr + c0, fa + c0, fb + c0, pf + c0);
            });
        }
        if (!cn_finite_f(fa, C) || !cn_finite_f(fb, C)) return 0;
        for (c = 0; c < C; c++) { if (s1) s1[c] += (double)fa[c]; s2[c] += (double)fb[c]; }
        r1 = rend;
    }
    return 1;
}

/* The two-pass statistics (C a multiple of 16), the fallback of the one-pass
   sweep: pass 1 sums deviations from the first row, pass 2 the squares
   around the float mean. Both prefetch the next nr rows into L2 (pass 1 the
   first half, pass 2 all of them), so memory keeps streaming while this
   thread computes; prefetches past the data are harmless. The sum of
   deviations from mf that the exact correction needs is pass 1's, re-centred
   in double: S(x - mf) = S(x - p) + nr (p - mf). */
template <class T>
inline int cn_cl_stats_2p(const T* CN_RESTRICT x, ptrdiff_t nr, ptrdiff_t C, double* CN_RESTRICT m,
                          double* CN_RESTRICT q, double* ws) {
    float* CN_RESTRICT mf = (float*)ws;
    float* CN_RESTRICT a = mf + C;
    float* CN_RESTRICT e = a + C;
    double* CN_RESTRICT se = ws + 2 * C;
    ptrdiff_t c, r1, rs;
    for (c = 0; c < C; c++) { m[c] = 0.0; q[c] = 0.0; mf[c] = cn_ldf(x + c); }
    for (r1 = 0; r1 < nr;) {
        ptrdiff_t rend = nr - r1 < CN_FROWS ? nr : r1 + CN_FROWS;
        for (c = 0; c < C; c++) a[c] = 0.0f;
        for (rs = r1; rs < rend; rs += CN_RC) {
            ptrdiff_t k = rend - rs < CN_RC ? rend - rs : CN_RC;
            const T* pf = x + (nr + rs / 2) * C;
            cn_tiles(C, [&](ptrdiff_t c0, auto nv) CN_LAMBDA {
                cn_cls_slab_sum<T, decltype(nv)::value>(x + rs * C + c0, k, C, mf + c0, a + c0, pf + c0);
            });
        }
        for (c = 0; c < C; c++) m[c] += (double)a[c];
        r1 = rend;
    }
    if (!cn_finite_f(a, C)) return 0;
    for (c = 0; c < C; c++) {
        double p = (double)cn_ldf(x + c), s1 = m[c];
        m[c] = p + s1 / (double)nr;
        mf[c] = (float)m[c];
        se[c] = s1 + (double)nr * (p - (double)mf[c]);
    }
    if (!cn_cls_sweep(x, nr, C, cn_slab<T>(C), mf, e, a, (double*)NULL, q)) return 0;
    cn_m2_recentre(C, nr, m, mf, se, q);
    return 1;
}

/* The channels-last block statistics in one pass (compute-bound on half
   data, each pass widening every value again): the pivot is the pairwise mean
   of the block's first CN_RC rows; a column above CN_ONEPASS_MAX sends the
   whole block to the two-pass sweep. */
template <class T>
inline int cn_cl_stats_1p(const T* CN_RESTRICT x, ptrdiff_t nr, ptrdiff_t C, double* CN_RESTRICT m,
                          double* CN_RESTRICT q, double* ws) {
    float* CN_RESTRICT pv = (float*)ws;
    float* CN_RESTRICT a = pv + C;
    float* CN_RESTRICT b = a + C;
    ptrdiff_t c;
    bool ok = true;
    if (nr < CN_RC) return cn_cl_stats_2p(x, nr, C, m, q, ws);
    for (c = 0; c < C; c += 16) {
        const T* p = x + c;
        VF s01 = vload(p) + vload(p + C), s23 = vload(p + 2 * C) + vload(p + 3 * C);
        VF s45 = vload(p + 4 * C) + vload(p + 5 * C), s67 = vload(p + 6 * C) + vload(p + 7 * C);
        vstore(pv + c, ((s01 + s23) + (s45 + s67)) * vset(0.125f), false);
    }
    if (!cn_finite_f(pv, C)) return 0;
    if (!cn_cls_sweep(x, nr, C, cn_slab<T>(C), pv, a, b, m, q)) return 0;
    for (c = 0; c < C; c++) {
        double s1 = m[c], s2 = q[c], d = s1 / (double)nr, m2 = s2 - s1 * d;
        ok &= s2 <= CN_ONEPASS_MAX * m2;
        m[c] = (double)pv[c] + d;
        q[c] = m2 > 0.0 ? m2 : 0.0;
    }
    return ok ? 1 : cn_cl_stats_2p(x, nr, C, m, q, ws);
}

/* Column statistics of a channels-last block: m[C] = mean, q[C] = M2 of nr
   rows; 1, or 0 when a float sum overflowed (redo in double). ws: 3 C doubles. */
template <class T>
inline int cn_cl_block_stats(const T* x, ptrdiff_t nr, ptrdiff_t C, double* m, double* q, double* ws) {
    return C % 16 == 0 ? cn_cl_stats_1p(x, nr, C, m, q, ws) : cn_cl_stats_scalar(x, nr, C, m, q, ws);
}

/* ---- gradient sums ---- */
constexpr ptrdiff_t CN_CLG_MAXC = 2048;

/* fa += S g, fb += S g (x - mf), fc += S (x - mf) over a slab; each row
   prefetches the same row pd values ahead into L2 */
template <class T, int NV>
CN_INLINE void cn_clg_slab(const T* CN_RESTRICT g, const T* CN_RESTRICT x, ptrdiff_t nr, ptrdiff_t C,
                           const float* CN_RESTRICT mf, float* CN_RESTRICT fa, float* CN_RESTRICT fb,
                           float* CN_RESTRICT fc, ptrdiff_t pd) {
    VF va[NV], vb[NV], vc[NV], mv[NV];
    for (int v = 0; v < NV; v++) {
        mv[v] = vload(mf + 16 * v); va[v] = vload(fa + 16 * v);
        vb[v] = vload(fb + 16 * v); vc[v] = vload(fc + 16 * v);
    }
    for (ptrdiff_t r = 0; r < nr; r++) {
        const T* pg = g + r * C;
        const T* px = x + r * C;
        for (int v = 0; v < NV; v += cn_vpl<T>()) {
            cn_prefetch_line_l2(pg + pd + 16 * v);
            cn_prefetch_line_l2(px + pd + 16 * v);
        }
        for (int v = 0; v < NV; v++) {
            VF gv = vload(pg + 16 * v), d = vload(px + 16 * v) - mv[v];
            va[v] = va[v] + gv;
            vb[v] = vfma(gv, d, vb[v]);
            vc[v] = vc[v] + d;
        }
    }
    for (int v = 0; v < NV; v++) {
        vstore(fa + 16 * v, va[v], false);
        vstore(fb + 16 * v, vb[v], false);
        vstore(fc + 16 * v, vc[v], false);
    }
}

/* Channels-last gradient sums of nr rows of C (C a multiple of 16, at most
   CN_CLG_MAXC): sg = S g, sgx = S g (x - mu), sx = S (x - mu) per column
   (set, not added), swept as the statistics: slabs, register tiles, float
   column partials flushed into double every CN_FROWS rows. Each row
   prefetches the same row of the next nr rows into L2. Returns 0, with the
   sums unspecified, when C does not qualify, a mean is not a float value (the
   float centre would round it) or a float partial overflowed. */
template <class T>
inline int cn_cl_grad(const T* CN_RESTRICT g, const T* CN_RESTRICT x, ptrdiff_t nr, ptrdiff_t C, const double* mu,
                      double* CN_RESTRICT sg, double* CN_RESTRICT sgx, double* CN_RESTRICT sx) {
    float mf[CN_CLG_MAXC], f[3 * CN_CLG_MAXC];
    ptrdiff_t c, r1, rs, slab = cn_slab<T>(C);
    if (C % 16 != 0 || C > CN_CLG_MAXC) return 0;
    for (c = 0; c < C; c++) {
        mf[c] = (float)mu[c];
        if ((double)mf[c] != mu[c]) return 0;
        sg[c] = 0.0; sgx[c] = 0.0; sx[c] = 0.0;
    }
    for (r1 = 0; r1 < nr;) {
        ptrdiff_t rend = nr - r1 < CN_FROWS ? nr : r1 + CN_FROWS;
        for (c = 0; c < 3 * C; c++) f[c] = 0.0f;
        for (rs = r1; rs < rend; rs += slab) {
            ptrdiff_t k = rend - rs < slab ? rend - rs : slab;
            const T* gs = g + rs * C;
            const T* xs = x + rs * C;
            cn_tiles(C, [&](ptrdiff_t c0, auto nv) CN_LAMBDA {
                cn_clg_slab<T, decltype(nv)::value>(gs + c0, xs + c0, k, C, mf + c0, f + c0, f + C + c0,
                                                    f + 2 * C + c0, nr * C);
            });
        }
        if (!cn_finite_f(f, 3 * C)) return 0;
        for (c = 0; c < C; c++) {
            sg[c] += (double)f[c]; sgx[c] += (double)f[C + c]; sx[c] += (double)f[2 * C + c];
        }
        r1 = rend;
    }
    return 1;
}

}  // namespace
#endif
