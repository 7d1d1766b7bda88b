# ------------------------------------------- per-sample, contiguous groups --
# Channels-first (and channels-last with S == 1): group (n, g) is one run of
# cg·S values starting at (n·C + g·cg)·S. Its statistics are BLK-sized pieces,
# two-pass each, merged in order.

cdef void run_stats(const dat* x, Py_ssize_t L, double* mu_o, double* m2_o) noexcept nogil:
    cdef double acc[LANES]
    cdef double cnt = 0.0, mu = 0.0, m2 = 0.0, bm
    cdef Py_ssize_t s0 = 0, n
    while s0 < L:
        n = L - s0 if L - s0 < BLK else BLK
        lanes_zero(acc)
        sum_run(x + s0, n, ld(x + s0), acc)
        bm = ld(x + s0) + lanes_total(acc) / <double>n
        lanes_zero(acc)
        sq_run(x + s0, n, bm, acc)
        chan_merge(&cnt, &mu, &m2, <double>n, bm, lanes_total(acc))
        s0 += n
    mu_o[0] = mu
    m2_o[0] = m2


cdef void rms_stats(const dat* x, Py_ssize_t L, double* m2_o) noexcept nogil:
    """Σx² of one run (RMSNorm): float lanes (rows.hpp), else double lanes."""
    cdef double acc[LANES]
    if dat is not double:
        if cn_rms_row_stats(x, L, m2_o):
            return
    lanes_zero(acc)
    sq_run(x, L, 0.0, acc)
    m2_o[0] = lanes_total(acc)


cdef void grp_fwd_unit(const dat* x, dat* y, Py_ssize_t C, Py_ssize_t S, Py_ssize_t cg,
                       Py_ssize_t u, double eps, const floating* w, const floating* b,
                       floating* mean, floating* var, floating* rstd, bint rms=False,
                       int act=ACT_NONE) noexcept nogil:
    """Group u = n·G + g: statistics, then normalize (and apply act) while it is in cache.

    rms (RMSNorm, S == 1 only): the mean square about 0, and mean 0. With an
    activation the constants are those backward recomputes (see fwd_consts):
    no fold of the mean's rounding (ml = 0, b' = b), a = weight·rstd as rounded."""
    cdef Py_ssize_t G = C // cg, g = u % G, n = u // G, c0 = g * cg, ci, i, L = cg * S
    cdef Py_ssize_t off = (n * C + c0) * S
    cdef double mu, m2, v, r, a
    cdef floating mh, ml, rf
    # float lanes while the group fits the L2 (two passes over it), else double blocks
    if rms:
        mu = 0.0
        rms_stats(x + off, L, &m2)
    elif not (L <= BLK and row_stats_f(x + off, L, &mu, &m2)):
        run_stats(x + off, L, &mu, &m2)
    v = m2 / <double>L
    r = 1.0 / sqrt(v + eps)
    mean[u] = <floating>mu
    var[u] = <floating>v
    rstd[u] = <floating>r
    mh = <floating>mu
    if y == NULL:
        return
    if S == 1:
        # per-element affine (LayerNorm): y = ((x - mh) - ml)·r·w + b
        ml = <floating>(mu - <double>mh) if act == ACT_NONE else 0
        rf = <floating>r
        if dat is not double:
            cn_ln_fwd(x + off, y + off, cg, mh, ml, rf, <const float*>w + c0, <const float*>b + c0, act)
        elif act == ACT_NONE:
            for i in range(cg):
                st(y + (off + i), ((<floating>ld(x + (off + i)) - mh) - ml) * rf * w[c0 + i] + b[c0 + i])
        else:
            for i in range(cg):
                st(y + (off + i), act1(((<floating>ld(x + (off + i)) - mh) - ml) * rf * w[c0 + i] + b[c0 + i], act))
        return
    for ci in range(cg):
        # a channel's share of the next group toward L2 (this group is in cache):
        # memory keeps streaming while this core normalizes (a hint, past the end
        # too); groups of few channels would issue it in one burst that stalls
        # (with an activation, spread over the sweep: see cn_norm_run)
        if act != ACT_NONE:
            norm_run(x + off + ci * S, y + off + ci * S, S, mh, <floating>(<double>w[c0 + ci] * <double>rstd[u]),
                     b[c0 + ci], act, x + off + L + ci * S if cg >= 4 else NULL)
            continue
        if cg >= 4:
            cn_prefetch_l2(x + off + L + ci * S, S * sizeof(dat))
        a = <double>w[c0 + ci] * r
        norm_run(x + off + ci * S, y + off + ci * S, S, mh, <floating>a,
                 <floating>(<double>b[c0 + ci] - (mu - <double>mh) * a))


cdef inline void wsums(const dat* g, const dat* x, const floating* w, Py_ssize_t n, double m,
                       double* awg, double* awgx, double* ax) noexcept nogil:
    """awg += w·g, awgx += w·g·(x - m), ax += x - m, lane-wise (runs.hpp)."""
    cn_wsums(g, x, w, n, m, awg, awgx, ax)


cdef inline void colsums(const dat* g, const dat* x, Py_ssize_t stride, int rows, Py_ssize_t n,
                         const double* m, const double* dl, const double* r,
                         double* pb, double* pw) noexcept nogil:
    cn_colsums(g, x, stride, rows, n, m, dl, r, pb, pw)


cdef void rows_bwd(const dat* g, const dat* x, dat* dx, Py_ssize_t C, Py_ssize_t cg, Py_ssize_t G,
                   Py_ssize_t gi, Py_ssize_t n0, Py_ssize_t n1,
                   const floating* mean, const floating* rstd, const floating* w,
                   double* pw, double* pb, bint rms, const dat* dh) noexcept nogil:
    """Backward of rows n0..n1-1 of a per-element-affine group (S == 1: LayerNorm).

    Four rows at a time (fixed from n0), all while they are in L1/L2: per
    row one reduction pass (the two weighted sums and the re-centring
    shift), then the dweight/dbias column sums of the four rows, then their
    dx pass. The column sums come before dx is written, so dx may be dy or x
    itself (out=). rms: RMSNorm (centre 0, no re-centring, no mean term).
    """
    cdef Py_ssize_t c0 = gi * cg, n, k, off, i
    cdef int rows
    cdef double ag[LANES]
    cdef double agx[LANES]
    cdef double ax[LANES]
    cdef double m4[4]
    cdef double dl4[4]
    cdef double r4[4]
    cdef double swg4[4]
    cdef double swgx4[4]
    cdef double mu, r, dl, swg, swgx, m = <double>cg
    cdef floating mh, ml, rf, kb, kc
    n = n0
    while n < n1:
        rows = <int>(n1 - n if n1 - n < 4 else 4)
        for k in range(rows):
            mu = mean[(n + k) * G + gi]
            off = (n + k) * C + c0
            lanes_zero(ag)
            lanes_zero(agx)
            lanes_zero(ax)
            wsums(g + off, x + off, w + c0, cg, mu, ag, agx, ax)
            swg = lanes_total(ag)
            swgx = lanes_total(agx)
            # centre: the row's exact mean (RMSNorm: exactly 0)
            dl4[k] = 0.0 if rms else recentre(m, lanes_total(ax), swg, &swgx)
            m4[k] = mu
            r4[k] = rstd[(n + k) * G + gi]
            swg4[k] = swg
            swgx4[k] = swgx
        off = n * C + c0
        colsums(g + off, x + off, C, rows, cg, m4, dl4, r4, pb + c0, pw + c0)
        if dx != NULL:
            for k in range(rows):
                # dx = r·w·g - r·swg/m - r³·swgx/m·(x - mu - dl)
                mu, dl, r = m4[k], dl4[k], r4[k]
                off = (n + k) * C + c0
                mh = <floating>mu
                ml = <floating>((mu - <double>mh) + dl)
                rf = <floating>r
                kb = <floating>(-r * r * r * swgx4[k] / m)
                kc = <floating>(0.0 if rms else -r * swg4[k] / m)
                if dat is not double:
                    cn_ln_dx(g + off, x + off, dx + off, cg, <const float*>w + c0, rf, mh, ml, kb, kc)
                else:
                    if dh != NULL:  # the fused add-and-norm: dx = dh + the norm's dx (dh read before dx is
                        for i in range(cg):  # written there: dx may be dh itself)
                            dx[off + i] = ((w[c0 + i] * g[off + i]) * rf + ((x[off + i] - mh) - ml) * kb + kc
                                           + dh[off + i])
                    else:
                        for i in range(cg):
                            st(dx + (off + i), (w[c0 + i] * <floating>ld(g + (off + i))) * rf
                               + ((<floating>ld(x + (off + i)) - mh) - ml) * kb + kc)
        n += rows


cdef void grp_bwd_unit(const dat* g, const dat* x, dat* dx,
                       Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t cg, Py_ssize_t sbs,
                       Py_ssize_t u, const floating* mean, const floating* rstd, const floating* w,
                       double* pw, double* pb, double* chs, bint rms=False, int act=ACT_NONE,
                       const floating* bias=NULL, dat* gscr=NULL, const dat* dh=NULL) noexcept nogil:
    """Unit u = sb·G + g: group g of the samples of sample block sb.

    pw/pb are this sample block's dweight/dbias partials (length C), summed
    over its samples in order; chs is 2·cg doubles of scratch (S == 1: 2·cg
    floats). Per-element-affine rows longer than LN_FUSE_C take ln_tiled_bwd.

    With an activation (S > 1 only), each sample's group first gets g =
    dy·act'(z) into ``gscr`` (cg·S values of this thread's scratch), z as
    grp_fwd_unit computed it: dy and x are read from memory once, the sums and
    dx then read g and x from cache (the wrapper takes this path for groups
    that fit beside each other in L2).
    """
    cdef Py_ssize_t G = C // cg, gi = u % G, sb = u // G, c0 = gi * cg, ci, n, n1, off, o2
    cdef double ag[LANES]
    cdef double agx[LANES]
    cdef double ax[LANES]
    cdef double mu, r, m = <double>(cg * S), swg, swgx, a, bx, wd, d, sx
    cdef floating mh, kb
    cdef const dat* gb
    n1 = (sb + 1) * sbs if (sb + 1) * sbs < N else N
    if S == 1:
        # one sweep per row, float lanes and column partials (rows.hpp); chs: 2·cg floats
        if dat is not double:
            cn_ln_bwd_rows(g, x, dx, C, cg, G, gi, sb * sbs, n1, <const float*>mean,
                           <const float*>rstd, <const float*>w, pw, pb, <float*>chs, rms, dh)
        else:
            rows_bwd(g, x, dx, C, cg, G, gi, sb * sbs, n1, mean, rstd, w, pw, pb, rms, dh)
        return
    for n in range(sb * sbs, n1):
        mu = mean[n * G + gi]
        r = rstd[n * G + gi]
        off = (n * C + c0) * S
        gb = g + off  # this group's g, channel ci at gb + ci·S
        if act != ACT_NONE:
            for ci in range(cg):
                act_grad_run(g + off + ci * S, x + off + ci * S, gscr + ci * S, S, mean[n * G + gi],
                             <floating>(<double>w[c0 + ci] * <double>rstd[n * G + gi]), bias[c0 + ci], act, False)
            gb = gscr
        swg = 0.0
        swgx = 0.0
        sx = 0.0
        for ci in range(cg):
            lanes_zero(ag)
            lanes_zero(agx)
            lanes_zero(ax)
            o2 = off + ci * S
            grad_run(gb + ci * S, x + o2, S, mu, ag, agx, ax)
            chs[2 * ci] = lanes_total(ag)
            chs[2 * ci + 1] = lanes_total(agx)
            sx += lanes_total(ax)
        d = sx / m  # re-centre on the group's exact mean (see recentre)
        for ci in range(cg):
            a = chs[2 * ci]
            bx = chs[2 * ci + 1] - d * a
            wd = w[c0 + ci]
            swg += wd * a
            swgx += wd * bx
            pb[c0 + ci] += a
            pw[c0 + ci] += bx * r
        if dx == NULL:
            continue
        # dx = r·w·g - r·swg/m - r³·swgx/m·(x - mu - d)
        mh = <floating>mu
        kb = <floating>(-r * r * r * swgx / m)
        for ci in range(cg):
            o2 = off + ci * S
            dx_run(gb + ci * S, x + o2, dx + o2, S, <floating>(<double>w[c0 + ci] * r), mh, kb,
                   <floating>(-r * swg / m + ((mu - <double>mh) + d) * (r * r * r * swgx / m)))


# ---------------------------------------------- per-sample, channels-last --
# Sample n is S rows of C; group g is columns [g·cg, (g+1)·cg) of every row.
# Statistics per row block of rbs rows, merged in order.

cdef inline bint cl_cols_to_groups(const dat* x, Py_ssize_t nr, Py_ssize_t C, Py_ssize_t cg,
                                   double* m, double* q, double* ws,
                                   double* gcnt, double* gmu, double* gm2) noexcept nogil:
    """float32/half: a row block's column statistics in float (cl_stats.hpp), merged
    into per-group (count, mean, M2). False (nothing merged) for float64 data or
    when a float sum overflowed: the caller then uses the double code."""
    cdef Py_ssize_t G = C // cg, gi, ci, c
    cdef double gm, d, s
    if not cl_stats_f(x, nr, C, m, q, ws):
        return False
    for gi in range(G):
        # columns have equal counts: group mean relative to the first column's,
        # then M2 = Σ q_c + nr·Σ (m_c - mean)²
        s = 0.0
        for ci in range(cg):
            s += m[gi * cg + ci] - m[gi * cg]
        gm = m[gi * cg] + s / <double>cg
        s = 0.0
        for ci in range(cg):
            c = gi * cg + ci
            d = m[c] - gm
            s += q[c] + <double>nr * d * d
        chan_merge(gcnt + gi, gmu + gi, gm2 + gi, <double>(nr * cg), gm, s)
    return True


cdef void cls_sample_stats(const dat* x, Py_ssize_t S, Py_ssize_t C, Py_ssize_t cg,
                           Py_ssize_t rbs, double* acc, double* colm,
                           double* gcnt, double* gmu, double* gm2, double* ws) noexcept nogil:
    """Per-group (count, mean, M2) of one sample, into gcnt/gmu/gm2 (length G).

    ws: 3·C doubles of scratch for the float path.
    """
    cdef Py_ssize_t G = C // cg, r0, nr, r, c, gi, ci
    cdef const dat* p
    cdef double s, bm, d
    for gi in range(G):
        gcnt[gi] = 0.0
        gmu[gi] = 0.0
        gm2[gi] = 0.0
    r0 = 0
    while r0 < S:
        nr = S - r0 if S - r0 < rbs else rbs
        if cl_cols_to_groups(x + r0 * C, nr, C, cg, acc, colm, ws, gcnt, gmu, gm2):
            r0 += nr
            continue
        for gi in range(G):
            for ci in range(cg):
                colm[gi * cg + ci] = ld(x + (r0 * C + gi * cg))  # pivot per group
        for c in range(C):
            acc[c] = 0.0
        for r in range(r0, r0 + nr):
            p = x + r * C
            for c in range(C):
                acc[c] += ld(p + c) - colm[c]
        for gi in range(G):
            s = 0.0
            for ci in range(cg):
                s += acc[gi * cg + ci]
            bm = colm[gi * cg] + s / <double>(nr * cg)
            for ci in range(cg):
                colm[gi * cg + ci] = bm
        for c in range(C):
            acc[c] = 0.0
        for r in range(r0, r0 + nr):
            p = x + r * C
            for c in range(C):
                d = ld(p + c) - colm[c]
                acc[c] += d * d
        for gi in range(G):
            s = 0.0
            for ci in range(cg):
                s += acc[gi * cg + ci]
            chan_merge(gcnt + gi, gmu + gi, gm2 + gi, <double>(nr * cg), colm[gi * cg], s)
        r0 += nr


cdef void cls_fwd_unit(const dat* x, dat* y, Py_ssize_t S, Py_ssize_t C, Py_ssize_t cg,
                       Py_ssize_t rbs, Py_ssize_t n, double eps, const floating* w, const floating* b,
                       floating* mean, floating* var, floating* rstd,
                       double* scratch, floating* kk, int act=ACT_NONE) noexcept nogil:
    """Sample n; scratch: 5·C + 3·G doubles, kk: 3·C constants + 3·(C + 16) of scratch."""
    cdef Py_ssize_t G = C // cg, gi, ci, c, r
    cdef double* acc = scratch
    cdef double* colm = scratch + C
    cdef double* gcnt = scratch + 2 * C
    cdef double* gmu = gcnt + G
    cdef double* gm2 = gmu + G
    cdef const dat* xs = x + n * S * C
    cdef floating k3[3]
    cls_sample_stats(xs, S, C, cg, rbs, acc, colm, gcnt, gmu, gm2, gm2 + G)
    for gi in range(G):
        for ci in range(cg):
            c = gi * cg + ci
            fwd_consts(gcnt[gi], gmu[gi], gm2[gi], eps, w[c], b[c],
                       mean + n * G + gi, var + n * G + gi, rstd + n * G + gi, k3, act)
            kk[c] = k3[0]
            kk[C + c] = k3[1]
            kk[2 * C + c] = k3[2]
    if y == NULL:
        return
    cdef floating* kx = kk + 3 * C  # extended constants for the spans: 3·(C + 16)
    cdef Py_ssize_t e = C + 16
    if dat is not double:
        for c in range(e):
            kx[c] = kk[c % C]
            kx[e + c] = kk[C + c % C]
            kx[2 * e + c] = kk[2 * C + c % C]
    # prefetch the next sample's first statistics block while normalizing this one
    cl_norm_rows(xs, y + n * S * C, 0, S, C, kk, kx, xs + S * C, (rbs if rbs < S else S) * C, act)


cdef void cls_bwd_unit(const dat* g, const dat* x, dat* dx,
                       Py_ssize_t N, Py_ssize_t S, Py_ssize_t C, Py_ssize_t cg, Py_ssize_t sbs,
                       Py_ssize_t sb, const floating* mean, const floating* rstd, const floating* w,
                       double* pw, double* pb, double* scratch, floating* kk) noexcept nogil:
    """Samples of sample block sb; scratch: 4·C doubles, kk: 4·C constants + 4·(C + 16) of scratch."""
    cdef Py_ssize_t G = C // cg, gi, ci, c, r, n, n1
    cdef double* sg = scratch
    cdef double* sgx = scratch + C
    cdef double* colm = scratch + 2 * C
    cdef double* sx = scratch + 3 * C
    cdef double mu, rr, m = <double>(S * cg), swg, swgx, dl, d
    cdef floating k4[4]
    cdef const dat* pg
    cdef const dat* px
    cdef double gv
    n1 = (sb + 1) * sbs if (sb + 1) * sbs < N else N
    for n in range(sb * sbs, n1):
        for gi in range(G):
            for ci in range(cg):
                colm[gi * cg + ci] = mean[n * G + gi]
        cl_rows_grad(g + n * S * C, x + n * S * C, S, C, colm, sg, sgx, sx)
        for gi in range(G):
            mu = mean[n * G + gi]
            rr = rstd[n * G + gi]
            swg = 0.0
            swgx = 0.0
            dl = 0.0
            for ci in range(cg):
                dl += sx[gi * cg + ci]
            dl = dl / m  # re-centre on the group's exact mean (see recentre)
            for ci in range(cg):
                c = gi * cg + ci
                sgx[c] -= dl * sg[c]
                swg += <double>w[c] * sg[c]
                swgx += <double>w[c] * sgx[c]
                pb[c] += sg[c]
                pw[c] += sgx[c] * rr
            for ci in range(cg):
                c = gi * cg + ci
                bwd_consts(mu, dl, <double>w[c] * rr, -rr * rr * rr * swgx / m, -rr * swg / m, k4)
                kk[c] = k4[0]
                kk[C + c] = k4[1]
                kk[2 * C + c] = k4[2]
                kk[3 * C + c] = k4[3]
        if dx == NULL:
            continue
        if dat is not double:
            for c in range(C + 16):
                kk[4 * C + c] = kk[c % C]
                kk[5 * C + 16 + c] = kk[C + c % C]
                kk[6 * C + 32 + c] = kk[2 * C + c % C]
                kk[7 * C + 48 + c] = kk[3 * C + c % C]
        cl_dx_rows(g + n * S * C, x + n * S * C, dx + n * S * C, 0, S, C, kk, kk + 4 * C)


cdef inline void add_rows(const dat* x, const dat* r, dat* h, Py_ssize_t n) noexcept nogil:
    """h = x + r over n values (float for half data, then rounded: PyTorch's x + residual)."""
    cdef Py_ssize_t i
    if dat is double:
        for i in range(n):
            h[i] = x[i] + r[i]
    else:
        cn_add_run(x, r, h, n)


cdef void ln_fwd_units(const dat* x, dat* y, Py_ssize_t C, Py_ssize_t cg, Py_ssize_t lo,
                       Py_ssize_t hi, double eps, const float* w, const float* b,
                       float* mean, float* var, float* rstd, bint rms, int act=ACT_NONE,
                       const dat* r=NULL, dat* h=NULL) noexcept nogil:
    """Units [lo, hi) of a float32/half S == 1 problem (LayerNorm rows), as grp_fwd_unit
    (same arithmetic), eight rows at a time: the statistics of eight rows, then
    their eight independent sqrt/div chains, then their normalization — short
    rows are otherwise bound by one row's latency chain.

    With r (the fused residual add, S == 1 with G == 1): the eight rows of
    h = x + r are written first, then normalized from h while in cache."""
    cdef double mu8[8]
    cdef double m28[8]
    cdef double v8[8]
    cdef double r8[8]
    cdef Py_ssize_t G = C // cg, u0 = lo, u, j, nb, c0
    cdef float mh
    cdef int bad
    cdef const dat* xs = x
    while u0 < hi:
        nb = hi - u0 if hi - u0 < 8 else 8
        if r != NULL:
            add_rows(x + u0 * cg, r + u0 * cg, h + u0 * cg, nb * cg)
            xs = h
        if rms:  # RMSNorm: Σx² about 0
            for j in range(nb):
                mu8[j] = 0.0
                rms_stats(xs + (u0 + j) * cg, cg, &m28[j])
        elif cg <= CN_SHORT_MAX:  # the eight rows' statistics interleaved (rows.hpp)
            if dat is not double:
                bad = cn_short_rows_stats(xs + u0 * cg, cg, <int>nb, mu8, m28)
            else:
                bad = (1 << nb) - 1
            for j in range(nb):
                if bad & (1 << j):
                    run_stats(xs + (u0 + j) * cg, cg, &mu8[j], &m28[j])
        else:
            for j in range(nb):
                u = u0 + j
                if not row_stats_f(xs + u * cg, cg, &mu8[j], &m28[j]):
                    run_stats(xs + u * cg, cg, &mu8[j], &m28[j])
        for j in range(nb):
            v8[j] = m28[j] / <double>cg
            r8[j] = 1.0 / sqrt(v8[j] + eps)
        for j in range(nb):
            u = u0 + j
            mean[u] = <float>mu8[j]
            var[u] = <float>v8[j]
            rstd[u] = <float>r8[j]
            if y != NULL:
                c0 = (u % G) * cg
                mh = <float>mu8[j]
                if dat is not double:
                    cn_ln_fwd(xs + u * cg, y + u * cg, cg, mh, <float>(mu8[j] - <double>mh) if act == ACT_NONE else 0,
                              <float>r8[j], w + c0, b + c0, act)
        u0 += nb


cdef void grp_fwd(const dat* x, dat* y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                  Py_ssize_t G, bint cl, Py_ssize_t rbs, double eps, const floating* w, const floating* b,
                  floating* mean, floating* var, floating* rstd,
                  double* scratch, Py_ssize_t sstride, floating* kk, int nt, bint rms=False,
                  int act=ACT_NONE, const dat* r=NULL, dat* h=NULL) noexcept nogil:
    """r (the fused residual add, S == 1 rows only): each row of h = x + r is
    written, then normalized from h while in cache (a row is a unit)."""
    cdef Py_ssize_t t, lo, hi, u, cg = C // G
    cdef Py_ssize_t nu = N if cl else N * G
    if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
        for t in range(nt):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            if dat is not double:
                if S == 1 and not cl:
                    ln_fwd_units(x, y, C, cg, lo, hi, eps, <const float*>w, <const float*>b,
                                 <float*>mean, <float*>var, <float*>rstd, rms, act, r, h)
                    continue
            for u in range(lo, hi):
                if cl:
                    cls_fwd_unit(x, y, S, C, cg, rbs, u, eps, w, b, mean, var, rstd,
                                 scratch + t * sstride, kk + t * (6 * C + 48), act)
                elif r != NULL:
                    add_rows(x + u * cg, r + u * cg, h + u * cg, cg)
                    grp_fwd_unit(h, y, C, S, cg, u, eps, w, b, mean, var, rstd, rms, act)
                else:
                    grp_fwd_unit(x, y, C, S, cg, u, eps, w, b, mean, var, rstd, rms, act)
    else:
        for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            if dat is not double:
                if S == 1 and not cl:
                    ln_fwd_units(x, y, C, cg, lo, hi, eps, <const float*>w, <const float*>b,
                                 <float*>mean, <float*>var, <float*>rstd, rms, act, r, h)
                    hi = lo  # done: skip the per-unit loop
            for u in range(lo, hi):
                if cl:
                    cls_fwd_unit(x, y, S, C, cg, rbs, u, eps, w, b, mean, var, rstd,
                                 scratch + t * sstride, kk + t * (6 * C + 48), act)
                elif r != NULL:
                    add_rows(x + u * cg, r + u * cg, h + u * cg, cg)
                    grp_fwd_unit(h, y, C, S, cg, u, eps, w, b, mean, var, rstd, rms, act)
                else:
                    grp_fwd_unit(x, y, C, S, cg, u, eps, w, b, mean, var, rstd, rms, act)
            cn_sfence()  # order this thread's streaming stores before the join


cdef inline void zero_unit_partials(double* pw, double* pb, Py_ssize_t C, Py_ssize_t cg, Py_ssize_t G,
                                    bint cl, Py_ssize_t u) noexcept nogil:
    """Zero the dweight/dbias partials unit u alone adds into (so no serial pass
    over all nsb·C partials precedes the parallel region)."""
    cdef Py_ssize_t o = u * C if cl else (u // G) * C + (u % G) * cg
    cdef Py_ssize_t n = C if cl else cg, i
    for i in range(n):
        pw[o + i] = 0.0
        pb[o + i] = 0.0


cdef void sum_block_partials(double* pw, double* pb, Py_ssize_t nsb, Py_ssize_t C, void* dw, void* db,
                             bint f64, int nt) noexcept nogil:
    """dweight/dbias = the sample-block partials summed in block order, per
    channel (bit-identical for any thread count); channel ranges in parallel."""
    cdef Py_ssize_t t, lo, hi, k, c
    cdef double sw, sb
    for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
        lo = split_lo(C, nt, t)
        hi = split_lo(C, nt, t + 1)
        # blocks outer, channels inner (a channel-outer loop strides by C doubles)
        for k in range(1, nsb):
            for c in range(lo, hi):
                pw[c] += pw[k * C + c]
                pb[c] += pb[k * C + c]
        for c in range(lo, hi):
            sw = pw[c]
            sb = pb[c]
            if f64:
                (<double*>dw)[c] = sw
                (<double*>db)[c] = sb
            else:
                (<float*>dw)[c] = <float>sw
                (<float*>db)[c] = <float>sb


cdef void grp_bwd(const dat* g, const dat* x, dat* dx, Py_ssize_t N, Py_ssize_t C,
                  Py_ssize_t S, Py_ssize_t G, bint cl, Py_ssize_t sbs, Py_ssize_t nsb,
                  const floating* mean, const floating* rstd, const floating* w,
                  double* pw, double* pb, double* scratch, Py_ssize_t sstride, floating* kk,
                  int nt, bint rms=False, int act=ACT_NONE, const floating* bias=NULL, dat* gscr=NULL,
                  Py_ssize_t gstride=0, const dat* dh=NULL) noexcept nogil:
    """act: channels-first S > 1 only (grp_bwd_unit), gscr: gstride values per thread."""
    cdef Py_ssize_t t, lo, hi, u, cg = C // G
    cdef Py_ssize_t nu = nsb if cl else nsb * G
    if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
        for t in range(nt):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            for u in range(lo, hi):
                zero_unit_partials(pw, pb, C, cg, G, cl, u)
                if cl:
                    cls_bwd_unit(g, x, dx, N, S, C, cg, sbs, u, mean, rstd, w, pw + u * C, pb + u * C,
                                 scratch + t * sstride, kk + t * (8 * C + 64))
                else:
                    grp_bwd_unit(g, x, dx, N, C, S, cg, sbs, u, mean, rstd, w,
                                 pw + (u // G) * C, pb + (u // G) * C, scratch + t * sstride, rms,
                                 act, bias, gscr + t * gstride, dh)
    else:
        for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            for u in range(lo, hi):
                zero_unit_partials(pw, pb, C, cg, G, cl, u)
                if cl:
                    cls_bwd_unit(g, x, dx, N, S, C, cg, sbs, u, mean, rstd, w, pw + u * C, pb + u * C,
                                 scratch + t * sstride, kk + t * (8 * C + 64))
                else:
                    grp_bwd_unit(g, x, dx, N, C, S, cg, sbs, u, mean, rstd, w,
                                 pw + (u // G) * C, pb + (u // G) * C, scratch + t * sstride, rms,
                                 act, bias, gscr + t * gstride, dh)
            cn_sfence()  # order this thread's streaming stores before the join




# ------------------------------- per-sample, S == 1, long rows: column tiles --
# Rows (groups) of more than LN_FUSE_C values: sample blocks would need C-long
# dweight/dbias partials each. Phase 1 sums every row-group (n, g) in pieces of
# LN_PIECE values, LN_BATCH pieces per parallel step, merged in order into the
# group's 5 doubles (so one long row still runs on every thread; row-groups of
# one piece are summed in place, in one step); phase 2 runs
# over column tiles of LN_TILE in parallel, each walking all rows in order: dx
# of its columns, and their dweight/dbias written out directly. Pieces, tiles
# and the chunks of rows are positions: bit-identical for any thread count.
# Scratch: 5·N·G + 3·LN_BATCH doubles (96 KiB) and 3·LN_TILE per thread (48 KiB).

cdef inline void ln_piece(const dat* g, const dat* x, const floating* w, Py_ssize_t n, floating mu,
                          double* s3) noexcept nogil:
    """s3 = Σ w·g, Σ w·g·(x - mu), Σ (x - mu) over one piece."""
    cdef double ag[LANES]
    cdef double agx[LANES]
    cdef double ax[LANES]
    if dat is not double:
        cn_lnb_piece(g, x, <const float*>w, n, <float>mu, s3)
    else:
        lanes_zero(ag)
        lanes_zero(agx)
        lanes_zero(ax)
        wsums(g, x, w, n, mu, ag, agx, ax)
        s3[0] = lanes_total(ag)
        s3[1] = lanes_total(agx)
        s3[2] = lanes_total(ax)


cdef void ln_cols(const dat* g, const dat* x, dat* dx, Py_ssize_t N, Py_ssize_t C, Py_ssize_t nc,
                  Py_ssize_t nx, const floating* w, const double* rk, floating* dw, floating* db,
                  double* scr, const dat* dh) noexcept nogil:
    """Phase 2, one tile: columns [0, nc) from g, x, dx, w, dw, db (pointing at the
    tile's first column) of all N rows; rk: mu, dl, r, kb, kc per row (5 doubles);
    scr: 3·LN_TILE doubles."""
    cdef double* ab = scr
    cdef double* aw = scr + LN_TILE
    cdef double m4[4]
    cdef double dl4[4]
    cdef double r4[4]
    cdef const double* q
    cdef Py_ssize_t n, i, k, o
    cdef int rows
    cdef double mu, dl, r, kb, kc
    if dat is not double:
        cn_ln_bwd_cols(g, x, dx, C, N, nc, <const float*>w, rk, <float*>dw, <float*>db, ab, aw,
                       <float*>(scr + 2 * LN_TILE), <float*>(scr + 2 * LN_TILE) + LN_TILE, nx, dh)
    else:
        for i in range(nc):
            ab[i] = 0.0
            aw[i] = 0.0
        n = 0
        while n < N:  # rows_bwd's arithmetic, four rows at a time
            rows = <int>(N - n if N - n < 4 else 4)
            for k in range(rows):
                q = rk + 5 * (n + k)
                m4[k] = q[0]
                dl4[k] = q[1]
                r4[k] = q[2]
            # the column sums read g and x before dx is written (dx may be either)
            colsums(g + n * C, x + n * C, C, rows, nc, m4, dl4, r4, ab, aw)
            if dx != NULL:
                for k in range(rows):
                    q = rk + 5 * (n + k)
                    mu = q[0]
                    dl = q[1]
                    r = q[2]
                    kb = q[3]
                    kc = q[4]
                    o = (n + k) * C
                    if dh != NULL:  # the fused add-and-norm: dx = dh + the norm's dx (dx may be dh)
                        for i in range(nc):
                            dx[o + i] = ((w[i] * g[o + i]) * r + ((x[o + i] - mu) - dl) * kb + kc) + dh[o + i]
                    else:
                        for i in range(nc):
                            st(dx + (o + i), (w[i] * <floating>ld(g + (o + i))) * r
                               + ((<floating>ld(x + (o + i)) - mu) - dl) * kb + kc)
            n += rows
        for i in range(nc):
            dw[i] = <floating>aw[i]
            db[i] = <floating>ab[i]


cdef void ln_tiled_bwd(const dat* g, const dat* x, dat* dx, Py_ssize_t N, Py_ssize_t C, Py_ssize_t G,
                       const floating* mean, const floating* rstd, const floating* w,
                       floating* dw, floating* db, double* rk, double* slots, double* scratch,
                       int nt, bint rms=False, const dat* dh=NULL) noexcept nogil:
    """dx (unless NULL), dweight and dbias of a per-element-affine problem (S == 1).

    rk: 5·N·G doubles (per row-group, group-major: (g, n) at 5·(g·N + n)),
    slots: 3·LN_BATCH doubles, scratch: 3·LN_TILE doubles per thread.
    """
    cdef Py_ssize_t cg = C // G, npc = (cg + LN_PIECE - 1) // LN_PIECE
    cdef Py_ssize_t total = N * G * npc, ntile = (cg + LN_TILE - 1) // LN_TILE, nu = G * ntile
    cdef Py_ssize_t b0, nb, j, u, p, q, t, lo, hi, gi, k, c0, nc, off
    cdef int tt
    cdef double* s
    cdef double m = <double>cg, mu, r, dl, swg, swgx
    for q in range(5 * N * G):
        rk[q] = 0.0
    if npc == 1:
        # phase 1, row-groups of one piece: their sums straight into rk, in one
        # parallel region (every region waits for its slowest thread)
        tt = nt if total >= nt else <int>total
        for t in prange(tt, num_threads=tt, use_threads_if=tt > 1, schedule="static", chunksize=1):
            lo = split_lo(total, tt, t)
            hi = split_lo(total, tt, t + 1)
            for u in range(lo, hi):
                ln_piece(g + u * cg, x + u * cg, w + (u % G) * cg, cg, mean[u], rk + 5 * ((u % G) * N + u // G))
    # phase 1: piece sums in parallel, LN_BATCH at a time, merged in piece order
    b0 = total if npc == 1 else 0
    while b0 < total:
        nb = total - b0 if total - b0 < LN_BATCH else LN_BATCH
        tt = nt if nb >= nt else <int>nb
        for t in prange(tt, num_threads=tt, use_threads_if=tt > 1, schedule="static", chunksize=1):
            lo = split_lo(nb, tt, t)
            hi = split_lo(nb, tt, t + 1)
            for j in range(lo, hi):
                u = (b0 + j) // npc  # row-group n·G + g: its values start at u·cg
                p = (b0 + j) % npc * LN_PIECE
                off = u * cg + p
                ln_piece(g + off, x + off, w + (u % G) * cg + p, cg - p if cg - p < LN_PIECE else LN_PIECE,
                         mean[u], slots + 3 * j)
        for j in range(nb):
            u = (b0 + j) // npc
            s = rk + 5 * ((u % G) * N + u // G)
            s[0] += slots[3 * j]
            s[1] += slots[3 * j + 1]
            s[2] += slots[3 * j + 2]
        b0 += nb
    # per row-group: the re-centring and the dx constants
    for q in range(N * G):
        gi = q // N
        u = (q % N) * G + gi
        mu = mean[u]
        r = rstd[u]
        s = rk + 5 * q
        swg = s[0]
        swgx = s[1]
        dl = 0.0 if rms else recentre(m, s[2], swg, &swgx)  # (RMSNorm: centre exactly 0)
        s[0] = mu
        s[1] = dl
        s[2] = r
        s[3] = -r * r * r * swgx / m
        s[4] = 0.0 if rms else -r * swg / m
    # phase 2: column tiles in parallel
    tt = nt if nu >= nt else <int>nu
    for t in prange(tt, num_threads=tt, use_threads_if=tt > 1, schedule="static", chunksize=1):
        lo = split_lo(nu, tt, t)
        hi = split_lo(nu, tt, t + 1)
        for u in range(lo, hi):
            gi = u // ntile
            k = u % ntile * LN_TILE
            c0 = gi * cg + k
            nc = cg - k if cg - k < LN_TILE else LN_TILE
            ln_cols(g + c0, x + c0, dx if dx == NULL else dx + c0, N, C, nc, nc, w + c0,
                    rk + 5 * gi * N, dw + c0, db + c0, scratch + t * (3 * LN_TILE), dh if dh == NULL else dh + c0)
        cn_sfence()  # order this thread's streaming stores before the join
