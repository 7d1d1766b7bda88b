"""Uniform calls into the four norms, so that one test body covers all of them."""

import numpy as np

import cnorm

NORMS = ("batch_norm", "instance_norm", "group_norm", "layer_norm")


def forward(norm, x, weight=None, bias=None, *, backend=None, channel_axis=1, num_groups=2,
            normalized_shape=None, **kw):
    """Call ``cnorm.<norm>_forward`` with the arguments that norm takes."""
    if norm == "batch_norm":
        return cnorm.batch_norm_forward(x, weight, bias, channel_axis=channel_axis, backend=backend, **kw)
    if norm == "instance_norm":
        return cnorm.instance_norm_forward(x, weight, bias, channel_axis=channel_axis, backend=backend, **kw)
    if norm == "group_norm":
        return cnorm.group_norm_forward(x, num_groups, weight, bias, channel_axis=channel_axis, backend=backend, **kw)
    return cnorm.layer_norm_forward(x, normalized_shape, weight, bias, backend=backend, **kw)


def backward(norm, dy, x, saved, weight=None):
    return getattr(cnorm, f"{norm}_backward")(dy, x, saved, weight)


def param_shape(norm, x_shape, channel_axis=1, normalized_shape=None):
    if norm == "layer_norm":
        return tuple(normalized_shape)
    return (x_shape[channel_axis],)


def close(actual, expected, tol, what=""):
    """Assert |actual − expected| <= tol · max(1, max|expected|) elementwise."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    err = float(np.max(np.abs(actual - expected), initial=0.0))
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} x scale {scale:.3g}"


def make_input(rng, shape, layout, dtype, offset=0.0, scale=1.0):
    """A random array of logical ``shape`` (N, C, ...) in the requested memory layout.

    layout "cf": C-contiguous; "cl_strided": logical NC... with channels-last
    strides (a PyTorch channels_last tensor); "cl": a separate (N, ..., C)
    array — callers then use channel_axis=-1 and this returns that array.
    """
    data = (offset + scale * rng.standard_normal(shape)).astype(dtype)
    if layout == "cf":
        return data
    moved = np.ascontiguousarray(np.moveaxis(data, 1, -1))
    if layout == "cl":
        return moved
    return np.moveaxis(moved, -1, 1)


def same_bits(got, want, what=""):
    """Assert host arrays bit-identical (NaN == NaN, -0 != +0) with one dtype and shape, or both None."""
    if want is None:
        assert got is None, what
        return
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    bits = f"u{got.dtype.itemsize}"
    np.testing.assert_array_equal(np.ascontiguousarray(got).view(bits), np.ascontiguousarray(want).view(bits),
                                  err_msg=what)
