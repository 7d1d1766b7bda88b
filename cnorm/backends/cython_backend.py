"""The "cython" backend: fused OpenMP kernels for NumPy arrays on the CPU.

The kernels live in :mod:`cnorm.backends._kernels`; this module only
allocates outputs, reads the thread count on every call (so
``threadpoolctl`` limits and :func:`cnorm.set_num_threads` hold) and maps the
:class:`~cnorm.backends.base.Backend` methods onto kernels.
"""

from __future__ import annotations

import numpy as np

from .base import CHANNELS_LAST, Backend, Problem

try:  # the compiled parts may be missing in a source checkout that was never built
    from . import _kernels as _k
    from .._openmp import get_num_threads as _get_num_threads

    _IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _k = None
    _IMPORT_ERROR = exc


def _params(a, dtype):
    """A parameter/statistics vector as a contiguous array of the data dtype."""
    return np.ascontiguousarray(a, dtype=dtype)


class CythonBackend(Backend):
    """Fused, multithreaded, deterministic CPU kernels (float32 and float64).

    Statistics are merged over fixed-size blocks in a fixed order, so the
    output is bit-identical for any thread count. The GIL is released while a
    kernel runs.

    Examples
    --------
    >>> import numpy as np
    >>> from cnorm.backends.base import Problem
    >>> x = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    >>> y, mean, var, rstd = CythonBackend().forward_train(
    ...     x, Problem("cf", 2, 3, 2), np.ones(3, np.float32), np.zeros(3, np.float32), 1e-5)
    >>> mean
    array([4., 6., 8.], dtype=float32)
    """

    name = "cython"
    xp = np

    @staticmethod
    def unavailable_reason():
        """None when the compiled kernels load, else why they do not."""
        if _k is None:
            return (f"the compiled kernels cannot be imported ({_IMPORT_ERROR}); "
                    "build them with `python setup.py build_ext --inplace` or `pip install .`")
        return None

    # -- fused kernel problems -----------------------------------------------
    def forward_train(self, x3, p: Problem, weight, bias, eps):
        # parameters go straight to the kernels, which check dtype and length
        nt = _get_num_threads()
        dt = x3.dtype
        w, b = weight, bias
        y = np.empty_like(x3)
        cl = p.layout == CHANNELS_LAST
        if p.cross_sample:
            mean, var, rstd = np.empty(p.c, dt), np.empty(p.c, dt), np.empty(p.c, dt)
            _k.cross_forward(x3, y, cl, p.n, p.c, p.s, w, b, mean, var, rstd, float(eps), nt)
        else:
            shape = (p.n, p.groups)
            mean, var, rstd = np.empty(shape, dt), np.empty(shape, dt), np.empty(shape, dt)
            _k.group_forward(x3, y, cl, p.n, p.c, p.s, p.groups, w, b, mean, var, rstd, float(eps), nt)
        return y, mean, var, rstd

    def forward_eval(self, x3, p, scale, shift):
        dt = x3.dtype
        y = np.empty_like(x3)
        _k.affine(x3, y, p.layout == CHANNELS_LAST, p.n, p.c, p.s, _params(scale, dt),
                  _params(shift, dt), _get_num_threads())
        return y

    def backward_train(self, dy3, x3, p, mean, rstd, weight):
        nt = _get_num_threads()
        dt = x3.dtype
        dx = np.empty_like(x3)
        cl = p.layout == CHANNELS_LAST
        w, m, r = _params(weight, dt), _params(mean, dt), _params(rstd, dt)
        if p.cross_sample:
            dweight, dbias = np.empty(p.c, dt), np.empty(p.c, dt)
            _k.cross_backward(dy3, x3, dx, cl, p.n, p.c, p.s, m, r, w, dweight, dbias, _k.TRAIN, nt)
        else:
            dweight, dbias = _k.group_backward(dy3, x3, dx, cl, p.n, p.c, p.s, p.groups, m, r, w, nt)
        return dx, dweight, dbias

    def backward_eval(self, dy3, x3, p, mean, rstd, weight):
        # One sweep: dx = dy·weight·rstd while the per-channel sums accumulate.
        dt = x3.dtype
        dx = np.empty_like(x3)
        dweight, dbias = np.empty(p.c, dt), np.empty(p.c, dt)
        _k.cross_backward(dy3, x3, dx, p.layout == CHANNELS_LAST, p.n, p.c, p.s, _params(mean, dt),
                          _params(rstd, dt), _params(weight, dt), dweight, dbias, _k.EVAL,
                          _get_num_threads())
        return dx, dweight, dbias

    # -- cross-sample primitives ---------------------------------------------
    def channel_stats(self, x3, p):
        dt = x3.dtype
        mean, var, rstd = np.empty(p.c, dt), np.empty(p.c, dt), np.empty(p.c, dt)
        one, zero = np.ones(p.c, dt), np.zeros(p.c, dt)
        _k.cross_forward(x3, None, p.layout == CHANNELS_LAST, p.n, p.c, p.s, one, zero, mean, var,
                         rstd, 0.0, _get_num_threads())
        return mean, var

    def channel_grad_sums(self, dy3, x3, p, mean, rstd):
        dt = x3.dtype
        sum_dy, sum_dy_xhat = np.empty(p.c, dt), np.empty(p.c, dt)
        _k.cross_backward(dy3, x3, None, p.layout == CHANNELS_LAST, p.n, p.c, p.s, _params(mean, dt),
                          _params(rstd, dt), np.ones(p.c, dt), sum_dy_xhat, sum_dy, _k.SUMS,
                          _get_num_threads())
        return sum_dy, sum_dy_xhat

    def channel_backward_apply(self, dy3, x3, p, mean, rstd, weight, mean_dy, mean_dy_xhat):
        dt = x3.dtype
        dx = np.empty_like(x3)
        _k.cross_backward(dy3, x3, dx, p.layout == CHANNELS_LAST, p.n, p.c, p.s, _params(mean, dt),
                          _params(rstd, dt), _params(weight, dt), None, None, _k.APPLY,
                          _get_num_threads(), _params(mean_dy, dt), _params(mean_dy_xhat, dt))
        return dx
