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
    return _kind(type(a)) != _NATIVE


# What a type's objects are to the wrapper, memoized per type (the test reads only the type;
# making it once saves a few attribute look-ups per argument and call):
_NATIVE, _TORCH_ARRAY, _FOREIGN = 0, 1, 2   # not foreign / a torch tensor / another DLPack array
_KINDS = {t: _NATIVE for t in (np.ndarray, type(None), bool, int, float, str, tuple, list, dict)}


def _kind(t) -> int:
    k = _KINDS.get(t)
    if k is None:
        if issubclass(t, np.ndarray) or not hasattr(t, "__dlpack_device__") or not hasattr(t, "__dlpack__") \
                or t.__module__.split(".")[0] in ("numpy", "cupy"):
            k = _NATIVE
        else:
            k = _TORCH_ARRAY if t.__module__.startswith("torch") else _FOREIGN   # torch.Tensor, Parameter...
            if k == _TORCH_ARRAY:
                _torch()
        if len(_KINDS) < 4096:
            _KINDS[t] = k
    return k


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
    return _import_torch(name, a) if _is_torch(a) else _import(name, a, False)


def _import_torch(name, a):
    if a.dtype is not _TORCH_BF16:
        # .numpy() is the same zero-copy view, without the protocol's Python layers (a few
        # microseconds per argument); it refuses what needs the checks below (a tensor that
        # requires grad, non-CPU memory) and conjugate/negative views (DLPack's path takes those)
        try:
            return a.numpy()
        except (RuntimeError, TypeError):
            pass
    if a.requires_grad:
        raise TypeError(
            f"{name}: a torch.Tensor that requires grad cannot be handed to cnorm's NumPy/CuPy functions "
            f"(its autograd graph would silently lose this call): pass {name}.detach(), or use cnorm.torch "
            f"(cnorm.torch.nn modules, cnorm.torch.replace_norms), whose operators differentiate through "
            f"cnorm")
    torch_bf16 = a.dtype is _torch().bfloat16
    if torch_bf16:  # NumPy's and CuPy's DLPack have no bfloat16: share the bits, then view them
        a = a.view(_torch().int16)
        if a.is_cpu:
            try:
                return a.numpy().view(_bf16())
            except (RuntimeError, TypeError):
                pass
    return _import(name, a, torch_bf16)


def _import(name, a, bf16_bits):
    """Through the DLPack protocol; ``bf16_bits``: ``a`` holds bfloat16 values as int16."""
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
    return b.view(_bf16()) if bf16_bits else b


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
        return export_torch(a)
    ns = getattr(proto, "__array_namespace__", None)
    if ns is not None:
        return ns().from_dlpack(a)
    mod = __import__(type(proto).__module__.split(".")[0])
    if hasattr(mod, "from_dlpack"):
        return mod.from_dlpack(a)
    return a


def export_torch(a):
    """``a`` (a NumPy/CuPy array) as a torch tensor over the same memory."""
    torch = _torch()
    if type(a) is np.ndarray and a.dtype.kind != "V":
        return torch.from_numpy(a)
    bf16 = a.dtype.kind == "V" and a.dtype == _bf16()
    src = a.view(np.int16) if bf16 else a   # (bfloat16 as its bits, as on the way in)
    t = torch.from_numpy(src) if type(src) is np.ndarray else torch.from_dlpack(src)
    return t.view(torch.bfloat16) if bf16 else t


_TORCH = None
# torch.bfloat16 and torch.Tensor once torch is imported (_kind imports it on the first tensor)
_TORCH_BF16 = _TORCH_TENSOR = object()


def _torch():
    global _TORCH, _TORCH_BF16, _TORCH_TENSOR
    if _TORCH is None:
        import torch

        _TORCH, _TORCH_BF16, _TORCH_TENSOR = torch, torch.bfloat16, torch.Tensor
    return _TORCH


def _give(r, proto, given):
    """A call's result with its NumPy/CuPy arrays as ``proto``'s type; an array the call
    returned as it was given (``out=x``) comes back as the caller's object (``given``:
    (imported array, the caller's object) pairs)."""
    if type(r) is not np.ndarray:
        if isinstance(r, tuple):
            return tuple(_give(x, proto, given) for x in r)
        if type(r).__module__.split(".")[0] not in ("numpy", "cupy") or not hasattr(r, "__dlpack__"):
            return r
    for b, a in given:
        if b is r:
            return a
    return export_like(r, proto)


def _name(names, i):
    return names[i] if i < len(names) else f"argument {i}"


def _foreign_call(fn, names, first, args, kwargs):
    """``fn`` on the foreign arrays among ``args[first:]`` and ``kwargs`` imported; its result exported."""
    given = []
    proto = None
    args = list(args)
    for i in range(first, len(args)):
        a = args[i]
        k = _KINDS.get(type(a))
        if k != _NATIVE and (k is not None or (k := _kind(type(a))) != _NATIVE):
            name = _name(names, i)
            b = args[i] = _import_torch(name, a) if k == _TORCH_ARRAY else _import(name, a, False)
            given.append((b, a))
            if proto is None:
                proto = a
    for n, a in kwargs.items():
        k = _kind(type(a))
        if k != _NATIVE:
            b = kwargs[n] = _import_torch(n, a) if k == _TORCH_ARRAY else _import(n, a, False)
            given.append((b, a))
            if proto is None:
                proto = a
    r = fn(*args, **kwargs)
    if type(r) is np.ndarray and type(proto) is _TORCH_TENSOR and r.dtype.kind != "V":
        for b, a in given:
            if b is r:
                return a
        return _TORCH.from_numpy(r)   # (the common case of _give, inline)
    return _give(r, proto, given)


def accepts_dlpack(fn):
    """Wrap a public function so that DLPack arrays of other libraries go in and come back out.

    Positional and keyword arguments that are foreign arrays are imported;
    the NumPy/CuPy arrays in the result (or in a result tuple) become the
    first foreign argument's type. Calls with none (NumPy and CuPy arrays)
    pass straight through.
    """
    code = fn.__code__
    names = code.co_varnames[: code.co_argcount]
    kinds = _KINDS

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for i, a in enumerate(args):
            k = kinds.get(type(a))
            if k != _NATIVE and (k is not None or _kind(type(a)) != _NATIVE):
                return _foreign_call(fn, names, i, args, kwargs)
        if kwargs and any(_kind(type(a)) != _NATIVE for a in kwargs.values()):
            return _foreign_call(fn, names, len(args), args, kwargs)
        return fn(*args, **kwargs)

    return wrapper
