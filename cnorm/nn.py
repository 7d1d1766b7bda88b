"""Stateful normalization layers: parameters, running statistics, train/eval, gradients, state dicts.

The layers hold what :mod:`cnorm.functional` leaves to the caller — affine
parameters, running statistics, ``num_batches_tracked``, the forward state
that backward needs — with PyTorch's constructor arguments, defaults, update
rules and state-dict key names, so a PyTorch state dict (tensors converted
with ``.numpy()``) loads and reproduces PyTorch's outputs.

Arrays
    Parameters and buffers are plain arrays of the layer's array module:
    NumPy for the CPU backends, CuPy for ``backend="cupy"``. With
    ``backend=None`` (the default) the module is that of the backend in force
    when the layer is built (:func:`cnorm.use_backend`, :func:`cnorm.set_backend`),
    NumPy under "auto"; each call then runs on the backend in force at call
    time. Pass ``backend="cupy"`` to build a GPU layer.

Gradients
    ``dx = layer.backward(dy)`` differentiates the last forward call (once) and
    stores the parameter gradients on ``layer.weight_grad`` and
    ``layer.bias_grad``, overwriting (not accumulating) earlier ones; they are
    None for parameters the layer does not have or does not train (frozen).

Output buffers
    ``layer(x, out=buf)`` and ``layer.backward(dy, out=buf)`` write y and dx
    into ``buf`` and return it, as the functions of :mod:`cnorm.functional`
    do: x's shape, dtype and memory layout (``np.empty_like(x)``). A forward
    may write over x itself (``out=x``, inference in place), but then the
    input that backward needs is gone and ``layer.backward`` raises; a
    backward may write over dy.

Extending BatchNorm (SyncBatchNorm)
    Every normalization of a BatchNorm layer with *batch* statistics goes
    through two methods, :meth:`_BatchNorm._batch_stats_forward` and
    :meth:`_BatchNorm._batch_stats_backward`. A subclass that computes the
    statistics differently — across processes, say — overrides those two and
    inherits everything else: eval mode, the running-average update,
    ``num_batches_tracked``, :func:`precise_bn`, freezing and state dicts.

Examples
--------
>>> import numpy as np
>>> import cnorm.nn
>>> bn = cnorm.nn.BatchNorm2d(3)
>>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32)
>>> y = bn(x)
>>> dx = bn.backward(np.ones_like(y))
>>> bn.weight_grad.shape, int(bn.num_batches_tracked)
((3,), 1)
>>> sorted(bn.state_dict())
['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
"""

from __future__ import annotations

import contextlib
import numbers
import operator
import warnings
from collections import namedtuple
from dataclasses import dataclass

import numpy as np

from . import _validate as v
from . import functional as F
from ._interop import accepts_dlpack
from .backends import AUTO, get_backend, get_backend_instance, is_cupy_array

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "FrozenBatchNorm2d",
    "LayerNorm", "GroupNorm", "RMSNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "precise_bn", "BatchStats", "IncompatibleKeys",
    "SyncBatchNorm", "convert_sync_batchnorm",
]

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])
IncompatibleKeys.__doc__ = """What :meth:`load_state_dict` with ``strict=False`` did not load.

Attributes
----------
missing_keys : list of str
    Keys the layer has that the state dict lacks (left unchanged).
unexpected_keys : list of str
    Keys of the state dict (under the prefix) that the layer does not have.
"""

_PARAM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class BatchStats:
    """Per-channel statistics of one batch, as a BatchNorm layer consumes them.

    Attributes
    ----------
    mean : array of shape (C,)
        Batch mean per channel (float64, the layer's array module).
    var : array of shape (C,)
        Biased (population) batch variance per channel, float64.
    count : int
        Values per channel behind the statistics: N·(spatial size), summed
        over every process for a synchronized BatchNorm. 0 for an empty
        batch, whose statistics are ignored.
    """

    mean: object
    var: object
    count: int


# -- argument checks -----------------------------------------------------------------

def _check_backend(backend):
    """None, "auto", or the name of a backend that runs here (raises otherwise)."""
    if backend is None or (isinstance(backend, str) and backend == AUTO):
        return backend
    get_backend_instance(backend)
    return backend


def _array_module(backend):
    """The array module of ``backend`` (or of the backend in force when it is None)."""
    name = get_backend() if backend is None else backend
    return np if name == AUTO else get_backend_instance(name).xp


def _module_of(a, default):
    """CuPy for a CuPy array, otherwise ``default``."""
    if is_cupy_array(a):
        import cupy

        return cupy
    return default


def _check_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}") from None
    if dt not in _PARAM_DTYPES:
        raise TypeError(f"dtype: expected float32 or float64 for parameters and buffers, got {dt}")
    return dt


def _check_momentum(momentum):
    """A float in [0, 1], or None for a cumulative average."""
    return None if momentum is None else v.check_momentum(momentum)


def _check_axis(channel_axis) -> int:
    """An int (validated against the input rank at call time)."""
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, numbers.Integral):
        raise TypeError(f"channel_axis: expected an int, got {v.type_name(channel_axis)}")
    axis = operator.index(channel_axis)
    if axis == 0:
        raise ValueError("channel_axis: expected a non-batch axis (axis 0 is the batch axis), got 0")
    return axis


def _check_x(x):
    if not hasattr(x, "ndim") or not hasattr(x, "shape"):
        raise TypeError(f"x: expected an array, got {v.type_name(x)}; wrap it with numpy.asarray(...)")


def _same_memory(out, x) -> bool:
    """Whether ``out`` is x itself (the same elements): a forward then wrote y over its input."""
    return out is not None and v.overlap(_module_of(x, np), out, x) == "same"


def _batched_out(out, x):
    """``out`` for an unbatched ``x``, with the batch axis the functional call sees added.

    Its shape is checked against x's own (the functional error would name the
    batched shape); anything that is not an array goes on to the functional
    check, which names it."""
    if out is None or not hasattr(out, "shape"):
        return out
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"out: expected shape {tuple(x.shape)} (that of x), got shape {tuple(out.shape)}")
    return out[None]


# -- the shared layer machinery ------------------------------------------------------

class _Layer:
    """Train/eval flag, the forward state kept for one backward, gradients and state dicts.

    Subclasses implement ``_forward(x, out) -> (y, ctx)`` and
    ``_backward(dy, x, ctx, out) -> (dx, dweight, dbias)``; ``ctx`` is whatever
    backward needs from forward (at least the functional ``Saved``). ``out``
    is the caller's buffer or None; when given, it is the y (dx) returned.
    """

    # State-dict entries in PyTorch's order: parameters, then buffers.
    _STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    # Keys that load_state_dict accepts and drops (FrozenBatchNorm2d: num_batches_tracked).
    _IGNORED_KEYS: tuple = ()

    def __init__(self, dtype, backend):
        self.backend = _check_backend(backend)
        self.dtype = _check_dtype(dtype)
        self.xp = _array_module(self.backend)
        self.training = True
        self.weight = None
        self.bias = None
        self.weight_grad = None
        self.bias_grad = None
        self._pending = None

    def _init_channels(self, num_features, eps, momentum, affine, track_running_stats, bias, channel_axis):
        """Check and keep the per-channel settings of BatchNorm and InstanceNorm; allocate
        their parameters (weight 1, bias 0) and running buffers (mean 0, var 1, count 0)."""
        self.num_features = c = v.check_int("num_features", num_features)
        self.eps = v.check_eps(eps)
        self.momentum = _check_momentum(momentum)
        self.affine = v.check_bool("affine", affine)
        self.track_running_stats = tracked = v.check_bool("track_running_stats", track_running_stats)
        bias = v.check_bool("bias", bias)
        self.channel_axis = _check_axis(channel_axis)
        if self.affine:
            self.weight = self._full(c, 1.0)
            self.bias = self._full(c, 0.0) if bias else None
        self.running_mean = self._full(c, 0.0) if tracked else None
        self.running_var = self._full(c, 1.0) if tracked else None
        self.num_batches_tracked = self.xp.zeros((), dtype=np.int64) if tracked else None

    # -- forward / backward ----------------------------------------------------------
    def __call__(self, x, *, out=None):
        return self.forward(x, out=out)

    @accepts_dlpack
    def forward(self, x, *, out=None):
        """Normalize ``x`` and keep what one :meth:`backward` call needs.

        Parameters
        ----------
        x : array
            The input, of the layer's array type: float16, bfloat16, float32
            or float64 data, whatever the dtype of the layer's parameters.
        out : array, optional (keyword-only)
            Where to write y, which is then ``out`` itself: x's shape and
            dtype, writable, in x's memory layout (C-contiguous for a
            C-contiguous x, channels-last for a channels-last one;
            ``np.empty_like(x)`` is right). It may be x itself (in place), but
            then the input is gone and :meth:`backward` raises; it may not
            overlap x otherwise, nor the layer's parameters or buffers.
            Checked before anything is updated.

        Returns
        -------
        y : array
            Same shape, dtype and memory layout as ``x`` (``out`` when given).
        """
        _check_x(x)
        y, ctx = self._forward(x, out)
        self._pending = (x, ctx, _same_memory(out, x))
        return y

    @accepts_dlpack
    def backward(self, dy, *, out=None):
        """Differentiate the last forward call.

        Parameters
        ----------
        dy : array
            Gradient of the loss with respect to the last output; its shape
            and dtype.
        out : array, optional (keyword-only)
            Where to write dx, which is then ``out`` itself: as ``out`` of
            :meth:`forward`; it may be dy itself, or the forward's input x
            (in place).

        Returns
        -------
        dx : array
            Gradient with respect to the last input (``out`` when given).
            ``weight_grad`` and ``bias_grad`` are set (None for absent or
            frozen parameters).

        Raises
        ------
        RuntimeError
            Without a forward call since the last backward.
        ValueError
            When the last forward wrote its output over its input
            (``out=x``): the input this gradient needs is gone.
        """
        if self._pending is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward: no forward pass to differentiate; call layer(x) first "
                "(each forward call allows one backward call)"
            )
        x, ctx, overwritten = self._pending
        if overwritten:
            self._refuse_backward(ctx, ValueError(
                f"{type(self).__name__}.backward: the last forward wrote its output over its input (out=x), "
                "so the input this gradient needs is gone; to differentiate, run the forward with a separate "
                "out= buffer (or none)"
            ))
        dx, dweight, dbias = self._backward(dy, x, ctx, out)
        self.weight_grad = None if dweight is None else dweight.astype(self.weight.dtype, copy=False)
        self.bias_grad = None if dbias is None else dbias.astype(self.bias.dtype, copy=False)
        self._pending = None
        return dx

    def _forward(self, x, out=None):
        raise NotImplementedError

    def _backward(self, dy, x, ctx, out=None):
        raise NotImplementedError

    def _refuse_backward(self, ctx, error):
        """Raise ``error``: backward cannot run (SyncBatchNorm first tells the other ranks)."""
        raise error

    # -- modes -----------------------------------------------------------------------
    def train(self, mode=True):
        """Set training mode (``mode=True``) or eval mode; returns the layer."""
        self.training = v.check_bool("mode", mode)
        return self

    def eval(self):
        """Set eval mode (running statistics, where the layer has them); returns the layer."""
        return self.train(False)

    # -- state dicts -----------------------------------------------------------------
    def _state_names(self):
        return [name for name in self._STATE if getattr(self, name, None) is not None]

    def state_dict(self, prefix=""):
        """Parameters and buffers under PyTorch's key names.

        Parameters
        ----------
        prefix : str, optional
            Prepended to every key (``"layer1.bn1."`` to build a model's dict).

        Returns
        -------
        dict
            Key → a copy of the array (a snapshot: later training does not
            change it). Keys, in order: ``weight``, ``bias`` (when the layer
            has them), ``running_mean``, ``running_var``,
            ``num_batches_tracked`` (when it tracks running statistics).
        """
        return {prefix + name: getattr(self, name).copy() for name in self._state_names()}

    def load_state_dict(self, state_dict, strict=True, prefix=""):
        """Copy parameters and buffers from ``state_dict``, all or nothing.

        Parameters
        ----------
        state_dict : mapping
            Key → array-like: NumPy arrays (``{k: t.numpy() for k, t in
            torch_module.state_dict().items()}``), arrays of the layer's
            module, or anything ``numpy.asarray`` takes. Values are cast to
            the layer's dtype and copied into the existing arrays, so
            references to ``layer.weight`` stay valid.
        strict : bool, optional
            If True (default), missing and unexpected keys are errors.
            Shape and type mismatches are errors either way.
        prefix : str, optional
            Only keys starting with ``prefix`` are considered, with it
            removed (load one layer from a whole model's state dict).

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``, both empty when strict.

        Raises
        ------
        ValueError
            Listing every problem found; the layer is then unchanged.
        """
        if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
            raise TypeError(f"state_dict: expected a mapping of key to array, got {v.type_name(state_dict)}")
        strict = v.check_bool("strict", strict)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix: expected a str, got {v.type_name(prefix)}")
        names = self._state_names()
        given = [k for k in state_dict.keys() if isinstance(k, str) and k.startswith(prefix)]
        local = {k[len(prefix):]: k for k in given}
        missing = [prefix + n for n in names if n not in local]
        unexpected = [local[k] for k in local if k not in names and k not in self._IGNORED_KEYS]
        errors = []
        if strict and missing:
            errors.append("missing key(s): " + ", ".join(repr(k) for k in missing))
        if strict and unexpected:
            errors.append("unexpected key(s): " + ", ".join(repr(k) for k in unexpected))
        new = {}
        for name in names:
            if name in local:
                try:
                    new[name] = self._convert(name, local[name], state_dict[local[name]])
                except (TypeError, ValueError) as exc:
                    errors.append(str(exc))
        if errors:
            raise ValueError(
                f"load_state_dict: cannot load the state of {type(self).__name__} (nothing was changed): "
                + "; ".join(errors)
            )
        for name, value in new.items():
            getattr(self, name)[...] = value
        return IncompatibleKeys(missing, unexpected)

    def _convert(self, name, key, value):
        """``value`` as an array of the layer's module, shape and dtype for ``name``, or raise."""
        current = getattr(self, name)
        if is_cupy_array(value) and self.xp is np:
            raise TypeError(f"{key!r}: expected a host array for a NumPy layer, got a CuPy array; use .get()")
        if not is_cupy_array(value):
            try:
                value = np.asarray(value)
            except Exception as exc:  # noqa: BLE001 - any conversion failure is the caller's value
                raise TypeError(f"{key!r}: expected an array, got {v.type_name(value)} ({exc})") from None
        if name == "num_batches_tracked":
            if value.dtype.kind not in "iu":
                raise TypeError(f"{key!r}: expected an integer count, got dtype {value.dtype}")
        elif value.dtype.kind != "f":
            raise TypeError(f"{key!r}: expected a floating array, got dtype {value.dtype}")
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(f"{key!r}: expected shape {tuple(current.shape)}, got shape {tuple(value.shape)}")
        return self.xp.asarray(value, dtype=current.dtype)

    # -- helpers for subclasses ------------------------------------------------------
    def _full(self, shape, value):
        return self.xp.full(shape, value, dtype=self.dtype)

    def _check_channels(self, x, axis, expected, what):
        axis_n = v.check_channel_axis(axis, x.ndim)
        c = x.shape[axis_n]
        if c != expected:
            raise ValueError(
                f"x: expected {expected} channels ({what}) on channel_axis={axis}, "
                f"got {c} in input of shape {tuple(x.shape)}"
            )

    def __repr__(self):
        return f"{type(self).__name__}({self._extra_repr()})"

    def _extra_repr(self):
        return ""


# -- BatchNorm -----------------------------------------------------------------------

class _BatchNorm(_Layer):
    """Batch normalization with running statistics, freezing and precise statistics.

    The extension seam (SyncBatchNorm): normalizing with batch statistics is
    :meth:`_batch_stats_forward` and its gradient :meth:`_batch_stats_backward`;
    nothing else computes batch statistics.
    """

    _NDIMS: tuple = ()
    _SHAPES: str = ""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, *,
                 bias=True, channel_axis=1, dtype=np.float32, backend=None, activation=None):
        super().__init__(dtype, backend)
        self._init_channels(num_features, eps, momentum, affine, track_running_stats, bias, channel_axis)
        self.activation = v.check_activation(activation)
        self.frozen = False
        self._records = None  # a list while a precise_bn block records this layer

    # -- PyTorch's resets ------------------------------------------------------------
    def reset_running_stats(self):
        """running_mean ← 0, running_var ← 1, num_batches_tracked ← 0 (in place)."""
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def reset_parameters(self):
        """Reset the running statistics, weight ← 1 and bias ← 0 (in place)."""
        self.reset_running_stats()
        if self.weight is not None:
            self.weight[...] = 1
        if self.bias is not None:
            self.bias[...] = 0

    # -- FrozenBN --------------------------------------------------------------------
    def freeze(self, mode=True):
        """Fix statistics and affine parameters (FrozenBN); ``freeze(False)`` undoes it.

        A frozen layer normalizes with its running statistics in training
        mode too, never updates them or ``num_batches_tracked``, and its
        backward is the elementwise ``dx = dy · weight / sqrt(running_var + eps)``
        with no parameter gradients (``weight_grad`` and ``bias_grad`` None).

        Returns
        -------
        self
        """
        mode = v.check_bool("mode", mode)
        if mode and not self.track_running_stats:
            raise ValueError(f"freeze: {type(self).__name__} was built with track_running_stats=False and has "
                             "no running statistics to freeze at")
        if self._records is not None:
            raise RuntimeError("freeze: the layer is recording inside a precise_bn block")
        self.frozen = mode
        return self

    # -- forward / backward ----------------------------------------------------------
    def _check_input(self, x):
        if x.ndim not in self._NDIMS:
            ranks = " or ".join(f"{d}-D" for d in self._NDIMS)
            raise ValueError(f"x: {type(self).__name__} expects {ranks} input {self._SHAPES}, "
                             f"got {x.ndim}-D input of shape {tuple(x.shape)}")
        self._check_channels(x, self.channel_axis, self.num_features, "num_features")

    def _momentum_factor(self):
        """The weight of this batch in the running average (PyTorch's exponential_average_factor)."""
        if self.momentum is None:
            return 1.0 / float(int(self.num_batches_tracked) + 1)
        return v.check_momentum(self.momentum)

    def _forward(self, x, out=None):
        self._check_input(x)
        if self._records is not None:
            y, saved, stats = self._stats_forward(x, out)
            if stats.count > 0:
                self._records.append(stats)
            return y, (saved, "batch")
        if self.frozen or (not self.training and self.track_running_stats):
            y, saved = F.batch_norm_forward(x, self.weight, self.bias, self.running_mean, self.running_var,
                                            False, 0.0, self.eps, self.channel_axis, self.backend, out=out,
                                            activation=self.activation)
            return y, (saved, "frozen" if self.frozen else "running")
        update = self.training and self.track_running_stats
        factor = self._momentum_factor() if update else None
        y, saved, stats = self._stats_forward(x, out)
        if update:
            self.num_batches_tracked += 1
            if stats.count > 0:  # an empty batch counts, as in PyTorch, but leaves the averages alone
                self._update_running(stats, factor)
        return y, (saved, "batch")

    def _update_running(self, stats, factor):
        """running = (1 − factor)·running + factor·batch, with the unbiased batch variance."""
        n = stats.count
        unbiased = stats.var * (n / (n - 1)) if n > 1 else stats.var
        f64 = np.float64
        new_mean = (1.0 - factor) * self.running_mean.astype(f64) + factor * stats.mean
        new_var = (1.0 - factor) * self.running_var.astype(f64) + factor * unbiased
        self.running_mean[...] = new_mean
        self.running_var[...] = new_var

    def _backward(self, dy, x, ctx, out=None):
        saved, stats = ctx  # which statistics forward normalized with: "batch", "running" or "frozen"
        if stats == "batch":
            # (out only when given: an override of the seam may predate it)
            if out is None:
                return self._batch_stats_backward(dy, x, saved)
            return self._batch_stats_backward(dy, x, saved, out=out)
        dx, dweight, dbias = F.batch_norm_backward(dy, x, saved, self.weight, out=out)
        return (dx, None, None) if stats == "frozen" else (dx, dweight, dbias)

    def _stats_forward(self, x, out):
        """:meth:`_batch_stats_forward`, passed ``out`` only when given (an override may predate it)."""
        if out is None:
            return self._batch_stats_forward(x)
        return self._batch_stats_forward(x, out=out)

    # -- the seam ----------------------------------------------------------------------
    def _batch_stats_forward(self, x, out=None):
        """Normalize ``x`` with its batch statistics.

        The one place a BatchNorm layer computes batch statistics; override
        it (with :meth:`_batch_stats_backward`) to compute them otherwise,
        e.g. across processes. The caller has checked x's rank and channels
        and does the bookkeeping: running averages from the returned
        statistics, ``num_batches_tracked``, :func:`precise_bn` records.
        It must not change the layer.

        Parameters
        ----------
        x : array
            The input.
        out : array, optional
            The caller's buffer for y (as ``out`` of
            :func:`cnorm.batch_norm_forward`; it may be x itself), passed
            only when given: y must then be ``out`` itself, and ``out``
            must be checked before anything is computed or written.

        Returns
        -------
        y : array
            Normalized with the batch statistics and the affine parameters.
        saved : cnorm.Saved
            Passed unchanged to :meth:`_batch_stats_backward`.
        stats : BatchStats
            The statistics used (float64 mean, biased variance, count).
        """
        y, saved = F.batch_norm_forward(x, self.weight, self.bias, None, None, True, 0.0, self.eps,
                                        self.channel_axis, self.backend, out=out, activation=self.activation)
        f64 = _module_of(x, self.xp).float64
        count = x.size // x.shape[self.channel_axis]
        return y, saved, BatchStats(saved.mean.astype(f64), saved.var.astype(f64), count)

    def _batch_stats_backward(self, dy, x, saved, out=None):
        """Gradient of :meth:`_batch_stats_forward`: ``(dx, dweight, dbias)``.

        dweight and dbias are None when the layer has no weight or bias.
        ``out`` (passed only when given) receives dx, which is then ``out``.
        """
        return F.batch_norm_backward(dy, x, saved, self.weight, out=out)

    def fold_into(self, conv_weight, conv_bias=None, transpose=False):
        """The weight and bias of the convolution before this layer with the layer folded in.

        For inference: conv → this BatchNorm in eval mode equals one
        convolution with the returned ``(weight, bias)``
        (:func:`cnorm.fold_batch_norm` with this layer's running statistics,
        eps, weight and bias; PyTorch's ``fuse_conv_bn_weights``). A fused
        activation is not folded: apply it after the convolution.

        Parameters
        ----------
        conv_weight : array
            (C_out, C_in/groups, k...), or with ``transpose`` (C_in, C_out/groups, k...).
        conv_bias : array of shape (C_out,), optional
        transpose : bool, default False
            For a transposed convolution.

        Returns
        -------
        weight, bias : array

        Examples
        --------
        >>> import numpy as np, cnorm.nn
        >>> bn = cnorm.nn.BatchNorm2d(2).eval()
        >>> w, b = bn.fold_into(np.ones((2, 3, 1, 1), np.float32))
        >>> w.shape, b.shape
        ((2, 3, 1, 1), (2,))
        """
        if not self.track_running_stats:
            raise ValueError(f"fold_into: {type(self).__name__} was built with track_running_stats=False and "
                             "has no running statistics to fold")
        return F.fold_batch_norm(conv_weight, conv_bias, self.running_mean, self.running_var, self.eps,
                                 self.weight, self.bias, transpose=transpose)

    def _extra_repr(self):
        s = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
             f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")
        if self.channel_axis != 1:
            s += f", channel_axis={self.channel_axis}"
        if self.activation is not None:
            s += f", activation={self.activation!r}"
        if self.frozen:
            s += ", frozen=True"
        return s


_BN_DOC = """Batch normalization over {ranks} input {shapes}, like ``torch.nn.{name}``.

    Statistics are per channel over the batch and every non-channel axis. In
    training mode the layer normalizes with the batch statistics and updates
    ``running = (1 − momentum)·running + momentum·batch`` (unbiased batch
    variance); in eval mode it normalizes with the running statistics.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float, default 1e-5
        Added to the variance before the square root.
    momentum : float in [0, 1] or None, default 0.1
        Weight of each batch in the running averages; None makes them the
        cumulative average over the ``num_batches_tracked`` batches seen.
    affine : bool, default True
        Learn ``weight`` (γ, ones) and ``bias`` (β, zeros).
    track_running_stats : bool, default True
        Keep ``running_mean``, ``running_var`` and ``num_batches_tracked``;
        without them eval mode also uses batch statistics.
    bias : bool, default True
        With ``affine``, whether there is a bias (keyword-only, as in PyTorch).
    channel_axis : int, default 1
        The channel axis; -1 for channels-last arrays ({cl}).
    dtype : float32 or float64, default float32
        dtype of parameters and buffers (inputs may be of another float dtype).
    backend : str, optional
        Backend for every call; default: the one in force at call time.
    activation : None, "relu" or "silu", default None
        Applied to the output in the same sweep (BatchNorm → ReLU as one
        layer); backward differentiates through it (keyword-only).

    Attributes
    ----------
    weight, bias : array of shape (C,) or None
    running_mean, running_var : array of shape (C,) or None
    num_batches_tracked : 0-d int64 array or None
        Training batches seen since the last reset.
    weight_grad, bias_grad : array of shape (C,) or None
        Set by :meth:`backward`.
    training : bool
    frozen : bool
        Set by :meth:`freeze`.

    Examples
    --------
    >>> import numpy as np, cnorm.nn
    >>> bn = cnorm.nn.{name}({example_c})
    >>> x = np.random.default_rng(0).standard_normal({example_shape}).astype(np.float32)
    >>> y = bn(x)                      # training: batch statistics, running stats updated
    >>> dx = bn.backward(np.ones_like(y))
    >>> y_eval = bn.eval()(x)          # eval: running statistics
    """


class BatchNorm1d(_BatchNorm):
    __doc__ = _BN_DOC.format(ranks="2-D or 3-D", shapes="(N, C) or (N, C, L)", name="BatchNorm1d",
                             cl="(N, L, C)", example_c=4, example_shape="(16, 4)")
    _NDIMS = (2, 3)
    _SHAPES = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    __doc__ = _BN_DOC.format(ranks="4-D", shapes="(N, C, H, W)", name="BatchNorm2d",
                             cl="(N, H, W, C)", example_c=3, example_shape="(8, 3, 5, 5)")
    _NDIMS = (4,)
    _SHAPES = "(N, C, H, W)"


class BatchNorm3d(_BatchNorm):
    __doc__ = _BN_DOC.format(ranks="5-D", shapes="(N, C, D, H, W)", name="BatchNorm3d",
                             cl="(N, D, H, W, C)", example_c=2, example_shape="(4, 2, 3, 4, 5)")
    _NDIMS = (5,)
    _SHAPES = "(N, C, D, H, W)"


class FrozenBatchNorm2d(_BatchNorm):
    """BatchNorm2d with fixed statistics and affine parameters, like ``torchvision.ops.FrozenBatchNorm2d``.

    ``y = (x − running_mean) / sqrt(running_var + eps) · weight + bias`` in
    training and eval mode alike; backward gives dx only. Its state dict has
    ``weight``, ``bias``, ``running_mean`` and ``running_var``; a
    ``BatchNorm2d`` state dict loads too (``num_batches_tracked`` is dropped),
    which is how pretrained backbones are frozen.

    Parameters
    ----------
    num_features : int
    eps : float, default 1e-5
    channel_axis, dtype, backend
        As in :class:`BatchNorm2d`.

    Examples
    --------
    >>> import numpy as np, cnorm.nn
    >>> bn = cnorm.nn.FrozenBatchNorm2d(3)
    >>> x = np.ones((2, 3, 4, 4), dtype=np.float32)
    >>> bool(np.allclose(bn(x), 1 / np.sqrt(1 + 1e-5)))
    True
    """

    _NDIMS = (4,)
    _SHAPES = "(N, C, H, W)"
    _IGNORED_KEYS = ("num_batches_tracked",)

    def __init__(self, num_features, eps=1e-5, *, channel_axis=1, dtype=np.float32, backend=None,
                 activation=None):
        super().__init__(num_features, eps, None, True, True, channel_axis=channel_axis, dtype=dtype,
                         backend=backend, activation=activation)
        self.num_batches_tracked = None
        self.frozen = True

    def freeze(self, mode=True):
        """A FrozenBatchNorm2d is always frozen; ``freeze(False)`` raises."""
        if not v.check_bool("mode", mode):
            raise ValueError("freeze: a FrozenBatchNorm2d cannot be unfrozen; load its state into a BatchNorm2d")
        return self

    def reset_running_stats(self):
        """running_mean ← 0, running_var ← 1 (in place)."""
        self.running_mean[...] = 0
        self.running_var[...] = 1

    def _extra_repr(self):
        s = f"{self.num_features}, eps={self.eps}"
        return s + (f", channel_axis={self.channel_axis}" if self.channel_axis != 1 else "")


# -- PreciseBN -----------------------------------------------------------------------

def _recordable(layers):
    """The BatchNorm layers among ``layers`` whose running statistics precise_bn can set."""
    items = [layers] if isinstance(layers, _Layer) else layers
    try:
        items = list(items)
    except TypeError:
        raise TypeError(f"layers: expected a layer or an iterable of layers, got {v.type_name(layers)}") from None
    chosen, seen = [], set()
    for layer in items:
        if isinstance(layer, _BatchNorm) and layer.track_running_stats and not layer.frozen and id(layer) not in seen:
            seen.add(id(layer))
            chosen.append(layer)
    if not chosen:
        raise ValueError("layers: expected at least one BatchNorm layer with running statistics that is not "
                         "frozen, got none")
    for layer in chosen:
        if layer._records is not None:
            raise RuntimeError(f"precise_bn: {layer!r} is already recording in another precise_bn block")
    return chosen


def _population_stats(layer, records):
    """Mean and unbiased variance over every value of the recorded batches (Chan's merge)."""
    xp = layer.xp
    total = sum(r.count for r in records)
    mean = sum(r.mean * r.count for r in records) / total
    # E[var_b + mean_b²] − mean², written as Σ n_b·(var_b + (mean_b − mean)²)/n: no cancellation.
    var = sum(r.count * (r.var + (r.mean - mean) ** 2) for r in records) / total
    if total > 1:
        var = var * (total / (total - 1))
    return xp.asarray(mean), xp.asarray(var)


@contextlib.contextmanager
def precise_bn(layers):
    """Recompute BatchNorm running statistics exactly over the batches run inside the block.

    Inside the block every selected layer normalizes each batch with its
    batch statistics (whatever its train/eval mode) and records them instead
    of updating its running averages or ``num_batches_tracked``. On a normal
    exit each layer sets ``running_mean`` to the mean over every value seen
    and ``running_var`` to their unbiased variance — the mean of the batch
    means and ``E[var_b + mean_b²] − mean²``, weighted by batch size, times
    n/(n − 1) — as if the batches had been one. If the block raises, nothing
    is changed. A layer that saw no (non-empty) batch is left unchanged, with
    a warning.

    Parameters
    ----------
    layers : layer or iterable of layers
        The BatchNorm layers among them that track running statistics and
        are not frozen are recorded; other layers are ignored.

    Yields
    ------
    list
        The recorded layers.

    Examples
    --------
    >>> import numpy as np, cnorm.nn
    >>> bn = cnorm.nn.BatchNorm1d(2)
    >>> rng = np.random.default_rng(0)
    >>> batches = [rng.standard_normal((n, 2)) + 3 for n in (5, 9)]
    >>> with cnorm.nn.precise_bn([bn]):
    ...     for xb in batches:
    ...         _ = bn(xb)
    >>> bool(np.allclose(bn.running_mean, np.concatenate(batches).mean(axis=0)))
    True
    """
    chosen = _recordable(layers)
    for layer in chosen:
        layer._records = []
    try:
        yield list(chosen)
    except BaseException:
        for layer in chosen:
            layer._records = None
        raise
    records = [layer._records for layer in chosen]
    for layer in chosen:
        layer._records = None
    results = []
    for layer, recs in zip(chosen, records):
        if recs:
            results.append((layer, _population_stats(layer, recs)))
        else:
            warnings.warn(f"precise_bn: {layer!r} saw no batch inside the block; its running statistics are "
                          "unchanged", RuntimeWarning, stacklevel=3)
    for layer, (mean, var) in results:
        layer.running_mean[...] = mean
        layer.running_var[...] = var


# -- InstanceNorm --------------------------------------------------------------------

class _InstanceNorm(_Layer):
    _NDIM: int = 0
    _SHAPES: str = ""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False, track_running_stats=False, *,
                 bias=True, channel_axis=1, dtype=np.float32, backend=None, activation=None):
        super().__init__(dtype, backend)
        self._init_channels(num_features, eps, momentum, affine, track_running_stats, bias, channel_axis)
        self.activation = v.check_activation(activation)

    reset_running_stats = _BatchNorm.reset_running_stats
    reset_parameters = _BatchNorm.reset_parameters

    def _forward(self, x, out=None):
        if x.ndim not in (self._NDIM - 1, self._NDIM):
            raise ValueError(f"x: {type(self).__name__} expects {self._NDIM - 1}-D (unbatched) or {self._NDIM}-D "
                             f"input {self._SHAPES}, got {x.ndim}-D input of shape {tuple(x.shape)}")
        unbatched = x.ndim == self._NDIM - 1
        xb = x[None] if unbatched else x
        ob = _batched_out(out, x) if unbatched else out
        if self.affine or self.track_running_stats:
            self._check_channels(xb, self.channel_axis, self.num_features, "num_features")
        else:
            c = xb.shape[v.check_channel_axis(self.channel_axis, xb.ndim)]
            if c != self.num_features:
                warnings.warn(f"x: {c} channels on channel_axis={self.channel_axis} do not match num_features="
                              f"{self.num_features}, which is unused because affine=False and "
                              "track_running_stats=False", UserWarning, stacklevel=4)
        use_input_stats = self.training or not self.track_running_stats
        # PyTorch: momentum=None leaves InstanceNorm's running statistics unchanged
        # (and InstanceNorm never counts num_batches_tracked).
        momentum = 0.0 if self.momentum is None else self.momentum
        y, saved = F.instance_norm_forward(xb, self.weight, self.bias, self.running_mean, self.running_var,
                                           use_input_stats, momentum, self.eps, self.channel_axis, self.backend,
                                           out=ob, activation=self.activation)
        if out is not None:
            return out, (saved, unbatched)
        return (y[0] if unbatched else y), (saved, unbatched)

    def _backward(self, dy, x, ctx, out=None):
        saved, unbatched = ctx
        ob = out
        if unbatched:
            _check_x(dy)
            ob = _batched_out(out, x)
            dy, x = dy[None], x[None]
        dx, dweight, dbias = F.instance_norm_backward(dy, x, saved, self.weight, out=ob)
        if out is not None:
            return out, dweight, dbias
        return (dx[0] if unbatched else dx), dweight, dbias

    def _extra_repr(self):
        s = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
             f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")
        s += f", channel_axis={self.channel_axis}" if self.channel_axis != 1 else ""
        return s + (f", activation={self.activation!r}" if self.activation is not None else "")


_IN_DOC = """Instance normalization over {ranks} input {shapes}, like ``torch.nn.{name}``.

    Statistics are per (sample, channel) over the spatial axes. With
    ``track_running_stats`` the batch average of the per-instance statistics
    feeds running averages, which eval mode then uses. As in PyTorch,
    ``momentum=None`` leaves the running statistics unchanged and
    ``num_batches_tracked`` is never incremented; unbatched input (no N axis)
    is accepted, with ``channel_axis`` counted as if N were there.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float, default 1e-5
    momentum : float in [0, 1] or None, default 0.1
    affine : bool, default False
        Learn per-channel ``weight`` and ``bias``.
    track_running_stats : bool, default False
    bias : bool, default True
        With ``affine``, whether there is a bias (keyword-only).
    channel_axis : int, default 1
        -1 for channels-last arrays.
    dtype : float32 or float64, default float32
    backend : str, optional
    activation : None, "relu" or "silu", default None
        Fused into the output (keyword-only).

    Attributes
    ----------
    weight, bias, running_mean, running_var, num_batches_tracked : array or None
    weight_grad, bias_grad : array or None
    training : bool

    Examples
    --------
    >>> import numpy as np, cnorm.nn
    >>> norm = cnorm.nn.{name}(3)
    >>> x = np.random.default_rng(0).standard_normal({example_shape})
    >>> y = norm(x)
    >>> dx = norm.backward(np.ones_like(y))
    """


class InstanceNorm1d(_InstanceNorm):
    __doc__ = _IN_DOC.format(ranks="3-D", shapes="(N, C, L) or unbatched (C, L)", name="InstanceNorm1d",
                             example_shape="(2, 3, 8)")
    _NDIM = 3
    _SHAPES = "(N, C, L)"


class InstanceNorm2d(_InstanceNorm):
    __doc__ = _IN_DOC.format(ranks="4-D", shapes="(N, C, H, W) or unbatched (C, H, W)", name="InstanceNorm2d",
                             example_shape="(2, 3, 4, 4)")
    _NDIM = 4
    _SHAPES = "(N, C, H, W)"


class InstanceNorm3d(_InstanceNorm):
    __doc__ = _IN_DOC.format(ranks="5-D", shapes="(N, C, D, H, W) or unbatched (C, D, H, W)",
                             name="InstanceNorm3d", example_shape="(2, 3, 2, 3, 4)")
    _NDIM = 5
    _SHAPES = "(N, C, D, H, W)"


# -- GroupNorm and LayerNorm ---------------------------------------------------------

class GroupNorm(_Layer):
    """Group normalization, like ``torch.nn.GroupNorm``.

    Statistics are per (sample, group of C/G consecutive channels) over those
    channels and the spatial axes; the same in training and eval mode.

    Parameters
    ----------
    num_groups : int
        G; must divide ``num_channels``.
    num_channels : int
        C.
    eps : float, default 1e-5
    affine : bool, default True
        Learn per-channel ``weight`` (ones) and ``bias`` (zeros).
    bias : bool, default True
        With ``affine``, whether there is a bias (keyword-only).
    channel_axis : int, default 1
        -1 for channels-last arrays.
    dtype : float32 or float64, default float32
    backend : str, optional
    activation : None, "relu" or "silu", default None
        Fused into the output (keyword-only): GroupNorm → SiLU of a
        diffusion U-Net block is ``GroupNorm(32, C, activation="silu")``.

    Attributes
    ----------
    weight, bias : array of shape (C,) or None
    weight_grad, bias_grad : array of shape (C,) or None
    training : bool

    Examples
    --------
    >>> import numpy as np, cnorm.nn
    >>> gn = cnorm.nn.GroupNorm(2, 4)
    >>> x = np.random.default_rng(0).standard_normal((3, 4, 5, 5)).astype(np.float32)
    >>> y = gn(x)
    >>> dx = gn.backward(np.ones_like(y))
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, *, bias=True, channel_axis=1,
                 dtype=np.float32, backend=None, activation=None):
        super().__init__(dtype, backend)
        self.activation = v.check_activation(activation)
        self.num_groups = v.check_int("num_groups", num_groups)
        self.num_channels = v.check_int("num_channels", num_channels)
        if self.num_channels % self.num_groups:
            raise ValueError(f"num_groups: expected a divisor of num_channels={self.num_channels}, "
                             f"got {self.num_groups}")
        self.eps = v.check_eps(eps)
        self.affine = v.check_bool("affine", affine)
        bias = v.check_bool("bias", bias)
        self.channel_axis = _check_axis(channel_axis)
        if self.affine:
            self.weight = self._full(self.num_channels, 1.0)
            self.bias = self._full(self.num_channels, 0.0) if bias else None

    def reset_parameters(self):
        """weight ← 1, bias ← 0 (in place)."""
        if self.weight is not None:
            self.weight[...] = 1
        if self.bias is not None:
            self.bias[...] = 0

    def _forward(self, x, out=None):
        if x.ndim < 2:
            raise ValueError(f"x: GroupNorm expects input of at least 2 dimensions (N, C, ...), "
                             f"got shape {tuple(x.shape)}")
        self._check_channels(x, self.channel_axis, self.num_channels, "num_channels")
        return F.group_norm_forward(x, self.num_groups, self.weight, self.bias, self.eps, self.channel_axis,
                                    self.backend, out=out, activation=self.activation)

    def _backward(self, dy, x, saved, out=None):
        return F.group_norm_backward(dy, x, saved, self.weight, out=out)

    def _extra_repr(self):
        s = (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
             f"bias={self.bias is not None}")
        s += f", channel_axis={self.channel_axis}" if self.channel_axis != 1 else ""
        return s + (f", activation={self.activation!r}" if self.activation is not None else "")


class LayerNorm(_Layer):
    """Layer normalization over the trailing ``normalized_shape`` axes, like ``torch.nn.LayerNorm``.

    Parameters
    ----------
    normalized_shape : int or tuple of int
        The trailing dimensions of the input normalized together.
    eps : float, default 1e-5
    elementwise_affine : bool, default True
        Learn ``weight`` (ones) and ``bias`` (zeros) of shape ``normalized_shape``.
    bias : bool, default True
        With ``elementwise_affine``, whether there is a bias.
    dtype : float32 or float64, default float32
    backend : str, optional
    activation : None, "relu" or "silu", default None
        Fused into the output (keyword-only).
    weight_offset : float, default 0.0
        The layer scales by ``weight_offset + weight`` (keyword-only).

    Attributes
    ----------
    weight, bias : array of shape normalized_shape or None
    weight_grad, bias_grad : array of shape normalized_shape or None
    training : bool

    Examples
    --------
    >>> import numpy as np, cnorm.nn
    >>> ln = cnorm.nn.LayerNorm(8)
    >>> x = np.random.default_rng(0).standard_normal((4, 10, 8)).astype(np.float32)
    >>> y = ln(x)
    >>> dx = ln.backward(np.ones_like(y))
    >>> ln.weight_grad.shape
    (8,)
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, *, dtype=np.float32,
                 backend=None, activation=None, weight_offset=0.0):
        super().__init__(dtype, backend)
        self.normalized_shape = _check_normalized_shape(normalized_shape)
        self.eps = v.check_eps(eps)
        self.elementwise_affine = v.check_bool("elementwise_affine", elementwise_affine)
        bias = v.check_bool("bias", bias)
        self.activation = v.check_activation(activation)
        if self.elementwise_affine:
            self.weight = self._full(self.normalized_shape, 1.0)
            self.bias = self._full(self.normalized_shape, 0.0) if bias else None
        self.weight_offset = v.check_weight_offset(weight_offset, self.weight)

    reset_parameters = GroupNorm.reset_parameters

    def _forward(self, x, out=None):
        return F.layer_norm_forward(x, self.normalized_shape, self.weight, self.bias, self.eps, self.backend,
                                    out=out, activation=self.activation, weight_offset=self.weight_offset)

    def _backward(self, dy, x, saved, out=None):
        return F.layer_norm_backward(dy, x, saved, self.weight, out=out)

    def _extra_repr(self):
        s = (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
             f"bias={self.bias is not None}")
        s += f", activation={self.activation!r}" if self.activation is not None else ""
        return s + (f", weight_offset={self.weight_offset}" if self.weight_offset else "")


def _check_normalized_shape(normalized_shape) -> tuple:
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        normalized_shape = (normalized_shape,)
    try:
        shape = tuple(operator.index(d) for d in normalized_shape)
    except TypeError:
        raise TypeError(f"normalized_shape: expected an int or a tuple of ints, got {normalized_shape!r}") \
            from None
    if not shape or min(shape) < 1:
        raise ValueError(f"normalized_shape: expected one or more positive sizes, got {shape}")
    return shape


class RMSNorm(_Layer):
    """Root-mean-square normalization over the trailing ``normalized_shape`` axes, like ``torch.nn.RMSNorm``.

    ``y = x / sqrt(mean(x²) + eps) · weight`` (Llama, Mistral, Gemma, T5);
    loads a ``torch.nn.RMSNorm`` state dict (key ``weight``).

    Parameters
    ----------
    normalized_shape : int or tuple of int
    eps : float or None, default None
        None: PyTorch's default, the machine epsilon of float32 (of float64
        for float64 input).
    elementwise_affine : bool, default True
        Learn ``weight`` (ones) of shape ``normalized_shape``.
    dtype : float32 or float64, default float32
    backend : str, optional
    activation : None, "relu" or "silu", default None
        Fused into the output (keyword-only).
    weight_offset : float, default 0.0
        Scale by ``weight_offset + weight``: Gemma's ``(1 + weight)`` with
        zero-initialized weights is ``weight_offset=1.0`` after loading
        its weights (keyword-only).

    Attributes
    ----------
    weight : array of shape normalized_shape or None
    weight_grad : array of shape normalized_shape or None
    bias, bias_grad : None (RMSNorm has no bias)
    training : bool

    Examples
    --------
    >>> import numpy as np, cnorm.nn
    >>> norm = cnorm.nn.RMSNorm(8)
    >>> x = np.random.default_rng(0).standard_normal((4, 10, 8)).astype(np.float32)
    >>> y = norm(x)
    >>> dx = norm.backward(np.ones_like(y))
    >>> sorted(norm.state_dict())
    ['weight']
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, *, dtype=np.float32, backend=None,
                 activation=None, weight_offset=0.0):
        super().__init__(dtype, backend)
        self.normalized_shape = _check_normalized_shape(normalized_shape)
        self.eps = None if eps is None else v.check_eps(eps)
        self.elementwise_affine = v.check_bool("elementwise_affine", elementwise_affine)
        self.activation = v.check_activation(activation)
        if self.elementwise_affine:
            self.weight = self._full(self.normalized_shape, 1.0)
        self.weight_offset = v.check_weight_offset(weight_offset, self.weight)

    reset_parameters = GroupNorm.reset_parameters

    def _forward(self, x, out=None):
        return F.rms_norm_forward(x, self.normalized_shape, self.weight, self.eps, backend=self.backend, out=out,
                                  activation=self.activation, weight_offset=self.weight_offset)

    def _backward(self, dy, x, saved, out=None):
        return F.rms_norm_backward(dy, x, saved, self.weight, out=out)

    def _extra_repr(self):
        s = f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        s += f", activation={self.activation!r}" if self.activation is not None else ""
        return s + (f", weight_offset={self.weight_offset}" if self.weight_offset else "")




def __getattr__(name):
    """``cnorm.nn.SyncBatchNorm`` and ``cnorm.nn.convert_sync_batchnorm``, from :mod:`cnorm.distributed`.

    Imported on first use: cnorm.distributed builds on this module.
    """
    if name in ("SyncBatchNorm", "convert_sync_batchnorm"):
        from . import distributed

        return getattr(distributed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
