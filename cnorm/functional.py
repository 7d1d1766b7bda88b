"""The functional front end: the four norms, forward and backward.

Each public function validates its arguments, maps the input to one kernel
:class:`~cnorm.backends.base.Problem` over a 3-D view (DESIGN §2), calls the
backend, and owns everything norm-specific: which statistics are used, the
running-statistics update, eval mode, and the shape of the parameters.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from . import _validate as v
from ._layout import View3, channel_view, row_view
from .backends import get_backend, get_backend_instance, registry_generation, resolve
from .backends.base import Problem, stats_dtype

__all__ = [
    "Saved",
    "batch_norm", "batch_norm_forward", "batch_norm_backward",
    "layer_norm", "layer_norm_forward", "layer_norm_backward",
    "group_norm", "group_norm_forward", "group_norm_backward",
    "instance_norm", "instance_norm_forward", "instance_norm_backward",
]


class Saved:
    """What a backward call needs from its forward call; O(C) or O(N·G) in size.

    Attributes
    ----------
    norm : str
        "batch_norm", "layer_norm", "group_norm" or "instance_norm".
    problem : Problem
        The kernel problem (layout, N, C, S, groups).
    view : View3
        How x maps to the 3-D kernel view.
    mean, rstd : array
        Per-group statistics used to normalize: (C,) for BatchNorm and for
        eval-mode InstanceNorm, (N, G) for per-sample norms.
    batch_stats : bool
        True when the statistics came from the batch (training), so backward
        differentiates through them; False when they were constants (eval).
    has_bias : bool
        Whether forward had a bias (backward then returns dbias).
    backend : str
        The backend that ran forward; backward runs on the same one.
    param_shape : tuple
        Shape of weight/bias: (C,) or LayerNorm's normalized_shape.
    dtype : numpy.dtype
        The dtype of x.
    var : array or None
        The biased batch variance behind ``rstd`` (None in eval mode), for
        callers that keep their own running statistics (``cnorm.nn``).
    overwritten : array or None
        The forward's ``out`` when it was x itself (in place): that memory no
        longer holds the input, so backward refuses it as x.
    """

    __slots__ = ("norm", "problem", "view", "mean", "rstd", "batch_stats", "has_bias", "backend",
                 "param_shape", "dtype", "var", "overwritten")

    def __init__(self, norm, problem, view, mean, rstd, batch_stats, has_bias, backend, param_shape, dtype,
                 var=None):
        self.norm, self.problem, self.view = norm, problem, view
        self.mean, self.rstd, self.batch_stats, self.has_bias = mean, rstd, batch_stats, has_bias
        self.backend, self.param_shape, self.dtype, self.var = backend, param_shape, dtype, var
        self.overwritten = None

    def __repr__(self):
        return (f"Saved({self.norm}, {self.problem}, batch_stats={self.batch_stats}, "
                f"backend={self.backend!r})")


# -- shared pieces ---------------------------------------------------------------

def _affine(be, weight, bias, c: int, sdtype):
    """Contiguous weight and bias in the statistics dtype; ones/zeros when absent."""
    xp = be.xp
    return (xp.ones(c, dtype=sdtype) if weight is None else _as_vector(xp, weight, c, sdtype),
            xp.zeros(c, dtype=sdtype) if bias is None else _as_vector(xp, bias, c, sdtype))


def _as_vector(xp, a, c, dtype):
    """``a`` as a contiguous length-c vector of ``dtype`` (no copy when it already is one)."""
    # (strides, not a.flags: building the flags object costs more than this whole test)
    if a.ndim == 1 and a.dtype == dtype and (a.strides[0] == a.itemsize or a.shape[0] <= 1):
        return a
    return xp.ascontiguousarray(a.reshape(c), dtype=dtype)


@lru_cache(maxsize=1024)
def _problem(view: View3, groups: int) -> Problem:
    n, a, b = view.shape3
    c, s = (a, b) if view.layout == "cf" else (b, a)
    return Problem(view.layout, n, c, s, groups)


def _update_running(xp, running_mean, running_var, batch_mean, batch_var_unbiased, momentum: float):
    """running = (1 − momentum)·running + momentum·batch, both buffers or neither."""
    f64 = xp.float64
    new_mean = (1.0 - momentum) * running_mean.astype(f64) + momentum * batch_mean.astype(f64)
    new_var = (1.0 - momentum) * running_var.astype(f64) + momentum * batch_var_unbiased.astype(f64)
    running_mean[...] = new_mean
    running_var[...] = new_var


def _empty_forward(be, x, p: Problem, sdtype, out=None):
    xp = be.xp
    y = xp.empty_like(x) if out is None else out
    nan = xp.full(p.stats_shape, xp.nan, dtype=sdtype)
    return y, nan, nan


def _saved(norm, p, view, mean, rstd, batch_stats, bias, be, param_shape, x, var=None, overwritten=None):
    saved = Saved(norm, p, view, mean, rstd, batch_stats, bias is not None, be.name, tuple(param_shape),
                  x.dtype, var)
    saved.overwritten = overwritten
    return saved


def _check_out(out, be, x, view, *params):
    """Check a forward's ``out=``; return it when it is x itself (in place: Saved.overwritten), else None.

    Every forward kernel reads each value of x before it writes y there (the
    statistics are complete before the normalizing sweep, which reads x[i]
    and then writes y[i]), so out may be x itself; the parameters and
    running statistics it may not touch."""
    if out is None:
        return None
    names = ("weight", "bias", "running_mean", "running_var")
    same = v.check_out(out, x, be, view.perm, inplace=(("x", x),), disjoint=tuple(zip(names, params)))
    return out if same else None


def _normalize_batch(be, x, view, p, weight, bias, eps, out=None):
    """Training-mode forward on the kernel view; returns (y, mean, var, rstd).

    ``out`` (checked by :func:`_check_out`) receives y and is returned as y."""
    sd = stats_dtype(x.dtype)
    if view.empty or p.group_size == 0:
        y, mean, rstd = _empty_forward(be, x, p, sd, out)
        return y, mean, mean, rstd
    w, b = _affine(be, weight, bias, p.c, sd)
    xp = be.xp
    out3 = None if out is None else view.to3(out, xp)  # (a view: out's layout was checked)
    y3, mean, var, rstd = be.forward_train(view.to3(x, xp), p, w, b, eps, out3)
    return (view.from3(y3) if out is None else out), mean, var, rstd


def _normalize_frozen(be, x, view, p, weight, bias, running_mean, running_var, eps, out=None):
    """Eval-mode forward with per-channel running statistics; returns (y, mean, rstd)."""
    sd = stats_dtype(x.dtype)
    w, b = _affine(be, weight, bias, p.c, sd)
    mean, rstd, scale, shift = be.fold_frozen(running_mean, running_var, w, b, eps, sd)
    if x.size == 0:
        return (be.xp.empty_like(x) if out is None else out), mean, rstd
    xp = be.xp
    out3 = None if out is None else view.to3(out, xp)
    y3 = be.forward_eval(view.to3(x, xp), p, scale, shift, out3)
    return (view.from3(y3) if out is None else out), mean, rstd


def _check_backward(norm: str, dy, x, saved: Saved, weight, out=None):
    """Validate a backward call's arguments against its forward; return (backend, dy, x)."""
    if not isinstance(saved, Saved):
        raise TypeError(f"saved: expected the Saved object returned by {norm}_forward, got {v.type_name(saved)}")
    if saved.norm != norm:
        raise ValueError(f"saved: expected the result of {norm}_forward, got one of {saved.norm}_forward")
    be = get_backend_instance(saved.backend)
    x = v.check_array("x", x, be)
    if tuple(x.shape) != saved.view.shape or x.dtype != saved.dtype:
        raise ValueError(
            f"x: expected the forward input's shape {saved.view.shape} and dtype {saved.dtype}, "
            f"got shape {tuple(x.shape)} and dtype {x.dtype}"
        )
    if saved.overwritten is not None and v.overlap(be.xp, x, saved.overwritten) != "none":
        raise ValueError(f"x: its memory holds the output of the {norm}_forward call that wrote over it "
                         "(out=x), not the input this gradient needs; pass the original input, or run the "
                         "forward with a separate out= buffer")
    dy = v.check_like("dy", dy, x, be)
    v.check_param("weight", weight, saved.param_shape, be)
    if out is not None:
        # Every backward kernel reads dy[i] and x[i] before it writes dx[i] (the
        # sums are complete before the sweep that writes dx), so dx may replace either.
        v.check_out(out, x, be, saved.view.perm, inplace=(("dy", dy), ("x", x)), disjoint=(("weight", weight),))
    return be, dy, x


def _backward(norm: str, dy, x, saved: Saved, weight, out=None):
    """Shared backward: validation, view, backend call, parameter gradients."""
    be, dy, x = _check_backward(norm, dy, x, saved, weight, out)
    p, xp = saved.problem, be.xp
    sd = stats_dtype(x.dtype)
    if x.size == 0 or p.group_size == 0:
        dx = xp.zeros_like(x) if out is None else out
        dweight = xp.zeros(p.c, dtype=sd)
        dbias = xp.zeros(p.c, dtype=sd)
    else:
        w, _ = _affine(be, weight, None, p.c, sd)
        x3, dy3 = saved.view.to3(x, xp), saved.view.to3(dy, xp)
        kernel = be.backward_train if saved.batch_stats else be.backward_eval
        out3 = None if out is None else saved.view.to3(out, xp)
        dx3, dweight, dbias = kernel(dy3, x3, p, saved.mean, saved.rstd, w, out3)
        dx = saved.view.from3(dx3) if out is None else out
    dweight = None if weight is None else dweight.reshape(saved.param_shape)
    dbias = dbias.reshape(saved.param_shape) if saved.has_bias else None
    return dx, dweight, dbias


def _channel_setup(x, weight, bias, channel_axis, backend, extra=()):
    """Resolve the backend and validate x and the per-channel parameters."""
    be = resolve(backend, (x, weight, bias, *extra))
    x = v.check_array("x", x, be, ndim_min=2)
    axis = v.check_channel_axis(channel_axis, x.ndim)
    c = x.shape[axis]
    v.check_param("weight", weight, (c,), be)
    v.check_param("bias", bias, (c,), be)
    return be, x, axis, c


# -- BatchNorm ---------------------------------------------------------------------

def batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None,
                       training=True, momentum=0.1, eps=1e-5, channel_axis=1, backend=None, *, out=None):
    """Batch normalization, returning what backward needs.

    Statistics are per channel over the batch and every non-channel axis.

    Parameters
    ----------
    x : array, shape (N, C, ...) or with channels on ``channel_axis``
        Input, float32 or float64, any memory layout.
    weight, bias : array of shape (C,), optional
        Affine parameters (γ, β).
    running_mean, running_var : array of shape (C,), optional
        Running statistics, updated in place when ``training``; required
        when not training.
    training : bool
        Normalize with batch statistics (True) or the running ones (False).
    momentum : float in [0, 1]
        ``running = (1 − momentum)·running + momentum·batch``; running_var
        receives the unbiased batch variance.
    eps : float
        Added to the variance before the square root.
    channel_axis : int
        The channel axis; 1 for (N, C, H, W), -1 for (N, H, W, C).
    backend : str, optional
        Backend name; default: the one in force (see :func:`cnorm.use_backend`).
    out : array, optional
        Where to write y (then returned as y): x's shape and dtype, writable,
        and in the memory layout of x (C-contiguous for a C-contiguous x,
        channels-last for a channels-last one). It may be x itself (in place;
        :func:`batch_norm_backward` then refuses that memory as x), but no
        other input.

    Returns
    -------
    y : array
        Same shape, dtype and memory layout as ``x`` (``out`` when given).
    saved : Saved
        Per-channel mean and rstd for :func:`batch_norm_backward`.

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32)
    >>> y, saved = cnorm.batch_norm_forward(x)
    >>> dx, dw, db = cnorm.batch_norm_backward(np.ones_like(y), x, saved)
    """
    be, x, axis, c = _channel_setup(x, weight, bias, channel_axis, backend, (running_mean, running_var))
    training = v.check_bool("training", training)
    v.check_running(running_mean, running_var, (c,), be, required=not training, why="when training=False",
                    updated=training)
    eps, momentum = v.check_eps(eps), v.check_momentum(momentum)
    view = channel_view(x, axis)
    overwritten = _check_out(out, be, x, view, weight, bias, running_mean, running_var)
    p = _problem(view, 0)
    if not training:
        y, mean, rstd = _normalize_frozen(be, x, view, p, weight, bias, running_mean, running_var, eps, out)
        return y, _saved("batch_norm", p, view, mean, rstd, False, bias, be, (c,), x, None, overwritten)
    count = p.n * p.s
    if count == 1:
        raise ValueError(f"x: expected more than 1 value per channel when training, got input of shape {x.shape}")
    y, mean, var, rstd = _normalize_batch(be, x, view, p, weight, bias, eps, out)
    if running_mean is not None and count > 1:
        _update_running(be.xp, running_mean, running_var, mean, var * (count / (count - 1)), momentum)
    return y, _saved("batch_norm", p, view, mean, rstd, True, bias, be, (c,), x, var, overwritten)


def batch_norm(x, weight=None, bias=None, running_mean=None, running_var=None,
               training=True, momentum=0.1, eps=1e-5, channel_axis=1, backend=None, *, out=None):
    """Batch normalization; :func:`batch_norm_forward` without the saved state.

    ``out=x`` normalizes in place (inference without a second buffer).

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> x = np.arange(12.0).reshape(4, 3)
    >>> float(abs(cnorm.batch_norm(x).mean(axis=0)).max()) < 1e-12
    True
    """
    return batch_norm_forward(x, weight, bias, running_mean, running_var, training,
                              momentum, eps, channel_axis, backend, out=out)[0]


def batch_norm_backward(dy, x, saved, weight=None, *, out=None):
    """Gradients of :func:`batch_norm_forward`.

    Parameters
    ----------
    dy : array
        Gradient of the loss with respect to y; shape and dtype of ``x``.
    x : array
        The forward input.
    saved : Saved
        The second result of :func:`batch_norm_forward`.
    weight : array of shape (C,), optional
        The forward weight; without it dweight is None.
    out : array, optional
        Where to write dx (then returned as dx): as ``out`` of
        :func:`batch_norm_forward`; it may be dy or x itself (in place).

    Returns
    -------
    dx : array
        Shape, dtype and layout of ``x`` (``out`` when given).
    dweight, dbias : array of shape (C,) or None
        dweight is None when ``weight`` is None; dbias is None when forward
        had no bias. In eval mode the running statistics are constants.
    """
    return _backward("batch_norm", dy, x, saved, weight, out)


# -- InstanceNorm ------------------------------------------------------------------

def instance_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None,
                          use_input_stats=True, momentum=0.1, eps=1e-5, channel_axis=1, backend=None, *,
                          out=None):
    """Instance normalization: statistics per (sample, channel) over the spatial axes.

    Parameters
    ----------
    x : array, shape (N, C, ...) or with channels on ``channel_axis``
    weight, bias : array of shape (C,), optional
    running_mean, running_var : array of shape (C,), optional
        Updated in place with the batch average of the per-instance
        statistics when ``use_input_stats``; used instead of them otherwise.
    use_input_stats : bool
        Normalize each instance by its own statistics (True) or by the
        running ones (False, PyTorch's eval mode with track_running_stats).
    momentum, eps, channel_axis, backend, out
        As in :func:`batch_norm_forward`.

    Returns
    -------
    y : array
    saved : Saved

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 8, 8))
    >>> y = cnorm.instance_norm(x)
    >>> bool(np.allclose(y.mean(axis=(2, 3)), 0))
    True
    """
    be, x, axis, c = _channel_setup(x, weight, bias, channel_axis, backend, (running_mean, running_var))
    use_input_stats = v.check_bool("use_input_stats", use_input_stats)
    v.check_running(running_mean, running_var, (c,), be, required=not use_input_stats,
                    why="when use_input_stats=False", updated=use_input_stats)
    eps, momentum = v.check_eps(eps), v.check_momentum(momentum)
    view = channel_view(x, axis)
    overwritten = _check_out(out, be, x, view, weight, bias, running_mean, running_var)
    p = _problem(view, c)
    if not use_input_stats:
        y, mean, rstd = _normalize_frozen(be, x, view, p, weight, bias, running_mean, running_var, eps, out)
        return y, _saved("instance_norm", p, view, mean, rstd, False, bias, be, (c,), x, None, overwritten)
    if p.s == 1:
        raise ValueError(f"x: expected more than 1 spatial element per channel when using input statistics, "
                         f"got input of shape {x.shape}")
    y, mean, var, rstd = _normalize_batch(be, x, view, p, weight, bias, eps, out)
    if running_mean is not None and p.n > 0 and p.s > 1:
        unbiased = var * (p.s / (p.s - 1))
        _update_running(be.xp, running_mean, running_var, mean.mean(axis=0), unbiased.mean(axis=0), momentum)
    return y, _saved("instance_norm", p, view, mean, rstd, True, bias, be, (c,), x, var, overwritten)


def instance_norm(x, weight=None, bias=None, running_mean=None, running_var=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, channel_axis=1, backend=None, *, out=None):
    """Instance normalization; :func:`instance_norm_forward` without the saved state."""
    return instance_norm_forward(x, weight, bias, running_mean, running_var, use_input_stats,
                                 momentum, eps, channel_axis, backend, out=out)[0]


def instance_norm_backward(dy, x, saved, weight=None, *, out=None):
    """Gradients of :func:`instance_norm_forward`; see :func:`batch_norm_backward`."""
    return _backward("instance_norm", dy, x, saved, weight, out)


# -- GroupNorm ---------------------------------------------------------------------

def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5, channel_axis=1, backend=None, *,
                       out=None):
    """Group normalization: statistics per (sample, group of C/G channels).

    Parameters
    ----------
    x : array, shape (N, C, ...) or with channels on ``channel_axis``
    num_groups : int
        G; must divide C. G = 1 normalizes each sample over all its values,
        G = C is instance normalization.
    weight, bias : array of shape (C,), optional
    eps, channel_axis, backend, out
        As in :func:`batch_norm_forward`.

    Returns
    -------
    y : array
    saved : Saved
        mean and rstd of shape (N, G).

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> x = np.random.default_rng(0).standard_normal((2, 4, 5))
    >>> y, saved = cnorm.group_norm_forward(x, 2)
    >>> saved.mean.shape
    (2, 2)
    """
    be, x, axis, c = _channel_setup(x, weight, bias, channel_axis, backend)
    groups = v.check_int("num_groups", num_groups)
    if c % groups:
        raise ValueError(f"num_groups: expected a divisor of the {c} channels, got {groups}")
    eps = v.check_eps(eps)
    view = channel_view(x, axis)
    overwritten = _check_out(out, be, x, view, weight, bias)
    p = _problem(view, groups)
    y, mean, var, rstd = _normalize_batch(be, x, view, p, weight, bias, eps, out)
    return y, _saved("group_norm", p, view, mean, rstd, True, bias, be, (c,), x, var, overwritten)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, channel_axis=1, backend=None, *, out=None):
    """Group normalization; :func:`group_norm_forward` without the saved state."""
    return group_norm_forward(x, num_groups, weight, bias, eps, channel_axis, backend, out=out)[0]


def group_norm_backward(dy, x, saved, weight=None, *, out=None):
    """Gradients of :func:`group_norm_forward`; see :func:`batch_norm_backward`."""
    return _backward("group_norm", dy, x, saved, weight, out)


# -- LayerNorm ---------------------------------------------------------------------

def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, backend=None, *, out=None):
    """Layer normalization over the trailing ``normalized_shape`` dimensions.

    Parameters
    ----------
    x : array, shape (..., *normalized_shape)
    normalized_shape : int or tuple of int
        The trailing dimensions normalized together.
    weight, bias : array of shape normalized_shape, optional
        Per-element affine parameters.
    eps, backend
        As in :func:`batch_norm_forward`.
    out : array, optional
        Where to write y: a C-contiguous array of x's shape and dtype, or x
        itself (in place); see :func:`batch_norm_forward`.

    Returns
    -------
    y : array
    saved : Saved
        mean and rstd of shape (prod(leading dims), 1).

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> x = np.random.default_rng(0).standard_normal((4, 6))
    >>> y = cnorm.layer_norm(x, 6)
    >>> bool(np.allclose(y.std(axis=1), 1, atol=1e-4))
    True
    """
    be, shape, view, p, xn = _layer_norm_setup(x, normalized_shape, weight, bias, backend)
    if xn is not None:
        x = xn
    eps = v.check_eps(eps)
    overwritten = _check_out(out, be, x, view, weight, bias)
    y, mean, var, rstd = _normalize_batch(be, x, view, p, weight, bias, eps, out)
    return y, _saved("layer_norm", p, view, mean, rstd, True, bias, be, shape, x, var, overwritten)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, backend=None, *, out=None):
    """Layer normalization; :func:`layer_norm_forward` without the saved state.

    ``out=x`` normalizes in place."""
    be, _, view, p, xn = _layer_norm_setup(x, normalized_shape, weight, bias, backend)
    if xn is not None:
        x = xn
    eps = v.check_eps(eps)
    if out is not None:
        _check_out(out, be, x, view, weight, bias)
    return _normalize_batch(be, x, view, p, weight, bias, eps, out)[0]


# LayerNorm is called on small rows at high rates (per-token inference), so its
# validated set-up is memoized on everything the validation reads.
_LAYER_NORM_SETUPS: dict = {}


def _shape_key(normalized_shape):
    """``normalized_shape`` as a memo key when it is an int or a tuple of ints.

    Anything else raises TypeError (no memo: validated on every call): as dict
    keys True, 1.0 and numpy integers equal 1, but as arguments they must not
    reuse the setup that 1 validated.
    """
    ns = normalized_shape
    if type(ns) is int or (type(ns) is tuple and all(type(d) is int for d in ns)):
        return ns
    raise TypeError("not memoized")


def _layer_norm_setup(x, normalized_shape, weight, bias, backend):
    """Validate a LayerNorm call; return (backend, normalized_shape, view, problem, xn).

    ``xn`` is None, or the native-byte-order copy of x to compute on.
    """
    try:
        # _shape_key's int case inline: no call on the per-token path
        ns = normalized_shape if type(normalized_shape) is int else _shape_key(normalized_shape)
        # (the array keys inline: a call each was a tenth of a per-token call)
        key = (registry_generation(), backend, get_backend(), type(x), x.shape, x.dtype, ns,
               None if weight is None else (type(weight), weight.shape, weight.dtype),
               None if bias is None else (type(bias), bias.shape, bias.dtype))
        hit = _LAYER_NORM_SETUPS.get(key)
    except (TypeError, AttributeError):  # unhashable or array-less arguments: validate below
        key = hit = None
    if hit is not None:
        return hit
    be = resolve(backend, (x, weight, bias))
    xn = v.check_array("x", x, be)
    shape = v.check_normalized_shape(normalized_shape, tuple(x.shape))
    v.check_param("weight", weight, shape, be)
    v.check_param("bias", bias, shape, be)
    view = row_view(tuple(x.shape), len(shape))
    if xn is not x:  # converted to native byte order: the caller computes on the copy (never memoized)
        return be, shape, view, _problem(view, 1), xn
    setup = (be, shape, view, _problem(view, 1), None)
    if key is not None and len(_LAYER_NORM_SETUPS) < 4096:
        _LAYER_NORM_SETUPS[key] = setup
    return setup


def layer_norm_backward(dy, x, saved, weight=None, *, out=None):
    """Gradients of :func:`layer_norm_forward`; dweight/dbias have normalized_shape.

    ``out`` receives dx, as in :func:`batch_norm_backward`."""
    return _backward("layer_norm", dy, x, saved, weight, out)
