"""Any array in, the same type out: arrays of other libraries through DLPack.

The kernels run on NumPy arrays (CPU memory: the cython and numpy backends)
and CuPy arrays (CUDA memory: the cupy backend). Any other array that
exposes ``__dlpack__`` (a PyTorch tensor, a JAX array, an array-API array)
is imported without a copy (:func:`numpy.from_dlpack` or
:func:`cupy.from_dlpack`, on the array's device and stream), the call runs on
the backend that serves its memory, and the arrays the call returns are
handed back as the first such argument's type through that library's own
``from_dlpack``. An argument the call returns as it was given (``out=x``) is
returned as the caller's object itself.

No silent host/device copies: memory that no backend serves (another device
type) is a TypeError naming the argument. A PyTorch tensor that requires
grad cannot be exported (its autograd graph would lose the call): the error
says ``.detach()``, or points to :mod:`cnorm.torch`, whose operators
differentiate through cnorm's kernels.
"""

from __future__ import annotations

import functools

import numpy as np

from . import _validate as v

# DLPack device types (dlpack.h): the ones the backends serve
_KDL_CPU, _KDL_CUDA, _KDL_CUDA_HOST, _KDL_CUDA_MANAGED = 1, 2, 3, 13
_KDL_NAMES = {4: "OpenCL", 7: "Vulkan", 8: "Metal", 9: "VPI", 10: "ROCm", 11: "ROCm host", 12: "ext_dev",
              14: "oneAPI", 15: "WebGPU", 16: "Hexagon", 17: "MAIA"}


def is_foreign(a) -> bool:
    """True for an array the backends do not take directly but DLPack can import."""
    t = type(a)
    if t is np.ndarray or not hasattr(t, "__dlpack_device__") or not hasattr(t, "__dlpack__"):
        return False
    return t.__module__.split(".")[0] not in ("numpy", "cupy") and not isinstance(a, np.ndarray)


def _is_torch(a) -> bool:
    return type(a).__module__.startswith("torch")   # torch.Tensor, torch.nn.Parameter, ...


_BF16 = None


def _bf16():
    global _BF16
    if _BF16 is None:
        import ml_dtypes

        _BF16 = np.dtype(ml_dtypes.bfloat16)
    return _BF16


def import_array(name: str, a):
    """``a`` (a DLPack-capable array of another library) as a NumPy or CuPy array over its memory."""
    torch_bf16 = False
    if _is_torch(a):
        if a.requires_grad:
            raise TypeError(
                f"{name}: a torch.Tensor that requires grad cannot be handed to cnorm's NumPy/CuPy functions "
                f"(its autograd graph would silently lose this call): pass {name}.detach(), or use cnorm.torch "
                f"(cnorm.torch.nn modules, cnorm.torch.replace_norms), whose operators differentiate through "
                f"cnorm")
        torch = _torch()
        torch_bf16 = a.dtype is torch.bfloat16
        if torch_bf16:  # NumPy's and CuPy's DLPack have no bfloat16: share the bits, then view them
            a = a.view(torch.int16)
        if a.is_cpu:
            # .numpy() is the same zero-copy view, without the protocol's Python layers
            # (a few microseconds per argument); conjugate/negative views refuse it
            try:
                b = a.numpy()
                return b.view(_bf16()) if torch_bf16 else b
            except (RuntimeError, TypeError):
                pass
    try:
        dev_type, dev_id = a.__dlpack_device__()
    except Exception as exc:  # noqa: BLE001 - any failure of the protocol is the caller's argument
        raise TypeError(f"{name}: {v.type_name(a)} has __dlpack__ but its __dlpack_device__() failed: {exc}") from exc
    dev_type = int(dev_type)
    if dev_type in (_KDL_CPU, _KDL_CUDA_HOST):
        b = _import_host(name, a)
    elif dev_type in (_KDL_CUDA, _KDL_CUDA_MANAGED):
        b = _import_cuda(name, a, dev_id)
    else:
        where = _KDL_NAMES.get(dev_type, f"DLPack device type {dev_type}")
        raise TypeError(
            f"{name}: {v.type_name(a)} lives in {where} memory, which no cnorm backend serves (CPU memory: "
            f"'cython' and 'numpy'; CUDA memory: 'cupy'); copy it to the host or a CUDA device first")
    return b.view(_bf16()) if torch_bf16 else b


def _import_host(name, a):
    try:
        return np.from_dlpack(a)
    except (BufferError, RuntimeError, TypeError, ValueError) as exc:
        raise TypeError(
            f"{name}: numpy.from_dlpack could not import {v.type_name(a)} "
            f"(dtype {getattr(a, 'dtype', '?')}): {exc}") from exc


def _import_cuda(name, a, dev_id):
    try:
        import cupy
    except ImportError as exc:
        raise TypeError(
            f"{name}: {v.type_name(a)} is in CUDA memory, which the 'cupy' backend serves, but CuPy is not "
            f"installed (pip install \"cnorm-kernels[cuda12]\" or \"cnorm-kernels[cuda13]\"); or move it to "
            f"the host first") from exc
    with cupy.cuda.Device(int(dev_id)):
        return cupy.from_dlpack(a)  # synchronizes the producer's stream with CuPy's current one


def export_like(a, proto):
    """``a`` (a NumPy/CuPy array a call returned) as ``proto``'s array type, sharing memory."""
    if _is_torch(proto):
        torch = _torch()
        bf16 = a.dtype.kind == "V" and a.dtype == _bf16()
        src = a.view(np.int16) if bf16 else a   # (bfloat16 as its bits, as on the way in)
        t = torch.from_numpy(src) if type(src) is np.ndarray else torch.from_dlpack(src)
        return t.view(torch.bfloat16) if bf16 else t
    ns = getattr(proto, "__array_namespace__", None)
    if ns is not None:
        return ns().from_dlpack(a)
    mod = __import__(type(proto).__module__.split(".")[0])
    if hasattr(mod, "from_dlpack"):
        return mod.from_dlpack(a)
    return a


_TORCH = None


def _torch():
    global _TORCH
    if _TORCH is None:
        import torch

        _TORCH = torch
    return _TORCH


class Call:
    """The foreign arrays of one call: imported on the way in, exported on the way out."""

    __slots__ = ("proto", "given")

    def __init__(self):
        self.proto = None
        self.given = {}  # id(imported array) -> the caller's object

    def take(self, name, a):
        if a is None or type(a) is np.ndarray or not is_foreign(a):
            return a
        b = import_array(name, a)
        if self.proto is None:
            self.proto = a
        self.given[id(b)] = (b, a)
        return b

    def give(self, r):
        if isinstance(r, tuple):
            return tuple(self.give(x) for x in r)
        if type(r).__module__.split(".")[0] not in ("numpy", "cupy") or not hasattr(r, "__dlpack__"):
            return r
        hit = self.given.get(id(r))
        if hit is not None and hit[0] is r:
            return hit[1]
        return export_like(r, self.proto)


def accepts_dlpack(fn):
    """Wrap a public function so that DLPack arrays of other libraries go in and come back out.

    Positional and keyword arguments that are foreign arrays are imported;
    the NumPy/CuPy arrays in the result (or in a result tuple) become the
    first foreign argument's type. Calls with none (NumPy and CuPy arrays)
    pass straight through.
    """
    code = fn.__code__
    names = code.co_varnames[: code.co_argcount]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for a in args:
            if is_foreign(a):
                break
        else:
            if not kwargs or not any(is_foreign(a) for a in kwargs.values()):
                return fn(*args, **kwargs)
        call = Call()
        args = tuple(call.take(names[i] if i < len(names) else f"argument {i}", a) for i, a in enumerate(args))
        kwargs = {k: call.take(k, a) for k, a in kwargs.items()}
        return call.give(fn(*args, **kwargs))

    return wrapper
