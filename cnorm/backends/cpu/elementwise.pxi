# ------------------------------------------------------------ elementwise --

cdef void affine_k(const dat* x, dat* y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint cl,
                   const floating* a, const floating* b, int nt, int act=ACT_NONE) noexcept nogil:
    """y = act(x·a[c] + b[c]): runs (n, c) of S for channels-first, rows of C for channels-last."""
    cdef Py_ssize_t t, lo, hi, u, c, nu = N * S if cl else N * C
    if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
        for t in range(nt):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            for u in range(lo, hi):
                if cl:
                    row_affine(x + u * C, y + u * C, C, a, b, act)
                else:
                    scale_run(x + u * S, y + u * S, S, a[u % C], b[u % C], act)
    else:
        for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            for u in range(lo, hi):
                if cl:
                    row_affine(x + u * C, y + u * C, C, a, b, act)
                else:
                    scale_run(x + u * S, y + u * S, S, a[u % C], b[u % C], act)
            cn_sfence()  # order this thread's streaming stores before the join


# ---------------------------------------------- activation gradient prologue --
# g = dy·act'(z) over a whole tensor, for the backward paths whose unit of work
# is not cache-resident (split BatchNorm channels, channels-last layouts,
# LayerNorm/RMSNorm rows): the wrapper writes g into dx (or, for out=x, into a
# temporary) and runs the plain backward with dy := g; every backward kernel
# reads dy[i] and x[i] before it writes dx[i], so dx may be its own dy. One
# extra sweep (read dy and x, write g) on top of the plain backward. z is
# recomputed with the arithmetic of the forward sweep that stored y:
#   cross-sample (G == 0): ak = (mean_hi[C], a[C], b[C]), z = (x - mean_hi)·a + b
#     (eval mode: mean_hi = 0, a = scale, b = shift: the affine kernel's z);
#   per-sample runs (channels-first, S > 1): mean_hi = mean[n, g],
#     a = weight[c]·rstd[n, g] rounded to the statistics type, b = bias[c];
#   per-sample channels-last: the same constants per (sample, channel);
#   rows (S == 1): the LayerNorm sweep's z with ml = 0 (cn_ln_fwd).

cdef inline void act_cl_consts(Py_ssize_t n, Py_ssize_t C, Py_ssize_t G, const floating* mean,
                               const floating* rstd, const floating* w, const floating* b,
                               floating* kx) noexcept nogil:
    """Extended constants (mean_hi, a, b) of sample n of a per-sample channels-last problem."""
    cdef Py_ssize_t e = C + 16, c, cc, cg = C // G, q
    for c in range(e):
        cc = c % C
        q = n * G + cc // cg
        kx[c] = mean[q]
        kx[e + c] = <floating>(<double>w[cc] * <double>rstd[q])
        kx[2 * e + c] = b[cc]


cdef void act_cl_rows(const dat* dy, const dat* x, dat* g, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t C,
                      const floating* kx, int act) noexcept nogil:
    """g of rows [r0, r1) of C with extended constants kx (float spans as cl_norm_rows)."""
    cdef Py_ssize_t rs, i, c, ch = 16384 // C if 16384 // C > 1 else 1, e = C + 16
    if dat is not double:
        while r0 < r1:
            rs = r0 + ch if r0 + ch < r1 else r1
            cn_act_grad_span(dy + r0 * C, x + r0 * C, g + r0 * C, (rs - r0) * C, C, <const float*>kx,
                             <const float*>kx + e, <const float*>kx + 2 * e, act)
            r0 = rs
    else:
        while r0 < r1:
            i = r0 * C
            for c in range(C):  # cl_row_norm's z
                g[i + c] = act_grad1(dy[i + c], (x[i + c] - kx[c]) * kx[e + c] + kx[2 * e + c], act)
            r0 += 1


cdef void act_grad_units(const dat* dy, const dat* x, dat* g, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G,
                         bint cl, const floating* mean, const floating* rstd, const floating* w,
                         const floating* b, const floating* ak, int act, Py_ssize_t lo, Py_ssize_t hi,
                         floating* kx) noexcept nogil:
    """Units [lo, hi) of act_grad_k: rows (cl), LayerNorm rows (S == 1, G > 0), else runs."""
    cdef Py_ssize_t u, n, c, q, i, c0, cg = C // G if G > 0 else 1, nend
    cdef floating mh, ml = 0, rf
    if cl:
        if G == 0:
            act_cl_rows(dy, x, g, lo, hi, C, kx, act)
            return
        while lo < hi:  # sample by sample: its constants, then its rows in the share
            n = lo // S
            nend = (n + 1) * S if (n + 1) * S < hi else hi
            act_cl_consts(n, C, G, mean, rstd, w, b, kx)
            act_cl_rows(dy, x, g, lo, nend, C, kx, act)
            lo = nend
    elif S == 1 and G > 0:
        for u in range(lo, hi):
            c0 = (u % G) * cg
            mh = mean[u]
            rf = rstd[u]
            if dat is not double:
                cn_act_grad_ln(dy + u * cg, x + u * cg, g + u * cg, cg, mh, ml, rf, <const float*>w + c0,
                               <const float*>b + c0, act)
            else:
                for i in range(cg):  # grp_fwd_unit's float64 z
                    q = u * cg + i
                    g[q] = act_grad1(dy[q], ((x[q] - mh) - ml) * rf * w[c0 + i] + b[c0 + i], act)
    else:
        for u in range(lo, hi):
            c = u % C
            if G == 0:
                act_grad_run(dy + u * S, x + u * S, g + u * S, S, ak[c], ak[C + c], ak[2 * C + c], act, True)
            else:
                q = (u // C) * G + c // cg
                act_grad_run(dy + u * S, x + u * S, g + u * S, S, mean[q],
                             <floating>(<double>w[c] * <double>rstd[q]), b[c], act, True)


cdef void act_grad_k(const dat* dy, const dat* x, dat* g, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                     Py_ssize_t G, bint cl, const floating* mean, const floating* rstd,
                     const floating* w, const floating* b, const floating* ak, int act,
                     floating* kxs, int nt) noexcept nogil:
    """g = dy·act'(z) over the whole (N, C, S) or (N, S, C) tensor (see above).

    G == 0: cross-sample constants from ak (3·C); G > 0: per-sample (mean, rstd
    of shape (N, G), weight, bias). kxs: 3·(C + 16) values per thread."""
    cdef Py_ssize_t t, lo, hi, c, e = C + 16
    cdef Py_ssize_t nu = N * S if cl else (N * G if S == 1 and G > 0 else N * C)
    if cl and G == 0:  # one set of extended constants for every thread
        for c in range(e):
            kxs[c] = ak[c % C]
            kxs[e + c] = ak[C + c % C]
            kxs[2 * e + c] = ak[2 * C + c % C]
    if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
        act_grad_units(dy, x, g, C, S, G, cl, mean, rstd, w, b, ak, act, 0, nu, kxs)
        cn_sfence()
    else:
        for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            act_grad_units(dy, x, g, C, S, G, cl, mean, rstd, w, b, ak, act, lo, hi,
                           kxs if G == 0 else kxs + t * 3 * e)
            cn_sfence()  # order this thread's streaming stores before the join


cdef void copy_k(const char* src, char* dst, Py_ssize_t n, int nt) noexcept nogil:
    cdef Py_ssize_t t, lo, hi
    if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
        for t in range(nt):
            lo = split_lo(n, nt, t)
            hi = split_lo(n, nt, t + 1)
            cn_stream_copy(src + lo, dst + lo, hi - lo)
        cn_sfence()
    else:
        for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
            lo = split_lo(n, nt, t)
            hi = split_lo(n, nt, t + 1)
            cn_stream_copy(src + lo, dst + lo, hi - lo)
            cn_sfence()  # order this thread's streaming stores before the join


