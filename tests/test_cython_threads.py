"""The "cython" backend's own promises, at every CPU level this machine runs:
reference agreement on a grid of kernel problems, bit-identical results for
any thread count, thread limits honoured, and correct results under
concurrent calls from Python threads.

The parametrized suite (conftest's ``backend`` fixture) checks every backend
through the public API; this file works at the Backend level, where the
kernel problems — layouts, cross/per-sample, block splits — are chosen
directly.
"""

import itertools
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import cnorm
from cnorm import _cpu
from cnorm._dtypes import BFLOAT16, FLOAT16
from cnorm.backends.base import Problem
from cnorm.backends.cython_backend import CythonBackend
from cnorm.backends.numpy_backend import NumpyBackend

K = CythonBackend()
R = NumpyBackend()


@pytest.fixture(autouse=True, params=list(reversed(_cpu.usable_levels())))
def cpu_level(request):
    """Every test here at every CPU level this machine runs (the kernels differ per level)."""
    with _cpu.use_level(request.param):
        yield request.param

# (n, c, s): odd sizes, S = 1, one group per channel, channels that split into
# several statistics blocks (S > 65536, N·S > 65536 rows), C below any thread count,
# and runs long enough to be swept in prefetch pieces (S > 1536) with C >= 4 threads.
SIZES = [(3, 5, 7), (1, 4, 9), (7, 3, 1), (2, 6, 33), (5, 8, 300), (64, 3, 1100),
         (2, 2, 70000), (4097, 5, 1), (3, 64, 17), (2, 12, 1600)]
OFFSET = 1e4  # |mean| = 1e4·std: catches E[x²] - E[x]² and float32 mean rounding


def _groups(c):
    """Cross-sample, one group, a group per channel, and two groups when C allows."""
    return sorted({0, 1, c} | ({2} if c % 2 == 0 else set()))


def _grid():
    for layout, (n, c, s), dt in itertools.product(("cf", "cl"), SIZES, (np.float32, np.float64)):
        for g in _groups(c):
            p = Problem(layout, n, c, s, g)
            if p.group_size >= 2:
                yield pytest.param(p, dt, id=f"{layout}-{n}x{c}x{s}-g{g}-{np.dtype(dt).name}")


HALVES = [pytest.param(FLOAT16, id="float16"), pytest.param(BFLOAT16, id="bfloat16")]


def _data(p, dt, seed=0, offset=OFFSET):
    """x and dy in dt; weight and bias in the statistics dtype (float32 for half data)."""
    rng = np.random.default_rng(seed)
    pt = np.float64 if dt == np.float64 else np.float32
    x = (rng.standard_normal(p.shape3) + offset).astype(dt)
    dy = rng.standard_normal(p.shape3).astype(dt)
    w = rng.uniform(0.5, 1.5, p.c).astype(pt)
    b = rng.standard_normal(p.c).astype(pt)
    return x, dy, w, b


def _close(got, want, scale, dt, what, floor=0.0):
    """Max error relative to ``scale`` within 2e-5 (float32) or 1e-12 (float64),
    plus ``floor``: an absolute error no algorithm can avoid."""
    tol = (2e-5 if dt == np.float32 else 1e-12) + floor / scale
    err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)))) / scale
    assert err <= tol, f"{what}: max error {err:.2e} x scale {scale:.3g} exceeds {tol:.0e}"


@pytest.mark.parametrize("p, dt", list(_grid()))
def test_matches_reference(p, dt):
    x, dy, w, b = _data(p, dt)
    # The float64 reference loses ~1e-10 to |mean| = 1e4 summing along strided
    # axes; x - OFFSET is exact here, so the reference runs on centred data.
    xr = x.astype(np.float64) - OFFSET
    xr = xr.astype(dt) if dt == np.float64 else x
    shift = OFFSET if dt == np.float64 else 0.0
    eps = 1e-5

    y, mean, var, rstd = K.forward_train(x, p, w, b, eps)
    ry, rmean, rvar, rrstd = R.forward_train(xr, p, w, b, eps)
    assert y.dtype == x.dtype and y.shape == x.shape and mean.shape == p.stats_shape
    # float64 cannot hold a mean of 1e4 closer than half an ulp (9e-13):
    # y and dx carry that times rstd whatever the algorithm.
    floor = 2 * np.finfo(np.float64).eps * OFFSET * float(np.max(rrstd)) if dt == np.float64 else 0.0
    _close(y, ry, 1.0 + np.abs(b).max(), dt, "y", floor)
    _close(mean - shift, rmean, 1.0, dt, "mean")
    _close(var, rvar, 1.0, dt, "var")
    _close(rstd, rrstd, 1.0, dt, "rstd")

    dx, dw, db = K.backward_train(dy, x, p, mean, rstd, w)
    rdx, rdw, rdb = R.backward_train(dy, xr, p, (mean - shift).astype(dt), rstd, w)
    _close(dx, rdx, np.abs(rdx).max(), dt, "dx", floor * float(np.max(rrstd)) * np.abs(dy).max())
    _close(dw, rdw, np.abs(rdw).max() + 1.0, dt, "dweight")
    _close(db, rdb, np.abs(rdb).max() + 1.0, dt, "dbias")

    # eval mode: constant per-channel statistics, one multiply-add forward
    cm = (OFFSET + np.linspace(-1, 1, p.c)).astype(dt)
    cr = np.linspace(0.5, 2.0, p.c).astype(dt)
    for got, want in zip(K.backward_eval(dy, x, p, cm, cr, w),
                         R.backward_eval(dy, xr, p, (cm - shift).astype(dt), cr, w)):
        _close(got, want, np.abs(want).max() + 1.0, dt, "backward_eval")
    scale, shift_c = (w * cr).astype(dt), (b - cm * w * cr).astype(dt)
    _close(K.forward_eval(x, p, scale, shift_c), R.forward_eval(x, p, scale, shift_c),
           OFFSET, dt, "forward_eval")


def _half_grid():
    for layout, (n, c, s) in itertools.product(("cf", "cl"), SIZES):
        for g in _groups(c):
            p = Problem(layout, n, c, s, g)
            if p.group_size >= 2:
                yield pytest.param(p, id=f"{layout}-{n}x{c}x{s}-g{g}")


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want))) / max(1.0, float(np.max(np.abs(want))))


@pytest.mark.parametrize("dt", HALVES)
@pytest.mark.parametrize("p", list(_half_grid()))
def test_half_matches_reference(p, dt):
    """float16/bfloat16 storage: float32 statistics as exact as float32 data's, outputs
    within a couple of half ulps of the float64 reference on the same (rounded) inputs."""
    x, dy, w, b = _data(p, dt, offset=3.0)
    y, mean, var, rstd = K.forward_train(x, p, w, b, 1e-5)
    ry, rmean, rvar, rrstd = R.forward_train(x, p, w, b, 1e-5)
    assert y.dtype == dt and mean.dtype == var.dtype == rstd.dtype == np.float32
    ulp = 2.0 ** -8 if dt == BFLOAT16 else 2.0 ** -11
    assert _rel_err(y, ry) <= 2 * ulp
    for got, want, what in ((mean, rmean, "mean"), (var, rvar, "var"), (rstd, rrstd, "rstd")):
        assert _rel_err(got, want) <= 1e-6, what
    dx, dw, db = K.backward_train(dy, x, p, mean, rstd, w)
    rdx, rdw, rdb = R.backward_train(dy, x, p, mean, rstd, w)
    assert dx.dtype == dt and dw.dtype == db.dtype == np.float32
    assert _rel_err(dx, rdx) <= 2 * ulp
    assert _rel_err(dw, rdw) <= 1e-5 * max(1.0, np.sqrt(p.n * p.s))
    assert _rel_err(db, rdb) <= 1e-5 * max(1.0, np.sqrt(p.n * p.s))
    cm = (3.0 + np.linspace(-1, 1, p.c)).astype(np.float32)
    cr = np.linspace(0.5, 2.0, p.c).astype(np.float32)
    for got, want in zip(K.backward_eval(dy, x, p, cm, cr, w), R.backward_eval(dy, x, p, cm, cr, w)):
        assert got.dtype == want.dtype and _rel_err(got, want) <= 2 * ulp
    got, want = K.forward_eval(x, p, w, b), R.forward_eval(x, p, w, b)
    assert got.dtype == dt and _rel_err(got, want) <= 2 * ulp


@pytest.mark.parametrize("p, dt", [c for c in _grid() if c.values[0].cross_sample])
def test_sync_primitives_match_reference(p, dt):
    x, dy, w, _ = _data(p, dt, offset=0.0)
    for got, want in zip(K.channel_stats(x, p), R.channel_stats(x, p)):
        _close(got, want, 1.0, dt, "channel_stats")
    mean, var = R.channel_stats(x, p)
    rstd = (1.0 / np.sqrt(var.astype(np.float64) + 1e-5)).astype(dt)
    sums = K.channel_grad_sums(dy, x, p, mean, rstd)
    for got, want in zip(sums, R.channel_grad_sums(dy, x, p, mean, rstd)):
        _close(got, want, np.abs(want).max() + 1.0, dt, "channel_grad_sums")
    m = p.n * p.s
    mdy, mdyx = (sums[0] / m).astype(dt), (sums[1] / m).astype(dt)
    want = R.channel_backward_apply(dy, x, p, mean, rstd, w, mdy, mdyx)
    _close(K.channel_backward_apply(dy, x, p, mean, rstd, w, mdy, mdyx), want,
           np.abs(want).max(), dt, "channel_backward_apply")


# Problems big enough to run threaded (>= 32768 values) and covering every
# kernel: cf cross with few channels (split across threads) and many (one
# thread per channel), cl cross by row blocks, per-sample cf, cl, and S = 1.
THREAD_PROBLEMS = [
    Problem("cf", 9, 2, 5001), Problem("cf", 16, 24, 999), Problem("cf", 3, 3, 70001),
    Problem("cl", 1031, 67, 3), Problem("cl", 4099, 33, 1), Problem("cf", 4099, 33, 1),
    Problem("cf", 5, 12, 1111, 4), Problem("cf", 7, 6, 5003, 6), Problem("cl", 5, 12, 1111, 3),
    Problem("cl", 301, 255, 1, 1), Problem("cl", 67, 16, 601, 16), Problem("cf", 2100, 45, 1, 1),
    # channels-last with C a multiple of 16: the vector column sweeps (64-column tiles and a 16-column tail)
    Problem("cl", 517, 80, 1), Problem("cl", 9, 32, 900, 4),
    # long LayerNorm rows in many sample blocks: dweight/dbias partials summed over channel ranges in parallel
    Problem("cf", 300, 2048, 1, 1),
    # long rows: the column-tiled backward (row pieces in parallel, then column tiles), G = 1 and 4;
    # then rows whose sample blocks are fewer and larger than usual (the partials' bound)
    Problem("cf", 3, 20011, 1, 1), Problem("cf", 5, 40000, 1, 4), Problem("cf", 160, 8192, 1, 1),
]


def _all_outputs(p, dt, teams=None):
    """Every kernel's outputs on problem p; appends each call's team size to ``teams``."""
    x, dy, w, b = _data(p, dt, seed=1, offset=3.0)
    out = []

    def run(f, *args):
        res = f(*args)
        if teams is not None:
            teams.append(_cpu.K.last_threads())
        out.extend(res if isinstance(res, tuple) else (res,))
        return res

    y, mean, var, rstd = run(K.forward_train, x, p, w, b, 1e-5)
    run(K.backward_train, dy, x, p, mean, rstd, w)
    run(K.forward_eval, x, p, w, b)
    run(K.backward_eval, dy, x, p, w, b * b + 0.5, w)
    if p.cross_sample:
        cm, _ = run(K.channel_stats, x, p)
        run(K.channel_grad_sums, dy, x, p, cm, w)
        run(K.channel_backward_apply, dy, x, p, cm, w, w, b, w)
    return out


@pytest.fixture
def restore_threads():
    before = cnorm.get_num_threads()
    yield
    cnorm.set_num_threads(before)


@pytest.mark.parametrize("dt", [np.float32, np.float64, *HALVES])
@pytest.mark.parametrize("p", THREAD_PROBLEMS, ids=str)
def test_bit_identical_for_any_thread_count(p, dt, restore_threads):
    results = {}
    for nt in (1, 2, 3):
        with threadpool_limits(limits=nt, user_api="openmp"):
            cnorm.set_num_threads(nt)
            teams = []
            results[nt] = _all_outputs(p, dt, teams)
            assert max(teams) == nt, f"no kernel ran on the {nt} threads allowed: {teams}"
    for nt in (2, 3):
        for i, (a, b) in enumerate(zip(results[1], results[nt])):
            assert a.tobytes() == b.tobytes(), f"output {i} differs between 1 and {nt} threads"


@pytest.mark.parametrize("dt", [np.float32, np.float64, *HALVES])
def test_two_pass_fallback_bit_identical_for_any_thread_count(dt, restore_threads):
    """The statistics' two-pass fallback (first values far from the mean) of a fused
    channels-first BatchNorm whose runs split into prefetch pieces: a thread's last
    channel has no next channel to prefetch, and its sums must not change for it."""
    p = Problem("cf", 2, 12, 1600)
    x32, w, b = _first_values_shifted(p, 100.0)
    x = x32.astype(dt)
    pt = np.float64 if dt == np.float64 else np.float32
    w, b = w.astype(pt), b.astype(pt)
    results = {}
    for nt in (1, 2, 3):
        with threadpool_limits(limits=nt, user_api="openmp"):
            cnorm.set_num_threads(nt)
            results[nt] = [a.tobytes() for a in K.forward_train(x, p, w, b, 1e-5)]
    assert results[1] == results[2] == results[3]


def test_thread_limits_are_honoured(restore_threads):
    p = Problem("cf", 8, 16, 4096)
    x, _, w, b = _data(p, np.float32)
    cnorm.set_num_threads(3)
    with threadpool_limits(limits=3, user_api="openmp"):
        K.forward_train(x, p, w, b, 1e-5)
        assert _cpu.K.last_threads() == 3
        with threadpool_limits(limits=1, user_api="openmp"):
            assert cnorm.get_num_threads() == 1
            K.forward_train(x, p, w, b, 1e-5)
            assert _cpu.K.last_threads() == 1
        cnorm.set_num_threads(2)  # the cnorm cap binds below the threadpoolctl limit
        K.forward_train(x, p, w, b, 1e-5)
        assert _cpu.K.last_threads() == 2
    # tiny inputs stay on the calling thread whatever the limit
    small = Problem("cf", 2, 3, 5)
    xs, _, ws, bs = _data(small, np.float32)
    K.forward_train(xs, small, ws, bs, 1e-5)
    assert _cpu.K.last_threads() == 1


def test_set_num_threads_is_process_wide(restore_threads):
    """set_num_threads holds in threads other than the caller's, above the OpenMP
    default as well as below it; a lower threadpoolctl limit in a thread still
    lowers it there."""
    p = Problem("cf", 8, 16, 4096)
    x, _, w, b = _data(p, np.float32)
    seen = {}

    def call(tag, limit=None):
        def body():
            with threadpool_limits(limits=limit, user_api="openmp"):  # None: no limit
                K.forward_train(x, p, w, b, 1e-5)
                seen[tag] = (_cpu.K.last_threads(), cnorm.get_num_threads())
        t = threading.Thread(target=body)
        t.start()
        t.join()

    default = cnorm.get_num_threads()
    for n in (1, default + 2):
        cnorm.set_num_threads(n)
        call(n)
        assert seen[n] == (n, n), f"set_num_threads({n}) in the main thread; another thread used {seen[n]}"
    call("limited", limit=1)
    assert seen["limited"] == (1, 1)


def test_concurrent_calls_from_python_threads(restore_threads):
    cnorm.set_num_threads(2)
    problems = [THREAD_PROBLEMS[i] for i in (0, 3, 6, 8, 9)]
    expected = [_all_outputs(p, np.float32) for p in problems]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(2):
            futures = [pool.submit(_all_outputs, p, np.float32) for p in problems * 2]
            for f, want in zip(futures, expected * 2):
                for a, b in zip(f.result(), want):
                    assert a.tobytes() == b.tobytes()


def test_rejects_arrays_the_kernels_cannot_read():
    p = Problem("cf", 2, 3, 4)
    x, _, w, b = _data(p, np.float32)
    with pytest.raises(ValueError, match="weight"):
        _cpu.K.cross_forward(x, np.empty_like(x), False, 2, 3, 4, w[:2], b, w, w, w, 1e-5, 1)
    with pytest.raises(ValueError, match="x"):
        _cpu.K.cross_forward(x[:, :, ::2], np.empty_like(x), False, 2, 3, 4, w, b, w, w, w, 1e-5, 1)
    with pytest.raises(TypeError, match="float32 or float64"):
        _cpu.K.affine(x.astype(np.int32), x, False, 2, 3, 4, w, b, 1)
    with pytest.raises(ValueError, match="scale: expected a C-contiguous float32"):
        h = x.astype(FLOAT16)  # half data take float32 parameters
        _cpu.K.affine(h, np.empty_like(h), False, 2, 3, 4, w.astype(FLOAT16), b, 1)
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _cpu.K.affine(x, ro, False, 2, 3, 4, w, b, 1)


@pytest.mark.parametrize("dt", [np.float32, np.float64, *HALVES])
@pytest.mark.parametrize("p", [THREAD_PROBLEMS[i] for i in (0, 2, 3, 6, 8, 9)], ids=str)
def test_streaming_stores_change_nothing(p, dt, monkeypatch, restore_threads):
    """Large outputs are written with streaming stores (vector body, scalar head
    to alignment and tail): forcing them on small problems must give the same bits."""
    cnorm.set_num_threads(2)
    monkeypatch.setattr(_cpu.K, "NT_BYTES", 1 << 62)
    cached = _all_outputs(p, dt)
    monkeypatch.setattr(_cpu.K, "NT_BYTES", 0)
    streamed = _all_outputs(p, dt)
    for i, (a, b) in enumerate(zip(cached, streamed)):
        assert a.tobytes() == b.tobytes(), f"output {i} differs with streaming stores"


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # var ~ 1e60 in float32
@pytest.mark.parametrize("dt", [np.float32, *HALVES])
@pytest.mark.parametrize("p", [Problem("cl", 4, 8, 300), Problem("cl", 4, 8, 300, 2), Problem("cl", 1300, 3, 1),
                               Problem("cl", 4, 32, 300), Problem("cl", 4, 32, 300, 2),
                               Problem("cf", 4, 8, 300), Problem("cf", 4, 8, 300, 2), Problem("cf", 40, 64, 1, 1)],
                         ids=str)
def test_overflowing_float_sums_fall_back_to_double(p, dt):
    """Statistics accumulate in float where that is exact enough; squares of |x| ~ 1e30
    (1e4 in float16) overflow float and must be recomputed in double, not returned as Inf."""
    big = 1e4 if dt == FLOAT16 else 1e30
    x, dy, w, b = _data(p, np.float32, offset=0.0)
    x = (x * np.float32(big)).astype(dt)
    y, mean, var, rstd = K.forward_train(x, p, w, b, 1e-5)
    ry, _, _, rrstd = R.forward_train(x, p, w, b, 1e-5)
    assert np.all(np.isfinite(np.asarray(y, np.float32))) and np.all(rstd > 0)
    assert _rel_err(y, ry) <= (1e-5 if dt == np.float32 else 2.0 ** -7)
    assert float(np.max(np.abs(rstd / rrstd - 1))) <= 1e-5


def _check_backward_stays_finite(p, x, dy, w, b, scale=0.0):
    """float32 backward of (x, dy) finite and within float32 accuracy of the float64
    reference, errors relative to max(|reference|, scale)."""
    _, mean, _, rstd = K.forward_train(x, p, w, b, 1e-5)
    got = K.backward_train(dy, x, p, mean, rstd, w)
    want = R.backward_train(dy.astype(np.float64), x.astype(np.float64), p, mean.astype(np.float64),
                            rstd.astype(np.float64), w.astype(np.float64))
    for name, a, e in zip(("dx", "dweight", "dbias"), got, want):
        assert np.all(np.isfinite(a)), name
        _close(a, e, max(float(np.abs(e).max()), scale), np.float32, name)


@pytest.mark.parametrize("p", [Problem("cf", 32, 100, 1, 1), Problem("cf", 64, 45, 1, 1),
                               Problem("cf", 32, 16411, 1, 1)], ids=str)
def test_layer_norm_backward_float_overflow_falls_back_to_double(p):
    """LayerNorm backward sums rows and columns in float; |dy| ~ 2.5e37 overflows those
    float sums (not the double ones) and must be redone in double, not returned as Inf."""
    x, dy, w, b = _data(p, np.float32, offset=0.0)
    # rows of one sign in runs of 16: row sums and 16-row dbias partials overflow float,
    # while the results stay finite (runs of opposite signs cancel in dbias; rows in
    # pairs of equal dy and opposite x cancel in dweight)
    x[1::2], dy[1::2] = -x[0::2], dy[0::2]
    sign = np.where(np.arange(p.n) % 32 < 16, 1.0, -1.0)[:, None, None]
    dy = (sign * (1.0 + 0.1 * np.abs(dy)) * 2.5e37).astype(np.float32)
    _check_backward_stays_finite(p, x, dy, w, b, float(np.abs(dy).max()))


@pytest.mark.parametrize("p", [Problem("cl", 4, 8, 300), Problem("cl", 4, 32, 300), Problem("cl", 4, 32, 300, 2),
                               Problem("cl", 1300, 80, 1)], ids=str)
def test_channels_last_backward_float_overflow_falls_back_to_double(p):
    """Channels-last backward sums dy·(x - mean) per column in float; |dy·x| ~ 1e40
    overflows float (not double) and must be redone in double, not returned as Inf."""
    x, dy, w, b = _data(p, np.float32, offset=0.0)
    x, dy = x * np.float32(1e20), dy * np.float32(1e20)  # the dx constants stay normal floats
    _check_backward_stays_finite(p, x, dy, w, b)


@pytest.mark.parametrize("dt", [np.float32, *HALVES])
@pytest.mark.parametrize("width", [64, 100, 300])
def test_layer_norm_rows_overflowing_alone_fall_back_alone(width, dt):
    """Short LayerNorm rows are summed eight at a time; a row whose float sums
    overflow is redone in double while its neighbours keep the float result."""
    p = Problem("cf", 41, width, 1, 1)
    x, _, w, b = _data(p, np.float32, offset=0.0)
    big = 1e4 if dt == FLOAT16 else 1e30
    x[[3, 17, 40]] *= np.float32(big)
    x = x.astype(dt)
    y, mean, var, rstd = K.forward_train(x, p, w, b, 1e-5)
    ry, rmean, _, rrstd = R.forward_train(x, p, w, b, 1e-5)
    assert np.all(np.isfinite(np.asarray(y, np.float32))) and np.all(np.isfinite(rstd))
    assert _rel_err(y, ry) <= (1e-5 if dt == np.float32 else 2.0 ** -7)
    assert float(np.max(np.abs(rstd / rrstd - 1))) <= 1e-5


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("dt", HALVES)
@pytest.mark.parametrize("streaming", [False, True])
def test_half_stores_round_like_numpy(dt, streaming, monkeypatch):
    """Every half store (vector body, scalar head and tail, hardware or integer
    conversion) rounds the float32 result to nearest even exactly as NumPy's
    cast does: subnormal results, overflow to Inf, signed zeros and NaN included."""
    monkeypatch.setattr(_cpu.K, "NT_BYTES", 0 if streaming else 1 << 62)
    rng = np.random.default_rng(5)
    info = ml_dtypes.finfo(dt)
    tiny = float(info.smallest_normal)
    x32 = np.concatenate([rng.standard_normal(3000) * s for s in (tiny * 4, tiny / 8, 1.0, float(info.max))])
    x32 = np.concatenate([x32, [0.0, -0.0, np.inf, -np.inf, np.nan]]).astype(np.float32)
    rng.shuffle(x32)
    x = x32.astype(dt)  # exact in float32 again below: a half value times 1 + 2^-7
    n = x.size
    scale, shift = np.full(1, 1.0 + 2.0 ** -7, np.float32), np.zeros(1, np.float32)
    for off in (0, 1, 7):  # unaligned starts exercise the scalar heads
        y = np.empty(n - off, dt)
        _cpu.K.affine(x[off:].copy(), y, False, 1, 1, n - off, scale, shift, 1)
        want = (x[off:].astype(np.float32) * scale[0] + shift[0]).astype(dt)  # -0·a + 0 is +0, as in an FMA
        nan = np.isnan(want.astype(np.float32))
        assert np.array_equal(np.isnan(y.astype(np.float32)), nan)
        assert np.array_equal(y.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


@pytest.mark.parametrize("dt", [np.float32, *HALVES])
@pytest.mark.parametrize("width", [768, 1000])
def test_layer_norm_backward_any_output_alignment(width, dt, monkeypatch):
    """LayerNorm backward writes dx tile by tile, streaming whole lines after a head
    that reaches the first line boundary: every alignment of dx, streamed or not,
    gives the same bits."""
    p = Problem("cf", 40, width, 1, 1)
    x, dy, w, b = _data(p, dt, offset=0.0)
    _, mean, _, rstd = K.forward_train(x, p, w, b, 1e-5)
    results = []
    for nt_bytes in (1 << 62, 0):
        monkeypatch.setattr(_cpu.K, "NT_BYTES", nt_bytes)
        for shift in range(0, 40):  # dx starts `shift` elements into a fresh buffer
            buf = np.empty(x.size + 64, dt)
            dx = buf[shift:shift + x.size].reshape(x.shape)
            dw, db = _cpu.K.group_backward(dy, x, dx, False, p.n, p.c, p.s, 1, mean, rstd, w, 2)
            results.append((dx.tobytes(), dw.tobytes(), db.tobytes()))
    assert all(r == results[0] for r in results)


@pytest.mark.parametrize("dt", [np.float32, *HALVES])
@pytest.mark.parametrize("c", [48, 64, 80, 96, 1024])
def test_channels_last_spans_any_output_alignment(c, dt, monkeypatch):
    """Channels-last y and dx are written as one stream per span of rows (vector body
    with the constants of any 16 channels in one load, scalar head and tail), streaming
    whole lines after a head: every alignment of the output, streamed or not, gives
    the same bits, for C a multiple of 16 (or of 32: whole lines per row) or not."""
    n = 40
    x, dy, w, b = _data(Problem("cl", n, c, 1), dt, offset=0.0)
    mean, var, rstd = (np.empty(c, np.float32) for _ in range(3))
    results = []
    for nt_bytes in (1 << 62, 0):
        monkeypatch.setattr(_cpu.K, "NT_BYTES", nt_bytes)
        for shift in range(0, 40):  # y and dx start `shift` elements into fresh buffers
            y = np.empty(x.size + 64, dt)[shift:shift + x.size].reshape(x.shape)
            _cpu.K.cross_forward(x, y, True, n, c, 1, w, b, mean, var, rstd, 1e-5, 2)
            dx = np.empty(x.size + 64, dt)[shift:shift + x.size].reshape(x.shape)
            da, db = np.empty(c, np.float32), np.empty(c, np.float32)
            _cpu.K.cross_backward(dy, x, dx, True, n, c, 1, mean, rstd, w, da, db, _cpu.K.TRAIN, 2)
            results.append((y.tobytes(), dx.tobytes(), da.tobytes(), db.tobytes()))
    assert all(r == results[0] for r in results)


def _first_values_shifted(p, shift):
    """float32 data of p whose first 16 values of every statistics run (rows: the
    first 8 rows) sit ``shift`` above the rest."""
    x, _, w, b = _data(p, np.float32, offset=0.0)
    if p.layout == "cl":
        x[:8] += np.float32(shift)
    elif p.s == 1:  # rows along the channel axis (LayerNorm)
        x[:, :16, :] += np.float32(shift)
    else:
        x[:, :, :16] += np.float32(shift)
    return x, w, b


@pytest.mark.parametrize("dt", [np.float32, BFLOAT16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("p, shift", [
    (Problem("cl", 4096, 16, 1), 30.0), (Problem("cl", 4096, 16, 1), 300.0), (Problem("cl", 4096, 64, 1), 100.0),
    (Problem("cf", 64, 4096, 1, 1), 100.0),   # LayerNorm rows
    (Problem("cf", 2, 4, 8192, 2), 100.0),    # GroupNorm groups
    (Problem("cf", 1, 3, 20000), 300.0),      # channels-first BatchNorm blocks
], ids=str)
def test_statistics_far_from_the_pivot(p, shift, dt):
    """Statistics take one pass around a pivot (the mean of a run's first values or a
    block's first rows); when those sit far from the mean the variance would lose
    ~S2/M2 times float accuracy, so that run or block is redone in two passes: the
    variance stays within 2e-6 of float64's (one pass alone misses it)."""
    x32, w, b = _first_values_shifted(p, shift)
    x = x32.astype(dt)
    _, mean, var, _ = K.forward_train(x, p, w, b, 1e-5)
    _, rmean, rvar, _ = R.forward_train(x.astype(np.float64), p, w.astype(np.float64), b.astype(np.float64),
                                        1e-5)
    assert float(np.max(np.abs(var / rvar - 1))) <= 2e-6
    # the saved mean is float32: its rounding (half an ulp of |mean|) comes on top
    assert float(np.max((np.abs(mean - rmean) - np.abs(rmean) * 2.0 ** -24) / np.sqrt(rvar))) <= 2e-6


@pytest.mark.parametrize("pdt", [np.float32, np.float64])
@pytest.mark.parametrize("sdt", [np.float32, np.float64])
@pytest.mark.parametrize("strided", [False, True])
def test_fold_frozen_matches_the_array_version(pdt, sdt, strided):
    """Eval constants folded in one C loop equal the float64 array computation of the
    base Backend (rounded once to the parameter dtype), strided statistics included."""
    from cnorm.backends.base import Backend

    rng = np.random.default_rng(3)
    c = 37
    mean = (rng.standard_normal(2 * c) * 10).astype(sdt)
    var = rng.uniform(0.0, 4.0, 2 * c).astype(sdt)
    mean, var = (mean[::2], var[::2]) if strided else (mean[:c], var[:c])
    w, b = rng.standard_normal(c).astype(pdt), rng.standard_normal(c).astype(pdt)
    got = K.fold_frozen(mean, var, w, b, 1e-3, pdt)
    want = Backend.fold_frozen(K, mean, var, w, b, 1e-3, pdt)
    for g, e in zip(got[:3], want[:3]):
        assert g.dtype == np.dtype(pdt) and g.shape == (c,)
        np.testing.assert_array_max_ulp(g, e, maxulp=1)
    # shift = b - mean·scale may cancel (and the C loop may fuse it into one FMA):
    # within a few ulps of the terms' magnitude
    terms = np.abs(b.astype(np.float64)) + np.abs(mean.astype(np.float64) * want[2].astype(np.float64))
    assert got[3].dtype == np.dtype(pdt)
    assert np.all(np.abs(got[3].astype(np.float64) - want[3].astype(np.float64)) <= 4 * np.finfo(pdt).eps * terms)


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 4099, 1 << 18])
@pytest.mark.parametrize("offset", [0, 1, 17])
def test_parallel_copy_any_size_and_alignment(n, offset):
    """The benchmark's floor copies by streaming whole lines after a head to the
    first line of dst: every size and alignment copies every byte."""
    rng = np.random.default_rng(n)
    src = rng.integers(0, 256, n + offset, dtype=np.uint8)[offset:]
    dst = np.zeros(n + 64, np.uint8)[offset:offset + n]
    _cpu.K.parallel_copy(src, dst, 2)
    assert np.array_equal(src, dst)
