"""Every norm, forward and backward, on every backend, against the float64 maths."""

import numpy as np
import pytest

import cnorm
from conftest import tolerance
from helpers import NORMS, backward, close, forward, make_input, param_shape
import reference

SHAPES = [(7, 4), (3, 4, 5), (2, 4, 3, 5), (2, 4, 2, 3, 2)]
LAYOUTS = ["cf", "cl", "cl_strided"]


def run_case(backend, norm, shape, layout, dtype, affine, training=True, offset=0.0, seed=0):
    """Forward + backward on ``backend`` and in the reference; compare everything."""
    rng = np.random.default_rng(seed)
    x = make_input(rng, shape, layout, dtype, offset=offset)
    channel_axis = -1 if layout == "cl" else 1
    normalized_shape = x.shape[-2:] if norm == "layer_norm" else None
    pshape = param_shape(norm, x.shape, channel_axis, normalized_shape)
    w = rng.uniform(0.5, 1.5, pshape).astype(dtype) if affine else None
    b = rng.standard_normal(pshape).astype(dtype) if affine else None
    dy = rng.standard_normal(x.shape).astype(dtype)
    kw = {}
    ref_kw = dict(channel_axis=channel_axis, num_groups=2, normalized_ndim=2)
    if not training:
        rm = rng.standard_normal(pshape).astype(np.float32)
        rv = rng.uniform(0.5, 2.0, pshape).astype(np.float32)
        kw = ({"training": False} if norm == "batch_norm" else {"use_input_stats": False})
        kw.update(running_mean=backend.asarray(rm), running_var=backend.asarray(rv))
        ref_kw.update(mean=rm, var=rv)
    y, saved = forward(norm, backend.asarray(x), backend.asarray(w), backend.asarray(b), backend=backend.name,
                       channel_axis=channel_axis, normalized_shape=normalized_shape, **kw)
    dx, dw, db = backward(norm, backend.asarray(dy), backend.asarray(x), saved, backend.asarray(w))
    y_ref, _, _ = reference.forward(x, norm, w, b, **ref_kw)
    dx_ref, dw_ref, db_ref = reference.backward(dy, x, norm, w, **ref_kw)
    # A float32 mean of values near `offset` is itself only known to offset·eps/2, and
    # backward must use the saved float32 mean (as PyTorch does): allow that much.
    tol = max(tolerance(dtype), 8 * abs(offset) * np.finfo(dtype).eps)
    y, dx = backend.to_numpy(y), backend.to_numpy(dx)
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert y.shape == x.shape and dx.shape == x.shape
    close(y, y_ref, tol, "y")
    close(dx, dx_ref, tol, "dx")
    if affine:
        close(backend.to_numpy(dw), dw_ref, tol * 10, "dweight")
        close(backend.to_numpy(db), db_ref, tol * 10, "dbias")
    else:
        assert dw is None and db is None
    return x, y, dx


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_train_matches_reference(backend, norm, shape, layout, dtype, affine):
    if norm == "instance_norm" and len(shape) == 2:
        pytest.skip("instance norm needs spatial dims (tested as an error in test_errors)")
    if norm == "layer_norm" and layout == "cl_strided":
        layout = "cf"  # LayerNorm has no channel axis; strided inputs are covered in test_layouts
    run_case(backend, norm, shape, layout, dtype, affine)


@pytest.mark.parametrize("norm", ["batch_norm", "instance_norm"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_eval_matches_reference(backend, norm, layout, dtype, affine):
    run_case(backend, norm, (3, 4, 5, 2), layout, dtype, affine, training=False)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_large_offset_is_stable(backend, norm, dtype):
    """|mean| = 1e4·std: a formula E[x²] − E[x]² would lose every digit in float32."""
    run_case(backend, norm, (4, 4, 6, 5), "cf", dtype, True, offset=1e4)


@pytest.mark.parametrize("norm", NORMS)
def test_output_keeps_memory_layout(backend, norm):
    rng = np.random.default_rng(1)
    for layout in ("cf", "cl_strided"):
        x = backend.asarray(make_input(rng, (2, 4, 3, 5), layout, np.float32))
        y, saved = forward(norm, x, backend=backend.name, normalized_shape=x.shape[-1:])
        dx, _, _ = backward(norm, backend.xp.ones_like(x), x, saved)
        if norm != "layer_norm":
            assert np.argsort(y.strides).tolist() == np.argsort(x.strides).tolist()
            assert np.argsort(dx.strides).tolist() == np.argsort(x.strides).tolist()


@pytest.mark.parametrize("norm", NORMS)
def test_saved_holds_only_statistics(backend, norm):
    x = backend.asarray(np.random.default_rng(2).standard_normal((4, 6, 5)))
    _, saved = forward(norm, x, backend=backend.name, num_groups=3, normalized_shape=(6, 5))
    expected = {"batch_norm": (6,), "instance_norm": (4, 6), "group_norm": (4, 3), "layer_norm": (4, 1)}[norm]
    assert saved.mean.shape == expected and saved.rstd.shape == expected
    assert saved.mean.size < x.size


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("kind", ["transposed", "sliced", "negative", "readonly"])
def test_unusual_strides(backend, norm, kind):
    """Non-contiguous, negatively strided and read-only inputs give the contiguous result."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((4, 6, 8, 5))
    x = {
        "transposed": np.ascontiguousarray(base.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2),
        "sliced": base[:, :, ::2],
        "negative": base[::-1, :, ::-1],
        "readonly": base.copy(),
    }[kind]
    if kind == "readonly":
        x.setflags(write=False)
    contiguous = np.ascontiguousarray(x)
    ns = x.shape[-2:]
    y1, s1 = forward(norm, backend.asarray(x), backend=backend.name, normalized_shape=ns)
    y2, s2 = forward(norm, backend.asarray(contiguous), backend=backend.name, normalized_shape=ns)
    close(backend.to_numpy(y1), backend.to_numpy(y2), 1e-12, "y")
    dy = rng.standard_normal(x.shape)[::-1]
    dx1, _, _ = backward(norm, backend.asarray(dy), backend.asarray(x), s1)
    dx2, _, _ = backward(norm, backend.asarray(np.ascontiguousarray(dy)), backend.asarray(contiguous), s2)
    close(backend.to_numpy(dx1), backend.to_numpy(dx2), 1e-12, "dx")


@pytest.mark.parametrize("channel_axis", [1, 2, 3, -1, -2])
def test_any_channel_axis(backend, channel_axis):
    """Channels on any non-batch axis agree with moving them to axis 1."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 4, 6, 5))
    c = x.shape[channel_axis]
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    for norm in ("batch_norm", "group_norm", "instance_norm"):
        groups = 2 if c % 2 == 0 else 1
        y, _ = forward(norm, backend.asarray(x), backend.asarray(w), backend.asarray(b), backend=backend.name,
                       channel_axis=channel_axis, num_groups=groups)
        moved = np.moveaxis(x, channel_axis, 1)
        y_ref, _ = forward(norm, backend.asarray(np.ascontiguousarray(moved)), backend.asarray(w),
                           backend.asarray(b), backend=backend.name, num_groups=groups)
        close(np.moveaxis(backend.to_numpy(y), channel_axis, 1), backend.to_numpy(y_ref), 1e-12, norm)


def test_group_norm_extremes(backend):
    """G = 1 is a LayerNorm over (C, S) with per-channel affine; G = C is InstanceNorm."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 7))
    y1 = backend.to_numpy(cnorm.group_norm(backend.asarray(x), 1, backend=backend.name))
    close(y1, backend.to_numpy(cnorm.layer_norm(backend.asarray(x), (4, 7), backend=backend.name)), 1e-12, "G=1")
    yc = backend.to_numpy(cnorm.group_norm(backend.asarray(x), 4, backend=backend.name))
    close(yc, backend.to_numpy(cnorm.instance_norm(backend.asarray(x), backend=backend.name)), 1e-12, "G=C")


@pytest.mark.parametrize("norm", NORMS)
def test_empty_batch(backend, norm):
    """N = 0 returns an empty output and leaves running statistics untouched."""
    x = backend.asarray(np.zeros((0, 4, 3), dtype=np.float32))
    kw = {}
    if norm in ("batch_norm", "instance_norm"):
        kw = dict(running_mean=backend.asarray(np.full(4, 0.5, np.float32)),
                  running_var=backend.asarray(np.full(4, 2.0, np.float32)))
    y, saved = forward(norm, x, backend=backend.name, normalized_shape=(4, 3), **kw)
    assert y.shape == x.shape
    if kw:
        assert np.all(backend.to_numpy(kw["running_mean"]) == 0.5)
        assert np.all(backend.to_numpy(kw["running_var"]) == 2.0)
    w = backend.asarray(np.ones(param_shape(norm, x.shape, 1, (4, 3)), np.float32))
    dx, dw, db = backward(norm, backend.xp.zeros_like(x), x, saved, w)
    assert dx.shape == x.shape and np.all(backend.to_numpy(dw) == 0) and db is None


def test_constant_group_is_zero_not_nan(backend):
    x = backend.asarray(np.full((4, 3, 5), 7.0, dtype=np.float32))
    for norm in NORMS:
        y, _ = forward(norm, x, backend=backend.name, num_groups=3, normalized_shape=(3, 5))
        assert np.all(backend.to_numpy(y) == 0), norm
