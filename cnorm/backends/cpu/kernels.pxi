# The "cython" backend's kernels: one source, compiled once per CPU level.
#
# Each level's module (cnorm/backends/_kernels_<level>.pyx) is this file and
# nothing else, compiled with that level's instruction-set flags (setup.py);
# cnorm/_cpu.py imports the best level the CPU supports. The C++ headers
# (kernels.hpp) hold the vectorized loops, written once against the vector
# layer of cpu/vec/; these Cython files hold the drivers: blocks, merges and
# threads, one file per kernel family:
#
#   common.pxi       types, constants and the small shared helpers
#   cross_cf.pxi     cross-sample (BatchNorm) statistics and backward, channels-first
#   cross_cl.pxi     the same, channels-last (NHWC, BatchNorm1d)
#   groups.pxi       per-sample (LayerNorm, GroupNorm, InstanceNorm)
#   elementwise.pxi  eval-mode affine, the streaming copy
#   wrappers.pxi     the Python entry points: checks, allocation, dispatch on dtype
#
# Every kernel problem of the design notes (docs/design_notes.md) is computed
# here, with the GIL released.
#
# Determinism. Statistics are defined over *blocks* whose boundaries depend only
# on the problem's shape: each block's partial result is computed serially, and
# partials are merged (Chan's formula for mean/M2, plain sums for gradients) in
# block order. Threads only decide *who* computes a block, never how results
# combine, so any thread count gives bit-identical output. Lane accumulators
# are indexed by position in a run, not by address, so alignment does not
# matter either.
#
# Numerics. Sums run in float lanes over bounded pieces (at most 64 rows or 512
# elements) added into double (double lanes for float64 data), centred so that
# nothing cancels, redone in double if a float sum overflows. A block's variance
# takes one pass around a pivot near its mean (M2 = S2 - S1²/n in double) where
# that is as exact as two (S2/M2 <= CN_ONEPASS_MAX), else two passes (mean, then
# Σ(x-mean)², the second from cache); blocks merge by Chan's formula or its
# two-level form, so no E[x²]-E[x]² of uncentred data appears.
# Normalization is ``y = (x - mean_hi)·a + b'`` with ``mean_hi`` the mean
# rounded to the statistics type and the rounding remainder folded into ``b'``
# in double: float32 data with |mean| ≫ std keeps full relative accuracy at one
# subtract and one FMA per element. Backward re-centres on the data's exact mean
# (recentre), so the saved mean's rounding does not reach dx.
#
# Types. Data (x, y, dy, dx) are ``dat``: float32, float64, or float16/bfloat16
# held as 16-bit patterns and converted on load and store (never copied to
# float32). Parameters, statistics and per-channel constants are ``floating``:
# float64 for float64 data, float32 otherwise. The elementwise sweeps write
# outputs of NT_BYTES or more with streaming stores (no read-for-ownership of
# output lines). Calls on one thread never enter an OpenMP region.

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport exp, sqrt
from libc.string cimport memcpy

import numpy as np

cimport numpy as cnp

cnp.import_array()


cdef extern from "cpu/kernels.hpp" nogil:
    # Half-precision storage: 16-bit patterns in distinct struct types, so a
    # fused type (and a C++ overload) can tell them apart.
    ctypedef struct cn_bf16:
        unsigned short v
    ctypedef struct cn_f16:
        unsigned short v
    float cn_bf16_to_f32(cn_bf16 h)
    cn_bf16 cn_f32_to_bf16(float f)
    float cn_f16_to_f32(cn_f16 h)
    cn_f16 cn_f32_to_f16(float f)

    # runs.hpp: lane-wise reductions over one run (double lanes; float lanes: h*)
    void cn_sum_run[T](const T* x, Py_ssize_t n, double piv, double* acc)
    void cn_sq_run[T](const T* x, Py_ssize_t n, double m, double* acc)
    void cn_grad_run[T](const T* g, const T* x, Py_ssize_t n, double m, double* ag, double* agx, double* ax)
    void cn_hsum_run[T](const T* x, Py_ssize_t n, double piv, double* acc)
    void cn_hsq_run[T](const T* x, Py_ssize_t n, double m, double* acc)
    void cn_hgrad_run[T](const T* g, const T* x, Py_ssize_t n, double m, double* ag, double* agx, double* ax)
    void cn_wsums[T, P](const T* g, const T* x, const P* w, Py_ssize_t n, double m, double* awg, double* awgx,
                        double* ax)
    void cn_colsums[T](const T* g, const T* x, Py_ssize_t stride, int rows, Py_ssize_t n, const double* m,
                       const double* dl, const double* r, double* pb, double* pw)

    # rows.hpp: row statistics, the LayerNorm backward
    Py_ssize_t CN_SHORT_MAX
    double CN_ONEPASS_MAX
    void cn_row_lanes[T](const T* x, Py_ssize_t n, float c, int sq, double* s1, double* s2)
    float cn_pivot16[T](const T* x)
    int cn_short_rows_stats[T](const T* x, Py_ssize_t n, int nb, double* mu, double* m2)
    int cn_ln_row_stats[T](const T* x, Py_ssize_t n, double* mu, double* m2)
    int cn_rms_row_stats[T](const T* x, Py_ssize_t n, double* m2)
    void cn_ln_bwd_rows[T](const T* g, const T* x, T* dx, Py_ssize_t C, Py_ssize_t cg, Py_ssize_t G,
                           Py_ssize_t gi, Py_ssize_t n0, Py_ssize_t n1, const float* mean, const float* rstd,
                           const float* w, double* pw, double* pb, float* fb, bint rms, const T* dh)
    void cn_lnb_piece[T](const T* g, const T* x, const float* w, Py_ssize_t n, float mu, double* s3)
    void cn_ln_bwd_cols[T](const T* g, const T* x, T* dx, Py_ssize_t C, Py_ssize_t N, Py_ssize_t nc, const float* w,
                           const double* rk, float* dw, float* db, double* ab, double* aw, float* cb, float* cw,
                           Py_ssize_t nx, const T* dh)

    # cl_stats.hpp: channels-last column sums
    int cn_cl_block_stats[T](const T* x, Py_ssize_t nr, Py_ssize_t C, double* m, double* q, double* ws)
    int cn_cl_grad[T](const T* g, const T* x, Py_ssize_t nr, Py_ssize_t C, const double* mu, double* sg,
                      double* sgx, double* sx)

    # elementwise.hpp: the sweeps, streaming stores, memory hints
    void cn_set_nt_store(int on)
    void cn_sfence()
    void cn_stream_copy(const char* src, char* dst, Py_ssize_t n)
    void cn_prefetch_l2(const void* p, Py_ssize_t nbytes)
    void cn_add_run[T](const T* x, const T* r, T* h, Py_ssize_t n)
    void cn_norm_run[T](const T* x, T* y, Py_ssize_t n, float mh, float a, float b, const T* pf, int act)
    void cn_scale_run[T](const T* x, T* y, Py_ssize_t n, float a, float b, int act)
    void cn_dx_run[T](const T* g, const T* x, T* dx, Py_ssize_t n, float ka, float mh, float kb, float kc)
    void cn_row_affine[T](const T* x, T* y, Py_ssize_t n, const float* a, const float* b, int act)
    void cn_ln_fwd[T](const T* x, T* y, Py_ssize_t n, float mh, float ml, float rf, const float* w,
                      const float* b, int act)
    void cn_ln_dx[T](const T* g, const T* x, T* dx, Py_ssize_t n, const float* w, float rf, float mh, float ml,
                     float kb, float kc)
    void cn_cl_norm_span[T](const T* x, T* y, Py_ssize_t n, Py_ssize_t C, const float* mh, const float* a,
                            const float* b, int act)
    void cn_cl_dx_span[T](const T* g, const T* x, T* dx, Py_ssize_t n, Py_ssize_t C, const float* ka,
                          const float* mh, const float* kb, const float* kc)

    # the activations (act: ACT_NONE, ACT_RELU, ACT_SILU): g = dy·act'(z), z as the forward's sweeps
    void cn_act_grad_run[T](const T* dy, const T* x, T* g, Py_ssize_t n, float mh, float a, float b, int act,
                            int stream)
    void cn_act_grad_span[T](const T* dy, const T* x, T* g, Py_ssize_t n, Py_ssize_t C, const float* mh,
                             const float* a, const float* b, int act)
    void cn_act_grad_ln[T](const T* dy, const T* x, T* g, Py_ssize_t n, float mh, float ml, float rf,
                           const float* w, const float* b, int act)

    # the level this module was compiled for
    const char* cn_level_name()
    int cn_level_has_fma()
    int cn_level_hw_bf16()
    void cn_native_init()


include "common.pxi"
include "cross_cf.pxi"
include "cross_cl.pxi"
include "groups.pxi"
include "elementwise.pxi"
include "wrappers.pxi"
