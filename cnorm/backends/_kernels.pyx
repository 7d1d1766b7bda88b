# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Fused OpenMP kernels of the "cython" backend.

Every kernel problem of DESIGN §2 is computed here, with the GIL released:

* cross-sample (BatchNorm) statistics per channel, channels-first
  ``(N, C, S)`` and channels-last ``(N, S, C)``;
* per-sample (LayerNorm, GroupNorm, InstanceNorm) statistics per
  ``(n, group)``;
* the backward of both, the eval-mode multiply-add, and the SyncBatchNorm
  primitives.

Determinism. Statistics are defined over *blocks* whose boundaries depend only
on the problem's shape: each block's partial result is computed serially, and
partials are merged (Chan's formula for mean/M2, plain sums for gradients) in
block order. Threads only decide *who* computes a block, never how results
combine, so any thread count gives bit-identical output. Lane accumulators
are indexed by position in a run, not by address, so alignment does not
matter either.

Numerics. Sums run in float lanes over bounded pieces (at most 64 rows or 512
elements) added into double (double lanes for float64 data), centred so that
nothing cancels, redone in double if a float sum overflows. A block's variance
takes one pass around a pivot near its mean (M2 = S2 - S1²/n in double) where
that is as exact as two (S2/M2 <= CN_ONEPASS_MAX), else two passes (mean, then
Σ(x-mean)², the second from cache); blocks merge by Chan's formula or its
two-level form, so no E[x²]-E[x]² of uncentred data appears.
Normalization is ``y = (x - mean_hi)·a + b'`` with ``mean_hi`` the mean
rounded to the statistics type and the rounding remainder folded into ``b'``
in double: float32 data with |mean| ≫ std keeps full relative accuracy at one
subtract and one FMA per element. Backward re-centres on the data's exact mean
(:func:`recentre`), so the saved mean's rounding does not reach dx.

Types. Data (x, y, dy, dx) are ``dat``: float32, float64, or float16/bfloat16
held as 16-bit patterns and converted on load and store (never copied to
float32). Parameters, statistics and per-channel constants are ``floating``:
float64 for float64 data, float32 otherwise.

C helpers (``_kernels.h``): the half conversions (16 values per instruction
where the build has AVX-512: F16C, AVX512-BF16 with an exact path for
subnormals), the lane reductions, the channels-last and LayerNorm sweeps (AVX-512
with portable fallbacks), and the elementwise sweeps, which write
outputs of ``NT_BYTES`` or more with streaming stores (no read-for-ownership
of output lines) and are bit-identical to their scalar form wherever an
element falls. Calls on one thread never enter an OpenMP region.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.string cimport memcpy

import numpy as np

cimport numpy as cnp

cnp.import_array()


cdef extern from "_kernels.h" nogil:
    # Half-precision storage: 16-bit patterns in distinct struct types, so a
    # fused type can tell them apart; converted bit-exactly (round to nearest
    # even) with branch-free integer code that the compiler vectorizes.
    ctypedef struct cn_bf16:
        unsigned short v
    ctypedef struct cn_f16:
        unsigned short v
    float cn_bf16_to_f32(cn_bf16 h)
    cn_bf16 cn_f32_to_bf16(float f)
    float cn_f16_to_f32(cn_f16 h)
    cn_f16 cn_f32_to_f16(float f)
    void cn_wsums_float(const float* g, const float* x, const float* w, Py_ssize_t n, double m, double* awg,
                     double* awgx, double* ax)
    void cn_colsums_float(const float* g, const float* x, Py_ssize_t stride, int rows, Py_ssize_t n,
                       const double* m, const double* dl, const double* r, double* pb, double* pw)
    void cn_wsums_double(const double* g, const double* x, const double* w, Py_ssize_t n, double m, double* awg,
                     double* awgx, double* ax)
    void cn_colsums_double(const double* g, const double* x, Py_ssize_t stride, int rows, Py_ssize_t n,
                       const double* m, const double* dl, const double* r, double* pb, double* pw)
    void cn_wsums_cn_bf16(const cn_bf16* g, const cn_bf16* x, const float* w, Py_ssize_t n, double m, double* awg,
                     double* awgx, double* ax)
    void cn_colsums_cn_bf16(const cn_bf16* g, const cn_bf16* x, Py_ssize_t stride, int rows, Py_ssize_t n,
                       const double* m, const double* dl, const double* r, double* pb, double* pw)
    void cn_wsums_cn_f16(const cn_f16* g, const cn_f16* x, const float* w, Py_ssize_t n, double m, double* awg,
                     double* awgx, double* ax)
    void cn_colsums_cn_f16(const cn_f16* g, const cn_f16* x, Py_ssize_t stride, int rows, Py_ssize_t n,
                       const double* m, const double* dl, const double* r, double* pb, double* pw)
    int cn_cl_block_stats_float(const float* x, Py_ssize_t nr, Py_ssize_t C, double* m, double* q, double* ws)
    int cn_cl_block_stats_cn_bf16(const cn_bf16* x, Py_ssize_t nr, Py_ssize_t C, double* m, double* q,
                                  double* ws)
    int cn_cl_block_stats_cn_f16(const cn_f16* x, Py_ssize_t nr, Py_ssize_t C, double* m, double* q, double* ws)
    int cn_cl_grad_float(const float* g, const float* x, Py_ssize_t nr, Py_ssize_t C, const double* mu,
                         double* sg, double* sgx, double* sx)
    int cn_cl_grad_cn_bf16(const cn_bf16* g, const cn_bf16* x, Py_ssize_t nr, Py_ssize_t C, const double* mu,
                           double* sg, double* sgx, double* sx)
    int cn_cl_grad_cn_f16(const cn_f16* g, const cn_f16* x, Py_ssize_t nr, Py_ssize_t C, const double* mu,
                          double* sg, double* sgx, double* sx)
    void cn_hsum_run_cn_bf16(const cn_bf16* x, Py_ssize_t n, double piv, double* acc)
    void cn_hsq_run_cn_bf16(const cn_bf16* x, Py_ssize_t n, double m, double* acc)
    void cn_hgrad_run_float(const float* g, const float* x, Py_ssize_t n, double m, double* ag, double* agx,
                            double* ax)
    void cn_hgrad_run_cn_bf16(const cn_bf16* g, const cn_bf16* x, Py_ssize_t n, double m, double* ag, double* agx,
                         double* ax)
    void cn_hsum_run_cn_f16(const cn_f16* x, Py_ssize_t n, double piv, double* acc)
    void cn_hsq_run_cn_f16(const cn_f16* x, Py_ssize_t n, double m, double* acc)
    void cn_hgrad_run_cn_f16(const cn_f16* g, const cn_f16* x, Py_ssize_t n, double m, double* ag, double* agx,
                         double* ax)
    int cn_nt_store
    void cn_sfence()
    void cn_stream_copy(const char* src, char* dst, Py_ssize_t n)
    void cn_prefetch(const void* p, Py_ssize_t nbytes)
    void cn_prefetch_l2(const void* p, Py_ssize_t nbytes)
    int cn_ln_row_stats_float(const float* x, Py_ssize_t n, double* mu, double* m2)
    int CN_SHORT_MAX
    int cn_short_rows_stats_float(const float* x, Py_ssize_t n, int nb, double* mu, double* m2)
    int cn_short_rows_stats_cn_bf16(const cn_bf16* x, Py_ssize_t n, int nb, double* mu, double* m2)
    int cn_short_rows_stats_cn_f16(const cn_f16* x, Py_ssize_t n, int nb, double* mu, double* m2)
    int cn_ln_row_stats_cn_bf16(const cn_bf16* x, Py_ssize_t n, double* mu, double* m2)
    float cn_pivot16_float(const float* x)
    float cn_pivot16_cn_bf16(const cn_bf16* x)
    float cn_pivot16_cn_f16(const cn_f16* x)
    void cn_row_lanes_float(const float* x, Py_ssize_t n, float c, int sq, double* s1, double* s2)
    void cn_row_lanes_cn_bf16(const cn_bf16* x, Py_ssize_t n, float c, int sq, double* s1, double* s2)
    void cn_row_lanes_cn_f16(const cn_f16* x, Py_ssize_t n, float c, int sq, double* s1, double* s2)
    double CN_ONEPASS_MAX
    int cn_ln_row_stats_cn_f16(const cn_f16* x, Py_ssize_t n, double* mu, double* m2)
    void cn_cl_norm_span_float(const float* x, float* y, Py_ssize_t n, Py_ssize_t C, const float* mh,
                               const float* a, const float* b)
    void cn_cl_norm_span_cn_bf16(const cn_bf16* x, cn_bf16* y, Py_ssize_t n, Py_ssize_t C, const float* mh,
                                 const float* a, const float* b)
    void cn_cl_norm_span_cn_f16(const cn_f16* x, cn_f16* y, Py_ssize_t n, Py_ssize_t C, const float* mh,
                                const float* a, const float* b)
    void cn_cl_dx_span_float(const float* g, const float* x, float* dx, Py_ssize_t n, Py_ssize_t C,
                             const float* ka, const float* mh, const float* kb, const float* kc)
    void cn_cl_dx_span_cn_bf16(const cn_bf16* g, const cn_bf16* x, cn_bf16* dx, Py_ssize_t n, Py_ssize_t C,
                               const float* ka, const float* mh, const float* kb, const float* kc)
    void cn_cl_dx_span_cn_f16(const cn_f16* g, const cn_f16* x, cn_f16* dx, Py_ssize_t n, Py_ssize_t C,
                              const float* ka, const float* mh, const float* kb, const float* kc)
    void cn_ln_bwd_rows_float(const float* g, const float* x, float* dx, Py_ssize_t C, Py_ssize_t cg,
                              Py_ssize_t G, Py_ssize_t gi, Py_ssize_t n0, Py_ssize_t n1, const float* mean,
                              const float* rstd, const float* w, double* pw, double* pb, float* fb)
    void cn_ln_bwd_rows_cn_bf16(const cn_bf16* g, const cn_bf16* x, cn_bf16* dx, Py_ssize_t C, Py_ssize_t cg,
                                Py_ssize_t G, Py_ssize_t gi, Py_ssize_t n0, Py_ssize_t n1, const float* mean,
                                const float* rstd, const float* w, double* pw, double* pb, float* fb)
    void cn_ln_bwd_rows_cn_f16(const cn_f16* g, const cn_f16* x, cn_f16* dx, Py_ssize_t C, Py_ssize_t cg,
                               Py_ssize_t G, Py_ssize_t gi, Py_ssize_t n0, Py_ssize_t n1, const float* mean,
                               const float* rstd, const float* w, double* pw, double* pb, float* fb)
    void cn_norm_run_float(const float* x, float* y, Py_ssize_t n, float mh, float a, float b)
    void cn_scale_run_float(const float* x, float* y, Py_ssize_t n, float a, float b)
    void cn_dx_run_float(const float* g, const float* x, float* dx, Py_ssize_t n, float ka, float mh, float kb,
                      float kc)
    void cn_row_norm_float(const float* x, float* y, Py_ssize_t n, const float* mh, const float* a,
                        const float* b)
    void cn_row_affine_float(const float* x, float* y, Py_ssize_t n, const float* a, const float* b)
    void cn_row_dx_float(const float* g, const float* x, float* dx, Py_ssize_t n, const float* ka,
                      const float* mh, const float* kb, const float* kc)
    void cn_ln_fwd_float(const float* x, float* y, Py_ssize_t n, float mh, float ml, float rf, const float* w,
                      const float* b)
    void cn_ln_dx_float(const float* g, const float* x, float* dx, Py_ssize_t n, const float* w, float rf,
                     float mh, float ml, float kb, float kc)
    void cn_norm_run_cn_bf16(const cn_bf16* x, cn_bf16* y, Py_ssize_t n, float mh, float a, float b)
    void cn_scale_run_cn_bf16(const cn_bf16* x, cn_bf16* y, Py_ssize_t n, float a, float b)
    void cn_dx_run_cn_bf16(const cn_bf16* g, const cn_bf16* x, cn_bf16* dx, Py_ssize_t n, float ka, float mh, float kb,
                      float kc)
    void cn_row_norm_cn_bf16(const cn_bf16* x, cn_bf16* y, Py_ssize_t n, const float* mh, const float* a,
                        const float* b)
    void cn_row_affine_cn_bf16(const cn_bf16* x, cn_bf16* y, Py_ssize_t n, const float* a, const float* b)
    void cn_row_dx_cn_bf16(const cn_bf16* g, const cn_bf16* x, cn_bf16* dx, Py_ssize_t n, const float* ka,
                      const float* mh, const float* kb, const float* kc)
    void cn_ln_fwd_cn_bf16(const cn_bf16* x, cn_bf16* y, Py_ssize_t n, float mh, float ml, float rf, const float* w,
                      const float* b)
    void cn_ln_dx_cn_bf16(const cn_bf16* g, const cn_bf16* x, cn_bf16* dx, Py_ssize_t n, const float* w, float rf,
                     float mh, float ml, float kb, float kc)
    void cn_norm_run_cn_f16(const cn_f16* x, cn_f16* y, Py_ssize_t n, float mh, float a, float b)
    void cn_scale_run_cn_f16(const cn_f16* x, cn_f16* y, Py_ssize_t n, float a, float b)
    void cn_dx_run_cn_f16(const cn_f16* g, const cn_f16* x, cn_f16* dx, Py_ssize_t n, float ka, float mh, float kb,
                      float kc)
    void cn_row_norm_cn_f16(const cn_f16* x, cn_f16* y, Py_ssize_t n, const float* mh, const float* a,
                        const float* b)
    void cn_row_affine_cn_f16(const cn_f16* x, cn_f16* y, Py_ssize_t n, const float* a, const float* b)
    void cn_row_dx_cn_f16(const cn_f16* g, const cn_f16* x, cn_f16* dx, Py_ssize_t n, const float* ka,
                      const float* mh, const float* kb, const float* kc)
    void cn_ln_fwd_cn_f16(const cn_f16* x, cn_f16* y, Py_ssize_t n, float mh, float ml, float rf, const float* w,
                      const float* b)
    void cn_ln_dx_cn_f16(const cn_f16* g, const cn_f16* x, cn_f16* dx, Py_ssize_t n, const float* w, float rf,
                     float mh, float ml, float kb, float kc)
    void cn_sum_run_float(const float* x, Py_ssize_t n, double piv, double* acc)
    void cn_sq_run_float(const float* x, Py_ssize_t n, double m, double* acc)
    void cn_grad_run_float(const float* g, const float* x, Py_ssize_t n, double m, double* ag, double* agx,
                        double* ax)
    void cn_sum_run_double(const double* x, Py_ssize_t n, double piv, double* acc)
    void cn_sq_run_double(const double* x, Py_ssize_t n, double m, double* acc)
    void cn_grad_run_double(const double* g, const double* x, Py_ssize_t n, double m, double* ag, double* agx,
                        double* ax)
    void cn_sum_run_cn_bf16(const cn_bf16* x, Py_ssize_t n, double piv, double* acc)
    void cn_sq_run_cn_bf16(const cn_bf16* x, Py_ssize_t n, double m, double* acc)
    void cn_grad_run_cn_bf16(const cn_bf16* g, const cn_bf16* x, Py_ssize_t n, double m, double* ag, double* agx,
                        double* ax)
    void cn_sum_run_cn_f16(const cn_f16* x, Py_ssize_t n, double piv, double* acc)
    void cn_sq_run_cn_f16(const cn_f16* x, Py_ssize_t n, double m, double* acc)
    void cn_grad_run_cn_f16(const cn_f16* g, const cn_f16* x, Py_ssize_t n, double m, double* ag, double* agx,
                        double* ax)

# Storage type of x, y, dy, dx. Parameters, statistics and per-channel
# constants are ``floating``: float32 for float32 and the half types, float64
# for float64 (kernels are only ever called with those pairs).
ctypedef fused dat:
    float
    double
    cn_bf16
    cn_f16

cdef enum:
    # Double accumulators per reduction: two AVX-512 (four AVX2) registers.
    LANES = 16
    # Elements of one statistics block: 256 KB of float32, so a block read from
    # memory is still in L2 for its second (centred) pass.
    BLK = 65536
    # Most row blocks of a channels-last cross-sample problem (bounds the
    # O(blocks·C) partials) and most sample blocks of per-sample dweight/dbias.
    MAXBLK = 64
    # Channels of one cross-sample channels-last fold task.
    CFOLD = 256
    # Elements processed between two prefetch steps of the fused channels-first
    # forward (see PfCur): a multiple of LANES, at least CN_NT_MIN.
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
    """acc[i % LANES] += x[i] - piv (C helper in _kernels.h).

    A pivot near the data (a value of the block) keeps the accumulated values
    at the scale of the spread, not of the mean: |mean| ≫ std costs no accuracy.
    """
    if dat is float:
        cn_sum_run_float(x, n, piv, acc)
    elif dat is double:
        cn_sum_run_double(x, n, piv, acc)
    elif dat is cn_bf16:
        cn_hsum_run_cn_bf16(x, n, piv, acc)
    else:
        cn_hsum_run_cn_f16(x, n, piv, acc)


cdef inline void sq_run(const dat* x, Py_ssize_t n, double m, double* acc) noexcept nogil:
    """acc[i % LANES] += (x[i] - m)²."""
    if dat is float:
        cn_sq_run_float(x, n, m, acc)
    elif dat is double:
        cn_sq_run_double(x, n, m, acc)
    elif dat is cn_bf16:
        cn_hsq_run_cn_bf16(x, n, m, acc)
    else:
        cn_hsq_run_cn_f16(x, n, m, acc)


cdef inline void grad_run(const dat* g, const dat* x, Py_ssize_t n, double m,
                          double* ag, double* agx, double* ax) noexcept nogil:
    """ag += g, agx += g·(x - m), ax += x - m, lane-wise.

    ax measures how far the (rounded) saved mean m is from the data's mean, so
    that backward can re-centre: see :func:`recentre`.
    """
    if dat is float:  # float lanes in chunks, as half data (double lanes cost 4x the operations)
        cn_hgrad_run_float(g, x, n, m, ag, agx, ax)
    elif dat is double:
        cn_grad_run_double(g, x, n, m, ag, agx, ax)
    elif dat is cn_bf16:
        cn_hgrad_run_cn_bf16(g, x, n, m, ag, agx, ax)
    else:
        cn_hgrad_run_cn_f16(g, x, n, m, ag, agx, ax)


cdef inline void norm_run(const dat* x, dat* y, Py_ssize_t n,
                          floating mh, floating a, floating b) noexcept nogil:
    """y = (x - mh)·a + b: one subtract and one FMA per element."""
    cdef Py_ssize_t i
    if dat is float:
        cn_norm_run_float(x, y, n, mh, a, b)
    elif dat is cn_bf16:
        cn_norm_run_cn_bf16(x, y, n, mh, a, b)
    elif dat is cn_f16:
        cn_norm_run_cn_f16(x, y, n, mh, a, b)
    else:
        for i in range(n):
            st(y + i, (<floating>ld(x + i) - mh) * a + b)


cdef inline void scale_run(const dat* x, dat* y, Py_ssize_t n,
                           floating a, floating b) noexcept nogil:
    cdef Py_ssize_t i
    if dat is float:
        cn_scale_run_float(x, y, n, a, b)
    elif dat is cn_bf16:
        cn_scale_run_cn_bf16(x, y, n, a, b)
    elif dat is cn_f16:
        cn_scale_run_cn_f16(x, y, n, a, b)
    else:
        for i in range(n):
            st(y + i, <floating>ld(x + i) * a + b)


cdef inline void dx_run(const dat* g, const dat* x, dat* dx, Py_ssize_t n,
                        floating ka, floating mh, floating kb, floating kc) noexcept nogil:
    """dx = g·ka + (x - mh)·kb + kc."""
    cdef Py_ssize_t i
    if dat is float:
        cn_dx_run_float(g, x, dx, n, ka, mh, kb, kc)
    elif dat is cn_bf16:
        cn_dx_run_cn_bf16(g, x, dx, n, ka, mh, kb, kc)
    elif dat is cn_f16:
        cn_dx_run_cn_f16(g, x, dx, n, ka, mh, kb, kc)
    else:
        for i in range(n):
            st(dx + i, <floating>ld(g + i) * ka + (<floating>ld(x + i) - mh) * kb + kc)


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
                            floating* k) noexcept nogil:
    """Statistics out, and (mean_hi, a, b') with y = (x - mean_hi)·a + b'."""
    cdef double var = m2 / cnt
    cdef double r = 1.0 / sqrt(var + eps)
    cdef double a = w * r
    cdef floating mh = <floating>mu
    mean_o[0] = <floating>mu
    var_o[0] = <floating>var
    rstd_o[0] = <floating>r
    k[0] = mh
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
    the row statistics' lanes, C helper)."""
    if dat is float:
        cn_row_lanes_float(x, n, p, 1, sq, s)
    elif dat is cn_bf16:
        cn_row_lanes_cn_bf16(x, n, p, 1, sq, s)
    elif dat is cn_f16:
        cn_row_lanes_cn_f16(x, n, p, 1, sq, s)


cdef inline float pivot16(const dat* x) noexcept nogil:
    if dat is float:
        return cn_pivot16_float(x)
    elif dat is cn_bf16:
        return cn_pivot16_cn_bf16(x)
    elif dat is cn_f16:
        return cn_pivot16_cn_f16(x)
    return 0.0


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
    (see CN_ONEPASS_MAX in _kernels.h); False where that is less exact than two
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
                        const floating* kk) noexcept nogil:
    cdef Py_ssize_t r0, r1, s0, s1, r, off
    cf_block(N, S, rb, sp, nsp, k, &r0, &r1, &s0, &s1)
    r = r1
    while r > r0:  # newest rows first: they are the ones still in cache
        r -= 1
        off = (r * C + c) * S + s0
        norm_run(x + off, y + off, s1 - s0, kk[0], kk[1], kk[2])


cdef void cf_channel_fwd(const dat* x, dat* y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                         Py_ssize_t rb, Py_ssize_t sp, Py_ssize_t nsp, Py_ssize_t nblk,
                         Py_ssize_t c, Py_ssize_t cn, const double* part, bint have_part, double eps,
                         const floating* w, const floating* b,
                         floating* mean, floating* var, floating* rstd, floating* kk) noexcept nogil:
    """Fold channel c's block partials in block order, then normalize it.

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
    fwd_consts(cnt, mu, m2, eps, w[c], b[c], mean + c, var + c, rstd + c, kk + 3 * c)
    if y != NULL and not have_part:
        cf_channel_norm(x, y, N, C, S, sp, nsp, c, pfp, kk + 3 * c)


cdef void cf_channel_norm(const dat* x, dat* y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                          Py_ssize_t sp, Py_ssize_t nsp, Py_ssize_t c, PfCur* pf,
                          const floating* kk) noexcept nogil:
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
            norm_run(x + off, y + off, n, kk[0], kk[1], kk[2])
            continue
        h = ((64 - (<size_t>(y + off)) % 64) % 64) // sizeof(dat)
        i = 0
        while i < n:
            m = h + PF_CH
            if n - i - m < PF_CH:  # no short last piece (it would not stream)
                m = n - i
            norm_run(x + off + i, y + off + i, m, kk[0], kk[1], kk[2])
            pf_step(pf, m * sizeof(dat) * PF_NORM_Q // 4)
            i += m
            h = 0


cdef void cf_cross_fwd(const dat* x, dat* y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                       Py_ssize_t rb, Py_ssize_t sp, Py_ssize_t nsp, Py_ssize_t nblk, bint fused,
                       double* part, double eps, const floating* w, const floating* b,
                       floating* mean, floating* var, floating* rstd, floating* kk, int nt) noexcept nogil:
    cdef Py_ssize_t t, lo, hi, c, u, nu = C * nblk
    if fused:
        if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
            for t in range(nt):
                lo = split_lo(C, nt, t)
                hi = split_lo(C, nt, t + 1)
                for c in range(lo, hi):
                    cf_channel_fwd(x, y, N, C, S, rb, sp, nsp, nblk, c, c + 1 if c + 1 < hi else -1,
                                   part, False, eps, w, b,
                                   mean, var, rstd, kk)
        else:
            for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
                lo = split_lo(C, nt, t)
                hi = split_lo(C, nt, t + 1)
                for c in range(lo, hi):
                    cf_channel_fwd(x, y, N, C, S, rb, sp, nsp, nblk, c, c + 1 if c + 1 < hi else -1,
                                   part, False, eps, w, b,
                                   mean, var, rstd, kk)
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
                       mean, var, rstd, kk)
    if y == NULL:
        return
    if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
        for t in range(nt):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            u = hi
            while u > lo:
                u = u - 1
                cf_block_norm(x, y, N, C, S, rb, sp, nsp, u // nblk, u % nblk, kk + 3 * (u // nblk))
    else:
        for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            u = hi
            while u > lo:
                u = u - 1
                cf_block_norm(x, y, N, C, S, rb, sp, nsp, u // nblk, u % nblk, kk + 3 * (u // nblk))
            cn_sfence()  # order this thread's streaming stores before the join


cdef void cf_block_grad(const dat* g, const dat* x, dat* dx,
                        Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                        Py_ssize_t rb, Py_ssize_t sp, Py_ssize_t nsp, Py_ssize_t c, Py_ssize_t k,
                        double mu, floating dscale, double* out, PfCur* pf=NULL,
                        double pf_frac=0.0) noexcept nogil:
    """out = (Σg, Σg·(x-mu), Σ(x-mu)) over block k of channel c; with dx, also dx = g·dscale.
    With cursors (pf[0] in g, pf[1] in x), each row is followed by a prefetch step of
    pf_frac times its bytes in both."""
    cdef double ag[LANES]
    cdef double agx[LANES]
    cdef double ax[LANES]
    cdef Py_ssize_t r0, r1, s0, s1, r, off, nb
    cf_block(N, S, rb, sp, nsp, k, &r0, &r1, &s0, &s1)
    nb = <Py_ssize_t>(pf_frac * <double>((s1 - s0) * sizeof(dat)))
    lanes_zero(ag)
    lanes_zero(agx)
    lanes_zero(ax)
    for r in range(r0, r1):
        off = (r * C + c) * S + s0
        grad_run(g + off, x + off, s1 - s0, mu, ag, agx, ax)
        if dx != NULL:
            scale_run(g + off, dx + off, s1 - s0, dscale, 0)
        if pf != NULL:
            pf_step2(pf, nb)
    out[0] = lanes_total(ag)
    out[1] = lanes_total(agx)
    out[2] = lanes_total(ax)


cdef void cf_block_dx(const dat* g, const dat* x, dat* dx,
                      Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                      Py_ssize_t rb, Py_ssize_t sp, Py_ssize_t nsp, Py_ssize_t c, Py_ssize_t k,
                      const floating* kk, PfCur* pf=NULL, double pf_frac=0.0) noexcept nogil:
    """dx of block k of channel c, newest rows first; with cursors (as cf_block_grad),
    each row is followed by a prefetch step of pf_frac times its bytes."""
    cdef Py_ssize_t r0, r1, s0, s1, r, off, nb
    cf_block(N, S, rb, sp, nsp, k, &r0, &r1, &s0, &s1)
    nb = <Py_ssize_t>(pf_frac * <double>((s1 - s0) * sizeof(dat)))
    r = r1
    while r > r0:
        r -= 1
        off = (r * C + c) * S + s0
        dx_run(g + off, x + off, dx + off, s1 - s0, kk[0], kk[1], kk[2], kk[3])
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
                         Py_ssize_t cn=-1) noexcept nogil:
    """Gradient sums of channel c (or its block partials from ``part``), then its dx
    while the channel is in L2. With cn >= 0 (the thread's next channel), the
    sweeps over this channel also prefetch channel cn's dy and x toward L2, so
    memory reads them while this core computes: as much as fits beside this
    channel, half during the sums, half during dx; eval mode's single sweep
    (sums and dx) all of it, for half data only (float32's sweep keeps memory
    busy by itself: the hint cost it 4%)."""
    cdef double sg = 0.0, sgx = 0.0, sx = 0.0, dl = 0.0, frac = 0.0
    cdef PfCur pf[2]
    cdef Py_ssize_t chan = N * S * sizeof(dat)
    cdef double blk[3]
    cdef double mu = mean[c], r = rstd[c]
    cdef floating dscale = <floating>(<double>w[c] * r)
    cdef Py_ssize_t k
    cdef bint dx_sweep = apply_dx and (mode == MODE_TRAIN or mode == MODE_APPLY)
    if cn >= 0 and not have_part:
        if mode == MODE_EVAL and sizeof(dat) == 2:
            frac = 1.0
        elif dx_sweep and FUSE_BYTES > 2 * chan:
            frac = <double>(FUSE_BYTES - 2 * chan) / <double>(2 * chan)
            frac = frac if frac < 1.0 else 1.0
        if frac > 0.0:
            pf_init(&pf[0], <const char*>(g + cn * S), N, S, C, sizeof(dat))
            pf_init(&pf[1], <const char*>(x + cn * S), N, S, C, sizeof(dat))
    if mode != MODE_APPLY:
        for k in range(nblk):
            if have_part:
                memcpy(blk, part + 3 * (c * nblk + k), 3 * sizeof(double))
            else:
                cf_block_grad(g, x, dx if mode == MODE_EVAL else NULL, N, C, S, rb, sp, nsp,
                              c, k, mu, dscale, blk, pf if frac > 0.0 else NULL,
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
            cf_block_dx(g, x, dx, N, C, S, rb, sp, nsp, c, k, kk + 4 * c,
                        pf if frac > 0.0 else NULL, frac * (4 - BWD_GRAD_Q) / 4)


cdef void cf_cross_bwd(const dat* g, const dat* x, dat* dx,
                       Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                       Py_ssize_t rb, Py_ssize_t sp, Py_ssize_t nsp, Py_ssize_t nblk, bint fused,
                       double* part, int mode, const floating* mean, const floating* rstd,
                       const floating* w, const floating* mdy, const floating* mdyx,
                       floating* oa, floating* ob, floating* kk, int nt) noexcept nogil:
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
                                   c + 1 if c + 1 < hi else -1)
        else:
            for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
                lo = split_lo(C, nt, t)
                hi = split_lo(C, nt, t + 1)
                for c in range(lo, hi):
                    cf_channel_bwd(g, x, dx, N, C, S, rb, sp, nsp, nblk, c, part, False, mode,
                                   mean, rstd, w, mdy, mdyx, oa, ob, kk, True,
                                   c + 1 if c + 1 < hi else -1)
                cn_sfence()  # order this thread's streaming stores before the join
        return
    if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
        for t in range(nt):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            for u in range(lo, hi):
                c = u // nblk
                cf_block_grad(g, x, dx if mode == MODE_EVAL else NULL, N, C, S, rb, sp, nsp,
                              c, u % nblk, mean[c], <floating>(<double>w[c] * <double>rstd[c]),
                              part + 3 * u)
    else:
        for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            for u in range(lo, hi):
                c = u // nblk
                cf_block_grad(g, x, dx if mode == MODE_EVAL else NULL, N, C, S, rb, sp, nsp,
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
                cf_block_dx(g, x, dx, N, C, S, rb, sp, nsp, u // nblk, u % nblk, kk + 4 * (u // nblk))
    else:
        for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            u = hi
            while u > lo:
                u = u - 1
                cf_block_dx(g, x, dx, N, C, S, rb, sp, nsp, u // nblk, u % nblk, kk + 4 * (u // nblk))
            cn_sfence()  # order this thread's streaming stores before the join


# ----------------------------------------------- cross-sample, channels-last --
# Rows of C channels; row block k is rows [k·rb, (k+1)·rb). Block partials are
# vectors over C, computed with one row at a time feeding C accumulators.

cdef inline bint cl_stats_f(const dat* x, Py_ssize_t nr, Py_ssize_t C,
                            double* m, double* q, double* ws) noexcept nogil:
    """Column statistics of a channels-last block in float (C helper, ws: 3·C
    doubles); False for float64 data or when a float sum overflowed."""
    if dat is float:
        return cn_cl_block_stats_float(x, nr, C, m, q, ws)
    elif dat is cn_bf16:
        return cn_cl_block_stats_cn_bf16(x, nr, C, m, q, ws)
    elif dat is cn_f16:
        return cn_cl_block_stats_cn_f16(x, nr, C, m, q, ws)
    return False


cdef inline bint row_stats_f(const dat* x, Py_ssize_t n, double* mu, double* m2) noexcept nogil:
    """Mean and M2 of one contiguous run in float lanes (C helper); False for
    float64 data or when a float sum overflowed."""
    if dat is float:
        return cn_ln_row_stats_float(x, n, mu, m2)
    elif dat is cn_bf16:
        return cn_ln_row_stats_cn_bf16(x, n, mu, m2)
    elif dat is cn_f16:
        return cn_ln_row_stats_cn_f16(x, n, mu, m2)
    return False


cdef void cl_block_stats(const dat* x, Py_ssize_t nr, Py_ssize_t C,
                         double* m, double* q, double* fs) noexcept nogil:
    """Per-column mean m[C] and M2 q[C] of nr rows, two-pass (the block is in L2).

    float32 and half data: in float (C helper, fs: 3·C doubles of scratch),
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

    float32/half: in float lanes (C helper) where it applies. Otherwise in
    double, four rows per update of the (L1-resident) column accumulators:
    their loads and stores, not the data, bound a row-at-a-time loop. The
    grouping counts from the first row, so results depend on positions only.
    """
    cdef Py_ssize_t r = 0, c
    cdef const dat* pg
    cdef const dat* px
    cdef double g0, g1, g2, g3, d0, d1, d2, d3, m
    if dat is float:
        if cn_cl_grad_float(g, x, nr, C, mu, sg, sgx, sx):
            return
    elif dat is cn_bf16:
        if cn_cl_grad_cn_bf16(g, x, nr, C, mu, sg, sgx, sx):
            return
    elif dat is cn_f16:
        if cn_cl_grad_cn_f16(g, x, nr, C, mu, sg, sgx, sx):
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


cdef inline void cl_row_norm(const dat* x, dat* y, Py_ssize_t C,
                             const floating* mh, const floating* a, const floating* b) noexcept nogil:
    cdef Py_ssize_t c
    if dat is float:
        cn_row_norm_float(x, y, C, <const float*>mh, <const float*>a, <const float*>b)
    elif dat is cn_bf16:
        cn_row_norm_cn_bf16(x, y, C, <const float*>mh, <const float*>a, <const float*>b)
    elif dat is cn_f16:
        cn_row_norm_cn_f16(x, y, C, <const float*>mh, <const float*>a, <const float*>b)
    else:
        for c in range(C):
            st(y + c, (<floating>ld(x + c) - mh[c]) * a[c] + b[c])


cdef inline void row_affine(const dat* x, dat* y, Py_ssize_t C, const floating* a,
                            const floating* b) noexcept nogil:
    cdef Py_ssize_t c
    if dat is float:
        cn_row_affine_float(x, y, C, <const float*>a, <const float*>b)
    elif dat is cn_bf16:
        cn_row_affine_cn_bf16(x, y, C, <const float*>a, <const float*>b)
    elif dat is cn_f16:
        cn_row_affine_cn_f16(x, y, C, <const float*>a, <const float*>b)
    else:
        for c in range(C):
            st(y + c, <floating>ld(x + c) * a[c] + b[c])


cdef inline void cl_row_dx(const dat* g, const dat* x, dat* dx, Py_ssize_t C,
                           const floating* ka, const floating* mh, const floating* kb,
                           const floating* kc) noexcept nogil:
    cdef Py_ssize_t c
    if dat is float:
        cn_row_dx_float(g, x, dx, C, <const float*>ka, <const float*>mh, <const float*>kb,
                        <const float*>kc)
    elif dat is cn_bf16:
        cn_row_dx_cn_bf16(g, x, dx, C, <const float*>ka, <const float*>mh, <const float*>kb,
                          <const float*>kc)
    elif dat is cn_f16:
        cn_row_dx_cn_f16(g, x, dx, C, <const float*>ka, <const float*>mh, <const float*>kb,
                         <const float*>kc)
    else:
        for c in range(C):
            st(dx + c, <floating>ld(g + c) * ka[c] + (<floating>ld(x + c) - mh[c]) * kb[c] + kc[c])


cdef void cl_norm_rows(const dat* x, dat* y, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t C,
                       const floating* kk, const floating* kx,
                       const dat* pf=NULL, Py_ssize_t npf=0) noexcept nogil:
    """Normalize rows [r0, r1), newest first (the stats pass left them in cache):
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
            if dat is float:
                cn_cl_norm_span_float(x + rs * C, y + rs * C, (r1 - rs) * C, C, <const float*>kx,
                                      <const float*>kx + e, <const float*>kx + 2 * e)
            elif dat is cn_bf16:
                cn_cl_norm_span_cn_bf16(x + rs * C, y + rs * C, (r1 - rs) * C, C, <const float*>kx,
                                        <const float*>kx + e, <const float*>kx + 2 * e)
            else:
                cn_cl_norm_span_cn_f16(x + rs * C, y + rs * C, (r1 - rs) * C, C, <const float*>kx,
                                       <const float*>kx + e, <const float*>kx + 2 * e)
            r1 = rs
    else:
        while r1 > r0:
            r1 = r1 - 1
            cl_row_norm(x + r1 * C, y + r1 * C, C, kk, kk + C, kk + 2 * C)


cdef void cl_dx_rows(const dat* g, const dat* x, dat* dx, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t C,
                     const floating* kk, const floating* kx) noexcept nogil:
    """dx of rows [r0, r1), newest first; by spans but for float64 (see cl_norm_rows)."""
    cdef Py_ssize_t rs, ch = 16384 // C if 16384 // C > 1 else 1, e = C + 16
    if dat is not double:
        while r1 > r0:
            rs = r1 - ch if r1 - ch > r0 else r0
            if dat is float:
                cn_cl_dx_span_float(g + rs * C, x + rs * C, dx + rs * C, (r1 - rs) * C, C, <const float*>kx,
                                    <const float*>kx + e, <const float*>kx + 2 * e, <const float*>kx + 3 * e)
            elif dat is cn_bf16:
                cn_cl_dx_span_cn_bf16(g + rs * C, x + rs * C, dx + rs * C, (r1 - rs) * C, C,
                                      <const float*>kx, <const float*>kx + e, <const float*>kx + 2 * e,
                                      <const float*>kx + 3 * e)
            else:
                cn_cl_dx_span_cn_f16(g + rs * C, x + rs * C, dx + rs * C, (r1 - rs) * C, C,
                                     <const float*>kx, <const float*>kx + e, <const float*>kx + 2 * e,
                                     <const float*>kx + 3 * e)
            r1 = rs
    else:
        while r1 > r0:
            r1 = r1 - 1
            cl_row_dx(g + r1 * C, x + r1 * C, dx + r1 * C, C, kk, kk + C, kk + 2 * C, kk + 3 * C)


cdef void cl_fold_fwd(Py_ssize_t R, Py_ssize_t C, Py_ssize_t rb, Py_ssize_t nblk, Py_ssize_t j,
                      const double* part, double eps, const floating* w, const floating* b,
                      floating* mean, floating* var, floating* rstd, floating* kk) noexcept nogil:
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
        fwd_consts(<double>R, s[c - c0], m2[c - c0], eps, w[c], b[c], mean + c, var + c, rstd + c, k3)
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
                       int nt) noexcept nogil:
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
            cl_fold_fwd(R, C, rb, nblk, j, part, eps, w, b, mean, var, rstd, kk)
    else:
        for j in prange(nf, num_threads=nt, use_threads_if=nt > 1 and nf > 1, schedule="static"):
            cl_fold_fwd(R, C, rb, nblk, j, part, eps, w, b, mean, var, rstd, kk)
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
            cl_norm_rows(x, y, lo * rb, hi * rb if hi * rb < R else R, C, kk, kx)
    else:
        for t in prange(nt, num_threads=nt, use_threads_if=nt > 1, schedule="static", chunksize=1):
            lo = split_lo(nblk, nt, t)
            hi = split_lo(nblk, nt, t + 1)
            cl_norm_rows(x, y, lo * rb, hi * rb if hi * rb < R else R, C, kk, kx)
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


cdef void grp_fwd_unit(const dat* x, dat* y, Py_ssize_t C, Py_ssize_t S, Py_ssize_t cg,
                       Py_ssize_t u, double eps, const floating* w, const floating* b,
                       floating* mean, floating* var, floating* rstd) noexcept nogil:
    """Group u = n·G + g: statistics, then normalize while it is in cache."""
    cdef Py_ssize_t G = C // cg, g = u % G, n = u // G, c0 = g * cg, ci, i, L = cg * S
    cdef Py_ssize_t off = (n * C + c0) * S
    cdef double mu, m2, v, r, a
    cdef floating mh, ml, rf
    # float lanes while the group fits the L2 (two passes over it), else double blocks
    if not (L <= BLK and row_stats_f(x + off, L, &mu, &m2)):
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
        ml = <floating>(mu - <double>mh)
        rf = <floating>r
        if dat is float:
            cn_ln_fwd_float(x + off, y + off, cg, mh, ml, rf, <const float*>w + c0, <const float*>b + c0)
        elif dat is cn_bf16:
            cn_ln_fwd_cn_bf16(x + off, y + off, cg, mh, ml, rf, <const float*>w + c0, <const float*>b + c0)
        elif dat is cn_f16:
            cn_ln_fwd_cn_f16(x + off, y + off, cg, mh, ml, rf, <const float*>w + c0, <const float*>b + c0)
        else:
            for i in range(cg):
                st(y + (off + i), ((<floating>ld(x + (off + i)) - mh) - ml) * rf * w[c0 + i] + b[c0 + i])
        return
    for ci in range(cg):
        # a channel's share of the next group toward L2 (this group is in cache):
        # memory keeps streaming while this core normalizes (a hint, past the end
        # too); groups of few channels would issue it in one burst that stalls
        if cg >= 4:
            cn_prefetch_l2(x + off + L + ci * S, S * sizeof(dat))
        a = <double>w[c0 + ci] * r
        norm_run(x + off + ci * S, y + off + ci * S, S, mh, <floating>a,
                 <floating>(<double>b[c0 + ci] - (mu - <double>mh) * a))


cdef inline void wsums(const dat* g, const dat* x, const floating* w, Py_ssize_t n, double m,
                       double* awg, double* awgx, double* ax) noexcept nogil:
    """awg += w·g, awgx += w·g·(x - m), ax += x - m, lane-wise (C helper in _kernels.h)."""
    if dat is float:
        cn_wsums_float(g, x, <const float*>w, n, m, awg, awgx, ax)
    elif dat is double:
        cn_wsums_double(g, x, <const double*>w, n, m, awg, awgx, ax)
    elif dat is cn_bf16:
        cn_wsums_cn_bf16(g, x, <const float*>w, n, m, awg, awgx, ax)
    else:
        cn_wsums_cn_f16(g, x, <const float*>w, n, m, awg, awgx, ax)


cdef inline void colsums(const dat* g, const dat* x, Py_ssize_t stride, int rows, Py_ssize_t n,
                         const double* m, const double* dl, const double* r,
                         double* pb, double* pw) noexcept nogil:
    if dat is float:
        cn_colsums_float(g, x, stride, rows, n, m, dl, r, pb, pw)
    elif dat is double:
        cn_colsums_double(g, x, stride, rows, n, m, dl, r, pb, pw)
    elif dat is cn_bf16:
        cn_colsums_cn_bf16(g, x, stride, rows, n, m, dl, r, pb, pw)
    else:
        cn_colsums_cn_f16(g, x, stride, rows, n, m, dl, r, pb, pw)


cdef void rows_bwd(const dat* g, const dat* x, dat* dx, Py_ssize_t C, Py_ssize_t cg, Py_ssize_t G,
                   Py_ssize_t gi, Py_ssize_t n0, Py_ssize_t n1,
                   const floating* mean, const floating* rstd, const floating* w,
                   double* pw, double* pb) noexcept nogil:
    """Backward of rows n0..n1-1 of a per-element-affine group (S == 1: LayerNorm).

    Per row, one reduction pass (the two weighted sums and the re-centring
    shift) and the dx pass; then the dweight/dbias column sums of four rows
    at a time (fixed from n0), all while the rows are in L1/L2.
    """
    cdef Py_ssize_t c0 = gi * cg, n, k, off, i
    cdef int rows
    cdef double ag[LANES]
    cdef double agx[LANES]
    cdef double ax[LANES]
    cdef double m4[4]
    cdef double dl4[4]
    cdef double r4[4]
    cdef double mu, r, dl, swg, swgx, m = <double>cg
    cdef floating mh, ml, rf, kb, kc
    n = n0
    while n < n1:
        rows = <int>(n1 - n if n1 - n < 4 else 4)
        for k in range(rows):
            mu = mean[(n + k) * G + gi]
            r = rstd[(n + k) * G + gi]
            off = (n + k) * C + c0
            lanes_zero(ag)
            lanes_zero(agx)
            lanes_zero(ax)
            wsums(g + off, x + off, w + c0, cg, mu, ag, agx, ax)
            swg = lanes_total(ag)
            swgx = lanes_total(agx)
            dl = recentre(m, lanes_total(ax), swg, &swgx)  # centre: the row's exact mean
            m4[k] = mu
            dl4[k] = dl
            r4[k] = r
            if dx == NULL:
                continue
            # dx = r·w·g - r·swg/m - r³·swgx/m·(x - mu - dl)
            mh = <floating>mu
            ml = <floating>((mu - <double>mh) + dl)
            rf = <floating>r
            kb = <floating>(-r * r * r * swgx / m)
            kc = <floating>(-r * swg / m)
            if dat is float:
                cn_ln_dx_float(g + off, x + off, dx + off, cg, <const float*>w + c0, rf, mh, ml, kb, kc)
            elif dat is cn_bf16:
                cn_ln_dx_cn_bf16(g + off, x + off, dx + off, cg, <const float*>w + c0, rf, mh, ml, kb, kc)
            elif dat is cn_f16:
                cn_ln_dx_cn_f16(g + off, x + off, dx + off, cg, <const float*>w + c0, rf, mh, ml, kb, kc)
            else:
                for i in range(cg):
                    st(dx + (off + i), (w[c0 + i] * <floating>ld(g + (off + i))) * rf
                       + ((<floating>ld(x + (off + i)) - mh) - ml) * kb + kc)
        off = n * C + c0
        colsums(g + off, x + off, C, rows, cg, m4, dl4, r4, pb + c0, pw + c0)
        n += rows


cdef void grp_bwd_unit(const dat* g, const dat* x, dat* dx,
                       Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t cg, Py_ssize_t sbs,
                       Py_ssize_t u, const floating* mean, const floating* rstd, const floating* w,
                       double* pw, double* pb, double* chs) noexcept nogil:
    """Unit u = sb·G + g: group g of the samples of sample block sb.

    pw/pb are this sample block's dweight/dbias partials (length C), summed
    over its samples in order; chs is 2·cg doubles of scratch.
    """
    cdef Py_ssize_t G = C // cg, gi = u % G, sb = u // G, c0 = gi * cg, ci, n, n1, off, o2
    cdef double ag[LANES]
    cdef double agx[LANES]
    cdef double ax[LANES]
    cdef double mu, r, m = <double>(cg * S), swg, swgx, a, bx, wd, d, sx
    cdef floating mh, kb
    n1 = (sb + 1) * sbs if (sb + 1) * sbs < N else N
    if S == 1:
        # one sweep per row, float lanes and column partials (C helper); chs: 2·cg floats
        if dat is float:
            cn_ln_bwd_rows_float(g, x, dx, C, cg, G, gi, sb * sbs, n1, <const float*>mean,
                                 <const float*>rstd, <const float*>w, pw, pb, <float*>chs)
        elif dat is cn_bf16:
            cn_ln_bwd_rows_cn_bf16(g, x, dx, C, cg, G, gi, sb * sbs, n1, <const float*>mean,
                                   <const float*>rstd, <const float*>w, pw, pb, <float*>chs)
        elif dat is cn_f16:
            cn_ln_bwd_rows_cn_f16(g, x, dx, C, cg, G, gi, sb * sbs, n1, <const float*>mean,
                                  <const float*>rstd, <const float*>w, pw, pb, <float*>chs)
        else:
            rows_bwd(g, x, dx, C, cg, G, gi, sb * sbs, n1, mean, rstd, w, pw, pb)
        return
    for n in range(sb * sbs, n1):
        mu = mean[n * G + gi]
        r = rstd[n * G + gi]
        off = (n * C + c0) * S
        swg = 0.0
        swgx = 0.0
        sx = 0.0
        for ci in range(cg):
            lanes_zero(ag)
            lanes_zero(agx)
            lanes_zero(ax)
            o2 = off + ci * S
            grad_run(g + o2, x + o2, S, mu, ag, agx, ax)
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
            dx_run(g + o2, x + o2, dx + o2, S, <floating>(<double>w[c0 + ci] * r), mh, kb,
                   <floating>(-r * swg / m + ((mu - <double>mh) + d) * (r * r * r * swgx / m)))


# ---------------------------------------------- per-sample, channels-last --
# Sample n is S rows of C; group g is columns [g·cg, (g+1)·cg) of every row.
# Statistics per row block of rbs rows, merged in order.

cdef inline bint cl_cols_to_groups(const dat* x, Py_ssize_t nr, Py_ssize_t C, Py_ssize_t cg,
                                   double* m, double* q, double* ws,
                                   double* gcnt, double* gmu, double* gm2) noexcept nogil:
    """float32/half: a row block's column statistics in float (C helper), merged
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
                       double* scratch, floating* kk) noexcept nogil:
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
                       mean + n * G + gi, var + n * G + gi, rstd + n * G + gi, k3)
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
    cl_norm_rows(xs, y + n * S * C, 0, S, C, kk, kx, xs + S * C, (rbs if rbs < S else S) * C)


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


cdef void ln_fwd_units(const dat* x, dat* y, Py_ssize_t C, Py_ssize_t cg, Py_ssize_t lo,
                       Py_ssize_t hi, double eps, const float* w, const float* b,
                       float* mean, float* var, float* rstd) noexcept nogil:
    """Units [lo, hi) of a float32/half S == 1 problem (LayerNorm rows), as grp_fwd_unit
    (same arithmetic), eight rows at a time: the statistics of eight rows, then
    their eight independent sqrt/div chains, then their normalization — short
    rows are otherwise bound by one row's latency chain."""
    cdef double mu8[8]
    cdef double m28[8]
    cdef double v8[8]
    cdef double r8[8]
    cdef Py_ssize_t G = C // cg, u0 = lo, u, j, nb, c0
    cdef float mh
    cdef int bad
    while u0 < hi:
        nb = hi - u0 if hi - u0 < 8 else 8
        if cg <= CN_SHORT_MAX:  # the eight rows' statistics interleaved (C helper)
            if dat is float:
                bad = cn_short_rows_stats_float(x + u0 * cg, cg, <int>nb, mu8, m28)
            elif dat is cn_bf16:
                bad = cn_short_rows_stats_cn_bf16(x + u0 * cg, cg, <int>nb, mu8, m28)
            elif dat is cn_f16:
                bad = cn_short_rows_stats_cn_f16(x + u0 * cg, cg, <int>nb, mu8, m28)
            else:
                bad = (1 << nb) - 1
            for j in range(nb):
                if bad & (1 << j):
                    run_stats(x + (u0 + j) * cg, cg, &mu8[j], &m28[j])
        else:
            for j in range(nb):
                u = u0 + j
                if not row_stats_f(x + u * cg, cg, &mu8[j], &m28[j]):
                    run_stats(x + u * cg, cg, &mu8[j], &m28[j])
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
                if dat is float:
                    cn_ln_fwd_float(x + u * cg, y + u * cg, cg, mh, <float>(mu8[j] - <double>mh),
                                    <float>r8[j], w + c0, b + c0)
                elif dat is cn_bf16:
                    cn_ln_fwd_cn_bf16(x + u * cg, y + u * cg, cg, mh, <float>(mu8[j] - <double>mh),
                                      <float>r8[j], w + c0, b + c0)
                elif dat is cn_f16:
                    cn_ln_fwd_cn_f16(x + u * cg, y + u * cg, cg, mh, <float>(mu8[j] - <double>mh),
                                     <float>r8[j], w + c0, b + c0)
        u0 += nb


cdef void grp_fwd(const dat* x, dat* y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                  Py_ssize_t G, bint cl, Py_ssize_t rbs, double eps, const floating* w, const floating* b,
                  floating* mean, floating* var, floating* rstd,
                  double* scratch, Py_ssize_t sstride, floating* kk, int nt) noexcept nogil:
    cdef Py_ssize_t t, lo, hi, u, cg = C // G
    cdef Py_ssize_t nu = N if cl else N * G
    if nt == 1:  # serial calls skip the OpenMP runtime (~1 us per region)
        for t in range(nt):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            if dat is not double:
                if S == 1 and not cl:
                    ln_fwd_units(x, y, C, cg, lo, hi, eps, <const float*>w, <const float*>b,
                                 <float*>mean, <float*>var, <float*>rstd)
                    continue
            for u in range(lo, hi):
                if cl:
                    cls_fwd_unit(x, y, S, C, cg, rbs, u, eps, w, b, mean, var, rstd,
                                 scratch + t * sstride, kk + t * (6 * C + 48))
                else:
                    grp_fwd_unit(x, y, C, S, cg, u, eps, w, b, mean, var, rstd)
    else:
        for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
            lo = split_lo(nu, nt, t)
            hi = split_lo(nu, nt, t + 1)
            if dat is not double:
                if S == 1 and not cl:
                    ln_fwd_units(x, y, C, cg, lo, hi, eps, <const float*>w, <const float*>b,
                                 <float*>mean, <float*>var, <float*>rstd)
                    hi = lo  # done: skip the per-unit loop
            for u in range(lo, hi):
                if cl:
                    cls_fwd_unit(x, y, S, C, cg, rbs, u, eps, w, b, mean, var, rstd,
                                 scratch + t * sstride, kk + t * (6 * C + 48))
                else:
                    grp_fwd_unit(x, y, C, S, cg, u, eps, w, b, mean, var, rstd)
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
                  int nt) noexcept nogil:
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
                                 pw + (u // G) * C, pb + (u // G) * C, scratch + t * sstride)
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
                                 pw + (u // G) * C, pb + (u // G) * C, scratch + t * sstride)
            cn_sfence()  # order this thread's streaming stores before the join


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


# ------------------------------------------------------- Python wrappers --
# Every wrapper checks what the kernels would otherwise misread (type,
# contiguity, length, dtype, writability) in C, then dispatches on the data
# dtype: float32 and the half types use float32 parameters and statistics,
# float64 uses float64.

try:
    import ml_dtypes as _ml_dtypes

    _BF16_NUM = np.dtype(_ml_dtypes.bfloat16).num
except ImportError:  # pragma: no cover - ml_dtypes is a dependency
    _BF16_NUM = -1

cdef int F32 = cnp.NPY_FLOAT32
cdef int F64 = cnp.NPY_FLOAT64
cdef int F16 = cnp.NPY_FLOAT16
cdef int BF16 = _BF16_NUM

_EMPTY = np.empty(1)  # stands in for scratch a path does not use


cdef inline void* ptr(object a):
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline void* optr(object a):
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef str _dtname(int dt):
    return str(np.dtype(_ml_dtypes.bfloat16) if dt == BF16 and BF16 >= 0 else cnp.PyArray_DescrFromType(dt))


cdef int _check(x, int dt, Py_ssize_t size, str name) except -1:
    """Refuse arrays the kernels would read out of bounds or misread."""
    if not isinstance(x, cnp.ndarray):  # a C type check (np.ndarray would be two lookups)
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    cdef cnp.ndarray a = x
    if not cnp.PyArray_IS_C_CONTIGUOUS(a) or cnp.PyArray_TYPE(a) != dt or cnp.PyArray_SIZE(a) != size:
        raise ValueError(f"{name}: expected a C-contiguous {_dtname(dt)} array of {size} values, "
                         f"got shape {x.shape}, dtype {x.dtype}")
    return 0


cdef int _writable(x, str name) except -1:
    if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>x):
        raise ValueError(f"{name}: output array is read-only")
    return 0


# Team size of the latest call (any thread); lets tests check that limits hold.
cdef int _last_threads = 0


def last_threads():
    """Return the thread count the most recent kernel call ran with."""
    return _last_threads


cdef int _nthreads(Py_ssize_t work, Py_ssize_t units, int nt) noexcept:
    global _last_threads
    cdef int t = 1
    if work >= SERIAL_ELEMS and units >= 2:
        t = <int>min(<Py_ssize_t>max(nt, 1), units)
    _last_threads = t
    return t


cdef int _dtype_num(x) except -1:
    """The data dtype's number; TypeError for dtypes without kernels."""
    if not isinstance(x, cnp.ndarray):
        raise TypeError(f"x: expected a numpy.ndarray, got {type(x).__name__}")
    cdef int dt = cnp.PyArray_TYPE(<cnp.ndarray>x)
    if dt != F32 and dt != F64 and dt != F16 and dt != BF16:
        raise TypeError(f"x: the cython kernels take float32 or float64 (or float16, bfloat16), got {x.dtype}")
    return dt


cdef inline void _stream(Py_ssize_t out_bytes) noexcept:
    """Choose streaming stores for this call's output (a hint: any value is correct)."""
    global cn_nt_store
    cn_nt_store = 1 if out_bytes >= NT_BYTES else 0


cdef inline int _pnum(int dt) noexcept:
    """Parameter/statistics dtype number for data dtype ``dt``."""
    return F64 if dt == F64 else F32


cdef inline cnp.ndarray _empty1(Py_ssize_t n, int dt):
    cdef cnp.npy_intp d = n
    return cnp.PyArray_EMPTY(1, &d, dt, 0)


def cf_geometry(Py_ssize_t N, Py_ssize_t S):
    """Return (rb, sp, nsp, nblk): row-block size, piece length, pieces per row, blocks per channel."""
    if S <= BLK:
        rb = max(1, BLK // S)
        return rb, S, 1, (N + rb - 1) // rb
    nsp = (S + BLK - 1) // BLK
    return 1, BLK, nsp, N * nsp


def cl_geometry(Py_ssize_t R, Py_ssize_t C):
    """Return (rb, nblk) of a channels-last cross-sample problem of R rows."""
    rb = max((R + MAXBLK - 1) // MAXBLK, max(1, BLK // C), 1)
    return rb, (R + rb - 1) // rb


cdef inline Py_ssize_t _sample_block(Py_ssize_t N, Py_ssize_t per_sample) noexcept:
    """Samples per block of the per-sample dweight/dbias partials: at most MAXBLK
    blocks, each of at least SERIAL_ELEMS values (a block of a few short rows
    would cost its C-long partial rows more than its work). Shape-determined."""
    cdef Py_ssize_t sbs = (N + MAXBLK - 1) // MAXBLK
    cdef Py_ssize_t least = (SERIAL_ELEMS + per_sample - 1) // per_sample
    return max(1, min(N, max(sbs, least)))


def forward_train(x, bint cl, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G,
                  weight, bias, double eps, int nt):
    """Training forward into new arrays: ``(y, mean, var, rstd)``.

    ``G == 0``: cross-sample (statistics shape ``(C,)``), else per-sample with
    G groups (``(N, G)``). Other arguments as in :func:`cross_forward`.
    """
    cdef int dt = _dtype_num(x)
    cdef int pt = _pnum(dt)
    cdef cnp.npy_intp sd[2]
    sd[0] = C if G == 0 else N
    sd[1] = G
    cdef cnp.ndarray y = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(<cnp.ndarray>x), cnp.PyArray_DIMS(<cnp.ndarray>x),
                                           dt, 0)
    cdef cnp.ndarray mean = cnp.PyArray_EMPTY(1 if G == 0 else 2, sd, pt, 0)
    cdef cnp.ndarray var = cnp.PyArray_EMPTY(1 if G == 0 else 2, sd, pt, 0)
    cdef cnp.ndarray rstd = cnp.PyArray_EMPTY(1 if G == 0 else 2, sd, pt, 0)
    if G == 0:
        _cross_forward(x, y, cl, N, C, S, weight, bias, mean, var, rstd, eps, nt)
    else:
        _group_forward(x, y, cl, N, C, S, G, weight, bias, mean, var, rstd, eps, nt)
    return y, mean, var, rstd


def cross_forward(x, y, bint cl, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, weight, bias,
                  mean, var, rstd, double eps, int nt):
    """Cross-sample (BatchNorm) training forward; ``y=None`` computes statistics only.

    Parameters
    ----------
    x, y : ndarray
        Input and output, C-contiguous ``(N, C, S)`` or (``cl``) ``(N, S, C)``;
        float32, float64, float16 or bfloat16.
    cl : bool
        Channels-last layout.
    N, C, S : int
        Problem sizes.
    weight, bias : ndarray
        Length-C affine parameters in the statistics dtype (float64 for
        float64 data, else float32).
    mean, var, rstd : ndarray
        Length-C outputs in the statistics dtype.
    eps : float
        Added to the variance.
    nt : int
        Most threads to use.
    """
    _cross_forward(x, y, cl, N, C, S, weight, bias, mean, var, rstd, eps, nt)


cdef int _cross_forward(x, y, bint cl, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, weight, bias,
                        mean, var, rstd, double eps, int nt) except -1:
    cdef int dt = _dtype_num(x)
    cdef int pt = _pnum(dt)
    cdef Py_ssize_t size = N * C * S
    _check(x, dt, size, "x")
    if y is not None:
        _check(y, dt, size, "y")
        _writable(y, "y")
    _check(weight, pt, C, "weight")
    _check(bias, pt, C, "bias")
    _check(mean, pt, C, "mean")
    _check(var, pt, C, "var")
    _check(rstd, pt, C, "rstd")
    cdef cnp.ndarray part, kk = _empty1(3 * C + 3 * (C + 16), pt)
    cdef Py_ssize_t rb, sp = 0, nsp = 0, nblk
    cdef bint fused = False
    cdef int t
    cl = cl or S == 1  # (N, C, 1) channels-first is (N, 1, C) channels-last
    cdef cnp.ndarray fscr = _EMPTY
    if cl:
        rb, nblk = cl_geometry(N * S, C)
        part = _empty1(2 * nblk * C, F64)
        t = _nthreads(size, nblk, nt)
        fscr = _empty1(3 * C * t, F64)
    else:
        rb, sp, nsp, nblk = cf_geometry(N, S)
        t = _nthreads(size, C * nblk, nt)
        # One thread per channel keeps the channel in L2 between its passes
        # when there are enough channels to share and a channel fits.
        fused = (t == 1 or C >= 4 * t) and N * S * cnp.PyArray_ITEMSIZE(<cnp.ndarray>x) <= FUSE_BYTES
        part = _empty1(0 if fused else 3 * C * nblk, F64)
    cdef void* px = ptr(x)
    cdef void* py = optr(y)
    cdef void* pw = ptr(weight)
    cdef void* pb = ptr(bias)
    cdef void* pm = ptr(mean)
    cdef void* pv = ptr(var)
    cdef void* pr = ptr(rstd)
    cdef void* pk = ptr(kk)
    cdef double* pp = <double*>ptr(part)
    cdef double* pfs = <double*>ptr(fscr)
    _stream(0 if y is None else size * cnp.PyArray_ITEMSIZE(<cnp.ndarray>x))
    with nogil:
        if cl:
            if dt == F32:
                cl_cross_fwd(<float*>px, <float*>py, N * S, C, rb, nblk, pp, eps, <float*>pw,
                             <float*>pb, <float*>pm, <float*>pv, <float*>pr, <float*>pk, pfs, t)
            elif dt == F64:
                cl_cross_fwd(<double*>px, <double*>py, N * S, C, rb, nblk, pp, eps, <double*>pw,
                             <double*>pb, <double*>pm, <double*>pv, <double*>pr, <double*>pk, pfs, t)
            elif dt == F16:
                cl_cross_fwd(<cn_f16*>px, <cn_f16*>py, N * S, C, rb, nblk, pp, eps, <float*>pw,
                             <float*>pb, <float*>pm, <float*>pv, <float*>pr, <float*>pk, pfs, t)
            else:
                cl_cross_fwd(<cn_bf16*>px, <cn_bf16*>py, N * S, C, rb, nblk, pp, eps, <float*>pw,
                             <float*>pb, <float*>pm, <float*>pv, <float*>pr, <float*>pk, pfs, t)
        else:
            if dt == F32:
                cf_cross_fwd(<float*>px, <float*>py, N, C, S, rb, sp, nsp, nblk, fused, pp, eps,
                             <float*>pw, <float*>pb, <float*>pm, <float*>pv, <float*>pr, <float*>pk, t)
            elif dt == F64:
                cf_cross_fwd(<double*>px, <double*>py, N, C, S, rb, sp, nsp, nblk, fused, pp, eps,
                             <double*>pw, <double*>pb, <double*>pm, <double*>pv, <double*>pr,
                             <double*>pk, t)
            elif dt == F16:
                cf_cross_fwd(<cn_f16*>px, <cn_f16*>py, N, C, S, rb, sp, nsp, nblk, fused, pp, eps,
                             <float*>pw, <float*>pb, <float*>pm, <float*>pv, <float*>pr, <float*>pk, t)
            else:
                cf_cross_fwd(<cn_bf16*>px, <cn_bf16*>py, N, C, S, rb, sp, nsp, nblk, fused, pp, eps,
                             <float*>pw, <float*>pb, <float*>pm, <float*>pv, <float*>pr, <float*>pk, t)
    return 0


def cross_backward(dy, x, dx, bint cl, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, mean, rstd, weight,
                   out_a, out_b, int mode, int nt, mean_dy=None, mean_dy_xhat=None):
    """Cross-sample backward in one of four modes.

    ``TRAIN``: dx through batch statistics, ``out_a = Σ dy·xhat``,
    ``out_b = Σ dy``. ``EVAL``: ``dx = dy·weight·rstd`` in the same sweep as
    the sums. ``SUMS``: the sums only (``dx`` is None). ``APPLY``:
    ``dx = weight·rstd·(dy - mean_dy - xhat·mean_dy_xhat)`` only (``out_a``,
    ``out_b`` are None). Other arguments as in :func:`cross_forward`.
    """
    cdef int dt = _dtype_num(x)
    cdef int pt = _pnum(dt)
    cdef Py_ssize_t size = N * C * S
    _check(dy, dt, size, "dy")
    _check(x, dt, size, "x")
    if mode != MODE_SUMS:
        _check(dx, dt, size, "dx")
        _writable(dx, "dx")
    _check(mean, pt, C, "mean")
    _check(rstd, pt, C, "rstd")
    _check(weight, pt, C, "weight")
    if mode == MODE_APPLY:
        _check(mean_dy, pt, C, "mean_dy")
        _check(mean_dy_xhat, pt, C, "mean_dy_xhat")
        out_a = out_b = _empty1(C, pt)  # not written
    else:
        _check(out_a, pt, C, "out_a")
        _check(out_b, pt, C, "out_b")
        mean_dy = mean_dy_xhat = mean  # not read
    cdef cnp.ndarray part, mud = _empty1(C, F64), kk = _empty1(4 * C + 4 * (C + 16), pt)
    cdef Py_ssize_t rb, sp = 0, nsp = 0, nblk
    cdef bint fused = False
    cdef int t
    cl = cl or S == 1
    if cl:
        rb, nblk = cl_geometry(N * S, C)
        part = _empty1(3 * nblk * C, F64)
        t = _nthreads(size, nblk, nt)
    else:
        rb, sp, nsp, nblk = cf_geometry(N, S)
        t = _nthreads(size, C * nblk, nt)
        fused = (t == 1 or C >= 4 * t) and 2 * N * S * cnp.PyArray_ITEMSIZE(<cnp.ndarray>x) <= FUSE_BYTES
        part = _empty1(0 if fused else 3 * C * nblk, F64)
    cdef void* pg = ptr(dy)
    cdef void* px = ptr(x)
    cdef void* pdx = optr(dx)
    cdef void* pm = ptr(mean)
    cdef void* pr = ptr(rstd)
    cdef void* pw = ptr(weight)
    cdef void* pmd = ptr(mean_dy)
    cdef void* pmdx = ptr(mean_dy_xhat)
    cdef void* pa = ptr(out_a)
    cdef void* pb = ptr(out_b)
    cdef void* pk = ptr(kk)
    cdef double* pp = <double*>ptr(part)
    cdef double* pmu = <double*>ptr(mud)
    _stream(0 if dx is None else size * cnp.PyArray_ITEMSIZE(<cnp.ndarray>x))
    with nogil:
        if cl:
            if dt == F32:
                cl_cross_bwd(<float*>pg, <float*>px, <float*>pdx, N * S, C, rb, nblk, pp, mode,
                             <float*>pm, <float*>pr, <float*>pw, <float*>pmd, <float*>pmdx,
                             <float*>pa, <float*>pb, <float*>pk, pmu, t)
            elif dt == F64:
                cl_cross_bwd(<double*>pg, <double*>px, <double*>pdx, N * S, C, rb, nblk, pp, mode,
                             <double*>pm, <double*>pr, <double*>pw, <double*>pmd, <double*>pmdx,
                             <double*>pa, <double*>pb, <double*>pk, pmu, t)
            elif dt == F16:
                cl_cross_bwd(<cn_f16*>pg, <cn_f16*>px, <cn_f16*>pdx, N * S, C, rb, nblk, pp, mode,
                             <float*>pm, <float*>pr, <float*>pw, <float*>pmd, <float*>pmdx,
                             <float*>pa, <float*>pb, <float*>pk, pmu, t)
            else:
                cl_cross_bwd(<cn_bf16*>pg, <cn_bf16*>px, <cn_bf16*>pdx, N * S, C, rb, nblk, pp, mode,
                             <float*>pm, <float*>pr, <float*>pw, <float*>pmd, <float*>pmdx,
                             <float*>pa, <float*>pb, <float*>pk, pmu, t)
        else:
            if dt == F32:
                cf_cross_bwd(<float*>pg, <float*>px, <float*>pdx, N, C, S, rb, sp, nsp, nblk, fused,
                             pp, mode, <float*>pm, <float*>pr, <float*>pw, <float*>pmd,
                             <float*>pmdx, <float*>pa, <float*>pb, <float*>pk, t)
            elif dt == F64:
                cf_cross_bwd(<double*>pg, <double*>px, <double*>pdx, N, C, S, rb, sp, nsp, nblk,
                             fused, pp, mode, <double*>pm, <double*>pr, <double*>pw, <double*>pmd,
                             <double*>pmdx, <double*>pa, <double*>pb, <double*>pk, t)
            elif dt == F16:
                cf_cross_bwd(<cn_f16*>pg, <cn_f16*>px, <cn_f16*>pdx, N, C, S, rb, sp, nsp, nblk, fused,
                             pp, mode, <float*>pm, <float*>pr, <float*>pw, <float*>pmd,
                             <float*>pmdx, <float*>pa, <float*>pb, <float*>pk, t)
            else:
                cf_cross_bwd(<cn_bf16*>pg, <cn_bf16*>px, <cn_bf16*>pdx, N, C, S, rb, sp, nsp, nblk,
                             fused, pp, mode, <float*>pm, <float*>pr, <float*>pw, <float*>pmd,
                             <float*>pmdx, <float*>pa, <float*>pb, <float*>pk, t)


def group_forward(x, y, bint cl, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G,
                  weight, bias, mean, var, rstd, double eps, int nt):
    """Per-sample training forward: statistics per (n, g) over C/G channels and S.

    ``mean``, ``var``, ``rstd`` are ``(N, G)`` outputs in the statistics
    dtype; other arguments as in :func:`cross_forward`.
    """
    _group_forward(x, y, cl, N, C, S, G, weight, bias, mean, var, rstd, eps, nt)


cdef int _group_forward(x, y, bint cl, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G,
                        weight, bias, mean, var, rstd, double eps, int nt) except -1:
    cdef int dt = _dtype_num(x)
    cdef int pt = _pnum(dt)
    cdef Py_ssize_t size = N * C * S
    _check(x, dt, size, "x")
    _check(y, dt, size, "y")
    _writable(y, "y")
    _check(weight, pt, C, "weight")
    _check(bias, pt, C, "bias")
    _check(mean, pt, N * G, "mean")
    _check(var, pt, N * G, "var")
    _check(rstd, pt, N * G, "rstd")
    if G < 1 or C % G:
        raise ValueError(f"groups: expected a divisor of C={C}, got {G}")
    cl = cl and S > 1  # (N, 1, C) channels-last is (N, C, 1) channels-first
    cdef int t = _nthreads(size, N if cl else N * G, nt)
    cdef Py_ssize_t rbs = max(1, BLK // C), sstride = 5 * C + 3 * G
    # scratch only for channels-last; small calls skip the allocations
    cdef cnp.ndarray scratch = _empty1(t * sstride, F64) if cl else _EMPTY
    cdef cnp.ndarray kk = _empty1(t * (6 * C + 48), pt) if cl else _EMPTY
    cdef void* px = ptr(x)
    cdef void* py = ptr(y)
    cdef void* pw = ptr(weight)
    cdef void* pb = ptr(bias)
    cdef void* pm = ptr(mean)
    cdef void* pv = ptr(var)
    cdef void* pr = ptr(rstd)
    cdef void* pk = ptr(kk)
    cdef double* ps = <double*>ptr(scratch)
    _stream(size * cnp.PyArray_ITEMSIZE(<cnp.ndarray>x))
    with nogil:
        if dt == F32:
            grp_fwd(<float*>px, <float*>py, N, C, S, G, cl, rbs, eps, <float*>pw, <float*>pb,
                    <float*>pm, <float*>pv, <float*>pr, ps, sstride, <float*>pk, t)
        elif dt == F64:
            grp_fwd(<double*>px, <double*>py, N, C, S, G, cl, rbs, eps, <double*>pw,
                    <double*>pb, <double*>pm, <double*>pv, <double*>pr, ps, sstride,
                    <double*>pk, t)
        elif dt == F16:
            grp_fwd(<cn_f16*>px, <cn_f16*>py, N, C, S, G, cl, rbs, eps, <float*>pw, <float*>pb,
                    <float*>pm, <float*>pv, <float*>pr, ps, sstride, <float*>pk, t)
        else:
            grp_fwd(<cn_bf16*>px, <cn_bf16*>py, N, C, S, G, cl, rbs, eps, <float*>pw, <float*>pb,
                    <float*>pm, <float*>pv, <float*>pr, ps, sstride, <float*>pk, t)
    return 0


def group_backward(dy, x, dx, bint cl, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G,
                   mean, rstd, weight, int nt):
    """Per-sample training backward; returns ``(dweight, dbias)`` in the statistics dtype.

    ``dx`` (written in place) may be None to compute the parameter gradients only.
    """
    cdef int dt = _dtype_num(x)
    cdef int pt = _pnum(dt)
    cdef Py_ssize_t size = N * C * S
    _check(dy, dt, size, "dy")
    _check(x, dt, size, "x")
    if dx is not None:
        _check(dx, dt, size, "dx")
        _writable(dx, "dx")
    _check(weight, pt, C, "weight")
    _check(mean, pt, N * G, "mean")
    _check(rstd, pt, N * G, "rstd")
    if G < 1 or C % G:
        raise ValueError(f"groups: expected a divisor of C={C}, got {G}")
    cl = cl and S > 1
    cdef Py_ssize_t sbs = _sample_block(N, C * S)
    cdef Py_ssize_t nsb = (N + sbs - 1) // sbs
    cdef int t = _nthreads(size, nsb if cl else nsb * G, nt)
    cdef Py_ssize_t sstride = 4 * C if cl else 2 * (C // G)
    # dweight/dbias partials per sample block, reduced below in block order
    cdef cnp.ndarray pwa = _empty1(nsb * C, F64), pba = _empty1(nsb * C, F64)
    cdef cnp.ndarray scratch = _empty1(t * sstride, F64)
    cdef cnp.ndarray kk = _empty1(t * (8 * C + 64) if cl else 0, pt)
    cdef cnp.ndarray dw = _empty1(C, pt), db = _empty1(C, pt)
    cdef void* pg = ptr(dy)
    cdef void* px = ptr(x)
    cdef void* pdx = optr(dx)
    cdef void* pm = ptr(mean)
    cdef void* pr = ptr(rstd)
    cdef void* pw = ptr(weight)
    cdef void* pk = ptr(kk)
    cdef double* ppw = <double*>ptr(pwa)
    cdef double* ppb = <double*>ptr(pba)
    cdef double* ps = <double*>ptr(scratch)
    cdef void* pdw = ptr(dw)
    cdef void* pdb = ptr(db)
    _stream(0 if dx is None else size * cnp.PyArray_ITEMSIZE(<cnp.ndarray>x))
    with nogil:
        if dt == F32:
            grp_bwd(<float*>pg, <float*>px, <float*>pdx, N, C, S, G, cl, sbs, nsb, <float*>pm,
                    <float*>pr, <float*>pw, ppw, ppb, ps, sstride, <float*>pk, t)
        elif dt == F64:
            grp_bwd(<double*>pg, <double*>px, <double*>pdx, N, C, S, G, cl, sbs, nsb,
                    <double*>pm, <double*>pr, <double*>pw, ppw, ppb, ps, sstride,
                    <double*>pk, t)
        elif dt == F16:
            grp_bwd(<cn_f16*>pg, <cn_f16*>px, <cn_f16*>pdx, N, C, S, G, cl, sbs, nsb, <float*>pm,
                    <float*>pr, <float*>pw, ppw, ppb, ps, sstride, <float*>pk, t)
        else:
            grp_bwd(<cn_bf16*>pg, <cn_bf16*>px, <cn_bf16*>pdx, N, C, S, G, cl, sbs, nsb, <float*>pm,
                    <float*>pr, <float*>pw, ppw, ppb, ps, sstride, <float*>pk, t)
        sum_block_partials(ppw, ppb, nsb, C, pdw, pdb, pt == F64,
                           t if nsb * C >= SERIAL_ELEMS // 4 and C >= t else 1)
    return dw, db


cdef inline bint _vector_of(object a, int t1, int t2, Py_ssize_t c):
    """a is a C-contiguous 1-D ndarray of c values of dtype number t1 or t2."""
    if not isinstance(a, cnp.ndarray):
        return False
    cdef cnp.ndarray arr = a
    cdef int t = cnp.PyArray_TYPE(arr)
    return (cnp.PyArray_NDIM(arr) == 1 and cnp.PyArray_DIMS(arr)[0] == c and cnp.PyArray_IS_C_CONTIGUOUS(arr)
            and (t == t1 or t == t2))


cdef inline double _ld64(const void* p, int dt, Py_ssize_t i) noexcept nogil:
    return (<const double*>p)[i] if dt == F64 else <double>(<const float*>p)[i]


cdef inline void _st64(void* p, int dt, Py_ssize_t i, double v) noexcept nogil:
    """p[i] = v in dtype number dt (float64, else float32)."""
    if dt == F64:
        (<double*>p)[i] = v
    else:
        (<float*>p)[i] = <float>v


def fold_frozen(mean, var, weight, bias, double eps):
    """Eval-mode constants ``[mean, rstd, scale, shift]`` in weight's dtype, computed
    in double: ``rstd = 1/sqrt(var + eps)``, ``scale = weight·rstd``, ``shift =
    bias - mean·scale``; None unless weight and bias are C-contiguous float32 or
    float64 vectors of one dtype and mean and var C-contiguous float32 or float64
    vectors of their length (the caller then computes them otherwise)."""
    if not isinstance(weight, cnp.ndarray):
        return None
    cdef int pt = cnp.PyArray_TYPE(<cnp.ndarray>weight)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(<cnp.ndarray>weight)
    if not (_vector_of(weight, F32, F64, n) and _vector_of(bias, pt, pt, n)
            and _vector_of(mean, F32, F64, n) and _vector_of(var, F32, F64, n)):
        return None
    cdef int mt = cnp.PyArray_TYPE(<cnp.ndarray>mean), vt = cnp.PyArray_TYPE(<cnp.ndarray>var)
    cdef Py_ssize_t i
    cdef cnp.ndarray om = _empty1(n, pt), orr = _empty1(n, pt), osc = _empty1(n, pt), osh = _empty1(n, pt)
    cdef const void* pm = ptr(mean)
    cdef const void* pv = ptr(var)
    cdef const void* pw = ptr(weight)
    cdef const void* pb = ptr(bias)
    cdef void* qm = ptr(om)
    cdef void* qr = ptr(orr)
    cdef void* qs = ptr(osc)
    cdef void* qh = ptr(osh)
    cdef double m, r, sc
    for i in range(n):
        m = _ld64(pm, mt, i)
        r = 1.0 / sqrt(_ld64(pv, vt, i) + eps)
        sc = _ld64(pw, pt, i) * r
        _st64(qm, pt, i, m)
        _st64(qr, pt, i, r)
        _st64(qs, pt, i, sc)
        _st64(qh, pt, i, _ld64(pb, pt, i) - m * sc)
    return [om, orr, osc, osh]


def affine(x, y, bint cl, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, scale, shift, int nt):
    """Eval-mode forward ``y = x·scale[c] + shift[c]``: one multiply-add per element."""
    cdef int dt = _dtype_num(x)
    cdef int pt = _pnum(dt)
    cdef Py_ssize_t size = N * C * S
    _check(x, dt, size, "x")
    _check(y, dt, size, "y")
    _writable(y, "y")
    _check(scale, pt, C, "scale")
    _check(shift, pt, C, "shift")
    cl = cl or S == 1
    cdef int t = _nthreads(size, N * S if cl else N * C, nt)
    cdef void* px = ptr(x)
    cdef void* py = ptr(y)
    cdef void* pa = ptr(scale)
    cdef void* pb = ptr(shift)
    _stream(size * cnp.PyArray_ITEMSIZE(<cnp.ndarray>x))
    with nogil:
        if dt == F32:
            affine_k(<float*>px, <float*>py, N, C, S, cl, <float*>pa, <float*>pb, t)
        elif dt == F64:
            affine_k(<double*>px, <double*>py, N, C, S, cl, <double*>pa, <double*>pb, t)
        elif dt == F16:
            affine_k(<cn_f16*>px, <cn_f16*>py, N, C, S, cl, <float*>pa, <float*>pb, t)
        else:
            affine_k(<cn_bf16*>px, <cn_bf16*>py, N, C, S, cl, <float*>pa, <float*>pb, t)


def parallel_copy(src, dst, int nt):
    """Copy ``src`` into ``dst`` (same nbytes, C-contiguous) with ``nt`` threads,
    whole lines by streaming stores.

    The benchmark's memory-bandwidth reference.
    """
    cdef cnp.ndarray s = src, d = dst
    if not (cnp.PyArray_IS_C_CONTIGUOUS(s) and cnp.PyArray_IS_C_CONTIGUOUS(d)) or s.nbytes != d.nbytes:
        raise ValueError("src, dst: expected C-contiguous arrays of equal size")
    cdef Py_ssize_t n = s.nbytes
    cdef char* ps = <char*>ptr(s)
    cdef char* pd = <char*>ptr(d)
    with nogil:
        copy_k(ps, pd, n, nt)
