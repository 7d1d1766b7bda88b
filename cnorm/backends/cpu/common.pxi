# Storage type of x, y, dy, dx. Parameters, statistics and per-channel
# constants are ``floating``: float32 for float32 and the half types, float64
# for float64 (kernels are only ever called with those pairs).
ctypedef fused dat:
    float
    double
    cn_bf16
    cn_f16

cdef enum:
    # Double accumulators per reduction (the vector layer's 16 lanes).
    LANES = 16
    # Elements of one statistics block: 256 KB of float32, so a block read from
    # memory is still in L2 for its second (centred) pass.
    BLK = 65536
    # Most row blocks of a channels-last cross-sample problem (bounds the
    # O(blocks·C) partials) and most sample blocks of per-sample dweight/dbias.
    MAXBLK = 64
    # Most doubles in the per-sample dweight/dbias partials (nsb sample blocks
    # of C each, two arrays: 4 MiB): larger problems take fewer, larger blocks.
    PART_MAX = 1 << 18
    # Per-element-affine rows (LayerNorm) longer than this (PART_MAX / 16: at
    # least 16 sample blocks would fit) take the column-tiled backward, whose
    # scratch does not grow with the row: rows summed in pieces of LN_PIECE
    # values, LN_BATCH pieces per parallel step, then column tiles of LN_TILE.
    LN_FUSE_C = 16384
    LN_PIECE = 16384
    LN_BATCH = 4096
    LN_TILE = 2048
    # Channels of one cross-sample channels-last fold task.
    CFOLD = 256
    # Elements processed between two prefetch steps of the fused channels-first
    # forward (see PfCur): a multiple of 32, at least CN_NT_MIN.
    PF_CH = 768
    # Each element a statistics sweep (a normalization sweep) processes advances
    # the prefetch by itemsize * PF_STATS_Q / 4 (PF_NORM_Q / 4) bytes; the
    # backward's gradient sums take BWD_GRAD_Q quarters of its prefetch share.
    PF_STATS_Q = 1
    PF_NORM_Q = 3
    BWD_GRAD_Q = 2

# Below this many elements a call stays on the calling thread: an OpenMP
# fork/join costs more than the work. (This and FUSE_BYTES are C variables: a
# module global would be a dictionary lookup on every call.)
cdef Py_ssize_t SERIAL_ELEMS = 32768
# Outputs of at least this many bytes are written with streaming (non-temporal)
# stores: far larger than the per-core caches, they would be evicted unread,
# and a streaming store saves the read-for-ownership of every output line.
NT_BYTES = 8 << 20
# A channel (forward: x; backward: x and dy) up to this many bytes is kept in
# the per-core L2 (2 MB here) between statistics and normalization.
cdef Py_ssize_t FUSE_BYTES = 1 << 20

cdef enum:
    # activation codes (elementwise.hpp's CN_ACT_*; exported below as Python ints)
    ACT_NONE = 0
    ACT_RELU = 1
    ACT_SILU = 2

ACTIVATIONS = {"relu": ACT_RELU, "silu": ACT_SILU}

cdef enum:
    # cross_backward modes (exported below as Python ints)
    MODE_TRAIN = 0
    MODE_EVAL = 1
    MODE_SUMS = 2
    MODE_APPLY = 3

TRAIN, EVAL, SUMS, APPLY = MODE_TRAIN, MODE_EVAL, MODE_SUMS, MODE_APPLY


# ---------------------------------------------------------------- helpers --


cdef inline double ld(const dat* p) noexcept nogil:
    """Load one stored value (exact in double for every storage type)."""
    if dat is cn_bf16:
        return cn_bf16_to_f32(p[0])
    elif dat is cn_f16:
        return cn_f16_to_f32(p[0])
    else:
        return p[0]


cdef inline void st(dat* p, double v) noexcept nogil:
    """Store one value computed in the statistics type, rounding to the storage type.

    ``v`` is a float32 (or float64) result widened to double: the round trip
    is exact, so float32 data round once, as if stored directly.
    """
    if dat is cn_bf16:
        p[0] = cn_f32_to_bf16(<float>v)
    elif dat is cn_f16:
        p[0] = cn_f32_to_f16(<float>v)
    elif dat is float:
        p[0] = <float>v
    else:
        p[0] = v

cdef inline void lanes_zero(double* a) noexcept nogil:
    cdef int j
    for j in range(LANES):
        a[j] = 0.0


cdef inline double lanes_total(const double* a) noexcept nogil:
    # Fixed pairwise tree over the lanes.
    cdef double s8[8]
    cdef int j
    for j in range(8):
        s8[j] = a[j] + a[j + 8]
    return ((s8[0] + s8[4]) + (s8[2] + s8[6])) + ((s8[1] + s8[5]) + (s8[3] + s8[7]))


cdef inline void sum_run(const dat* x, Py_ssize_t n, double piv, double* acc) noexcept nogil:
    """acc[i % LANES] += x[i] - piv (runs.hpp; half data in float lanes).

    A pivot near the data (a value of the block) keeps the accumulated values
    at the scale of the spread, not of the mean: |mean| ≫ std costs no accuracy.
    """
    if dat is cn_bf16 or dat is cn_f16:
        cn_hsum_run(x, n, piv, acc)
    else:
        cn_sum_run(x, n, piv, acc)


cdef inline void sq_run(const dat* x, Py_ssize_t n, double m, double* acc) noexcept nogil:
    """acc[i % LANES] += (x[i] - m)²."""
    if dat is cn_bf16 or dat is cn_f16:
        cn_hsq_run(x, n, m, acc)
    else:
        cn_sq_run(x, n, m, acc)


cdef inline void grad_run(const dat* g, const dat* x, Py_ssize_t n, double m,
                          double* ag, double* agx, double* ax) noexcept nogil:
    """ag += g, agx += g·(x - m), ax += x - m, lane-wise.

    ax measures how far the (rounded) saved mean m is from the data's mean, so
    that backward can re-centre: see :func:`recentre`. float32 and half data
    in float lanes (double lanes cost four times the operations).
    """
    if dat is double:
        cn_grad_run(g, x, n, m, ag, agx, ax)
    else:
        cn_hgrad_run(g, x, n, m, ag, agx, ax)


cdef inline double act1(double z, int act) noexcept nogil:
    """act(z) for float64 data, as the vector code's cn_act (elementwise.hpp): relu
    keeps NaN; silu from e = exp(-|z|), silu(-inf) is NaN."""
    cdef double e
    if act == ACT_RELU:
        return 0.0 if 0.0 > z else z
    e = exp(-z if z > 0.0 else z)
    return (z * e if 0.0 > z else z) / (1.0 + e)


cdef inline double act_grad1(double dy, double z, int act) noexcept nogil:
    """dy·act'(z) for float64 data, as the vector code's cn_act_grad."""
    cdef double e, d, s, t
    if act == ACT_RELU:
        return dy if z > 0.0 else 0.0
    e = exp(-z if z > 0.0 else z)
    d = 1.0 / (1.0 + e)
    s = e * d if 0.0 > z else d
    t = d if 0.0 > z else e * d
    return dy * (s * (1.0 + z * t))


cdef inline void norm_run(const dat* x, dat* y, Py_ssize_t n,
                          floating mh, floating a, floating b, int act=ACT_NONE,
                          const dat* pf=NULL) noexcept nogil:
    """y = act((x - mh)·a + b): one subtract and one FMA per element (and the activation).

    pf: with an activation, n values brought toward L2 during the sweep (cn_norm_run)."""
    cdef Py_ssize_t i
    if dat is double:
        if act == ACT_NONE:
            for i in range(n):
                y[i] = (x[i] - mh) * a + b
        else:
            for i in range(n):
                y[i] = act1((x[i] - mh) * a + b, act)
    else:
        cn_norm_run(x, y, n, mh, a, b, pf, act)


cdef inline void scale_run(const dat* x, dat* y, Py_ssize_t n,
                           floating a, floating b, int act=ACT_NONE) noexcept nogil:
    """y = act(x·a + b)."""
    cdef Py_ssize_t i
    if dat is double:
        if act == ACT_NONE:
            for i in range(n):
                y[i] = x[i] * a + b
        else:
            for i in range(n):
                y[i] = act1(x[i] * a + b, act)
    else:
        cn_scale_run(x, y, n, a, b, act)


cdef inline void act_grad_run(const dat* dy, const dat* x, dat* g, Py_ssize_t n,
                              floating mh, floating a, floating b, int act, bint stream) noexcept nogil:
    """g = dy·act'(z), z = (x - mh)·a + b computed as norm_run computes it (mh = 0:
    as scale_run), so that relu's mask is the forward's y > 0. g may be dy.
    stream: g may take streaming stores (the call's hint); not for scratch that
    the next sweep reads from cache."""
    cdef Py_ssize_t i
    if dat is double:
        for i in range(n):
            g[i] = act_grad1(dy[i], (x[i] - mh) * a + b, act)
    else:
        cn_act_grad_run(dy, x, g, n, mh, a, b, act, stream)


cdef inline void dx_run(const dat* g, const dat* x, dat* dx, Py_ssize_t n,
                        floating ka, floating mh, floating kb, floating kc) noexcept nogil:
    """dx = g·ka + (x - mh)·kb + kc."""
    cdef Py_ssize_t i
    if dat is double:
        for i in range(n):
            dx[i] = g[i] * ka + (x[i] - mh) * kb + kc
    else:
        cn_dx_run(g, x, dx, n, ka, mh, kb, kc)


cdef inline void chan_merge(double* cnt, double* mean, double* m2,
                            double nb, double mb, double qb) noexcept nogil:
    """Merge partial (nb, mb, qb) into (cnt, mean, m2) — Chan et al."""
    cdef double na = cnt[0], nab, d
    if na == 0.0:
        cnt[0] = nb
        mean[0] = mb
        m2[0] = qb
        return
    nab = na + nb
    d = mb - mean[0]
    mean[0] = mean[0] + d * (nb / nab)
    m2[0] = m2[0] + qb + d * d * (na * nb / nab)
    cnt[0] = nab


cdef inline double recentre(double cnt, double sx, double sg, double* sgx) noexcept nogil:
    """Re-centre backward sums on the data's own mean; return the shift δ.

    The saved mean m is rounded to the statistics dtype; with δ = Σ(x - m)/cnt
    the group's exact mean is m + δ, and Σg·(x - m - δ) = Σg·(x - m) - δ·Σg.
    Without this, |mean| ≫ std turns m's rounding into a large error in dx.
    """
    cdef double dl = sx / cnt
    sgx[0] = sgx[0] - dl * sg
    return dl


cdef inline Py_ssize_t split_lo(Py_ssize_t n, Py_ssize_t parts, Py_ssize_t t) noexcept nogil:
    """Start of contiguous share t of range(n) split into parts (share t ends at split_lo(t + 1)).

    Returned by value, never through a pointer: inside a prange body only
    variables *assigned* there are made thread-private, so ``lo``/``hi``
    written through ``&lo`` would be shared between threads (a race).
    """
    cdef Py_ssize_t q = n // parts, r = n % parts
    return t * q + (t if t < r else r)


cdef inline void fwd_consts(double cnt, double mu, double m2, double eps, double w, double b,
                            floating* mean_o, floating* var_o, floating* rstd_o,
                            floating* k, int act=ACT_NONE) noexcept nogil:
    """Statistics out, and (mean_hi, a, b') with y = (x - mean_hi)·a + b'.

    With an activation, the constants backward can recompute from what it is
    given (see act_consts): a = weight·rstd as rounded, b' = bias.
    """
    cdef double var = m2 / cnt
    cdef double r = 1.0 / sqrt(var + eps)
    cdef double a = w * r
    cdef floating mh = <floating>mu
    mean_o[0] = <floating>mu
    var_o[0] = <floating>var
    rstd_o[0] = <floating>r
    k[0] = mh
    if act != ACT_NONE:
        k[1] = <floating>(w * <double>rstd_o[0])
        k[2] = <floating>b
        return
    k[1] = <floating>a
    k[2] = <floating>(b - (mu - <double>mh) * a)


cdef inline void bwd_consts(double mu, double dl, double ka, double kb, double kc,
                            floating* k) noexcept nogil:
    """(ka, mean_hi, kb, kc') with dx = g·ka + (x - mean_hi)·kb + kc'.

    The centre is mu + dl (saved mean and re-centring shift, kept apart so
    that float64 loses nothing to their sum's rounding).
    """
    cdef floating mh = <floating>mu
    k[0] = <floating>ka
    k[1] = mh
    k[2] = <floating>kb
    k[3] = <floating>(kc + ((mu - <double>mh) + dl) * (-kb))


