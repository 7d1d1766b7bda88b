"""RMSNorm, the residual add fused into LayerNorm/RMSNorm, weight_offset and BatchNorm
folding: against PyTorch float64 autograd composites, against the unfused calls bit
for bit, in place, at every thread count, and every bad argument."""

import numpy as np
import pytest

import cnorm
from cnorm._dtypes import BFLOAT16
from helpers import close, same_bits

torch = pytest.importorskip("torch", reason="PyTorch not installed: pip install 'cnorm-kernels[test]'")
F = torch.nn.functional

HALF = [np.float16] + ([BFLOAT16.type] if BFLOAT16 is not None else [])
DTYPES = [np.float64, np.float32] + HALF
# rows: per-token short rows, the float-lane long rows, rows > LN_FUSE_C (the
# column-tiled backward), odd tails, leading dims
SHAPES = [(3, 7), (5, 16), (4, 3, 40), (9, 768), (3, 2500), (2, 17000)]


def tol(dtype):
    return {np.float64: 1e-12, np.float32: 2e-5, np.float16: 4e-3}.get(np.dtype(dtype).type, 3e-2)


def t64(a, grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def data(rng, shape, dtype, offset=0.3):
    return (offset + rng.standard_normal(shape)).astype(dtype)


def on(backend, *arrays):
    return [backend.asarray(a) for a in arrays]


# -- RMSNorm ----------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_rms_norm_matches_torch(backend, shape, dtype, affine):
    rng = np.random.default_rng(1)
    d = shape[-1]
    x, dy = data(rng, shape, dtype), data(rng, shape, dtype, 0.0)
    w = data(rng, (d,), np.float32 if dtype != np.float64 else dtype, 1.0) if affine else None
    xt, wt = t64(x, True), (t64(w, True) if affine else None)
    eps = float(np.finfo(np.float64 if dtype == np.float64 else np.float32).eps)
    yt = F.rms_norm(xt, (d,), wt, eps=eps)
    yt.backward(t64(dy))
    y, saved = cnorm.rms_norm_forward(*on(backend, x), d, *on(backend, w), backend=backend.name)
    dx, dw, db = cnorm.rms_norm_backward(*on(backend, dy, x), saved, *on(backend, w))
    assert db is None and y.dtype == np.dtype(dtype)
    t = tol(dtype)
    close(backend.to_numpy(y), yt.detach().numpy(), t, "y")
    close(backend.to_numpy(dx), xt.grad.numpy(), t * 4, "dx")
    if affine:
        close(backend.to_numpy(dw), wt.grad.numpy(), t * 4 * np.sqrt(np.prod(shape[:-1])), "dweight")
    else:
        assert dw is None
    assert float(np.abs(backend.to_numpy(saved.mean)).max(initial=0.0)) == 0.0


def test_rms_norm_eps_default_is_pytorchs():
    """eps=None: the epsilon of the statistics dtype (float32 for half data), as F.rms_norm."""
    rng = np.random.default_rng(2)
    for dtype, tdtype in [(np.float64, torch.float64), (np.float32, torch.float32), (np.float16, torch.float16)]:
        x = (1e-4 * rng.standard_normal((4, 32))).astype(dtype)
        want = F.rms_norm(torch.from_numpy(x), (32,)).double().numpy()
        close(cnorm.rms_norm(x, 32), want, tol(dtype), np.dtype(dtype).name)
        assert tdtype is not None


def test_rms_norm_onnx_rmsnormalization():
    """ONNX RMSNormalization (opset 23; axis, epsilon, stash_type float32): normalized_shape = x.shape[axis:]."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float16)
    for axis in (-1, -2, 1):
        scale = rng.standard_normal(x.shape[axis:]).astype(np.float16)
        axes = tuple(range(axis % x.ndim, x.ndim))
        xf = x.astype(np.float32)
        want = (xf / np.sqrt((xf * xf).mean(axis=axes, keepdims=True) + 1e-5) * scale.astype(np.float32))
        got = cnorm.rms_norm(x, x.shape[axis:], scale, eps=1e-5)
        close(got, want.astype(np.float16), 2e-3, f"axis={axis}")


@pytest.mark.parametrize("shape", [(64, 100), (40, 768), (3, 17000)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_rms_and_add_norm_bit_identical_for_any_thread_count(shape, dtype):
    if "cython" not in cnorm.available_backends():
        pytest.skip("the compiled kernels are not built")
    rng = np.random.default_rng(4)
    x, r, dy, dh = (data(rng, shape, dtype) for _ in range(4))
    w = data(rng, shape[-1:], np.float64 if dtype == np.float64 else np.float32, 1.0)
    runs, before = [], cnorm.get_num_threads()
    for nt in (1, 2):
        cnorm.set_num_threads(nt)
        try:
            y, saved = cnorm.rms_norm_forward(x, shape[-1], w, backend="cython")
            dx, dw, _ = cnorm.rms_norm_backward(dy, x, saved, w)
            ya, h, sa = cnorm.add_layer_norm_forward(x, r, shape[-1], w, w, backend="cython")
            dxa, dwa, dba = cnorm.add_layer_norm_backward(dy, dh, h, sa, w)
            runs.append((y, dx, dw, ya, h, dxa, dwa, dba))
        finally:
            cnorm.set_num_threads(before)
    for a, b in zip(*runs):
        same_bits(a, b, "1 vs 2 threads")


# -- the fused residual add -----------------------------------------------------------

NORMS = ["add_layer_norm", "add_rms_norm"]


def add_call(name, x, r, d, w, b, backend, **kw):
    if name == "add_layer_norm":
        return cnorm.add_layer_norm_forward(x, r, d, w, b, backend=backend, **kw)
    return cnorm.add_rms_norm_forward(x, r, d, w, backend=backend, **kw)


def plain_call(name, h, d, w, b, backend, **kw):
    if name == "add_layer_norm":
        return cnorm.layer_norm_forward(h, d, w, b, backend=backend, **kw)
    return cnorm.rms_norm_forward(h, d, w, backend=backend, **kw)


def spec_h(x, r):
    """h = x + r in x's dtype, added in the statistics dtype (float32 for half data)."""
    sd = np.float64 if x.dtype == np.float64 else np.float32
    return (x.astype(sd) + r.astype(sd)).astype(x.dtype)


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_add_norm_is_the_unfused_sequence_bit_for_bit(backend, name, shape, dtype):
    """One sweep, the same bits as h = x + r, then the plain norm of h and its backward plus dh."""
    rng = np.random.default_rng(5)
    d = shape[-1]
    sd = np.float64 if dtype == np.float64 else np.float32
    x, r, dy, dh = (data(rng, shape, dtype) for _ in range(4))
    w, b = data(rng, (d,), sd, 1.0), data(rng, (d,), sd)
    y, h, saved = add_call(name, *on(backend, x, r), d, *on(backend, w, b), backend.name)
    dx, dw, db = getattr(cnorm, f"{name}_backward")(*on(backend, dy, dh, h), saved, backend.asarray(w))
    same_bits(backend.to_numpy(h), spec_h(x, r), "h")
    hh = spec_h(x, r)
    y2, s2 = plain_call(name, *on(backend, hh), d, *on(backend, w, b), backend.name)
    dxn, dw2, db2 = getattr(cnorm, f"{name[4:]}_backward")(*on(backend, dy, hh), s2, backend.asarray(w))
    same_bits(backend.to_numpy(y), backend.to_numpy(y2), "y")
    dxn = backend.to_numpy(dxn)
    same_bits(backend.to_numpy(dx), (dxn.astype(sd) + dh.astype(sd)).astype(dtype), "dx")
    same_bits(backend.to_numpy(dw), backend.to_numpy(dw2), "dweight")
    if name == "add_layer_norm":
        same_bits(backend.to_numpy(db), backend.to_numpy(db2), "dbias")
    else:
        assert db is None


@pytest.mark.parametrize("name", NORMS)
def test_add_norm_matches_torch(backend, name):
    rng = np.random.default_rng(6)
    shape, d = (2, 5, 48), 48
    x, r, dy, dh = (data(rng, shape, np.float64) for _ in range(4))
    w, b = data(rng, (d,), np.float64, 1.0), data(rng, (d,), np.float64)
    xt, rt, wt, bt = t64(x, True), t64(r, True), t64(w, True), t64(b, True)
    ht = xt + rt
    yt = F.layer_norm(ht, (d,), wt, bt, eps=1e-5) if name == "add_layer_norm" else F.rms_norm(ht, (d,), wt, eps=1e-6)
    torch.autograd.backward([yt, ht], [t64(dy), t64(dh)])
    kw = {} if name == "add_layer_norm" else {"eps": 1e-6}
    if name == "add_layer_norm":
        y, h, saved = cnorm.add_layer_norm_forward(*on(backend, x, r), d, *on(backend, w, b), backend=backend.name)
    else:
        y, h, saved = cnorm.add_rms_norm_forward(*on(backend, x, r), d, backend.asarray(w), backend=backend.name, **kw)
    dx, dw, db = getattr(cnorm, f"{name}_backward")(*on(backend, dy, dh, h), saved, backend.asarray(w))
    close(backend.to_numpy(y), yt.detach().numpy(), 1e-12, "y")
    close(backend.to_numpy(h), ht.detach().numpy(), 0, "h")
    close(backend.to_numpy(dx), xt.grad.numpy(), 1e-11, "dx")
    close(backend.to_numpy(dx), rt.grad.numpy(), 1e-11, "d residual")
    close(backend.to_numpy(dw), wt.grad.numpy(), 1e-11, "dweight")
    if name == "add_layer_norm":
        close(backend.to_numpy(db), bt.grad.numpy(), 1e-11, "dbias")


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("where", ["y->x,h->r", "y->r,h->x", "h->x", "y->x"])
def test_add_norm_in_place(backend, name, dtype, where):
    """vLLM's in-place fused_add_rms_norm is out=x, h_out=residual; every allowed aliasing
    gives the bits of separate buffers."""
    rng = np.random.default_rng(7)
    shape, d = (37, 300), 300
    x, r = data(rng, shape, dtype), data(rng, shape, dtype)
    w = data(rng, (d,), np.float64 if dtype == np.float64 else np.float32, 1.0)
    y0, h0, s0 = add_call(name, *on(backend, x, r), d, backend.asarray(w), None, backend.name)
    xb, rb = on(backend, x.copy(), r.copy())
    targets = {"x": xb, "r": rb}
    kw = {}
    for part in where.split(","):
        k, v = part.split("->")
        kw["out" if k == "y" else "h_out"] = targets[v]
    y, h, s = add_call(name, xb, rb, d, backend.asarray(w), None, backend.name, **kw)
    same_bits(backend.to_numpy(y), backend.to_numpy(y0), "y")
    same_bits(backend.to_numpy(h), backend.to_numpy(h0), "h")
    for k, v in kw.items():
        assert (y if k == "out" else h) is v


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("into", ["dy", "dh", "h"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("d", [200, 17000], ids=["rows", "tiled"])
def test_add_norm_backward_in_place(backend, name, into, dtype, d):
    rng = np.random.default_rng(8)
    shape = (21 if d < 1000 else 3, d)
    x, r, dy, dh = (data(rng, shape, dtype) for _ in range(4))
    w = data(rng, (d,), np.float64 if dtype == np.float64 else np.float32, 1.0)
    y, h, s = add_call(name, *on(backend, x, r), d, backend.asarray(w), None, backend.name)
    bwd = getattr(cnorm, f"{name}_backward")
    want = bwd(*on(backend, dy, dh), h, s, backend.asarray(w))
    args = {"dy": backend.asarray(dy.copy()), "dh": backend.asarray(dh.copy()), "h": h.copy()}
    got = bwd(args["dy"], args["dh"], args["h"], s, backend.asarray(w), out=args[into])
    assert got[0] is args[into]
    for a, b_, what in zip(got, want, ("dx", "dweight", "dbias")):
        same_bits(backend.to_numpy(a), backend.to_numpy(b_), what)


@pytest.mark.parametrize("name", NORMS)
def test_add_norm_empty(backend, name):
    x = backend.asarray(np.zeros((0, 8), np.float32))
    y, h, s = add_call(name, x, x, 8, None, None, backend.name)
    assert y.shape == h.shape == (0, 8)
    dx, dw, db = getattr(cnorm, f"{name}_backward")(x, x, h, s)
    assert dx.shape == (0, 8) and dw is None


# -- weight_offset ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_weight_offset_is_weight_plus_offset(backend, dtype):
    """Gemma's (1 + w): weight_offset=1 gives the bits of weight + 1 passed as the weight;
    dweight is the same (d(1 + w)/dw = 1)."""
    rng = np.random.default_rng(9)
    shape, d = (6, 96), 96
    sd = np.float64 if dtype == np.float64 else np.float32
    x, dy, r = (data(rng, shape, dtype) for _ in range(3))
    w, b = 0.1 * data(rng, (d,), sd), data(rng, (d,), sd)
    w1 = w + sd(1.0)
    cases = [
        (lambda ww, **k: cnorm.layer_norm_forward(x, d, ww, b, backend=backend.name, **k),
         lambda s, ww: cnorm.layer_norm_backward(dy, x, s, ww)),
        (lambda ww, **k: cnorm.rms_norm_forward(x, d, ww, backend=backend.name, **k),
         lambda s, ww: cnorm.rms_norm_backward(dy, x, s, ww)),
        (lambda ww, **k: cnorm.add_rms_norm_forward(x, r, d, ww, backend=backend.name, **k)[::2],
         lambda s, ww: cnorm.add_rms_norm_backward(dy, r, spec_h(x, r), s, ww)),
    ]
    if backend.name == "cupy":
        pytest.skip("host arrays")
    for fwd, bwd in cases:
        y1, s1 = fwd(w, weight_offset=1.0)
        y2, s2 = fwd(w1)
        same_bits(y1, y2, "y")
        for a, b_ in zip(bwd(s1, w), bwd(s2, w1)):
            same_bits(a, b_, "gradients")


# -- BatchNorm folding ------------------------------------------------------------------

@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_batch_norm_matches_pytorch(transpose, with_bias):
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    rng = np.random.default_rng(10)
    cw = rng.standard_normal((3, 4, 3, 3) if not transpose else (4, 3, 3, 3)).astype(np.float32)
    c_out = 3 if not transpose else 3
    cb = rng.standard_normal(c_out).astype(np.float32) if with_bias else None
    rm, rv = rng.standard_normal(c_out).astype(np.float32), rng.random(c_out).astype(np.float32) + 0.5
    bw, bb = rng.standard_normal(c_out).astype(np.float32), rng.standard_normal(c_out).astype(np.float32)
    tw, tb = fuse_conv_bn_weights(torch.from_numpy(cw), None if cb is None else torch.from_numpy(cb),
                                  torch.from_numpy(rm), torch.from_numpy(rv), 1e-3, torch.from_numpy(bw),
                                  torch.from_numpy(bb), transpose=transpose)
    w, b = cnorm.fold_batch_norm(cw, cb, rm, rv, 1e-3, bw, bb, transpose=transpose)
    assert w.dtype == np.float32 and b.dtype == np.float32 and w.shape == cw.shape
    close(w, tw.detach().numpy(), 1e-6, "weight")
    close(b, tb.detach().numpy(), 1e-6, "bias")


def test_fold_batch_norm_equals_conv_then_eval_batch_norm():
    rng = np.random.default_rng(11)
    x = torch.from_numpy(rng.standard_normal((2, 4, 8, 8)))
    cw, cb = rng.standard_normal((5, 4, 3, 3)), rng.standard_normal(5)
    rm, rv, bw, bb = rng.standard_normal(5), rng.random(5) + 0.5, rng.standard_normal(5), rng.standard_normal(5)
    conv = F.conv2d(x, torch.from_numpy(cw), torch.from_numpy(cb)).numpy()
    want = cnorm.batch_norm(conv, bw, bb, rm, rv, training=False)
    w, b = cnorm.fold_batch_norm(cw, cb, rm, rv, 1e-5, bw, bb)
    got = F.conv2d(x, torch.from_numpy(w), torch.from_numpy(b)).numpy()
    close(got, want, 1e-12, "folded conv")


# -- bad arguments ----------------------------------------------------------------------

def test_bad_arguments_name_the_argument():
    x = np.ones((4, 8), np.float32)
    w = np.ones(8, np.float32)
    y, h, s = cnorm.add_rms_norm_forward(x, x, 8, w)
    _, ls = cnorm.layer_norm_forward(x, 8)
    cases = [
        (ValueError, "residual", lambda: cnorm.add_rms_norm(x, np.ones((4, 9), np.float32), 8)),
        (TypeError, "residual", lambda: cnorm.add_layer_norm(x, np.ones((4, 8)), 8)),
        (TypeError, "residual", lambda: cnorm.add_layer_norm(x, [[1.0] * 8] * 4, 8)),
        (ValueError, "dh", lambda: cnorm.add_rms_norm_backward(y, None, h, s, w)),
        (ValueError, "dh", lambda: cnorm.add_rms_norm_backward(y, np.ones((4, 7), np.float32), h, s, w)),
        (ValueError, "h:", lambda: cnorm.add_rms_norm_backward(y, y, np.ones((2, 8), np.float32), s, w)),
        (ValueError, "saved", lambda: cnorm.add_layer_norm_backward(y, y, h, s, w)),
        (ValueError, "saved", lambda: cnorm.add_rms_norm_backward(y, y, h, ls, w)),
        (ValueError, "h_out", lambda: cnorm.add_rms_norm(x, x.copy(), 8, out=np.empty_like(x), h_out=x[:, :4])),
        (ValueError, "out: shares memory with h_out",
         lambda: cnorm.add_rms_norm(x.copy(), x.copy(), 8, out=(o := np.empty_like(x)), h_out=o)),
        (ValueError, "activation", lambda: cnorm.layer_norm(x, 8, activation="gelu")),
        (ValueError, "activation", lambda: cnorm.batch_norm(x, activation="ReLU")),
        (TypeError, "activation", lambda: cnorm.group_norm(x, 2, activation=1)),
        (ValueError, "activation", lambda: cnorm.rms_norm(x, 8, activation="tanh")),
        (ValueError, "weight_offset", lambda: cnorm.rms_norm(x, 8, weight_offset=1.0)),
        (ValueError, "weight_offset", lambda: cnorm.layer_norm(x, 8, w, weight_offset=float("nan"))),
        (TypeError, "weight_offset", lambda: cnorm.rms_norm(x, 8, w, weight_offset="1")),
        (ValueError, "eps", lambda: cnorm.rms_norm(x, 8, eps=-1.0)),
        (ValueError, "normalized_shape", lambda: cnorm.rms_norm(x, 9)),
        (ValueError, "weight", lambda: cnorm.rms_norm(x, 8, np.ones(7, np.float32))),
        (ValueError, "conv_bias", lambda: cnorm.fold_batch_norm(np.ones((3, 2, 1, 1)), np.ones(2), np.zeros(3),
                                                                np.ones(3))),
        (TypeError, "running_var", lambda: cnorm.fold_batch_norm(np.ones((3, 2)), None, np.zeros(3), [1, 1, 1])),
    ]
    for exc, words, call in cases:
        with pytest.raises(exc, match=words):
            call()


# -- layers ------------------------------------------------------------------------------

def test_rms_norm_layer_loads_torch_and_trains_alike():
    import cnorm.nn

    rng = np.random.default_rng(12)
    t = torch.nn.RMSNorm((6, 8), dtype=torch.float64)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(rng.standard_normal((6, 8))))
    layer = cnorm.nn.RMSNorm((6, 8), dtype=np.float64)
    layer.load_state_dict({k: v.numpy() for k, v in t.state_dict().items()})
    assert sorted(layer.state_dict()) == ["weight"] and layer.bias is None
    for _ in range(2):
        x, dy = rng.standard_normal((3, 6, 8)), rng.standard_normal((3, 6, 8))
        xt = torch.from_numpy(x).requires_grad_(True)
        t.zero_grad()
        yt = t(xt)
        yt.backward(torch.from_numpy(dy))
        close(layer(x), yt.detach().numpy(), 1e-12, "y")
        close(layer.backward(dy), xt.grad.numpy(), 1e-11, "dx")
        close(layer.weight_grad, t.weight.grad.numpy(), 1e-11, "weight_grad")
        assert layer.bias_grad is None


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_norm_layers_with_activation_match_torch(act):
    import cnorm.nn

    rng = np.random.default_rng(13)
    fn = getattr(F, act)
    x, dy = rng.standard_normal((4, 6, 5, 5)), rng.standard_normal((4, 6, 5, 5))
    pairs = [(cnorm.nn.BatchNorm2d(6, dtype=np.float64, activation=act), torch.nn.BatchNorm2d(6).double()),
             (cnorm.nn.GroupNorm(3, 6, dtype=np.float64, activation=act), torch.nn.GroupNorm(3, 6).double()),
             (cnorm.nn.InstanceNorm2d(6, affine=True, dtype=np.float64, activation=act),
              torch.nn.InstanceNorm2d(6, affine=True).double()),
             (cnorm.nn.LayerNorm(5, dtype=np.float64, activation=act), torch.nn.LayerNorm(5).double()),
             (cnorm.nn.RMSNorm(5, dtype=np.float64, activation=act), torch.nn.RMSNorm(5).double())]
    for ours, theirs in pairs:
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape))))
        ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
        for mode in (True, False):
            ours.train(mode), theirs.train(mode)
            xt = torch.from_numpy(x).requires_grad_(True)
            yt = fn(theirs(xt))
            yt.backward(torch.from_numpy(dy))
            what = f"{type(ours).__name__} training={mode}"
            close(ours(x), yt.detach().numpy(), 1e-12, what + " y")
            close(ours.backward(dy), xt.grad.numpy(), 1e-10, what + " dx")
            if mode:
                close(ours.weight_grad, theirs.weight.grad.numpy(), 1e-10, what + " weight_grad")
            theirs.zero_grad()
        for k, v in theirs.state_dict().items():
            close(ours.state_dict()[k], v.numpy(), 1e-12, k)
        assert repr(ours).endswith(f"activation={act!r})")


def test_batch_norm_layer_fold_into():
    import cnorm.nn
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    rng = np.random.default_rng(14)
    bn = cnorm.nn.BatchNorm2d(4).eval()
    bn.running_mean[...] = rng.standard_normal(4)
    bn.running_var[...] = rng.random(4) + 0.5
    bn.weight[...] = rng.standard_normal(4)
    cw, cb = rng.standard_normal((4, 2, 3, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    w, b = bn.fold_into(cw, cb)
    tw, tb = fuse_conv_bn_weights(*(torch.from_numpy(a) for a in (cw, cb, bn.running_mean, bn.running_var)),
                                  bn.eps, torch.from_numpy(bn.weight), torch.from_numpy(bn.bias))
    close(w, tw.detach().numpy(), 1e-6, "weight")
    close(b, tb.detach().numpy(), 1e-6, "bias")
    with pytest.raises(ValueError, match="track_running_stats"):
        cnorm.nn.BatchNorm2d(4, track_running_stats=False).fold_into(cw, cb)


def test_layer_activation_and_offset_arguments_checked():
    import cnorm.nn

    with pytest.raises(ValueError, match="activation"):
        cnorm.nn.BatchNorm2d(3, activation="gelu")
    with pytest.raises(ValueError, match="weight_offset"):
        cnorm.nn.RMSNorm(4, elementwise_affine=False, weight_offset=1.0)
    bn = cnorm.nn.BatchNorm2d(3, activation="relu")
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        cnorm.nn.convert_sync_batchnorm([bn])
