"""Every rejected input gets a ValueError or TypeError naming the argument, and no
running buffer is touched when a call fails."""

import numpy as np
import pytest

import cnorm

X = np.random.default_rng(0).standard_normal((4, 6, 5)).astype(np.float32)
C6 = np.ones(6, np.float32)


def bn(**kw):
    return lambda be: cnorm.batch_norm(**{"x": X, "backend": be, **kw})


def inn(**kw):
    return lambda be: cnorm.instance_norm(**{"x": X, "backend": be, **kw})


def gn(**kw):
    return lambda be: cnorm.group_norm(**{"x": X, "num_groups": 2, "backend": be, **kw})


def ln(**kw):
    return lambda be: cnorm.layer_norm(**{"x": X, "normalized_shape": 5, "backend": be, **kw})


BAD = [
    ("int dtype", bn(x=np.ones((4, 6, 5), np.int64)), TypeError, r"x: .*float.*int64"),
    ("complex dtype", ln(x=np.ones((4, 5), np.complex64)), TypeError, r"x: .*complex64"),
    ("list input", bn(x=[[1.0, 2.0], [3.0, 4.0]]), TypeError, r"x: .*expects.*list"),
    ("1-D input", bn(x=np.ones(6, np.float32)), ValueError, r"x: expected at least 2 dimensions"),
    ("weight length", bn(weight=np.ones(5, np.float32)), ValueError, r"weight: expected shape \(6,\)"),
    ("bias length", gn(bias=np.ones(3, np.float32)), ValueError, r"bias: expected shape \(6,\)"),
    ("int weight", inn(weight=np.ones(6, np.int32)), TypeError, r"weight: expected a floating"),
    ("weight type", bn(weight=[1.0] * 6), TypeError, r"weight: .*list"),
    ("groups not dividing", gn(num_groups=4), ValueError, r"num_groups: expected a divisor of the 6"),
    ("groups zero", gn(num_groups=0), ValueError, r"num_groups: expected an int >= 1"),
    ("groups float", gn(num_groups=2.0), TypeError, r"num_groups: expected an int"),
    ("eps negative", bn(eps=-1e-5), ValueError, r"eps: expected a finite number >= 0"),
    ("eps nan", ln(eps=float("nan")), ValueError, r"eps: expected a finite"),
    ("eps string", ln(eps="1e-5"), TypeError, r"eps: expected a real number"),
    ("eps int beyond float", bn(eps=10**400), ValueError, r"eps: expected a finite number >= 0, got 1000.*beyond"),
    ("eps int beyond str", ln(eps=10**5000), ValueError, r"eps: expected a finite number >= 0, got a number beyond"),
    ("momentum int beyond float", bn(momentum=10**400), ValueError, r"momentum: expected a number in \[0, 1\]"),
    ("groups huge negative", gn(num_groups=-10**5000), ValueError, r"num_groups: expected an int >= 1"),
    ("momentum > 1", bn(momentum=1.5), ValueError, r"momentum: expected a number in \[0, 1\]"),
    ("momentum < 0", inn(momentum=-0.1), ValueError, r"momentum: expected a number in \[0, 1\]"),
    ("momentum None", bn(momentum=None), ValueError, r"momentum: None"),
    ("training not bool", bn(training="yes"), TypeError, r"training: expected a bool"),
    ("eval without stats", bn(training=False), ValueError, r"running_mean, running_var: required when training=False"),
    ("instance eval without stats", inn(use_input_stats=False), ValueError, r"required when use_input_stats=False"),
    ("only running_mean", bn(running_mean=np.zeros(6, np.float32)), ValueError, r"expected both or neither"),
    ("running shape", bn(running_mean=np.zeros(5), running_var=np.ones(5)), ValueError, r"running_mean: expected shape \(6,\)"),
    ("one value per channel", bn(x=np.ones((1, 6), np.float32)), ValueError, r"more than 1 value per channel"),
    ("instance without spatial", inn(x=np.ones((3, 6), np.float32)), ValueError, r"more than 1 spatial element"),
    ("channel axis 0", bn(channel_axis=0), ValueError, r"channel_axis: expected a non-batch axis"),
    ("channel axis range", gn(channel_axis=3), ValueError, r"channel_axis: expected an axis in \[-3, 2\]"),
    ("channel axis type", bn(channel_axis=1.0), TypeError, r"channel_axis: expected an int"),
    ("normalized_shape mismatch", ln(normalized_shape=(6,)), ValueError, r"normalized_shape: expected the trailing"),
    ("normalized_shape too long", ln(normalized_shape=(1, 4, 6, 5)), ValueError, r"normalized_shape"),
    ("normalized_shape type", ln(normalized_shape="5"), TypeError, r"normalized_shape: expected an int or a tuple"),
    ("ln weight shape", ln(weight=np.ones(6, np.float32)), ValueError, r"weight: expected shape \(5,\)"),
    ("unknown backend", lambda be: cnorm.batch_norm(X, backend="tpu"), ValueError, r"backend: unknown backend 'tpu'.*'numpy'"),
    ("backend type", lambda be: cnorm.batch_norm(X, backend=3), TypeError, r"backend: expected a backend name"),
]


@pytest.mark.parametrize("what,call,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_rejected(backend, what, call, exc, match):
    if backend.name == "cupy":
        pytest.skip("these inputs are host arrays; cupy's array-type errors are tested in test_dispatch")
    with pytest.raises(exc, match=match):
        call(backend.name)


@pytest.mark.parametrize("bad", [True, 5.0, np.int64(5), (5.0,)], ids=repr)
def test_layer_norm_shape_of_another_type_is_checked_after_a_valid_call(backend, bad):
    """LayerNorm memoizes validated set-ups; values equal to a valid one as dict keys
    (True == 1, 5.0 == 5) must still be validated as arguments."""
    if backend.name == "cupy":
        pytest.skip("host arrays")
    x = X[:, :, :1] if bad is True else X  # True == 1: a trailing dim of 1
    cnorm.layer_norm(np.ascontiguousarray(x), 1 if x.shape[-1] == 1 else 5, backend=backend.name)
    if isinstance(bad, np.integer):  # a NumPy integer is a valid size, checked on every call
        assert cnorm.layer_norm(x, bad, backend=backend.name).shape == x.shape
        return
    with pytest.raises(TypeError, match=r"normalized_shape: expected an int or a tuple"):
        cnorm.layer_norm(np.ascontiguousarray(x), bad, backend=backend.name)


@pytest.mark.parametrize("bad", [
    dict(weight=np.ones(5, np.float32)),
    dict(momentum=2.0),
    dict(eps=-1.0),
    dict(x=np.ones((1, 6), np.float32)),
])
def test_running_buffers_untouched_on_failure(backend, bad):
    rm, rv = np.full(6, 0.25, np.float32), np.full(6, 4.0, np.float32)
    kw = dict(x=X, running_mean=backend.asarray(rm), running_var=backend.asarray(rv), backend=backend.name)
    kw.update({k: backend.asarray(v) if isinstance(v, np.ndarray) else v for k, v in bad.items()})
    with pytest.raises((ValueError, TypeError)):
        cnorm.batch_norm(**{**kw, "x": backend.asarray(kw["x"])})
    assert np.all(backend.to_numpy(kw["running_mean"]) == 0.25)
    assert np.all(backend.to_numpy(kw["running_var"]) == 4.0)


def test_readonly_running_buffer_is_rejected_before_anything(backend):
    if backend.name == "cupy":
        pytest.skip("CuPy arrays have no read-only flag")
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    rm.setflags(write=False)
    with pytest.raises(ValueError, match="running_mean: expected a writable array"):
        cnorm.batch_norm(X, running_mean=rm, running_var=rv, backend=backend.name)
    assert np.all(rv == 1)


def test_backward_checks(backend):
    A = backend.asarray
    y, saved = cnorm.batch_norm_forward(A(X), A(C6), A(C6), backend=backend.name)
    with pytest.raises(ValueError, match=r"dy: expected shape \(4, 6, 5\)"):
        cnorm.batch_norm_backward(A(np.ones((4, 6, 4), np.float32)), A(X), saved, A(C6))
    with pytest.raises(TypeError, match=r"dy: expected dtype float32"):
        cnorm.batch_norm_backward(A(np.ones((4, 6, 5))), A(X), saved, A(C6))
    with pytest.raises(ValueError, match=r"x: expected the forward input's shape"):
        cnorm.batch_norm_backward(A(np.ones((4, 6, 6), np.float32)), A(np.ones((4, 6, 6), np.float32)), saved)
    with pytest.raises(ValueError, match=r"saved: expected the result of layer_norm_forward"):
        cnorm.layer_norm_backward(A(X), A(X), saved)
    with pytest.raises(TypeError, match=r"saved: expected the Saved object"):
        cnorm.batch_norm_backward(A(X), A(X), {"mean": 0})
    with pytest.raises(ValueError, match=r"weight: expected shape \(6,\)"):
        cnorm.batch_norm_backward(A(X), A(X), saved, A(np.ones(3, np.float32)))
