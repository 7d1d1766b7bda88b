"""Scratch memory of the "cython" per-sample backward: bounded by a constant,
not by the row length or the batch, at every CPU level this machine runs.

tracemalloc sees every NumPy allocation (the kernels' outputs and scratch are
NumPy arrays), so its peak during a call, less what the call returns, is what
the call needed besides its results.
"""

import tracemalloc

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import cnorm
from cnorm import _cpu
from cnorm._dtypes import BFLOAT16
from cnorm.backends.base import Problem
from cnorm.backends.cython_backend import CythonBackend

K = CythonBackend()
MIB = 1 << 20
# Per-row constants and one tile per thread: far below this for any row length.
SCRATCH_MAX = 1 * MIB


@pytest.fixture(autouse=True, params=list(reversed(_cpu.usable_levels())))
def cpu_level(request):
    with _cpu.use_level(request.param):
        yield request.param


@pytest.fixture
def restore_threads():
    before = cnorm.get_num_threads()
    yield
    cnorm.set_num_threads(before)


def _traced_peak(f):
    """f()'s result and the peak of traced memory during the call."""
    tracemalloc.start()
    try:
        out = f()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return out, peak


def _nbytes(arrays):
    return sum(a.nbytes for a in arrays if a is not None)


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want))) / max(1.0, float(np.max(np.abs(want))))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("c", [(1 << 20) + 37, 1 << 22])
def test_layer_norm_backward_scratch_does_not_grow_with_the_row(c, affine, restore_threads):
    """Two rows of 1M-4M values: the backward's scratch stays under SCRATCH_MAX
    (it once took 16 bytes per value and block, plus as much per thread), results
    match the NumPy reference and are identical at 1 and 2 threads."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, c), dtype=np.float32) * 2 + 1
    dy = rng.standard_normal((2, c), dtype=np.float32)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32) if affine else None
    b = rng.standard_normal(c).astype(np.float32) if affine else None
    p = Problem("cl", 2, c, 1, 1)
    results = {}
    for nt in (1, 2):
        with threadpool_limits(limits=nt, user_api="openmp"):
            cnorm.set_num_threads(nt)
            _, saved = cnorm.layer_norm_forward(x, (c,), w, b, 1e-5, backend="cython")
            out, peak = _traced_peak(lambda: cnorm.layer_norm_backward(dy, x, saved, w))
            # the front end's parameter-sized vectors (a weight of ones, a bias of
            # zeros, the dweight and dbias it drops without affine) are not scratch
            assert peak - _nbytes(out) - 4 * c * 4 <= SCRATCH_MAX, f"{nt} threads: peak {peak / MIB:.1f} MiB"
            # the kernel alone: everything it allocates besides its outputs
            wk = w if affine else np.ones(c, np.float32)
            kout, kpeak = _traced_peak(lambda: K.backward_train(dy, x, p, saved.mean, saved.rstd, wk))
            assert kpeak - _nbytes(kout) <= SCRATCH_MAX, f"{nt} threads: kernel peak {kpeak / MIB:.1f} MiB"
            assert _cpu.K.last_threads() == nt
            for a, k in zip(out, kout):
                assert a is None or a.tobytes() == k.tobytes()
        results[nt] = out
    for a1, a2 in zip(results[1], results[2]):
        assert (a1 is None) == (a2 is None) and (a1 is None or a1.tobytes() == a2.tobytes())
    _, rsaved = cnorm.layer_norm_forward(x, (c,), w, b, 1e-5, backend="numpy")
    want = cnorm.layer_norm_backward(dy, x, rsaved, w)
    for name, got, ref in zip(("dx", "dweight", "dbias"), results[1], want):
        assert (got is None) == (ref is None), name
        if got is not None:
            assert _rel_err(got, ref) <= 1e-5, name


@pytest.mark.parametrize("layout, c, s, g", [
    ("cl", 16384, 1, 1),      # LayerNorm rows of 16384: fused sample blocks
    ("cf", 16384, 2, 16384),  # InstanceNorm
    ("cf", 16384, 2, 4),      # GroupNorm, channels-first
    ("cl", 16384, 2, 4),      # GroupNorm, channels-last
], ids=["layer_norm", "instance_norm", "group_norm-cf", "group_norm-cl"])
def test_per_sample_backward_scratch_does_not_grow_with_the_batch(layout, c, s, g, restore_threads):
    """The dweight/dbias partials (C doubles per sample block) stop growing with
    the batch at their bound: a batch four times larger needs no more scratch
    (once up to 64 blocks of C doubles twice)."""
    cnorm.set_num_threads(2)
    rng = np.random.default_rng(4)
    scratch = {}
    for n in (64, 256) if s == 1 else (16, 64):
        p = Problem(layout, n, c, s, g)
        x = rng.standard_normal(p.shape3, dtype=np.float32)
        dy = rng.standard_normal(p.shape3, dtype=np.float32)
        w = rng.uniform(0.5, 1.5, c).astype(np.float32)
        _, mean, _, rstd = K.forward_train(x, p, w, np.zeros(c, np.float32), 1e-5)
        out, peak = _traced_peak(lambda: K.backward_train(dy, x, p, mean, rstd, w))
        scratch[n] = peak - _nbytes(out)
    small, large = sorted(scratch)
    assert scratch[large] <= scratch[small] + 64 * 1024, {k: f"{v / MIB:.2f} MiB" for k, v in scratch.items()}


@pytest.mark.parametrize("norm", ["layer_norm", "batch_norm_cl"])
def test_large_partials_are_kept_between_calls(norm):
    """The block partials of a backward (here 1 MiB: LayerNorm's dweight/dbias per
    sample block, BatchNorm channels-last's sums per row block) are kept by the
    calling thread: under glibc's default policy a freed block of that size can
    go back to the system, so each call would page-fault fresh memory. With
    out=, a repeated call allocates nothing but its small results."""
    rng = np.random.default_rng(3)
    shape = (2048, 1024)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    w = np.ones(shape[1], np.float32)
    if norm == "layer_norm":
        _, saved = cnorm.layer_norm_forward(x, shape[1], w, w, backend="cython")
        call = lambda out: cnorm.layer_norm_backward(dy, x, saved, w, out=out)  # noqa: E731
    else:
        _, saved = cnorm.batch_norm_forward(x, w, w, backend="cython")
        call = lambda out: cnorm.batch_norm_backward(dy, x, saved, w, out=out)  # noqa: E731
    out = np.empty_like(x)
    call(out)
    _, peak = _traced_peak(lambda: call(out))
    assert peak < 64 * 1024, f"{peak} bytes allocated by a repeated call"


def _aligned(a):
    return np.asarray(a).ctypes.data % 64 == 0


@pytest.mark.parametrize("dt", ["float32", "bfloat16", "float64"])
def test_large_results_start_on_a_cache_line(dt):
    """Results of 64 KiB or more start on a 64-byte boundary (NumPy's own large arrays
    start 16 bytes past a line or page under glibc, and every vector access of them
    straddles two lines); the values are the kernels' as always."""
    if dt == "bfloat16" and BFLOAT16 is None:
        pytest.skip("ml_dtypes (bfloat16) not installed")
    dtype = BFLOAT16 if dt == "bfloat16" else np.dtype(dt)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 64, 33, 17)).astype(dtype)   # 287 232 values
    dy = rng.standard_normal(x.shape).astype(dtype)
    xcl = np.moveaxis(np.moveaxis(x, 1, -1).copy(), -1, 1)    # channels-last strides
    w = np.ones(64, np.float64 if dt == "float64" else np.float32)
    rm, rv = np.zeros_like(w), np.ones_like(w)
    outs = []
    for xx in (x, xcl):
        for act in (None, "relu", "silu"):
            y, s = cnorm.batch_norm_forward(xx, w, w, activation=act, backend="cython")
            outs += [y, cnorm.batch_norm_backward(dy, xx, s, w)[0]]
        y, s = cnorm.batch_norm_forward(xx, w, w, rm.copy(), rv.copy(), training=False, backend="cython")
        outs += [y, cnorm.batch_norm_backward(dy, xx, s, w)[0]]
        y, s = cnorm.group_norm_forward(xx, 8, w, w, backend="cython")
        outs += [y, cnorm.group_norm_backward(dy, xx, s, w)[0]]
    rows = x.reshape(-1, 561)
    y, s = cnorm.layer_norm_forward(rows, 561, backend="cython")
    outs += [y, cnorm.layer_norm_backward(rows, rows, s)[0]]
    y, s = cnorm.rms_norm_forward(rows, 561, backend="cython")
    outs += [y, cnorm.rms_norm_backward(rows, rows, s)[0]]
    y, h, s = cnorm.add_layer_norm_forward(rows, rows, 561, backend="cython")
    outs += [y, h, cnorm.add_layer_norm_backward(rows, rows, h, s)[0]]
    for i, a in enumerate(outs):
        assert a.nbytes >= 1 << 16 and _aligned(a), (i, np.asarray(a).ctypes.data % 64)
