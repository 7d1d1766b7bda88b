"""The cupy backend's kernels against the NumPy reference, at the Backend level.

Every test here runs with CuPy's allocator replaced by one that fills each new
allocation with 0xFF bytes (NaN in every float format), so an output element
that a kernel fails to write shows up as NaN. Covered: each kernel problem
(cross-sample and per-sample, both layouts, shapes that take the 16-byte
vector path and shapes that cannot, rows split over blocks, rows staged in
shared memory or not, rows held in registers), each data type, bit-identical repeated runs, and
CuPy's current stream; the variants of those kernels: activations (relu, silu) forward and
backward, RMSNorm's statistics, and the residual add fused into the row norms, each on every
row path (registers, staged, split), with out= and in place. Skipped, with the registry's
reason, where the backend cannot run. tests/test_cupy_launch.py checks, without a GPU, that
these problem lists reach every kernel path of every variant.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from cnorm.backends import available_backends, get_backend_instance
from cnorm.backends.base import Problem, pre_activation, stats_dtype
from cnorm.backends.numpy_backend import NumpyBackend

WHY = available_backends(with_reasons=True).get("cupy")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(WHY is not None, reason=f"cupy backend unavailable: {WHY}")]

REF = NumpyBackend()

# (layout, n, c, s, groups): vector-friendly and unfriendly sizes of each problem kind.
PROBLEMS = [
    ("cf", 4, 3, 50, 0),  # BatchNorm, S not a multiple of the vector width
    ("cf", 8, 16, 64, 0),  # BatchNorm, vectorized
    ("cf", 3, 5, 1, 0),  # BatchNorm on (N, C) given channels-first
    ("cl", 4, 3, 50, 0),  # BatchNorm channels-last, C odd
    ("cl", 8, 64, 16, 0),  # BatchNorm channels-last, vectorized
    ("cl", 257, 40, 1, 0),  # BatchNorm1d (N, C), many chunks
    ("cf", 4, 6, 10, 1),  # GroupNorm G=1
    ("cf", 4, 6, 16, 3),  # GroupNorm
    ("cf", 2, 8, 36, 8),  # InstanceNorm
    ("cl", 16, 1, 64, 1),  # one channel, per-sample over S
    ("cl", 16, 64, 1, 1),  # LayerNorm (N, D) arrives as (N, S=1, C=D)
    ("cl", 5, 33, 1, 1),  # LayerNorm, odd width
    ("cl", 4, 12, 16, 4),  # GroupNorm channels-last, C/G = 3
    ("cl", 4, 32, 16, 4),  # GroupNorm channels-last, vectorized
    ("cl", 3, 24, 7, 24),  # InstanceNorm channels-last
    ("cf", 2, 4, 8192, 1),  # few long rows: split over blocks
    ("cl", 2, 40000, 1, 1),  # a LayerNorm row longer than shared memory
    ("cf", 1, 2, 70000, 2),  # backward without staging either array
    ("cf", 4, 8, 2048, 2),  # rows staged in shared memory (too long for registers)
    ("cl", 3, 3000, 1, 1),  # LayerNorm D=3000
    # Register rows (rows_regs.cu) of each mode, with partly filled last items,
    # several rows per block, inactive rows, and one row per 1024 threads.
    ("cl", 7, 768, 1, 1),  # LayerNorm 768: four one-warp rows per block, the last one absent
    ("cl", 64, 4096, 1, 1),  # LayerNorm 4096
    ("cf", 3, 6, 200, 3),  # GroupNorm channels-first, rows not a multiple of the threads
    ("cl", 3, 64, 96, 4),  # GroupNorm channels-last with S > 1, several warps per row
    ("cf", 2, 80, 16384, 80),  # InstanceNorm 128x128: 512 threads of 8 vectors (float64: too long, split)
]
# Activations on every kind of path: cross-sample (scalar and vector, both layouts), register
# rows of each mode, staged rows, split rows, rows without staging.
ACT_PROBLEMS = [
    ("cf", 4, 3, 50, 0),  # BatchNorm, scalar
    ("cf", 8, 16, 64, 0),  # BatchNorm, vectorized
    ("cl", 4, 3, 50, 0),  # BatchNorm channels-last, scalar
    ("cl", 8, 64, 16, 0),  # BatchNorm channels-last, vectorized
    ("cf", 4, 6, 16, 3),  # GroupNorm
    ("cl", 4, 12, 16, 4),  # GroupNorm channels-last, C/G = 3 (scalar rows)
    ("cl", 16, 64, 1, 1),  # LayerNorm, register rows (mode 0)
    ("cl", 5, 33, 1, 1),  # LayerNorm, odd width (scalar staged rows)
    ("cl", 7, 768, 1, 1),  # LayerNorm 768, four rows per block, the last one absent
    ("cf", 3, 6, 200, 3),  # register rows, mode 1
    ("cl", 3, 64, 96, 4),  # register rows, mode 2, several warps per row
    ("cf", 4, 8, 2048, 2),  # rows staged in shared memory
    ("cf", 2, 4, 8192, 1),  # few long rows: split over blocks
    ("cl", 2, 40000, 1, 1),  # a LayerNorm row longer than shared memory: split
    ("cf", 1, 2, 70000, 2),  # backward without staging either array
]
# RMSNorm (Problem.rms): the front end's rows, S == 1, over every row path.
RMS_PROBLEMS = [
    ("cl", 16, 64, 1, 1, True),  # register rows, one warp each
    ("cl", 5, 33, 1, 1, True),  # odd width: scalar staged rows
    ("cl", 7, 768, 1, 1, True),  # register rows, four per block, the last one absent
    ("cl", 64, 4096, 1, 1, True),  # register rows of several warps
    ("cl", 3, 3000, 1, 1, True),  # D = 3000
    ("cl", 4, 16384, 1, 1, True),  # few long rows: split over blocks
    ("cl", 2, 40000, 1, 1, True),  # longer than shared memory: split
    ("cf", 6, 24, 1, 1, True),  # an (N, C, 1) channels-first view
]
# The residual add fused into LayerNorm (rms False) and RMSNorm (rms True).
ADD_PROBLEMS = [
    ("cl", 16, 64, 1, 1, False),
    ("cl", 16, 64, 1, 1, True),  # register rows
    ("cl", 5, 33, 1, 1, False),
    ("cl", 5, 33, 1, 1, True),  # scalar staged rows
    ("cl", 7, 768, 1, 1, False),
    ("cl", 64, 4096, 1, 1, True),  # register rows of several warps
    ("cl", 3, 3000, 1, 1, True),
    ("cl", 4, 16384, 1, 1, False),  # few long rows: split
    ("cl", 2, 40000, 1, 1, False),
    ("cl", 2, 40000, 1, 1, True),  # longer than shared memory: split
    ("cl", 4, 96, 1, 3, False),  # three groups per row
    ("cf", 6, 24, 1, 1, True),  # (N, C, 1) channels-first: taken as channels-last
]
# (out, h_out) of add_forward, and out of add_backward, in the in-place tests: new buffers, ones
# not 16-byte aligned, and the inputs themselves (vLLM's fused_add_rms_norm is out=x, h_out=r).
ADD_OUT_TARGETS = [("separate", "separate"), ("unaligned", "unaligned"), ("x", "r"), ("r", "x"), ("x", None),
                   (None, "r"), ("unaligned", "x"), ("r", "unaligned")]
ADD_BACKWARD_TARGETS = ["separate", "unaligned", "dy", "dh", "h"]
DTYPES = ["float16", "bfloat16", "float32", "float64"]
OUT_TOL = {"float16": 1e-2, "bfloat16": 2e-2, "float32": 1e-4, "float64": 1e-10}
STAT_TOL = {"float16": 1e-4, "bfloat16": 1e-4, "float32": 1e-4, "float64": 1e-10}


def spec_id(s):
    return "{}-{}x{}x{}-g{}".format(*s) + ("-rms" if len(s) > 5 and s[5] else "")


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


@pytest.fixture(scope="module")
def backend():
    return get_backend_instance("cupy")


@pytest.fixture(autouse=True)
def nan_allocations(cp):
    """Every device allocation starts as all-0xFF bytes: NaN for every float dtype."""
    pool = cp.cuda.MemoryPool()

    def alloc(size):
        mem = pool.malloc(size)
        cp.cuda.runtime.memsetAsync(mem.ptr, 0xFF, size, cp.cuda.get_current_stream().ptr)
        return mem

    with cp.cuda.using_allocator(alloc):
        yield
    pool.free_all_blocks()


def np_dtype(name, backend):
    if name == "bfloat16":
        bf16 = backend._bfloat16()
        if bf16 is None:
            pytest.skip("this CuPy cannot make bfloat16 arrays (ml_dtypes missing or unsupported)")
        return bf16
    return np.dtype(name)


def close(got, want, tol, what):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), f"{what}: {np.count_nonzero(~np.isfinite(got))} non-finite (unwritten) values"
    scale = max(np.abs(want).max(), 1e-30)
    err = np.abs(got - want).max() / scale
    assert err <= tol, f"{what}: max error {err:.3g} of scale {scale:.3g} > {tol}"


def inputs(p: Problem, dtype, seed, offset=3.0):
    """Host x, dy (rounded to dtype), per-channel weight/bias (statistics dtype)."""
    rng = np.random.default_rng(seed)
    sd = stats_dtype(dtype)
    x = (offset + rng.standard_normal(p.shape3) * rng.uniform(0.5, 2.0)).astype(dtype)
    dy = rng.standard_normal(p.shape3).astype(dtype)
    w = rng.uniform(0.5, 1.5, p.c).astype(sd)
    b = rng.standard_normal(p.c).astype(sd)
    return x, dy, w, b


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("spec", PROBLEMS, ids=lambda s: "{}-{}x{}x{}-g{}".format(*s))
def test_matches_reference(cp, backend, spec, dtype_name):
    check_problem(cp, backend, spec, dtype_name)


@pytest.mark.parametrize("dtype_name", ["float16", "float32", "float64"])
@pytest.mark.parametrize("spec", [s for s in PROBLEMS if s[4]], ids=lambda s: "{}-{}x{}x{}-g{}".format(*s))
def test_staged_rows_match_reference(cp, backend, spec, dtype_name):
    """Per-sample rows with the register kernels switched off: the shared-memory kernels of rows.cu."""
    backend.row_registers = False
    try:
        check_problem(cp, backend, spec, dtype_name)
    finally:
        del backend.row_registers  # back to the class default


@pytest.mark.parametrize("items", [1, 2, 4])
@pytest.mark.parametrize("spec", [("cl", 9, 1024, 1, 1), ("cf", 4, 6, 512, 2), ("cl", 4, 64, 32, 4)],
                         ids=lambda s: "{}-{}x{}x{}-g{}".format(*s))
def test_register_rows_other_widths(cp, backend, spec, items):
    """Register rows with other vectors-per-thread targets (other thread counts and ITEMS)."""
    backend.row_items = items
    try:
        check_problem(cp, backend, spec, "float32")
    finally:
        del backend.row_items


@pytest.mark.parametrize("spec", [("cl", 6, 64, 1, 1), ("cl", 4, 4096, 1, 1), ("cf", 2, 8, 1024, 8),
                                  ("cl", 3, 64, 96, 4)], ids=lambda s: "{}-{}x{}x{}-g{}".format(*s))
def test_huge_values_rows(cp, backend, spec):
    """|x| ~ 1e30 float32 in register rows of one warp and of several: the squared deviations
    overflow float32, rstd and y must not (var itself is ~1e60: inf in float32)."""
    p = Problem(*spec)
    x, dy, w, b = inputs(p, np.dtype(np.float32), seed=13, offset=0.0)
    x = (x.astype(np.float64) * 1e30).astype(np.float32)
    y, mean, var, rstd = backend.forward_train(cp.asarray(x), p, cp.asarray(w), cp.asarray(b), 1e-5)
    ry, rmean, _, rrstd = REF.forward_train(x, p, w, b, 1e-5)
    close(y.get(), ry, 1e-4, "y")
    close(rstd.get(), rrstd, 1e-4, "rstd")
    close(mean.get(), rmean, 1e-4, "mean")


@pytest.mark.parametrize("spec", [("cl", 8, 256, 1, 1), ("cl", 4, 64, 16, 4)],
                         ids=lambda s: "{}-{}x{}x{}-g{}".format(*s))
def test_unaligned_parameters(cp, backend, spec):
    """weight/bias views not 16-byte aligned cannot be read as vectors and are still right."""
    p = Problem(*spec)
    x, dy, w, b = inputs(p, np.dtype(np.float32), seed=5)
    W = cp.empty(p.c + 1, dtype=np.float32)[1:]
    B = cp.empty(p.c + 1, dtype=np.float32)[1:]
    W[...], B[...] = cp.asarray(w), cp.asarray(b)
    assert W.data.ptr % 16 != 0 and B.data.ptr % 16 != 0
    X = cp.asarray(x)
    y, mean, var, rstd = backend.forward_train(X, p, W, B, 1e-5)
    ry, rmean, _, rrstd = REF.forward_train(x, p, w, b, 1e-5)
    close(y.get(), ry, 1e-4, "y")
    dx, dw, db = backend.backward_train(cp.asarray(dy), X, p, cp.asarray(rmean), cp.asarray(rrstd), W)
    rdx, rdw, rdb = REF.backward_train(dy, x, p, rmean, rrstd, w)
    close(dx.get(), rdx, 1e-4, "dx")
    close(dw.get(), rdw, 1e-4, "dweight")


def check_problem(cp, backend, spec, dtype_name):
    """Every Backend method on one problem against the reference, outputs NaN-prefilled."""
    dtype = np_dtype(dtype_name, backend)
    p = Problem(*spec)
    x, dy, w, b = inputs(p, dtype, seed=zlib.crc32(repr(spec).encode()))
    otol, stol = OUT_TOL[dtype_name], STAT_TOL[dtype_name]
    X, DY, W, B = (cp.asarray(a) for a in (x, dy, w, b))
    eps = 1e-5

    y, mean, var, rstd = backend.forward_train(X, p, W, B, eps)
    ry, rmean, rvar, rrstd = REF.forward_train(x, p, w, b, eps)
    assert y.dtype == dtype and y.shape == x.shape and mean.shape == p.stats_shape
    close(y.get(), ry, otol, "forward_train y")
    for name, got, want in (("mean", mean, rmean), ("var", var, rvar), ("rstd", rstd, rrstd)):
        assert got.dtype == rmean.dtype, f"{name} dtype {got.dtype}"
        close(got.get(), want, stol, f"forward_train {name}")

    dx, dw, db = backend.backward_train(DY, X, p, cp.asarray(rmean), cp.asarray(rrstd), W)
    rdx, rdw, rdb = REF.backward_train(dy, x, p, rmean, rrstd, w)
    assert dx.dtype == dtype and dw.shape == (p.c,) and dw.dtype == rdw.dtype
    close(dx.get(), rdx, otol, "backward_train dx")
    close(dw.get(), rdw, stol, "backward_train dweight")
    close(db.get(), rdb, stol, "backward_train dbias")

    # Per-channel constants, as eval mode and the cross-sample primitives use them.
    cm, cr = (np.random.default_rng(1).uniform(0.5, 1.5, p.c).astype(w.dtype) for _ in range(2))
    CM, CR = cp.asarray(cm), cp.asarray(cr)
    close(backend.forward_eval(X, p, W, B).get(), REF.forward_eval(x, p, w, b), otol, "forward_eval")
    got = backend.backward_eval(DY, X, p, CM, CR, W)
    want = REF.backward_eval(dy, x, p, cm, cr, w)
    for name, g, r, tol in zip(("dx", "dweight", "dbias"), got, want, (otol, stol, stol)):
        close(g.get(), r, tol, f"backward_eval {name}")
    for name, g, r in zip(("mean", "var"), backend.channel_stats(X, p), REF.channel_stats(x, p)):
        close(g.get(), r, stol, f"channel_stats {name}")
    for name, g, r in zip(("sum_dy", "sum_dy_xhat"), backend.channel_grad_sums(DY, X, p, CM, CR),
                          REF.channel_grad_sums(dy, x, p, cm, cr)):
        close(g.get(), r, stol, f"channel_grad_sums {name}")
    got = backend.channel_backward_apply(DY, X, p, CM, CR, W, CR, CM)
    close(got.get(), REF.channel_backward_apply(dy, x, p, cm, cr, w, cr, cm), otol, "channel_backward_apply")


@pytest.mark.parametrize("spec", [("cf", 3, 4, 64, 0), ("cl", 3, 64, 4, 2), ("cl", 4, 256, 1, 1)],
                         ids=lambda s: "{}-{}x{}x{}-g{}".format(*s))
def test_unaligned_input_takes_scalar_path(cp, backend, spec):
    """A view starting one element into its buffer cannot use 16-byte loads and is still right."""
    p = Problem(*spec)
    x, dy, w, b = inputs(p, np.dtype(np.float32), seed=7)
    buf = cp.empty(x.size + 1, dtype=np.float32)
    X = buf[1:].reshape(x.shape)
    X[...] = cp.asarray(x)
    assert X.data.ptr % 16 != 0 and X.flags.c_contiguous
    y, mean, var, rstd = backend.forward_train(X, p, cp.asarray(w), cp.asarray(b), 1e-5)
    ry, rmean, _, rrstd = REF.forward_train(x, p, w, b, 1e-5)
    close(y.get(), ry, 1e-4, "y")
    dx, dw, db = backend.backward_train(cp.asarray(dy), X, p, cp.asarray(rmean), cp.asarray(rrstd), cp.asarray(w))
    rdx, rdw, rdb = REF.backward_train(dy, x, p, rmean, rrstd, w)
    close(dx.get(), rdx, 1e-4, "dx")
    close(dw.get(), rdw, 1e-4, "dweight")


@pytest.mark.parametrize("spec", [("cf", 16, 8, 4096, 0), ("cl", 4096, 64, 8, 0), ("cl", 512, 1024, 1, 1),
                                  ("cf", 8, 32, 1024, 8), ("cf", 2, 4, 20000, 1)],
                         ids=lambda s: "{}-{}x{}x{}-g{}".format(*s))
def test_bit_identical_across_runs(cp, backend, spec):
    p = Problem(*spec)
    x, dy, w, b = inputs(p, np.dtype(np.float32), seed=11)
    X, DY, W, B = (cp.asarray(a) for a in (x, dy, w, b))
    runs = []
    for _ in range(2):
        y, mean, var, rstd = backend.forward_train(X, p, W, B, 1e-5)
        dx, dw, db = backend.backward_train(DY, X, p, mean, rstd, W)
        runs.append([a.get() for a in (y, mean, var, rstd, dx, dw, db)])
    for name, a, b2 in zip(("y", "mean", "var", "rstd", "dx", "dweight", "dbias"), *runs):
        assert a.tobytes() == b2.tobytes(), f"{name} differs between two identical runs"


def test_runs_on_current_stream(cp, backend):
    p = Problem("cf", 8, 4, 256, 0)
    x, dy, w, b = inputs(p, np.dtype(np.float32), seed=3)
    X, W, B = (cp.asarray(a) for a in (x, w, b))
    want = backend.forward_train(X, p, W, B, 1e-5)[0].get()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        y = backend.forward_train(X, p, W, B, 1e-5)[0]
        got = cp.asnumpy(y, stream=stream)
    stream.synchronize()
    assert got.tobytes() == want.tobytes()


def test_array_contract(cp, backend):
    assert backend.accepts(cp.zeros(3)) and not backend.accepts(np.zeros(3))
    assert "cupy" in backend.describe_expected()
    assert {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)} <= set(backend.supported_dtypes())
    assert backend.xp is cp


def _bits(a):
    h = a.get()
    return h.view(f"u{h.itemsize}").tobytes()


def _unaligned_maker(cp, x, dtype):
    """A function making a device buffer of x's shape that is not 16-byte aligned."""
    def unaligned():
        buf = cp.empty(x.size + 1, dtype=dtype)[1:].reshape(x.shape)
        assert buf.data.ptr % 16 != 0
        return buf
    return unaligned


def _check_out_targets(cp, calls, x, dy, unaligned, label=""):
    """Each ``calls[name] = (backward, call(X, DY, out))`` with out a separate buffer, an
    unaligned one, x itself and (backward) dy itself: the plain call's bits, out returned."""
    for name, (backward, call) in calls.items():
        want = [_bits(a) for a in call(cp.asarray(x), cp.asarray(dy), None)]
        for target in ("separate", "unaligned", "x") + (("dy",) if backward else ()):
            Xt, DYt = cp.asarray(x), cp.asarray(dy)
            out = {"separate": lambda: cp.empty_like(Xt), "unaligned": unaligned, "x": lambda: Xt,
                   "dy": lambda: DYt}[target]()
            got = call(Xt, DYt, out)
            assert got[0] is out, f"{name}{label} out={target}: not returned as the result"
            for i, (g, wb) in enumerate(zip(got, want)):
                assert _bits(g) == wb, f"{name}{label} out={target}: result {i} differs from the plain call's"


@pytest.mark.parametrize("registers", [True, False], ids=["registers", "staged"])
@pytest.mark.parametrize("dtype_name", ["float16", "float32", "float64"])
@pytest.mark.parametrize("spec", PROBLEMS, ids=lambda s: "{}-{}x{}x{}-g{}".format(*s))
def test_out_and_in_place_are_bit_identical(cp, backend, spec, dtype_name, registers):
    """``out=`` on every method and kernel path: a separate buffer, one not 16-byte aligned (scalar
    stores or scratch), and in place (y over x; dx over dy and over x) give the plain call's bits,
    dweight/dbias included, and return ``out`` itself. A launch that read an input after a kernel
    wrote the output over it would differ."""
    if not registers and not spec[4]:
        pytest.skip("cross-sample problems do not use the row kernels")
    dtype = np_dtype(dtype_name, backend)
    p = Problem(*spec)
    x, dy, w, b = inputs(p, dtype, seed=zlib.crc32(repr(spec).encode()) + 1)
    W, B = cp.asarray(w), cp.asarray(b)
    cm, cr = (np.random.default_rng(2).uniform(0.5, 1.5, p.c).astype(w.dtype) for _ in range(2))
    CM, CR = cp.asarray(cm), cp.asarray(cr)

    unaligned = _unaligned_maker(cp, x, dtype)

    backend.row_registers = registers
    try:
        X = cp.asarray(x)
        plain_fwd = backend.forward_train(X, p, W, B, 1e-5)
        mean, rstd = plain_fwd[1], plain_fwd[3]
        calls = {
            "forward_train": (False, lambda X, DY, out: backend.forward_train(X, p, W, B, 1e-5, out)),
            "forward_eval": (False, lambda X, DY, out: (backend.forward_eval(X, p, W, B, out),)),
            "backward_train": (True, lambda X, DY, out: backend.backward_train(DY, X, p, mean, rstd, W, out)),
            "backward_eval": (True, lambda X, DY, out: backend.backward_eval(DY, X, p, CM, CR, W, out)),
            "channel_backward_apply": (True, lambda X, DY, out: (
                backend.channel_backward_apply(DY, X, p, CM, CR, W, CR, CM, out),)),
        }
        _check_out_targets(cp, calls, x, dy, unaligned)
    finally:
        del backend.row_registers


# -- activations, RMSNorm, the fused residual add ------------------------------------------

def away_from_kink(dy, x, p: Problem, mean, rstd, w, b, act):
    """dy with zeros where relu's derivative could differ between float32 and float64 arithmetic
    (|z| < 1e-3): there g = dy·relu'(z) is 0 whichever side of the kink z lands on."""
    if act != "relu":
        return dy
    z = pre_activation(np, x, p, mean, rstd, w, b, np.float64)
    return np.where(np.abs(z) > 1e-3, dy, 0).astype(dy.dtype)


def check_variant(cp, backend, spec, dtype_name, act):
    """forward_train/backward_train (and, without RMS, forward_eval/backward_eval) with ``act``
    against the reference, outputs NaN-prefilled."""
    dtype = np_dtype(dtype_name, backend)
    p = Problem(*spec)
    x, dy, w, b = inputs(p, dtype, seed=zlib.crc32(repr((spec, act)).encode()))
    otol, stol = OUT_TOL[dtype_name], STAT_TOL[dtype_name]
    X, W, B = (cp.asarray(a) for a in (x, w, b))
    eps = 1e-5

    y, mean, var, rstd = backend.forward_train(X, p, W, B, eps, act=act)
    ry, rmean, rvar, rrstd = REF.forward_train(x, p, w, b, eps, act=act)
    assert y.dtype == dtype and y.shape == x.shape and mean.shape == p.stats_shape
    close(y.get(), ry, otol, f"forward_train {act} y")
    if p.rms:
        assert not mean.get().any(), "RMSNorm's mean is not returned as zeros"
    else:
        close(mean.get(), rmean, stol, "forward_train mean")
    close(var.get(), rvar, stol, "forward_train var")
    close(rstd.get(), rrstd, stol, "forward_train rstd")

    dy = away_from_kink(dy, x, p, rmean, rrstd, w, b, act)
    got = backend.backward_train(cp.asarray(dy), X, p, cp.asarray(rmean), cp.asarray(rrstd), W, act=act,
                                 bias=None if act is None else B)
    want = REF.backward_train(dy, x, p, rmean, rrstd, w, act=act, bias=None if act is None else b)
    for name, g, r, tol in zip(("dx", "dweight", "dbias"), got, want, (otol, stol, stol)):
        assert g.dtype == r.dtype, f"backward_train {name} dtype {g.dtype}"
        close(g.get(), r, tol, f"backward_train {act} {name}")
    if p.rms:
        return
    cm, cr = (np.random.default_rng(1).uniform(0.5, 1.5, p.c).astype(w.dtype) for _ in range(2))
    close(backend.forward_eval(X, p, W, B, act=act).get(), REF.forward_eval(x, p, w, b, act=act), otol,
          f"forward_eval {act}")
    dye = away_from_kink(dy, x, Problem(p.layout, p.n, p.c, p.s), cm, cr, w, b, act)
    got = backend.backward_eval(cp.asarray(dye), X, p, cp.asarray(cm), cp.asarray(cr), W, act=act,
                                bias=None if act is None else B)
    want = REF.backward_eval(dye, x, p, cm, cr, w, act=act, bias=None if act is None else b)
    for name, g, r, tol in zip(("dx", "dweight", "dbias"), got, want, (otol, stol, stol)):
        close(g.get(), r, tol, f"backward_eval {act} {name}")


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("spec", ACT_PROBLEMS, ids=spec_id)
def test_activations_match_reference(cp, backend, spec, dtype_name, act):
    check_variant(cp, backend, spec, dtype_name, act)


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("dtype_name", ["float16", "float32"])
@pytest.mark.parametrize("spec", [s for s in ACT_PROBLEMS + RMS_PROBLEMS if s[4]], ids=spec_id)
def test_activations_staged_rows_match_reference(cp, backend, spec, dtype_name, act):
    """Activations (and RMSNorm) on the shared-memory kernels of rows.cu: register rows off."""
    backend.row_registers = False
    try:
        check_variant(cp, backend, spec, dtype_name, act)
    finally:
        del backend.row_registers


@pytest.mark.parametrize("act", [None, "relu", "silu"])
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("spec", RMS_PROBLEMS, ids=spec_id)
def test_rms_matches_reference(cp, backend, spec, dtype_name, act):
    check_variant(cp, backend, spec, dtype_name, act)


@pytest.mark.parametrize("dtype_name", ["float16", "float32"])
@pytest.mark.parametrize("spec", RMS_PROBLEMS, ids=spec_id)
def test_rms_staged_rows_match_reference(cp, backend, spec, dtype_name):
    backend.row_registers = False
    try:
        check_variant(cp, backend, spec, dtype_name, None)
    finally:
        del backend.row_registers


@pytest.mark.parametrize("spec", [("cl", 6, 64, 1, 1, True), ("cl", 4, 4096, 1, 1, True)], ids=spec_id)
def test_huge_values_rms_rows(cp, backend, spec):
    """|x| ~ 1e30 float32 RMSNorm rows: the squares overflow float32, rstd and y must not."""
    p = Problem(*spec)
    x, dy, w, b = inputs(p, np.dtype(np.float32), seed=17, offset=0.0)
    x = (x.astype(np.float64) * 1e30).astype(np.float32)
    y, mean, var, rstd = backend.forward_train(cp.asarray(x), p, cp.asarray(w), cp.asarray(b), 1e-5)
    ry, _, _, rrstd = REF.forward_train(x, p, w, b, 1e-5)
    close(y.get(), ry, 1e-4, "y")
    close(rstd.get(), rrstd, 1e-4, "rstd")


def add_inputs(p: Problem, dtype, seed):
    """x, r, dy, dh (rounded to dtype) and weight, bias (statistics dtype) for the fused add."""
    x, dy, w, b = inputs(p, dtype, seed)
    rng = np.random.default_rng(seed + 1)
    r = (rng.standard_normal(p.shape3) * 2.0).astype(dtype)
    dh = rng.standard_normal(p.shape3).astype(dtype)
    return x, r, dy, dh, w, b


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("spec", ADD_PROBLEMS, ids=spec_id)
def test_add_matches_reference(cp, backend, spec, dtype_name):
    """add_forward: h bit-identical to the reference's x + r (added in the statistics dtype, then
    rounded), y and the statistics close; add_backward: dx = dh + the norm's dx, dweight, dbias."""
    dtype = np_dtype(dtype_name, backend)
    p = Problem(*spec)
    x, r, dy, dh, w, b = add_inputs(p, dtype, zlib.crc32(repr(spec).encode()))
    otol, stol = OUT_TOL[dtype_name], STAT_TOL[dtype_name]
    W, B = cp.asarray(w), cp.asarray(b)
    y, h, mean, var, rstd = backend.add_forward(cp.asarray(x), cp.asarray(r), p, W, B, 1e-5)
    ry, rh, rmean, rvar, rrstd = REF.add_forward(x, r, p, w, b, 1e-5)
    assert h.dtype == dtype and y.dtype == dtype and h.shape == x.shape and mean.shape == p.stats_shape
    assert _bits(h) == rh.view(f"u{rh.itemsize}").tobytes(), "h differs from the reference's x + r"
    close(y.get(), ry, otol, "add_forward y")
    for name, got, want in (("mean", mean, rmean), ("var", var, rvar), ("rstd", rstd, rrstd)):
        assert got.dtype == want.dtype
        if p.rms and name == "mean":
            assert not got.get().any()
        else:
            close(got.get(), want, stol, f"add_forward {name}")
    got = backend.add_backward(cp.asarray(dy), cp.asarray(dh), cp.asarray(rh), p, cp.asarray(rmean),
                               cp.asarray(rrstd), W)
    want = REF.add_backward(dy, dh, rh, p, rmean, rrstd, w)
    assert got[0].dtype == dtype and got[0].shape == x.shape
    for name, g, r_, tol in zip(("dx", "dweight", "dbias"), got, want, (otol, stol, stol)):
        close(g.get(), r_, tol, f"add_backward {name}")


@pytest.mark.parametrize("registers", [True, False], ids=["registers", "staged"])
@pytest.mark.parametrize("dtype_name", ["float16", "float32", "float64"])
@pytest.mark.parametrize("spec", ADD_PROBLEMS, ids=spec_id)
def test_add_out_and_in_place_are_bit_identical(cp, backend, spec, dtype_name, registers):
    """add_forward's out/h_out and add_backward's out on every row path: new buffers, buffers not
    16-byte aligned, and the inputs themselves (y over x and h over r, and the other way round;
    dx over dy, dh or h) give the plain call's bits and return the given buffers."""
    dtype = np_dtype(dtype_name, backend)
    p = Problem(*spec)
    x, r, dy, dh, w, b = add_inputs(p, dtype, zlib.crc32(repr(spec).encode()) + 1)
    W, B = cp.asarray(w), cp.asarray(b)

    unaligned = _unaligned_maker(cp, x, dtype)

    backend.row_registers = registers
    try:
        plain = backend.add_forward(cp.asarray(x), cp.asarray(r), p, W, B, 1e-5)
        want = [_bits(a) for a in plain]
        mean, rstd = plain[2], plain[4]
        for out_t, h_t in ADD_OUT_TARGETS:
            X, R = cp.asarray(x), cp.asarray(r)
            pick = {"separate": lambda: cp.empty_like(X), "unaligned": unaligned, "x": lambda: X, "r": lambda: R,
                    None: lambda: None}
            out, h_out = pick[out_t](), pick[h_t]()
            got = backend.add_forward(X, R, p, W, B, 1e-5, out, h_out)
            assert out is None or got[0] is out, f"out={out_t}: y not returned in out"
            assert h_out is None or got[1] is h_out, f"h_out={h_t}: h not returned in h_out"
            for i, (g, wb) in enumerate(zip(got, want)):
                assert _bits(g) == wb, f"add_forward out={out_t} h_out={h_t}: result {i} differs"
        H = plain[1]
        h = H.get()
        bwant = [_bits(a) for a in backend.add_backward(cp.asarray(dy), cp.asarray(dh), H, p, mean, rstd, W)]
        for target in ADD_BACKWARD_TARGETS:
            DY, DH, Ht = cp.asarray(dy), cp.asarray(dh), cp.asarray(h)
            out = {"separate": lambda: cp.empty_like(DY), "unaligned": unaligned, "dy": lambda: DY,
                   "dh": lambda: DH, "h": lambda: Ht}[target]()
            got = backend.add_backward(DY, DH, Ht, p, mean, rstd, W, out)
            assert got[0] is out, f"add_backward out={target}: not returned as the result"
            for i, (g, wb) in enumerate(zip(got, bwant)):
                assert _bits(g) == wb, f"add_backward out={target}: result {i} differs"
    finally:
        del backend.row_registers


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("registers", [True, False], ids=["registers", "staged"])
@pytest.mark.parametrize("dtype_name", ["float16", "float32"])
@pytest.mark.parametrize("spec", ACT_PROBLEMS + RMS_PROBLEMS, ids=spec_id)
def test_variants_out_and_in_place_are_bit_identical(cp, backend, spec, dtype_name, registers, act):
    """``out=`` with an activation (and RMSNorm's rows): a separate buffer, one not 16-byte aligned,
    and in place (y over x; dx over dy and over x) give the plain call's bits."""
    if not registers and not spec[4]:
        pytest.skip("cross-sample problems do not use the row kernels")
    dtype = np_dtype(dtype_name, backend)
    p = Problem(*spec)
    x, dy, w, b = inputs(p, dtype, seed=zlib.crc32(repr(spec).encode()) + 2)
    W, B = cp.asarray(w), cp.asarray(b)
    CM, CR = (cp.asarray(np.random.default_rng(3).uniform(0.5, 1.5, p.c).astype(w.dtype)) for _ in range(2))

    unaligned = _unaligned_maker(cp, x, dtype)

    backend.row_registers = registers
    try:
        _, mean, _, rstd = backend.forward_train(cp.asarray(x), p, W, B, 1e-5, act=act)
        calls = {
            "forward_train": (False, lambda X, DY, out: backend.forward_train(X, p, W, B, 1e-5, out, act)),
            "backward_train": (True, lambda X, DY, out: backend.backward_train(DY, X, p, mean, rstd, W, out, act,
                                                                               B)),
        }
        if not p.rms:
            calls["forward_eval"] = (False, lambda X, DY, out: (backend.forward_eval(X, p, W, B, out, act),))
            calls["backward_eval"] = (True, lambda X, DY, out: backend.backward_eval(DY, X, p, CM, CR, W, out, act,
                                                                                     B))
        _check_out_targets(cp, calls, x, dy, unaligned, f" {act}")
    finally:
        del backend.row_registers


@pytest.mark.parametrize("spec", [("cl", 512, 1024, 1, 1, True), ("cf", 8, 32, 1024, 8), ("cl", 2, 40000, 1, 1),
                                  ("cf", 16, 8, 4096, 0)], ids=spec_id)
def test_variants_bit_identical_across_runs(cp, backend, spec):
    p = Problem(*spec)
    x, dy, w, b = inputs(p, np.dtype(np.float32), seed=19)
    X, DY, W, B = (cp.asarray(a) for a in (x, dy, w, b))
    runs = []
    for _ in range(2):
        y, mean, var, rstd = backend.forward_train(X, p, W, B, 1e-5, act="silu")
        dx, dw, db = backend.backward_train(DY, X, p, mean, rstd, W, act="silu", bias=B)
        res = [y, mean, var, rstd, dx, dw, db]
        if p.groups and p.s == 1:
            res += list(backend.add_forward(X, DY, p, W, B, 1e-5))
            res += list(backend.add_backward(DY, X, res[-4], p, res[-3], res[-1], W))
        runs.append([a.get() for a in res])
    for i, (a, b2) in enumerate(zip(*runs)):
        assert a.tobytes() == b2.tobytes(), f"result {i} differs between two identical runs"


@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("spec", [("cl", 8, 256, 1, 1), ("cl", 4, 64, 16, 4), ("cl", 8, 256, 1, 1, True)],
                         ids=spec_id)
def test_unaligned_parameters_with_variants(cp, backend, spec, act):
    """weight/bias views not 16-byte aligned, with an activation (backward then reads bias as well)
    and RMSNorm's rows, and the fused add: still right."""
    p = Problem(*spec)
    x, dy, w, b = inputs(p, np.dtype(np.float32), seed=23)
    W = cp.empty(p.c + 1, dtype=np.float32)[1:]
    B = cp.empty(p.c + 1, dtype=np.float32)[1:]
    W[...], B[...] = cp.asarray(w), cp.asarray(b)
    assert W.data.ptr % 16 != 0 and B.data.ptr % 16 != 0
    X = cp.asarray(x)
    y, mean, var, rstd = backend.forward_train(X, p, W, B, 1e-5, act=act)
    ry, rmean, _, rrstd = REF.forward_train(x, p, w, b, 1e-5, act=act)
    close(y.get(), ry, 1e-4, "y")
    dy = away_from_kink(dy, x, p, rmean, rrstd, w, b, act)
    dx, dw, db = backend.backward_train(cp.asarray(dy), X, p, cp.asarray(rmean), cp.asarray(rrstd), W, act=act,
                                        bias=None if act is None else B)
    rdx, rdw, rdb = REF.backward_train(dy, x, p, rmean, rrstd, w, act=act, bias=None if act is None else b)
    close(dx.get(), rdx, 1e-4, "dx")
    close(dw.get(), rdw, 1e-4, "dweight")
    close(db.get(), rdb, 1e-4, "dbias")
    if p.s == 1 and act is None:
        r = np.random.default_rng(29).standard_normal(p.shape3).astype(np.float32)
        y, h, mean, var, rstd = backend.add_forward(X, cp.asarray(r), p, W, B, 1e-5)
        ry, rh, rmean, _, rrstd = REF.add_forward(x, r, p, w, b, 1e-5)
        close(y.get(), ry, 1e-4, "add y")
        dh = np.random.default_rng(31).standard_normal(p.shape3).astype(np.float32)
        got = backend.add_backward(cp.asarray(dy), cp.asarray(dh), h, p, mean, rstd, W)
        want = REF.add_backward(dy, dh, rh, p, rmean, rrstd, w)
        close(got[0].get(), want[0], 1e-4, "add dx")
