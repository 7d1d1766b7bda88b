"""The NumPy reference backend: the executable specification.

Short vectorized code that accumulates in float64 and computes the variance
from centred values (never E[x²] − E[x]²). Every other backend is tested
against it.
"""

from __future__ import annotations

import numpy as np

from .._dtypes import ALL_FLOATS
from .base import CHANNELS_FIRST, Backend, Problem, act_derivative, act_value, stats_dtype


def grouped(a, p: Problem):
    """View ``a`` (shaped like x3) so statistics reduce over the returned axes.

    Cross-sample problems keep the 3-D shape; per-sample problems split the
    channel axis into (G, C/G) so that one (sample, group) is one slice.
    """
    if p.cross_sample:
        return a, ((0, 2) if p.layout == CHANNELS_FIRST else (0, 1))
    cg = p.c // p.groups
    if p.layout == CHANNELS_FIRST:
        return a.reshape(p.n, p.groups, cg, p.s), (2, 3)
    return a.reshape(p.n, p.s, p.groups, cg), (1, 3)


def channel_axes(p: Problem):
    """Axes of the grouped view that do not index a channel (summed for dweight/dbias)."""
    if p.layout != CHANNELS_FIRST:
        return (0, 1)
    return (0, 2) if p.cross_sample else (0, 3)


def per_channel(v, p: Problem):
    """Reshape a length-C vector to broadcast against the grouped view."""
    if p.cross_sample:
        return v.reshape((1, p.c, 1) if p.layout == CHANNELS_FIRST else (1, 1, p.c))
    cg = p.c // p.groups
    return v.reshape((1, p.groups, cg, 1) if p.layout == CHANNELS_FIRST else (1, 1, p.groups, cg))


def per_group(stat, p: Problem):
    """Reshape statistics of shape ``p.stats_shape`` to broadcast against the grouped view."""
    if p.cross_sample:
        return per_channel(stat, p)
    return stat.reshape((p.n, p.groups, 1, 1) if p.layout == CHANNELS_FIRST else (p.n, 1, p.groups, 1))


def f64(a):
    return np.asarray(a, dtype=np.float64)


def result(y, dtype, out):
    """``y`` rounded to ``dtype``, as a new array or written into ``out``.

    ``y`` is computed in full before ``out`` is written, so ``out`` may be an input."""
    y = y.astype(dtype)
    if out is None:
        return y
    out[...] = y.reshape(out.shape)
    return out


class NumpyBackend(Backend):
    """Reference kernels in plain NumPy, float64 accumulation."""

    name = "numpy"
    xp = np

    def supported_dtypes(self):
        return ALL_FLOATS

    def forward_train(self, x3, p, weight, bias, eps, out=None, act=None):
        xg, axes = grouped(f64(x3), p)
        # RMSNorm: no centring; var is then the mean square
        mean = np.zeros_like(xg.sum(axis=axes, keepdims=True)) if p.rms else xg.mean(axis=axes, keepdims=True)
        centred = xg - mean
        var = np.mean(centred * centred, axis=axes, keepdims=True)
        rstd = 1.0 / np.sqrt(var + eps)
        y = centred * rstd * per_channel(f64(weight), p) + per_channel(f64(bias), p)
        if act is not None:
            y = act_value(np, y, act)
        sd = stats_dtype(x3.dtype)
        stats = [s.reshape(p.stats_shape).astype(sd) for s in (mean, var, rstd)]
        return (result(y.reshape(x3.shape), x3.dtype, out), *stats)

    def forward_eval(self, x3, p, scale, shift, out=None, act=None):
        cross = Problem(p.layout, p.n, p.c, p.s)
        y = f64(x3) * per_channel(f64(scale), cross) + per_channel(f64(shift), cross)
        if act is not None:
            y = act_value(np, y, act)
        return result(y, x3.dtype, out)

    def backward_train(self, dy3, x3, p, mean, rstd, weight, out=None, act=None, bias=None):
        xg, axes = grouped(f64(x3), p)
        g, _ = grouped(f64(dy3), p)
        r = per_group(f64(rstd), p)
        xhat = (xg - per_group(f64(mean), p)) * r
        if act is not None:  # g = dy·act'(z), z recomputed from x and the statistics
            z = xhat * per_channel(f64(weight), p) + per_channel(f64(bias), p)
            g = g * act_derivative(np, z, act)
        if not p.rms:
            # The saved mean is rounded to the statistics dtype (float32 for float32 data);
            # re-centring removes that rounding, which backward would otherwise amplify by rstd.
            xhat -= xhat.mean(axis=axes, keepdims=True)
        wg = g * per_channel(f64(weight), p)
        mean_wg = 0.0 if p.rms else wg.mean(axis=axes, keepdims=True)
        mean_wg_xhat = np.mean(wg * xhat, axis=axes, keepdims=True)
        dx = r * (wg - mean_wg - xhat * mean_wg_xhat)
        caxes = channel_axes(p)
        sd = stats_dtype(x3.dtype)
        dweight = np.sum(g * xhat, axis=caxes).reshape(p.c).astype(sd)
        dbias = np.sum(g, axis=caxes).reshape(p.c).astype(sd)
        return result(dx.reshape(x3.shape), x3.dtype, out), dweight, dbias

    def backward_eval(self, dy3, x3, p, mean, rstd, weight, out=None, act=None, bias=None):
        cross = Problem(p.layout, p.n, p.c, p.s)
        xg, axes = grouped(f64(x3), cross)
        g = f64(dy3)
        xhat = (xg - per_channel(f64(mean), cross)) * per_channel(f64(rstd), cross)
        if act is not None:
            g = g * act_derivative(np, xhat * per_channel(f64(weight), cross) + per_channel(f64(bias), cross), act)
        dx = g * per_channel(f64(weight) * f64(rstd), cross)
        sd = stats_dtype(x3.dtype)
        # the sums before dx is stored: out may be dy3 itself, which g views for float64 data
        dweight, dbias = np.sum(g * xhat, axis=axes).astype(sd), np.sum(g, axis=axes).astype(sd)
        return result(dx, x3.dtype, out), dweight, dbias

    def channel_stats(self, x3, p):
        cross = Problem(p.layout, p.n, p.c, p.s)
        x, axes = grouped(f64(x3), cross)
        mean = x.mean(axis=axes, keepdims=True)
        centred = x - mean
        var = np.mean(centred * centred, axis=axes)
        sd = stats_dtype(x3.dtype)
        return mean.reshape(p.c).astype(sd), var.reshape(p.c).astype(sd)

    def channel_grad_sums(self, dy3, x3, p, mean, rstd):
        cross = Problem(p.layout, p.n, p.c, p.s)
        x, axes = grouped(f64(x3), cross)
        g = f64(dy3)
        xhat = (x - per_channel(f64(mean), cross)) * per_channel(f64(rstd), cross)
        sd = stats_dtype(x3.dtype)
        return np.sum(g, axis=axes).astype(sd), np.sum(g * xhat, axis=axes).astype(sd)

    def channel_backward_apply(self, dy3, x3, p, mean, rstd, weight, mean_dy, mean_dy_xhat, out=None):
        cross = Problem(p.layout, p.n, p.c, p.s)
        r = per_channel(f64(rstd), cross)
        xhat = (f64(x3) - per_channel(f64(mean), cross)) * r
        k = per_channel(f64(weight), cross) * r
        dx = k * (f64(dy3) - per_channel(f64(mean_dy), cross) - xhat * per_channel(f64(mean_dy_xhat), cross))
        return result(dx, x3.dtype, out)
