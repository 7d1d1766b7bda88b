# ----------------------------------------------- cross-sample, channels-last --
# Rows of C channels; row block k is rows [k·rb, (k+1)·rb). Block partials are
# vectors over C, computed with one row at a time feeding C accumulators.

cdef inline bint cl_stats_f(const dat* x, Py_ssize_t nr, Py_ssize_t C,
                            double* m, double* q, double* ws) noexcept nogil:
    """Column statistics of a channels-last block in float (cl_stats.hpp, ws: 3·C
    doubles); False for float64 data or when a float sum overflowed."""
    if dat is double:
        return False
    else:
        return cn_cl_block_stats(x, nr, C, m, q, ws)


cdef inline bint row_stats_f(const dat* x, Py_ssize_t n, double* mu, double* m2) noexcept nogil:
    """Mean and M2 of one contiguous run in float lanes (rows.hpp); False for
    float64 data or when a float sum overflowed."""
    if dat is double:
        return False
    else:
        return cn_ln_row_stats(x, n, mu, m2)


cdef void cl_block_stats(const dat* x, Py_ssize_t nr, Py_ssize_t C,
                         double* m, double* q, double* fs) noexcept nogil:
    """Per-column mean m[C] and M2 q[C] of nr rows, two-pass (the block is in L2).

    float32 and half data: in float (cl_stats.hpp, fs: 3·C doubles of scratch),
    redone here in double only if a float sum overflowed. Four rows per
    update of the L1-resident column accumulators: their loads and stores,
    not the data, bound a row-at-a-time loop.
    """
    cdef Py_ssize_t r = 0, c
    cdef const dat* p
    cdef double d0, d1, d2, d3, mc, inv = 1.0 / <double>nr
    if cl_stats_f(x, nr, C, m, q, fs):
        return
    for c in range(C):
        m[c] = 0.0
        q[c] = ld(x + c)  # pivot: the first row (q is free until the second pass)
    while r + 4 <= nr:
        p = x + r * C
        for c in range(C):
            mc = q[c]
            m[c] += ((ld(p + c) - mc) + (ld(p + (c + C)) - mc)) + ((ld(p + (c + 2 * C)) - mc)
                                                                  + (ld(p + (c + 3 * C)) - mc))
        r += 4
    while r < nr:
        p = x + r * C
        for c in range(C):
            m[c] += ld(p + c) - q[c]
        r += 1
    for c in range(C):
        m[c] = q[c] + m[c] * inv
        q[c] = 0.0
    r = 0
    while r + 4 <= nr:
        p = x + r * C
        for c in range(C):
            mc = m[c]
            d0 = ld(p + c) - mc
            d1 = ld(p + (c + C)) - mc
            d2 = ld(p + (c + 2 * C)) - mc
            d3 = ld(p + (c + 3 * C)) - mc
            q[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        r += 4
    while r < nr:
        p = x + r * C
        for c in range(C):
            d0 = ld(p + c) - m[c]
            q[c] += d0 * d0
        r += 1


cdef void cl_rows_grad(const dat* g, const dat* x, Py_ssize_t nr, Py_ssize_t C, const double* mu,
                       double* sg, double* sgx, double* sx) noexcept nogil:
    """Per-column sg = Σg, sgx = Σg·(x-mu), sx = Σ(x-mu) over nr rows of C.

    float32/half: in float lanes (cl_stats.hpp) where it applies. Otherwise in
    double, four rows per update of the (L1-resident) column accumulators:
    their loads and stores, not the data, bound a row-at-a-time loop. The
    grouping counts from the first row, so results depend on positions only.
    """
    cdef Py_ssize_t r = 0, c
    cdef const dat* pg
    cdef const dat* px
    cdef double g0, g1, g2, g3, d0, d1, d2, d3, m
    if dat is not double:
        if cn_cl_grad(g, x, nr, C, mu, sg, sgx, sx):
            return
    for c in range(C):
        sg[c] = 0.0
        sgx[c] = 0.0
        sx[c] = 0.0
    while r + 4 <= nr:
        pg = g + r * C
        px = x + r * C
        for c in range(C):
            m = mu[c]
            g0 = ld(pg + c)
            g1 = ld(pg + (c + C))
            g2 = ld(pg + (c + 2 * C))
            g3 = ld(pg + (c + 3 * C))
            d0 = ld(px + c) - m
            d1 = ld(px + (c + C)) - m
            d2 = ld(px + (c + 2 * C)) - m
            d3 = ld(px + (c + 3 * C)) - m
            sg[c] += (g0 + g1) + (g2 + g3)
            sgx[c] += (g0 * d0 + g1 * d1) + (g2 * d2 + g3 * d3)
            sx[c] += (d0 + d1) + (d2 + d3)
        r += 4
    while r < nr:
        pg = g + r * C
        px = x + r * C
        for c in range(C):
            g0 = ld(pg + c)
            d0 = ld(px + c) - mu[c]
            sg[c] += g0
            sgx[c] += g0 * d0
            sx[c] += d0
        r += 1


cdef void cl_block_grad(const dat* g, const dat* x, dat* dx, Py_ssize_t nr,
                        Py_ssize_t C, const double* mu, const floating* dscale,
                        double* sg, double* sgx, double* sx) noexcept nogil:
    """Per-column Σg, Σg·(x-mu), Σ(x-mu) of nr rows; with dx, also dx = g·dscale."""
    cdef Py_ssize_t r, c
    cdef const dat* pg
    cdef dat* pd
    cl_rows_grad(g, x, nr, C, mu, sg, sgx, sx)
    if dx != NULL:
        for r in range(nr):
            pg = g + r * C
            pd = dx + r * C
            for c in range(C):
                st(pd + c, <floating>ld(pg + c) * dscale[c])


cdef inline void cl_row_norm(const double* x, double* y, Py_ssize_t C,
                             const double* mh, const double* a, const double* b, int act) noexcept nogil:
    """float64 channels-last row: y[c] = act((x[c] - mh[c])·a[c] + b[c])."""
    cdef Py_ssize_t c
    if act == ACT_NONE:
        for c in range(C):
            y[c] = (x[c] - mh[c]) * a[c] + b[c]
    else:
        for c in range(C):
            y[c] = act1((x[c] - mh[c]) * a[c] + b[c], act)


cdef inline void row_affine(const dat* x, dat* y, Py_ssize_t C, const floating* a,
                            const floating* b, int act=ACT_NONE) noexcept nogil:
    """y[c] = act(x[c]·a[c] + b[c])."""
    cdef Py_ssize_t c
    if dat is double:
        if act == ACT_NONE:
            for c in range(C):
                y[c] = x[c] * a[c] + b[c]
        else:
            for c in range(C):
                y[c] = act1(x[c] * a[c] + b[c], act)
    else:
        cn_row_affine(x, y, C, <const float*>a, <const float*>b, act)


cdef inline void cl_row_dx(const double* g, const double* x, double* dx, Py_ssize_t C,
                           const double* ka, const double* mh, const double* kb,
                           const double* kc) noexcept nogil:
    """float64 channels-last row: dx[c] = g[c]·ka[c] + (x[c] - mh[c])·kb[c] + kc[c]."""
    cdef Py_ssize_t c
    for c in range(C):
        dx[c] = g[c] * ka[c] + (x[c] - mh[c]) * kb[c] + kc[c]


cdef void cl_norm_rows(const dat* x, dat* y, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t C,
                       const floating* kk, const floating* kx,
                       const dat* pf=NULL, Py_ssize_t npf=0, int act=ACT_NONE) noexcept nogil:
    """Normalize rows [r0, r1) (and apply act), newest first (the stats pass left them in cache):
    float32 and half by spans of 16384 values (one stream each), float64 row by row.

    With ``pf``, the npf values from pf (the data of the next work) are
    prefetched toward L2 in equal shares before each span: memory keeps
    streaming while this core normalizes.
    """
    cdef Py_ssize_t rs, ch = 16384 // C if 16384 // C > 1 else 1, e = C + 16
    cdef Py_ssize_t share = npf // ((r1 - r0 + ch - 1) // ch) + 1 if pf != NULL and r1 > r0 else 0
    if dat is not double:
        while r1 > r0:
            if share:
                cn_prefetch_l2(pf, share * sizeof(dat))
                pf += share
            rs = r1 - ch if r1 - ch > r0 else r0
            cn_cl_norm_span(x + rs * C, y + rs * C, (r1 - rs) * C, C, <const float*>kx,
                            <const float*>kx + e, <const float*>kx + 2 * e, act)
            r1 = rs
    else:
        while r1 > r0:
            r1 = r1 - 1
            if dat is double and floating is double:
                cl_row_norm(x + r1 * C, y + r1 * C, C, kk, kk + C, kk + 2 * C, act)


cdef void cl_dx_rows(const dat* g, const dat* x, dat* dx, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t C,
                     const floating* kk, const floating* kx) noexcept nogil:
    """dx of rows [r0, r1), newest first; by spans but for float64 (see cl_norm_rows)."""
    cdef Py_ssize_t rs, ch = 16384 // C if 16384 // C > 1 else 1, e = C + 16
    if dat is not double:
        while r1 > r0:
            rs = r1 - ch if r1 - ch > r0 else r0
            cn_cl_dx_span(g + rs * C, x + rs * C, dx + rs * C, (r1 - rs) * C, C, <const float*>kx,
                          <const float*>kx + e, <const float*>kx + 2 * e, <const float*>kx + 3 * e)
            r1 = rs
    else:
        while r1 > r0:
            r1 = r1 - 1
            if dat is double and floating is double:
                cl_row_dx(g + r1 * C, x + r1 * C, dx + r1 * C, C, kk, kk + C, kk + 2 * C, kk + 3 * C)


cdef void cl_fold_fwd(Py_ssize_t R, Py_ssize_t C, Py_ssize_t rb, Py_ssize_t nblk, Py_ssize_t j,
                      const double* part, double eps, const floating* w, const floating* b,
                      floating* mean, floating* var, floating* rstd, floating* kk,
                      int act) noexcept nogil:
    """Merge the row-block partials of channels [j·CFOLD, (j+1)·CFOLD) in block order."""
    cdef Py_ssize_t c, k, r0, r1, c0 = j * CFOLD, c1 = (j + 1) * CFOLD if (j + 1) * CFOLD < C else C
    cdef double mu, d, nk
    cdef double s[CFOLD]
    cdef double m2[CFOLD]
    cdef floating k3[3]
    # Two-level merge, no division per block: mean = m_0 + Σ n_k·(m_k - m_0) / R
    # (relative to the first block's mean, so |mean| ≫ std loses nothing), then
    # M2 = Σ q_k + Σ n_k·(m_k - mean)² (each term centred: no cancellation).
    # Blocks outer, channels inner: the partials are read row by row (a
    # channel-outer loop strides by 2·C doubles and thrashes one L1 set).
    for c in range(c0, c1):
        s[c - c0] = 0.0
        m2[c - c0] = 0.0
    for k in range(nblk):
        r0 = k * rb
        r1 = r0 + rb if r0 + rb < R else R
        nk = <double>(r1 - r0)
        for c in range(c0, c1):
            s[c - c0] += nk * (part[2 * k * C + c] - part[c])
    for c in range(c0, c1):
        s[c - c0] = part[c] + s[c - c0] / <double>R  # the mean
    for k in range(nblk):
        r0 = k * rb
        r1 = r0 + rb if r0 + rb < R else R
        nk = <double>(r1 - r0)
        for c in range(c0, c1):
            d = part[2 * k * C + c] - s[c - c0]
            m2[c - c0] += part[(2 * k + 1) * C + c] + nk * d * d
    for c in range(c0, c1):
        fwd_consts(<double>R, s[c - c0], m2[c - c0], eps, w[c], b[c], mean + c, var + c, rstd + c, k3, act)
        kk[c] = k3[0]
        kk[C + c] = k3[1]
        kk[2 * C + c] = k3[2]


cdef void cl_fold_bwd(Py_ssize_t R, Py_ssize_t C, Py_ssize_t nblk, Py_ssize_t j, const double* part,
                      int mode, const double* mud, const floating* rstd, const floating* w,
                      const floating* mdy, const floating* mdyx,
                      floating* oa, floating* ob, floating* kk) noexcept nogil:
    """Sum the row-block gradient partials of channels [j·CFOLD, ...) in block order."""
    cdef Py_ssize_t c, k, c0 = j * CFOLD, c1 = (j + 1) * CFOLD if (j + 1) * CFOLD < C else C
    cdef double sg, sgx, sx, mu, dl
    cdef double ag[CFOLD]
    cdef double agx[CFOLD]
    cdef double ax[CFOLD]
    cdef floating k4[4]
    for c in range(c0, c1):
        ag[c - c0] = 0.0
        agx[c - c0] = 0.0
        ax[c - c0] = 0.0
    if mode != MODE_APPLY:
        # blocks outer, channels inner (see cl_fold_fwd); same order of additions per channel
        for k in range(nblk):
            for c in range(c0, c1):
                ag[c - c0] += part[3 * k * C + c]
                agx[c - c0] += part[(3 * k + 1) * C + c]
                ax[c - c0] += part[(3 * k + 2) * C + c]
    for c in range(c0, c1):
        dl = 0.0
        sg = ag[c - c0]
        sgx = agx[c - c0]
        sx = ax[c - c0]
        mu = mud[c]
        if mode == MODE_TRAIN:
            dl = recentre(<double>R, sx, sg, &sgx)
        cross_bwd_consts(mode, <double>R, sg, sgx, mu, dl, rstd[c], w[c], mdy, mdyx, c, oa, ob, k4)
        if mode == MODE_TRAIN or mode == MODE_APPLY:
            kk[c] = k4[0]
            kk[C + c] = k4[1]
            kk[2 * C + c] = k4[2]
            kk[3 * C + c] = k4[3]


cdef void cl_cross_fwd(const dat* x, dat* y, Py_ssize_t R, Py_ssize_t C,
                       Py_ssize_t rb, Py_ssize_t nblk, double* part, double eps,
                       const floating* w, const floating* b,
                       floating* mean, floating* var, floating* rstd, floating* kk, double* fscr,
                       int nt, int act=ACT_NONE) noexcept nogil:
    """part: 2·nblk·C doubles; kk: 3·C constants laid out (mean_hi[C], a[C], b'[C]),
    then 3·(C + 16) of scratch; fscr: 3·C doubles per thread."""
    cdef Py_ssize_t t, lo, hi, k, r0, r1, j, c, nf = (C + CFOLD - 1) // CFOLD
    if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
        for t in range(nt):
            lo = split_lo(nblk, nt, t)
            hi = split_lo(nblk, nt, t + 1)
            for k in range(lo, hi):
                r0 = k * rb
                r1 = r0 + rb if r0 + rb < R else R
                cl_block_stats(x + r0 * C, r1 - r0, C, part + 2 * k * C, part + (2 * k + 1) * C,
                               fscr + t * 3 * C)
    else:
        for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
            lo = split_lo(nblk, nt, t)
            hi = split_lo(nblk, nt, t + 1)
            for k in range(lo, hi):
                r0 = k * rb
                r1 = r0 + rb if r0 + rb < R else R
                cl_block_stats(x + r0 * C, r1 - r0, C, part + 2 * k * C, part + (2 * k + 1) * C,
                               fscr + t * 3 * C)
            cn_sfence()  # order this thread's streaming stores before the join
    if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
        for j in range(nf):
            cl_fold_fwd(R, C, rb, nblk, j, part, eps, w, b, mean, var, rstd, kk, act)
    else:
        for j in prange(nf, num_threads=nt, use_threads_if=nt > 1 and nf > 1, schedule="static"):
            cl_fold_fwd(R, C, rb, nblk, j, part, eps, w, b, mean, var, rstd, kk, act)
    if y == NULL:
        return
    cdef floating* kx = kk + 3 * C  # extended constants (float32 spans), 3·(C + 16)
    cdef Py_ssize_t e = C + 16
    for c in range(e):
        kx[c] = kk[c % C]
        kx[e + c] = kk[C + c % C]
        kx[2 * e + c] = kk[2 * C + c % C]
    if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
        for t in range(nt):
            lo = split_lo(nblk, nt, t)
            hi = split_lo(nblk, nt, t + 1)
            cl_norm_rows(x, y, lo * rb, hi * rb if hi * rb < R else R, C, kk, kx, NULL, 0, act)
    else:
        for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
            lo = split_lo(nblk, nt, t)
            hi = split_lo(nblk, nt, t + 1)
            cl_norm_rows(x, y, lo * rb, hi * rb if hi * rb < R else R, C, kk, kx, NULL, 0, act)
            cn_sfence()  # order this thread's streaming stores before the join


cdef void cl_cross_bwd(const dat* g, const dat* x, dat* dx, Py_ssize_t R, Py_ssize_t C,
                       Py_ssize_t rb, Py_ssize_t nblk, double* part, int mode,
                       const floating* mean, const floating* rstd, const floating* w,
                       const floating* mdy, const floating* mdyx,
                       floating* oa, floating* ob, floating* kk, double* mud, int nt) noexcept nogil:
    """part: 3·nblk·C doubles; kk: 4·C constants (ka, mean_hi, kb, kc'), then 4·(C + 16) of
    scratch; mud: C doubles."""
    cdef Py_ssize_t t, lo, hi, k, r0, r1, c, j, nf = (C + CFOLD - 1) // CFOLD
    for c in range(C):
        mud[c] = mean[c]
        kk[c] = <floating>(<double>w[c] * <double>rstd[c])  # dx scale for MODE_EVAL
    if mode != MODE_APPLY:
        if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
            for t in range(nt):
                lo = split_lo(nblk, nt, t)
                hi = split_lo(nblk, nt, t + 1)
                for k in range(lo, hi):
                    r0 = k * rb
                    r1 = r0 + rb if r0 + rb < R else R
                    cl_block_grad(g + r0 * C, x + r0 * C, dx + r0 * C if mode == MODE_EVAL else NULL,
                                  r1 - r0, C, mud, kk, part + 3 * k * C, part + (3 * k + 1) * C,
                                  part + (3 * k + 2) * C)
        else:
            for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
                lo = split_lo(nblk, nt, t)
                hi = split_lo(nblk, nt, t + 1)
                for k in range(lo, hi):
                    r0 = k * rb
                    r1 = r0 + rb if r0 + rb < R else R
                    cl_block_grad(g + r0 * C, x + r0 * C, dx + r0 * C if mode == MODE_EVAL else NULL,
                                  r1 - r0, C, mud, kk, part + 3 * k * C, part + (3 * k + 1) * C,
                                  part + (3 * k + 2) * C)
                cn_sfence()  # order this thread's streaming stores before the join
    if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
        for j in range(nf):
            cl_fold_bwd(R, C, nblk, j, part, mode, mud, rstd, w, mdy, mdyx, oa, ob, kk)
    else:
        for j in prange(nf, num_threads=nt, use_threads_if=nt > 1 and nf > 1, schedule="static"):
            cl_fold_bwd(R, C, nblk, j, part, mode, mud, rstd, w, mdy, mdyx, oa, ob, kk)
    if mode != MODE_TRAIN and mode != MODE_APPLY:
        return
    cdef floating* kx = kk + 4 * C  # extended constants (float32 spans), 4·(C + 16)
    cdef Py_ssize_t e = C + 16
    for c in range(e):
        kx[c] = kk[c % C]
        kx[e + c] = kk[C + c % C]
        kx[2 * e + c] = kk[2 * C + c % C]
        kx[3 * e + c] = kk[3 * C + c % C]
    if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
        for t in range(nt):
            lo = split_lo(nblk, nt, t)
            hi = split_lo(nblk, nt, t + 1)
            cl_dx_rows(g, x, dx, lo * rb, hi * rb if hi * rb < R else R, C, kk, kx)
    else:
        for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
            lo = split_lo(nblk, nt, t)
            hi = split_lo(nblk, nt, t + 1)
            cl_dx_rows(g, x, dx, lo * rb, hi * rb if hi * rb < R else R, C, kk, kx)
            cn_sfence()  # order this thread's streaming stores before the join


