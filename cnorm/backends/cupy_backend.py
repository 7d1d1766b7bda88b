"""The CuPy GPU backend: raw CUDA kernels loaded with ``cupy.RawModule``.

The kernels live in ``kernels/*.cu`` (shared device code in
``kernels/common.cuh``), templated over the data type (float, double,
__half, __nv_bfloat16) and the vector width (1, or 16 bytes when the data
and the problem's strides allow it). Statistics are float32 (float64 for
double data), computed with Welford's update and Chan's merge; every
reduction combines partial results in a fixed order chosen from the problem
shape, so results are bit-identical run to run.

Which kernels solve which problem:

* cross-sample (BatchNorm): per-channel partial statistics over chunks of
  (N, S) (``seg_stats_partial`` channels-first, ``col_stats_partial``
  channels-last), merged per channel (``stats_finalize``), then one
  elementwise pass (``affine``). Backward: partial sums of dy and dy*xhat
  (``seg_grad_partial`` / ``col_grad_partial``, ``grad_finalize``), then
  ``bn_backward_apply``.
* per-sample (LayerNorm, GroupNorm, InstanceNorm, RMSNorm): one row (sample,
  group) per warp or block. Rows of at most 8 (backward: 4) 16-byte vectors per
  thread of up to 512 threads are held in registers, every load issued
  before the statistics are reduced (``row_forward_regs``,
  ``row_backward_regs`` in rows_regs.cu); other rows
  are staged in shared memory so x is read once (``row_forward``,
  ``row_backward``); rows too long for shared memory, or too few to fill the
  device, are split over blocks (``seg_stats_partial``, ``stats_finalize``,
  ``row_apply``). dweight/dbias use the cross-sample gradient sums with
  per-row statistics.

Variants, as template parameters of those kernels (``ACT``, ``RMS``, ``ADD``):

* ``ACT`` (0 none, 1 relu, 2 silu; :data:`ACT_CODES`): forward stores act(z)
  for z = xhat·weight + bias (eval: x·scale + shift); backward uses g =
  dy·act'(z) in the sums and in dx, recomputing z from x and the saved
  statistics with the forward's arithmetic (``norm_z`` in common.cuh, one
  fused multiply-add). On every forward kernel (``affine``, the row kernels,
  ``row_apply``) and every backward one (``seg_grad_partial``,
  ``col_grad_partial``, ``bn_backward_apply``, the row kernels).
* ``RMS`` (``Problem.rms``, RMSNorm): mean-square statistics, mean stored as
  0, no mean term in backward; on the row kernels. Split rows take it as a
  flag of ``stats_finalize`` (var = m2/n + mean², in double), the gradient
  sums as their ``rms`` argument (the mean is not read).
* ``ADD`` (:meth:`CupyBackend.add_forward`, :meth:`CupyBackend.add_backward`,
  rows with S == 1): forward reads x and r once and writes h = x + r (rounded
  to the dtype) and y, the norm of h; backward reads dy, h and dh once and
  writes dx = dh + the norm's dx. On the row kernels, and on
  ``seg_stats_partial`` for split rows (which then writes h; ``row_apply``
  reads it back).

Each (file, data type, variant) is one compiled module (:func:`name_expressions`),
so a plain norm compiles no more than it did before the variants.

Outputs: every method that returns y or dx takes ``out``, a C-contiguous
array of x3's shape and dtype that is disjoint from the inputs or exactly
x3 (forward) or dy3/x3 (backward); the fused add's ``out`` and ``h_out`` may
be x3 or r3, its backward's ``out`` dy3, dh3 or h3. The result is written
there and ``out`` returned. Why every path is safe in place: the "In place"
comment above :meth:`CupyBackend.forward_train`. An ``out`` that is not
16-byte aligned while the inputs are (a view starting inside a larger
buffer) cannot take 16-byte stores: the elementwise kernels then run with
scalar stores (the same values), the fused row kernels write scratch that is
copied into ``out``, since their vector width sets the reduction order and
so the bits.

Kernels run on CuPy's current stream. Compiled modules are cached per data
type here, and on disk by CuPy. Importing this module does not need CuPy:
:meth:`CupyBackend.unavailable_reason` says why the backend cannot run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from .base import CHANNELS_FIRST, Backend, Problem, stats_dtype

KERNEL_DIR = Path(__file__).with_name("kernels")
KERNEL_FILES = ("reduce.cu", "elementwise.cu", "rows.cu", "rows_regs.cu")

# NumPy dtype name -> CUDA type; CUDA type -> elements per 16-byte vector.
CUDA_TYPES = {"float32": "float", "float64": "double", "float16": "__half", "bfloat16": "__nv_bfloat16"}
VEC_WIDTH = {"float": 4, "double": 2, "__half": 8, "__nv_bfloat16": 8}

THREADS = 256  # block size of every kernel except the row kernels
TARGET_BLOCKS = 2048  # partial-reduction blocks aimed for (a function of the shape only)
MIN_VECS_PER_THREAD = 8  # a reduction chunk gives each thread at least this many vectors
REG_ITEMS_FWD = (1, 2, 4, 8)  # vectors per thread instantiated for row_forward_regs
REG_ITEMS_BWD = (1, 2, 4)  # ... and for row_backward_regs (x and dy both held)
REG_MODES = (0, 1, 2)  # rows_regs.cu: per-element contiguous, per-channel contiguous, channels-last strided


#: Activation name -> the ACT template argument of the kernels (common.cuh).
ACT_CODES = {None: 0, "relu": 1, "silu": 2}

#: Variant key of a kernel instance: (ACT code, RMS, ADD); kernels without one
#: of these template parameters count as its plain value. Instances are compiled
#: in one module per (file, data type, variant), so the first call of a plain
#: norm compiles what it did before activations, RMSNorm and the residual add.
PLAIN = (0, False, False)


def instance(kernel: str, ctype: str, *args) -> str:
    """The template instance string ``kernel<ctype, args...>`` (bools as true/false).

    The launcher and :func:`name_expressions` both spell instances with it, so
    the string launched is the string compiled.

    Examples
    --------
    >>> instance("row_forward", "float", 4, True, 1, False, False)
    'row_forward<float, 4, true, 1, false, false>'
    """
    spelled = [("true" if a else "false") if isinstance(a, bool) else str(a) for a in args]
    return f"{kernel}<{', '.join([ctype, *spelled])}>"


def _instances(ctype: str) -> dict:
    """``{file name: [(instance, variant key), ...]}``: every instance the backend launches for ``ctype``."""
    acc = "double" if ctype == "double" else "float"
    vecs = (1, VEC_WIDTH[ctype])
    vw = VEC_WIDTH[ctype]
    acts = tuple(ACT_CODES.values())
    # (act, rms, add) of the row kernels: every activation with and without RMS; the
    # residual add (no activation) with either statistics. RMS and ADD rows have S == 1.
    row_variants = [(a, rms, False) for a in acts for rms in (False, True)] + [(0, rms, True) for rms in (False, True)]
    out = {f: [] for f in KERNEL_FILES}
    for k in ("affine", "bn_backward_apply"):
        out["elementwise.cu"] += [(instance(k, ctype, v, cl, a), (a, False, False))
                                  for a in acts for v in vecs for cl in (False, True)]
    red = out["reduce.cu"]
    red += [(instance("seg_stats_partial", ctype, v, add), (0, False, add)) for add in (False, True) for v in vecs]
    red += [(instance("col_stats_partial", ctype, v), PLAIN) for v in vecs]
    red += [(instance(k, ctype, v, a), (a, False, False))
            for k in ("seg_grad_partial", "col_grad_partial") for a in acts for v in vecs]
    red += [(f"stats_finalize<{acc}>", PLAIN), (f"grad_finalize<{acc}>", PLAIN)]
    rows = out["rows.cu"]
    for k in ("row_forward", "row_backward"):
        # the add's rows (S == 1) are channels-last: _row_problem turns (N, C, 1) into (N, 1, C)
        rows += [(instance(k, ctype, v, cl, a, rms, add), (a, rms, add))
                 for (a, rms, add) in row_variants for v in vecs for cl in ((True,) if add else (False, True))]
    rows += [(instance("row_apply", ctype, v, cl, a), (a, False, False)) for a in acts for v in vecs
             for cl in (False, True)]
    regs = out["rows_regs.cu"]
    for k, items_set in (("row_forward_regs", REG_ITEMS_FWD), ("row_backward_regs", REG_ITEMS_BWD)):
        for (a, rms, add) in row_variants:
            modes = (0,) if rms or add else REG_MODES  # RMS and ADD rows are contiguous (S == 1)
            regs += [(instance(k, ctype, vw, i, m, a, rms, add), (a, rms, add)) for i in items_set for m in modes]
    return out


def name_expressions(ctype: str, variant=None) -> dict:
    """Every kernel instance the backend launches for CUDA type ``ctype``, by source file.

    Parameters
    ----------
    ctype : str
        One of the values of :data:`CUDA_TYPES`.
    variant : tuple, optional
        A variant key ``(act code, rms, add)`` (:data:`PLAIN` for the plain
        norms): only the instances of that variant, which the backend compiles
        as one module per file. None: every instance.

    Returns
    -------
    dict
        ``{file name: [template instance, ...]}``; the strings are the
        ``name_expressions`` given to ``cupy.RawModule`` (and instantiated
        by ``tests/test_cuda_compile.py`` for nvcc).

    Examples
    --------
    >>> name_expressions("float")["rows.cu"][0]
    'row_forward<float, 1, false, 0, false, false>'
    >>> name_expressions("float", (1, False, False))["elementwise.cu"][0]
    'affine<float, 1, false, 1>'
    """
    return {f: [e for e, key in found if variant is None or key == variant] for f, found in _instances(ctype).items()}


def kernel_source(file_name: str) -> str:
    """Source of ``kernels/<file_name>`` with ``common.cuh`` inlined.

    Inlining makes CuPy's on-disk cache key (a hash of the source) change
    whenever the shared header does.
    """
    common = (KERNEL_DIR / "common.cuh").read_text()
    return (KERNEL_DIR / file_name).read_text().replace('#include "common.cuh"', common, 1)


def _cuda_include_dirs(cupy) -> list:
    """CUDA include folders holding cuda_fp16.h/cuda_bf16.h, for NVRTC to search."""
    roots = []
    try:
        roots.append(cupy.cuda.get_cuda_path())
    except Exception:  # noqa: BLE001 - a missing toolkit path only removes a candidate
        pass
    roots += [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parent.parent))
    found = []
    for root in roots:
        if root and (Path(root) / "include" / "cuda_bf16.h").is_file():
            inc = str(Path(root) / "include")
            if inc not in found:
                found.append(inc)
    return found


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _pow2ceil(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def _chunking(length: int, nseg: int, per_block: int):
    """Split each of ``nseg`` segments of ``length`` work items into chunks.

    ``per_block`` is how many items one block takes per sweep (threads, or
    rows per sweep for the column kernels). Depends on the shape only, so the
    combination order, hence the result, is the same on every device.
    Returns ``(chunk, nchunks)``.
    """
    most = max(1, length // (per_block * MIN_VECS_PER_THREAD))
    want = max(1, _cdiv(TARGET_BLOCKS, nseg))
    chunk = _cdiv(length, min(most, want))
    return chunk, _cdiv(length, chunk)


def _column_blocks(rows: int, cv: int):
    """Channels-last reduction geometry: (tx vector columns per block, column blocks,
    rows per chunk, chunks), from the shape alone so results are deterministic."""
    tx = min(32, _pow2ceil(cv))
    ncol = _cdiv(cv, tx)
    chunk, nch = _chunking(rows, ncol, THREADS // tx)
    return tx, ncol, chunk, nch


def _row_problem(p: Problem) -> Problem:
    """``p`` with a per-sample (N, C, 1) channels-first view taken as the (N, 1, C)
    channels-last one: the same memory, channels and rows (S == 1), so that the
    fused add's rows need the channels-last row kernels only."""
    if p.s == 1 and p.layout == CHANNELS_FIRST and not p.cross_sample:
        return Problem("cl", p.n, p.c, 1, p.groups, p.rms)
    return p


class CupyBackend(Backend):
    """Raw CUDA kernels for ``cupy.ndarray`` inputs (float16/bfloat16/float32/float64).

    Attributes
    ----------
    row_registers : bool
        Per-sample rows that fit go to the register kernels of rows_regs.cu
        (default); False sends them to the shared-memory kernels of rows.cu
        (the tests use it to cover those too).
    row_items : int
        Vectors (16 bytes) each thread of a register row aims to hold: a row
        of M vectors gets ``tpr = clamp(pow2ceil(M / row_items), 32, 512)``
        threads.
    """

    name = "cupy"
    row_registers = True
    row_items = 8

    def __init__(self):
        self._reason = None
        self._modules = {}
        self._kernels = {}
        self._type_cache = {}
        self._props = {}
        try:
            import cupy
        except ImportError as exc:
            self._reason = (f"CuPy is not installed (pip install 'cnorm-kernels[cuda12]'"
                            f" or 'cnorm-kernels[cuda13]'): {exc}")
            return
        self.xp = cupy
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001 - CUDA driver/runtime errors all mean "cannot run here"
            self._reason = f"no CUDA device: {type(exc).__name__}: {exc}"
            return
        if count < 1:
            self._reason = "no CUDA device: cupy.cuda.runtime.getDeviceCount() returned 0"
            return
        missing = [f for f in (*KERNEL_FILES, "common.cuh") if not (KERNEL_DIR / f).is_file()]
        if missing:
            self._reason = f"CUDA kernel sources missing from {KERNEL_DIR}: {', '.join(missing)}"

    def unavailable_reason(self):
        """None when this backend can run, else why not (for ``available_backends``)."""
        return self._reason

    # -- array-type contract -------------------------------------------------
    def accepts(self, a) -> bool:
        return isinstance(a, self.xp.ndarray) and self.xp is not np

    def describe_expected(self) -> str:
        return "a cupy.ndarray (on the GPU)"

    def supported_dtypes(self) -> tuple:
        dtypes = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)]
        bf16 = self._bfloat16()
        if bf16 is not None:
            dtypes.append(bf16)
        return tuple(dtypes)

    def _bfloat16(self):
        """The bfloat16 dtype when ml_dtypes is installed and CuPy makes arrays of it."""
        if "bf16" not in self._props:
            try:
                import ml_dtypes

                dt = np.dtype(ml_dtypes.bfloat16)
                self.xp.empty(1, dtype=dt)
                self._props["bf16"] = dt
            except Exception:  # noqa: BLE001 - no ml_dtypes, or a CuPy without bfloat16
                self._props["bf16"] = None
        return self._props["bf16"]

    # -- device properties and compiled modules ------------------------------
    def _device(self):
        """(multiprocessor count, shared memory a block may opt in to) of the current device."""
        dev = self.xp.cuda.runtime.getDevice()
        if dev not in self._props:
            attrs = self.xp.cuda.Device(dev).attributes
            self._props[dev] = (attrs["MultiProcessorCount"], attrs["MaxSharedMemoryPerBlockOptin"])
        return self._props[dev]

    def _kernel(self, file_name: str, ctype: str, expr: str, variant=PLAIN):
        """The compiled kernel ``expr`` of ``file_name`` for ``ctype``, an instance of ``variant``.

        The instances of one (file, type, variant) are compiled together, once."""
        kern = self._kernels.get(expr)
        if kern is not None:
            return kern
        key = (file_name, ctype, variant)
        module = self._modules.get(key)
        if module is None:
            cupy = self.xp
            options = ("--std=c++17",) + tuple(f"-I{d}" for d in _cuda_include_dirs(cupy))
            module = cupy.RawModule(
                code=kernel_source(file_name),
                options=options,
                name_expressions=name_expressions(ctype, variant)[file_name],
            )
            self._modules[key] = module
        kern = module.get_function(expr)
        if file_name == "rows.cu":
            # Allow the row kernels all the dynamic shared memory the device offers.
            kern.max_dynamic_shared_size_bytes = self._device()[1] - 1024
        self._kernels[expr] = kern
        return kern

    # -- helpers -------------------------------------------------------------
    def _types(self, x3):
        """(CUDA type, statistics dtype, statistics scalar type) for x3's dtype."""
        found = self._type_cache.get(x3.dtype)
        if found is None:
            dt = np.dtype(x3.dtype)
            ctype = CUDA_TYPES.get(dt.name)
            if ctype is None:
                raise TypeError(f"x: the cupy backend has no kernels for dtype {dt}; expected one of "
                                + ", ".join(str(d) for d in self.supported_dtypes()))
            sd = stats_dtype(dt)
            found = self._type_cache[x3.dtype] = (ctype, sd, sd.type)
        return found

    def _vec(self, p: Problem, ctype: str, *arrays) -> int:
        """16-byte vector width usable for ``p``, else 1."""
        v = VEC_WIDTH[ctype]
        if any(a.data.ptr % 16 for a in arrays):
            return 1
        if p.layout == CHANNELS_FIRST:
            ok = p.s % v == 0
        else:
            ok = p.c % v == 0 and (p.cross_sample or (p.c // p.groups) % v == 0)
        return v if ok else 1

    def _elementwise_grid(self, nvec: int) -> int:
        return max(1, min(_cdiv(nvec, THREADS), self._device()[0] * 16))

    def _empty(self, shape, sd):
        return self.xp.empty(shape, dtype=sd)

    def _dest(self, out, x3, V: int):
        """Where a kernel of vector width ``V`` writes its result: ``out``, a new array
        when ``out`` is None, or scratch when ``out`` cannot take ``V``-wide stores
        (not 16-byte aligned while the inputs are); :meth:`_deliver` then copies it."""
        if out is None or (V > 1 and out.data.ptr % 16):
            return self.xp.empty_like(x3)
        return out

    @staticmethod
    def _deliver(y, out):
        """The result: ``y``, or ``out`` with y copied into it when they differ (see :meth:`_dest`)."""
        if out is None or y is out:
            return y
        out[...] = y
        return out

    # -- cross-sample reductions ---------------------------------------------
    def _channel_reduce(self, x3, p: Problem, eps=None, weight=None):
        """Per-channel (mean, var, rstd, scale); rstd/scale are None unless asked for."""
        ctype, sd, A = self._types(x3)
        V = self._vec(p, ctype, x3)
        n, c, s = p.n, p.c, p.s
        if p.layout == CHANNELS_FIRST:
            sv = s // V
            length = n * sv
            chunk, nch = _chunking(length, c, THREADS)
            pn, pm, pq = (self._empty(c * nch, np.float64) for _ in range(3))
            self._kernel("reduce.cu", ctype, instance("seg_stats_partial", ctype, V, False))(
                (c * nch,), (THREADS,),
                (x3, x3, x3, np.int64(c), np.int64(0), np.int64(sv), np.int64(sv), np.int64(c * sv), np.int64(length),
                 np.int64(chunk), np.int32(nch), pn, pm, pq))
            seg_stride, chunk_stride = nch, 1
        else:
            rows, cv = n * s, c // V
            tx, ncol, chunk, nch = _column_blocks(rows, cv)
            pn, pm, pq = (self._empty(nch * c, np.float64) for _ in range(3))
            self._kernel("reduce.cu", ctype, f"col_stats_partial<{ctype}, {V}>")(
                (nch * ncol,), (THREADS,),
                (x3, np.int64(rows), np.int64(cv), np.int32(tx), np.int64(chunk), np.int32(ncol), pn, pm, pq))
            seg_stride, chunk_stride = 1, c
        mean, var = self._empty(c, sd), self._empty(c, sd)
        rstd = self._empty(c, sd) if eps is not None else None
        scale = self._empty(c, sd) if weight is not None else None
        flags = (1 if eps is not None else 0) | (2 if weight is not None else 0)
        self._kernel("reduce.cu", ctype, f"stats_finalize<{'double' if ctype == 'double' else 'float'}>")(
            (_cdiv(c, THREADS // 32),), (THREADS,),
            (pn, pm, pq, np.int64(c), np.int32(nch), np.int64(seg_stride), np.int64(chunk_stride),
             np.float64(eps if eps is not None else 0.0), np.int32(flags), mean, var,
             rstd if rstd is not None else mean, weight if weight is not None else mean,
             scale if scale is not None else mean))
        return mean, var, rstd, scale

    def _grad_sums(self, dy3, x3, p: Problem, mean, rstd, inv_count=None, act=0, weight=None, bias=None):
        """Per-channel (Σ g, Σ g·xhat[, their means]); statistics per channel or per (n, g).

        ``g = dy·act'(z)`` for an activation code ``act`` (then ``weight`` and
        ``bias`` are given), else dy; with ``p.rms`` xhat = x·rstd (mean not read)."""
        ctype, sd, A = self._types(x3)
        V = self._vec(p, ctype, x3, dy3)
        n, c, s, G = p.n, p.c, p.s, p.groups
        cg = c // G if G else 1
        w, b = (weight, bias) if act else (mean, mean)  # (not read without an activation)
        variant = (act, False, False)
        if p.layout == CHANNELS_FIRST:
            sv = s // V
            chunk, nch = _chunking(n * sv, c, THREADS)
            p1, p2 = self._empty(c * nch, sd), self._empty(c * nch, sd)
            self._kernel("reduce.cu", ctype, instance("seg_grad_partial", ctype, V, act), variant)(
                (c * nch,), (THREADS,),
                (dy3, x3, mean, rstd, w, b, np.int64(c), np.int64(sv), np.int64(n), np.int32(G), np.int32(cg),
                 np.int32(p.rms), np.int64(chunk), np.int32(nch), p1, p2))
            seg_stride, chunk_stride = nch, 1
        else:
            rows, cv = n * s, c // V
            tx, ncol, chunk, nch = _column_blocks(rows, cv)
            p1, p2 = self._empty(nch * c, sd), self._empty(nch * c, sd)
            self._kernel("reduce.cu", ctype, instance("col_grad_partial", ctype, V, act), variant)(
                (nch * ncol,), (THREADS,),
                (dy3, x3, mean, rstd, w, b, np.int64(rows), np.int64(s), np.int64(cv), np.int32(G), np.int32(cg),
                 np.int32(p.rms), np.int32(tx), np.int64(chunk), np.int32(ncol), p1, p2))
            seg_stride, chunk_stride = 1, c
        s1, s2 = self._empty(c, sd), self._empty(c, sd)
        m1 = self._empty(c, sd) if inv_count is not None else s1
        m2 = self._empty(c, sd) if inv_count is not None else s2
        self._kernel("reduce.cu", ctype, f"grad_finalize<{'double' if ctype == 'double' else 'float'}>")(
            (_cdiv(c, THREADS // 32),), (THREADS,),
            (p1, p2, np.int64(c), np.int32(nch), np.int64(seg_stride), np.int64(chunk_stride),
             A(inv_count if inv_count is not None else 0.0), np.int32(1 if inv_count is not None else 0),
             s1, s2, m1, m2))
        return s1, s2, m1, m2

    def _affine(self, x3, p: Problem, mean, k, b, out=None, act=0):
        """y = act((x - mean[c]) * k[c] + b[c]) (mean None: 0), channel c of the layout; into ``out`` if given.

        Elementwise, so the vector width does not change a value: an
        unaligned ``out`` takes the scalar kernel rather than scratch."""
        ctype, sd, A = self._types(x3)
        cross = Problem(p.layout, p.n, p.c, p.s)
        V = self._vec(cross, ctype, x3) if out is None else self._vec(cross, ctype, x3, out)
        y = self.xp.empty_like(x3) if out is None else out
        nvec = x3.size // V
        cl = p.layout != CHANNELS_FIRST
        self._kernel("elementwise.cu", ctype, instance("affine", ctype, V, cl, act), (act, False, False))(
            (self._elementwise_grid(nvec),), (THREADS,),
            (x3, y, mean if mean is not None else k, k, b, np.int32(mean is not None), np.int64(nvec),
             np.int64(p.s), np.int64(p.c)))
        return y

    def _bn_apply(self, dy3, x3, p: Problem, mean, rstd, weight, mdy, mdx, out=None, act=0, bias=None):
        """dx = weight·rstd·(g − mdy − xhat·mdx) per channel, g = dy·act'(z) (``bn_backward_apply``).

        Elementwise: an unaligned ``out`` takes the scalar kernel (the same values)."""
        ctype, sd, A = self._types(x3)
        cross = Problem(p.layout, p.n, p.c, p.s)
        V = self._vec(cross, ctype, x3, dy3) if out is None else self._vec(cross, ctype, x3, dy3, out)
        dx = self.xp.empty_like(x3) if out is None else out
        nvec = x3.size // V
        cl = p.layout != CHANNELS_FIRST
        self._kernel("elementwise.cu", ctype, instance("bn_backward_apply", ctype, V, cl, act), (act, False, False))(
            (self._elementwise_grid(nvec),), (THREADS,),
            (dy3, x3, dx, mean, rstd, weight, bias if act else weight, mdy, mdx, np.int64(nvec), np.int64(p.s),
             np.int64(p.c)))
        return dx

    # -- per-sample rows -----------------------------------------------------
    def _row_plan(self, p: Problem, V: int, itemsize: int, buffers: int):
        """Launch shape for one row per `tpr` threads with `buffers` staged arrays.

        Returns ``(tpr, rows_per_block, staged)`` where ``staged`` is how many
        of the buffers fit in shared memory (0 when even one does not), or
        None when the rows should be split over blocks instead.
        """
        sms, optin = self._device()
        limit = optin // 2  # leave room for a second resident block
        nrows = p.n * p.groups
        mv = (p.c // p.groups) * p.s // V
        row_bytes = mv * V * itemsize
        tpr = min(512, max(32, _pow2floor(mv // 4)))
        for staged in range(buffers, -1, -1):
            rpb = max(1, THREADS // tpr)
            while rpb > 1 and rpb * staged * row_bytes > limit:
                rpb //= 2
            if rpb * staged * row_bytes <= limit:
                if staged == 0 and buffers == 1:
                    return None
                if nrows < sms and mv >= 4096 and buffers == 1:
                    return None
                return tpr, rpb, staged
        return None

    def _regs_plan(self, p: Problem, V: int, ctype: str, items_set, own_block: bool, *params):
        """Launch of a rows_regs.cu kernel for ``p``, or None when its rows do not fit one.

        Returns ``(items, mode, tpr_shift, block)``: ``2**tpr_shift`` threads
        per row (at most 512), each holding ``items`` vectors (at most
        ``items_set[-1]``), ``block`` threads per block: four rows of one
        warp, else ``max(tpr, 128)``, or with ``own_block`` (forward: its
        overflow rescue has a barrier on a row-dependent branch) one row.
        The default ``row_items = 8`` was the fastest or tied in the H200
        variants table of bench/gpu_results_h200.md; backward, which holds
        x and dy, aims at ``min(row_items, 4)``. Needs 16-byte vectors, 32-bit
        offsets, and 16-byte aligned ``params`` (weight, bias) where they are
        read as vectors (modes 0 and 2). RMSNorm's rows (and the fused add's,
        which :func:`_row_problem` makes channels-last) are instantiated for
        mode 0 only: S == 1, channels-last.
        """
        if not self.row_registers or V != VEC_WIDTH[ctype] or V == 1:
            return None
        n, c, s, G = p.n, p.c, p.s, p.groups
        nrows, cg = n * G, c // G
        if nrows >= 2**31 or c * s >= 2**31:
            return None
        mv = cg * s // V
        if p.layout == CHANNELS_FIRST:
            mode = 1
        else:
            mode = 0 if s == 1 else 2
            if any(a.data.ptr % 16 for a in params):
                return None
        if p.rms and mode != 0:
            return None  # (outside the contract: RMSNorm's rows have S == 1) rows.cu takes them
        target = max(1, min(int(self.row_items), items_set[-1]))
        tpr = min(512, max(32, _pow2ceil(_cdiv(mv, target))))
        items = next((i for i in items_set if i * tpr >= mv), None)
        if items is None:
            return None
        shift = tpr.bit_length() - 1
        return items, mode, shift, (tpr if own_block and tpr > 32 else max(tpr, 128))

    def _rows_forward_split(self, x3, p: Problem, weight, bias, eps, ctype, sd, A, V, y, act=0, r3=None, h=None):
        """Per-sample forward with each row split over blocks (two reads of x), into ``y``.

        With ``r3`` (the fused add) the first sweep reads x and r and writes h
        = x + r into ``h``; the second reads h. Returns (mean, var, rstd)."""
        n, c, s, G = p.n, p.c, p.s, p.groups
        cg, nrows = c // G, n * G
        mv = cg * s // V
        add = r3 is not None
        if p.layout == CHANNELS_FIRST:
            seg = (1, mv, 0, mv, 0)  # contiguous rows
        else:
            cv, cgv = c // V, cg // V
            seg = (G, s * cv, cgv, cgv, cv)
        chunk, nch = _chunking(mv, nrows, THREADS)
        pn, pm, pq = (self._empty(nrows * nch, np.float64) for _ in range(3))
        self._kernel("reduce.cu", ctype, instance("seg_stats_partial", ctype, V, add), (0, False, add))(
            (nrows * nch,), (THREADS,),
            (x3, r3 if add else x3, h if add else x3, *(np.int64(v) for v in seg), np.int64(mv), np.int64(chunk),
             np.int32(nch), pn, pm, pq))
        mean, var, rstd = (self._empty((n, G), sd) for _ in range(3))
        flags = 1 | (4 if p.rms else 0)  # rstd; RMSNorm's mean square (mean stored as 0)
        self._kernel("reduce.cu", ctype, f"stats_finalize<{'double' if ctype == 'double' else 'float'}>")(
            (_cdiv(nrows, THREADS // 32),), (THREADS,),
            (pn, pm, pq, np.int64(nrows), np.int32(nch), np.int64(nch), np.int64(1), np.float64(eps),
             np.int32(flags), mean, var, rstd, mean, mean))
        cl = p.layout != CHANNELS_FIRST
        self._kernel("rows.cu", ctype, instance("row_apply", ctype, V, cl, act), (act, False, False))(
            (nrows * nch,), (THREADS,),
            (h if add else x3, y, weight, bias, mean, rstd, np.int32(G), np.int32(cg), np.int64(s), np.int64(c),
             np.int64(chunk), np.int32(nch)))
        return mean, var, rstd

    def _rows_forward(self, x3, p: Problem, weight, bias, eps, out, act, r3=None, h_out=None):
        """Per-sample forward (row kernels), with the residual add when ``r3`` is given.

        Returns ``(y3, h3, mean, var, rstd)``, h3 None without ``r3``."""
        ctype, sd, A = self._types(x3)
        add = r3 is not None
        V = self._vec(p, ctype, x3, r3) if add else self._vec(p, ctype, x3)
        n, c, s, G = p.n, p.c, p.s, p.groups
        nrows, cg = n * G, c // G
        mv = cg * s // V
        # Few long rows leave most of the device idle with one row per block: split them.
        few = nrows < self._device()[0] and mv >= 4096
        regs = None if few else self._regs_plan(p, V, ctype, REG_ITEMS_FWD, True, weight, bias)
        plan = None if regs is not None else self._row_plan(p, V, x3.itemsize, 1)
        y = self._dest(out, x3, V)
        h = self._dest(h_out, x3, V) if add else None
        if regs is None and plan is None:
            mean, var, rstd = self._rows_forward_split(x3, p, weight, bias, eps, ctype, sd, A, V, y, act, r3, h)
        else:
            mean, var, rstd = (self._empty((n, G), sd) for _ in range(3))
            variant = (act, p.rms, add)
            rp, hp = (r3, h) if add else (x3, y)  # (not accessed without the add)
            if regs is not None:
                items, mode, shift, block = regs
                expr = instance("row_forward_regs", ctype, V, items, mode, act, p.rms, add)
                self._kernel("rows_regs.cu", ctype, expr, variant)(
                    (_cdiv(nrows, block >> shift),), (block,),
                    (x3, rp, hp, y, weight, bias, np.uint32(nrows), np.uint32(G), np.uint32(cg), np.uint32(s),
                     np.uint32(c), np.uint32(mv), np.int32(shift), A(eps), mean, var, rstd))
            else:
                tpr, rpb, _ = plan
                expr = instance("row_forward", ctype, V, p.layout != CHANNELS_FIRST, act, p.rms, add)
                self._kernel("rows.cu", ctype, expr, variant)(
                    (_cdiv(nrows, rpb),), (tpr * rpb,),
                    (x3, rp, hp, y, weight, bias, np.int64(nrows), np.int32(G), np.int32(cg), np.int64(s),
                     np.int64(c), np.int32(tpr), A(eps), mean, var, rstd),
                    shared_mem=rpb * mv * V * x3.itemsize)
        return self._deliver(y, out), (self._deliver(h, h_out) if add else None), mean, var, rstd

    def _rows_backward(self, dy3, x3, p: Problem, mean, rstd, weight, out, act, bias, dh3=None):
        """Per-sample backward (row kernels); with ``dh3`` (the fused add) dx = dh + the norm's dx.

        Returns ``(dx3, dweight, dbias)``."""
        ctype, sd, A = self._types(x3)
        add = dh3 is not None
        V = self._vec(p, ctype, x3, dy3, dh3) if add else self._vec(p, ctype, x3, dy3)
        n, c, s, G = p.n, p.c, p.s, p.groups
        nrows, cg = n * G, c // G
        mv = cg * s // V
        # dweight/dbias first: they read dy and x, which dx may replace (out is dy3, x3 or dh3).
        s1, s2, _, _ = self._grad_sums(dy3, x3, p, mean, rstd, None, act, weight, bias)
        dx = self._dest(out, x3, V)
        variant = (act, p.rms, add)
        dhp = dh3 if add else dy3  # (not accessed without the add)
        bp = bias if act else weight  # (not accessed without an activation)
        regs = self._regs_plan(p, V, ctype, REG_ITEMS_BWD, False, weight, *((bias,) if act else ()))
        if regs is not None:
            items, mode, shift, block = regs
            expr = instance("row_backward_regs", ctype, V, items, mode, act, p.rms, add)
            self._kernel("rows_regs.cu", ctype, expr, variant)(
                (_cdiv(nrows, block >> shift),), (block,),
                (dy3, x3, dhp, dx, weight, bp, mean, rstd, np.uint32(nrows), np.uint32(G), np.uint32(cg),
                 np.uint32(s), np.uint32(c), np.uint32(mv), np.int32(shift)))
        else:
            tpr, rpb, staged = self._row_plan(p, V, x3.itemsize, 2)
            expr = instance("row_backward", ctype, V, p.layout != CHANNELS_FIRST, act, p.rms, add)
            self._kernel("rows.cu", ctype, expr, variant)(
                (_cdiv(nrows, rpb),), (tpr * rpb,),
                (dy3, x3, dhp, dx, weight, bp, mean, rstd, np.int64(nrows), np.int32(G), np.int32(cg),
                 np.int64(s), np.int64(c), np.int32(tpr), np.int32(staged)),
                shared_mem=rpb * staged * mv * V * x3.itemsize)
        return self._deliver(dx, out), s2, s1

    @staticmethod
    def _act_code(act) -> int:
        """The ACT template argument for activation ``act`` (None, "relu" or "silu")."""
        code = ACT_CODES.get(act)
        if code is None:
            raise ValueError(f"act: expected None, 'relu' or 'silu', got {act!r}")
        return code

    def _act_bias(self, act: int, bias, weight):
        """The bias an activation's backward reads (zeros when not given); None without one."""
        if not act:
            return None
        return self.xp.zeros_like(weight) if bias is None else bias

    # -- the Backend interface -----------------------------------------------
    #
    # In place (out is x3, or dy3/x3 in a backward; the fused add's y and h
    # over x3 or r3, its dx over dy3, dh3 or h3): each path writes an output
    # element only after every read of the input values there.
    # * affine (cross-sample forward after _channel_reduce's launches;
    #   forward_eval; backward_eval's dx after channel_grad_sums' launches):
    #   a thread loads vector v of x (dy), then stores vector v of y from those
    #   registers; no thread reads a vector another one writes. Safe.
    # * bn_backward_apply (cross-sample backward after _grad_sums' launches,
    #   SyncBatchNorm's dx after its all-reduce, backward_eval with an
    #   activation after its _grad_sums): loads dy[v] and x[v], then
    #   stores dx[v], in the same thread. Safe over dy or x.
    # * row_forward (rows.cu): a row (one per tpr threads, rows disjoint)
    #   is staged in shared memory in full before wf_group_reduce's barrier;
    #   y is written from shared memory after it. With the add, the thread
    #   that loads x[v] and r[v] stores h[v] right after, from those registers,
    #   and stages h; nothing reads x or r at v again. Safe over x or r.
    # * row_forward_regs, row_backward_regs (rows_regs.cu): every load of the
    #   row into registers (x, and r for the add; dy, x, and dh for the add's
    #   backward) comes before row_sum/row_sum2 (which every thread of the row
    #   must reach); h is stored after those loads, y and dx after the sums,
    #   from the registers. Safe over any input.
    # * split rows (_rows_forward_split): seg_stats_partial (which with the add
    #   loads x[v], r[v] and then stores h[v] in the same thread) and
    #   stats_finalize are complete before row_apply is launched, which loads
    #   x[v] (h[v] with the add: h is never y) and stores y[v] in the same
    #   thread. Safe.
    # * row_backward (rows.cu), staging 2, 1 or 0 arrays: the sums read the
    #   whole row before sum2_group_reduce's barrier; after it a thread
    #   re-reads (from shared memory, or from device memory for what was not
    #   staged) only the vectors it read itself, reads dh[v] (the add), and
    #   stores dx there after reading them; no other thread touches them.
    #   Safe over dy, x or dh.
    # * One path was not, in its launcher: the per-sample backward launched
    #   the dweight/dbias sums over dy and x (_grad_sums) after the row kernel
    #   had written dx, so over dy or x they would have summed dx. They are
    #   launched first now (same values: they do not depend on dx); so in
    #   _rows_backward, for the add's backward too.
    # * Scratch (_dest: an out not 16-byte aligned while the inputs are) is a
    #   new array, copied into out after the kernels; such an out is never an
    #   input (an input that is out has out's alignment, and takes V == 1).
    # The kernels declare x, dy const __restrict__ and y, dx __restrict__,
    # which in place is formally outside restrict's promise. What it lets the
    # compiler do (read-only-cache loads, moving independent accesses) cannot
    # change a result here: each store's value depends on the loads of its own
    # element, and no element is loaded after any thread stored to it.
    def forward_train(self, x3, p, weight, bias, eps, out=None, act=None):
        act = self._act_code(act)
        if p.cross_sample:
            if p.rms:
                raise NotImplementedError("cupy backend: RMS statistics are for per-sample problems only")
            mean, var, rstd, scale = self._channel_reduce(x3, p, eps=eps, weight=weight)
            return self._affine(x3, p, mean, scale, bias, out, act), mean, var, rstd
        y, _, mean, var, rstd = self._rows_forward(x3, p, weight, bias, eps, out, act)
        return y, mean, var, rstd

    def forward_eval(self, x3, p, scale, shift, out=None, act=None):
        act = self._act_code(act)
        return self._affine(x3, p, None, scale, shift, out, act)

    def backward_train(self, dy3, x3, p, mean, rstd, weight, out=None, act=None, bias=None):
        act = self._act_code(act)
        bias = self._act_bias(act, bias, weight)
        if p.cross_sample:
            if p.rms:
                raise NotImplementedError("cupy backend: RMS statistics are for per-sample problems only")
            count = p.n * p.s
            s1, s2, m1, m2 = self._grad_sums(dy3, x3, p, mean, rstd, 1.0 / count, act, weight, bias)
            dx = self._bn_apply(dy3, x3, p, mean, rstd, weight, m1, m2, out, act, bias)
            return dx, s2, s1
        return self._rows_backward(dy3, x3, p, mean, rstd, weight, out, act, bias)

    def backward_eval(self, dy3, x3, p, mean, rstd, weight, out=None, act=None, bias=None):
        if act is None:
            return super().backward_eval(dy3, x3, p, mean, rstd, weight, out)
        act = self._act_code(act)
        bias = self._act_bias(act, bias, weight)
        cross = Problem(p.layout, p.n, p.c, p.s)
        # The sums first (they read dy and x, which dx may replace), then dx = g·weight·rstd:
        # bn_backward_apply with zero means. z = (x − mean)·(rstd·weight) + bias, from the folded
        # statistics (forward_eval formed x·scale + shift: equal up to rounding).
        s1, s2, _, _ = self._grad_sums(dy3, x3, cross, mean, rstd, None, act, weight, bias)
        zero = self.xp.zeros_like(weight)
        dx = self._bn_apply(dy3, x3, cross, mean, rstd, weight, zero, zero, out, act, bias)
        return dx, s2, s1

    def add_forward(self, x3, r3, p, weight, bias, eps, out=None, h_out=None):
        """One sweep for rows (S == 1): ``row_forward_regs``/``row_forward`` with ADD, or
        ``seg_stats_partial`` with ADD then ``row_apply`` on h for split rows."""
        if p.cross_sample or p.s != 1:
            return super().add_forward(x3, r3, p, weight, bias, eps, out, h_out)
        return self._rows_forward(x3, _row_problem(p), weight, bias, eps, out, 0, r3, h_out)

    def add_backward(self, dy3, dh3, h3, p, mean, rstd, weight, out=None):
        """The dweight/dbias sums, then one sweep for rows (S == 1): ``row_backward_regs`` or
        ``row_backward`` with ADD, dx = dh + the norm's dx."""
        if p.cross_sample or p.s != 1:
            return super().add_backward(dy3, dh3, h3, p, mean, rstd, weight, out)
        return self._rows_backward(dy3, h3, _row_problem(p), mean, rstd, weight, out, 0, None, dh3)

    def channel_stats(self, x3, p):
        mean, var, _, _ = self._channel_reduce(x3, p)
        return mean, var

    def channel_grad_sums(self, dy3, x3, p, mean, rstd):
        cross = Problem(p.layout, p.n, p.c, p.s)
        s1, s2, _, _ = self._grad_sums(dy3, x3, cross, mean, rstd)
        return s1, s2

    def channel_backward_apply(self, dy3, x3, p, mean, rstd, weight, mean_dy, mean_dy_xhat, out=None):
        return self._bn_apply(dy3, x3, p, mean, rstd, weight, mean_dy, mean_dy_xhat, out)
