"""Turn an N-D input into the 3-D kernel view of DESIGN §2, without copying when possible.

An array whose channel axis is its second-slowest axis is channels-first
``(N, C, S)``; one whose channel axis is its fastest is channels-last
``(N, S, C)`` — including a PyTorch ``channels_last`` tensor seen as NCHW
strides. Anything else is copied once, to the layout closest to its shape.
"""

from __future__ import annotations

from dataclasses import dataclass
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

    def to3(self, a, xp):
        """The 3-D kernel view of ``a`` (shaped like ``shape``); copies only if needed."""
        return xp.ascontiguousarray(a.transpose(self.perm)).reshape(self.shape3)

    def from3(self, a3):
        """The N-D array over ``a3``'s memory: same shape and strides order as the input."""
        permuted = tuple(self.shape[i] for i in self.perm)
        inverse = tuple(self.perm.index(i) for i in range(len(self.perm)))
        return a3.reshape(permuted).transpose(inverse)


def channel_view(x, channel_axis: int) -> View3:
    """Choose the 3-D view of ``x`` for a norm with channels on ``channel_axis`` (>= 1).

    Channels-last is preferred when S == 1 (BatchNorm1d on (N, C)): the
    kernel then reduces over rows with the channels in SIMD lanes.
    """
    ndim = x.ndim
    rest = tuple(i for i in range(1, ndim) if i != channel_axis)
    n, c = x.shape[0], x.shape[channel_axis]
    s = prod(x.shape[i] for i in rest)
    cf = View3(x.shape, (0, channel_axis, *rest), CHANNELS_FIRST, (n, c, s))
    cl = View3(x.shape, (0, *rest, channel_axis), CHANNELS_LAST, (n, s, c))
    preferred = (cl, cf) if s == 1 else (cf, cl)
    for view in preferred:
        if x.transpose(view.perm).flags.c_contiguous:
            return view
    # No view fits: copy once, to channels-last only if channels are the last axis.
    return cl if channel_axis == ndim - 1 else cf


def row_view(x, normalized_ndim: int) -> View3:
    """LayerNorm's view: one row of the trailing ``normalized_ndim`` dims per sample."""
    lead = x.shape[: x.ndim - normalized_ndim]
    d = prod(x.shape[x.ndim - normalized_ndim :])
    return View3(x.shape, tuple(range(x.ndim)), CHANNELS_LAST, (prod(lead), 1, d))
