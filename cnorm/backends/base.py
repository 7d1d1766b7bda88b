"""The Backend interface: the few kernel problems every norm reduces to.

The front end (:mod:`cnorm.functional`) turns BatchNorm, LayerNorm,
GroupNorm and InstanceNorm into a :class:`Problem` over a C-contiguous 3-D
array ``x3`` and calls the methods below; a backend implements kernels only
and knows nothing about which norm asked.

Shapes and dtypes every method can rely on (the front end guarantees them):

* ``x3``, ``dy3``: C-contiguous, 3-D, the same shape and dtype, of the
  backend's array type. ``layout == "cf"``: shape ``(N, C, S)``;
  ``layout == "cl"``: shape ``(N, S, C)``.
* ``weight``, ``bias``, ``scale``, ``shift``: contiguous 1-D arrays of length C
  in the statistics dtype (never None: the front end passes ones/zeros).
* statistics (``mean``, ``var``, ``rstd``): the statistics dtype, shape ``(C,)``
  for a cross-sample problem, ``(N, G)`` for a per-sample problem.
* the statistics dtype is float64 for float64 data, float32 otherwise.
* outputs (``y3``, ``dx3``) are new arrays of the shape, layout and dtype of
  ``x3``, or, when the method's ``out`` is given, written into ``out`` and
  returned as that very object: a writable, aligned, C-contiguous array of
  ``x3``'s shape and dtype that is either disjoint from every input or
  exactly ``x3`` or ``dy3`` (in place: a kernel must read each input value
  before it writes the output value at that place, or compute into scratch
  first); ``dweight``/``dbias`` are new ``(C,)`` arrays in the statistics
  dtype.
* N*S >= 1 and every group holds at least one value (the front end handles
  empty inputs itself).
* ``p.rms`` (RMSNorm): the statistics are the mean square, not the variance:
  ``mean`` is 0 (returned as zeros), ``var = Σx²/m``, and backward has no
  mean term (``dx = rstd·(w·g − xhat·mean(w·g·xhat))``, ``xhat = x·rstd``).
  Only per-sample problems with S == 1 (LayerNorm's row view) are rms.
* ``act`` (None, "relu" or "silu"): forward returns ``y = act(z)`` for the
  normalized ``z = xhat·weight + bias``; backward differentiates through it,
  recomputing z from x, the statistics, weight and ``bias`` (then given), so
  that no buffer the size of x is kept between the calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CHANNELS_FIRST = "cf"
CHANNELS_LAST = "cl"


@dataclass(frozen=True)
class Problem:
    """One kernel problem (docs/architecture.md, §2).

    Attributes
    ----------
    layout : {"cf", "cl"}
        ``"cf"``: x3 is ``(N, C, S)``; ``"cl"``: x3 is ``(N, S, C)``.
    n, c, s : int
        Batch size, channels, spatial size (product of the remaining dims).
    groups : int
        0 for a cross-sample problem (BatchNorm: statistics per channel over
        N and S); G >= 1 for a per-sample problem (statistics per sample and
        group of C/G consecutive channels over those channels and S).
    rms : bool
        Root-mean-square statistics (RMSNorm): no centring.
    cross_sample : bool
        True for BatchNorm's statistics per channel over (N, S).
    shape3 : tuple
        The shape of x3 for this layout.
    stats_shape : tuple
        Shape of mean/var/rstd: (C,) or (N, G).
    group_size : int
        Number of values that share one mean and rstd.
    """

    layout: str
    n: int
    c: int
    s: int
    groups: int = 0
    rms: bool = False
    cross_sample: bool = field(init=False, repr=False, compare=False)
    shape3: tuple = field(init=False, repr=False, compare=False)
    stats_shape: tuple = field(init=False, repr=False, compare=False)
    group_size: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # Derived once: these are read on every call.
        cf = self.layout == CHANNELS_FIRST
        cross = self.groups == 0
        object.__setattr__(self, "cross_sample", cross)
        object.__setattr__(self, "shape3", (self.n, self.c, self.s) if cf else (self.n, self.s, self.c))
        object.__setattr__(self, "stats_shape", (self.c,) if cross else (self.n, self.groups))
        object.__setattr__(self, "group_size",
                           self.n * self.s if cross else (self.c // max(self.groups, 1)) * self.s)


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)


def stats_dtype(dtype) -> np.dtype:
    """The dtype of statistics and parameters for data of ``dtype``."""
    return _F64 if dtype == _F64 else _F32


class Backend:
    """Kernels for the problems of :class:`Problem`; subclass per backend.

    Subclasses set :attr:`name` and :attr:`xp` (the array module), and
    implement :meth:`forward_train`, :meth:`forward_eval`,
    :meth:`backward_train`, and the three cross-sample primitives
    (:meth:`channel_stats`, :meth:`channel_grad_sums`,
    :meth:`channel_backward_apply`) that SyncBatchNorm splits around its
    all-reduce. :meth:`backward_eval` has a default built from the primitives.
    """

    name = "base"
    xp = np

    # -- array-type contract -------------------------------------------------
    def accepts(self, a) -> bool:
        """True when ``a`` is an array this backend computes on.

        Masked arrays are not: the kernels would ignore the mask."""
        return type(a) is np.ndarray or (isinstance(a, np.ndarray) and not isinstance(a, np.ma.MaskedArray))

    def describe_expected(self) -> str:
        """Human words for the array type this backend takes."""
        return "a numpy.ndarray"

    def supported_dtypes(self) -> tuple:
        """Data dtypes this backend has kernels for."""
        return (np.dtype(np.float32), np.dtype(np.float64))

    # -- fused kernel problems -----------------------------------------------
    def forward_train(self, x3, p: Problem, weight, bias, eps: float, out=None, act=None):
        """Normalize with batch statistics, then apply ``act``.

        Returns ``(y3, mean, var, rstd)``: ``var`` is the biased variance (the
        mean square when ``p.rms``) and ``rstd = 1 / sqrt(var + eps)``, both as
        used to compute ``y3``.
        """
        raise NotImplementedError

    def forward_eval(self, x3, p: Problem, scale, shift, out=None, act=None):
        """Per-channel multiply-add ``y = act(x * scale[c] + shift[c])``.

        Eval-mode normalization with the constants folded in by the front end.
        """
        raise NotImplementedError

    def backward_train(self, dy3, x3, p: Problem, mean, rstd, weight, out=None, act=None, bias=None):
        """Backward through training-mode normalization (statistics depend on x).

        Returns ``(dx3, dweight, dbias)``, with ``dweight = Σ g·xhat`` and
        ``dbias = Σ g`` per channel, where ``g = dy·act'(z)`` (``g = dy``
        without an activation; ``bias`` is given exactly when ``act`` is).
        """
        raise NotImplementedError

    # -- the residual add fused into a row norm (pre-norm transformer blocks) --
    def add_forward(self, x3, r3, p: Problem, weight, bias, eps: float, out=None, h_out=None):
        """``h = x + r`` (rounded to x's dtype), then :meth:`forward_train` on h.

        Returns ``(y3, h3, mean, var, rstd)``; ``h_out`` receives h. Either
        output may be x3 or r3 itself, never the other output. This default
        composes the two steps (two sweeps); backends override it with one.
        """
        sd = stats_dtype(x3.dtype)
        h = x3.astype(sd) + r3.astype(sd)
        if h_out is None:
            h3 = h.astype(x3.dtype)
        else:
            h_out[...] = h
            h3 = h_out
        y3, mean, var, rstd = self.forward_train(h3, p, weight, bias, eps, out)
        return y3, h3, mean, var, rstd

    def add_backward(self, dy3, dh3, h3, p: Problem, mean, rstd, weight, out=None):
        """``dx = dh + (gradient of the norm at h)``, rounded to the dtype after each step.

        Returns ``(dx3, dweight, dbias)``; ``out`` may be dy3, dh3 or h3 itself.
        This default composes the two steps; backends override it with one sweep.
        """
        sd = stats_dtype(h3.dtype)
        # dh is read after the norm's dx is written: not into dh itself (out is dh3 or
        # disjoint from it, the front end guarantees, so sharing memory means it is dh3)
        into = None if out is not None and self.xp.may_share_memory(out, dh3) else out
        dxn, dweight, dbias = self.backward_train(dy3, h3, p, mean, rstd, weight, into)
        dx = dxn.astype(sd) + dh3.astype(sd)
        if out is None:
            return dx.astype(h3.dtype), dweight, dbias
        out[...] = dx
        return out, dweight, dbias

    def fold_frozen(self, running_mean, running_var, weight, bias, eps: float, sdtype):
        """Eval-mode per-channel constants, computed in float64.

        Returns ``(mean, rstd, scale, shift)`` in ``sdtype``: ``rstd = 1 /
        sqrt(var + eps)``, ``scale = weight·rstd``, ``shift = bias - mean·scale``
        (so that eval forward is one multiply-add per element). Backends may
        override it with one small kernel: on small inputs these dozen array
        operations cost more than the normalization.
        """
        xp = self.xp
        mean = running_mean.astype(xp.float64)
        rstd = 1.0 / xp.sqrt(running_var.astype(xp.float64) + eps)
        scale = weight.astype(xp.float64) * rstd
        shift = bias.astype(xp.float64) - mean * scale
        return [a.astype(sdtype) for a in (mean, rstd, scale, shift)]

    def backward_eval(self, dy3, x3, p: Problem, mean, rstd, weight, out=None, act=None, bias=None):
        """Backward with constant per-channel statistics (eval mode, FrozenBN).

        ``mean``, ``rstd`` have shape (C,) whatever the problem kind. Returns
        ``(dx3, dweight, dbias)`` with ``dx = g · weight[c] · rstd[c]``,
        ``g = dy·act'(z)`` as in :meth:`backward_train`.
        """
        cross = Problem(p.layout, p.n, p.c, p.s, 0)
        if act is not None:
            dy3 = act_grad(self.xp, dy3, x3, cross, mean, rstd, weight, bias, act)
        sum_dy, sum_dy_xhat = self.channel_grad_sums(dy3, x3, cross, mean, rstd)
        scale = weight * rstd
        dx3 = self.forward_eval(dy3, cross, scale, self.xp.zeros_like(scale), out)
        return dx3, sum_dy_xhat, sum_dy

    # -- cross-sample primitives (SyncBatchNorm splits around these) ---------
    def channel_stats(self, x3, p: Problem):
        """Per-channel ``(mean, var)`` over (N, S); var biased; count N*S."""
        raise NotImplementedError

    def channel_grad_sums(self, dy3, x3, p: Problem, mean, rstd):
        """Per-channel ``(Σ dy, Σ dy·xhat)`` with ``xhat = (x - mean)·rstd``."""
        raise NotImplementedError

    def channel_backward_apply(self, dy3, x3, p: Problem, mean, rstd, weight, mean_dy, mean_dy_xhat, out=None):
        """``dx = weight·rstd·(dy − mean_dy − xhat·mean_dy_xhat)`` per channel.

        ``mean_dy`` and ``mean_dy_xhat`` are the channel sums divided by the
        total count (across every process for SyncBatchNorm).
        """
        raise NotImplementedError


# -- activations by composition (the default backward_eval; the NumPy reference) ------

def _grouped_consts(xp, x3, p: Problem, mean, rstd, weight, bias, sd):
    """x (in ``sd``) in the grouped view with mean, rstd, weight, bias broadcast against it."""
    x = x3.astype(sd)
    if p.cross_sample:
        shape = (1, p.c, 1) if p.layout == CHANNELS_FIRST else (1, 1, p.c)
        per_c = lambda v: v.astype(sd).reshape(shape)  # noqa: E731
        return x, per_c(mean), per_c(rstd), per_c(weight), per_c(bias)
    cg = p.c // p.groups
    if p.layout == CHANNELS_FIRST:
        xg = x.reshape(p.n, p.groups, cg, p.s)
        cshape, gshape = (1, p.groups, cg, 1), (p.n, p.groups, 1, 1)
    else:
        xg = x.reshape(p.n, p.s, p.groups, cg)
        cshape, gshape = (1, 1, p.groups, cg), (p.n, 1, p.groups, 1)
    return (xg, mean.astype(sd).reshape(gshape), rstd.astype(sd).reshape(gshape),
            weight.astype(sd).reshape(cshape), bias.astype(sd).reshape(cshape))


def pre_activation(xp, x3, p: Problem, mean, rstd, weight, bias, sd):
    """z = (x − mean)·rstd·weight + bias, in ``sd``, shaped like x3."""
    x, m, r, w, b = _grouped_consts(xp, x3, p, mean, rstd, weight, bias, sd)
    return (((x - m) * r) * w + b).reshape(x3.shape)


def act_value(xp, z, act):
    """act(z) elementwise (a new array of z's dtype)."""
    if act == "relu":
        return xp.maximum(z, 0)  # (NaN stays NaN, as in PyTorch)
    return z / (1.0 + xp.exp(-z))


def act_derivative(xp, z, act):
    """act'(z) elementwise: relu' = [z > 0], silu' = s·(1 + z·(1 − s)) with s = sigmoid(z)."""
    if act == "relu":
        return (z > 0).astype(z.dtype)
    s = 1.0 / (1.0 + xp.exp(-z))
    return s * (1.0 + z * (1.0 - s))


def act_grad(xp, dy3, x3, p: Problem, mean, rstd, weight, bias, act):
    """g = dy·act'(z) as a new array of dy's dtype, z recomputed from x."""
    sd = stats_dtype(x3.dtype)
    z = pre_activation(xp, x3, p, mean, rstd, weight, bias, sd)
    return (dy3.astype(sd) * act_derivative(xp, z, act)).astype(dy3.dtype)
