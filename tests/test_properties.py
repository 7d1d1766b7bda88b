"""Hypothesis draws shapes, ranks, channel axes, groups, affine and offsets; every
backend must agree with the independent float64 reference."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tolerance
from helpers import backward, close, forward
import reference


@st.composite
def cases(draw):
    norm = draw(st.sampled_from(["batch_norm", "instance_norm", "group_norm", "layer_norm"]))
    ndim = draw(st.integers(2, 5))
    shape = [draw(st.integers(1, 5)) for _ in range(ndim)]
    shape[0] = draw(st.integers(1, 4))
    channel_axis = draw(st.integers(1, ndim - 1))
    if draw(st.booleans()):
        channel_axis -= ndim  # the same axis, counted from the end
    c = shape[channel_axis]
    groups = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    normalized_ndim = draw(st.integers(1, ndim - 1))
    spatial = int(np.prod([s for i, s in enumerate(shape) if i not in (0, channel_axis % ndim)]))
    if norm == "batch_norm" and shape[0] * spatial < 2:
        shape[0] = 2
    if norm == "instance_norm" and spatial < 2:
        norm = "group_norm"
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    offset = draw(st.sampled_from([0.0, 1e4]))
    affine = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return norm, tuple(shape), channel_axis, groups, normalized_ndim, dtype, offset, affine, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_random_cases_match_reference(backend, case):
    norm, shape, channel_axis, groups, nd, dtype, offset, affine, seed = case
    rng = np.random.default_rng(seed)
    x = (offset + rng.standard_normal(shape)).astype(dtype)
    if rng.random() < 0.5:  # a non-contiguous view half the time
        x = np.swapaxes(np.ascontiguousarray(np.swapaxes(x, 0, -1)), 0, -1)
    normalized_shape = shape[len(shape) - nd:]
    pshape = normalized_shape if norm == "layer_norm" else (shape[channel_axis],)
    w = rng.uniform(0.5, 1.5, pshape).astype(dtype) if affine else None
    b = rng.standard_normal(pshape).astype(dtype) if affine else None
    dy = rng.standard_normal(shape).astype(dtype)
    A = backend.asarray
    y, saved = forward(norm, A(x), A(w), A(b), backend=backend.name, channel_axis=channel_axis,
                       num_groups=groups, normalized_shape=normalized_shape)
    dx, dw, db = backward(norm, A(dy), A(x), saved, A(w))
    kw = dict(channel_axis=channel_axis, num_groups=groups, normalized_ndim=nd)
    y_ref, _, var = reference.forward(x, norm, w, b, **kw)
    dx_ref, dw_ref, db_ref = reference.backward(dy, x, norm, w, **kw)
    # The saved mean is in the statistics dtype (float32 for float32, as in PyTorch):
    # near `offset` it is known to offset·eps/2, which backward sees relative to the std.
    std = float(np.sqrt(np.min(var) + 1e-5))
    tol = max(tolerance(dtype), 8 * offset * np.finfo(dtype).eps / std)
    close(backend.to_numpy(y), y_ref, tol, "y")
    close(backend.to_numpy(dx), dx_ref, tol * max(1.0, 1.0 / std), "dx")  # times rstd once more
    if affine:
        size = max(1, x.size)
        close(backend.to_numpy(dw), dw_ref, tol * size, "dweight")
        close(backend.to_numpy(db), db_ref, tol * size, "dbias")
