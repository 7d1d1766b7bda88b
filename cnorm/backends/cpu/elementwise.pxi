# ------------------------------------------------------------ elementwise --

cdef void affine_k(const dat* x, dat* y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint cl,
                   const floating* a, const floating* b, int nt) noexcept nogil:
    """y = x·a[c] + b[c]: runs (n, c) of S for channels-first, rows of C for channels-last."""
    cdef Py_ssize_t t, lo, hi, u, c, nu = N * S if cl else N * C
    if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
        for t in range(nt):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            for u in range(lo, hi):
                if cl:
                    row_affine(x + u * C, y + u * C, C, a, b)
                else:
                    scale_run(x + u * S, y + u * S, S, a[u % C], b[u % C])
    else:
        for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            for u in range(lo, hi):
                if cl:
                    row_affine(x + u * C, y + u * C, C, a, b)
                else:
                    scale_run(x + u * S, y + u * S, S, a[u % C], b[u % C])
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


