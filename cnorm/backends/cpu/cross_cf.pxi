# ---------------------------------------------- cross-sample, channels-first --
# Channel c's values are N runs of S. A block is rows [r0, r1) × s in [s0, s1):
# rb rows of whole runs when S <= BLK, else one row piece of length sp.

cdef inline void cf_block(Py_ssize_t N, Py_ssize_t S, Py_ssize_t rb, Py_ssize_t sp, Py_ssize_t nsp,
                          Py_ssize_t k, Py_ssize_t* r0, Py_ssize_t* r1,
                          Py_ssize_t* s0, Py_ssize_t* s1) noexcept nogil:
    r0[0] = (k // nsp) * rb
    r1[0] = r0[0] + rb if r0[0] + rb < N else N
    s0[0] = (k % nsp) * sp
    s1[0] = s0[0] + sp if s0[0] + sp < S else S


# Prefetch cursor over the next channel of a fused channels-first forward: its
# N runs of S elements in the order its statistics will read them. The current
# channel's statistics sweep (from memory) advances it by a quarter of what it
# reads, its normalization sweep (from L2, streaming stores) by three quarters,
# so memory keeps reading x while this core computes or writes: the reads of
# channel c + 1 overlap all of channel c's work (both channels fit in the
# per-core L2 together). A third per sweep (written for two-pass statistics)
# left half of the next channel to its own one-pass sweep: the whole channel
# ahead measured 1.12 (float32) to 1.22 (bfloat16) faster, and a quarter/three
# quarters split beat the even one and all-in-one-sweep. The fused backward
# advances two cursors (dy and x of the next channel) by what fits beside the
# current channel, half during the gradient sums and half during dx (1.03-1.07
# over all during dx, half data). Toward L2 (prefetcht1): toward L1 the next
# channel evicted the lines the current sweep was about to read (backward 3-10%
# slower, not faster). A hint only: no value depends on it.
ctypedef struct PfCur:
    const char* base    # first run of the next channel
    Py_ssize_t run      # bytes of a run
    Py_ssize_t stride   # bytes between runs (C·S elements)
    Py_ssize_t nrun     # runs (N)
    Py_ssize_t r        # next run to prefetch
    Py_ssize_t off      # next byte within it


cdef inline void pf_init(PfCur* p, const char* base, Py_ssize_t N, Py_ssize_t S, Py_ssize_t C,
                         Py_ssize_t item) noexcept nogil:
    """A cursor at the start of the channel whose first run is at ``base``."""
    p.base = base
    p.run = S * item
    p.stride = C * S * item
    p.nrun = N
    p.r = 0
    p.off = 0


cdef inline void pf_step2(PfCur* p, Py_ssize_t nb) noexcept nogil:
    """pf_step on two cursors (dy and x of the next channel)."""
    pf_step(p, nb)
    pf_step(p + 1, nb)


cdef inline void pf_step(PfCur* p, Py_ssize_t nb) noexcept nogil:
    cdef Py_ssize_t m
    while nb > 0 and p.r < p.nrun:
        m = p.run - p.off if nb > p.run - p.off else nb
        cn_prefetch_l2(p.base + p.r * p.stride + p.off, m)
        p.off += m
        nb -= m
        if p.off >= p.run:
            p.off = 0
            p.r += 1


cdef inline void run_sums(const dat* x, Py_ssize_t n, float p, double* sq, double* s) noexcept nogil:
    """*sq = Σ(x - p)², *s = Σ(x - p) of one run in float lanes (float32 and half data:
    the row statistics' lanes, rows.hpp)."""
    if dat is not double:
        cn_row_lanes(x, n, p, 1, sq, s)


cdef inline float pivot16(const dat* x) noexcept nogil:
    if dat is double:
        return 0.0
    else:
        return cn_pivot16(x)


cdef enum:
    RUN_SUM = 0   # acc lanes += x - c
    RUN_SQ = 1    # acc lanes += (x - c)²
    RUN_BOTH = 2  # acc[0] += Σ(x - c)², acc[1] += Σ(x - c) (float lanes, run_sums)


cdef inline void run_pf(const dat* x, Py_ssize_t n, int what, double c, double* acc,
                        PfCur* pf) noexcept nogil:
    """One run of a channels-first block statistic in pieces of PF_CH, with a prefetch
    step of the next channel between pieces. The pieces depend on n alone, prefetching
    or not: half data's float chunks restart at each piece, and whether a thread has a
    next channel to prefetch depends on the thread count."""
    cdef Py_ssize_t i = 0, m
    cdef double qr, sr
    while i < n:
        m = PF_CH if n - i >= 2 * PF_CH else n - i
        if what == RUN_SUM:
            sum_run(x + i, m, c, acc)
        elif what == RUN_SQ:
            sq_run(x + i, m, c, acc)
        else:
            run_sums(x + i, m, <float>c, &qr, &sr)
            acc[0] += qr
            acc[1] += sr
        if pf != NULL:
            pf_step(pf, m * sizeof(dat) * PF_STATS_Q // 4)
        i += m


cdef bint cf_block_stats_1p(const dat* x, Py_ssize_t C, Py_ssize_t S, Py_ssize_t c,
                            Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t s0, Py_ssize_t s1,
                            double* out, PfCur* pf) noexcept nogil:
    """cf_block_stats in one pass around the mean of the block's first 16 values
    (see CN_ONEPASS_MAX in cl_stats.hpp); False where that is less exact than two
    passes (or a float sum overflowed, or the data are float64): out unspecified."""
    cdef Py_ssize_t r, n = s1 - s0
    cdef double qs[2]
    cdef double q, s, cnt, d, m2
    cdef float p
    if dat is double or n < 16:
        return False
    p = pivot16(x + ((r0 * C + c) * S + s0))
    qs[0] = 0.0
    qs[1] = 0.0
    for r in range(r0, r1):
        run_pf(x + ((r * C + c) * S + s0), n, RUN_BOTH, p, qs, pf)
    q = qs[0]
    s = qs[1]
    if q * 0.0 + s * 0.0 != 0.0:
        return False
    cnt = <double>((r1 - r0) * n)
    d = s / cnt
    m2 = q - s * d
    if not q <= CN_ONEPASS_MAX * m2:
        return False
    out[0] = cnt
    out[1] = <double>p + d
    out[2] = m2
    return True


cdef void cf_block_stats(const dat* x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                         Py_ssize_t rb, Py_ssize_t sp, Py_ssize_t nsp, Py_ssize_t c, Py_ssize_t k,
                         double* out, PfCur* pf=NULL) noexcept nogil:
    """out = (count, mean, M2) of block k of channel c: one pass where as exact, else two."""
    cdef double acc[LANES]
    cdef Py_ssize_t r0, r1, s0, s1, r
    cdef double cnt, mu, piv
    cf_block(N, S, rb, sp, nsp, k, &r0, &r1, &s0, &s1)
    if cf_block_stats_1p(x, C, S, c, r0, r1, s0, s1, out, pf):
        return
    piv = ld(x + ((r0 * C + c) * S + s0))
    lanes_zero(acc)
    for r in range(r0, r1):
        run_pf(x + (r * C + c) * S + s0, s1 - s0, RUN_SUM, piv, acc, pf)
    cnt = <double>((r1 - r0) * (s1 - s0))
    mu = piv + lanes_total(acc) / cnt
    lanes_zero(acc)
    for r in range(r0, r1):
        run_pf(x + (r * C + c) * S + s0, s1 - s0, RUN_SQ, mu, acc, pf)
    out[0] = cnt
    out[1] = mu
    out[2] = lanes_total(acc)


cdef void cf_block_norm(const dat* x, dat* y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                        Py_ssize_t rb, Py_ssize_t sp, Py_ssize_t nsp, Py_ssize_t c, Py_ssize_t k,
                        const floating* kk, int act) noexcept nogil:
    cdef Py_ssize_t r0, r1, s0, s1, r, off
    cf_block(N, S, rb, sp, nsp, k, &r0, &r1, &s0, &s1)
    r = r1
    while r > r0:  # newest rows first: they are the ones still in cache
        r -= 1
        off = (r * C + c) * S + s0
        norm_run(x + off, y + off, s1 - s0, kk[0], kk[1], kk[2], act)


cdef void cf_channel_fwd(const dat* x, dat* y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                         Py_ssize_t rb, Py_ssize_t sp, Py_ssize_t nsp, Py_ssize_t nblk,
                         Py_ssize_t c, Py_ssize_t cn, const double* part, bint have_part, double eps,
                         const floating* w, const floating* b,
                         floating* mean, floating* var, floating* rstd, floating* kk,
                         int act) noexcept nogil:
    """Fold channel c's block partials in block order, then normalize it (and apply act).

    With have_part the partials come from ``part`` (split path); otherwise
    they are computed here, block by block, so the channel stays in cache.
    """
    cdef double cnt = 0.0, mu = 0.0, m2 = 0.0
    cdef double blk[3]
    cdef Py_ssize_t k
    cdef PfCur pf
    cdef PfCur* pfp = NULL
    if cn >= 0 and y != NULL and not have_part:
        pf_init(&pf, <const char*>(x + cn * S), N, S, C, sizeof(dat))
        pfp = &pf
    for k in range(nblk):
        if have_part:
            memcpy(blk, part + 3 * (c * nblk + k), 3 * sizeof(double))
        else:
            cf_block_stats(x, N, C, S, rb, sp, nsp, c, k, blk, pfp)
        chan_merge(&cnt, &mu, &m2, blk[0], blk[1], blk[2])
    fwd_consts(cnt, mu, m2, eps, w[c], b[c], mean + c, var + c, rstd + c, kk + 3 * c, act)
    if y != NULL and not have_part:
        cf_channel_norm(x, y, N, C, S, sp, nsp, c, pfp, kk + 3 * c, act)


cdef void cf_channel_norm(const dat* x, dat* y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                          Py_ssize_t sp, Py_ssize_t nsp, Py_ssize_t c, PfCur* pf,
                          const floating* kk, int act) noexcept nogil:
    """Normalize channel c (its statistics just read it into L2), newest runs first.

    With a prefetch cursor, runs are normalized in pieces of about PF_CH
    elements, each followed by a prefetch step (see PfCur); the pieces change
    no value (elementwise), and the first ends at a 64-byte boundary of y so
    the others stream whole lines.
    """
    cdef Py_ssize_t q = N * nsp, s0, n, off, i, m, h
    while q > 0:  # newest (row, piece) first: they are the ones still in cache
        q -= 1
        s0 = (q % nsp) * sp
        n = sp if s0 + sp < S else S - s0
        off = ((q // nsp) * C + c) * S + s0
        if pf == NULL:
            norm_run(x + off, y + off, n, kk[0], kk[1], kk[2], act)
            continue
        h = ((64 - (<size_t>(y + off)) % 64) % 64) // sizeof(dat)
        i = 0
        while i < n:
            m = h + PF_CH
            if n - i - m < PF_CH:  # no short last piece (it would not stream)
                m = n - i
            norm_run(x + off + i, y + off + i, m, kk[0], kk[1], kk[2], act)
            pf_step(pf, m * sizeof(dat) * PF_NORM_Q // 4)
            i += m
            h = 0


cdef void cf_cross_fwd(const dat* x, dat* y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                       Py_ssize_t rb, Py_ssize_t sp, Py_ssize_t nsp, Py_ssize_t nblk, bint fused,
                       double* part, double eps, const floating* w, const floating* b,
                       floating* mean, floating* var, floating* rstd, floating* kk, int nt,
                       int act=ACT_NONE) noexcept nogil:
    cdef Py_ssize_t t, lo, hi, c, u, nu = C * nblk
    if fused:
        if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
            for t in range(nt):
                lo = split_lo(C, nt, t)
                hi = split_lo(C, nt, t + 1)
                for c in range(lo, hi):
                    cf_channel_fwd(x, y, N, C, S, rb, sp, nsp, nblk, c, c + 1 if c + 1 < hi else -1,
                                   part, False, eps, w, b,
                                   mean, var, rstd, kk, act)
        else:
            for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
                lo = split_lo(C, nt, t)
                hi = split_lo(C, nt, t + 1)
                for c in range(lo, hi):
                    cf_channel_fwd(x, y, N, C, S, rb, sp, nsp, nblk, c, c + 1 if c + 1 < hi else -1,
                                   part, False, eps, w, b,
                                   mean, var, rstd, kk, act)
                cn_sfence()  # order this thread's streaming stores before the join
        return
    # Split path: (channel, block) units in parallel, then fold, then normalize.
    if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
        for t in range(nt):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            for u in range(lo, hi):
                cf_block_stats(x, N, C, S, rb, sp, nsp, u // nblk, u % nblk, part + 3 * u)
    else:
        for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            for u in range(lo, hi):
                cf_block_stats(x, N, C, S, rb, sp, nsp, u // nblk, u % nblk, part + 3 * u)
            cn_sfence()  # order this thread's streaming stores before the join
    for c in range(C):
        cf_channel_fwd(x, NULL, N, C, S, rb, sp, nsp, nblk, c, -1, part, True, eps, w, b,
                       mean, var, rstd, kk, act)
    if y == NULL:
        return
    if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
        for t in range(nt):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            u = hi
            while u > lo:
                u = u - 1
                cf_block_norm(x, y, N, C, S, rb, sp, nsp, u // nblk, u % nblk, kk + 3 * (u // nblk), act)
    else:
        for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            u = hi
            while u > lo:
                u = u - 1
                cf_block_norm(x, y, N, C, S, rb, sp, nsp, u // nblk, u % nblk, kk + 3 * (u // nblk), act)
            cn_sfence()  # order this thread's streaming stores before the join


cdef void cf_block_grad(const dat* g, Py_ssize_t gs, const dat* x, dat* dx,
                        Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                        Py_ssize_t rb, Py_ssize_t sp, Py_ssize_t nsp, Py_ssize_t c, Py_ssize_t k,
                        double mu, floating dscale, double* out, PfCur* pf=NULL,
                        double pf_frac=0.0) noexcept nogil:
    """out = (Σg, Σg·(x-mu), Σ(x-mu)) over block k of channel c; with dx, also dx = g·dscale.
    g points at channel c's first run, its runs gs apart (C·S in dy; S in a channel's
    scratch). With cursors (pf[0] in dy, pf[1] in x), each row is followed by a
    prefetch step of pf_frac times its bytes in both."""
    cdef double ag[LANES]
    cdef double agx[LANES]
    cdef double ax[LANES]
    cdef Py_ssize_t r0, r1, s0, s1, r, off, goff, nb
    cf_block(N, S, rb, sp, nsp, k, &r0, &r1, &s0, &s1)
    nb = <Py_ssize_t>(pf_frac * <double>((s1 - s0) * sizeof(dat)))
    lanes_zero(ag)
    lanes_zero(agx)
    lanes_zero(ax)
    for r in range(r0, r1):
        off = (r * C + c) * S + s0
        goff = r * gs + s0
        grad_run(g + goff, x + off, s1 - s0, mu, ag, agx, ax)
        if dx != NULL:
            scale_run(g + goff, dx + off, s1 - s0, dscale, 0)
        if pf != NULL:
            pf_step2(pf, nb)
    out[0] = lanes_total(ag)
    out[1] = lanes_total(agx)
    out[2] = lanes_total(ax)


cdef void cf_block_dx(const dat* g, Py_ssize_t gs, const dat* x, dat* dx,
                      Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                      Py_ssize_t rb, Py_ssize_t sp, Py_ssize_t nsp, Py_ssize_t c, Py_ssize_t k,
                      const floating* kk, PfCur* pf=NULL, double pf_frac=0.0) noexcept nogil:
    """dx of block k of channel c, newest rows first; g and the cursors as in
    cf_block_grad; each row is followed by a prefetch step of pf_frac times its bytes."""
    cdef Py_ssize_t r0, r1, s0, s1, r, off, nb
    cf_block(N, S, rb, sp, nsp, k, &r0, &r1, &s0, &s1)
    nb = <Py_ssize_t>(pf_frac * <double>((s1 - s0) * sizeof(dat)))
    r = r1
    while r > r0:
        r -= 1
        off = (r * C + c) * S + s0
        dx_run(g + (r * gs + s0), x + off, dx + off, s1 - s0, kk[0], kk[1], kk[2], kk[3])
        if pf != NULL:
            pf_step2(pf, nb)


cdef inline void cross_bwd_consts(int mode, double cnt, double sg, double sgx, double mu, double dl,
                                  double r,
                                  double w, const floating* mdy, const floating* mdyx, Py_ssize_t c,
                                  floating* oa, floating* ob, floating* kk) noexcept nogil:
    """Outputs and dx constants of one channel from its gradient sums."""
    cdef double wr = w * r
    if mode == MODE_APPLY:
        bwd_consts(mu, 0.0, wr, -wr * r * <double>mdyx[c], -wr * <double>mdy[c], kk)
        return
    oa[c] = <floating>(sgx * r)  # Σ dy·xhat
    ob[c] = <floating>sg         # Σ dy
    if mode == MODE_TRAIN:
        bwd_consts(mu, dl, wr, -wr * r * r * sgx / cnt, -wr * sg / cnt, kk)


cdef void cf_channel_bwd(const dat* g, const dat* x, dat* dx,
                         Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                         Py_ssize_t rb, Py_ssize_t sp, Py_ssize_t nsp, Py_ssize_t nblk,
                         Py_ssize_t c, const double* part, bint have_part, int mode,
                         const floating* mean, const floating* rstd, const floating* w,
                         const floating* mdy, const floating* mdyx,
                         floating* oa, floating* ob, floating* kk, bint apply_dx,
                         Py_ssize_t cn=-1, int act=ACT_NONE, const floating* ak=NULL,
                         dat* gscr=NULL) noexcept nogil:
    """Gradient sums of channel c (or its block partials from ``part``), then its dx
    while the channel is in L2.

    With an activation (train and eval modes, not with ``part``), g = dy·act'(z)
    of the channel goes first into ``gscr`` (N·S values of this thread's
    scratch), z = (x - ak[c])·ak[C + c] + ak[2·C + c] as the forward computed
    it: that sweep reads dy and x from memory once, and the sums and dx below
    read g and x from L2, so the memory traffic is that of the plain backward.
    With cn >= 0 (the thread's next channel), the
    sweeps over this channel also prefetch channel cn's dy and x toward L2, so
    memory reads them while this core computes: as much as fits beside this
    channel, half during the sums, half during dx; eval mode's single sweep
    (sums and dx) all of it, for half data only (float32's sweep keeps memory
    busy by itself: the hint cost it 4%)."""
    cdef double sg = 0.0, sgx = 0.0, sx = 0.0, dl = 0.0, frac = 0.0
    cdef PfCur pf[2]
    cdef PfCur* pfp = NULL  # the cursors, when prefetching
    cdef Py_ssize_t chan = N * S * sizeof(dat)
    cdef double blk[3]
    cdef double mu = mean[c], r = rstd[c]
    cdef floating dscale = <floating>(<double>w[c] * r)
    cdef Py_ssize_t k, q
    cdef bint dx_sweep = apply_dx and (mode == MODE_TRAIN or mode == MODE_APPLY)
    cdef const dat* gc = g + c * S  # channel c's first run of g, its runs gs apart
    cdef Py_ssize_t gs = C * S
    if cn >= 0 and not have_part:
        if mode == MODE_EVAL and sizeof(dat) == 2:
            frac = 1.0
        elif dx_sweep and FUSE_BYTES > 2 * chan:
            frac = <double>(FUSE_BYTES - 2 * chan) / <double>(2 * chan)
            frac = frac if frac < 1.0 else 1.0
        if frac > 0.0:
            pf_init(&pf[0], <const char*>(g + cn * S), N, S, C, sizeof(dat))
            pf_init(&pf[1], <const char*>(x + cn * S), N, S, C, sizeof(dat))
            pfp = &pf[0]
    if act != ACT_NONE and not have_part:
        for q in range(N):
            act_grad_run(g + (q * C + c) * S, x + (q * C + c) * S, gscr + q * S, S, ak[c], ak[C + c],
                         ak[2 * C + c], act, False)
        gc = gscr
        gs = S
    if mode != MODE_APPLY:
        for k in range(nblk):
            if have_part:
                memcpy(blk, part + 3 * (c * nblk + k), 3 * sizeof(double))
            else:
                cf_block_grad(gc, gs, x, dx if mode == MODE_EVAL else NULL, N, C, S, rb, sp, nsp,
                              c, k, mu, dscale, blk, pfp,
                              frac if mode == MODE_EVAL else frac * BWD_GRAD_Q / 4)
            sg += blk[0]
            sgx += blk[1]
            sx += blk[2]
        if mode == MODE_TRAIN:  # batch statistics: re-centre on the exact mean
            dl = recentre(<double>(N * S), sx, sg, &sgx)
    cross_bwd_consts(mode, <double>(N * S), sg, sgx, mu, dl, r, w[c], mdy, mdyx, c, oa, ob, kk + 4 * c)
    if dx_sweep:
        k = nblk
        while k > 0:
            k -= 1
            cf_block_dx(gc, gs, x, dx, N, C, S, rb, sp, nsp, c, k, kk + 4 * c,
                        pfp, frac * (4 - BWD_GRAD_Q) / 4)


cdef void cf_cross_bwd(const dat* g, const dat* x, dat* dx,
                       Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                       Py_ssize_t rb, Py_ssize_t sp, Py_ssize_t nsp, Py_ssize_t nblk, bint fused,
                       double* part, int mode, const floating* mean, const floating* rstd,
                       const floating* w, const floating* mdy, const floating* mdyx,
                       floating* oa, floating* ob, floating* kk, int nt, int act=ACT_NONE,
                       const floating* ak=NULL, dat* gscr=NULL, Py_ssize_t gstride=0) noexcept nogil:
    """act (fused path only): see cf_channel_bwd; ak: 3·C constants (mean_hi[C], a[C],
    b[C]) of z, gscr: gstride values of scratch per thread."""
    cdef Py_ssize_t t, lo, hi, c, u, nu = C * nblk
    cdef double mu
    if fused or mode == MODE_APPLY:
        if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
            for t in range(nt):
                lo = split_lo(C, nt, t)
                hi = split_lo(C, nt, t + 1)
                for c in range(lo, hi):
                    cf_channel_bwd(g, x, dx, N, C, S, rb, sp, nsp, nblk, c, part, False, mode,
                                   mean, rstd, w, mdy, mdyx, oa, ob, kk, True,
                                   c + 1 if c + 1 < hi else -1, act, ak, gscr + t * gstride)
        else:
            for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
                lo = split_lo(C, nt, t)
                hi = split_lo(C, nt, t + 1)
                for c in range(lo, hi):
                    cf_channel_bwd(g, x, dx, N, C, S, rb, sp, nsp, nblk, c, part, False, mode,
                                   mean, rstd, w, mdy, mdyx, oa, ob, kk, True,
                                   c + 1 if c + 1 < hi else -1, act, ak, gscr + t * gstride)
                cn_sfence()  # order this thread's streaming stores before the join
        return
    if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
        for t in range(nt):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            for u in range(lo, hi):
                c = u // nblk
                cf_block_grad(g + c * S, C * S, x, dx if mode == MODE_EVAL else NULL, N, C, S, rb, sp, nsp,
                              c, u % nblk, mean[c], <floating>(<double>w[c] * <double>rstd[c]),
                              part + 3 * u)
    else:
        for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            for u in range(lo, hi):
                c = u // nblk
                cf_block_grad(g + c * S, C * S, x, dx if mode == MODE_EVAL else NULL, N, C, S, rb, sp, nsp,
                              c, u % nblk, mean[c], <floating>(<double>w[c] * <double>rstd[c]),
                              part + 3 * u)
            cn_sfence()  # order this thread's streaming stores before the join
    for c in range(C):
        cf_channel_bwd(g, x, dx, N, C, S, rb, sp, nsp, nblk, c, part, True, mode,
                       mean, rstd, w, mdy, mdyx, oa, ob, kk, False)
    if mode != MODE_TRAIN:
        return
    if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
        for t in range(nt):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            u = hi
            while u > lo:
                u = u - 1
                cf_block_dx(g + (u // nblk) * S, C * S, x, dx, N, C, S, rb, sp, nsp, u // nblk, u % nblk,
                            kk + 4 * (u // nblk))
    else:
        for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            u = hi
            while u > lo:
                u = u - 1
                cf_block_dx(g + (u // nblk) * S, C * S, x, dx, N, C, S, rb, sp, nsp, u // nblk, u % nblk,
                            kk + 4 * (u // nblk))
            cn_sfence()  # order this thread's streaming stores before the join


