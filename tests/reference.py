"""An independent float64 evaluation of the maths (docs/architecture.md, §1), written per norm
on the N-D array with axis arithmetic, sharing no code with cnorm's layouts or
backends. It computes in long double (80-bit on x86-64) so that its own
rounding is far below that of the float64 code it checks: a float64 reference
is not exact enough when |mean| >> std."""

import numpy as np

ACC = np.longdouble


def _grouped(x, norm, channel_axis, num_groups, normalized_ndim):
    """Move channels to axis 1 and split them so each group is a slice; return (view, axes)."""
    if norm == "layer_norm":
        return x, tuple(range(x.ndim - normalized_ndim, x.ndim))
    x = np.moveaxis(x, channel_axis, 1)
    if norm == "batch_norm":
        return x, (0, *range(2, x.ndim))
    groups = x.shape[1] if norm == "instance_norm" else num_groups
    xg = x.reshape(x.shape[0], groups, x.shape[1] // groups, *x.shape[2:])
    return xg, tuple(range(2, xg.ndim))


def _param(p, x_shape, norm, channel_axis, normalized_ndim):
    """Broadcast a parameter against the N-D input."""
    if p is None:
        return None
    p = np.asarray(p, dtype=ACC)
    if norm == "layer_norm":
        return p
    shape = [1] * len(x_shape)
    shape[channel_axis] = x_shape[channel_axis]
    return p.reshape(shape)


def forward(x, norm, weight=None, bias=None, eps=1e-5, channel_axis=1, num_groups=1, normalized_ndim=1,
            mean=None, var=None):
    """y and (mean, var) per group; given mean/var (per channel) act as constants (eval)."""
    x = np.asarray(x, dtype=ACC)
    channel_axis %= x.ndim
    if mean is not None:
        m = _param(mean, x.shape, "batch_norm", channel_axis, 0)
        r = 1.0 / np.sqrt(_param(var, x.shape, "batch_norm", channel_axis, 0) + eps)
        xhat = (x - m) * r
    else:
        xg, axes = _grouped(x, norm, channel_axis, num_groups, normalized_ndim)
        mu = xg.mean(axis=axes, keepdims=True)
        va = ((xg - mu) ** 2).mean(axis=axes, keepdims=True)
        xhat_g = (xg - mu) / np.sqrt(va + eps)
        if norm in ("layer_norm",):
            xhat = xhat_g
        else:
            xhat = np.moveaxis(xhat_g.reshape(np.moveaxis(x, channel_axis, 1).shape), 1, channel_axis)
        mean, var = np.squeeze(mu), np.squeeze(va)
    w = _param(weight, x.shape, norm, channel_axis, normalized_ndim)
    b = _param(bias, x.shape, norm, channel_axis, normalized_ndim)
    y = xhat * (1.0 if w is None else w) + (0.0 if b is None else b)
    return y, mean, var


def backward(dy, x, norm, weight=None, eps=1e-5, channel_axis=1, num_groups=1, normalized_ndim=1,
             mean=None, var=None):
    """(dx, dweight, dbias) by the closed-form gradient; eval mode when mean/var are given."""
    x = np.asarray(x, dtype=ACC)
    g = np.asarray(dy, dtype=ACC)
    channel_axis %= x.ndim
    w = _param(weight, x.shape, norm, channel_axis, normalized_ndim)
    wg = g * (1.0 if w is None else w)
    if norm == "layer_norm":
        param_axes = tuple(range(x.ndim - normalized_ndim))
    else:
        param_axes = tuple(i for i in range(x.ndim) if i != channel_axis)
    if mean is not None:
        r = 1.0 / np.sqrt(_param(var, x.shape, "batch_norm", channel_axis, 0) + eps)
        xhat = (x - _param(mean, x.shape, "batch_norm", channel_axis, 0)) * r
        dx = wg * r
    else:
        xg, axes = _grouped(x, norm, channel_axis, num_groups, normalized_ndim)
        wgg, _ = _grouped(wg, norm, channel_axis, num_groups, normalized_ndim)
        mu = xg.mean(axis=axes, keepdims=True)
        r = 1.0 / np.sqrt(((xg - mu) ** 2).mean(axis=axes, keepdims=True) + eps)
        xhat_g = (xg - mu) * r
        dx_g = r * (wgg - wgg.mean(axis=axes, keepdims=True) - xhat_g * (wgg * xhat_g).mean(axis=axes, keepdims=True))

        def back(a):
            if norm == "layer_norm":
                return a
            return np.moveaxis(a.reshape(np.moveaxis(x, channel_axis, 1).shape), 1, channel_axis)

        dx, xhat = back(dx_g), back(xhat_g)
    dweight = (g * xhat).sum(axis=param_axes)
    dbias = g.sum(axis=param_axes)
    return dx, dweight, dbias
