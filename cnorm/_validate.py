"""Argument checks shared by every norm: each error names the argument,
what was expected and what was given, and is raised before any buffer is touched."""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np

from ._dtypes import is_floating


def type_name(a) -> str:
    t = type(a)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ not in ("builtins",) else t.__qualname__


def check_array(name: str, a, backend, ndim_min: int = 1):
    """Check that ``a`` is an array of ``backend``'s type with a supported floating dtype.

    Returns ``a``, or its copy in native byte order when it has a supported
    dtype in the other order (``>f4`` on a little-endian machine): like a
    NumPy ufunc, a norm computes on such data and returns native-order results.
    Callers use the returned array.
    """
    if not backend.accepts(a):
        hint = ""
        if isinstance(a, np.ma.MaskedArray):
            hint = ("; a masked array's mask would be ignored (masked values would enter the statistics): "
                    "pass x.filled(value), or the unmasked values, as a numpy.ndarray")
        elif type(a).__module__.split(".")[0] == "cupy":
            hint = "; pass backend='cupy' (or 'auto') for device arrays, or move it with .get()"
        elif hasattr(a, "__dlpack__"):
            hint = (f"; pass it to the call without backend= (its memory picks the backend), or convert it "
                    f"with numpy.from_dlpack(...) or cupy.from_dlpack(...)")
        elif not hasattr(a, "dtype"):
            hint = "; wrap it with numpy.asarray(...)"
        raise TypeError(
            f"{name}: the {backend.name!r} backend expects {backend.describe_expected()}, "
            f"got {type_name(a)}{hint}"
        )
    dtypes = backend.supported_dtypes()
    if a.dtype not in dtypes:
        if not a.dtype.isnative and a.dtype.newbyteorder("=") in dtypes:
            a = a.astype(a.dtype.newbyteorder("="))  # one copy; the kernels read native values
        else:
            names = ", ".join(str(d) for d in dtypes)
            raise TypeError(f"{name}: expected a floating array of dtype {names}, got dtype {a.dtype}")
    if a.ndim < ndim_min:
        raise ValueError(f"{name}: expected at least {ndim_min} dimensions, got shape {tuple(a.shape)}")
    return a


def check_param(name: str, a, shape: tuple, backend):
    """Check an optional affine parameter or running buffer of exactly ``shape``."""
    if a is None:
        return None
    if not backend.accepts(a):
        raise TypeError(
            f"{name}: the {backend.name!r} backend expects {backend.describe_expected()} "
            f"(on the same device as x), got {type_name(a)}"
        )
    if not is_floating(a.dtype):
        raise TypeError(f"{name}: expected a floating array, got dtype {a.dtype}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got shape {tuple(a.shape)}")
    return a


def check_running(running_mean, running_var, shape: tuple, backend, required: bool, why: str,
                  updated: bool = True):
    """Check the running buffers: both or neither, right shape, writable when ``updated``.

    In eval mode they are only read, so read-only buffers are fine there.
    """
    check_param("running_mean", running_mean, shape, backend)
    check_param("running_var", running_var, shape, backend)
    if (running_mean is None) != (running_var is None):
        given = "running_mean" if running_var is None else "running_var"
        raise ValueError(f"running_mean, running_var: expected both or neither, got only {given}")
    if required and running_mean is None:
        raise ValueError(f"running_mean, running_var: required {why}, got None")
    for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
        # CuPy arrays have no writeable flag: device memory is always writable.
        if updated and buf is not None and not getattr(buf.flags, "writeable", True):
            raise ValueError(f"{name}: expected a writable array (it is updated in place), got a read-only one")


def check_eps(eps) -> float:
    if type(eps) is float and eps >= 0 and eps != math.inf:  # the common case, fast
        return eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a real number, got {type_name(eps)}")
    try:
        value = float(eps)
    except OverflowError:  # an int (or Fraction...) beyond the float range
        value = math.inf
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"eps: expected a finite number >= 0, got {short_repr(eps)}")
    return value


def short_repr(value) -> str:
    """``str(value)`` for a message, shortened for huge numbers (str() of an int over
    4300 digits even raises)."""
    try:
        text = str(value)
    except ValueError:
        text = ""
    if text and len(text) <= 40:
        return text
    return f"{text[:12]}... ({type_name(value)}, beyond the float range)" if text else \
        f"a number beyond the float range ({type_name(value)})"


def check_momentum(momentum) -> float:
    if momentum is None:
        raise ValueError(
            "momentum: None (cumulative average) needs the number of batches seen; "
            "use a cnorm.nn layer, or pass momentum=1/num_batches_tracked"
        )
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum: expected a real number in [0, 1], got {type_name(momentum)}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a number in [0, 1], got {short_repr(momentum)}")
    return float(momentum)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type_name(value)}")
    return bool(value)


def check_int(name: str, value, minimum: int = 1) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type_name(value)}") from None
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {short_repr(value)}")
    return value


def check_channel_axis(channel_axis, ndim: int) -> int:
    """Normalize ``channel_axis`` to a positive axis other than the batch axis 0."""
    try:
        if isinstance(channel_axis, bool):
            raise TypeError
        axis = operator.index(channel_axis)
    except TypeError:
        raise TypeError(f"channel_axis: expected an int, got {type_name(channel_axis)}") from None
    if not -ndim <= axis < ndim:
        raise ValueError(f"channel_axis: expected an axis in [{-ndim}, {ndim - 1}] for {ndim}-D x, got {axis}")
    axis %= ndim
    if axis == 0:
        raise ValueError("channel_axis: expected a non-batch axis (axis 0 is the batch axis), got 0")
    return axis


def check_normalized_shape(normalized_shape, x_shape: tuple) -> tuple:
    if type(normalized_shape) is int and x_shape and x_shape[-1] == normalized_shape:  # fast path
        return (normalized_shape,)
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        normalized_shape = (int(normalized_shape),)
    try:
        shape = tuple(operator.index(d) for d in normalized_shape)
    except TypeError:
        raise TypeError(
            f"normalized_shape: expected an int or a tuple of ints, got {normalized_shape!r}"
        ) from None
    if len(shape) == 0 or len(shape) > len(x_shape) or tuple(x_shape[len(x_shape) - len(shape):]) != shape:
        raise ValueError(
            f"normalized_shape: expected the trailing dimensions of x (shape {tuple(x_shape)}), got {shape}"
        )
    return shape


def check_activation(activation):
    """None, "relu" or "silu" (the activations a norm's forward can fuse)."""
    if activation is None or activation == "relu" or activation == "silu":
        return activation
    if not isinstance(activation, str):
        raise TypeError(f"activation: expected None, 'relu' or 'silu', got {type_name(activation)}")
    raise ValueError(f"activation: expected None, 'relu' or 'silu', got {activation!r}")


def check_weight_offset(offset, weight) -> float:
    """A finite real added to weight; nonzero only with a weight to add it to."""
    if type(offset) is float and offset == 0.0:
        return 0.0
    if isinstance(offset, bool) or not isinstance(offset, numbers.Real):
        raise TypeError(f"weight_offset: expected a real number, got {type_name(offset)}")
    value = float(offset)
    if not math.isfinite(value):
        raise ValueError(f"weight_offset: expected a finite number, got {short_repr(offset)}")
    if value != 0.0 and weight is None:
        raise ValueError(f"weight_offset: it is added to weight, but weight is None (got weight_offset={value}); "
                         "pass the weight, or an all-constant weight array")
    return value


def is_floating_dtype(dtype) -> bool:
    """True for a floating dtype (None and non-dtypes are not)."""
    try:
        return dtype is not None and is_floating(np.dtype(dtype))
    except TypeError:
        return False


def check_like(name: str, a, x, backend):
    """Check that ``a`` (dy) matches x's type, shape and dtype; returns it as check_array does."""
    a = check_array(name, a, backend)
    if tuple(a.shape) != tuple(x.shape):
        raise ValueError(f"{name}: expected shape {tuple(x.shape)} (that of x), got {tuple(a.shape)}")
    if a.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (that of x), got {a.dtype}")
    return a


# -- out= buffers ---------------------------------------------------------------------

def _data_address(a):
    """The address of a's first element (NumPy or CuPy)."""
    iface = getattr(a, "__array_interface__", None) or getattr(a, "__cuda_array_interface__", None)
    return iface["data"][0]


def overlap(xp, a, b) -> str:
    """How the memory of arrays ``a`` and ``b`` meets: "none", "same" (the same
    elements: one address, shape, strides and dtype) or "partial" (anything else
    that shares a byte, or may: an overlap too hard to decide counts as one)."""
    if a is None or b is None or a.size == 0 or b.size == 0:  # (an empty array holds no memory)
        return "none"
    if a is b:
        return "same"
    if not xp.may_share_memory(a, b):
        return "none"
    if (a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype
            and _data_address(a) == _data_address(b)):
        return "same"
    try:
        return "partial" if xp.shares_memory(a, b, max_work=1 << 20) else "none"
    except (TypeError, ValueError, NotImplementedError, np.exceptions.TooHardError):
        return "partial"  # (CuPy decides only by bounds)


def layout_words(perm: tuple) -> str:
    """Words for the memory layout of a kernel view whose axis order is ``perm``."""
    n = len(perm)
    if perm == tuple(range(n)):
        return "a C-contiguous array"
    if perm[-1] != n - 1 and perm[:1] == (0,) and sorted(perm[1:-1]) == list(perm[1:-1]):
        return (f"a channels-last array (C-contiguous in axis order {perm}, the layout of x; "
                "for (N, C, H, W): x.transpose(0, 2, 3, 1) C-contiguous)")
    return f"an array C-contiguous in axis order {perm} (the layout of x)"


def _writes_directly(out, perm: tuple) -> bool:
    """out is C-contiguous in axis order ``perm`` (an empty one always is)."""
    if perm == tuple(range(len(perm))):
        return out.flags.c_contiguous  # (the flag: per-token calls check it at C speed)
    from ._layout import is_c_contiguous  # (a cycle at import time otherwise)
    shape, strides = out.shape, out.strides
    return out.size == 0 or is_c_contiguous(tuple(shape[i] for i in perm), tuple(strides[i] for i in perm),
                                            out.itemsize)


def check_out(out, x, backend, perm: tuple, inplace=(), disjoint=(), name="out"):
    """Check an ``out=`` buffer for a result shaped like ``x``; return the names of
    the inputs it is (in place), as a tuple.

    ``out`` must be of the backend's array type, with x's shape and dtype,
    writable, aligned, in native byte order, and C-contiguous in the axis
    order ``perm`` of x's kernel view (so the kernel writes it without a
    copy). ``inplace`` lists ``(name, array)`` inputs that out may be exactly
    (the kernel reads each of their values before writing it), ``disjoint``
    ``(name, array)`` inputs it may not touch at all. Any other overlap is a
    ValueError naming ``out``.
    """
    if not backend.accepts(out):
        raise TypeError(f"{name}: the {backend.name!r} backend expects {backend.describe_expected()} "
                        f"(the array type of x), got {type_name(out)}")
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"{name}: expected shape {tuple(x.shape)} (that of x), got shape {tuple(out.shape)}")
    if out.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (that of the result), got dtype {out.dtype}")
    flags = out.flags
    if not getattr(flags, "writeable", True):  # (CuPy arrays have no such flag: always writable)
        raise ValueError(f"{name}: expected a writable array, got a read-only one")
    if not getattr(flags, "aligned", True):
        raise ValueError(f"{name}: expected an aligned array (the kernels store aligned values), got an unaligned one")
    if not _writes_directly(out, perm):
        raise ValueError(f"{name}: expected {layout_words(perm)}, so that the kernel writes it without a copy; "
                         f"got strides {tuple(out.strides)}")
    xp = backend.xp
    same = []
    for other, a in inplace:
        how = overlap(xp, out, a)
        if how == "same":
            same.append(other)
        elif how == "partial":
            raise ValueError(f"{name}: overlaps {other} partly; expected a separate buffer or {other} itself")
    for other, a in disjoint:
        if overlap(xp, out, a) != "none":
            raise ValueError(f"{name}: shares memory with {other}; expected a buffer separate from it")
    return tuple(same)
