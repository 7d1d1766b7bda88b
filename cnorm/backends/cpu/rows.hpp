/* Contiguous rows: the statistics of one run (LayerNorm rows, channels-first
   GroupNorm/InstanceNorm groups, channels-first BatchNorm block pieces) and
   the LayerNorm backward (per-element affine, S == 1), float32 and half data.

   Row statistics: 32 float lanes, each chunk of CN_RCH values folded into 16
   double lanes; one pass around a pivot where that is as exact as two (see
   CN_ONEPASS_MAX), else two - pass 1 sums x - x[0] (an exact pivot), pass 2
   (x - mf)^2 and x - mf around the float-rounded mean mf, corrected exactly
   for that rounding. Positions alone decide lanes and chunks. A float sum
   that overflowed makes the caller redo the row in double. */
#ifndef CN_ROWS_HPP
#define CN_ROWS_HPP
#include "cl_stats.hpp"
#include "elementwise.hpp"
#include "runs.hpp"

namespace {

constexpr ptrdiff_t CN_RCH = 512;
/* 32-value accumulator pairs of the row sweep: two (64 values per step, the
   add latency hidden), at every level - the lanes' grouping is part of the
   result, and AVX2 measured the same with one pair (interleaved A/B, float32
   and half rows within 3%) */
constexpr int CN_ROW_U = 2;

/* *s1 = Σ(x - c), or with sq: *s1 = Σ(x - c)^2 and *s2 = Σ(x - c) */
template <class T>
inline void cn_row_lanes(const T* CN_RESTRICT x, ptrdiff_t n, float c, int sq, double* s1, double* s2) {
    const VF vc = vset(c);
    VD p1 = vdzero(), p2 = vdzero();
    for (ptrdiff_t i0 = 0; i0 < n; i0 += CN_RCH) {
        ptrdiff_t m = n - i0 < CN_RCH ? n - i0 : CN_RCH, i;
        const T* xc = x + i0;
        VF a[2 * CN_ROW_U], b[2 * CN_ROW_U];
        for (int u = 0; u < 2 * CN_ROW_U; u++) { a[u] = vzero(); b[u] = vzero(); }
        CN_UNROLL(8)
        for (i = 0; i + 32 * CN_ROW_U <= m; i += 32 * CN_ROW_U) {
            VF e[2 * CN_ROW_U];
            for (int u = 0; u < CN_ROW_U; u++) vload2(xc + i + 32 * u, e[2 * u], e[2 * u + 1]);
            for (int u = 0; u < 2 * CN_ROW_U; u++) {
                e[u] = e[u] - vc;
                if (sq) { a[u] = vfma(e[u], e[u], a[u]); b[u] = b[u] + e[u]; }
                else a[u] = a[u] + e[u];
            }
        }
        for (; i < m; i += 32) {  /* tail, by masked loads, into a[0] and a[1] */
            VF e0, e1;
            vload2_n(xc + i, m - i, e0, e1);
            e0 = vkeep(e0 - vc, vcount2_a(xc, m - i));
            e1 = vkeep(e1 - vc, vcount2_b(xc, m - i));
            if (sq) {
                a[0] = vfma(e0, e0, a[0]); a[1] = vfma(e1, e1, a[1]);
                b[0] = b[0] + e0; b[1] = b[1] + e1;
            } else {
                a[0] = a[0] + e0; a[1] = a[1] + e1;
            }
        }
        VF ta = a[0] + a[1], tb = b[0] + b[1];
        for (int u = 1; u < CN_ROW_U; u++) { ta = ta + (a[2 * u] + a[2 * u + 1]); tb = tb + (b[2 * u] + b[2 * u + 1]); }
        p1 = p1 + vwiden(ta);
        if (sq) p2 = p2 + vwiden(tb);
    }
    *s1 = vhsum(p1);
    *s2 = sq ? vhsum(p2) : 0.0;
}

/* the pairwise float mean of x[0..16) */
template <class T>
inline float cn_pivot16(const T* x) {
    float a[8];
    for (int j = 0; j < 8; j++) a[j] = cn_ldf(x + 2 * j) + cn_ldf(x + 2 * j + 1);
    return (((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))) * 0.0625f;
}

/* Rows of at most CN_SHORT_MAX values (per-token LayerNorm): the two passes
   and the correction from registers - 16 float lanes of at most 8 terms each,
   reduced in the fixed order. nb <= 8 consecutive rows (row j at x + j n) at
   once, each step for all rows before the next, so that the rows' latency
   chains (two reductions and a division each) overlap; one row (nb = 1) is
   cn_ln_row_stats' short-row case with the same arithmetic, so a row's values
   never depend on its batch. Returns a bit mask of the rows whose float sums
   overflowed (to redo in double). */
constexpr ptrdiff_t CN_SHORT_MAX = 128;
template <class T>
inline int cn_short_rows_stats(const T* x, ptrdiff_t n, int nb, double* mu, double* m2) {
    VF a[8], q[8], e[8];
    float p[8], mf[8];
    double s[8], m[8];
    const int nf = (int)(n / 16);          /* whole vectors, then a tail of rem values */
    const ptrdiff_t rem = n % 16;
    int j, v, bad = 0;
    for (j = 0; j < nb; j++) {
        const T* xr = x + j * n;
        p[j] = cn_ldf(xr);
        const VF vp = vset(p[j]);
        a[j] = vzero();
        for (v = 0; v < nf; v++) a[j] = a[j] + (vload(xr + 16 * v) - vp);
        if (rem) a[j] = a[j] + vkeep(vload_n(xr + 16 * nf, rem) - vp, rem);
    }
    for (j = 0; j < nb; j++) s[j] = vtotal(a[j]);
    for (j = 0; j < nb; j++) { m[j] = (double)p[j] + s[j] / (double)n; mf[j] = (float)m[j]; }
    for (j = 0; j < nb; j++) {
        const T* xr = x + j * n;
        const VF vm = vset(mf[j]);
        q[j] = vzero();
        e[j] = vzero();
        for (v = 0; v < nf; v++) {
            VF d = vload(xr + 16 * v) - vm;
            q[j] = vfma(d, d, q[j]);
            e[j] = e[j] + d;
        }
        if (rem) {
            VF d = vkeep(vload_n(xr + 16 * nf, rem) - vm, rem);
            q[j] = vfma(d, d, q[j]);
            e[j] = e[j] + d;
        }
    }
    for (j = 0; j < nb; j++) {
        double sq = vtotal(q[j]), se = vtotal(e[j]), dm = m[j] - (double)mf[j];
        if ((sq * 0.0 + se * 0.0 + m[j] * 0.0) != 0.0) { bad |= 1 << j; continue; }
        sq = sq + dm * ((double)n * dm - 2.0 * se);
        mu[j] = m[j];
        m2[j] = sq > 0.0 ? sq : 0.0;
    }
    return bad;
}

/* mean and M2 of one row of n values; 0 when a float sum overflowed */
template <class T>
inline int cn_ln_row_stats(const T* x, ptrdiff_t n, double* mu, double* m2) {
    double s, q, se, m, dm;
    float mf, p = cn_ldf(x);
    if (n <= CN_SHORT_MAX) return !cn_short_rows_stats(x, n, 1, mu, m2);
    {  /* one pass around the mean of the first 16 values */
        const float pv = cn_pivot16(x);
        cn_row_lanes(x, n, pv, 1, &q, &se);
        if ((q * 0.0 + se * 0.0) != 0.0) return 0;
        s = se / (double)n;
        dm = q - se * s;
        if (q <= CN_ONEPASS_MAX * dm) { *mu = (double)pv + s; *m2 = dm; return 1; }
    }
    cn_row_lanes(x, n, p, 0, &s, &se);
    m = (double)p + s / (double)n;
    mf = (float)m;
    cn_row_lanes(x, n, mf, 1, &q, &se);
    if ((q * 0.0 + se * 0.0 + m * 0.0) != 0.0) return 0;
    dm = m - (double)mf;
    q = q + dm * ((double)n * dm - 2.0 * se);
    *mu = m;
    *m2 = q > 0.0 ? q : 0.0;
    return 1;
}

/* RMSNorm: M2 = sum of x^2 of one row (no centring: the "mean" is 0), in the
   float lanes of cn_row_lanes around 0; 0 when a float sum overflowed */
template <class T>
inline int cn_rms_row_stats(const T* x, ptrdiff_t n, double* m2) {
    double q, s;
    cn_row_lanes(x, n, 0.0f, 1, &q, &s);
    if (q * 0.0 != 0.0) return 0;
    *m2 = q;
    return 1;
}

/* ---- LayerNorm backward, float32 and half data ----
   Rows n0..n1-1 of a per-element-affine problem (S == 1) in chunks of CN_LNK
   rows: pass A (from memory) per row sums w g, w g (x - mu), x - mu in 32
   float lanes (the saved float mean mu is the centre: exact subtraction near
   the data); pass B (the chunk is in L1/L2) writes dx and sums g and g xhat
   per column into float partials, tile by tile, flushed into the double pb/pw
   per chunk (chunks count from n0: shape-determined, bit-identical for any
   thread count). A row whose float sums are not finite, or a chunk whose
   float column partials are not, is redone in double. */
constexpr ptrdiff_t CN_LNK = 16;

template <class T>
inline void cn_lnb_sums(const T* CN_RESTRICT g, const T* CN_RESTRICT x, const float* CN_RESTRICT w, ptrdiff_t n,
                        float mu, double* swg, double* swgx, double* sx) {
    ptrdiff_t i = 0;
    VF a0 = vzero(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0;
    const VF vm = vset(mu);
    auto step = [&](VF wg0, VF wg1, VF d0, VF d1) CN_LAMBDA {
        a0 = a0 + wg0; a1 = a1 + wg1;
        b0 = vfma(wg0, d0, b0); b1 = vfma(wg1, d1, b1);
        c0 = c0 + d0; c1 = c1 + d1;
    };
    for (; i + 32 <= n; i += 32)
        step(vload(w + i) * vload(g + i), vload(w + i + 16) * vload(g + i + 16), vload(x + i) - vm,
             vload(x + i + 16) - vm);
    if (i < n) {  /* tail by masked loads: absent lanes add zeros */
        ptrdiff_t m = n - i;
        step(vload_n(w + i, m) * vload_n(g + i, m), vload_n(w + i + 16, m - 16) * vload_n(g + i + 16, m - 16),
             vkeep(vload_n(x + i, m) - vm, m), vkeep(vload_n(x + i + 16, m - 16) - vm, m - 16));
    }
    *swg = vtotal(a0, a1);
    *swgx = vtotal(b0, b1);
    *sx = vtotal(c0, c1);
}

/* Pass A of one row: dl (the re-centring of the saved mean), swg and the
   re-centred swgx, redone in double when a float sum is not finite. RMSNorm
   (rms) has no mean to re-centre: its centre is exactly 0, and dl is 0. */
template <class T>
inline void cn_lnb_row(const T* gr, const T* xr, const float* w, ptrdiff_t cg, float mu, double* dl, double* swg,
                       double* swgx, bool rms) {
    double sx;
    cn_lnb_sums(gr, xr, w, cg, mu, swg, swgx, &sx);
    if ((*swg * 0.0 + *swgx * 0.0 + sx * 0.0) != 0.0) {
        double a[CN_LANES], b[CN_LANES], c[CN_LANES];
        for (int j = 0; j < CN_LANES; j++) { a[j] = 0.0; b[j] = 0.0; c[j] = 0.0; }
        cn_wsums(gr, xr, w, cg, (double)mu, a, b, c);
        *swg = vhsum(vdload(a));
        *swgx = vhsum(vdload(b));
        sx = vhsum(vdload(c));
    }
    if (rms) { *dl = 0.0; return; }
    *dl = sx / (double)cg;
    *swgx -= *dl * *swg;
}

/* Pass B, one tile: columns [0, 16 (NV - 1) + mt) of `rows` rows (row n at
   offset n C), the tile's w and its dweight/dbias accumulators in registers
   across the rows (rows in order: the same float sums as row-by-row column
   partials), so the partials cost one store per tile instead of a load and a
   store per row. k5: per row mu, dl, rf, kb, kc. Each row prefetches its
   lines of the next chunk (pf values ahead). dh (the fused add-and-norm's
   gradient of h, or NULL): dx = dh + the norm's dx rounded to T, as the
   unfused sum of the two would be. */
template <class T, int NV>
CN_INLINE void cn_lnb_tile(const T* g, const T* x, T* dx, ptrdiff_t C, ptrdiff_t rows, const float* w,
                           const float* k5, ptrdiff_t mt, bool nt, float* cb, float* cw, ptrdiff_t pf,
                           const T* dh) {
    VF ab[NV], aw[NV], wv[NV];
    const bool full = mt >= 16;
    for (int v = 0; v < NV; v++) {
        ab[v] = vzero();
        aw[v] = vzero();
        wv[v] = v == NV - 1 ? vload_n(w + 16 * v, mt) : vload(w + 16 * v);
    }
    for (ptrdiff_t n = 0; n < rows; n++) {
        const T* gr = g + n * C;
        const T* xr = x + n * C;
        const float* k = k5 + 5 * n;
        const VF mu = vset(k[0]), dl = vset(k[1]), rf = vset(k[2]), kb = vset(k[3]), kc = vset(k[4]);
        for (int v = 0; v < NV; v += cn_vpl<T>()) {
            cn_prefetch_line_l2(gr + pf + 16 * v);
            cn_prefetch_line_l2(xr + pf + 16 * v);
        }
        VF o[NV];
        for (int v = 0; v < NV; v++) {
            ptrdiff_t mv = v == NV - 1 ? mt : 16;
            VF gv = vload_n(gr + 16 * v, mv), q = gv * rf;
            VF d = vkeep((vload_n(xr + 16 * v, mv) - mu) - dl, mv);
            /* dx = w (g rf) + (d kb + kc): four FMA-unit operations, not five */
            o[v] = vfma(wv[v], q, vfma(d, kb, kc));
            ab[v] = ab[v] + gv;
            aw[v] = vfma(q, d, aw[v]);
        }
        if (dx != NULL) {
            T* dr = dx + n * C;
            if (dh != NULL) {
                const T* hr = dh + n * C;
                for (int v = 0; v < NV; v++)
                    o[v] = vround_as<T>(o[v]) + vload_n(hr + 16 * v, v == NV - 1 ? mt : 16);
            }
            if (full && NV % 2 == 0) {  /* pairs: one conversion for two vectors */
                for (int v = 0; v < NV; v += 2) vstore_pair(dr + 16 * v, o[v], o[v + 1], nt);
            } else {
                for (int v = 0; v < NV; v++) {
                    if (v < NV - 1 || full) vstore(dr + 16 * v, o[v], nt);
                    else vstore_n(dr + 16 * v, o[v], mt);
                }
            }
        }
    }
    for (int v = 0; v < NV; v++) {
        ptrdiff_t mv = v == NV - 1 ? mt : 16;
        vstore_n(cb + 16 * v, ab[v], mv);
        vstore_n(cw + 16 * v, aw[v], mv);
    }
}

/* dx is g or x itself (an out= buffer in place of an input: the front end
   refuses partial overlaps, so equal pointers are the only aliasing) */
template <class T>
inline bool cn_aliases(const T* dx, const T* g, const T* x) {
    return dx != NULL && (dx == g || dx == x);
}

/* A chunk's float column partials into the double pb/pw, or, when one is not
   finite, the chunk's column sums redone in double */
template <class T>
inline void cn_lnb_flush(const T* g, const T* x, ptrdiff_t C, ptrdiff_t rows, ptrdiff_t cg, const float* cb,
                         const float* cw, const double* mk, const double* dk, const double* rk, double* pb,
                         double* pw) {
    ptrdiff_t i, n, k;
    if (cn_finite_f(cb, cg) && cn_finite_f(cw, cg)) {
        for (i = 0; i < cg; i++) { pb[i] += (double)cb[i]; pw[i] += (double)cw[i]; }
        return;
    }
    for (n = 0; n < rows; n += 4) {
        k = rows - n < 4 ? rows - n : 4;
        cn_colsums(g + n * C, x + n * C, C, (int)k, cg, mk + n, dk + n, rk + n, pb, pw);
    }
}

/* Pass B over columns [0, nc) of `rows` rows (row n at offset n C from g, x,
   dx, which point at the first column): dx (unless NULL) and the float
   column partials cb/cw; each row prefetches its lines pf values ahead. A
   head to dx's first line boundary (streaming stores fill whole lines),
   whole tiles, then single vectors (whole lines only for float32). */
template <class T>
CN_INLINE void cn_lnb_cols(const T* g, const T* x, T* dx, ptrdiff_t C, ptrdiff_t rows, ptrdiff_t nc, const float* w,
                        const float* k5, float* cb, float* cw, ptrdiff_t pf, const T* dh) {
    const bool nt = cn_nt_hint() && dx != NULL && (C * (ptrdiff_t)sizeof(T)) % 64 == 0;
    ptrdiff_t c = 0, h = nt ? cn_head(dx, nc) : 0;
    auto at = [](const T* p, ptrdiff_t c) { return p == NULL ? p : p + c; };
    while (c < h) {
        const ptrdiff_t m = h - c < 16 ? h - c : 16;
        cn_lnb_tile<T, 1>(g + c, x + c, dx + c, C, rows, w + c, k5, m, false, cb + c, cw + c, pf, at(dh, c));
        c += m;
    }
    for (; c + 16 * CN_TILE <= nc; c += 16 * CN_TILE)
        cn_lnb_tile<T, CN_TILE>(g + c, x + c, dx == NULL ? dx : dx + c, C, rows, w + c, k5, 16, nt, cb + c, cw + c,
                                pf, at(dh, c));
    for (; c < nc; c += 16)
        cn_lnb_tile<T, 1>(g + c, x + c, dx == NULL ? dx : dx + c, C, rows, w + c, k5, nc - c,
                          sizeof(T) == 4 && nt, cb + c, cw + c, pf, at(dh, c));
}

/* Backward of rows n0..n1-1 of group gi (cg columns from gi cg) of rows of C:
   dx (unless NULL) and the dweight/dbias partials pw/pb (C doubles, added
   to). fb: 2 cg floats of scratch. rms: RMSNorm (no re-centring, and no
   mean term: kc = 0). */
template <class T>
inline void cn_ln_bwd_rows(const T* g, const T* x, T* dx, ptrdiff_t C, ptrdiff_t cg, ptrdiff_t G, ptrdiff_t gi,
                           ptrdiff_t n0, ptrdiff_t n1, const float* mean, const float* rstd, const float* w, double* pw,
                           double* pb, float* fb, bool rms, const T* dh) {
    const ptrdiff_t c0 = gi * cg;
    const double m = (double)cg;
    float* CN_RESTRICT cb = fb;
    float* CN_RESTRICT cw = fb + cg;
    double mk[CN_LNK], dk[CN_LNK], rk[CN_LNK];
    float k5[5 * CN_LNK];
    w += c0; pw += c0; pb += c0;
    for (ptrdiff_t r0 = n0; r0 < n1; r0 += CN_LNK) {
        const ptrdiff_t r1 = n1 - r0 < CN_LNK ? n1 : r0 + CN_LNK, off0 = r0 * C + c0, rows = r1 - r0;
        for (ptrdiff_t n = r0; n < r1; n++) {
            const float mu = mean[n * G + gi];
            const double r = (double)rstd[n * G + gi];
            double dl, swg, swgx;
            cn_lnb_row(g + n * C + c0, x + n * C + c0, w, cg, mu, &dl, &swg, &swgx, rms);
            mk[n - r0] = (double)mu; dk[n - r0] = dl; rk[n - r0] = r;
            float* k = k5 + 5 * (n - r0);
            k[0] = mu;
            k[1] = (float)dl;
            k[2] = (float)r;
            k[3] = (float)(-r * r * r * swgx / m);
            k[4] = rms ? 0.0f : (float)(-r * swg / m);
        }
        const T* dhc = dh == NULL ? dh : dh + off0;
        if (cn_aliases(dx, g, x)) {
            /* dx over g or x (out=): the flush may redo the column sums from g
               and x, so they come first, and dx in a second sweep */
            cn_lnb_cols(g + off0, x + off0, (T*)NULL, C, rows, cg, w, k5, cb, cw, CN_LNK * C, (const T*)NULL);
            cn_lnb_flush(g + off0, x + off0, C, rows, cg, cb, cw, mk, dk, rk, pb, pw);
            cn_lnb_cols(g + off0, x + off0, dx + off0, C, rows, cg, w, k5, cb, cw, CN_LNK * C, dhc);
            continue;
        }
        cn_lnb_cols(g + off0, x + off0, dx == NULL ? dx : dx + off0, C, rows, cg, w, k5, cb, cw, CN_LNK * C, dhc);
        cn_lnb_flush(g + off0, x + off0, C, rows, cg, cb, cw, mk, dk, rk, pb, pw);
    }
}

/* ---- LayerNorm backward of long rows, float32 and half data ----
   Rows longer than the fused sample blocks allow (their dweight/dbias
   partials would be C doubles per block) take two phases whose scratch does
   not grow with the row (the Cython driver, groups.pxi ln_tiled_bwd):
   phase 1 sums each row in pieces (cn_lnb_piece), phase 2 runs over column
   tiles, each walking every row in order (cn_ln_bwd_cols). */

/* Phase 1: the sums of cn_lnb_sums over one piece of a row - w g, w g (x - mu),
   x - mu into s3[0..3) - its float lanes folded into double every CN_RCH
   values, the piece redone in double lanes when a float sum is not finite */
template <class T>
inline void cn_lnb_piece(const T* CN_RESTRICT g, const T* CN_RESTRICT x, const float* CN_RESTRICT w, ptrdiff_t n,
                         float mu, double* s3) {
    VD p = vdzero(), q = p, r = p;
    const VF vm = vset(mu);
    for (ptrdiff_t i0 = 0; i0 < n; i0 += CN_RCH) {
        const ptrdiff_t k = n - i0 < CN_RCH ? n - i0 : CN_RCH;
        const T* gc = g + i0;
        const T* xc = x + i0;
        const float* wc = w + i0;
        VF a0 = vzero(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0;
        auto step = [&](VF wg0, VF wg1, VF d0, VF d1) CN_LAMBDA {
            a0 = a0 + wg0; a1 = a1 + wg1;
            b0 = vfma(wg0, d0, b0); b1 = vfma(wg1, d1, b1);
            c0 = c0 + d0; c1 = c1 + d1;
        };
        ptrdiff_t i = 0;
        CN_UNROLL(4)
        for (; i + 32 <= k; i += 32)
            step(vload(wc + i) * vload(gc + i), vload(wc + i + 16) * vload(gc + i + 16), vload(xc + i) - vm,
                 vload(xc + i + 16) - vm);
        if (i < k) {
            ptrdiff_t m = k - i;
            step(vload_n(wc + i, m) * vload_n(gc + i, m), vload_n(wc + i + 16, m - 16) * vload_n(gc + i + 16, m - 16),
                 vkeep(vload_n(xc + i, m) - vm, m), vkeep(vload_n(xc + i + 16, m - 16) - vm, m - 16));
        }
        p = p + vfold(a0, a1);
        q = q + vfold(b0, b1);
        r = r + vfold(c0, c1);
    }
    if (!(vfinite(p) && vfinite(q) && vfinite(r))) {
        double a[CN_LANES], b[CN_LANES], c[CN_LANES];
        for (int j = 0; j < CN_LANES; j++) { a[j] = 0.0; b[j] = 0.0; c[j] = 0.0; }
        cn_wsums(g, x, w, n, (double)mu, a, b, c);
        p = vdload(a); q = vdload(b); r = vdload(c);
    }
    s3[0] = vhsum(p);
    s3[1] = vhsum(q);
    s3[2] = vhsum(r);
}

/* A chunk's float column partials into the double ab/aw column by column; a
   column whose float partials are not finite has its chunk sums redone in
   double (so no column's value depends on its neighbours, or on the tiles) */
template <class T>
inline void cn_lnb_flush_cols(const T* g, const T* x, ptrdiff_t C, ptrdiff_t rows, ptrdiff_t nc, const float* cb,
                              const float* cw, const double* mk, const double* dk, const double* rk, double* ab,
                              double* aw) {
    ptrdiff_t i;
    if (cn_finite_f(cb, nc) && cn_finite_f(cw, nc)) {  /* the common case, one vector loop */
        for (i = 0; i < nc; i++) { ab[i] += (double)cb[i]; aw[i] += (double)cw[i]; }
        return;
    }
    for (i = 0; i < nc; i++) {
        if (cn_finite_f(cb + i, 1) && cn_finite_f(cw + i, 1)) {
            ab[i] += (double)cb[i];
            aw[i] += (double)cw[i];
            continue;
        }
        for (ptrdiff_t n = 0; n < rows; n += 4) {
            const ptrdiff_t k = rows - n < 4 ? rows - n : 4;
            cn_colsums(g + n * C + i, x + n * C + i, C, (int)k, 1, mk + n, dk + n, rk + n, ab + i, aw + i);
        }
    }
}

/* Phase 2, one column tile: columns [0, nc) from g, x, dx, w, dw, db (which
   point at the tile's first column) of every row n < N (row n at offset n C),
   rows in chunks of CN_LNK counted from row 0 - pass B of the fused kernel,
   the chunks' float partials added in order into the double ab/aw, and the
   tile's dweight/dbias written out at the end. rk: per row mu, dl, r, kb, kc
   (row n at rk + 5 n). ab/aw: nc doubles, cb/cw: nc floats of scratch. nx:
   offset from this tile's first column to the next tile's, whose first rows
   the last chunk prefetches. */
template <class T>
inline void cn_ln_bwd_cols(const T* g, const T* x, T* dx, ptrdiff_t C, ptrdiff_t N, ptrdiff_t nc, const float* w,
                           const double* rk, float* dw, float* db, double* ab, double* aw, float* cb, float* cw,
                           ptrdiff_t nx, const T* dh) {
    double mk[CN_LNK], dk[CN_LNK], rr[CN_LNK];
    float k5[5 * CN_LNK];
    for (ptrdiff_t i = 0; i < nc; i++) { ab[i] = 0.0; aw[i] = 0.0; }
    for (ptrdiff_t r0 = 0; r0 < N; r0 += CN_LNK) {
        const ptrdiff_t rows = N - r0 < CN_LNK ? N - r0 : CN_LNK, off = r0 * C;
        for (ptrdiff_t k = 0; k < rows; k++) {
            const double* q = rk + 5 * (r0 + k);
            mk[k] = q[0]; dk[k] = q[1]; rr[k] = q[2];
            for (int j = 0; j < 5; j++) k5[5 * k + j] = (float)q[j];
        }
        const ptrdiff_t pf = r0 + rows < N ? CN_LNK * C : nx - off;
        const T* dhc = dh == NULL ? dh : dh + off;
        if (cn_aliases(dx, g, x)) {  /* as in cn_ln_bwd_rows: the sums before dx */
            cn_lnb_cols(g + off, x + off, (T*)NULL, C, rows, nc, w, k5, cb, cw, pf, (const T*)NULL);
            cn_lnb_flush_cols(g + off, x + off, C, rows, nc, cb, cw, mk, dk, rr, ab, aw);
            cn_lnb_cols(g + off, x + off, dx + off, C, rows, nc, w, k5, cb, cw, pf, dhc);
            continue;
        }
        cn_lnb_cols(g + off, x + off, dx == NULL ? dx : dx + off, C, rows, nc, w, k5, cb, cw, pf, dhc);
        cn_lnb_flush_cols(g + off, x + off, C, rows, nc, cb, cw, mk, dk, rr, ab, aw);
    }
    /* rounded into the float scratch, then out: whole lines by streaming
       stores when the outputs are large (dweight and dbias of a long row are
       twice the size of float16 data) */
    for (ptrdiff_t i = 0; i < nc; i++) { cw[i] = (float)aw[i]; cb[i] = (float)ab[i]; }
    if (cn_nt_hint()) {
        cn_stream_copy((const char*)cw, (char*)dw, nc * (ptrdiff_t)sizeof(float));
        cn_stream_copy((const char*)cb, (char*)db, nc * (ptrdiff_t)sizeof(float));
    } else {
        memcpy(dw, cw, (size_t)nc * sizeof(float));
        memcpy(db, cb, (size_t)nc * sizeof(float));
    }
}

}  // namespace
#endif
