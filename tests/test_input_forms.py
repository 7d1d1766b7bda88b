"""Every form of array NumPy allows gives the right answer or a clear error.

Byte-swapped (``>f4`` on x86) and unaligned arrays are computed on as NumPy's
ufuncs do (the results equal those for the native, aligned array, and come
back in native byte order); masked arrays are refused, since the kernels
would ignore the mask; read-only running statistics are fine where nothing
is written to them (eval mode).
"""

import numpy as np
import pytest

import cnorm
from cnorm import _cpu
from helpers import NORMS, backward, forward

RNG = np.random.default_rng(7)
X = RNG.standard_normal((4, 6, 5)).astype(np.float32)
DY = RNG.standard_normal((4, 6, 5)).astype(np.float32)
W = (1 + 0.1 * RNG.standard_normal(6)).astype(np.float32)
B = (0.1 * RNG.standard_normal(6)).astype(np.float32)
RM = RNG.standard_normal(6).astype(np.float32)
RV = (0.5 + RNG.random(6)).astype(np.float32)
LN_W = (1 + 0.1 * RNG.standard_normal(5)).astype(np.float32)


def swapped(a):
    """``a`` with the other byte order (same values)."""
    return a.astype(a.dtype.newbyteorder("S"))


def unaligned(a):
    """A C-contiguous copy of ``a`` whose data starts one byte past an aligned address."""
    buf = np.zeros(a.nbytes + a.itemsize, np.uint8)
    u = np.frombuffer(buf.data, a.dtype, count=a.size, offset=1).reshape(a.shape)
    u[...] = a
    assert not u.flags.aligned and u.flags.c_contiguous and u.flags.writeable
    return u


def host_only(backend):
    if backend.name == "cupy":
        pytest.skip("byte order, alignment and masks are NumPy (host) array properties")


def params(norm):
    return (LN_W, LN_W[::-1].copy()) if norm == "layer_norm" else (W, B)


def run(norm, backend, x, dy, w, b, **kw):
    extra = {"normalized_shape": (5,)} if norm == "layer_norm" else {}
    y, saved = forward(norm, x, w, b, backend=backend, **extra, **kw)
    dx, dw, db = backward(norm, dy, x, saved, w)
    return y, dx, dw, db


def assert_same(got, want):
    for g, e in zip(got, want):
        assert g.dtype.isnative and g.dtype == e.dtype
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("form", [swapped, unaligned], ids=["byte-swapped", "unaligned"])
@pytest.mark.parametrize("which", ["x", "dy", "weight", "bias", "all"])
@pytest.mark.parametrize("norm", NORMS)
def test_training_forward_and_backward(backend, norm, which, form):
    host_only(backend)
    w, b = params(norm)
    want = run(norm, backend.name, X, DY, w, b)
    args = {"x": X, "dy": DY, "w": w, "b": b}
    key = {"weight": "w", "bias": "b"}.get(which, which)
    for k in args:
        if key in (k, "all"):
            args[k] = form(args[k])
    assert_same(run(norm, backend.name, args["x"], args["dy"], args["w"], args["b"]), want)


@pytest.mark.parametrize("form", [swapped, unaligned], ids=["byte-swapped", "unaligned"])
@pytest.mark.parametrize("norm", ["batch_norm", "instance_norm"])
def test_eval_mode_running_statistics(backend, norm, form):
    """The running statistics are read by the eval forward and backward (the bug:
    ``>f4`` running_var 1.0 read as 4.6e-41 gave outputs off by hundreds)."""
    host_only(backend)
    flag = {"training": False} if norm == "batch_norm" else {"use_input_stats": False}
    want = run(norm, backend.name, X, DY, W, B, running_mean=RM, running_var=RV, **flag)
    got = run(norm, backend.name, X, DY, form(W), form(B), running_mean=form(RM), running_var=form(RV), **flag)
    assert_same(got, want)
    ref = (X - RM[:, None]) / np.sqrt(RV[:, None] + 1e-5) * W[:, None] + B[:, None]
    np.testing.assert_allclose(got[0], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", [swapped, unaligned], ids=["byte-swapped", "unaligned"])
def test_running_statistics_updated_in_place_keep_their_form(backend, form):
    host_only(backend)
    rm, rv = RM.copy(), RV.copy()
    cnorm.batch_norm(X, running_mean=rm, running_var=rv, backend=backend.name)
    frm, frv = form(RM), form(RV)
    cnorm.batch_norm(X, running_mean=frm, running_var=frv, backend=backend.name)
    assert frm.dtype == form(RM).dtype  # still the caller's buffer, updated in place
    np.testing.assert_array_equal(frm, rm)
    np.testing.assert_array_equal(frv, rv)


def test_byte_swapped_float64_layer_norm(backend):
    host_only(backend)
    x = X.astype(np.float64)
    y = cnorm.layer_norm(swapped(x), 5, backend=backend.name)
    assert y.dtype == np.float64 and y.dtype.isnative
    np.testing.assert_array_equal(y, cnorm.layer_norm(x, 5, backend=backend.name))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_unaligned_half_data(backend, dtype):
    host_only(backend)
    if np.dtype(_dtype(dtype)) not in cnorm.backends.get_backend_instance(backend.name).supported_dtypes():
        pytest.skip(f"the {backend.name} backend has no {dtype} kernels")
    x = X.astype(_dtype(dtype))
    np.testing.assert_array_equal(cnorm.layer_norm(unaligned(x), 5, backend=backend.name),
                                  cnorm.layer_norm(x, 5, backend=backend.name))


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


# -- the compiled kernels' own checks --------------------------------------------

@pytest.fixture(params=[pytest.param(lv, id=lv) for lv in _cpu.usable_levels()])
def kernels(request):
    if not _cpu.usable_levels():
        pytest.skip("the compiled kernels are not built")
    with _cpu.use_level(request.param):
        yield _cpu.K


def test_kernels_copy_inputs_they_would_misread(kernels):
    """Called directly, the kernels read byte-swapped and unaligned inputs correctly."""
    x3 = X.reshape(4, 6, 5)
    scale, shift = W.copy(), B.copy()
    want = np.empty_like(x3)
    kernels.affine(x3, want, False, 4, 6, 5, scale, shift, 1)
    for form in (swapped, unaligned):
        y = np.empty_like(x3)
        kernels.affine(form(x3), y, False, 4, 6, 5, form(scale), form(shift), 1)
        np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("form", [swapped, unaligned], ids=["byte-swapped", "unaligned"])
def test_kernels_refuse_outputs_they_would_miswrite(kernels, form):
    x3 = X.reshape(4, 6, 5)
    with pytest.raises(ValueError, match=r"y: expected an aligned output array in native byte order"):
        kernels.affine(x3, form(np.empty_like(x3)), False, 4, 6, 5, W, B, 1)


def test_fold_frozen_leaves_swapped_statistics_to_numpy(kernels):
    assert kernels.fold_frozen(swapped(RM), RV, W, B, 1e-5) is None
    assert kernels.fold_frozen(RM, unaligned(RV), W, B, 1e-5) is None
    assert kernels.fold_frozen(RM, RV, W, B, 1e-5) is not None


# -- masked arrays -----------------------------------------------------------------

@pytest.mark.parametrize("which", ["x", "weight", "running_var"])
def test_masked_arrays_are_refused(backend, which):
    host_only(backend)
    x = np.ma.masked_array(X, mask=X > 1) if which == "x" else X
    w = np.ma.masked_array(W, mask=[True] + [False] * 5) if which == "weight" else W
    rv = np.ma.masked_array(RV) if which == "running_var" else RV.copy()
    rm = RM.copy()
    with pytest.raises(TypeError, match=rf"{which}: .*MaskedArray"):
        cnorm.batch_norm(x, w, B, running_mean=rm, running_var=rv, backend=backend.name)
    np.testing.assert_array_equal(rm, RM)


def test_masked_array_message_says_why(backend):
    host_only(backend)
    with pytest.raises(TypeError, match=r"mask would be ignored.*x\.filled"):
        cnorm.layer_norm(np.ma.masked_array(X, mask=X > 1), 5, backend=backend.name)
    y, saved = cnorm.layer_norm_forward(X, 5, backend=backend.name)
    with pytest.raises(TypeError, match=r"dy: .*MaskedArray"):
        cnorm.layer_norm_backward(np.ma.masked_array(DY), X, saved)


# -- read-only buffers where nothing is written -----------------------------------------

@pytest.mark.parametrize("norm", ["batch_norm", "instance_norm"])
def test_read_only_running_statistics_in_eval_mode(backend, norm):
    host_only(backend)
    rm, rv = RM.copy(), RV.copy()
    want = run(norm, backend.name, X, DY, W, B, running_mean=rm, running_var=rv,
               **({"training": False} if norm == "batch_norm" else {"use_input_stats": False}))
    for a in (rm, rv):
        a.setflags(write=False)
    got = run(norm, backend.name, X, DY, W, B, running_mean=rm, running_var=rv,
              **({"training": False} if norm == "batch_norm" else {"use_input_stats": False}))
    assert_same(got, want)
    # and still refused where they would be written
    with pytest.raises(ValueError, match="running_mean: expected a writable array"):
        forward(norm, X, backend=backend.name, running_mean=rm, running_var=rv)


def test_read_only_inputs(backend):
    host_only(backend)
    x, w = X.copy(), W.copy()
    x.setflags(write=False)
    w.setflags(write=False)
    y, saved = cnorm.batch_norm_forward(x, w, B, backend=backend.name)
    np.testing.assert_array_equal(y, cnorm.batch_norm(X, W, B, backend=backend.name))
    cnorm.batch_norm_backward(DY, x, saved, w)
