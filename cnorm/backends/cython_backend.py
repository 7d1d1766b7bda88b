"""The "cython" backend: fused OpenMP kernels for NumPy arrays on the CPU.

The kernels live in ``cnorm.backends._kernels_<level>``, one module per CPU
level, of which :mod:`cnorm._cpu` imports the best this CPU runs
(:func:`cnorm.get_cpu_capability`); this module only maps the
:class:`~cnorm.backends.base.Backend` methods onto kernels and reads the
thread count on every call (so ``threadpoolctl`` limits and
:func:`cnorm.set_num_threads` hold). The kernels allocate their outputs and
check, in C, everything they would otherwise misread; the front end already
guarantees the rest of the contract (see :mod:`cnorm.backends.base`), so a
call adds no Python-level checks or conversions.
"""

from __future__ import annotations

import numpy as np

from .._dtypes import ALL_FLOATS
from .base import CHANNELS_LAST, Backend

from .. import _cpu

try:  # the compiled parts may be missing in a source checkout that was never built
    from .._openmp import get_num_threads as _get_num_threads
except ImportError:  # pragma: no cover - depends on the build
    _get_num_threads = None


#: Activation codes of the kernels (kernels.pxi's ACT_*): the activation is applied
#: in the sweep that stores y, and its gradient taken inside the backward kernels.
_ACT = {None: 0, "relu": 1, "silu": 2}


class CythonBackend(Backend):
    """Fused, multithreaded, deterministic CPU kernels.

    float32 and float64 data, and float16/bfloat16 data converted on load and
    store (float32 statistics, parameters and accumulation; no float32 copy of
    the data). Statistics are merged over fixed-size blocks in a fixed order,
    so the output is bit-identical for any thread count. The GIL is released
    while a kernel runs.

    Examples
    --------
    >>> import numpy as np
    >>> from cnorm.backends.base import Problem
    >>> x = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    >>> y, mean, var, rstd = CythonBackend().forward_train(
    ...     x, Problem("cf", 2, 3, 2), np.ones(3, np.float32), np.zeros(3, np.float32), 1e-5)
    >>> mean                      # channel c: x[0, c] and x[1, c]
    array([3.5, 5.5, 7.5], dtype=float32)
    """

    name = "cython"
    xp = np

    @staticmethod
    def unavailable_reason():
        """None when the compiled kernels load, else why they do not."""
        why = _cpu.unavailable_reason()
        if why is not None:
            return (f"the compiled kernels cannot be used ({why}); "
                    "build them with `python setup.py build_ext --inplace` or `pip install .`")
        return None

    def supported_dtypes(self):
        return ALL_FLOATS

    # -- fused kernel problems -----------------------------------------------
    def forward_train(self, x3, p, weight, bias, eps, out=None, act=None):
        return _cpu.K.forward_train(x3, p.layout == CHANNELS_LAST, p.n, p.c, p.s, p.groups, weight, bias,
                                    eps, _get_num_threads(), out, p.rms, _ACT[act])

    def add_forward(self, x3, r3, p, weight, bias, eps, out=None, h_out=None):
        # One sweep per batch of rows: h = x + r written, then normalized from the cache.
        return _cpu.K.forward_train(x3, p.layout == CHANNELS_LAST, p.n, p.c, p.s, p.groups, weight, bias, eps,
                                    _get_num_threads(), out, rms=p.rms, residual=r3, h=h_out)

    def add_backward(self, dy3, dh3, h3, p, mean, rstd, weight, out=None):
        dx = _cpu.K.empty_like(h3) if out is None else out
        dweight, dbias = _cpu.K.group_backward(dy3, h3, dx, p.layout == CHANNELS_LAST, p.n, p.c, p.s, p.groups,
                                               mean, rstd, weight, _get_num_threads(), rms=p.rms, dh=dh3)
        return dx, dweight, dbias

    def forward_eval(self, x3, p, scale, shift, out=None, act=None):
        y = _cpu.K.empty_like(x3) if out is None else out
        _cpu.K.affine(x3, y, p.layout == CHANNELS_LAST, p.n, p.c, p.s, scale, shift, _get_num_threads(),
                      _ACT[act])
        return y

    def fold_frozen(self, running_mean, running_var, weight, bias, eps, sdtype):
        folded = _cpu.K.fold_frozen(running_mean, running_var, weight, bias, eps)  # one C loop
        if folded is None:
            # e.g. strided, unaligned or byte-swapped arrays: the same loop on aligned native copies
            # (an activation's backward recomputes scale and shift as this loop rounds them)
            f64 = np.float64
            folded = _cpu.K.fold_frozen(np.array(running_mean, dtype=f64), np.array(running_var, dtype=f64),
                                        np.array(weight, dtype=sdtype), np.array(bias, dtype=sdtype), eps)
        return folded

    def backward_train(self, dy3, x3, p, mean, rstd, weight, out=None, act=None, bias=None):
        nt = _get_num_threads()
        dx = _cpu.K.empty_like(x3) if out is None else out
        cl = p.layout == CHANNELS_LAST
        if p.cross_sample:
            dweight, dbias = np.empty_like(weight), np.empty_like(weight)
            _cpu.K.cross_backward(dy3, x3, dx, cl, p.n, p.c, p.s, mean, rstd, weight, dweight, dbias,
                                  _cpu.K.TRAIN, nt, None, None, _ACT[act], bias)
        else:
            dweight, dbias = _cpu.K.group_backward(dy3, x3, dx, cl, p.n, p.c, p.s, p.groups, mean, rstd,
                                                   weight, nt, p.rms, _ACT[act], bias)
        return dx, dweight, dbias

    def backward_eval(self, dy3, x3, p, mean, rstd, weight, out=None, act=None, bias=None):
        # One sweep: dx = dy·weight·rstd while the per-channel sums accumulate (with an
        # activation, z = x·scale + shift recomputed as fold_frozen and forward_eval made it).
        dx = _cpu.K.empty_like(x3) if out is None else out
        dweight, dbias = np.empty_like(weight), np.empty_like(weight)
        _cpu.K.cross_backward(dy3, x3, dx, p.layout == CHANNELS_LAST, p.n, p.c, p.s, mean, rstd, weight,
                              dweight, dbias, _cpu.K.EVAL, _get_num_threads(), None, None, _ACT[act], bias)
        return dx, dweight, dbias

    # -- cross-sample primitives ---------------------------------------------
    def channel_stats(self, x3, p):
        sd = np.float64 if x3.dtype == np.float64 else np.float32
        mean, var, rstd = np.empty(p.c, sd), np.empty(p.c, sd), np.empty(p.c, sd)
        one, zero = np.ones(p.c, sd), np.zeros(p.c, sd)
        _cpu.K.cross_forward(x3, None, p.layout == CHANNELS_LAST, p.n, p.c, p.s, one, zero, mean, var,
                         rstd, 0.0, _get_num_threads())
        return mean, var

    def channel_grad_sums(self, dy3, x3, p, mean, rstd):
        sum_dy, sum_dy_xhat = np.empty_like(mean), np.empty_like(mean)
        _cpu.K.cross_backward(dy3, x3, None, p.layout == CHANNELS_LAST, p.n, p.c, p.s, mean, rstd,
                          np.ones_like(mean), sum_dy_xhat, sum_dy, _cpu.K.SUMS, _get_num_threads())
        return sum_dy, sum_dy_xhat

    def channel_backward_apply(self, dy3, x3, p, mean, rstd, weight, mean_dy, mean_dy_xhat, out=None):
        dx = _cpu.K.empty_like(x3) if out is None else out
        _cpu.K.cross_backward(dy3, x3, dx, p.layout == CHANNELS_LAST, p.n, p.c, p.s, mean, rstd, weight,
                          None, None, _cpu.K.APPLY, _get_num_threads(), mean_dy, mean_dy_xhat)
        return dx
