"""cnorm's kernels as PyTorch operators, modules and a one-call model conversion.

The norms are registered with :mod:`torch.library` as custom operators
(``torch.ops.cnorm.batch_norm``, ``layer_norm``, ``group_norm``,
``instance_norm``, ``rms_norm`` and one backward, ``norm_backward``), each
with its autograd formula (backward runs cnorm's backward on the saved
statistics) and a fake implementation, so they work in eager mode, under
:func:`torch.autograd.gradcheck` and inside ``torch.compile(fullgraph=True)``.
CPU tensors run on the cython backend, CUDA tensors on the cupy backend
(through DLPack, without copies).

The functions here take PyTorch's functional arguments::

    >>> import torch, cnorm.torch as ct
    >>> x = torch.randn(8, 16, 4, 4, requires_grad=True)
    >>> w = torch.ones(16, requires_grad=True)
    >>> y = ct.batch_norm(x, None, None, w, None, training=True)
    >>> y.sum().backward()
    >>> x.grad.shape
    torch.Size([8, 16, 4, 4])

:mod:`cnorm.torch.nn` has drop-in subclasses of the ``torch.nn`` norm
modules, and :func:`replace_norms` swaps a model's norm modules for them in
place.
"""

from __future__ import annotations

from math import prod
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import functional as _F
from .._interop import _import_torch, export_torch
from ..backends import get_backend_instance

__all__ = ["batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm",
           "replace_norms"]


def _np(name, t):
    """A tensor's memory as a NumPy (CPU) or CuPy (CUDA) array, without a copy."""
    if t is None:
        return None
    return _import_torch(name, t.detach() if t.requires_grad else t)


def _t(a, proto):
    """A NumPy/CuPy array as a tensor like ``proto`` (same memory)."""
    return export_torch(a)


def _stats(a, proto):
    """Statistics as a new tensor (an operator's outputs may not alias its inputs)."""
    return _t(a.copy(), proto)


# the functional forms without their DLPack wrapper: the operators hand them NumPy/CuPy arrays already
_batch_norm_forward = _F.batch_norm_forward.__wrapped__
_instance_norm_forward = _F.instance_norm_forward.__wrapped__
_group_norm_forward = _F.group_norm_forward.__wrapped__
_layer_norm_forward = _F.layer_norm_forward.__wrapped__
_rms_norm_forward = _F.rms_norm_forward.__wrapped__
_add_layer_norm_forward = _F.add_layer_norm_forward.__wrapped__
_add_rms_norm_forward = _F.add_rms_norm_forward.__wrapped__
_layer_norm_plain = _F.layer_norm.__wrapped__


# Each operator's forward on NumPy/CuPy views of its tensors: (output arrays, Saved). The
# operators copy the statistics out of Saved as tensors; the eager autograd path (_Eager)
# keeps Saved itself for the backward.

def _batch_norm_np(x, weight, bias, running_mean, running_var, training, eps):
    rm, rv = (None, None) if training else (_np("running_mean", running_mean), _np("running_var", running_var))
    y, s = _batch_norm_forward(_np("x", x), _np("weight", weight), _np("bias", bias), rm, rv, training, 0.0, eps)
    return (y,), s


def _instance_norm_np(x, weight, bias, running_mean, running_var, use_input_stats, eps):
    rm, rv = ((None, None) if use_input_stats
              else (_np("running_mean", running_mean), _np("running_var", running_var)))
    y, s = _instance_norm_forward(_np("x", x), _np("weight", weight), _np("bias", bias), rm, rv,
                                    use_input_stats, 0.0, eps)
    return (y,), s


def _group_norm_np(x, num_groups, weight, bias, eps):
    y, s = _group_norm_forward(_np("x", x), num_groups, _np("weight", weight), _np("bias", bias), eps)
    return (y,), s


def _layer_norm_np(x, normalized_shape, weight, bias, eps):
    y, s = _layer_norm_forward(_np("x", x), tuple(normalized_shape), _np("weight", weight), _np("bias", bias),
                                 eps)
    return (y,), s


def _rms_norm_np(x, normalized_shape, weight, eps):
    y, s = _rms_norm_forward(_np("x", x), tuple(normalized_shape), _np("weight", weight), eps)
    return (y,), s


def _add_layer_norm_np(x, residual, normalized_shape, weight, bias, eps):
    y, h, s = _add_layer_norm_forward(_np("x", x), _np("residual", residual), tuple(normalized_shape),
                                        _np("weight", weight), _np("bias", bias), eps)
    return (y, h), s


def _add_rms_norm_np(x, residual, normalized_shape, weight, eps):
    y, h, s = _add_rms_norm_forward(_np("x", x), _np("residual", residual), tuple(normalized_shape),
                                      _np("weight", weight), eps)
    return (y, h), s


def _sdtype(x: Tensor):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# -- forward operators ---------------------------------------------------------------

# BatchNorm and InstanceNorm: the operators are functional (an autograd formula
# needs that): in training they return the batch variance as well, and the
# Python functions below update the running statistics from it with torch ops.

def _var_out(s, x, shape):
    return _stats(s.var, x) if s.var is not None else x.new_zeros(shape, dtype=_sdtype(x))


@torch.library.custom_op("cnorm::batch_norm", mutates_args=(), device_types=("cpu", "cuda"))
def _batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], training: bool, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, rstd, biased batch variance); eval (training False) normalizes with the running statistics."""
    (y,), s = _batch_norm_np(x, weight, bias, running_mean, running_var, training, eps)
    return _t(y, x), _stats(s.mean, x), _stats(s.rstd, x), _var_out(s, x, (x.shape[1],))


@_batch_norm.register_fake
def _(x, weight, bias, running_mean, running_var, training, eps):
    c = x.shape[1]
    return (torch.empty_like(x),) + tuple(x.new_empty((c,), dtype=_sdtype(x)) for _ in range(3))


@torch.library.custom_op("cnorm::instance_norm", mutates_args=(), device_types=("cpu", "cuda"))
def _instance_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], use_input_stats: bool,
                   eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, rstd, biased variance): per sample and channel (N, C), or the running ones (C,) in eval."""
    (y,), s = _instance_norm_np(x, weight, bias, running_mean, running_var, use_input_stats, eps)
    shape = (x.shape[0], x.shape[1]) if use_input_stats else (x.shape[1],)
    return _t(y, x), _stats(s.mean, x), _stats(s.rstd, x), _var_out(s, x, shape)


@_instance_norm.register_fake
def _(x, weight, bias, running_mean, running_var, use_input_stats, eps):
    shape = (x.shape[0], x.shape[1]) if use_input_stats else (x.shape[1],)
    return (torch.empty_like(x),) + tuple(x.new_empty(shape, dtype=_sdtype(x)) for _ in range(3))


@torch.library.custom_op("cnorm::group_norm", mutates_args=(), device_types=("cpu", "cuda"))
def _group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    (y,), s = _group_norm_np(x, num_groups, weight, bias, eps)
    return _t(y, x), _stats(s.mean, x), _stats(s.rstd, x)


@_group_norm.register_fake
def _(x, num_groups, weight, bias, eps):
    shape = (x.shape[0], num_groups)
    return torch.empty_like(x), x.new_empty(shape, dtype=_sdtype(x)), x.new_empty(shape, dtype=_sdtype(x))


@torch.library.custom_op("cnorm::layer_norm", mutates_args=(), device_types=("cpu", "cuda"))
def _layer_norm(x: Tensor, normalized_shape: List[int], weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    (y,), s = _layer_norm_np(x, normalized_shape, weight, bias, eps)
    return _t(y, x), _stats(s.mean, x), _stats(s.rstd, x)


def _rows_fake(x, normalized_shape):
    rows = prod(x.shape[: x.dim() - len(normalized_shape)])
    return torch.empty_like(x), x.new_empty((rows, 1), dtype=_sdtype(x)), x.new_empty((rows, 1), dtype=_sdtype(x))


@_layer_norm.register_fake
def _(x, normalized_shape, weight, bias, eps):
    return _rows_fake(x, normalized_shape)


@torch.library.custom_op("cnorm::rms_norm", mutates_args=(), device_types=("cpu", "cuda"))
def _rms_norm(x: Tensor, normalized_shape: List[int], weight: Optional[Tensor],
              eps: Optional[float]) -> Tuple[Tensor, Tensor, Tensor]:
    (y,), s = _rms_norm_np(x, normalized_shape, weight, eps)
    return _t(y, x), _stats(s.mean, x), _stats(s.rstd, x)


@_rms_norm.register_fake
def _(x, normalized_shape, weight, eps):
    return _rows_fake(x, normalized_shape)


# the residual add fused into LayerNorm / RMSNorm: (y, h, mean, rstd), h = x + residual

@torch.library.custom_op("cnorm::add_layer_norm", mutates_args=(), device_types=("cpu", "cuda"))
def _add_layer_norm(x: Tensor, residual: Tensor, normalized_shape: List[int], weight: Optional[Tensor],
                    bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    (y, h), s = _add_layer_norm_np(x, residual, normalized_shape, weight, bias, eps)
    return _t(y, x), _t(h, x), _stats(s.mean, x), _stats(s.rstd, x)


@_add_layer_norm.register_fake
def _(x, residual, normalized_shape, weight, bias, eps):
    y, mean, rstd = _rows_fake(x, normalized_shape)
    return y, torch.empty_like(x), mean, rstd


@torch.library.custom_op("cnorm::add_rms_norm", mutates_args=(), device_types=("cpu", "cuda"))
def _add_rms_norm(x: Tensor, residual: Tensor, normalized_shape: List[int], weight: Optional[Tensor],
                  eps: Optional[float]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    (y, h), s = _add_rms_norm_np(x, residual, normalized_shape, weight, eps)
    return _t(y, x), _t(h, x), _stats(s.mean, x), _stats(s.rstd, x)


@_add_rms_norm.register_fake
def _(x, residual, normalized_shape, weight, eps):
    y, mean, rstd = _rows_fake(x, normalized_shape)
    return y, torch.empty_like(x), mean, rstd


# -- the backward operator -----------------------------------------------------------

@torch.library.custom_op("cnorm::norm_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _norm_backward(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor], norm: str,
                   groups: int, normalized_ndim: int, batch_stats: bool, has_bias: bool,
                   dh: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dweight/dbias empty where there is no weight/bias (statistics dtype).

    The fused add forms ("add_layer_norm", "add_rms_norm"): x is h, and ``dh``
    the gradient of h, added to dx."""
    xa = _np("x", x)
    if normalized_ndim:
        param_shape = tuple(x.shape[x.dim() - normalized_ndim:])
    else:
        param_shape = (x.shape[1],)
    saved = _F._saved_from_stats(norm, xa, _np("mean", mean), _np("rstd", rstd), batch_stats=batch_stats,
                                 has_bias=has_bias, param_shape=param_shape, groups=groups,
                                 normalized_ndim=normalized_ndim)
    dx, dw, db = _F._backward(norm, _np("dy", dy), xa, saved, _np("weight", weight), None, _np("dh", dh))
    def grad(g):  # (separate empty tensors: an operator's outputs may not alias each other)
        return x.new_empty((0,), dtype=_sdtype(x)) if g is None else _t(g, x)

    return _t(dx, x), grad(dw), grad(db)


@_norm_backward.register_fake
def _(dy, x, mean, rstd, weight, norm, groups, normalized_ndim, batch_stats, has_bias, dh=None):
    pshape = tuple(x.shape[x.dim() - normalized_ndim:]) if normalized_ndim else (x.shape[1],)
    sd = _sdtype(x)
    return (torch.empty_like(x), x.new_empty(pshape if weight is not None else (0,), dtype=sd),
            x.new_empty(pshape if has_bias else (0,), dtype=sd))


def _grads(ctx, dy, norm, groups=0, normalized_ndim=0, dh=None):
    w = ctx.w_index + ctx.shift
    need_w, need_b = ctx.needs_input_grad[w], ctx.bias_dtype is not None and ctx.needs_input_grad[w + 1]
    if ctx.traced:
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.cnorm.norm_backward(dy, x, mean, rstd, weight, norm, groups, normalized_ndim,
                                                   ctx.batch_stats, ctx.bias_dtype is not None, dh)
    else:
        # eager (_Eager): the forward's own Saved, and cnorm's backward below its validation (the
        # forward checked x and weight; autograd hands dy and dh in x's shape and dtype)
        x, weight = ctx.saved_tensors
        saved = ctx.saved
        dx, dw, db = _F._backward_checked(get_backend_instance(saved.backend), _np("dy", dy), _np("x", x), saved,
                                          _np("weight", weight), None, _np("dh", dh))
        dx = _t(dx, x)
        dw = _t(dw, x) if need_w and weight is not None else None
        db = _t(db, x) if need_b else None
    dw = _cast(dw, weight.dtype) if need_w and weight is not None else None
    db = _cast(db, ctx.bias_dtype) if need_b else None
    return dx, dw, db


def _cast(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


def _setup(ctx, x, weight, bias, output, batch_stats, w_index):
    if not hasattr(ctx, "shift"):  # the operators' own autograd (traced or called through torch.ops)
        ctx.shift, ctx.traced = 0, True
    if ctx.traced:  # (saved values must be tensors there)
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
    else:  # eager: the statistics stay in ctx.saved (the forward's Saved object)
        ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.batch_stats = batch_stats
    ctx.w_index = w_index


def _running_setup(ctx, inputs, output):
    """BatchNorm and InstanceNorm: (x, weight, bias, running_mean, running_var, batch_stats, eps)."""
    x, weight, bias, _, _, batch_stats, _ = inputs
    _setup(ctx, x, weight, bias, output[:3], batch_stats, 1)


def _running_backward(norm):
    def backward(ctx, dy, _dmean, _drstd, _dvar):
        return (*_grads(ctx, dy, norm), None, None, None, None)

    return backward


def _gn_setup(ctx, inputs, output):
    x, num_groups, weight, bias, eps = inputs
    _setup(ctx, x, weight, bias, output, True, 2)
    ctx.groups = num_groups


def _gn_backward(ctx, dy, _dmean, _drstd):
    dx, dw, db = _grads(ctx, dy, "group_norm", groups=ctx.groups)
    return dx, None, dw, db, None


def _ln_setup(ctx, inputs, output):
    x, normalized_shape, weight, bias, eps = inputs
    _setup(ctx, x, weight, bias, output, True, 2)
    ctx.nd = len(normalized_shape)


def _ln_backward(ctx, dy, _dmean, _drstd):
    dx, dw, db = _grads(ctx, dy, "layer_norm", normalized_ndim=ctx.nd)
    return dx, None, dw, db, None


def _rms_setup(ctx, inputs, output):
    x, normalized_shape, weight, eps = inputs
    _setup(ctx, x, weight, None, output, True, 2)
    ctx.nd = len(normalized_shape)


def _rms_backward(ctx, dy, _dmean, _drstd):
    dx, dw, _ = _grads(ctx, dy, "rms_norm", normalized_ndim=ctx.nd)
    return dx, None, dw, None


def _add_setup(ctx, x, weight, bias, output, w_index):
    """As _setup, with h (the norm's input) kept in x's place."""
    y, h, mean, rstd = output
    _setup(ctx, h, weight, bias, (y, mean, rstd), True, w_index)


def _add_ln_setup(ctx, inputs, output):
    x, residual, normalized_shape, weight, bias, eps = inputs
    _add_setup(ctx, x, weight, bias, output, 3)
    ctx.nd = len(normalized_shape)


def _add_ln_backward(ctx, dy, dh, _dmean, _drstd):
    dx, dw, db = _grads(ctx, dy, "add_layer_norm", normalized_ndim=ctx.nd, dh=_dense(dh, ctx))
    return dx, dx, None, dw, db, None


def _add_rms_setup(ctx, inputs, output):
    x, residual, normalized_shape, weight, eps = inputs
    _add_setup(ctx, x, weight, None, output, 3)
    ctx.nd = len(normalized_shape)


def _add_rms_backward(ctx, dy, dh, _dmean, _drstd):
    dx, dw, _ = _grads(ctx, dy, "add_rms_norm", normalized_ndim=ctx.nd, dh=_dense(dh, ctx))
    return dx, dx, None, dw, None


def _dense(dh, ctx):
    """h's gradient; zeros when h was not used (autograd passes None, or zeros, then)."""
    return torch.zeros_like(ctx.saved_tensors[0]) if dh is None else dh


_FORMULAS = {
    _add_layer_norm: (_add_ln_setup, _add_ln_backward),
    _add_rms_norm: (_add_rms_setup, _add_rms_backward),
    _batch_norm: (_running_setup, _running_backward("batch_norm")),
    _instance_norm: (_running_setup, _running_backward("instance_norm")),
    _group_norm: (_gn_setup, _gn_backward),
    _layer_norm: (_ln_setup, _ln_backward),
    _rms_norm: (_rms_setup, _rms_backward),
}
for _op, (_s, _b) in _FORMULAS.items():
    _op.register_autograd(_b, setup_context=_s)


_NP_FORWARDS = {
    _batch_norm: _batch_norm_np,
    _instance_norm: _instance_norm_np,
    _group_norm: _group_norm_np,
    _layer_norm: _layer_norm_np,
    _rms_norm: _rms_norm_np,
    _add_layer_norm: _add_layer_norm_np,
    _add_rms_norm: _add_rms_norm_np,
}


def _eager_outputs(op, *inputs):
    """``op``'s outputs in eager mode, and the forward's Saved.

    The same tuple as the operator's, with only the statistics that the functions
    below read (BatchNorm's and InstanceNorm's batch mean and variance, for the
    running statistics) as tensors over the kernel's own arrays (nothing else
    holds them: no copy); the other statistics are None."""
    ys, s = _NP_FORWARDS[op](*inputs)
    out = tuple(_t(a, None) for a in ys)
    if op is _batch_norm or op is _instance_norm:
        out += (None, None, None) if s.var is None else (_t(s.mean, None), None, _t(s.var, None))
    else:
        out += (None, None)
    return out, s


class _Eager(torch.autograd.Function):
    """The same formulas in eager mode without the dispatcher: torch.library's
    Python operators cost tens of microseconds per call (schema defaults,
    alias checks, redispatch), this a few. torch.compile traces the operators.

    The forward's Saved object stays on the context (``ctx.saved``): backward
    neither rebuilds it from statistics tensors nor revalidates x and weight."""

    @staticmethod
    def forward(ctx, op, *inputs):
        out, ctx.saved = _eager_outputs(op, *inputs)
        ctx.shift, ctx.traced, ctx.op = 1, False, op
        _FORMULAS[op][0](ctx, inputs, out)
        ctx.mark_non_differentiable(*(t for t in out[2 if op in (_add_layer_norm, _add_rms_norm) else 1:]
                                      if t is not None))  # statistics
        return out

    @staticmethod
    def backward(ctx, *grads):
        return (None,) + tuple(_FORMULAS[ctx.op][1](ctx, *grads))


def _call(op, *inputs):
    """Run operator ``op``: through the dispatcher while torch.compile traces, else directly
    (through autograd only when the call records a graph: the autograd Function costs several
    microseconds that a call with nothing to differentiate need not pay)."""
    if torch.compiler.is_compiling():
        return op(*inputs)
    if torch.is_grad_enabled():
        for a in inputs:
            if isinstance(a, Tensor) and a.requires_grad:
                return _Eager.apply(op, *inputs)
    return _eager_outputs(op, *inputs)[0]


def _no_graph(*tensors):
    """True in eager mode when the call records no autograd graph (no grad mode, or no tensor
    requires grad): the result can come from cnorm's plain functional form."""
    if torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return False
    return True



# -- functional API (torch.nn.functional's arguments) --------------------------------

def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5):
    """As :func:`torch.nn.functional.batch_norm`, on cnorm's kernels.

    In training the running statistics (when given) are updated as PyTorch
    does: ``running = (1 - momentum)·running + momentum·batch``, with the
    unbiased batch variance."""
    training = bool(training)
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean, running_var: eval mode (training=False) normalizes with the running "
                         "statistics; expected both tensors, got None")
    y, mean, _, var = _call(_batch_norm, input, weight, bias, running_mean, running_var, training,
                                                 float(eps))
    if training and running_mean is not None:
        n = input.numel() // max(input.shape[1], 1)
        _update(running_mean, running_var, mean, var * (n / max(n - 1, 1)), float(momentum))
    return y


def _update(running_mean, running_var, mean, var_unbiased, momentum):
    if running_mean.requires_grad or running_var.requires_grad:  # (buffers normally do not: no mode switch)
        with torch.no_grad():
            return _update(running_mean.detach(), running_var.detach(), mean, var_unbiased, momentum)
    # running.mul_(1 - momentum).add_(batch, alpha=momentum) on both buffers, in two foreach calls
    # (the same per-tensor operations, a few microseconds less per call); mean and var never require grad
    running = [running_mean, running_var]
    torch._foreach_mul_(running, 1.0 - momentum)
    torch._foreach_add_(running, [_cast(mean, running_mean.dtype), _cast(var_unbiased, running_var.dtype)],
                        alpha=momentum)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5):
    """As :func:`torch.nn.functional.instance_norm`, on cnorm's kernels.

    With ``use_input_stats`` and running statistics, these are updated with
    the batch's average of the per-sample statistics, as PyTorch does."""
    use_input_stats = bool(use_input_stats)
    if not use_input_stats and (running_mean is None or running_var is None):
        raise ValueError("running_mean, running_var: use_input_stats=False normalizes with the running "
                         "statistics; expected both tensors, got None")
    y, mean, _, var = _call(_instance_norm, input, weight, bias, running_mean, running_var,
                                                    use_input_stats, float(eps))
    if use_input_stats and running_mean is not None:
        s = input[0, 0].numel()
        _update(running_mean, running_var, mean.mean(0), (var * (s / max(s - 1, 1))).mean(0), float(momentum))
    return y


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """As :func:`torch.nn.functional.group_norm`, on cnorm's kernels."""
    return _call(_group_norm, input, int(num_groups), weight, bias, float(eps))[0]


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """As :func:`torch.nn.functional.layer_norm`, on cnorm's kernels."""
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    if _no_graph(input, weight, bias):  # (small rows at high rates: the plain form, no statistics to copy out)
        return _t(_layer_norm_plain(_np("x", input), tuple(shape), _np("weight", weight), _np("bias", bias),
                                    float(eps)), input)
    return _call(_layer_norm, input, shape, weight, bias, float(eps))[0]


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """As :func:`torch.nn.functional.rms_norm`, on cnorm's kernels."""
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    return _call(_rms_norm, input, shape, weight, None if eps is None else float(eps))[0]


def add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``(y, h)``: h = x + residual (the new residual stream) and y = layer_norm(h), in one sweep.

    Differentiable in both outputs; x and residual get the same gradient."""
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    y, h, _, _ = _call(_add_layer_norm, x, residual, shape, weight, bias, float(eps))
    return y, h


def add_rms_norm(x, residual, normalized_shape, weight=None, eps=None):
    """``(y, h)``: h = x + residual and y = rms_norm(h), in one sweep (vLLM's fused_add_rms_norm)."""
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    y, h, _, _ = _call(_add_rms_norm, x, residual, shape, weight, None if eps is None else float(eps))
    return y, h


def replace_norms(model):
    """Swap the norm modules of ``model`` for cnorm's subclasses, in place; return ``model``.

    Every module whose type is exactly one of ``torch.nn``'s BatchNorm1d/2d/3d,
    InstanceNorm1d/2d/3d, GroupNorm, LayerNorm or RMSNorm becomes the
    :mod:`cnorm.torch.nn` subclass of it: the same object with the same
    parameters, buffers and state-dict keys, whose forward runs cnorm's
    kernels. Other modules (subclasses, SyncBatchNorm, LazyBatchNorm) are left
    alone.

    Examples
    --------
    >>> import torch, cnorm.torch as ct
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> ct.replace_norms(model)[1]
    BatchNorm2d(8, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
    >>> type(model[1]).__module__
    'cnorm.torch.nn'
    """
    from . import nn as cnn

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        new = cnn.REPLACEMENTS.get(type(module))
        if new is not None:
            module.__class__ = new
    return model

