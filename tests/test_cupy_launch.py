"""The cupy backend's launchers, checked without a GPU against the kernels' CUDA signatures.

A stand-in for CuPy (host arrays, a device with an H200's multiprocessor count
and shared memory) records every launch instead of running it. Each launch is
checked against the ``__global__`` signature of its template instance, parsed
from the kernel source: the instance is among the ``name_expressions`` of the
module it is fetched from, the argument count matches, every pointer argument
is an array of the pointee's dtype, every scalar the exact NumPy scalar type of
the parameter (i64 -> int64, int -> int32, unsigned -> uint32, the statistics
type), arrays read or written as 16-byte vectors are 16-byte aligned, and the
launch shape is valid. The values are not computed here: tests/test_cupy_backend.py
compares them with the NumPy reference on a GPU.

The GPU tests' problem lists are run through the launchers here too, and the
kernel families each of them reaches are checked, so that those tests cover
every variant (activation, RMS statistics, residual add) of every kernel path.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest

from cnorm.backends.base import Problem, stats_dtype
from cnorm.backends.cupy_backend import (CUDA_TYPES, KERNEL_FILES, PLAIN, CupyBackend, kernel_source,
                                         name_expressions)
import test_cupy_backend as gpu_tests

SMS, OPTIN = 132, 232448  # an H200's multiprocessor count and opt-in shared memory per block

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a test dependency
    BF16 = None

NP_OF_CUDA = {"float": np.dtype(np.float32), "double": np.dtype(np.float64), "__half": np.dtype(np.float16),
              "__nv_bfloat16": BF16}
SCALARS = {"i64": np.int64, "int": np.int32, "unsigned": np.uint32}


# -- the kernels' signatures ----------------------------------------------------------

_GLOBAL = re.compile(r"template\s*<([^>]*)>\s*__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*"
                     r"\(([^)]*)\)")


def _signatures():
    """{kernel name: (template parameter names, [(parameter type, parameter name), ...])}."""
    found = {}
    for file_name in KERNEL_FILES:
        for tparams, name, params in _GLOBAL.findall(kernel_source(file_name)):
            tnames = [t.split()[-1] for t in tparams.split(",")]
            plist = []
            for prm in params.split(","):
                prm = " ".join(prm.replace("__restrict__", "").replace("const ", "").split())
                typ, pname = prm.rsplit(" ", 1)
                plist.append((typ.replace(" ", ""), pname))
            found[name] = (file_name, tnames, plist)
    return found


SIGNATURES = _signatures()


def _parse_instance(expr):
    name, args = re.fullmatch(r"(\w+)<(.*)>", expr).groups()
    return name, [a.strip() for a in args.split(",")]


def _resolve(typ, binding):
    """('ptr', dtype) or ('scalar', numpy scalar type) for a parameter type under a template binding."""
    ptr = typ.endswith("*")
    base = typ.rstrip("*")
    if base == "typenameAcc<T>::type":
        t = "double" if binding["T"] == "double" else "float"
    elif base in binding:
        t = binding[base]
    else:
        t = base
    if t in NP_OF_CUDA:
        dt = NP_OF_CUDA[t]
        return ("ptr", dt) if ptr else ("scalar", dt.type)
    assert not ptr, f"unexpected pointer type {typ}"
    return "scalar", SCALARS[t]


def check_launch(expr, module_names, grid, block, args, shared_mem):
    """Every check of the module docstring for one launch of instance ``expr``."""
    assert expr in module_names, f"{expr} is launched from a module that does not instantiate it"
    name, targs = _parse_instance(expr)
    file_name, tnames, params = SIGNATURES[name]
    assert len(targs) == len(tnames), f"{expr}: {len(targs)} template arguments for {tnames}"
    binding = dict(zip(tnames, targs))
    assert len(args) == len(params), f"{expr}: {len(args)} arguments for {len(params)} parameters"
    for (typ, pname), arg in zip(params, args):
        kind, want = _resolve(typ, binding)
        if kind == "ptr":
            assert isinstance(arg, np.ndarray), f"{expr} {pname}: expected an array, got {type(arg).__name__}"
            assert arg.dtype == want, f"{expr} {pname}: dtype {arg.dtype}, expected {want}"
            assert arg.flags.c_contiguous, f"{expr} {pname}: not C-contiguous"
        else:
            assert type(arg) is want, f"{expr} {pname}: {type(arg).__name__}, expected {want.__name__}"
    vec = int(binding.get("VEC", 1))
    if vec > 1:  # T arrays are accessed as 16-byte vectors
        for (typ, pname), arg in zip(params, args):
            if typ.rstrip("*") == "T":
                assert arg.data.ptr % 16 == 0, f"{expr} {pname}: not 16-byte aligned for VEC={vec}"
    if name in ("row_forward_regs", "row_backward_regs") and binding["MODE"] in ("0", "2"):
        # weight (and bias where read) are loaded as 16-byte vectors
        read = {"weight"} | ({"bias"} if name == "row_forward_regs" or binding["ACT"] != "0" else set())
        for (typ, pname), arg in zip(params, args):
            if pname in read:
                assert arg.data.ptr % 16 == 0, f"{expr} {pname}: not 16-byte aligned"
    grid, block = tuple(grid), tuple(block)
    assert len(grid) == 1 and 1 <= grid[0] < 2**31 and type(grid[0]) is int, f"{expr}: grid {grid}"
    assert len(block) == 1 and 1 <= block[0] <= 1024 and type(block[0]) is int, f"{expr}: block {block}"
    if name in ("row_forward_regs", "row_backward_regs"):
        assert block[0] <= 512, f"{expr}: block {block} over __launch_bounds__(512)"
    if name in ("col_stats_partial", "col_grad_partial"):
        assert block[0] <= 256, f"{expr}: block {block} over __launch_bounds__(256)"
    assert 0 <= shared_mem <= OPTIN - 1024, f"{expr}: shared memory {shared_mem}"


# -- a stand-in for CuPy ----------------------------------------------------------------

class FakeArray(np.ndarray):
    """A host array with CuPy's ``data.ptr``."""

    @property
    def data(self):
        return SimpleNamespace(ptr=self.__array_interface__["data"][0])


def _aligned_empty(shape, dtype):
    """A new array starting on a 256-byte boundary, like CuPy's allocations."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(count * dtype.itemsize + 256, dtype=np.uint8)
    start = -raw.__array_interface__["data"][0] % 256
    return raw[start:start + count * dtype.itemsize].view(dtype).reshape(shape).view(FakeArray)


class FakeKernel:
    def __init__(self, module, expr):
        self.module, self.expr = module, expr
        self.max_dynamic_shared_size_bytes = 0

    def __call__(self, grid, block, args, shared_mem=0):
        check_launch(self.expr, self.module.name_expressions, grid, block, args, shared_mem)
        self.module.cupy.launches.append(self.expr)


class FakeModule:
    def __init__(self, cupy, code, options, name_expressions):
        assert '#include "common.cuh"' not in code  # inlined (CuPy's cache key)
        self.cupy, self.name_expressions = cupy, list(name_expressions)
        assert self.name_expressions, "a module without instances"
        cupy.modules.append(self)

    def get_function(self, expr):
        assert expr in self.name_expressions, f"{expr} is not among the module's name_expressions"
        return FakeKernel(self, expr)


class FakeCupy:
    """The part of the cupy module the backend uses."""

    ndarray = FakeArray

    def __init__(self):
        self.launches, self.modules = [], []
        attrs = {"MultiProcessorCount": SMS, "MaxSharedMemoryPerBlockOptin": OPTIN}
        self.cuda = SimpleNamespace(runtime=SimpleNamespace(getDevice=lambda: 0),
                                    Device=lambda dev: SimpleNamespace(attributes=attrs),
                                    get_cuda_path=lambda: "/nonexistent")

    def RawModule(self, code, options, name_expressions):  # noqa: N802 - CuPy's name
        return FakeModule(self, code, options, name_expressions)

    @staticmethod
    def empty(shape, dtype):
        return _aligned_empty(shape, dtype)

    @staticmethod
    def empty_like(a):
        return _aligned_empty(a.shape, a.dtype)

    @staticmethod
    def zeros_like(a):
        z = _aligned_empty(a.shape, a.dtype)
        z[...] = 0
        return z

    @staticmethod
    def asarray(a):
        out = _aligned_empty(np.shape(a), np.asarray(a).dtype)
        out[...] = a
        return out


def fake_backend():
    be = CupyBackend.__new__(CupyBackend)
    be._reason, be._modules, be._kernels, be._type_cache, be._props = None, {}, {}, {}, {}
    be.xp = FakeCupy()
    return be


@pytest.fixture
def fake():
    return fake_backend()


def _dtype(name):
    if name == "bfloat16":
        if BF16 is None:
            pytest.skip("ml_dtypes is not installed")
        return BF16
    return np.dtype(name)


def _family(expr):
    """The kernel and its variant template arguments: 'row_forward_regs act=1 rms add' etc."""
    name, targs = _parse_instance(expr)
    _, tnames, _ = SIGNATURES[name]
    b = dict(zip(tnames, targs))
    words = [name] + ([f"act={b['ACT']}"] if b.get("ACT", "0") != "0" else [])
    words += [w.lower() for w in ("RMS", "ADD") if b.get(w) == "true"]
    return " ".join(words)


def run_everything(be, spec, dtype, act=None, registers=True, outs=True):
    """Every method the GPU tests call on ``spec``, with and without out=; returns the launched families."""
    xp = be.xp
    p = Problem(*spec)
    sd = stats_dtype(dtype)
    x, dy = (xp.asarray(np.zeros(p.shape3, dtype)) for _ in range(2))
    w, b = xp.asarray(np.ones(p.c, sd)), xp.asarray(np.zeros(p.c, sd))
    be.row_registers = registers
    start = len(xp.launches)

    def unaligned():
        return _aligned_empty((x.size + 1,), dtype)[1:].reshape(x.shape)

    targets = [None] + ([unaligned, "x"] if outs else [])
    for t in targets:
        out = t() if callable(t) else (x if t == "x" else None)
        y, mean, var, rstd = be.forward_train(x, p, w, b, 1e-5, out, act)
        assert (y is out) if out is not None else y.shape == x.shape
        assert mean.shape == var.shape == rstd.shape == p.stats_shape
        assert mean.dtype == sd
        for t2 in ([None] if t is None else [t, "dy"]):
            out2 = t2() if callable(t2) else {"x": x, "dy": dy, None: None}[t2]
            dx, dw, db = be.backward_train(dy, x, p, mean, rstd, w, out2, act, b if act else None)
            assert (dx is out2) if out2 is not None else dx.shape == x.shape
            assert dw.shape == db.shape == (p.c,) and dw.dtype == sd
        if not p.rms:
            y = be.forward_eval(x, p, w, b, out, act)
            assert (y is out) if out is not None else y.shape == x.shape
            got = be.backward_eval(dy, x, p, w, w, w, out, act, b if act else None)
            assert len(got) == 3 and got[1].shape == (p.c,)
            if act is None:
                be.channel_stats(x, p)
                be.channel_grad_sums(dy, x, p, w, w)
                be.channel_backward_apply(dy, x, p, w, w, w, w, w, out)
    return {_family(e) for e in xp.launches[start:]}


def run_add(be, spec, dtype, registers=True):
    """add_forward / add_backward with every out=/h_out= target the GPU tests use."""
    xp = be.xp
    p = Problem(*spec)
    sd = stats_dtype(dtype)
    w, b = xp.asarray(np.ones(p.c, sd)), xp.asarray(np.zeros(p.c, sd))
    be.row_registers = registers
    start = len(xp.launches)
    def unaligned():
        return _aligned_empty((int(np.prod(p.shape3)) + 1,), dtype)[1:].reshape(p.shape3)

    for targets in gpu_tests.ADD_OUT_TARGETS:
        x, r = (xp.asarray(np.zeros(p.shape3, dtype)) for _ in range(2))
        pick = {"x": lambda: x, "r": lambda: r, None: lambda: None, "unaligned": unaligned,
                "separate": lambda: xp.empty_like(x)}
        out, h_out = pick[targets[0]](), pick[targets[1]]()
        y, h, mean, var, rstd = be.add_forward(x, r, p, w, b, 1e-5, out, h_out)
        assert y is not h and (out is None or y is out) and (h_out is None or h is h_out)
        assert mean.shape == p.stats_shape
    for target in gpu_tests.ADD_BACKWARD_TARGETS:
        dy, dh, h = (xp.asarray(np.zeros(p.shape3, dtype)) for _ in range(3))
        pick = {"dy": lambda: dy, "dh": lambda: dh, "h": lambda: h, None: lambda: None, "unaligned": unaligned,
                "separate": lambda: xp.empty_like(dy)}
        out = pick[target]()
        dx, dw, db = be.add_backward(dy, dh, h, p, mean, rstd, w, out)
        assert out is None or dx is out
        assert dw.shape == db.shape == (p.c,)
    return {_family(e) for e in xp.launches[start:]}


# -- the tests --------------------------------------------------------------------------

def test_signatures_parsed():
    """Every kernel of every file is parsed, with the template parameters the launcher spells."""
    for file_name in KERNEL_FILES:
        for expr in name_expressions("float")[file_name]:
            name, targs = _parse_instance(expr)
            assert name in SIGNATURES and SIGNATURES[name][0] == file_name
            assert len(targs) == len(SIGNATURES[name][1]), expr


def test_variant_modules_partition_the_instances():
    """Each instance is in exactly one variant's module, the plain one holds the plain kernels."""
    variants = {PLAIN} | {(a, rms, add) for a in (0, 1, 2) for rms in (False, True) for add in (False, True)}
    for ctype in CUDA_TYPES.values():
        everything = name_expressions(ctype)
        for file_name in KERNEL_FILES:
            parts = [name_expressions(ctype, v)[file_name] for v in variants]
            flat = [e for part in parts for e in part]
            assert sorted(flat) == sorted(everything[file_name]) and len(set(flat)) == len(flat)
            assert all("act" not in _family(e) and "rms" not in _family(e) and "add" not in _family(e)
                       for e in name_expressions(ctype, PLAIN)[file_name])


@pytest.mark.parametrize("act", [None, "relu", "silu"])
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("spec", gpu_tests.PROBLEMS, ids=gpu_tests.spec_id)
def test_launches_match_signatures(fake, spec, dtype_name, act):
    """Every method on every problem of the GPU tests, with each activation, register rows or not."""
    for registers in (True, False):
        run_everything(fake, spec, _dtype(dtype_name), act, registers, outs=dtype_name == "float32")


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("spec", gpu_tests.RMS_PROBLEMS, ids=gpu_tests.spec_id)
def test_rms_launches_match_signatures(fake, spec, dtype_name):
    for registers in (True, False):
        for act in (None, "relu", "silu"):
            run_everything(fake, spec, _dtype(dtype_name), act, registers)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("spec", gpu_tests.ADD_PROBLEMS, ids=gpu_tests.spec_id)
def test_add_launches_match_signatures(fake, spec, dtype_name):
    for registers in (True, False):
        run_add(fake, spec, _dtype(dtype_name), registers)


def test_cross_sample_rms_is_refused(fake):
    p = Problem("cf", 2, 3, 4, 0, True)
    x = fake.xp.asarray(np.zeros(p.shape3, np.float32))
    w = fake.xp.asarray(np.ones(3, np.float32))
    with pytest.raises(NotImplementedError):
        fake.forward_train(x, p, w, w, 1e-5)


def _families_reached(specs, dtype, runner):
    be = fake_backend()
    seen = set()
    for spec in specs:
        for registers in (True, False):
            seen |= runner(be, spec, dtype, registers)
    return seen


def test_gpu_tests_reach_every_variant_path():
    """The GPU tests' problem lists reach every kernel family with every variant the backend has:
    activations on the register, staged and split rows, the cross-sample and eval kernels; RMS
    statistics on each row path; the residual add on each row path, with either statistics."""
    f32 = np.dtype(np.float32)
    seen = set()
    for act in ("relu", "silu"):
        seen |= _families_reached(gpu_tests.ACT_PROBLEMS, f32,
                                  lambda be, s, d, reg, a=act: run_everything(be, s, d, a, reg, outs=False))
        seen |= _families_reached(gpu_tests.RMS_PROBLEMS, f32,
                                  lambda be, s, d, reg, a=act: run_everything(be, s, d, a, reg, outs=False))
    seen |= _families_reached(gpu_tests.RMS_PROBLEMS, f32,
                              lambda be, s, d, reg: run_everything(be, s, d, None, reg, outs=False))
    seen |= _families_reached(gpu_tests.ADD_PROBLEMS, f32, run_add)
    want = set()
    for a in ("act=1", "act=2"):
        want |= {f"{k} {a}" for k in ("affine", "bn_backward_apply", "seg_grad_partial", "col_grad_partial",
                                      "row_forward_regs", "row_backward_regs", "row_forward", "row_backward",
                                      "row_apply")}
        want |= {f"{k} {a} rms" for k in ("row_forward_regs", "row_backward_regs", "row_forward", "row_backward")}
    want |= {f"{k} rms" for k in ("row_forward_regs", "row_backward_regs", "row_forward", "row_backward")}
    want |= {f"{k} {v}" for k in ("row_forward_regs", "row_backward_regs", "row_forward", "row_backward")
             for v in ("add", "rms add")}
    want |= {"seg_stats_partial add", "row_apply"}
    missing = want - seen
    assert not missing, f"the GPU tests' problems never reach: {sorted(missing)}"
