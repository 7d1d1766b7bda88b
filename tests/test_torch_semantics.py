"""cnorm against PyTorch CPU (float64 autograd): the semantics users compare with."""

import numpy as np
import pytest

import cnorm
from conftest import tolerance
from helpers import close, make_input

torch = pytest.importorskip("torch", reason="PyTorch not installed: pip install 'cnorm-kernels[test]'")
F = torch.nn.functional


def to_torch(a, requires_grad=False):
    """A float64 tensor with the same strides as the NumPy array (channels_last stays channels_last)."""
    t = torch.from_numpy(np.asarray(a, dtype=np.float64).copy(order="K"))
    return t.requires_grad_(requires_grad)


def torch_case(norm, x, w, b, rm, rv, mode, momentum, eps, groups, channel_axis):
    """Run the torch op in float64 with autograd; returns y, dx, dw, db, rm, rv (NumPy)."""
    xt = to_torch(x, True)
    if channel_axis == -1:
        xt_in = xt.movedim(-1, 1)
    else:
        xt_in = xt
    wt = to_torch(w, True) if w is not None else None
    bt = to_torch(b, True) if b is not None else None
    rmt = to_torch(rm) if rm is not None else None
    rvt = to_torch(rv) if rv is not None else None
    if norm == "batch_norm":
        y = F.batch_norm(xt_in, rmt, rvt, wt, bt, training=(mode == "train"), momentum=momentum, eps=eps)
    elif norm == "instance_norm":
        y = F.instance_norm(xt_in, rmt, rvt, wt, bt, use_input_stats=(mode != "eval"), momentum=momentum, eps=eps)
    elif norm == "group_norm":
        y = F.group_norm(xt_in, groups, wt, bt, eps=eps)
    else:
        y = F.layer_norm(xt, x.shape[-2:], wt, bt, eps=eps)
    if channel_axis == -1 and norm != "layer_norm":
        y = y.movedim(1, -1)
    dy = torch.from_numpy(np.random.default_rng(7).standard_normal(x.shape))
    y.backward(dy)
    grab = (lambda t: None if t is None or t.grad is None else t.grad.numpy())
    return (y.detach().numpy(), dy.numpy(), xt.grad.numpy(), grab(wt), grab(bt),
            None if rmt is None else rmt.numpy(), None if rvt is None else rvt.numpy())


CASES = [
    ("batch_norm", "train"), ("batch_norm", "eval"),
    ("instance_norm", "train"), ("instance_norm", "eval"), ("instance_norm", "train_untracked"),
    ("group_norm", "train"), ("layer_norm", "train"),
]


@pytest.mark.parametrize("norm,mode", CASES, ids=[f"{n}-{m}" for n, m in CASES])
@pytest.mark.parametrize("layout", ["cf", "cl", "cl_strided"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_matches_torch(backend, norm, mode, layout, dtype, affine):
    rng = np.random.default_rng(11)
    shape = (4, 6, 5, 3)
    x = make_input(rng, shape, layout, dtype, offset=2.0, scale=3.0)
    channel_axis = -1 if layout == "cl" else 1
    c = 6
    pshape = x.shape[-2:] if norm == "layer_norm" else (c,)
    w = rng.uniform(0.5, 2, pshape).astype(dtype) if affine else None
    b = rng.standard_normal(pshape).astype(dtype) if affine else None
    tracked = norm in ("batch_norm", "instance_norm") and mode != "train_untracked"
    rm = rng.standard_normal(c).astype(np.float32) if tracked else None
    rv = rng.uniform(0.5, 2, c).astype(np.float32) if tracked else None
    momentum, eps = 0.3, 1e-3
    ty, dy, tdx, tdw, tdb, trm, trv = torch_case(norm, x, w, b, rm, rv, mode, momentum, eps, 3, channel_axis)

    A = backend.asarray
    rm_c, rv_c = (A(rm.copy()), A(rv.copy())) if tracked else (None, None)
    if norm == "batch_norm":
        y, saved = cnorm.batch_norm_forward(A(x), A(w), A(b), rm_c, rv_c, training=(mode == "train"),
                                            momentum=momentum, eps=eps, channel_axis=channel_axis, backend=backend.name)
    elif norm == "instance_norm":
        y, saved = cnorm.instance_norm_forward(A(x), A(w), A(b), rm_c, rv_c, use_input_stats=(mode != "eval"),
                                               momentum=momentum, eps=eps, channel_axis=channel_axis,
                                               backend=backend.name)
    elif norm == "group_norm":
        y, saved = cnorm.group_norm_forward(A(x), 3, A(w), A(b), eps=eps, channel_axis=channel_axis,
                                            backend=backend.name)
    else:
        y, saved = cnorm.layer_norm_forward(A(x), x.shape[-2:], A(w), A(b), eps=eps, backend=backend.name)
    dx, dw, db = getattr(cnorm, f"{norm}_backward")(A(dy.astype(dtype)), A(x), saved, A(w))
    tol = tolerance(dtype)
    close(backend.to_numpy(y), ty, tol, "y")
    close(backend.to_numpy(dx), tdx, tol, "dx")
    if affine:
        close(backend.to_numpy(dw), tdw, 10 * tol, "dweight")
        close(backend.to_numpy(db), tdb, 10 * tol, "dbias")
    if tracked:
        close(backend.to_numpy(rm_c), trm, 1e-6, "running_mean")
        close(backend.to_numpy(rv_c), trv, 1e-6, "running_var")


@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("norm", ["batch_norm", "instance_norm"])
def test_running_stats_over_several_calls(backend, momentum, norm):
    """Running statistics follow torch over several training calls, then eval uses them."""
    rng = np.random.default_rng(12)
    c = 5
    rm, rv = np.zeros(c), np.ones(c)
    trm, trv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    rm_c, rv_c = backend.asarray(rm.copy()), backend.asarray(rv.copy())
    fn = getattr(cnorm, norm)
    tfn = getattr(F, norm)
    for step in range(4):
        x = rng.standard_normal((3 + step, c, 7)) * (step + 1) + step
        train_kw = {"training": True} if norm == "batch_norm" else {}
        tfn(torch.from_numpy(x), trm, trv, momentum=momentum, **train_kw)
        fn(backend.asarray(x), running_mean=rm_c, running_var=rv_c, momentum=momentum, backend=backend.name)
        close(backend.to_numpy(rm_c), trm.numpy(), 1e-12, f"running_mean step {step}")
        close(backend.to_numpy(rv_c), trv.numpy(), 1e-12, f"running_var step {step}")
    x = rng.standard_normal((2, c, 7))
    kw = {"training": False} if norm == "batch_norm" else {"use_input_stats": False}
    y = fn(backend.asarray(x), running_mean=rm_c, running_var=rv_c, backend=backend.name, **kw)
    ty = tfn(torch.from_numpy(x), trm, trv, **kw)
    close(backend.to_numpy(y), ty.numpy(), 1e-9, "eval output")


def test_batchnorm1d_2d_input(backend):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((16, 9))
    rm, rv = np.zeros(9), np.ones(9)
    trm, trv = torch.zeros(9, dtype=torch.float64), torch.ones(9, dtype=torch.float64)
    y = cnorm.batch_norm(backend.asarray(x), running_mean=backend.asarray(rm), running_var=backend.asarray(rv),
                         backend=backend.name)
    ty = F.batch_norm(torch.from_numpy(x), trm, trv, training=True)
    close(backend.to_numpy(y), ty.numpy(), 1e-9, "y")
