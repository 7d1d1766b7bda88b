"""``python -m cnorm bench``: cnorm's backends against PyTorch and the memory floor.

For every case (norm, direction, shape, layout) each backend is timed through
the public functional API at one thread count, in two variants: "plain", the
call allocating its output as a NumPy user's plain loop does, and "out", the
same call writing into a caller's buffer reused across calls (cnorm's
``out=``; PyTorch's ``aten::*.out`` overload of the op where one exists,
its plain call where none does). The report gives each median time, cnorm's
out speed-up (plain / out), its ratio to PyTorch's (plain against plain, out
against out), and the fraction of the memory floor the out calls reach. The
NumPy backend is the reference: plain calls only. The floor is the time to
move the bytes a fused kernel must move —
2 x bytes(x) for a forward (read x, write y), 3 x bytes(x) for a backward
(read x and dy, write dx), with bytes(x) counted in x's own dtype (half for
float16 and bfloat16 rows) — at the copy bandwidth measured in the same run:
each case times, as one more call in its interleaved rounds, a copy of its
own input (the same rotating copies, all threads, streaming stores), so the
floor sees the same memory, sizes and share of a shared machine's bandwidth
as the case (one copy at the start moved between 23 and 40 GB/s from run to
run). Inputs rotate among enough copies that the last-level cache cannot hold
them between calls; each out variant writes one buffer reused by every call,
as in a user's loop, touched once before timing (``--out-buffers per-copy``:
one per input copy, as cold as the input when a call reaches it).
Every timed call, plain and out, is checked against the NumPy reference
first.

The allocator runs with glibc's default policy, as in a user's process: an
output above glibc's mmap threshold (adaptive, at most 32 MiB on 64-bit) is
a fresh mapping whose pages the kernel zero-fills on first touch, a cost the
plain calls pay and the out calls do not. A smaller output reuses the block
the previous call freed, without page faults and often still in cache, and
so does a larger one wherever the process's heap has a free region that
fits it (left by earlier cases' arrays): in one process, a case's plain
times depend on the cases before it. So each case runs in a fresh process
(``--no-isolate``: all in this one; ``--quick`` does that); every result
records its minor page faults per call. ``--keep-freed-memory`` makes glibc
keep freed memory instead (mallopt), as a caching allocator would;
the report and bench.json say which policy was in force.

Fused cases (RMSNorm, the residual add fused into LayerNorm/RMSNorm, a norm
with a fused ReLU/SiLU) also time "unfused": the same job with cnorm's own
plain calls and NumPy around them (``h = x + r`` then the norm; the norm then
the activation in place; backward: the activation's gradient in NumPy, then
the norm's backward; the add's gradient ``dx = dh + dx_norm``), and for an
RMSNorm row, cnorm's LayerNorm on the same shape (which RMSNorm must not be
slower than); PyTorch runs the same job eagerly (``x + r`` then the norm,
``F.relu(F.batch_norm(...))``, ``F.rms_norm``). Their floors count every
array moved once: add forward 4 x bytes(x) (x, r in; y, h out), add backward
4 x (dy, dh, h in; dx out).

Each case is checked for signs that its numbers cannot be trusted (an
unsteady copy bandwidth across its rounds, a result faster than the floor,
an oversubscribed machine: :mod:`cnorm._bench_report`), and the report marks
the cases that fail with the likely cause and the remedy. OpenMP's idle
threads sleep (``OMP_WAIT_POLICY=PASSIVE``, set before the runtimes start)
unless the user set the policy; a counter on stderr shows the progress
(``--quiet``: none).

The same cases drive the pytest-benchmark suite in ``bench/``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import _bench_report as _report

EPS = 1e-5


@dataclass(frozen=True)
class Case:
    """One benchmark case: a norm, a direction, a shape and a memory layout.

    ``shape`` is the logical NCHW-style shape for channels-first and the
    NHWC-style array shape for channels-last (as users pass it).
    """

    norm: str                 # batch_norm | layer_norm | group_norm | instance_norm
    direction: str            # fwd | bwd
    shape: tuple
    layout: str = "cf"        # cf | cl
    training: bool = True     # BatchNorm eval mode when False
    groups: int = 0           # GroupNorm's G
    latency: bool = False     # a per-call latency case: no floor
    dtype: str = "float32"    # float32 | bfloat16 | float16 (x, y, dy, dx; parameters stay float32)
    fuse: str = ""            # "" | "relu" | "silu" (fused activation) | "add" (fused residual add)

    @property
    def name(self) -> str:
        """Human id used as the pytest-benchmark group and the report row."""
        mode = "" if self.training else "-eval"
        g = f"-G{self.groups}" if self.groups else ""
        dt = "" if self.dtype == "float32" else f"-{self.dtype}"
        norm = (f"add+{self.norm}" if self.fuse == "add" else
                f"{self.norm}+{self.fuse}" if self.fuse else self.norm)
        return f"{norm}{mode}{g}-{self.direction}-{'x'.join(map(str, self.shape))}-{self.layout}{dt}"

    @property
    def has_baseline(self) -> bool:
        """Whether the case times the "unfused" runner (see the module docstring)."""
        return bool(self.fuse) or self.norm == "rms_norm"

    @property
    def row_norm(self) -> bool:
        """LayerNorm or RMSNorm: parameters over the last axis."""
        return self.norm in ("layer_norm", "rms_norm")

    @property
    def np_dtype(self) -> np.dtype:
        from ._dtypes import BFLOAT16

        return BFLOAT16 if self.dtype == "bfloat16" else np.dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.np_dtype.itemsize

    @property
    def floor_factor(self) -> int:
        """Bytes moved by a fused kernel, in units of bytes(x)."""
        if self.fuse == "add":
            return 4
        return 2 if self.direction == "fwd" else 3

    @property
    def channel_axis(self) -> int:
        return -1 if self.layout == "cl" else 1


def _pair(norm, shape, layout="cf", **kw):
    return [Case(norm, d, shape, layout, **kw) for d in ("fwd", "bwd")]


def issue_cases() -> list[Case]:
    """The core cases: the ResNet and transformer shapes the comparison is built on (float32)."""
    return [
        *_pair("batch_norm", (32, 64, 56, 56)),
        *_pair("batch_norm", (32, 56, 56, 64), "cl"),
        *_pair("batch_norm", (32, 64, 56, 56), training=False),
        *_pair("batch_norm", (4096, 1024)),
        *_pair("layer_norm", (8192, 768)),
        *_pair("layer_norm", (2048, 4096)),
        *_pair("group_norm", (16, 256, 32, 32), groups=32),
        *_pair("group_norm", (16, 32, 32, 256), "cl", groups=32),
        *_pair("instance_norm", (16, 64, 128, 128)),
        Case("layer_norm", "fwd", (32, 64), latency=True),
    ]


def fused_cases() -> list[Case]:
    """RMSNorm and the fused forms (float32; their bfloat16 rows come from :func:`half_cases`)."""
    return [
        *_pair("rms_norm", (8192, 768)),
        *_pair("rms_norm", (2048, 4096)),
        *_pair("rms_norm", (8192, 768), fuse="add"),
        *_pair("layer_norm", (8192, 768), fuse="add"),
        *_pair("batch_norm", (32, 64, 56, 56), fuse="relu"),
        *_pair("group_norm", (16, 256, 32, 32), groups=32, fuse="silu"),
    ]


def quick_fused_cases() -> list[Case]:
    """Smaller fused cases for the quick run."""
    return [
        *_pair("rms_norm", (1024, 768)),
        *_pair("rms_norm", (1024, 768), fuse="add"),
        *_pair("layer_norm", (1024, 768), fuse="add"),
        *_pair("batch_norm", (8, 32, 28, 28), fuse="relu"),
        *_pair("group_norm", (4, 64, 16, 16), groups=8, fuse="silu"),
    ]


def half_cases(dtypes=("bfloat16", "float16"), quick: bool = False) -> list[Case]:
    """The same cases with half-precision data: float32 statistics and parameters."""
    from dataclasses import replace

    base = (quick_cases() + quick_fused_cases()) if quick else (issue_cases() + fused_cases())
    # the fused rows in bfloat16 only (the half type of today's models)
    return [replace(c, dtype=dt) for dt in dtypes for c in base
            if not c.latency and (not c.has_baseline or dt == "bfloat16")]


def quick_cases() -> list[Case]:
    """Smaller versions of every kernel path, for a CI smoke run."""
    return [
        *_pair("batch_norm", (8, 32, 28, 28)),
        *_pair("batch_norm", (8, 28, 28, 32), "cl"),
        Case("batch_norm", "fwd", (8, 32, 28, 28), training=False),
        *_pair("batch_norm", (512, 256)),
        *_pair("layer_norm", (1024, 768)),
        *_pair("group_norm", (4, 64, 16, 16), groups=8),
        *_pair("group_norm", (4, 16, 16, 64), "cl", groups=8),
        *_pair("instance_norm", (4, 16, 64, 64)),
        Case("layer_norm", "fwd", (32, 64), latency=True),
    ]


# -- inputs and calls ------------------------------------------------------------

@dataclass
class Inputs:
    """Rotating copies of x and dy plus the parameters of one case."""

    xs: list
    dys: list
    weight: np.ndarray
    bias: np.ndarray
    running_mean: np.ndarray | None = None
    running_var: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    cursor: int = 0

    def next(self) -> int:
        """The copy for the next call of any runner: one rotation shared by all of
        them, so a copy is used again only after every other copy (over twice
        the last-level cache) went through - cold for every backend alike. (Per-
        runner rotations let one backend's call find the copy another backend
        had just read still in cache.)"""
        self.cursor = (self.cursor + 1) % len(self.xs)
        return self.cursor


# Most bytes of input copies one case may hold (x and dy of every copy).
COPIES_BYTES = 2 << 30


def n_copies(case: Case, llc_bytes: int) -> int:
    """Copies so that one rotation (x and dy) moves over twice the LLC, whatever its
    size: a fixed cap (once 16 copies) let a 300 MB LLC hold the whole rotation,
    so that inputs and the floor's copy came from the cache, not memory."""
    if case.latency:
        return 4
    per = case.nbytes * (2 if case.direction == "bwd" else 1)
    return max(2, min(COPIES_BYTES // per, math.ceil(2 * llc_bytes / per) + 1))


def make_inputs(case: Case, copies: int, seed: int = 0) -> Inputs:
    rng = np.random.default_rng(seed)
    c = case.shape[-1] if (case.layout == "cl" or case.row_norm) else case.shape[1]
    dt = case.np_dtype
    # copies of one draw: a rotation over twice a large LLC takes dozens of them, and
    # the caches see distinct addresses whatever the values
    x = (rng.standard_normal(case.shape, dtype=np.float32) * 2 + 1).astype(dt)
    xs = [x] + [x.copy() for _ in range(copies - 1)]
    dy = rng.standard_normal(case.shape, dtype=np.float32).astype(dt) if case.direction == "bwd" else None
    dys = [dy] + [dy.copy() for _ in range(copies - 1)] if dy is not None else []
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    inp = Inputs(xs, dys, w, b)
    if case.fuse == "add":  # residuals rotate with x; a backward's dh with dy
        r = rng.standard_normal(case.shape, dtype=np.float32).astype(dt)
        inp.extra["rs"] = [r] + [r.copy() for _ in range(copies - 1)]
        if case.direction == "bwd":
            dh = rng.standard_normal(case.shape, dtype=np.float32).astype(dt)
            inp.extra["dhs"] = [dh] + [dh.copy() for _ in range(copies - 1)]
    if case.norm == "batch_norm" and not case.training:
        inp.running_mean = rng.standard_normal(c).astype(np.float32)
        inp.running_var = rng.uniform(0.5, 2.0, c).astype(np.float32)
    return inp


def _cnorm_forward(case: Case, inp: Inputs, x, backend, saved: bool = True, out=None, r=None, h_out=None):
    """``(y, saved)`` from the ``*_forward`` API; with ``saved=False`` the plain
    call (``cnorm.layer_norm`` ...) and ``(y, None)``: what a forward-only
    (inference) caller runs, as PyTorch does without autograd. ``out``: the
    buffer y is written into (``out=``), else a new array. A fused add
    (``r``: the residual) returns ``((y, h), saved)``, h into ``h_out``."""
    import cnorm

    if case.fuse == "add":
        fn = getattr(cnorm, f"add_{case.norm}_forward")
        args = (inp.weight, inp.bias, EPS) if case.norm == "layer_norm" else (inp.weight, EPS)
        y, h, sv = fn(x, r, (case.shape[-1],), *args, backend=backend, out=out, h_out=h_out)
        return (y, h), (sv if saved else None)
    act = {"activation": case.fuse} if case.fuse else {}
    fn = getattr(cnorm, case.norm + "_forward" if saved else case.norm)
    if case.norm == "batch_norm":
        rm = None if inp.running_mean is None else inp.running_mean.copy()
        rv = None if inp.running_var is None else inp.running_var.copy()
        res = fn(x, inp.weight, inp.bias, rm, rv, case.training, 0.1, EPS, case.channel_axis, backend, out=out,
                 **act)
    elif case.norm == "layer_norm":
        res = fn(x, (case.shape[-1],), inp.weight, inp.bias, EPS, backend, out=out, **act)
    elif case.norm == "rms_norm":
        res = fn(x, (case.shape[-1],), inp.weight, EPS, backend=backend, out=out, **act)
    elif case.norm == "group_norm":
        res = fn(x, case.groups, inp.weight, inp.bias, EPS, case.channel_axis, backend, out=out, **act)
    else:
        res = fn(x, inp.weight, inp.bias, None, None, True, 0.1, EPS, case.channel_axis, backend, out=out, **act)
    return res if saved else (res, None)


def _cnorm_backward(case: Case, dy, x, saved, weight, out=None, dh=None):
    """dx of the case's backward (x is h and ``dh`` its gradient for a fused add)."""
    import cnorm

    if case.fuse == "add":
        return getattr(cnorm, f"add_{case.norm}_backward")(dy, dh, x, saved, weight, out=out)
    fn = getattr(cnorm, f"{case.norm}_backward")
    return fn(dy, x, saved, weight, out=out)


PLAIN, OUT = "plain", "out"  # the two timed variants of every call
PLAIN_ONLY = ("numpy",)      # the reference backend: plain calls only


def _touched(a):
    """``a`` with every page written once: a buffer made before timing must not
    page-fault in the first calls of the rotation that reach it."""
    if isinstance(a, np.ndarray):
        a.fill(0)
    else:  # a torch tensor: its bytes through NumPy (zero_ woke PyTorch's threads for 8 ms a call)
        import torch

        torch.empty(0, dtype=torch.uint8).set_(a.untyped_storage()).numpy().fill(0)
    return a


OUT_BUFFERS = ("per-copy", "one")
#: what every entry point uses unless told: one buffer for every call, as in a user's loop
DEFAULT_OUT_BUFFERS = "one"


def _out_buffers(xs, make, how: str = DEFAULT_OUT_BUFFERS):
    """The out variant's output buffers, indexed like the input copies ``xs``:
    ``make(x)`` for each copy ("per-copy": as cold as the inputs when a call
    reaches them), or one ``make(xs[0])`` for all ("one": the single buffer of
    a user's loop, which stays in cache where it fits)."""
    if how not in OUT_BUFFERS:
        raise ValueError(f"out_buffers: expected one of {OUT_BUFFERS}, got {how!r}")
    if how == "one":
        return [make(xs[0])] * len(xs)
    return [make(x) for x in xs]


def _same_buffer(got, buf, what: str) -> None:
    """Assert an out call returned its buffer (it wrote there, not to a new array)."""
    ptr = (lambda a: a.__array_interface__["data"][0]) if isinstance(buf, np.ndarray) else (lambda t: t.data_ptr())
    if ptr(got) != ptr(buf):
        raise AssertionError(f"{what}: the out call did not return its out buffer")


def cnorm_runner(case: Case, inp: Inputs, backend: str, variant: str = PLAIN,
                 out_buffers: str = DEFAULT_OUT_BUFFERS):
    """A zero-argument call that runs one cnorm call on the next copy, and its first result.

    ``variant="out"``: the same call with ``out=``, one buffer per input copy
    (``np.empty_like`` of it: its layout; ``out_buffers="one"``: one for all,
    see :func:`_out_buffers`), made and touched here, outside timing."""
    bufs = ([None] * len(inp.xs) if variant != OUT
            else _out_buffers(inp.xs, lambda x: _touched(np.empty_like(x)), out_buffers))

    def checked(res, i):
        if bufs[i] is not None:
            _same_buffer(res, bufs[i], f"{case.name} [{backend} out]")
        return res

    if case.fuse == "add":
        return _add_runner(case, inp, backend, bufs, variant, out_buffers, checked)
    if case.direction == "fwd":
        def call():  # forward only, like PyTorch's timed call: no state kept for a backward
            i = inp.next()
            return _cnorm_forward(case, inp, inp.xs[i], backend, saved=False, out=bufs[i])[0]

        first = lambda: checked(_cnorm_forward(case, inp, inp.xs[0], backend, False, bufs[0])[0], 0)  # noqa: E731
        return call, first
    saved = [_cnorm_forward(case, inp, x, backend)[1] for x in inp.xs]

    def call():
        i = inp.next()
        return _cnorm_backward(case, inp.dys[i], inp.xs[i], saved[i], inp.weight, bufs[i])[0]

    def first():
        return checked(_cnorm_backward(case, inp.dys[0], inp.xs[0], saved[0], inp.weight, bufs[0])[0], 0)

    return call, first


def _add_runner(case: Case, inp: Inputs, backend: str, bufs, variant: str, out_buffers: str, checked):
    """:func:`cnorm_runner` of a fused add: forward returns y (h into its own out buffer
    in the out variant); backward runs on the h and saved state of a forward per copy."""
    rs = inp.extra["rs"]
    hbufs = ([None] * len(inp.xs) if variant != OUT
             else _out_buffers(inp.xs, lambda x: _touched(np.empty_like(x)), out_buffers))
    if case.direction == "fwd":
        def call():
            i = inp.next()
            return _cnorm_forward(case, inp, inp.xs[i], backend, False, bufs[i], rs[i], hbufs[i])[0]

        def first():
            return checked(_cnorm_forward(case, inp, inp.xs[0], backend, False, bufs[0], rs[0], hbufs[0])[0][0], 0)

        return call, first
    fwd = [_cnorm_forward(case, inp, x, backend, True, None, r) for x, r in zip(inp.xs, rs)]
    hs, saved = [f[0][1] for f in fwd], [f[1] for f in fwd]
    dhs = inp.extra["dhs"]

    def call():
        i = inp.next()
        return _cnorm_backward(case, inp.dys[i], hs[i], saved[i], inp.weight, bufs[i], dhs[i])[0]

    def first():
        return checked(_cnorm_backward(case, inp.dys[0], hs[0], saved[0], inp.weight, bufs[0], dhs[0])[0], 0)

    return call, first


BASELINE = "unfused"  # the runner of cnorm's own unfused sequence (see the module docstring)


def _np_act(y, act):
    """act(y) in place with NumPy ufuncs (what an unfused NumPy caller writes)."""
    if act == "relu":
        return np.maximum(y, 0, out=y)
    t = np.negative(y)
    np.exp(t, out=t)
    t += 1
    return np.divide(y, t, out=y)


def _np_act_grad(dy, pre, act):
    """dy·act'(pre) with NumPy (a new array)."""
    if act == "relu":
        return np.where(pre > 0, dy, np.zeros((), dy.dtype))
    s = np.negative(pre)
    np.exp(s, out=s)
    s += 1
    np.reciprocal(s, out=s)  # sigmoid(pre)
    g = 1 - s
    g *= pre
    g += 1
    g *= s
    g *= dy
    return g


def baseline_runner(case: Case, inp: Inputs):
    """cnorm's unfused sequence with the "cython" backend (plain calls: outputs allocated),
    or for an RMSNorm row cnorm's LayerNorm on the same shape."""
    from dataclasses import replace

    be = "cython"
    if case.norm == "rms_norm" and not case.fuse:
        ln = replace(case, norm="layer_norm")
        return cnorm_runner(ln, inp, be)
    plain = replace(case, fuse="")
    if case.fuse == "add":
        rs = inp.extra["rs"]
        if case.direction == "fwd":
            def call():
                i = inp.next()
                h = inp.xs[i] + rs[i]
                return _cnorm_forward(plain, inp, h, be, saved=False)[0], h

            return call, lambda: _cnorm_forward(plain, inp, inp.xs[0] + rs[0], be, saved=False)[0]
        hs = [x + r for x, r in zip(inp.xs, rs)]
        saved = [_cnorm_forward(plain, inp, h, be)[1] for h in hs]
        dhs = inp.extra["dhs"]

        def step(i):
            dx = _cnorm_backward(plain, inp.dys[i], hs[i], saved[i], inp.weight)[0]
            dx += dhs[i]
            return dx

        return (lambda: step(inp.next())), (lambda: step(0))
    act = case.fuse
    if case.direction == "fwd":
        def fstep(i):
            return _np_act(_cnorm_forward(plain, inp, inp.xs[i], be, saved=False)[0], act)

        return (lambda: fstep(inp.next())), (lambda: fstep(0))
    fwd = [_cnorm_forward(plain, inp, x, be) for x in inp.xs]  # z (pre-activation) kept per copy

    def bstep(i):
        g = _np_act_grad(inp.dys[i], fwd[i][0], act)
        return _cnorm_backward(plain, g, inp.xs[i], fwd[i][1], inp.weight)[0]

    return (lambda: bstep(inp.next())), (lambda: bstep(0))


# PyTorch's out overload per (norm, direction): the op its functional call
# reaches on CPU, called directly. InstanceNorm has none (F.instance_norm
# runs batch_norm on a reshaped copy of the input and weights).
TORCH_OUT_OPS = {
    ("batch_norm", "fwd"): "native_batch_norm.out",
    ("batch_norm", "bwd"): "native_batch_norm_backward.out",
    ("layer_norm", "fwd"): "native_layer_norm.out",
    ("layer_norm", "bwd"): "native_layer_norm_backward.out",
    ("group_norm", "fwd"): "native_group_norm.out",
    ("group_norm", "bwd"): "native_group_norm_backward.out",
}


def torch_out_op(case: Case):
    """The ``aten`` overload PyTorch's out variant of ``case`` calls, or None if it has none
    (no fused case has one: PyTorch runs the same work as several ops)."""
    return None if case.fuse else TORCH_OUT_OPS.get((case.norm, case.direction))


def torch_out_kernel(op: str):
    """Whether a CPU kernel of PyTorch writes ``op``'s outputs itself (True), or the
    overload is generated ("autogen": it runs the functional op into new tensors
    and copies them into out; False); None where this PyTorch does not say."""
    try:
        import torch

        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "CPU"))
    except (ImportError, AttributeError, RuntimeError):
        return None


class _TorchCase:
    """PyTorch tensors of one case: the rotating inputs (channels-last as a permuted
    NHWC view, NCHW logical), parameters, and conversions back to NumPy."""

    def __init__(self, case: Case, inp: Inputs):
        import torch

        self.case, self.inp = case, inp
        self.tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[case.dtype]
        w, b = torch.from_numpy(inp.weight), torch.from_numpy(inp.bias)
        if case.row_norm:  # PyTorch CPU layer_norm wants parameters in the input dtype
            w, b = w.to(self.tdtype), b.to(self.tdtype)
        self.w, self.b = w, b
        self.rm = None if inp.running_mean is None else torch.from_numpy(inp.running_mean.copy())
        self.rv = None if inp.running_var is None else torch.from_numpy(inp.running_var.copy())

    def from_numpy(self, a):
        import torch

        if a.dtype == np.float32:
            return torch.from_numpy(a)
        return torch.from_numpy(a.astype(np.float32)).to(self.tdtype)  # setup only, not timed

    def tensor(self, a):
        t = self.from_numpy(a) if isinstance(a, np.ndarray) else a
        if self.case.layout == "cl":
            t = t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))  # NHWC memory, NCHW logical
        return t

    def to_numpy(self, t):
        t = t.detach()
        if self.case.layout == "cl":  # back to the NHWC array users passed
            t = t.permute(0, *range(2, t.dim()), 1)
        return t.contiguous().float().numpy()

    def nchw(self, t):
        """(N, C, spatial size) of an NCHW-logical tensor: GroupNorm's sizes."""
        return t.shape[0], t.shape[1], math.prod(t.shape[2:])


def torch_runner(case: Case, inp: Inputs, variant: str = PLAIN, out_buffers: str = DEFAULT_OUT_BUFFERS):
    """Same as :func:`cnorm_runner` with PyTorch CPU (channels-last as a permuted NHWC view).

    ``variant="out"``: :func:`torch_out_runner`."""
    if variant == OUT:
        return torch_out_runner(case, inp, out_buffers)
    import torch
    import torch.nn.functional as F

    tc = _TorchCase(case, inp)
    w, b, rm, rv = tc.w, tc.b, tc.rm, tc.rv
    if case.direction == "bwd":
        w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    if case.fuse == "add":
        return _torch_add_runner(case, inp, tc, w, b)
    act = {"relu": F.relu, "silu": F.silu}.get(case.fuse, lambda t: t)

    def norm(t):
        if case.norm == "batch_norm":
            return F.batch_norm(t, rm, rv, w, b, case.training, 0.1, EPS)
        if case.norm == "layer_norm":
            return F.layer_norm(t, (case.shape[-1],), w, b, EPS)
        if case.norm == "rms_norm":
            return F.rms_norm(t, (case.shape[-1],), w, EPS)
        if case.norm == "group_norm":
            return F.group_norm(t, case.groups, w, b, EPS)
        return F.instance_norm(t, weight=w, bias=b, eps=EPS)

    def fwd(t):
        return act(norm(t))

    xs = [tc.tensor(x) for x in inp.xs]
    if case.direction == "fwd":
        def call():
            i = inp.next()
            return fwd(xs[i])

        return call, lambda: tc.to_numpy(fwd(xs[0]))
    params = (w,) if case.norm == "rms_norm" else (w, b)  # (RMSNorm has no bias)
    # leaves in the user's layout; the norm sees their NCHW-logical views
    leaves = [tc.from_numpy(a).requires_grad_(True) for a in inp.xs]
    with torch.enable_grad():
        outs = [fwd(tc.tensor(leaf)) for leaf in leaves]
    grads = [tc.tensor(dy) for dy in inp.dys]

    def call():
        i = inp.next()
        return torch.autograd.grad(outs[i], (leaves[i], *params), grads[i], retain_graph=True)

    def first():
        dx = torch.autograd.grad(outs[0], (leaves[0], *params), grads[0], retain_graph=True)[0]
        return dx.detach().float().numpy()  # the leaf has the user's (NHWC or NCHW) layout

    return call, first


def _torch_add_runner(case: Case, inp: Inputs, tc, w, b):
    """PyTorch eager doing a fused add's work: ``h = x + r``, then the norm of h."""
    import torch
    import torch.nn.functional as F

    def norm(h):
        if case.norm == "layer_norm":
            return F.layer_norm(h, (case.shape[-1],), w, b, EPS)
        return F.rms_norm(h, (case.shape[-1],), w, EPS)

    xs = [tc.from_numpy(x) for x in inp.xs]
    rs = [tc.from_numpy(r) for r in inp.extra["rs"]]
    if case.direction == "fwd":
        def fstep(i):
            h = xs[i] + rs[i]
            return norm(h), h

        return (lambda: fstep(inp.next())), (lambda: tc.to_numpy(fstep(0)[0]))
    leaves = [(x.clone().requires_grad_(True), r.clone().requires_grad_(True)) for x, r in zip(xs, rs)]
    with torch.enable_grad():
        outs = []
        for x, r in leaves:
            h = x + r
            outs.append((norm(h), h))
    grads = [(tc.from_numpy(dy), tc.from_numpy(dh)) for dy, dh in zip(inp.dys, inp.extra["dhs"])]

    def step(i):
        return torch.autograd.grad(outs[i], (leaves[i][0], w) + ((b,) if case.norm == "layer_norm" else ()),
                                   grads[i], retain_graph=True)

    return (lambda: step(inp.next())), (lambda: step(0)[0].detach().float().numpy())


def torch_out_runner(case: Case, inp: Inputs, out_buffers: str = DEFAULT_OUT_BUFFERS):
    """PyTorch's out variant: the ``aten`` op of :data:`TORCH_OUT_OPS` called through its
    ``.out`` overload, y (or dx) into one preallocated tensor per input copy (the
    copy's layout) and the small results (statistics, parameter gradients) into one
    set of tensors. A backward calls the backward op directly with the statistics
    of a forward run once per copy outside timing, writing dx, dweight and dbias.
    ``out_buffers``: as for :func:`cnorm_runner`."""
    import torch

    op_name = torch_out_op(case)
    if op_name is None:
        raise ValueError(f"{case.name}: PyTorch has no out variant for {case.norm}")
    aten = torch.ops.aten
    tc = _TorchCase(case, inp)
    w, b, rm, rv = tc.w, tc.b, tc.rm, tc.rv
    xs = [tc.tensor(x) for x in inp.xs]
    c = case.shape[-1]

    def fwd_default(t):  # the functional op: statistics for a backward, shapes for the outs
        if case.norm == "batch_norm":
            return aten.native_batch_norm.default(t, w, b, rm, rv, case.training, 0.1, EPS)
        if case.norm == "layer_norm":
            return aten.native_layer_norm.default(t, [c], w, b, EPS)
        return aten.native_group_norm.default(t, w, b, *tc.nchw(t), case.groups, EPS)

    def empty_like(t):
        return _touched(torch.empty_like(t))  # preserve_format: a channels-last view gets channels-last strides

    with torch.no_grad():
        probe = fwd_default(xs[0])
    bufs = _out_buffers(xs, empty_like, out_buffers)  # y or dx, per copy
    if case.direction == "fwd":
        stats = [empty_like(s) for s in probe[1:]]

        def op(i):
            t, y = xs[i], bufs[i]
            if case.norm == "batch_norm":
                return aten.native_batch_norm.out(t, w, b, rm, rv, case.training, 0.1, EPS,
                                                  out=y, save_mean=stats[0], save_invstd=stats[1])
            if case.norm == "layer_norm":
                return aten.native_layer_norm.out(t, [c], w, b, EPS, out0=y, out1=stats[0], out2=stats[1])
            return aten.native_group_norm.out(t, w, b, *tc.nchw(t), case.groups, EPS,
                                              out0=y, out1=stats[0], out2=stats[1])
    else:
        with torch.no_grad():
            saved = [fwd_default(t)[1:] for t in xs]  # (mean, rstd) per copy
        dys = [tc.tensor(dy) for dy in inp.dys]
        grads = [empty_like(w), empty_like(w)]  # dweight, dbias (float32 for BatchNorm and GroupNorm)
        mask = [True, True, True]

        def op(i):
            dy, t, dx, (mean, rstd) = dys[i], xs[i], bufs[i], saved[i]
            if case.norm == "batch_norm":
                return aten.native_batch_norm_backward.out(dy, t, w, rm, rv, mean, rstd, case.training, EPS, mask,
                                                           out0=dx, out1=grads[0], out2=grads[1])
            if case.norm == "layer_norm":
                return aten.native_layer_norm_backward.out(dy, t, [c], mean, rstd, w, b, mask,
                                                           out0=dx, out1=grads[0], out2=grads[1])
            return aten.native_group_norm_backward.out(dy, t, mean, rstd, w, *tc.nchw(t), case.groups, mask,
                                                       out0=dx, out1=grads[0], out2=grads[1])

    def call():
        return op(inp.next())

    def first():
        with torch.no_grad():
            res = op(0)
        _same_buffer(res[0], bufs[0], f"{case.name} [torch out]")
        return tc.to_numpy(bufs[0])

    return call, first


def reference(case: Case, inp: Inputs) -> np.ndarray:
    """The NumPy backend's result on copy 0: what every row is checked against (a fused
    add's y forward, its dx backward)."""
    if case.fuse == "add":
        (y, h), saved = _cnorm_forward(case, inp, inp.xs[0], "numpy", True, None, inp.extra["rs"][0])
        if case.direction == "fwd":
            return np.asarray(y)
        return np.asarray(_cnorm_backward(case, inp.dys[0], h, saved, inp.weight, None, inp.extra["dhs"][0])[0])
    if case.direction == "fwd":
        return np.asarray(_cnorm_forward(case, inp, inp.xs[0], "numpy")[0])
    saved = _cnorm_forward(case, inp, inp.xs[0], "numpy")[1]
    return np.asarray(_cnorm_backward(case, inp.dys[0], inp.xs[0], saved, inp.weight)[0])


def tolerance(dtype) -> float:
    """Error allowed against the reference, relative to scale: float32 1e-4; half
    types two units in the last place (both sides round to the same format)."""
    return {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}.get(str(np.dtype(dtype)), 1e-4)


def check(got, want, what: str, tol: float = 1e-4) -> None:
    """Assert a result matches the reference to ``tol`` of its scale."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(want))))
    err = float(np.max(np.abs(got - want))) / scale
    if not err <= tol:
        raise AssertionError(f"{what}: max error {err:.2e} of scale {scale:.3g} vs the NumPy reference")


def runner(case: Case, inp: Inputs, backend: str, variant: str = PLAIN,
           out_buffers: str = DEFAULT_OUT_BUFFERS):
    """(call, first) for a backend name (a cnorm backend, "torch", or "unfused": cnorm's
    unfused sequence of a fused case) and a variant ("plain" or "out")."""
    if backend == "torch":
        return torch_runner(case, inp, variant, out_buffers)
    if backend == BASELINE:  # plain calls only
        return baseline_runner(case, inp)
    return cnorm_runner(case, inp, backend, variant, out_buffers)


# -- machine facts -----------------------------------------------------------------

def cache_bytes(level: int, default: int) -> int:
    """Size of the CPU's cache of ``level`` from sysfs (Linux), else ``default``."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            with open(os.path.join(base, idx, "level")) as f:
                if int(f.read()) != level:
                    continue
            with open(os.path.join(base, idx, "size")) as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
            return int(s.rstrip("KMG")) * mult
    except OSError:
        pass
    return default


def machine() -> dict:
    """CPU model, cores, caches: recorded with every result."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "l2_bytes": cache_bytes(2, 1 << 20),
            "llc_bytes": cache_bytes(3, 32 << 20), "python": platform.python_version(),
            "numpy": np.__version__}


def copy_runner(inp: "Inputs", threads: int):
    """A zero-argument call that copies the next of the case's input copies into one
    output array (streaming stores, ``threads`` threads): the floor's reference."""
    from . import _cpu

    parallel_copy = _cpu.K.parallel_copy
    dst = np.empty_like(inp.xs[0])

    def call():
        i = inp.next()
        parallel_copy(inp.xs[i], dst, threads)

    return call


def copy_bandwidth(threads: int, nbytes: int = 256 << 20, repeat: int = 7) -> float:
    """Bytes per second (read + write) of a large array copy on ``threads`` threads."""
    from . import _cpu

    parallel_copy = _cpu.K.parallel_copy
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    parallel_copy(src, dst, threads)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        parallel_copy(src, dst, threads)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory instead of returning it to the OS (for the
    rest of the process: there is no undoing it).

    Otherwise every large output is a fresh mmap that the kernel zero-fills
    on first touch — as costly as a normalization itself — for every backend
    alike; a training loop's caching allocator does not pay it, a NumPy
    user's plain loop does. Not the benchmark's default (``--keep-freed-memory``):
    kernel A/B comparisons (``bench/ab_kernels.py``) use it to time kernels
    alone. Returns False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        # mallopt takes a C int: 1 << 62 would truncate to 0 (trim everything), so use INT_MAX.
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1)))
    except (OSError, AttributeError):
        return False


ALLOCATOR = {
    False: "glibc default (fresh outputs are page-faulted)",
    True: "freed memory kept (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=INT_MAX)",
}


def allocator_policy(kept: bool) -> dict:
    """bench.json's record of the allocator policy in force."""
    return {"policy": "keep_freed_memory" if kept else "default", "description": ALLOCATOR[bool(kept)]}


# -- timing ------------------------------------------------------------------------

def minor_faults():
    """Minor page faults of this process so far (every thread), or 0 where unknown."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return 0


def time_calls(calls: dict, repeats: dict, budget_s: float, faults: dict | None = None, monitor=None) -> dict:
    """Seconds per call of each named zero-argument call, interleaved.

    One warm-up each, then rounds in which every call is timed once (tiny
    calls as a batch), until each has its ``repeats`` samples or the budget
    is spent (at least 3 samples each). Interleaving makes every backend see
    the same drift of a shared machine's load, so their ratios hold. Each
    sample follows one untimed call of the same backend: the OpenMP threads
    of the backend timed before it (PyTorch bundles its own runtime) spin for
    a while after its last call and would otherwise be timed too.

    ``faults``: a dict that receives, per name, the minor page faults per call
    of each sample (counted around the timed region, not inside it): what
    shows whether a call's fresh output was page-faulted. ``monitor``: a
    zero-argument call made once per round, outside the timed regions (the
    trust checks sample the machine's load with it).
    """
    inner = {}
    for name, call in calls.items():
        call()
        t0 = time.perf_counter()
        call()
        dt = time.perf_counter() - t0
        inner[name] = max(1, int(2e-3 / max(dt, 1e-7))) if dt < 1e-4 else 1  # tiny calls: time batches
    times = {name: [] for name in calls}
    start = time.perf_counter()
    while True:
        pending = [n for n in calls if len(times[n]) < repeats[n]]
        if not pending or (time.perf_counter() - start > budget_s and min(map(len, times.values())) >= 3):
            return times
        if monitor is not None:
            monitor()
        for name in pending:
            call, k = calls[name], inner[name]
            call()  # absorbs the previous backend's spinning threads (see above)
            f0 = minor_faults() if faults is not None else 0
            t0 = time.perf_counter()
            for _ in range(k):
                call()
            times[name].append((time.perf_counter() - t0) / k)
            if faults is not None:
                faults.setdefault(name, []).append((minor_faults() - f0) / k)


COPY = "memory copy"  # the floor's reference call in the timing rounds


def _key(backend: str, variant: str) -> str:
    """The name of a backend's variant in the timing rounds."""
    return backend if variant == PLAIN else f"{backend} {variant}"


def _stats(times, floor, faults=None) -> dict:
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "n": len(times),
            "floor_fraction": None if floor is None else floor / med,
            "minor_faults_per_call": statistics.median(faults) if faults else None}


_MISSING = {"median_s": float("nan"), "min_s": float("nan"), "n": 0, "floor_fraction": None,
            "minor_faults_per_call": None}


def run_case(case: Case, backends, threads: int, repeat: int, budget_s: float,
             llc_bytes: int, out_buffers: str = DEFAULT_OUT_BUFFERS) -> dict:
    """Time every backend's plain and out variants of ``case`` in the same rounds.

    ``results[backend]`` holds the plain call's numbers (``speedup_vs_torch``:
    PyTorch's plain median over this one) and, except for the NumPy reference,
    ``out``: the out variant's, with ``speedup_vs_torch`` against PyTorch's out
    variant, ``out_variant`` (False: PyTorch has none for this op, its numbers
    are the plain call's), ``out_op`` and, for PyTorch, ``out_kernel`` (see
    :func:`torch_out_kernel`); ``out_speedup`` is plain median / out median.
    Each has ``minor_faults_per_call`` (median over the samples): whether the
    call's output was page-faulted. ``out_buffers``: see :func:`_out_buffers`."""
    inp = make_inputs(case, n_copies(case, llc_bytes))
    want = reference(case, inp)
    row = {"case": case.name, "norm": case.norm, "direction": case.direction, "shape": list(case.shape),
           "layout": case.layout, "dtype": case.dtype, "bytes": case.nbytes, "latency": case.latency,
           "results": {}}
    calls = {} if case.latency else {COPY: copy_runner(inp, threads)}
    out_info = {}
    for name in backends:
        for variant in (PLAIN, OUT):
            if variant == OUT:
                if name in PLAIN_ONLY:
                    continue
                if name == "torch":
                    op = torch_out_op(case)
                    out_info[name] = {"out_variant": op is not None, "out_op": op and f"aten::{op}",
                                      "out_kernel": op and torch_out_kernel(op)}
                    if op is None:  # its out time is its plain call's
                        continue
                else:
                    out_info[name] = {"out_variant": True, "out_op": f"cnorm.{case.norm}"
                                      f"{'_backward' if case.direction == 'bwd' else ''}(out=)"}
            key = _key(name, variant)
            try:
                call, first = runner(case, inp, name, variant, out_buffers)
                got = first()
            except (RuntimeError, TypeError) as exc:  # e.g. a PyTorch CPU kernel missing for a half type
                if name != "torch":
                    raise
                print(f"  {case.name}: no {key} row ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})",
                      file=sys.stderr)
                continue
            # PyTorch's half kernels round intermediates (and bfloat16 parameter
            # gradients) to the half type: its rows get a sanity bound, not cnorm's.
            tol = tolerance(case.np_dtype) if name != "torch" or case.dtype == "float32" else 2.0 ** -5
            check(got, want, f"{case.name} [{key}]", tol)
            calls[key] = call
    if case.has_baseline and "cython" in backends:
        call, first = baseline_runner(case, inp)
        if case.norm != "rms_norm" or case.fuse:  # (an RMSNorm row's baseline is LayerNorm: other values)
            # (NumPy rounds each step of the unfused sequence to a half type: a sanity bound, as for PyTorch)
            check(first(), want, f"{case.name} [{BASELINE}]",
                  tolerance(case.np_dtype) if case.dtype == "float32" else 2.0 ** -5)
        else:
            first()
        calls[_key(BASELINE, PLAIN)] = call
    repeats = {key: repeat if not key.startswith("numpy") else max(3, repeat // 3) for key in calls}
    faults = {}
    others = []  # other processes' runnable threads, sampled once per round
    loads = [_report.load_average()]
    timed = time_calls(calls, repeats, budget_s, faults,
                       monitor=lambda: others.append(_report.runnable_others()))
    loads.append(_report.load_average())
    floor = None
    if not case.latency:
        copies = timed.pop(COPY)
        row["copy_bandwidth_Bps"] = 2 * case.nbytes / statistics.median(copies)
        row["copy_bandwidths_Bps"] = [2 * case.nbytes / t for t in copies]  # per round: the trust check's
        floor = case.floor_factor * case.nbytes / row["copy_bandwidth_Bps"]
    known = [n for n in others if n is not None]
    row["runnable_others"] = statistics.median(known) if known else None
    row["load_average"] = max((x for x in loads if x is not None), default=None)
    row["floor_s"] = floor
    results = row["results"]
    for name in backends:  # a backend without a row (torch lacking a half kernel): NaN, n = 0
        plain = timed.get(_key(name, PLAIN))
        results[name] = _stats(plain, floor, faults.get(_key(name, PLAIN))) if plain else dict(_MISSING)
        if name not in out_info:
            continue
        key = _key(name, OUT if out_info[name]["out_variant"] else PLAIN)  # no out variant: the plain call's
        out = timed.get(key)
        results[name]["out"] = {**(_stats(out, floor, faults.get(key)) if out else dict(_MISSING)), **out_info[name]}
    base = timed.get(_key(BASELINE, PLAIN))
    if base:
        row["baseline"] = {**_stats(base, floor, faults.get(_key(BASELINE, PLAIN))),
                           "what": ("cnorm layer_norm, same shape" if case.norm == "rms_norm" and not case.fuse
                                    else "cnorm plain norm with NumPy add/activation around it")}
    ref = results.get("torch")
    for r in results.values():
        r["speedup_vs_torch"] = _ratio(ref, r)
        if "out" in r:
            r["out"]["speedup_vs_torch"] = _ratio(ref and ref.get("out"), r["out"])
            r["out_speedup"] = _ratio(r, r["out"])
    if base and "cython" in results:
        results["cython"]["speedup_vs_unfused"] = _ratio(row["baseline"], results["cython"])
    row["threads"] = threads
    row["cores_available"] = _report.cores_available()
    row["trust"] = _report.trust(row, threads, os.cpu_count() or 1, row["cores_available"])
    return row


def _ratio(slow, fast):
    """``slow``'s median over ``fast``'s (how many times faster ``fast`` runs), None if either is missing."""
    if not slow or not fast or not slow["n"] or not fast["n"]:
        return None
    return slow["median_s"] / fast["median_s"]


def torch_out_marker(res: dict, generated: str = "+") -> str:
    """``*`` where PyTorch's out time is its plain call (no out variant), ``generated`` where
    its out overload is generated (computes into new tensors, then copies), else ''."""
    out = (res or {}).get("out") or {}
    if out.get("out_variant") is False:
        return "*"
    return generated if out.get("out_kernel") is False else ""


TABLE_NOTES = {
    "*": "* PyTorch has no out variant for this op: its out time is its plain call's.",
    "+": "+ PyTorch's out overload of this op is generated (autogen): it runs the op into new tensors, "
         "then copies them into out.",
}


def format_table(rows, backends) -> str:
    """The console table: per backend plain ms and out ms, cnorm's out speed-up (plain/out),
    ratios to PyTorch plain-vs-plain and out-vs-out, % of the floor of the out calls."""
    outs = [b for b in backends if b not in PLAIN_ONLY]
    cols = []  # (label, row -> text)

    def ms(b, variant):
        def cell(row):
            r = row["results"][b] if variant == PLAIN else row["results"][b].get("out", {})
            if not r.get("n"):
                return "-"
            mark = torch_out_marker(row["results"][b]) if b == "torch" and variant == OUT else ""
            return f"{r['median_s'] * (1e6 if row['latency'] else 1e3):.2f}{mark}"
        return cell

    def num(get, fmt):
        def cell(row):
            v = get(row)
            return "-" if v is None else format(v, fmt)
        return cell

    for b in backends:
        cols.append((f"{b} ms", ms(b, PLAIN)))
        if b in outs:
            cols.append((f"{b} out ms", ms(b, OUT)))
            if b != "torch":
                cols.append((f"{b} plain/out", num(lambda row, b=b: row["results"][b].get("out_speedup"), ".2f")))
    if "torch" in backends:
        for b in backends:
            if b == "torch":
                continue
            cols.append((f"{b} x torch", num(lambda row, b=b: row["results"][b]["speedup_vs_torch"], ".2f")))
            if b in outs:
                cols.append((f"{b} x torch out",
                             num(lambda row, b=b: row["results"][b]["out"]["speedup_vs_torch"], ".2f")))
    if "cython" in backends and any("baseline" in row for row in rows):
        cols.append(("cython x unfused", num(lambda row: row["results"]["cython"].get("speedup_vs_unfused"), ".2f")))
    for b in backends:
        get = ((lambda row, b=b: row["results"][b]["out"]["floor_fraction"]) if b in outs
               else (lambda row, b=b: row["results"][b]["floor_fraction"]))
        cols.append((f"{b} floor" + (" out" if b in outs else ""), num(get, ".0%")))
    cols.append(("check", lambda row: (row["trust"]["codes"] or "ok") if row.get("trust") else "-"))
    width = 44
    head = f"{'case':{width}s}" + "".join(f"{label:>{max(len(label), 7) + 2}s}" for label, _ in cols)
    lines = [head, "-" * len(head)]
    marks = set()
    for row in rows:
        line = f"{row['case'] + (' (us)' if row['latency'] else ''):{width}s}"
        for label, cell in cols:
            text = cell(row)
            marks.update(m for m in TABLE_NOTES if text.endswith(m))
            line += f"{text:>{max(len(label), 7) + 2}s}"
        lines.append(line)
    lines.append("")
    lines.append("plain: the call allocates its output; out: the same call writing into a caller's buffer reused "
                 "across calls (cnorm out=, PyTorch's aten .out overloads).")
    notes = []
    if any(b in PLAIN_ONLY for b in backends):
        notes.append(f"{', '.join(b for b in backends if b in PLAIN_ONLY)} (the reference): plain calls only.")
    notes.append("x torch: PyTorch's median / this one's, plain against plain and out against out; "
                 "floor: the memory floor's time / the median (of the out calls where there are).")
    if any("baseline" in row for row in rows):
        notes.append("x unfused (fused rows): the median of cnorm's unfused sequence (plain calls, NumPy add or "
                     "activation around the plain norm) / the fused plain call's; RMSNorm rows: cnorm's LayerNorm "
                     "on the same shape / RMSNorm.")
    lines += notes + [TABLE_NOTES[m] for m in sorted(marks)]
    if any(row.get("trust") for row in rows):
        lines += _report.trust_notes(rows)
    return "\n".join(lines)


def plot(rows, backends, path: str, meta: dict | None = None) -> None:
    """bench.png: see :func:`cnorm._bench_report.plot`."""
    _report.plot(rows, backends, path, meta)


def main(argv: list[str]) -> int:
    """Run the benchmark; see ``python -m cnorm bench --help``."""
    parser = argparse.ArgumentParser(prog="python -m cnorm bench",
                                     description="cnorm's backends against PyTorch and the memory floor.")
    parser.add_argument("--out", default="bench_results", help="output folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="small cases, few repeats (CI smoke)")
    parser.add_argument("--threads", type=int, default=None, help="threads for every backend (default: all)")
    parser.add_argument("--backends", default="numpy,cython,torch",
                        help="comma-separated; cnorm backend names and 'torch' (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per backend and case")
    parser.add_argument("--filter", default="", help="run only cases whose name contains this")
    parser.add_argument("--fused-only", action="store_true",
                        help="only the RMSNorm and fused rows (add+norm, norm+activation)")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16",
                        help="comma-separated data dtypes; half rows reuse the float32 cases (default: %(default)s)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="make glibc keep freed memory (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=INT_MAX), as a "
                             "caching allocator would: plain calls no longer pay the page faults of fresh outputs "
                             "(default: glibc's default policy, what a NumPy user's loop gets)")
    parser.add_argument("--out-buffers", choices=OUT_BUFFERS, default=DEFAULT_OUT_BUFFERS,
                        help="the out variants' buffers: one per rotating input copy, as cold as the inputs when a "
                             "call reaches them, or one reused by every call, as in a user's loop (it stays in "
                             "cache where it fits) (default: %(default)s)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="run each case in a fresh Python process (the default, except with --quick). Under "
                             "glibc's default policy a plain call's output is page-faulted or not depending on "
                             "what the process freed before (a free region of its heap serves it without "
                             "faults), so in one process a case's plain times depend on the cases run before "
                             "it; bench.json's minor_faults_per_call shows which happened")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # --isolate's child: this case only
    parser.add_argument("--row-json", default=None, help=argparse.SUPPRESS)  # --isolate's child: its row here
    parser.add_argument("--system-malloc", action="store_true", help=argparse.SUPPRESS)  # deprecated: the default
    parser.add_argument("--cpu-capability", default=None, metavar="LEVEL",
                        help="run cnorm's kernels at this CPU level (x86-64: baseline, avx2, avx512; aarch64: "
                             "baseline, neon) and PyTorch at the matching ATEN_CPU_CAPABILITY (default, avx2, "
                             "avx512; default on aarch64); default: the level cnorm chose for this CPU")
    parser.add_argument("--pytorch", action="store_true",
                        help="after the cases, time cnorm inside PyTorch: the per-call overhead of cnorm on "
                             "torch tensors and of cnorm.torch's operators, and a training step of a ResNet-style "
                             "network and a transformer with and without cnorm.torch.replace_norms")
    parser.add_argument("--pytorch-only", action="store_true", help="only that (no cases)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress counter (cases done, elapsed and estimated time left) on stderr")
    args = parser.parse_args(argv)
    wait_policy = _set_wait_policy(args)

    import cnorm

    from . import _cpu

    level = args.cpu_capability or _cpu.get_cpu_capability()
    if args.cpu_capability is not None and level not in _cpu.usable_levels():
        print(f"--cpu-capability: expected one of the levels compiled and supported here "
              f"({', '.join(_cpu.usable_levels()) or 'none'}), got {level!r}", file=sys.stderr)
        return 2
    threads = args.threads or cnorm.get_num_threads()
    cnorm.set_num_threads(threads)
    backends = [b for b in args.backends.split(",") if b]
    if "torch" in backends and not _torch_at_level(level, threads):
        backends.remove("torch")
    missing = [b for b in backends if b != "torch" and b not in cnorm.available_backends()]
    if missing:
        print(f"backends not available here: {missing}", file=sys.stderr)
        return 2
    if args.system_malloc:
        print("--system-malloc is deprecated and does nothing: glibc's default policy is the default now "
              "(--keep-freed-memory for the former one)", file=sys.stderr)
    kept = keep_freed_memory() if args.keep_freed_memory else False
    if args.keep_freed_memory and not kept:
        print("--keep-freed-memory: mallopt is not available here (not glibc): the default policy stays",
              file=sys.stderr)
    # NumPy's BLAS is not used by any case; its idle worker threads would only compete for the cores
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"), \
            (_cpu.use_level(level) if level is not None else contextlib.nullcontext()):
        if args.pytorch_only:
            return _run_pytorch(args, threads, level, wait_policy)
        code = _run(args, backends, threads, kept, level, wait_policy)
        if code == 0 and args.pytorch:
            code = _run_pytorch(args, threads, level, wait_policy)
        return code


def _run_pytorch(args, threads: int, level, wait_policy) -> int:
    """cnorm inside PyTorch (cnorm._bench_torch): printed, and written to pytorch.json."""
    if not _torch_at_level(level, threads):
        return 2
    import torch

    from . import _bench_torch

    wait_policy = wait_policy or _report.wait_policy_record("late", os.environ)
    print(f"\ncnorm inside PyTorch: {machine()['cpu']}, {threads} threads, CPU level cnorm {level}, PyTorch "
          f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, OpenMP wait policy "
          f"{wait_policy['value'] or 'default'}", flush=True)
    result = _bench_torch.run(budget=3.0 if args.quick else 20.0)
    result.update(threads=threads, cpu_level=level, torch=torch.__version__, machine=machine(),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pytorch.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {os.path.join(args.out, 'pytorch.json')}")
    return 0


def _set_wait_policy(args) -> dict:
    """OMP_WAIT_POLICY=PASSIVE for every OpenMP runtime of the benchmark (cnorm's, PyTorch's)
    unless the user set it: idle threads of one library must not spin on the cores the
    other is being timed on. A runtime reads it once, when it starts, and cnorm's starts
    when ``import cnorm`` loads the extension, before this runs: so ``python -m cnorm
    bench`` re-executes itself once with it set. Called inside another program, it
    cannot: its runtimes keep their default, and the record says so (the cases run in
    fresh processes, ``--isolate``, get PASSIVE)."""
    main = sys.modules.get("__main__")
    cli = sys.modules.get("cnorm.__main__")
    # python -m cnorm bench, or a console script calling cnorm.__main__.main: this process is the benchmark's
    ours = (getattr(getattr(main, "__spec__", None), "name", None) == "cnorm.__main__"
            or (cli is not None and getattr(main, "main", None) is getattr(cli, "main", False)))
    reexec_ok = ours and hasattr(sys, "orig_argv") and not args.row_json
    plan = _report.wait_policy_plan(os.environ, _report.openmp_started(), reexec_ok)
    if plan == "set" and not os.environ.get(_report.WAIT_POLICY):  # no runtime started yet: in time
        os.environ.update(_report.passive_env())
    if plan == "reexec":
        os.environ.update(_report.passive_env())
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
        except OSError as exc:
            print(f"could not re-execute the benchmark with OMP_WAIT_POLICY=PASSIVE ({exc})", file=sys.stderr)
        plan = "late"
    record = _report.wait_policy_record(plan, os.environ)
    if plan == "late":
        print(f"OpenMP wait policy: {record['source']}", file=sys.stderr)
    return record


def _torch_at_level(level, threads: int) -> bool:
    """Import PyTorch with ATEN_CPU_CAPABILITY matching cnorm's level (read by PyTorch
    at its first CPU kernel, so set before the import); False if it is not installed.
    A PyTorch that chose another level (it runs no higher than this CPU supports)
    is reported, not hidden."""
    from ._cpu import ATEN_CAPABILITY

    want = ATEN_CAPABILITY.get(level)
    if want is not None:
        if "torch" in sys.modules and os.environ.get("ATEN_CPU_CAPABILITY", "").lower() != want:
            print(f"PyTorch was imported before the benchmark set ATEN_CPU_CAPABILITY={want}: "
                  "its rows may run at another level", file=sys.stderr)
        os.environ["ATEN_CPU_CAPABILITY"] = want
    try:
        import torch
    except ImportError:
        print("torch is not installed: no PyTorch rows", file=sys.stderr)
        return False
    torch.set_num_threads(threads)
    got = torch.backends.cpu.get_cpu_capability().lower()
    if want is not None and got != want:
        print(f"PyTorch runs at {got}, not {want}", file=sys.stderr)
    return True


def _run(args, backends, threads: int, kept: bool, level=None, wait_policy=None) -> int:
    """The cases of ``args`` on ``backends``: progress lines, the table, bench.json and bench.png."""
    info = machine()
    dtypes = [d for d in args.dtypes.split(",") if d]
    cases = ((quick_cases() + quick_fused_cases()) if args.quick else (issue_cases() + fused_cases())) \
        if "float32" in dtypes else []
    halves = tuple(d for d in dtypes if d != "float32")
    cases += half_cases(halves, args.quick) if halves else []
    cases = [c for c in cases if args.filter in c.name and args.case in (None, c.name)
             and (c.has_baseline or not args.fused_only)]
    repeat = args.repeat or (5 if args.quick else 15)
    budget = 1.0 if args.quick else 4.0
    if args.isolate is None:  # a fresh process per case, except for the quick smoke run
        args.isolate = not args.quick
    if args.row_json:  # --isolate's child: one case, its row to a file, nothing else
        (case,) = cases
        with open(args.row_json, "w") as f:
            json.dump(run_case(case, backends, threads, repeat, budget, info["llc_bytes"], args.out_buffers), f)
        return 0
    bandwidth = copy_bandwidth(threads)
    levels = cpu_levels(backends)
    print(f"allocator: {ALLOCATOR[kept]}")
    print("out variants: " + ("one buffer per input copy" if args.out_buffers == "per-copy"
                              else "one buffer for all calls"))
    print(f"{info['cpu']}, {info['cores']} cores, threads={threads}, copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s at the start (each case's floor uses its own)")
    print(f"CPU level: cnorm {levels['cnorm']}, PyTorch {levels['torch'] or '-'}")
    wait_policy = wait_policy or _report.wait_policy_record("late", os.environ)
    print(f"OpenMP wait policy: {wait_policy['value'] or 'default'} ({wait_policy['source']})")
    available = _report.cores_available()
    print(f"cores available to this process: {available} of {info['cores']}"
          + (f" - {threads} threads asked for: oversubscribed, results are noisy" if threads > available else ""))
    print("cases: " + ("each in a fresh process" if args.isolate else "all in this process, one after another"))
    rows = []
    # the first estimate of a case: its timing budget and its set-up (a fresh process imports PyTorch)
    progress = _report.Progress(len(cases), budget + (3.0 if args.isolate else 1.0), enabled=not args.quiet)
    for case in cases:
        progress.start_case(case.name)
        if args.isolate:
            rows.append(_run_isolated(case, args, backends, threads, repeat, kept, level))
        else:
            rows.append(run_case(case, backends, threads, repeat, budget, info["llc_bytes"], args.out_buffers))
        progress.clear()
        print(f"  {case.name}: " + ", ".join(_progress(b, v, r) for b, r in rows[-1]["results"].items()
                                              for v in (PLAIN, OUT) if v == PLAIN or "out" in r)
              + (f", {BASELINE} {rows[-1]['baseline']['median_s'] * 1e3:.3f} ms" if "baseline" in rows[-1] else "")
              + (f"  [check {rows[-1]['trust']['codes']}: "
                 + "; ".join(w["detail"] for w in rows[-1]["trust"]["warnings"]) + "]"
                 if rows[-1].get("trust", {}).get("codes") else ""),
              flush=True)
        progress.case_done(case.name)
    progress.clear()
    print()
    print(format_table(rows, backends))
    os.makedirs(args.out, exist_ok=True)
    result = {"machine": info, "threads": threads, "copy_bandwidth_Bps": bandwidth, "cpu_capability": levels,
              "allocator": allocator_policy(kept), "freed_memory_kept": kept,
              "out_buffers": args.out_buffers, "isolated": args.isolate,
              "variants": {"plain": "the call allocates its output",
                           "out": "the same call writing into a caller's buffer reused across calls; "
                                  "numpy (the reference) plain only"},
              "backends": backends, "quick": args.quick, "openmp_wait_policy": wait_policy,
              "cores_available": available,
              "trust_checks": {"copy_spread_limit": _report.COPY_SPREAD_LIMIT, "floor_noise": _report.FLOOR_NOISE,
                               "notes": {c: {"what": w, "remedy": r} for c, (w, r) in _report.TRUST_NOTES.items()}},
              "versions": _versions(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "torch": _torch_version(), "cases": rows}
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    _report.plot_report(result, os.path.join(args.out, "bench.png"))
    print(f"\nwrote {os.path.join(args.out, 'bench.json')} and bench.png")
    return 0


def _run_isolated(case: Case, args, backends, threads: int, repeat: int, kept: bool, level) -> dict:
    """:func:`run_case` in a fresh Python process running this cnorm (``--isolate``)."""
    import subprocess
    import tempfile

    import cnorm

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "row.json")
        cmd = [sys.executable, "-m", "cnorm", "bench", "--case", case.name, "--row-json", path,
               "--threads", str(threads), "--backends", ",".join(backends), "--repeat", str(repeat),
               "--dtypes", case.dtype, "--out-buffers", args.out_buffers]
        cmd += ["--quick"] * args.quick + ["--keep-freed-memory"] * kept
        cmd += ["--cpu-capability", level] if level else []
        cmd += ["--quiet"]
        root = os.path.dirname(os.path.dirname(os.path.abspath(cnorm.__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        if not env.get(_report.WAIT_POLICY):  # (called inside another program: the case still gets PASSIVE)
            env.update(_report.passive_env())
        subprocess.run(cmd, check=True, env=env)
        with open(path) as f:
            return json.load(f)


def _progress(backend: str, variant: str, res: dict) -> str:
    """One backend variant's median (and page faults per call, if any) for the progress line."""
    r = res if variant == PLAIN else res["out"]
    faults = r.get("minor_faults_per_call")
    return (f"{_key(backend, variant)} {r['median_s'] * 1e3:.3f} ms"
            + (torch_out_marker(res) if backend == "torch" and variant == OUT else "")
            + (f" ({faults:.0f} page faults)" if faults and faults >= 0.5 else ""))


def cpu_levels(backends) -> dict:
    """The CPU level each library runs at in this process: cnorm's kernels and
    PyTorch's (its ATEN_CPU_CAPABILITY names)."""
    from . import _cpu

    torch_level = None
    if "torch" in backends:
        import torch

        torch_level = torch.backends.cpu.get_cpu_capability().lower()
    return {"cnorm": _cpu.get_cpu_capability(), "torch": torch_level}


def _versions() -> dict:
    """cnorm's, NumPy's and PyTorch's versions (None: not installed)."""
    from . import __version__

    return {"cnorm": __version__, "numpy": np.__version__, "torch": _torch_version()}


def _torch_version():
    try:
        import torch

        return torch.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
