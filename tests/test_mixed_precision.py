"""float16 and bfloat16 inputs (float32 statistics) and the numerical robustness cases."""

import numpy as np
import pytest

import cnorm
from cnorm._dtypes import BFLOAT16, FLOAT16
from helpers import NORMS, backward, close, forward, make_input
import reference

HALVES = [pytest.param(FLOAT16, id="f16"), pytest.param(BFLOAT16, id="bf16")]


def half_case(backend, norm, dtype, layout, offset=0.0, param_dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = make_input(rng, (4, 6, 5, 7), layout, dtype, offset=offset)
    channel_axis = -1 if layout == "cl" else 1
    ns = x.shape[-2:]
    pshape = ns if norm == "layer_norm" else (6,)
    w = rng.uniform(0.5, 1.5, pshape).astype(param_dtype)
    b = rng.standard_normal(pshape).astype(param_dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    A = backend.asarray
    y, saved = forward(norm, A(x), A(w), A(b), backend=backend.name, channel_axis=channel_axis,
                       num_groups=3, normalized_shape=ns)
    dx, dw, db = backward(norm, A(dy), A(x), saved, A(w))
    kw = dict(channel_axis=channel_axis, num_groups=3, normalized_ndim=2)
    # the reference sees exactly the rounded inputs the backend saw
    y_ref, mean_ref, var_ref = reference.forward(x.astype(np.float64), norm, w.astype(np.float64),
                                                 b.astype(np.float64), **kw)
    dx_ref, dw_ref, db_ref = reference.backward(dy.astype(np.float64), x.astype(np.float64), norm,
                                                w.astype(np.float64), **kw)
    return dict(y=y, dx=dx, dw=dw, db=db, saved=saved, y_ref=y_ref, dx_ref=dx_ref, dw_ref=dw_ref,
                db_ref=db_ref, mean_ref=mean_ref, var_ref=var_ref, x=x)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("param_dtype", ["float32", "input"])
def test_half_inputs_match_float64(backend, norm, dtype, layout, param_dtype):
    r = half_case(backend, norm, dtype, layout, param_dtype=np.float32 if param_dtype == "float32" else dtype)
    to = backend.to_numpy
    assert r["y"].dtype == dtype and r["dx"].dtype == dtype
    assert r["dw"].dtype == np.float32 and r["db"].dtype == np.float32
    assert r["saved"].mean.dtype == np.float32 and r["saved"].rstd.dtype == np.float32
    if param_dtype == "float32":  # else the reference's parameters differ by their rounding
        close(to(r["y"]), r["y_ref"], 1e-2, "y")
        close(to(r["dx"]), r["dx_ref"], 1e-2, "dx")
        close(to(r["dw"]), r["dw_ref"], 1e-3, "dweight")
        close(to(r["db"]), r["db_ref"], 1e-3, "dbias")
    mean = to(r["saved"].mean).reshape(-1)
    close(mean, np.asarray(r["mean_ref"]).reshape(-1), 1e-5, "mean")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", HALVES)
def test_half_large_offset(backend, norm, dtype):
    """|mean| = 64·std: half precision still has ~2-3 significant digits of the deviation."""
    r = half_case(backend, norm, dtype, "cf", offset=64.0)
    to = backend.to_numpy
    close(to(r["y"]), r["y_ref"], 3e-2, "y")
    close(to(r["dx"]), r["dx_ref"], 5e-2, "dx")


@pytest.mark.parametrize("norm", NORMS)
def test_bfloat16_matches_torch(backend, norm):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: pip install 'cnorm-kernels[test]'")
    F = torch.nn.functional
    rng = np.random.default_rng(3)
    x32 = rng.standard_normal((4, 6, 5, 7)).astype(np.float32) * 2 + 1
    x = x32.astype(BFLOAT16)
    ns = (5, 7)
    pshape = ns if norm == "layer_norm" else (6,)
    w = rng.uniform(0.5, 1.5, pshape).astype(np.float32)
    b = rng.standard_normal(pshape).astype(np.float32)
    xt = torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    wt, bt = torch.from_numpy(w), torch.from_numpy(b)
    if norm == "layer_norm":  # PyTorch CPU layer_norm wants parameters in the input dtype
        wt, bt = wt.to(torch.bfloat16), bt.to(torch.bfloat16)
        w, b = w.astype(BFLOAT16), b.astype(BFLOAT16)
    with torch.no_grad():
        ty = {
            "batch_norm": lambda: F.batch_norm(xt, None, None, wt, bt, training=True),
            "instance_norm": lambda: F.instance_norm(xt, weight=wt, bias=bt),
            "group_norm": lambda: F.group_norm(xt, 3, wt, bt),
            "layer_norm": lambda: F.layer_norm(xt, ns, wt, bt),
        }[norm]()
    A = backend.asarray
    y, _ = forward(norm, A(x), A(w), A(b), backend=backend.name, num_groups=3, normalized_shape=ns)
    y = backend.to_numpy(y).astype(np.float32)
    # both are rounded to bfloat16 (8 significant bits): at most a couple of ulps apart
    close(y, ty.float().numpy(), 2e-2, "y vs torch bf16")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [np.float32, FLOAT16, BFLOAT16], ids=["f32", "f16", "bf16"])
def test_constant_group_gives_bias_exactly(backend, norm, dtype):
    x = np.full((3, 4, 6), 3.25, dtype=dtype)
    pshape = (6,) if norm == "layer_norm" else (4,)
    b = np.linspace(-1, 1, int(np.prod(pshape))).astype(np.float32)
    w = np.full(pshape, 2.0, np.float32)
    y, _ = forward(norm, backend.asarray(x), backend.asarray(w), backend.asarray(b), backend=backend.name,
                   normalized_shape=(6,))
    y = backend.to_numpy(y).astype(np.float32)
    assert np.all(np.isfinite(y))
    expected = np.broadcast_to(b if norm == "layer_norm" else b[None, :, None], x.shape).astype(dtype)
    assert np.array_equal(y, expected.astype(np.float32))


@pytest.mark.parametrize("norm", NORMS)
def test_huge_values_do_not_overflow(backend, norm):
    """|x| ~ 1e30 in float32: squares (1e60) overflow float32, the variance must not."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((3, 4, 16)) * 1e30).astype(np.float32)
    y, saved = forward(norm, backend.asarray(x), backend=backend.name, normalized_shape=(16,))
    y = backend.to_numpy(y)
    assert np.all(np.isfinite(y))
    y_ref, _, _ = reference.forward(x, norm, num_groups=2, normalized_ndim=1)
    close(y, y_ref, 1e-4, "y")
    dx, _, _ = backward(norm, backend.asarray(np.ones_like(x)), backend.asarray(x), saved)
    assert np.all(np.isfinite(backend.to_numpy(dx)))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_value_stays_in_its_group(backend, norm, bad):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 4, 8)).astype(np.float32)
    x[1, 2, 3] = bad  # sample 1, channel 2 (group 1 of 2), element 3
    y, _ = forward(norm, backend.asarray(x), backend=backend.name, normalized_shape=(8,))
    y = backend.to_numpy(y)
    y_ref, _, _ = reference.forward(x, norm, num_groups=2, normalized_ndim=1)
    poisoned = ~np.isfinite(y_ref)
    assert poisoned.any() and not poisoned.all()
    assert np.all(~np.isfinite(y[poisoned])), "the poisoned group must be non-finite"
    close(y[~poisoned], y_ref[~poisoned], 1e-4, "the other groups")


def test_long_channel_keeps_float32_accuracy(backend):
    """BatchNorm over 2^24 + 2^20 values per channel: a single float32 running sum would
    stop growing at 2^24 (adding 1.0 no longer changes it) and get the mean wrong."""
    n = (1 << 24) + (1 << 20)
    x = np.ones((n, 1), dtype=np.float32)
    x[::2] = 3.0  # mean 2, std 1, exactly
    y, saved = cnorm.batch_norm_forward(backend.asarray(x), backend=backend.name)
    mean = float(backend.to_numpy(saved.mean)[0])
    rstd = float(backend.to_numpy(saved.rstd)[0])
    assert abs(mean - 2.0) < 1e-6
    assert abs(rstd - 1 / np.sqrt(1 + 1e-5)) < 1e-6
    y = backend.to_numpy(y)
    assert abs(float(y[0, 0]) - 1 / np.sqrt(1 + 1e-5)) < 1e-5 and abs(float(y[1, 0]) + 1 / np.sqrt(1 + 1e-5)) < 1e-5
