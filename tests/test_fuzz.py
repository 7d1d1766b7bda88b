"""Fuzzing every backend with every form of array NumPy allows.

Hypothesis draws the norm, the shape (odd sizes and vector tails), the channel
axis and groups, the dtype (half types included), and for each of x, dy,
weight, bias and the running statistics a memory form: contiguous,
byte-swapped, unaligned, negative strides, zero strides (a broadcast view),
overlapping rows (a sliding-window view), or Fortran order. Every backend (the
compiled one at every CPU level) must agree with the float64 reference
evaluated on the same values, return native, writable results, and leave
every input as it was. ``CNORM_FUZZ_EXAMPLES`` sets the number of draws
per backend (120 by default).
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cnorm._dtypes import BFLOAT16, FLOAT16
from cnorm.backends import get_backend_instance
from helpers import backward, close, forward
import reference

FORMS = ("contiguous", "swapped", "unaligned", "negative", "zero", "overlap", "fortran")
DTYPES = [np.dtype(np.float32), np.dtype(np.float64), FLOAT16] + ([BFLOAT16] if BFLOAT16 is not None else [])
SIZES = st.one_of(st.integers(1, 5), st.sampled_from([7, 9, 15, 17, 31, 33]))


def in_form(a, form, rng):
    """A new array whose values are ``a``'s (or, for "zero" and "overlap", values drawn
    from ``a``) in the requested memory form."""
    if form == "swapped" and a.dtype != BFLOAT16:  # (ml_dtypes' bfloat16 has one byte order)
        return a.astype(a.dtype.newbyteorder("S"))
    if form == "unaligned":
        buf = np.zeros(a.nbytes + a.itemsize, np.uint8)
        u = np.frombuffer(buf.data, a.dtype, count=a.size, offset=1).reshape(a.shape)
        u[...] = a
        return u
    if form == "negative":
        axis = int(rng.integers(a.ndim))
        return np.flip(np.flip(a, axis).copy(), axis)
    if form == "zero":
        axes = [i for i in range(a.ndim) if a.shape[i] > 1]
        if axes:
            axis = int(rng.choice(axes))
            return np.broadcast_to(np.take(a, [0], axis=axis), a.shape)  # stride 0 along axis
    if form == "overlap" and a.ndim >= 2 and a.shape[-1] > 1:
        k = a.shape[-1]
        step = max(1, k // 2)  # consecutive rows share k - step values
        rows = int(np.prod(a.shape[:-1]))
        base = a.reshape(-1)[: rows * step + k - step].copy()
        if base.size < rows * step + k - step:
            base = np.resize(a.reshape(-1), rows * step + k - step)
        strides, s = [], step * a.itemsize
        for d in reversed(a.shape[:-1]):
            strides.insert(0, s)
            s *= d
        return np.lib.stride_tricks.as_strided(base, a.shape, (*strides, a.itemsize), writeable=False)
    if form == "fortran":
        return np.asfortranarray(a)
    return a.copy()


@st.composite
def cases(draw):
    norm = draw(st.sampled_from(["batch_norm", "instance_norm", "group_norm", "layer_norm"]))
    ndim = draw(st.integers(2, 4))
    shape = [draw(SIZES) for _ in range(ndim)]
    shape[0] = draw(st.integers(1, 4))
    if int(np.prod(shape)) > 6000:  # keep each example fast
        shape = [min(s, 9) for s in shape]
    channel_axis = draw(st.integers(1, ndim - 1))
    c = shape[channel_axis]
    groups = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    normalized_ndim = draw(st.integers(1, ndim - 1))
    spatial = int(np.prod([s for i, s in enumerate(shape) if i not in (0, channel_axis)]))
    if norm == "batch_norm" and shape[0] * spatial < 2:
        shape[0] = 2
    if norm == "instance_norm" and spatial < 2:
        norm = "group_norm"
    dtype = draw(st.sampled_from(DTYPES))
    forms = {k: draw(st.sampled_from(FORMS)) for k in ("x", "dy", "weight", "bias", "running")}
    affine = draw(st.booleans())
    eval_mode = norm in ("batch_norm", "instance_norm") and draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return norm, tuple(shape), channel_axis, groups, normalized_ndim, dtype, forms, affine, eval_mode, seed


def tolerances(dtype):
    """(y, dweight-per-value) tolerances relative to scale; half outputs round to 2-3 digits."""
    if dtype == np.float64:
        return 1e-9, 1e-9
    if dtype == np.float32:
        return 1e-4, 1e-5
    return (1e-2 if dtype == FLOAT16 else 3e-2), 1e-4


# CNORM_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py: a longer run
@settings(max_examples=int(os.environ.get("CNORM_FUZZ_EXAMPLES", "120")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_every_form_matches_reference(backend, case):
    if backend.name == "cupy":
        pytest.skip("byte order, alignment and strides are NumPy (host) array forms")
    norm, shape, channel_axis, groups, nd, dtype, forms, affine, eval_mode, seed = case
    if dtype not in get_backend_instance(backend.name).supported_dtypes():
        assume(False)  # (a skip here would skip every other example too)
    rng = np.random.default_rng(seed)
    pdt = np.float64 if dtype == np.float64 else np.float32
    normalized_shape = shape[len(shape) - nd:]
    pshape = normalized_shape if norm == "layer_norm" else (shape[channel_axis],)

    x = in_form(rng.standard_normal(shape).astype(dtype), forms["x"], rng)
    dy = in_form(rng.standard_normal(shape).astype(dtype), forms["dy"], rng)
    w = in_form(rng.uniform(0.5, 1.5, pshape).astype(pdt), forms["weight"], rng) if affine else None
    b = in_form(rng.standard_normal(pshape).astype(pdt), forms["bias"], rng) if affine else None
    stats = {}
    if eval_mode:
        c = shape[channel_axis]
        stats = dict(running_mean=in_form(rng.standard_normal(c).astype(pdt), forms["running"], rng),
                     running_var=in_form(rng.uniform(0.5, 2, c).astype(pdt), forms["running"], rng))
        stats["training" if norm == "batch_norm" else "use_input_stats"] = False
    inputs = {"x": x, "dy": dy, "weight": w, "bias": b, **{k: v for k, v in stats.items() if k.startswith("r")}}
    before = {k: np.array(v, copy=True) for k, v in inputs.items() if v is not None}

    y, saved = forward(norm, x, w, b, backend=backend.name, channel_axis=channel_axis, num_groups=groups,
                       normalized_shape=normalized_shape, **stats)
    dx, dw, db = backward(norm, dy, x, saved, w)

    for k, v in before.items():  # nothing written to any input, whatever its form
        np.testing.assert_array_equal(np.asarray(inputs[k]), v, err_msg=f"{k} changed")
    for name, out in (("y", y), ("dx", dx)):
        assert out.shape == shape and out.dtype == dtype and out.dtype.isnative, name
        assert out.flags.writeable and out.flags.aligned, name

    f64 = (lambda a: None if a is None else np.asarray(a, dtype=np.float64))
    kw = dict(channel_axis=channel_axis, num_groups=groups, normalized_ndim=nd)
    if eval_mode:
        kw.update(mean=f64(stats["running_mean"]), var=f64(stats["running_var"]))
    y_ref, _, var = reference.forward(f64(x), norm, f64(w), f64(b), **kw)
    dx_ref, dw_ref, db_ref = reference.backward(f64(dy), f64(x), norm, f64(w), **kw)
    tol, tol_sum = tolerances(dtype)
    std = float(np.sqrt(np.min(np.asarray(var, dtype=np.float64)) + 1e-5))
    close(y, y_ref, tol * (1.0 if eval_mode else max(1.0, 1.0 / std)), "y")
    close(dx, dx_ref, tol * max(1.0, 1.0 / std) ** 2, "dx")
    if affine:
        size = max(1, int(np.prod(shape)))
        close(dw, dw_ref, tol_sum * size * max(1.0, 1.0 / std), "dweight")
        close(db, db_ref, tol_sum * size, "dbias")
