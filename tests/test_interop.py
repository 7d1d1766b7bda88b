"""Arrays of other libraries through DLPack: any array in, the same type out.

PyTorch CPU tensors and array-API arrays (array-api-strict) go through the
functional API and the layers; results come back as the input's type and
equal the NumPy call's bit for bit; ``out=`` and running buffers given as
tensors are written in their memory; errors name the argument and the
conversion to use.
"""

from __future__ import annotations

import numpy as np
import pytest

import cnorm
import cnorm.nn as cnn

torch = pytest.importorskip("torch", reason="the interop tests need PyTorch (installed by the test extra)")
xps = pytest.importorskip("array_api_strict", reason="array-api-strict is installed by the test extra")

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


def as_numpy(t):
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


CALLS = {
    "batch_norm": lambda x, **k: cnorm.batch_norm(x, training=True, **k),
    "instance_norm": lambda x, **k: cnorm.instance_norm(x, **k),
    "group_norm": lambda x, **k: cnorm.group_norm(x, 2, **k),
    "layer_norm": lambda x, **k: cnorm.layer_norm(x, x.shape[-2:], **k),
    "rms_norm": lambda x, **k: cnorm.rms_norm(x, x.shape[-1:], **k),
}


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("norm", list(CALLS))
def test_torch_tensor_in_tensor_out(norm, dtype):
    t = torch.randn(3, 4, 5, 6).to(TORCH_DTYPES[dtype])
    y = CALLS[norm](t)
    assert isinstance(y, torch.Tensor) and y.dtype == t.dtype and y.shape == t.shape
    want = CALLS[norm](as_numpy(t).copy())
    assert as_numpy(y).tobytes() == want.tobytes()


def test_forward_backward_types_and_out():
    t = torch.randn(4, 6, 5, 5)
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    y, saved = cnorm.batch_norm_forward(t, w, b, training=True)
    assert isinstance(y, torch.Tensor)
    dy = torch.randn_like(t)
    dx, dw, db = cnorm.batch_norm_backward(dy, t, saved, w)
    assert all(isinstance(a, torch.Tensor) for a in (dx, dw, db))
    ref = cnorm.batch_norm_backward(dy.numpy(), t.numpy(), saved, w.numpy())
    for a, r in zip((dx, dw, db), ref):
        np.testing.assert_array_equal(a.numpy(), r)
    # out= a tensor: written in its memory, and returned as that very object
    out = torch.empty_like(t)
    r = cnorm.group_norm(t, 3, out=out)
    assert r is out
    np.testing.assert_array_equal(out.numpy(), cnorm.group_norm(t.numpy(), 3))
    # in place on a tensor
    u = t.clone()
    assert cnorm.layer_norm(u, (5, 5), out=u) is u
    np.testing.assert_array_equal(u.numpy(), cnorm.layer_norm(t.numpy(), (5, 5)))


def test_running_buffers_as_tensors_are_updated_in_place():
    t = torch.randn(8, 3, 4, 4)
    rm, rv = torch.zeros(3), torch.ones(3)
    rm0, rv0 = np.zeros(3, np.float32), np.ones(3, np.float32)
    cnorm.batch_norm(t, running_mean=rm, running_var=rv, training=True)
    cnorm.batch_norm(t.numpy(), running_mean=rm0, running_var=rv0, training=True)
    np.testing.assert_array_equal(rm.numpy(), rm0)
    np.testing.assert_array_equal(rv.numpy(), rv0)


def test_channels_last_tensor_keeps_its_memory_format():
    t = torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last)
    y = cnorm.batch_norm(t, training=True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(y.numpy(), cnorm.batch_norm(t.numpy().copy(order="K"), training=True))


def test_fused_forms_and_fold():
    x, r = torch.randn(4, 16), torch.randn(4, 16)
    y, h = cnorm.add_rms_norm(x, r, 16)
    assert isinstance(y, torch.Tensor) and isinstance(h, torch.Tensor)
    np.testing.assert_array_equal(h.numpy(), x.numpy() + r.numpy())
    cw, cb = torch.randn(8, 3, 3, 3), torch.randn(8)
    w2, b2 = cnorm.fold_batch_norm(cw, cb, torch.zeros(8), torch.ones(8))
    assert isinstance(w2, torch.Tensor) and isinstance(b2, torch.Tensor)


def test_requires_grad_tensor_is_refused_with_detach_hint():
    t = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(TypeError, match=r"x: a torch.Tensor that requires grad.*x\.detach\(\).*cnorm\.torch"):
        cnorm.layer_norm(t, 3)
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(TypeError, match=r"weight: .*weight\.detach\(\)"):
        cnorm.layer_norm(torch.randn(2, 3), 3, w)


def test_array_api_strict_in_and_out():
    x = xps.asarray(np.random.default_rng(0).standard_normal((4, 6, 5)).astype(np.float32))
    y = cnorm.layer_norm(x, (6, 5))
    assert type(y) is type(x)
    np.testing.assert_array_equal(np.from_dlpack(y), cnorm.layer_norm(np.from_dlpack(x), (6, 5)))


class _Exporter:
    """The bare DLPack protocol over a NumPy array, reporting any device."""

    def __init__(self, a, device=(1, 0)):
        self.a, self.device = a, device

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.device


def test_read_only_input_works_and_outputs_are_new():
    a = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    a.flags.writeable = False
    y = cnorm.layer_norm(_Exporter(a), 8)
    np.testing.assert_array_equal(np.asarray(y), cnorm.layer_norm(a, 8))


def test_devices_no_backend_serves_are_named():
    a = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match=r"x: .*ROCm memory, which no cnorm backend serves"):
        cnorm.layer_norm(_Exporter(a, (10, 0)), 3)
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(TypeError, match=r"x: .*CUDA memory.*CuPy is not installed"):
            cnorm.layer_norm(_Exporter(a, (2, 0)), 3)


def test_object_without_dlpack_gets_the_old_hint():
    with pytest.raises(TypeError, match=r"x: .*numpy\.asarray"):
        cnorm.layer_norm([[1.0, 2.0]], 2)


@pytest.mark.parametrize("cls, args, shape", [
    (cnn.BatchNorm2d, (6,), (4, 6, 3, 3)),
    (cnn.LayerNorm, ((3, 3),), (4, 6, 3, 3)),
    (cnn.GroupNorm, (2, 6), (4, 6, 3, 3)),
    (cnn.RMSNorm, (3,), (4, 6, 3)),
])
def test_layers_take_and_return_tensors(cls, args, shape):
    a, b = cls(*args), cls(*args)
    t = torch.randn(*shape)
    y = a(t)
    assert isinstance(y, torch.Tensor)
    np.testing.assert_array_equal(y.numpy(), b(t.numpy()))
    dy = torch.randn(*shape)
    dx = a.backward(dy)
    assert isinstance(dx, torch.Tensor)
    np.testing.assert_array_equal(dx.numpy(), b.backward(dy.numpy()))
    np.testing.assert_array_equal(a.weight_grad, b.weight_grad)
