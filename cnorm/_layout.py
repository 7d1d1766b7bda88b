"""Turn an N-D input into the 3-D kernel view (docs/architecture.md, §2), without copying when possible.

An array whose channel axis is its second-slowest axis is channels-first
``(N, C, S)``; one whose channel axis is its fastest is channels-last
``(N, S, C)`` — including a PyTorch ``channels_last`` tensor seen as NCHW
strides. Anything else is copied once, to the layout closest to its shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from math import prod

from .backends.base import CHANNELS_FIRST, CHANNELS_LAST


@dataclass(frozen=True)
class View3:
    """How an N-D array maps to (and back from) its 3-D kernel view.

    Attributes
    ----------
    shape : tuple
        The original N-D shape.
    perm : tuple
        Axis order that makes the array C-contiguous in the kernel layout.
    layout : {"cf", "cl"}
    shape3 : tuple
        The 3-D shape the kernel sees.
    """

    shape: tuple
    perm: tuple
    layout: str
    shape3: tuple
    permuted: tuple = field(init=False, repr=False, compare=False)
    inverse: tuple = field(init=False, repr=False, compare=False)
    empty: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "empty", prod(self.shape) == 0)
        object.__setattr__(self, "permuted", tuple(self.shape[i] for i in self.perm))
        identity = self.perm == tuple(range(len(self.perm)))
        inverse = None if identity else tuple(self.perm.index(i) for i in range(len(self.perm)))
        object.__setattr__(self, "inverse", inverse)

    def to3(self, a, xp):
        """The 3-D kernel view of ``a`` (shaped like ``shape``); copies only if needed."""
        if self.inverse is not None:
            a = a.transpose(self.perm)
        return xp.ascontiguousarray(a).reshape(self.shape3)

    def from3(self, a3):
        """The N-D array over ``a3``'s memory: same shape and strides order as the input."""
        a = a3.reshape(self.permuted)
        return a if self.inverse is None else a.transpose(self.inverse)


def is_c_contiguous(shape, strides, itemsize) -> bool:
    """NumPy's C-contiguity rule (size-1 axes may have any stride)."""
    expected = itemsize
    for dim, stride in zip(reversed(shape), reversed(strides)):
        if dim != 1 and stride != expected:
            return False
        expected *= dim
    return True


def channel_view(x, channel_axis: int) -> View3:
    """Choose the 3-D view of ``x`` for a norm with channels on ``channel_axis`` (>= 1).

    Channels-last is preferred when S == 1 (BatchNorm1d on (N, C)): the
    kernel then reduces over rows with the channels in SIMD lanes.
    """
    return _channel_view(tuple(x.shape), tuple(x.strides), x.itemsize, channel_axis)


@lru_cache(maxsize=1024)
def _channel_view(shape, strides, itemsize, channel_axis):
    ndim = len(shape)
    rest = tuple(i for i in range(1, ndim) if i != channel_axis)
    n, c = shape[0], shape[channel_axis]
    s = prod(shape[i] for i in rest)
    cf = View3(shape, (0, channel_axis, *rest), CHANNELS_FIRST, (n, c, s))
    cl = View3(shape, (0, *rest, channel_axis), CHANNELS_LAST, (n, s, c))
    for view in ((cl, cf) if s == 1 else (cf, cl)):
        if is_c_contiguous(view.permuted, tuple(strides[i] for i in view.perm), itemsize):
            return view
    # No view fits: copy once, to channels-last only if channels are the last axis.
    return cl if channel_axis == ndim - 1 else cf


@lru_cache(maxsize=1024)
def row_view(shape: tuple, normalized_ndim: int) -> View3:
    """LayerNorm's view of an array of ``shape``: one row of the trailing dims per sample."""
    lead = shape[: len(shape) - normalized_ndim]
    d = prod(shape[len(shape) - normalized_ndim :])
    return View3(shape, tuple(range(len(shape))), CHANNELS_LAST, (prod(lead), 1, d))
