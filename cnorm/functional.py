"""The functional front end: the four norms, forward and backward.

Each public function validates its arguments, maps the input to one kernel
:class:`~cnorm.backends.base.Problem` over a 3-D view (docs/architecture.md, §2), calls the
backend, and owns everything norm-specific: which statistics are used, the
running-statistics update, eval mode, and the shape of the parameters.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from . import _validate as v
from ._interop import accepts_dlpack
from ._layout import View3, channel_view, row_view
from .backends import get_backend, get_backend_instance, registry_generation, resolve
from .backends.base import Problem, stats_dtype

__all__ = [
    "Saved",
    "batch_norm", "batch_norm_forward", "batch_norm_backward",
    "layer_norm", "layer_norm_forward", "layer_norm_backward",
    "group_norm", "group_norm_forward", "group_norm_backward",
    "instance_norm", "instance_norm_forward", "instance_norm_backward",
    "rms_norm", "rms_norm_forward", "rms_norm_backward",
    "add_layer_norm", "add_layer_norm_forward", "add_layer_norm_backward",
    "add_rms_norm", "add_rms_norm_forward", "add_rms_norm_backward",
    "fold_batch_norm",
]


class Saved:
    """What a backward call needs from its forward call; O(C) or O(N·G) in size.

    Attributes
    ----------
    norm : str
        "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm",
        "add_layer_norm" or "add_rms_norm".
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
    activation : str or None
        The activation forward applied ("relu", "silu") or None.
    act_bias : array or None
        With an activation: the bias forward used (statistics dtype, length
        C), from which backward recomputes the pre-activation.
    weight_offset : float
        Added to weight wherever it scales (Gemma's ``1 + w``).
    """

    __slots__ = ("norm", "problem", "view", "mean", "rstd", "batch_stats", "has_bias", "backend",
                 "param_shape", "dtype", "var", "overwritten", "activation", "act_bias", "weight_offset")

    def __init__(self, norm, problem, view, mean, rstd, batch_stats, has_bias, backend, param_shape, dtype,
                 var=None):
        self.norm, self.problem, self.view = norm, problem, view
        self.mean, self.rstd, self.batch_stats, self.has_bias = mean, rstd, batch_stats, has_bias
        self.backend, self.param_shape, self.dtype, self.var = backend, param_shape, dtype, var
        self.overwritten = None
        self.activation = self.act_bias = None
        self.weight_offset = 0.0

    def __repr__(self):
        act = "" if self.activation is None else f", activation={self.activation!r}"
        return (f"Saved({self.norm}, {self.problem}, batch_stats={self.batch_stats}{act}, "
                f"backend={self.backend!r})")


# -- shared pieces ---------------------------------------------------------------

def _affine(be, weight, bias, c: int, sdtype, offset=0.0):
    """Contiguous weight (+ offset) and bias in the statistics dtype; ones/zeros when absent."""
    xp = be.xp
    return (_weight_vector(xp, weight, c, sdtype, offset),
            xp.zeros(c, dtype=sdtype) if bias is None else _as_vector(xp, bias, c, sdtype))


def _weight_vector(xp, weight, c: int, sdtype, offset=0.0):
    """:func:`_affine`'s weight alone (backward reads no bias)."""
    if weight is None:
        return xp.ones(c, dtype=sdtype)
    if offset:
        return xp.asarray(weight, dtype=sdtype).reshape(c) + sdtype.type(offset)
    return _as_vector(xp, weight, c, sdtype)


def _as_vector(xp, a, c, dtype):
    """``a`` as a contiguous length-c vector of ``dtype`` (no copy when it already is one)."""
    # (strides, not a.flags: building the flags object costs more than this whole test)
    if a.ndim == 1 and a.dtype == dtype and (a.strides[0] == a.itemsize or a.shape[0] <= 1):
        return a
    return xp.ascontiguousarray(a.reshape(c), dtype=dtype)


@lru_cache(maxsize=1024)
def _problem(view: View3, groups: int, rms: bool = False) -> Problem:
    n, a, b = view.shape3
    c, s = (a, b) if view.layout == "cf" else (b, a)
    return Problem(view.layout, n, c, s, groups, rms)


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


def _saved(norm, p, view, mean, rstd, batch_stats, bias, be, param_shape, x, var=None, overwritten=None,
           act=None, act_bias=None, offset=0.0):
    saved = Saved(norm, p, view, mean, rstd, batch_stats, bias is not None, be.name, tuple(param_shape),
                  x.dtype, var)
    saved.overwritten = overwritten
    if act is not None:
        saved.activation, saved.act_bias = act, act_bias
    saved.weight_offset = offset
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


def _normalize_batch(be, x, view, p, weight, bias, eps, out=None, act=None, offset=0.0):
    """Training-mode forward on the kernel view; returns (y, mean, var, rstd, b).

    ``out`` (checked by :func:`_check_out`) receives y and is returned as y;
    ``b`` is the bias vector used (for an activation's backward), or None."""
    sd = stats_dtype(x.dtype)
    if view.empty or p.group_size == 0:
        y, mean, rstd = _empty_forward(be, x, p, sd, out)
        return y, mean, mean, rstd, None
    w, b = _affine(be, weight, bias, p.c, sd, offset)
    xp = be.xp
    out3 = None if out is None else view.to3(out, xp)  # (a view: out's layout was checked)
    if act is None:
        y3, mean, var, rstd = be.forward_train(view.to3(x, xp), p, w, b, eps, out3)
    else:
        y3, mean, var, rstd = be.forward_train(view.to3(x, xp), p, w, b, eps, out3, act)
    return (view.from3(y3) if out is None else out), mean, var, rstd, b


def _normalize_frozen(be, x, view, p, weight, bias, running_mean, running_var, eps, out=None, act=None):
    """Eval-mode forward with per-channel running statistics; returns (y, mean, rstd, b)."""
    sd = stats_dtype(x.dtype)
    w, b = _affine(be, weight, bias, p.c, sd)
    mean, rstd, scale, shift = be.fold_frozen(running_mean, running_var, w, b, eps, sd)
    if x.size == 0:
        return (be.xp.empty_like(x) if out is None else out), mean, rstd, b
    xp = be.xp
    out3 = None if out is None else view.to3(out, xp)
    if act is None:
        y3 = be.forward_eval(view.to3(x, xp), p, scale, shift, out3)
    else:
        y3 = be.forward_eval(view.to3(x, xp), p, scale, shift, out3, act)
    return (view.from3(y3) if out is None else out), mean, rstd, b


def _own(b, bias):
    """The bias vector an activation's backward will read: a copy when it is the
    caller's own array (which an optimizer may update between the calls)."""
    return b.copy() if b is bias and b is not None else b


def _check_backward(norm: str, dy, x, saved: Saved, weight, out=None, xname="x", dh=None):
    """Validate a backward call's arguments against its forward; return (backend, dy, x, dh).

    ``xname`` is what the forward input is called ("h" for the fused
    add-and-norm forms, whose backward also takes ``dh``)."""
    if not isinstance(saved, Saved):
        raise TypeError(f"saved: expected the Saved object returned by {norm}_forward, got {v.type_name(saved)}")
    if saved.norm != norm:
        raise ValueError(f"saved: expected the result of {norm}_forward, got one of {saved.norm}_forward")
    be = get_backend_instance(saved.backend)
    x = v.check_array(xname, x, be)
    if tuple(x.shape) != saved.view.shape or x.dtype != saved.dtype:
        what = "forward input's" if xname == "x" else f"forward's {xname}"
        raise ValueError(
            f"{xname}: expected the {what} shape {saved.view.shape} and dtype {saved.dtype}, "
            f"got shape {tuple(x.shape)} and dtype {x.dtype}"
        )
    if saved.overwritten is not None and v.overlap(be.xp, x, saved.overwritten) != "none":
        raise ValueError(f"x: its memory holds the output of the {norm}_forward call that wrote over it "
                         "(out=x), not the input this gradient needs; pass the original input, or run the "
                         "forward with a separate out= buffer")
    dy = v.check_like("dy", dy, x, be)
    inplace = (("dy", dy), (xname, x))
    if xname == "h":
        dh = v.check_like("dh", dh, x, be)
        inplace += (("dh", dh),)
    v.check_param("weight", weight, saved.param_shape, be)
    if out is not None:
        # Every backward kernel reads dy[i] and x[i] (and dh[i]) before it writes dx[i]
        # (the sums are complete before the sweep that writes dx), so dx may replace either.
        v.check_out(out, x, be, saved.view.perm, inplace=inplace, disjoint=(("weight", weight),))
    return be, dy, x, dh


def _backward(norm: str, dy, x, saved: Saved, weight, out=None, dh=None):
    """Shared backward: validation, view, backend call, parameter gradients.

    With ``dh`` (the fused add-and-norm forms, x being h): dx = dh + the norm's dx."""
    be, dy, x, dh = _check_backward(norm, dy, x, saved, weight, out, "h" if norm.startswith("add_") else "x", dh)
    return _backward_checked(be, dy, x, saved, weight, out, dh)


def _backward_checked(be, dy, x, saved: Saved, weight, out=None, dh=None):
    """:func:`_backward` below its validation: arguments that :func:`_check_backward` would pass
    as they are (``cnorm.torch``'s eager autograd: x and weight are the ones its forward checked,
    dy and dh come from autograd with x's shape and dtype); ``be`` is ``saved``'s backend."""
    p, xp = saved.problem, be.xp
    sd = stats_dtype(x.dtype)
    if x.size == 0 or p.group_size == 0:
        if dh is None:
            dx = xp.zeros_like(x) if out is None else out
        elif out is None:
            dx = dh.copy()
        else:
            out[...] = dh
            dx = out
        dweight = xp.zeros(p.c, dtype=sd)
        dbias = xp.zeros(p.c, dtype=sd)
    else:
        w = _weight_vector(xp, weight, p.c, sd, saved.weight_offset)
        to3 = saved.view.to3
        x3, dy3 = to3(x, xp), to3(dy, xp)
        out3 = None if out is None else to3(out, xp)
        if dh is not None:
            dx3, dweight, dbias = be.add_backward(dy3, to3(dh, xp), x3, p, saved.mean, saved.rstd, w, out3)
        else:
            kernel = be.backward_train if saved.batch_stats else be.backward_eval
            if saved.activation is None:
                dx3, dweight, dbias = kernel(dy3, x3, p, saved.mean, saved.rstd, w, out3)
            else:
                dx3, dweight, dbias = kernel(dy3, x3, p, saved.mean, saved.rstd, w, out3, saved.activation,
                                             saved.act_bias)
        dx = saved.view.from3(dx3) if out is None else out
    dweight = None if weight is None else dweight.reshape(saved.param_shape)
    dbias = dbias.reshape(saved.param_shape) if saved.has_bias else None
    return dx, dweight, dbias


def _saved_from_stats(norm, x, mean, rstd, *, batch_stats, has_bias, param_shape, groups=0, normalized_ndim=0,
                      activation=None, act_bias=None):
    """A :class:`Saved` rebuilt from a forward's statistics (for callers that keep tensors, not
    Python objects, between forward and backward: the PyTorch operators of ``cnorm.torch``).

    ``norm`` is "batch_norm", "instance_norm", "group_norm" (channels on axis 1),
    "layer_norm", "rms_norm", "add_layer_norm" or "add_rms_norm" (``x`` being
    h there; ``normalized_ndim`` trailing axes); ``groups`` is the group count
    for group_norm."""
    be = resolve(None, [x])
    if norm in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"):
        view = row_view(tuple(x.shape), normalized_ndim)
        p = _problem(view, 1, norm.endswith("rms_norm"))
    else:
        view = channel_view(x, 1)
        g = {"batch_norm": 0, "instance_norm": x.shape[1], "group_norm": groups}[norm]
        p = _problem(view, g)
    saved = Saved(norm, p, view, mean, rstd, batch_stats, has_bias, be.name, tuple(param_shape), x.dtype)
    saved.activation, saved.act_bias = activation, act_bias
    return saved


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
                       training=True, momentum=0.1, eps=1e-5, channel_axis=1, backend=None, *, out=None,
                       activation=None):
    """Batch normalization, returning what backward needs.

    Statistics are per channel over the batch and every non-channel axis.

    Parameters
    ----------
    x : array, shape (N, C, ...) or with channels on ``channel_axis``
        Input of dtype float16, bfloat16 (``ml_dtypes.bfloat16``), float32
        or float64, in any memory layout. Half-precision data is computed
        with float32 statistics; float64 data with float64 ones.
    weight, bias : array of shape (C,), optional
        Affine parameters (γ, β), of any floating dtype (read in the
        statistics dtype).
    running_mean, running_var : array of shape (C,), optional
        Running statistics, of any floating dtype, updated in place when
        ``training``; required when not training.
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
    activation : {None, "relu", "silu"}
        Applied to the normalized output in the same sweep (Conv → BN → ReLU
        without a pass of its own): ``y = activation(weight·xhat + bias)``.
        Backward differentiates through it without any saved buffer the
        size of x: it recomputes the pre-activation from x and the statistics.

    Returns
    -------
    y : array
        Same shape, dtype and memory layout as ``x`` (``out`` when given).
    saved : Saved
        Per-channel mean and rstd for :func:`batch_norm_backward`, in the
        statistics dtype (float32, or float64 for float64 data).

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
    act = v.check_activation(activation)
    view = channel_view(x, axis)
    overwritten = _check_out(out, be, x, view, weight, bias, running_mean, running_var)
    p = _problem(view, 0)
    if not training:
        y, mean, rstd, b = _normalize_frozen(be, x, view, p, weight, bias, running_mean, running_var, eps, out,
                                             act)
        return y, _saved("batch_norm", p, view, mean, rstd, False, bias, be, (c,), x, None, overwritten,
                         act, _own(b, bias))
    count = p.n * p.s
    if count == 1:
        raise ValueError(f"x: expected more than 1 value per channel when training, got input of shape {x.shape}")
    y, mean, var, rstd, b = _normalize_batch(be, x, view, p, weight, bias, eps, out, act)
    if running_mean is not None and count > 1:
        _update_running(be.xp, running_mean, running_var, mean, var * (count / (count - 1)), momentum)
    return y, _saved("batch_norm", p, view, mean, rstd, True, bias, be, (c,), x, var, overwritten,
                     act, _own(b, bias))


def batch_norm(x, weight=None, bias=None, running_mean=None, running_var=None,
               training=True, momentum=0.1, eps=1e-5, channel_axis=1, backend=None, *, out=None,
               activation=None):
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
                              momentum, eps, channel_axis, backend, out=out, activation=activation)[0]


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
        In the statistics dtype (float32, or float64 for float64 data).
        dweight is None when ``weight`` is None; dbias is None when forward
        had no bias. In eval mode the running statistics are constants.
        After a forward with an activation, these are the gradients through
        it (dbias = Σ dy·activation'(z)).
    """
    return _backward("batch_norm", dy, x, saved, weight, out)


# -- InstanceNorm ------------------------------------------------------------------

def instance_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None,
                          use_input_stats=True, momentum=0.1, eps=1e-5, channel_axis=1, backend=None, *,
                          out=None, activation=None):
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
    momentum, eps, channel_axis, backend, out, activation
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
    act = v.check_activation(activation)
    view = channel_view(x, axis)
    overwritten = _check_out(out, be, x, view, weight, bias, running_mean, running_var)
    p = _problem(view, c)
    if not use_input_stats:
        y, mean, rstd, b = _normalize_frozen(be, x, view, p, weight, bias, running_mean, running_var, eps, out,
                                             act)
        return y, _saved("instance_norm", p, view, mean, rstd, False, bias, be, (c,), x, None, overwritten,
                         act, _own(b, bias))
    if p.s == 1:
        raise ValueError(f"x: expected more than 1 spatial element per channel when using input statistics, "
                         f"got input of shape {x.shape}")
    y, mean, var, rstd, b = _normalize_batch(be, x, view, p, weight, bias, eps, out, act)
    if running_mean is not None and p.n > 0 and p.s > 1:
        unbiased = var * (p.s / (p.s - 1))
        _update_running(be.xp, running_mean, running_var, mean.mean(axis=0), unbiased.mean(axis=0), momentum)
    return y, _saved("instance_norm", p, view, mean, rstd, True, bias, be, (c,), x, var, overwritten,
                     act, _own(b, bias))


def instance_norm(x, weight=None, bias=None, running_mean=None, running_var=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, channel_axis=1, backend=None, *, out=None,
                  activation=None):
    """Instance normalization; :func:`instance_norm_forward` without the saved state."""
    return instance_norm_forward(x, weight, bias, running_mean, running_var, use_input_stats,
                                 momentum, eps, channel_axis, backend, out=out, activation=activation)[0]


def instance_norm_backward(dy, x, saved, weight=None, *, out=None):
    """Gradients of :func:`instance_norm_forward`; see :func:`batch_norm_backward`."""
    return _backward("instance_norm", dy, x, saved, weight, out)


# -- GroupNorm ---------------------------------------------------------------------

def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5, channel_axis=1, backend=None, *,
                       out=None, activation=None):
    """Group normalization: statistics per (sample, group of C/G channels).

    Parameters
    ----------
    x : array, shape (N, C, ...) or with channels on ``channel_axis``
    num_groups : int
        G; must divide C. G = 1 normalizes each sample over all its values,
        G = C is instance normalization.
    weight, bias : array of shape (C,), optional
    eps, channel_axis, backend, out, activation
        As in :func:`batch_norm_forward` (GroupNorm → SiLU of diffusion
        U-Nets is ``activation="silu"``).

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
    act = v.check_activation(activation)
    view = channel_view(x, axis)
    overwritten = _check_out(out, be, x, view, weight, bias)
    p = _problem(view, groups)
    y, mean, var, rstd, b = _normalize_batch(be, x, view, p, weight, bias, eps, out, act)
    return y, _saved("group_norm", p, view, mean, rstd, True, bias, be, (c,), x, var, overwritten,
                     act, _own(b, bias))


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, channel_axis=1, backend=None, *, out=None,
               activation=None):
    """Group normalization; :func:`group_norm_forward` without the saved state."""
    return group_norm_forward(x, num_groups, weight, bias, eps, channel_axis, backend, out=out,
                              activation=activation)[0]


def group_norm_backward(dy, x, saved, weight=None, *, out=None):
    """Gradients of :func:`group_norm_forward`; see :func:`batch_norm_backward`."""
    return _backward("group_norm", dy, x, saved, weight, out)


# -- LayerNorm ---------------------------------------------------------------------

def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, backend=None, *, out=None,
                       activation=None, weight_offset=0.0):
    """Layer normalization over the trailing ``normalized_shape`` dimensions.

    Parameters
    ----------
    x : array, shape (..., \\*normalized_shape)
    normalized_shape : int or tuple of int
        The trailing dimensions normalized together.
    weight, bias : array of shape normalized_shape, optional
        Per-element affine parameters.
    eps, backend
        As in :func:`batch_norm_forward`.
    out : array, optional
        Where to write y: a C-contiguous array of x's shape and dtype, or x
        itself (in place); see :func:`batch_norm_forward`.
    activation : {None, "relu", "silu"}
        Applied to the normalized output in the same sweep; see
        :func:`batch_norm_forward`.
    weight_offset : float
        Added to weight where it scales: ``y = xhat·(weight_offset + weight)
        + bias`` (Gemma's zero-centred weights take ``weight_offset=1``),
        without a pass over the weights of your own; dweight is unchanged.

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
    act = v.check_activation(activation)
    offset = v.check_weight_offset(weight_offset, weight)
    overwritten = _check_out(out, be, x, view, weight, bias)
    y, mean, var, rstd, b = _normalize_batch(be, x, view, p, weight, bias, eps, out, act, offset)
    return y, _saved("layer_norm", p, view, mean, rstd, True, bias, be, shape, x, var, overwritten,
                     act, _own(b, bias), offset)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, backend=None, *, out=None,
               activation=None, weight_offset=0.0):
    """Layer normalization; :func:`layer_norm_forward` without the saved state.

    ``out=x`` normalizes in place."""
    be, _, view, p, xn = _layer_norm_setup(x, normalized_shape, weight, bias, backend)
    if xn is not None:
        x = xn
    eps = v.check_eps(eps)
    act = None if activation is None else v.check_activation(activation)
    offset = 0.0 if weight_offset == 0.0 and type(weight_offset) is float else \
        v.check_weight_offset(weight_offset, weight)
    if out is not None:
        _check_out(out, be, x, view, weight, bias)
    return _normalize_batch(be, x, view, p, weight, bias, eps, out, act, offset)[0]


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


# -- RMSNorm -----------------------------------------------------------------------

def _rms_eps(eps, dtype):
    """eps, or for None PyTorch's default: the machine epsilon of the statistics dtype
    (float32's for float32 and half data, float64's for float64)."""
    if eps is None:
        return float(np.finfo(stats_dtype(dtype)).eps)
    return v.check_eps(eps)


def rms_norm_forward(x, normalized_shape, weight=None, eps=None, *, backend=None, out=None, activation=None,
                     weight_offset=0.0):
    """Root-mean-square normalization over the trailing ``normalized_shape`` dimensions.

    ``y = x / sqrt(mean(x²) + eps) · weight``, the mean over the normalized
    dimensions of each sample: :func:`torch.nn.functional.rms_norm`, and
    ONNX ``RMSNormalization`` (opset 23) with ``axis`` as
    ``normalized_shape = x.shape[axis:]`` (statistics in float32 for half
    data, as its default ``stash_type``).

    Parameters
    ----------
    x : array, shape (..., \\*normalized_shape)
    normalized_shape : int or tuple of int
    weight : array of shape normalized_shape, optional
    eps : float, optional
        Added to the mean square; None (the default) is PyTorch's: the
        machine epsilon of float32 (float64 for float64 data).
    backend, out, activation, weight_offset
        As in :func:`layer_norm_forward`.

    Returns
    -------
    y : array
    saved : Saved
        rstd of shape (prod(leading dims), 1) (``saved.mean`` is zero).

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    >>> y, saved = cnorm.rms_norm_forward(x, 8, np.ones(8, np.float32))
    >>> bool(np.allclose((y ** 2).mean(axis=1), 1, atol=1e-4))
    True
    >>> dx, dweight, _ = cnorm.rms_norm_backward(np.ones_like(y), x, saved, np.ones(8, np.float32))
    """
    be, shape, view, _, xn = _layer_norm_setup(x, normalized_shape, weight, None, backend)
    if xn is not None:
        x = xn
    p = _problem(view, 1, True)
    eps = _rms_eps(eps, x.dtype)
    act = v.check_activation(activation)
    offset = v.check_weight_offset(weight_offset, weight)
    overwritten = _check_out(out, be, x, view, weight)
    y, mean, var, rstd, b = _normalize_batch(be, x, view, p, weight, None, eps, out, act, offset)
    return y, _saved("rms_norm", p, view, mean, rstd, True, None, be, shape, x, var, overwritten, act, b, offset)


def rms_norm(x, normalized_shape, weight=None, eps=None, *, backend=None, out=None, activation=None,
             weight_offset=0.0):
    """RMS normalization; :func:`rms_norm_forward` without the saved state.

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> x = np.array([[3.0, 4.0]])
    >>> cnorm.rms_norm(x, 2, eps=0.0).round(6).tolist()
    [[0.848528, 1.131371]]
    """
    return rms_norm_forward(x, normalized_shape, weight, eps, backend=backend, out=out, activation=activation,
                            weight_offset=weight_offset)[0]


def rms_norm_backward(dy, x, saved, weight=None, *, out=None):
    """Gradients of :func:`rms_norm_forward`: ``(dx, dweight, None)`` (RMSNorm has no bias).

    ``out`` receives dx, as in :func:`batch_norm_backward`."""
    return _backward("rms_norm", dy, x, saved, weight, out)


# -- the residual add fused into the norm (pre-norm transformer blocks) -------------

def _add_norm_forward(norm, x, residual, normalized_shape, weight, bias, eps, backend, out, h_out, offset):
    be, shape, view, p, xn = _layer_norm_setup(x, normalized_shape, weight, bias, backend)
    if xn is not None:
        x = xn
    if norm == "add_rms_norm":
        p = _problem(view, 1, True)
        eps = _rms_eps(eps, x.dtype)
    else:
        eps = v.check_eps(eps)
    residual = v.check_like("residual", residual, x, be)
    offset = v.check_weight_offset(offset, weight)
    params = (("weight", weight), ("bias", bias))
    inputs = (("x", x), ("residual", residual))
    if h_out is not None:
        v.check_out(h_out, x, be, view.perm, inplace=inputs, disjoint=params, name="h_out")
    if out is not None:
        v.check_out(out, x, be, view.perm, inplace=inputs, disjoint=params + (("h_out", h_out),))
    sd = stats_dtype(x.dtype)
    xp = be.xp
    if view.empty or p.group_size == 0:
        if h_out is None:
            h = (x.astype(sd) + residual.astype(sd)).astype(x.dtype)
        else:
            h_out[...] = x.astype(sd) + residual.astype(sd)
            h = h_out
        y, mean, rstd = _empty_forward(be, x, p, sd, out)
        var = mean
    else:
        w, b = _affine(be, weight, bias, p.c, sd, offset)
        to3 = view.to3
        y3, h3, mean, var, rstd = be.add_forward(
            to3(x, xp), to3(residual, xp), p, w, b, eps,
            None if out is None else to3(out, xp), None if h_out is None else to3(h_out, xp))
        y = view.from3(y3) if out is None else out
        h = view.from3(h3) if h_out is None else h_out
    saved = _saved(norm, p, view, mean, rstd, True, bias, be, shape, x, var, None, None, None, offset)
    return y, h, saved


def add_layer_norm_forward(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend=None,
                           out=None, h_out=None, weight_offset=0.0):
    """``h = x + residual`` and ``y = layer_norm(h)`` in one sweep (the pre-norm block).

    One read of x and residual, one write of y and h: the residual stream h
    (in x's dtype: added in float32 for half data, then rounded, as PyTorch's
    ``x + residual``) is the norm's input and the next block's residual.

    Parameters
    ----------
    x, residual : array of the same shape and dtype
    normalized_shape, weight, bias, eps, weight_offset
        As in :func:`layer_norm_forward`.
    backend : str, optional
    out, h_out : array, optional
        Where to write y and h (C-contiguous, x's shape and dtype). Either may
        be x or residual itself (vLLM's in-place ``fused_add_rms_norm`` is
        ``out=x, h_out=residual``), but not the same buffer.

    Returns
    -------
    y, h : array
    saved : Saved
        For :func:`add_layer_norm_backward`.

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> rng = np.random.default_rng(0)
    >>> x, r = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 3, 8))
    >>> y, h, saved = cnorm.add_layer_norm_forward(x, r, 8)
    >>> bool(np.array_equal(h, x + r)) and bool(np.allclose(y, cnorm.layer_norm(x + r, 8)))
    True
    >>> dx, dw, db = cnorm.add_layer_norm_backward(np.ones_like(y), np.zeros_like(h), h, saved)
    """
    return _add_norm_forward("add_layer_norm", x, residual, normalized_shape, weight, bias, eps, backend, out,
                             h_out, weight_offset)


def add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend=None, out=None,
                   h_out=None, weight_offset=0.0):
    """:func:`add_layer_norm_forward` without the saved state: returns ``(y, h)``."""
    return add_layer_norm_forward(x, residual, normalized_shape, weight, bias, eps, backend=backend, out=out,
                                  h_out=h_out, weight_offset=weight_offset)[:2]


def add_layer_norm_backward(dy, dh, h, saved, weight=None, *, out=None):
    """Gradients of :func:`add_layer_norm_forward` from those of both its outputs.

    Parameters
    ----------
    dy, dh : array
        Gradients of the loss with respect to y and to h (pass zeros for dh
        when h feeds nothing else).
    h : array
        The forward's h.
    saved : Saved
    weight : array, optional
    out : array, optional
        Where to write dx; it may be dy, dh or h itself.

    Returns
    -------
    dx : array
        The gradient of x and of residual alike (``dh`` + the norm's dx).
    dweight, dbias : array or None
    """
    if dh is None:
        raise ValueError("dh: expected the gradient of the forward's h output (zeros when h feeds nothing "
                         "else), got None")
    return _backward("add_layer_norm", dy, h, saved, weight, out, dh)


def add_rms_norm_forward(x, residual, normalized_shape, weight=None, eps=None, *, backend=None, out=None,
                         h_out=None, weight_offset=0.0):
    """``h = x + residual`` and ``y = rms_norm(h)`` in one sweep; see :func:`add_layer_norm_forward`.

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> x, r = np.ones((2, 4), np.float32), np.full((2, 4), 2.0, np.float32)
    >>> y, h, saved = cnorm.add_rms_norm_forward(x, r, 4)
    >>> h[0].tolist(), y[0].round(4).tolist()
    ([3.0, 3.0, 3.0, 3.0], [1.0, 1.0, 1.0, 1.0])
    """
    return _add_norm_forward("add_rms_norm", x, residual, normalized_shape, weight, None, eps, backend, out,
                             h_out, weight_offset)


def add_rms_norm(x, residual, normalized_shape, weight=None, eps=None, *, backend=None, out=None, h_out=None,
                 weight_offset=0.0):
    """:func:`add_rms_norm_forward` without the saved state: returns ``(y, h)``."""
    return add_rms_norm_forward(x, residual, normalized_shape, weight, eps, backend=backend, out=out,
                                h_out=h_out, weight_offset=weight_offset)[:2]


def add_rms_norm_backward(dy, dh, h, saved, weight=None, *, out=None):
    """Gradients of :func:`add_rms_norm_forward`: ``(dx, dweight, None)``; see
    :func:`add_layer_norm_backward`."""
    if dh is None:
        raise ValueError("dh: expected the gradient of the forward's h output (zeros when h feeds nothing "
                         "else), got None")
    return _backward("add_rms_norm", dy, h, saved, weight, out, dh)


# -- BatchNorm folded into the preceding convolution (inference) ---------------------

def fold_batch_norm(conv_weight, conv_bias, running_mean, running_var, eps=1e-5, weight=None, bias=None,
                    transpose=False):
    """Fold an eval-mode BatchNorm into the convolution (or linear layer) before it.

    Returns ``(weight, bias)`` of one convolution equal to conv → BatchNorm
    in eval mode, as :func:`torch.nn.utils.fusion.fuse_conv_bn_weights`:
    ``scale = weight / sqrt(running_var + eps)``, the conv weight's output
    channels multiplied by scale, ``bias = (conv_bias − running_mean)·scale
    + bias``. Computed in float64, returned in the conv weight's dtype.

    Parameters
    ----------
    conv_weight : array, shape (C_out, C_in/groups, k...) (or (C_in, C_out/groups, k...) when ``transpose``)
    conv_bias : array of shape (C_out,), or None (zeros)
    running_mean, running_var : array of shape (C_out,)
    eps : float
    weight, bias : array of shape (C_out,), optional
        The BatchNorm's affine parameters (ones and zeros when absent).
    transpose : bool
        The convolution is transposed (``ConvTranspose``): output channels on axis 1.

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> w, b = cnorm.fold_batch_norm(np.ones((2, 1, 1, 1)), None, np.zeros(2), np.full(2, 3.0), eps=1.0)
    >>> w.ravel().tolist(), b.tolist()
    ([0.5, 0.5], [0.0, 0.0])
    """
    for name, a in (("conv_weight", conv_weight), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{name}: expected an array, got {v.type_name(a)}")
    xp = _xp_of(conv_weight)
    transpose = v.check_bool("transpose", transpose)
    if conv_weight.ndim < 2 if transpose else conv_weight.ndim < 1:
        raise ValueError(f"conv_weight: expected at least {2 if transpose else 1} dimensions, "
                         f"got shape {tuple(conv_weight.shape)}")
    if not v.is_floating_dtype(conv_weight.dtype):
        raise TypeError(f"conv_weight: expected a floating array, got dtype {conv_weight.dtype}")
    axis = 1 if transpose else 0
    c = conv_weight.shape[axis]
    for name, a in (("conv_bias", conv_bias), ("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if a is None:
            continue
        if not hasattr(a, "shape") or not v.is_floating_dtype(getattr(a, "dtype", None)):
            raise TypeError(f"{name}: expected a floating array, got {v.type_name(a)}")
        if tuple(a.shape) != (c,):
            raise ValueError(f"{name}: expected shape ({c},) (the convolution's {c} output channels on axis "
                             f"{axis}), got shape {tuple(a.shape)}")
    eps = v.check_eps(eps)
    f64 = xp.float64
    one = lambda a, fill: xp.full(c, fill, f64) if a is None else a.astype(f64)  # noqa: E731
    scale = one(weight, 1.0) / xp.sqrt(running_var.astype(f64) + eps)
    shape = [1] * conv_weight.ndim
    shape[axis] = c
    new_w = (conv_weight.astype(f64) * scale.reshape(shape)).astype(conv_weight.dtype)
    new_b = (one(conv_bias, 0.0) - running_mean.astype(f64)) * scale + one(bias, 0.0)
    bdtype = conv_bias.dtype if conv_bias is not None else conv_weight.dtype
    return new_w, new_b.astype(bdtype)


def _xp_of(a):
    """The array module of ``a`` (NumPy, or CuPy for device arrays)."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy
        return cupy
    return np


# Arrays of other libraries (PyTorch, JAX, array-API) through DLPack: imported
# without a copy, returned as their own type (cnorm._interop).
for _name in __all__:
    if _name != "Saved":
        globals()[_name] = accepts_dlpack(globals()[_name])
del _name
