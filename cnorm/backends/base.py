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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CHANNELS_FIRST = "cf"
CHANNELS_LAST = "cl"


@dataclass(frozen=True)
class Problem:
    """One kernel problem of DESIGN §2.

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
    def forward_train(self, x3, p: Problem, weight, bias, eps: float, out=None):
        """Normalize with batch statistics.

        Returns ``(y3, mean, var, rstd)``: ``var`` is the biased variance and
        ``rstd = 1 / sqrt(var + eps)``, both as used to compute ``y3``.
        """
        raise NotImplementedError

    def forward_eval(self, x3, p: Problem, scale, shift, out=None):
        """Per-channel multiply-add ``y = x * scale[c] + shift[c]``.

        Eval-mode normalization with the constants folded in by the front end.
        """
        raise NotImplementedError

    def backward_train(self, dy3, x3, p: Problem, mean, rstd, weight, out=None):
        """Backward through training-mode normalization (statistics depend on x).

        Returns ``(dx3, dweight, dbias)``, with ``dweight = Σ dy·xhat`` and
        ``dbias = Σ dy`` per channel.
        """
        raise NotImplementedError

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

    def backward_eval(self, dy3, x3, p: Problem, mean, rstd, weight, out=None):
        """Backward with constant per-channel statistics (eval mode, FrozenBN).

        ``mean``, ``rstd`` have shape (C,) whatever the problem kind. Returns
        ``(dx3, dweight, dbias)`` with ``dx = dy · weight[c] · rstd[c]``.
        """
        cross = Problem(p.layout, p.n, p.c, p.s, 0)
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
