"""Activations fused into the norms: ``activation="relu"`` / ``"silu"``.

Forward: y = act(z), z = weight·xhat + bias, applied in the sweep that stores
y. Backward: g = dy·act'(z) in place of dy, z recomputed from x and the saved
statistics. The checks:

* every kernel path of the "cython" backend (Backend level, every CPU level,
  every data dtype, training and eval) against the NumPy reference; for relu
  the reference backward takes the mask from the kernel's own forward output
  (y > 0), which is the promise: backward's z is the forward's, bit for bit;
* the public API on every backend against PyTorch float64 autograd composites
  (``F.relu(F.batch_norm(...))`` ...), layouts included;
* bit-identical results at 1 and 2 threads, out= in place equal bit for bit
  to the plain call, streaming stores (outputs of 8 MiB and more) equal to
  ordinary ones;
* relu at z exactly 0, NaN and infinities, empty inputs, and the accuracy of
  the vectorized exp behind silu.
"""

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import cnorm
from cnorm import _cpu
from cnorm._dtypes import BFLOAT16, FLOAT16
from cnorm.backends.base import Problem
from cnorm.backends.numpy_backend import NumpyBackend
from helpers import make_input, same_bits

R = NumpyBackend()
ACTS = ("relu", "silu")
LEVELS = list(reversed(_cpu.usable_levels()))
EPS = 1e-5


def _K():
    from cnorm.backends.cython_backend import CythonBackend

    return CythonBackend()


needs_kernels = pytest.mark.skipif(not LEVELS, reason="the compiled kernels are not built")


def _pt(dt):
    return np.float64 if dt == np.float64 else np.float32


def _ulp(dt):
    return {np.dtype(np.float64): 2.0 ** -52, np.dtype(np.float32): 2.0 ** -23,
            np.dtype(FLOAT16): 2.0 ** -10, np.dtype(BFLOAT16): 2.0 ** -7}[np.dtype(dt)]


def _data(p, dt, seed=0):
    """x (mean 0.3 so that relu keeps about 60%), dy, weight, bias."""
    rng = np.random.default_rng(seed)
    pt = _pt(dt)
    x = (rng.standard_normal(p.shape3) + 0.3).astype(dt)
    dy = rng.standard_normal(p.shape3).astype(dt)
    w = rng.uniform(0.5, 1.5, p.c).astype(pt)
    b = (0.0 * w if p.rms else rng.standard_normal(p.c) * 0.5).astype(pt)
    return x, dy, w, b


def _err(got, want, scale=None):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if scale is None:
        scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    return float(np.max(np.abs(got - want), initial=0.0)) / scale


def _ref_backward(kind, dy, x, p, mean, rstd, w, act, b, y):
    """The reference backward; for relu with the mask of the kernel's forward output."""
    f = R.backward_train if kind == "train" else R.backward_eval
    if act == "relu":
        return f(dy.astype(np.float64) * (np.asarray(y, np.float64) > 0), x, p, mean, rstd, w)
    return f(dy, x, p, mean, rstd, w, None, act, b)


# (id, problem): every kernel path of the forward and the backward
PATHS = [
    # BatchNorm channels-first: one channel per thread (fused: g per channel in scratch)
    ("bn-cf-fused", Problem("cf", 8, 16, 600)),
    # few channels: fused on one thread, split channels (prologue) on two
    ("bn-cf-few", Problem("cf", 64, 3, 1100)),
    # a channel larger than the L2 share and S past one statistics block: split, prologue
    ("bn-cf-big", Problem("cf", 2, 3, 70001)),
    # S == 1 (BatchNorm1d on (N, C)): the channels-last kernels
    ("bn-s1", Problem("cf", 4099, 5, 1)),
    ("bn-cl", Problem("cl", 37, 24, 61)),
    ("bn-cl-c80", Problem("cl", 45, 80, 13)),
    # per-sample channels-first groups: g per group in scratch
    ("gn-cf", Problem("cf", 5, 12, 1111, 4)),
    ("in-cf", Problem("cf", 3, 6, 333, 6)),
    # a group larger than the L2 share: prologue
    ("gn-cf-big", Problem("cf", 2, 4, 70001, 1)),
    # per-sample channels-last: prologue
    ("gn-cl", Problem("cl", 5, 12, 301, 3)),
    ("in-cl", Problem("cl", 4, 16, 77, 16)),
    # rows (S == 1): LayerNorm short (<= 128), odd, long, column-tiled (> 16384), G > 1
    ("ln-short", Problem("cf", 129, 96, 1, 1)),
    ("ln-odd", Problem("cf", 33, 37, 1, 1)),
    ("ln-long", Problem("cf", 40, 3000, 1, 1)),
    ("ln-tiled", Problem("cf", 3, 20011, 1, 1)),
    ("gn-rows", Problem("cf", 50, 24, 1, 4)),
    ("rms", Problem("cf", 33, 200, 1, 1, rms=True)),
    ("rms-tiled", Problem("cf", 2, 17000, 1, 1, rms=True)),
]
PATH_PARAMS = [pytest.param(p, id=name) for name, p in PATHS]
DTYPES = [np.float64, np.float32, FLOAT16, BFLOAT16]


def _tols(dt, p):
    """(y, dx, dweight/dbias) tolerances relative to the scale of each result."""
    if dt == np.float64:
        return 1e-12, 1e-11, 1e-11
    if dt == np.float32:
        return 4e-6, 2e-5, 2e-5
    u = _ulp(dt)  # g and dx are rounded to the data type
    return 2 * u, 4 * u, 2 * u


@needs_kernels
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("p", PATH_PARAMS)
def test_kernel_paths_match_reference(p, act):
    """Each path at every CPU level and dtype: training forward and backward, and (for
    channel problems) eval forward and backward, against the NumPy reference."""
    K = _K()
    for dt in DTYPES:
        x, dy, w, b = _data(p, dt)
        ty, tdx, tp = _tols(dt, p)
        ry, _, _, _ = R.forward_train(x, p, w, b, EPS, None, act)
        for level in LEVELS:
            with _cpu.use_level(level):
                y, mean, var, rstd = K.forward_train(x, p, w, b, EPS, None, act)
                assert y.dtype == x.dtype
                what = f"{np.dtype(dt).name} {level}"
                assert _err(y, ry) <= ty, f"y {what}: {_err(y, ry):.2e}"
                dx, dw, db = K.backward_train(dy, x, p, mean, rstd, w, None, act, b)
                rdx, rdw, rdb = _ref_backward("train", dy, x, p, mean, rstd, w, act, b, y)
                assert dx.dtype == x.dtype and dw.dtype == db.dtype == _pt(dt)
                assert _err(dx, rdx) <= tdx, f"dx {what}: {_err(dx, rdx):.2e}"
                sc = max(1.0, float(np.abs(rdw).max()), np.sqrt(p.n * p.s))
                assert _err(dw, rdw, sc) <= tp, f"dweight {what}: {_err(dw, rdw, sc):.2e}"
                assert _err(db, rdb, sc) <= tp, f"dbias {what}: {_err(db, rdb, sc):.2e}"
                if dt in (np.float32, BFLOAT16):  # in place, bit for bit: out=x forward, out=dy and out=x backward
                    xi = x.copy()
                    same_bits(K.forward_train(xi, p, w, b, EPS, xi, act)[0], y, f"forward out=x {what}")
                    for into in ("dy", "x"):
                        dyi, xi = dy.copy(), x.copy()
                        got = K.backward_train(dyi, xi, p, mean, rstd, w, dyi if into == "dy" else xi, act, b)
                        for g, e in zip(got, (dx, dw, db)):
                            same_bits(g, e, f"backward out={into} {what}")
                if p.s == 1 and not p.cross_sample:
                    continue  # (rows have no eval mode)
                # eval: constants folded by the backend, then its affine kernel and backward
                rm = np.linspace(-0.5, 0.5, p.c).astype(_pt(dt))
                rv = np.linspace(0.5, 2.0, p.c).astype(_pt(dt))
                fm, fr, fs, fh = K.fold_frozen(rm, rv, w, b, EPS, _pt(dt))
                ye = K.forward_eval(x, p, fs, fh, None, act)
                rye = R.forward_eval(x, p, fs, fh, None, act)
                assert _err(ye, rye) <= ty, f"eval y {what}: {_err(ye, rye):.2e}"
                dxe, dwe, dbe = K.backward_eval(dy, x, p, fm, fr, w, None, act, b)
                rdxe, rdwe, rdbe = _ref_backward("eval", dy, x, p, fm, fr, w, act, b, ye)
                assert _err(dxe, rdxe) <= tdx, f"eval dx {what}"
                sc = max(1.0, float(np.abs(rdwe).max()), np.sqrt(p.n * p.s))
                assert _err(dwe, rdwe, sc) <= tp and _err(dbe, rdbe, sc) <= tp, f"eval dweight/dbias {what}"


@pytest.fixture
def restore_threads():
    before = cnorm.get_num_threads()
    yield
    cnorm.set_num_threads(before)


def _all_outputs(K, p, dt, act):
    x, dy, w, b = _data(p, dt, seed=1)
    y, mean, var, rstd = K.forward_train(x, p, w, b, EPS, None, act)
    out = [y, mean, var, rstd, *K.backward_train(dy, x, p, mean, rstd, w, None, act, b)]
    fm, fr, fs, fh = K.fold_frozen(np.full(p.c, 0.25, _pt(dt)), np.full(p.c, 1.5, _pt(dt)), w, b, EPS, _pt(dt))
    out.append(K.forward_eval(x, p, fs, fh, None, act))
    out.extend(K.backward_eval(dy, x, p, fm, fr, w, None, act, b))
    return [np.asarray(a) for a in out]


THREAD_PATHS = [pytest.param(p, id=name) for name, p in PATHS if p.n * p.c * p.s >= 32768]


@needs_kernels
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("p", THREAD_PATHS)
def test_bit_identical_at_one_and_two_threads(p, act, restore_threads):
    K = _K()
    for level in LEVELS:
        with _cpu.use_level(level):
            for dt in (np.float32, np.float64, BFLOAT16):
                res = {}
                for nt in (1, 2):
                    with threadpool_limits(limits=nt, user_api="openmp"):
                        cnorm.set_num_threads(nt)
                        res[nt] = _all_outputs(K, p, dt, act)
                for i, (a, c) in enumerate(zip(res[1], res[2])):
                    assert a.tobytes() == c.tobytes(), f"output {i} differs ({level}, {np.dtype(dt).name})"


# Outputs of 8 MiB and more take streaming stores: equal to the in-place call's (ordinary
# stores), and right. BatchNorm fused and channels-last, GroupNorm, LayerNorm rows.
BIG = [pytest.param(Problem("cf", 32, 16, 4096), id="bn-cf"), pytest.param(Problem("cl", 64, 32, 1024), id="bn-cl"),
       pytest.param(Problem("cf", 8, 64, 4096, 8), id="gn-cf"), pytest.param(Problem("cf", 2048, 1024, 1, 1), id="ln")]


@needs_kernels
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("p", BIG)
def test_streaming_stores(p, act):
    K = _K()
    x, dy, w, b = _data(p, np.float32, seed=2)
    assert x.nbytes >= 8 << 20
    ry = R.forward_train(x, p, w, b, EPS, None, act)[0]
    for level in LEVELS:
        with _cpu.use_level(level):
            y, mean, var, rstd = K.forward_train(x, p, w, b, EPS, None, act)
            assert _err(y, ry) <= 4e-6
            xi = x.copy()
            same_bits(K.forward_train(xi, p, w, b, EPS, xi, act)[0], y, f"forward out=x {level}")
            dx, dw, db = K.backward_train(dy, x, p, mean, rstd, w, None, act, b)
            dyi = dy.copy()
            got = K.backward_train(dyi, x, p, mean, rstd, w, dyi, act, b)
            for g, e in zip(got, (dx, dw, db)):
                same_bits(g, e, f"backward out=dy {level}")
            if level == LEVELS[0]:
                rdx, rdw, rdb = _ref_backward("train", dy, x, p, mean, rstd, w, act, b, y)
                assert _err(dx, rdx) <= 2e-5
                sc = max(1.0, float(np.abs(rdw).max()), 1e3)
                assert _err(dw, rdw, sc) <= 2e-5 and _err(db, rdb, sc) <= 2e-5


# -- the public API -------------------------------------------------------------------

NORMS = ("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm")


def _call(norm, x, w, b, act, backend, layout="cf", out=None, eval_stats=None):
    """``<norm>_forward`` on x (N, C, H, W) or channels-last (N, H, W, C) for layout "cl"."""
    kw = dict(backend=backend, out=out, activation=act)
    ca = -1 if layout == "cl" else 1
    if norm == "batch_norm":
        if eval_stats is not None:
            return cnorm.batch_norm_forward(x, w, b, *eval_stats, training=False, channel_axis=ca, **kw)
        return cnorm.batch_norm_forward(x, w, b, channel_axis=ca, **kw)
    if norm == "instance_norm":
        if eval_stats is not None:
            return cnorm.instance_norm_forward(x, w, b, *eval_stats, use_input_stats=False, channel_axis=ca, **kw)
        return cnorm.instance_norm_forward(x, w, b, channel_axis=ca, **kw)
    if norm == "group_norm":
        return cnorm.group_norm_forward(x, 2, w, b, channel_axis=ca, **kw)
    if norm == "layer_norm":
        return cnorm.layer_norm_forward(x, x.shape[-2:], w, b, **kw)
    return cnorm.rms_norm_forward(x, x.shape[-2:], w, **kw)


def _params(norm, x_shape, layout, dt, rng):
    pt = _pt(dt)
    shape = x_shape[-2:] if norm in ("layer_norm", "rms_norm") else (x_shape[-1] if layout == "cl" else x_shape[1],)
    w = rng.uniform(0.5, 1.5, shape).astype(pt)
    b = None if norm == "rms_norm" else (rng.standard_normal(shape) * 0.5).astype(pt)
    return w, b


def _torch_composite(norm, xt, wt, bt, act, layout, eval_stats=None):
    import torch
    F = torch.nn.functional
    if layout == "cl" and norm not in ("layer_norm", "rms_norm"):
        xt = xt.movedim(-1, 1)
    if norm == "batch_norm":
        if eval_stats is not None:
            rm, rv = (torch.from_numpy(np.asarray(a, np.float64)) for a in eval_stats)
            z = F.batch_norm(xt, rm, rv, wt, bt, training=False, eps=EPS)
        else:
            z = F.batch_norm(xt, None, None, wt, bt, training=True, eps=EPS)
    elif norm == "instance_norm":
        if eval_stats is not None:
            rm, rv = (torch.from_numpy(np.asarray(a, np.float64)) for a in eval_stats)
            z = F.instance_norm(xt, rm, rv, wt, bt, use_input_stats=False, eps=EPS)
        else:
            z = F.instance_norm(xt, weight=wt, bias=bt, eps=EPS)
    elif norm == "group_norm":
        z = F.group_norm(xt, 2, wt, bt, EPS)
    elif norm == "layer_norm":
        z = F.layer_norm(xt, xt.shape[-2:], wt, bt, EPS)
    else:
        z = F.rms_norm(xt, xt.shape[-2:], wt)
    y = F.relu(z) if act == "relu" else F.silu(z)
    if layout == "cl" and norm not in ("layer_norm", "rms_norm"):
        y = y.movedim(1, -1)
    return y


def _layouts(norm):
    return ("cf",) if norm in ("layer_norm", "rms_norm") else ("cf", "cl", "cl_strided")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("norm", NORMS)
def test_float64_matches_torch_autograd(backend, norm, act):
    """float64 forward and backward (dx, dweight, dbias) against PyTorch's autograd
    through ``F.<act>(F.<norm>(...))``, every layout, training and (BatchNorm,
    InstanceNorm) eval mode."""
    torch = pytest.importorskip("torch", reason="PyTorch not installed")
    rng = np.random.default_rng(5)
    A, to = backend.asarray, backend.to_numpy
    for layout in _layouts(norm):
        x = make_input(rng, (3, 6, 5, 7), layout, np.float64, offset=0.2)
        w, b = _params(norm, x.shape, "cl" if layout == "cl" else "cf", np.float64, rng)
        dy = rng.standard_normal(x.shape)
        modes = [None]
        if norm in ("batch_norm", "instance_norm"):
            modes.append((np.linspace(-0.3, 0.3, 6), np.linspace(0.5, 2.0, 6)))
        for stats in modes:
            ev = None if stats is None else tuple(A(s.copy()) for s in stats)
            y, saved = _call(norm, A(x), A(w), A(b), act, backend.name, "cl" if layout == "cl" else "cf",
                             eval_stats=ev)
            dx, dw, db = getattr(cnorm, f"{norm}_backward")(A(dy), A(x), saved, A(w))
            xt = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_()
            wt = torch.from_numpy(w).requires_grad_()
            bt = None if b is None else torch.from_numpy(b).requires_grad_()
            yt = _torch_composite(norm, xt, wt, bt, act, "cl" if layout == "cl" else "cf", stats)
            yt.backward(torch.from_numpy(np.ascontiguousarray(dy)))
            what = f"{layout} {'eval' if stats is not None else 'train'}"
            np.testing.assert_allclose(to(y), yt.detach().numpy(), rtol=1e-10, atol=1e-10, err_msg=f"y {what}")
            np.testing.assert_allclose(to(dx), xt.grad.numpy(), rtol=1e-9, atol=1e-9, err_msg=f"dx {what}")
            np.testing.assert_allclose(to(dw), wt.grad.numpy(), rtol=1e-9, atol=1e-9, err_msg=f"dweight {what}")
            if b is not None:
                np.testing.assert_allclose(to(db), bt.grad.numpy(), rtol=1e-9, atol=1e-9, err_msg=f"dbias {what}")
            else:
                assert db is None


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("norm", NORMS)
def test_out_in_place_is_bit_identical(backend, norm, act):
    """out=x forward, out=dy and out=x backward equal the plain calls bit for bit, on
    shapes whose backward takes the scratch path (channels-first BatchNorm, GroupNorm)
    and the prologue (channels-last, rows; for out=x a temporary)."""
    rng = np.random.default_rng(7)
    A, to = backend.asarray, backend.to_numpy
    bwd = getattr(cnorm, f"{norm}_backward")
    for dt in (np.float32, BFLOAT16):
        for layout in _layouts(norm):
            x = make_input(rng, (4, 8, 9, 11), layout, dt, offset=0.2)
            w, b = _params(norm, x.shape, "cl" if layout == "cl" else "cf", dt, rng)
            dy = np.empty_like(x)  # (x's memory layout: out=dy must have it)
            dy[...] = rng.standard_normal(x.shape)
            lay = "cl" if layout == "cl" else "cf"
            y, saved = _call(norm, A(x), A(w), A(b), act, backend.name, lay)
            xi = A(x.copy(order="K"))
            yi, _ = _call(norm, xi, A(w), A(b), act, backend.name, lay, out=xi)
            assert yi is xi
            what = f"{np.dtype(dt).name} {layout}"
            same_bits(to(yi), to(y), f"forward out=x {what}")
            dx, dw, db = bwd(A(dy), A(x), saved, A(w))
            dyi = A(dy.copy(order="K"))
            got = bwd(dyi, A(x), saved, A(w), out=dyi)
            assert got[0] is dyi
            for g, e in zip(got, (dx, dw, db)):
                same_bits(to(g), to(e), f"backward out=dy {what}")
            xc = A(x.copy(order="K"))
            got = bwd(A(dy), xc, saved, A(w), out=xc)
            assert got[0] is xc
            for g, e in zip(got, (dx, dw, db)):
                same_bits(to(g), to(e), f"backward out=x {what}")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("norm", NORMS)
def test_empty_inputs(backend, norm, act):
    A, to = backend.asarray, backend.to_numpy
    rng = np.random.default_rng(0)
    x = np.zeros((0, 4, 3, 5), np.float32)
    w, b = _params(norm, x.shape, "cf", np.float32, rng)
    y, saved = _call(norm, A(x), A(w), A(b), act, backend.name)
    assert to(y).shape == x.shape
    dx, dw, db = getattr(cnorm, f"{norm}_backward")(A(x), A(x), saved, A(w))
    assert to(dx).shape == x.shape and not np.any(to(dw))
    if b is not None:
        assert not np.any(to(db))


# -- special values -------------------------------------------------------------------

@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_relu_at_z_exactly_zero(backend, dt):
    """relu'(0) = 0 as in PyTorch: where z is exactly 0 (x at the mean, bias 0), y is 0
    and no gradient passes, in training and eval mode and for a LayerNorm row."""
    A, to = backend.asarray, backend.to_numpy
    base = np.array([-1.0, 0.0, 1.0, -2.0, 0.0, 2.0], dt)
    x = np.tile(base, (2, 3, 1))  # (N, C, S): every channel's mean is exactly 0
    dy = np.arange(1, x.size + 1, dtype=dt).reshape(x.shape)
    w, b = np.ones(3, dt), np.zeros(3, dt)
    zero = x == 0
    for ev in (None, (A(np.zeros(3, dt)), A(np.ones(3, dt)))):
        kw = {} if ev is None else dict(running_mean=ev[0], running_var=ev[1], training=False)
        y, saved = cnorm.batch_norm_forward(A(x), A(w), A(b), eps=0.0, backend=backend.name, activation="relu",
                                            **kw)
        dx, dw, db = cnorm.batch_norm_backward(A(dy), A(x), saved, A(w))
        y, db = to(y), to(db)
        assert np.all(y[zero] == 0) and np.all(y[x < 0] == 0) and np.all(y[x > 0] > 0)
        np.testing.assert_allclose(db, np.sum(np.where(x > 0, dy, 0), axis=(0, 2)), rtol=1e-6)
    row = np.array([[-1.0, 0.0, 1.0, 3.0, -3.0]], dt)
    y, saved = cnorm.layer_norm_forward(A(row), (5,), A(np.ones(5, dt)), A(np.zeros(5, dt)), backend=backend.name,
                                        activation="relu")
    dx, dw, db = cnorm.layer_norm_backward(A(np.ones_like(row)), A(row), saved, A(np.ones(5, dt)))
    assert to(y)[0, 1] == 0 and to(db)[1] == 0 and to(db)[2] == 1


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # (the NumPy reference's exp)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_nan_and_infinities(backend, act, dt):
    """Eval mode (no statistics to spoil): relu(NaN) = NaN, relu(±inf) = inf, 0; silu(NaN)
    = NaN, silu(inf) = inf, silu(-inf) = NaN, as PyTorch's F.relu/F.silu. Training: a
    NaN spoils its channel only; the backward follows the reference (relu'(NaN) = 0)."""
    torch = pytest.importorskip("torch", reason="PyTorch not installed")
    A, to = backend.asarray, backend.to_numpy
    F = torch.nn.functional
    vals = np.array([np.nan, np.inf, -np.inf, 0.0, -0.5, 0.5, 100.0, -100.0, 1e30, -1e30, 90.0, -90.0], dt)
    x = np.tile(vals, (2, 3, 1))
    w, b = np.array([1.0, 2.0, 0.5], dt), np.array([0.0, 0.25, -0.25], dt)
    rm, rv = np.zeros(3, dt), np.ones(3, dt)
    y, _ = cnorm.batch_norm_forward(A(x), A(w), A(b), A(rm), A(rv), training=False, eps=0.0,
                                    backend=backend.name, activation=act)
    z = F.batch_norm(torch.from_numpy(x), torch.from_numpy(rm), torch.from_numpy(rv), torch.from_numpy(w),
                     torch.from_numpy(b), training=False, eps=0.0)
    want = (F.relu(z) if act == "relu" else F.silu(z)).numpy()
    np.testing.assert_allclose(to(y), want, rtol=4 * _ulp(dt), atol=1e-30, equal_nan=True)
    # training: channel 1 holds a NaN
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 10)).astype(dt)
    x[2, 1, 5] = np.nan
    dy = rng.standard_normal(x.shape).astype(dt)
    y, saved = cnorm.batch_norm_forward(A(x), A(w), A(b), backend=backend.name, activation=act)
    y = to(y)
    assert np.all(np.isnan(y[:, 1])) and np.all(np.isfinite(y[:, [0, 2]]))
    zt = F.batch_norm(torch.from_numpy(x), None, None, torch.from_numpy(w), torch.from_numpy(b), training=True,
                      eps=EPS)
    want = (F.relu(zt) if act == "relu" else F.silu(zt)).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-5 if dt == np.float32 else 1e-12, atol=1e-6, equal_nan=True)
    got = cnorm.batch_norm_backward(A(dy), A(x), saved, A(w))
    ref_y, ref_saved = cnorm.batch_norm_forward(x, w, b, backend="numpy", activation=act)
    ref = cnorm.batch_norm_backward(dy, x, ref_saved, w)
    for g, e in zip(got, ref):
        np.testing.assert_allclose(to(g), e, rtol=2e-5 if dt == np.float32 else 1e-12, atol=1e-5, equal_nan=True)


@needs_kernels
def test_silu_accuracy_of_the_vector_exp():
    """silu and silu' of float32 data (eval mode with scale 1, shift 0: y = silu(x),
    dx = silu'(x)) within 4 float32 ulps of float64 over the whole range, saturation
    included (silu(-100) is -3.7e-42, not -0; below 1e-37 the results are subnormal:
    an absolute 1e-37), but for silu' next to its root (z = -1.2785, where
    1 + z·(1 - s) cancels in any float formula: 2 ulps of 1), at every CPU level;
    NaN and the infinities as PyTorch."""
    K = _K()
    grid = np.concatenate([np.linspace(-120, 120, 200001), np.linspace(-1.5, 1, 25001),
                           [0.0, -0.0, 88.7, 88.8, 89.0, -87.3, -88.8, -103.0, -104.5, 1e-30, -1e-30, 3e38, -3e38]])
    x = grid.astype(np.float32).reshape(1, 1, -1)
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):
        s = 1.0 / (1.0 + np.exp(-x64))
    want_y = x64 * s
    want_g = s * (1.0 + x64 * (1.0 - s))
    p = Problem("cf", 1, 1, x.size)
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    u = 2.0 ** -23
    near_root = np.abs(x64) < 2
    for level in LEVELS:
        with _cpu.use_level(level):
            y = K.forward_eval(x, p, one, zero, None, "silu").astype(np.float64)
            g = K.backward_eval(np.ones_like(x), x, p, zero, one, one, None, "silu", zero)[0].astype(np.float64)
            assert np.all(np.abs(y - want_y) <= 4 * u * np.abs(want_y) + 1e-37), level
            assert np.all(np.abs(g - want_g) <= 4 * u * np.abs(want_g) + near_root * 2 * u + 1e-37), level
            special = np.array([[[np.nan, np.inf, -np.inf, -0.0]]], np.float32)
            ys = K.forward_eval(special, Problem("cf", 1, 1, 4), one, zero, None, "silu")[0, 0]
            assert np.isnan(ys[0]) and ys[1] == np.inf and np.isnan(ys[2]) and ys[3] == 0
