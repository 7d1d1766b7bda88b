"""cnorm.nn layers: against torch.nn modules over several training steps, state dicts,
FrozenBN and PreciseBN, on every backend."""

import inspect
import re

import numpy as np
import pytest

import cnorm
import cnorm.nn as cnn
from conftest import BackendCase, tolerance
from helpers import close
from helpers import same_bits as bits_equal

LAYOUTS = ["cf", "cl"]  # strided channels-last inputs are the functional tests' business
DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]


def needs_torch():
    return pytest.importorskip("torch", reason="PyTorch not installed: pip install 'cnorm-kernels[test]'")


@pytest.fixture(autouse=True, scope="module")
def _torch_single_thread():
    """The tensors here are tiny: torch's thread pool only spins, and on a shared machine that
    costs more than the tests themselves. Restored after the module."""
    try:
        import torch
    except ImportError:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- layouts: torch always sees the logical (N, C, ...) array --------------------------

def to_ours(a, layout):
    """The logical (N, C, ...) array ``a`` in ``layout``: "cf" as is, "cl" as a separate
    (N, ..., C) array (channel_axis=-1), "cl_strided" as (N, C, ...) with channels-last strides."""
    if layout == "cf":
        return a
    moved = np.ascontiguousarray(np.moveaxis(a, 1, -1))
    return moved if layout == "cl" else np.moveaxis(moved, -1, 1)


def from_ours(a, layout):
    """Back to the logical (N, C, ...) array."""
    return np.moveaxis(a, -1, 1) if layout == "cl" else a


def axis_of(layout):
    return -1 if layout == "cl" else 1


# -- one training step on both sides --------------------------------------------------

class Pair:
    """A cnorm layer and the torch module it must match, fed the same data."""

    def __init__(self, ours, theirs, backend, layout, dtype):
        self.ours, self.theirs, self.backend = ours, theirs, backend
        self.layout, self.dtype = layout, dtype
        self.tol = tolerance(dtype)

    def step(self, x, dy, lr=0.1):
        """Forward and backward on both; compare y, dx, parameter gradients; SGD-update both."""
        torch = needs_torch()
        be, layout = self.backend, self.layout
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        yt = self.theirs(xt)
        yt.backward(torch.from_numpy(dy))
        y = self.ours(be.asarray(to_ours(x, layout)))
        dx = self.ours.backward(be.asarray(to_ours(dy, layout)))
        y, dx = from_ours(be.to_numpy(y), layout), from_ours(be.to_numpy(dx), layout)
        assert y.dtype == x.dtype and dx.dtype == x.dtype
        close(y, yt.detach().numpy(), self.tol, "y")
        close(dx, xt.grad.numpy(), self.tol, "dx")
        for name in ("weight", "bias"):
            p = getattr(self.theirs, name, None)
            grad = getattr(self.ours, name + "_grad")
            if p is None:
                assert getattr(self.ours, name) is None and grad is None, name
                continue
            assert grad.dtype == getattr(self.ours, name).dtype
            close(be.to_numpy(grad), p.grad.numpy(), self.tol * 10, name + "_grad")
            with torch.no_grad():
                p -= lr * p.grad
            p.grad = None
            param = getattr(self.ours, name)
            param -= lr * grad
        self.check_state()

    def check_state(self):
        be = self.backend
        for name in ("weight", "bias", "running_mean", "running_var"):
            theirs = getattr(self.theirs, name, None)
            ours = getattr(self.ours, name, None)
            assert (ours is None) == (theirs is None), name
            if theirs is not None:
                assert ours.dtype == self.dtype, name
                close(be.to_numpy(ours), theirs.detach().numpy(), self.tol, name)
        nbt = getattr(self.theirs, "num_batches_tracked", None)
        ours_nbt = getattr(self.ours, "num_batches_tracked", None)
        assert (ours_nbt is None) == (nbt is None)
        if nbt is not None:
            assert int(ours_nbt) == int(nbt)

    def run(self, shape, seed=0, train_steps=3):
        """Training steps, an eval step, another training step."""
        rng = np.random.default_rng(seed)

        def data():
            x = (rng.uniform(-2, 2) + rng.uniform(0.5, 3) * rng.standard_normal(shape)).astype(self.dtype)
            return x, rng.standard_normal(shape).astype(self.dtype)

        for _ in range(train_steps):
            self.step(*data())
        self.ours.eval()
        self.theirs.eval()
        assert not self.ours.training
        self.step(*data())
        self.ours.train()
        self.theirs.train()
        self.step(*data())


def torch_dtype(dtype):
    torch = needs_torch()
    return torch.float64 if dtype == np.float64 else torch.float32


BN_CASES = [("BatchNorm1d", (6, 4)), ("BatchNorm1d", (5, 3, 7)), ("BatchNorm2d", (4, 3, 5, 6)),
            ("BatchNorm3d", (3, 2, 3, 4, 5))]
IN_CASES = [("InstanceNorm1d", (3, 4, 9)), ("InstanceNorm2d", (2, 3, 5, 6)), ("InstanceNorm3d", (2, 2, 3, 4, 5))]
CASE_IDS = lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}"  # noqa: E731


@pytest.mark.parametrize("case", BN_CASES + IN_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_batch_and_instance_norm_train_like_torch(backend, case, momentum, affine, track, layout, dtype):
    torch = needs_torch()
    name, shape = case
    c = shape[1]
    kw = dict(momentum=momentum, affine=affine, track_running_stats=track)
    ours = getattr(cnn, name)(c, **kw, channel_axis=axis_of(layout), dtype=dtype, backend=backend.name)
    theirs = getattr(torch.nn, name)(c, **kw, dtype=torch_dtype(dtype))
    Pair(ours, theirs, backend, layout, dtype).run(shape)


@pytest.mark.parametrize("groups,shape", [(2, (3, 4, 5, 6)), (1, (3, 4, 5)), (4, (3, 4, 5))],
                         ids=["G2", "G1", "G=C"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_group_norm_like_torch(backend, groups, shape, affine, layout, dtype):
    torch = needs_torch()
    ours = cnn.GroupNorm(groups, shape[1], affine=affine, channel_axis=axis_of(layout), dtype=dtype,
                         backend=backend.name)
    theirs = torch.nn.GroupNorm(groups, shape[1], affine=affine, dtype=torch_dtype(dtype))
    Pair(ours, theirs, backend, layout, dtype).run(shape)


@pytest.mark.parametrize("normalized_shape", [(6,), (5, 6)], ids=["1d", "2d"])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, True)],
                         ids=["affine", "nobias", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_layer_norm_like_torch(backend, normalized_shape, affine, bias, dtype):
    torch = needs_torch()
    ours = cnn.LayerNorm(normalized_shape, 1e-5, affine, bias, dtype=dtype, backend=backend.name)
    theirs = torch.nn.LayerNorm(normalized_shape, 1e-5, affine, bias, dtype=torch_dtype(dtype))
    Pair(ours, theirs, backend, "cf", dtype).run((3, 4, 5, 6))


@pytest.mark.parametrize("name,shape", [("InstanceNorm1d", (3, 8)), ("InstanceNorm2d", (3, 4, 5))])
def test_unbatched_instance_norm_like_torch(backend, name, shape):
    torch = needs_torch()
    kw = dict(affine=True, track_running_stats=True)
    ours = getattr(cnn, name)(shape[0], **kw, dtype=np.float64, backend=backend.name)
    theirs = getattr(torch.nn, name)(shape[0], **kw, dtype=torch.float64)
    rng = np.random.default_rng(3)
    for mode in (True, True, False):
        ours.train(mode)
        theirs.train(mode)
        x, dy = rng.standard_normal(shape) + 1, rng.standard_normal(shape)
        xt = torch.from_numpy(x).requires_grad_(True)
        yt = theirs(xt)
        yt.backward(torch.from_numpy(dy))
        y = ours(backend.asarray(x))
        dx = ours.backward(backend.asarray(dy))
        assert y.shape == x.shape
        close(backend.to_numpy(y), yt.detach().numpy(), 1e-9, "y")
        close(backend.to_numpy(dx), xt.grad.numpy(), 1e-9, "dx")
        close(backend.to_numpy(ours.running_mean), theirs.running_mean.numpy(), 1e-9, "running_mean")
        theirs.weight.grad = theirs.bias.grad = None


def test_empty_batch_counts_but_leaves_running_stats_like_torch(backend):
    torch = needs_torch()
    ours = cnn.BatchNorm2d(3, backend=backend.name)
    theirs = torch.nn.BatchNorm2d(3)
    ours.running_mean[...] = backend.asarray(np.array([1.0, 2.0, 3.0], dtype=np.float32))
    with torch.no_grad():
        theirs.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
    y = ours(backend.asarray(np.zeros((0, 3, 4, 4), np.float32)))
    theirs(torch.zeros(0, 3, 4, 4))
    assert y.shape == (0, 3, 4, 4)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 1
    close(backend.to_numpy(ours.running_mean), theirs.running_mean.numpy(), 0, "running_mean")
    close(backend.to_numpy(ours.running_var), theirs.running_var.numpy(), 0, "running_var")


# -- state dicts ----------------------------------------------------------------------

def torch_module(name, c, **kw):
    torch = needs_torch()
    if name == "GroupNorm":
        return torch.nn.GroupNorm(2, c, **kw)
    if name == "LayerNorm":
        return torch.nn.LayerNorm((5, 6), **kw)
    return getattr(torch.nn, name)(c, **kw)


def our_layer(name, c, backend, **kw):
    if name == "GroupNorm":
        return cnn.GroupNorm(2, c, backend=backend.name, **kw)
    if name == "LayerNorm":
        return cnn.LayerNorm((5, 6), backend=backend.name, **kw)
    return getattr(cnn, name)(c, backend=backend.name, **kw)


SD_CASES = [("BatchNorm1d", (8, 4)), ("BatchNorm2d", (4, 4, 5, 6)), ("BatchNorm3d", (3, 4, 3, 4, 5)),
            ("InstanceNorm2d", (2, 4, 5, 6)), ("GroupNorm", (3, 4, 5, 6)), ("LayerNorm", (3, 4, 5, 6))]


def trained_torch(name, shape, seed=0):
    """A torch module with random affine parameters and a few batches' running statistics."""
    torch = needs_torch()
    kw = dict(affine=True, track_running_stats=True) if "Instance" in name else {}
    theirs = torch_module(name, shape[1], **kw).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
        for _ in range(3):
            theirs(3 + 2 * torch.randn(shape, generator=g, dtype=torch.float64))
    return theirs.eval(), kw


@pytest.mark.parametrize("name,shape", SD_CASES, ids=[c[0] for c in SD_CASES])
def test_torch_state_dict_reproduces_torch_eval(backend, name, shape):
    torch = needs_torch()
    theirs, kw = trained_torch(name, shape)
    ours = our_layer(name, shape[1], backend, dtype=np.float64, **kw)
    result = ours.load_state_dict({k: t.numpy() for k, t in theirs.state_dict().items()})
    assert result == cnn.IncompatibleKeys([], [])
    x = 3 + 2 * np.random.default_rng(1).standard_normal(shape)
    y = backend.to_numpy(ours.eval()(backend.asarray(x)))
    close(y, theirs(torch.from_numpy(x)).detach().numpy(), 1e-9, "eval output")
    if getattr(theirs, "num_batches_tracked", None) is not None:
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == (3 if "Batch" in name else 0)


CONFIGS = [
    ("BatchNorm2d", dict()), ("BatchNorm2d", dict(affine=False)), ("BatchNorm2d", dict(track_running_stats=False)),
    ("BatchNorm2d", dict(bias=False)), ("InstanceNorm2d", dict()), ("InstanceNorm2d", dict(affine=True)),
    ("InstanceNorm2d", dict(affine=True, track_running_stats=True)), ("GroupNorm", dict()),
    ("GroupNorm", dict(affine=False)), ("LayerNorm", dict()), ("LayerNorm", dict(bias=False)),
    ("LayerNorm", dict(elementwise_affine=False)),
]


@pytest.mark.parametrize("name,kw", CONFIGS, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"
                                                  for n, kw in CONFIGS])
def test_state_dict_keys_and_values_load_into_torch(backend, name, kw):
    torch = needs_torch()
    accepted = inspect.signature(getattr(torch.nn, name).__init__).parameters
    if any(k not in accepted for k in kw):  # torch < 2.13's BatchNorm has no bias= (the GPU image's 2.11)
        pytest.skip(f"torch {torch.__version__}'s {name} does not take {sorted(set(kw) - set(accepted))}")
    ours = our_layer(name, 4, backend, **kw)
    shape = (2, 4, 5, 6)
    rng = np.random.default_rng(0)
    for _ in range(2):
        ours(backend.asarray((1 + rng.standard_normal(shape)).astype(np.float32)))
    if ours.weight is not None:
        ours.weight[...] = backend.asarray(rng.uniform(0.5, 1.5, ours.weight.shape).astype(np.float32))
    theirs = torch_module(name, 4, **kw)
    sd = ours.state_dict()
    assert list(sd) == list(theirs.state_dict())
    theirs.load_state_dict({k: torch.from_numpy(backend.to_numpy(a)) for k, a in sd.items()}, strict=True)
    for k, t in theirs.state_dict().items():
        np.testing.assert_array_equal(t.numpy(), backend.to_numpy(sd[k]))
    x = rng.standard_normal(shape).astype(np.float32)
    ours.eval()
    close(backend.to_numpy(ours(backend.asarray(x))), theirs.eval()(torch.from_numpy(x)).detach().numpy(),
          1e-4, "eval output")


def snapshot(layer, backend):
    names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    return {n: (id(getattr(layer, n)), backend.to_numpy(getattr(layer, n)).copy())
            for n in names if getattr(layer, n, None) is not None}


def assert_unchanged(layer, before, backend):
    after = snapshot(layer, backend)
    assert after.keys() == before.keys()
    for n, (ident, values) in before.items():
        assert id(getattr(layer, n)) == ident, f"{n} was replaced"
        np.testing.assert_array_equal(after[n][1], values, err_msg=n)


def trained_bn(backend, c=3, **kw):
    bn = cnn.BatchNorm2d(c, backend=backend.name, **kw)
    rng = np.random.default_rng(5)
    for _ in range(2):
        bn(backend.asarray((2 + rng.standard_normal((4, c, 3, 3))).astype(np.float32)))
    if bn.weight is not None:
        bn.weight[...] = backend.asarray(rng.uniform(0.5, 1.5, c).astype(np.float32))
    return bn


def good_state(c=3):
    rng = np.random.default_rng(9)
    return {"weight": rng.uniform(0.5, 1.5, c), "bias": rng.standard_normal(c),
            "running_mean": rng.standard_normal(c), "running_var": rng.uniform(0.5, 2, c),
            "num_batches_tracked": np.array(7)}


BAD_STATES = {
    "missing": (lambda d: d.pop("running_var"), "running_var"),
    "unexpected": (lambda d: d.update(extra=np.zeros(3)), "extra"),
    "shape": (lambda d: d.update(bias=np.zeros(4)), r"'bias'.*shape \(3,\).*\(4,\)"),
    "int_weight": (lambda d: d.update(weight=np.arange(3)), "'weight'.*floating"),
    "float_count": (lambda d: d.update(num_batches_tracked=np.array(2.5)), "'num_batches_tracked'.*integer"),
    "count_shape": (lambda d: d.update(num_batches_tracked=np.array([2])), "'num_batches_tracked'.*shape"),
    "not_array": (lambda d: d.update(running_mean="abc"), "'running_mean'"),
}


@pytest.mark.parametrize("kind", list(BAD_STATES))
def test_load_state_dict_errors_change_nothing(backend, kind):
    bn = trained_bn(backend)
    before = snapshot(bn, backend)
    state = good_state()
    mutate, pattern = BAD_STATES[kind]
    mutate(state)
    with pytest.raises(ValueError, match=pattern) as info:
        bn.load_state_dict(state)
    assert "nothing was changed" in str(info.value)
    assert_unchanged(bn, before, backend)


def test_load_state_dict_reports_every_problem(backend):
    bn = trained_bn(backend)
    state = good_state()
    del state["weight"]
    state["bias"] = np.zeros(5)
    state["junk"] = np.zeros(1)
    with pytest.raises(ValueError) as info:
        bn.load_state_dict(state)
    for part in ("'weight'", "'bias'", "'junk'"):
        assert part in str(info.value)


def test_load_state_dict_copies_in_place_and_casts(backend):
    bn = trained_bn(backend)
    before = snapshot(bn, backend)
    state = good_state()
    assert bn.load_state_dict(state) == ([], [])
    for name, (ident, _) in before.items():
        assert id(getattr(bn, name)) == ident
    assert bn.weight.dtype == np.float32 and bn.num_batches_tracked.dtype == np.int64
    np.testing.assert_allclose(backend.to_numpy(bn.running_var), state["running_var"], rtol=1e-6)
    assert int(bn.num_batches_tracked) == 7
    # state_dict() is a snapshot, not a view of the layer.
    sd = bn.state_dict()
    sd["weight"][...] = 0
    assert float(backend.to_numpy(bn.weight).min()) > 0


def test_load_state_dict_non_strict_and_prefix(backend):
    bn = trained_bn(backend)
    before = snapshot(bn, backend)
    state = good_state()
    partial = {"weight": state["weight"], "extra": np.ones(3)}
    missing, unexpected = bn.load_state_dict(partial, strict=False)
    assert missing == ["bias", "running_mean", "running_var", "num_batches_tracked"]
    assert unexpected == ["extra"]
    np.testing.assert_allclose(backend.to_numpy(bn.weight), state["weight"], rtol=1e-6)
    np.testing.assert_array_equal(backend.to_numpy(bn.bias), before["bias"][1])
    with pytest.raises(ValueError, match="shape"):  # shapes are checked even when not strict
        bn.load_state_dict({"weight": np.ones(4)}, strict=False)
    model = {f"layer1.bn.{k}": v for k, v in state.items()}
    model["layer1.conv.weight"] = np.ones((3, 3))
    assert bn.load_state_dict(model, prefix="layer1.bn.") == ([], [])
    assert int(bn.num_batches_tracked) == 7
    assert list(bn.state_dict(prefix="bn1.")) == [f"bn1.{k}" for k in state]


def test_instance_norm_without_running_stats_rejects_them(backend):
    norm = cnn.InstanceNorm2d(3, affine=True, backend=backend.name)
    state = {"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.zeros(3), "running_var": np.ones(3)}
    with pytest.raises(ValueError, match="unexpected.*running_mean"):
        norm.load_state_dict(state)


# -- FrozenBN ---------------------------------------------------------------------------

def frozen_reference(x, layer, backend, axis=1):
    shape = [1] * x.ndim
    shape[axis] = -1
    rm, rv, w, b = (backend.to_numpy(a).astype(np.float64).reshape(shape)
                    for a in (layer.running_mean, layer.running_var, layer.weight, layer.bias))
    return (x - rm) / np.sqrt(rv + layer.eps) * w + b, w / np.sqrt(rv + layer.eps)


@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_freeze_uses_fixed_statistics_in_training(backend, layout):
    bn = trained_bn(backend, channel_axis=axis_of(layout))
    bn.bias[...] = backend.asarray(np.array([0.5, -1.0, 2.0], np.float32))
    assert bn.freeze() is bn and bn.frozen and bn.training
    before = snapshot(bn, backend)
    rng = np.random.default_rng(2)
    x = to_ours(rng.standard_normal((4, 3, 3, 3)), layout)
    dy = rng.standard_normal(x.shape)
    y = bn(backend.asarray(x))
    dx = bn.backward(backend.asarray(dy))
    y_ref, scale = frozen_reference(x, bn, backend, axis_of(layout))
    close(backend.to_numpy(y), y_ref, 1e-6, "y")
    close(backend.to_numpy(dx), dy * scale, 1e-6, "dx")
    assert bn.weight_grad is None and bn.bias_grad is None
    assert_unchanged(bn, before, backend)
    bn.freeze(False)
    bn(backend.asarray(x))
    assert int(bn.num_batches_tracked) == 3


def test_freeze_needs_running_stats(backend):
    with pytest.raises(ValueError, match="track_running_stats"):
        cnn.BatchNorm1d(3, track_running_stats=False, backend=backend.name).freeze()


def test_frozen_batch_norm_2d(backend):
    layer = cnn.FrozenBatchNorm2d(3, backend=backend.name)
    state = good_state()
    assert layer.load_state_dict(state) == ([], [])  # num_batches_tracked is accepted and dropped
    assert list(layer.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert layer.num_batches_tracked is None
    before = snapshot(layer, backend)
    x = np.random.default_rng(4).standard_normal((2, 3, 4, 4)).astype(np.float32)
    for mode in (True, False):
        layer.train(mode)
        y = layer(backend.asarray(x))
        dx = layer.backward(backend.asarray(np.ones_like(x)))
        y_ref, scale = frozen_reference(x.astype(np.float64), layer, backend)
        close(backend.to_numpy(y), y_ref, 1e-5, "y")
        close(backend.to_numpy(dx), np.broadcast_to(scale, x.shape), 1e-5, "dx")
        assert layer.weight_grad is None and layer.bias_grad is None
    assert_unchanged(layer, before, backend)
    with pytest.raises(ValueError, match="unfrozen"):
        layer.freeze(False)
    with pytest.raises(ValueError, match="4-D"):
        layer(backend.asarray(x[0]))


def test_frozen_batch_norm_2d_from_torch(backend):
    torch = needs_torch()
    theirs, _ = trained_torch("BatchNorm2d", (4, 4, 5, 6))
    ours = cnn.FrozenBatchNorm2d(4, dtype=np.float64, backend=backend.name)
    ours.load_state_dict({k: t.numpy() for k, t in theirs.state_dict().items()})
    x = np.random.default_rng(8).standard_normal((2, 4, 5, 6))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = theirs(xt)
    yt.sum().backward()
    y = ours(backend.asarray(x))
    dx = ours.backward(backend.asarray(np.ones_like(x)))
    close(backend.to_numpy(y), yt.detach().numpy(), 1e-9, "y")
    close(backend.to_numpy(dx), xt.grad.numpy(), 1e-9, "dx")


# -- PreciseBN --------------------------------------------------------------------------

def batches(sizes, c, layout, seed=0):
    rng = np.random.default_rng(seed)
    centres, scales = rng.uniform(-5, 5, c), rng.uniform(0.5, 3, c)
    out = []
    for n in sizes:
        a = centres[None, :, None, None] + scales[None, :, None, None] * rng.standard_normal((n, c, 3, 4))
        out.append(a.astype(np.float32))
    return out


@pytest.mark.parametrize("sizes", [(4, 4, 4), (2, 5, 9, 1)], ids=["equal", "unequal"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_precise_bn_matches_concatenated_batches(backend, sizes, mode, layout):
    bn = trained_bn(backend, channel_axis=axis_of(layout))
    bn.train(mode == "train")
    nbt = int(bn.num_batches_tracked)
    data = batches(sizes, 3, layout)
    with cnn.precise_bn([bn]) as recorded:
        assert recorded == [bn]
        for xb in data:
            x = backend.asarray(to_ours(xb, layout))
            y = bn(x)
            expected = cnorm.batch_norm(x, bn.weight, bn.bias, channel_axis=axis_of(layout), backend=backend.name)
            close(backend.to_numpy(y), backend.to_numpy(expected), 1e-6, "y inside the block")
            bn.backward(backend.asarray(np.ones(y.shape, np.float32)))
            np.testing.assert_allclose(backend.to_numpy(bn.bias_grad), y.size / 3, rtol=1e-6)
    everything = np.concatenate(data).astype(np.float64)
    close(backend.to_numpy(bn.running_mean), everything.mean(axis=(0, 2, 3)), 1e-5, "running_mean")
    close(backend.to_numpy(bn.running_var), everything.var(axis=(0, 2, 3), ddof=1), 1e-5, "running_var")
    assert int(bn.num_batches_tracked) == nbt
    assert bn.training == (mode == "train")


def test_precise_bn_unchanged_when_block_raises(backend):
    bn = trained_bn(backend)
    before = snapshot(bn, backend)
    with pytest.raises(KeyError, match="boom"):
        with cnn.precise_bn(bn):
            for xb in batches((4, 4), 3, "cf"):
                bn(backend.asarray(xb))
            raise KeyError("boom")
    assert_unchanged(bn, before, backend)
    # The layer is back to ordinary training: the batch goes into the running average.
    xb = batches((6,), 3, "cf", seed=1)[0]
    rm = before["running_mean"][1].astype(np.float64)
    bn(backend.asarray(xb))
    close(backend.to_numpy(bn.running_mean), 0.9 * rm + 0.1 * xb.mean(axis=(0, 2, 3)), 1e-6, "running_mean")
    assert int(bn.num_batches_tracked) == int(before["num_batches_tracked"][1]) + 1


def test_precise_bn_selects_layers(backend):
    bn = trained_bn(backend)
    frozen = trained_bn(backend).freeze()
    untracked = cnn.BatchNorm2d(3, track_running_stats=False, backend=backend.name)
    gn = cnn.GroupNorm(1, 3, backend=backend.name)
    frozen_before = snapshot(frozen, backend)
    data = batches((4, 6), 3, "cf")
    with cnn.precise_bn([gn, bn, frozen, untracked, bn]) as recorded:
        assert recorded == [bn]
        for xb in data:
            for layer in (gn, bn, frozen, untracked):
                layer(backend.asarray(xb))
    assert_unchanged(frozen, frozen_before, backend)
    everything = np.concatenate(data).astype(np.float64)
    close(backend.to_numpy(bn.running_mean), everything.mean(axis=(0, 2, 3)), 1e-5, "running_mean")
    with pytest.raises(ValueError, match="BatchNorm"):
        with cnn.precise_bn([gn, frozen]):
            pass
    with pytest.raises(RuntimeError, match="already recording"):
        with cnn.precise_bn([bn]):
            with cnn.precise_bn(bn):
                pass
    with pytest.raises(RuntimeError, match="precise_bn"):
        with cnn.precise_bn([bn]):
            bn.freeze()


def test_precise_bn_without_batches_warns_and_keeps_stats(backend):
    bn = trained_bn(backend)
    before = snapshot(bn, backend)
    with pytest.warns(RuntimeWarning, match="saw no batch"):
        with cnn.precise_bn([bn]):
            bn(backend.asarray(np.zeros((0, 3, 2, 2), np.float32)))  # an empty batch is not a batch
    assert_unchanged(bn, before, backend)


# -- errors and bookkeeping -----------------------------------------------------------

@pytest.mark.parametrize("layer,shape", [
    (lambda b: cnn.BatchNorm1d(3, backend=b), (2, 3, 4, 5)),
    (lambda b: cnn.BatchNorm1d(3, backend=b), (3,)),
    (lambda b: cnn.BatchNorm2d(3, backend=b), (2, 3, 4)),
    (lambda b: cnn.BatchNorm3d(3, backend=b), (2, 3, 4, 5)),
    (lambda b: cnn.InstanceNorm2d(3, backend=b), (3, 4)),
    (lambda b: cnn.InstanceNorm1d(3, backend=b), (2, 3, 4, 5)),
    (lambda b: cnn.GroupNorm(1, 3, backend=b), (3,)),
], ids=["bn1d-4d", "bn1d-1d", "bn2d-3d", "bn3d-4d", "in2d-2d", "in1d-4d", "gn-1d"])
def test_input_rank_is_checked(backend, layer, shape):
    with pytest.raises(ValueError, match=r"expects.*got \d-D|at least 2"):
        layer(backend.name)(backend.asarray(np.ones(shape, np.float32)))


@pytest.mark.parametrize("make", [
    lambda b: cnn.BatchNorm2d(4, backend=b), lambda b: cnn.InstanceNorm2d(4, affine=True, backend=b),
    lambda b: cnn.GroupNorm(2, 4, backend=b), lambda b: cnn.BatchNorm2d(4, channel_axis=-1, backend=b),
], ids=["bn", "in", "gn", "bn-cl"])
def test_channel_count_is_checked(backend, make):
    with pytest.raises(ValueError, match="expected 4 channels"):
        make(backend.name)(backend.asarray(np.ones((2, 3, 5, 5), np.float32)))


def test_instance_norm_without_parameters_warns_on_channel_mismatch(backend):
    norm = cnn.InstanceNorm2d(4, backend=backend.name)
    with pytest.warns(UserWarning, match="num_features"):
        y = norm(backend.asarray(np.random.default_rng(0).standard_normal((2, 3, 5, 5))))
    assert y.shape == (2, 3, 5, 5)


def test_backward_needs_one_forward(backend):
    bn = cnn.BatchNorm1d(3, backend=backend.name)
    with pytest.raises(RuntimeError, match="call layer"):
        bn.backward(backend.asarray(np.ones((4, 3), np.float32)))
    x = backend.asarray(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32))
    bn(x)
    with pytest.raises(ValueError, match="dy"):  # a bad dy keeps the forward state for a retry
        bn.backward(backend.asarray(np.ones((5, 3), np.float32)))
    bn.backward(backend.asarray(np.ones((4, 3), np.float32)))
    with pytest.raises(RuntimeError, match="call layer"):
        bn.backward(backend.asarray(np.ones((4, 3), np.float32)))


def test_failed_forward_changes_nothing(backend):
    bn = trained_bn(backend)
    before = snapshot(bn, backend)
    with pytest.raises(ValueError, match="more than 1 value"):
        bn(backend.asarray(np.ones((1, 3, 1, 1), np.float32)))
    with pytest.raises(TypeError, match="x"):
        bn([[1.0]])
    bn.momentum = 2.0
    with pytest.raises(ValueError, match="momentum"):
        bn(backend.asarray(np.ones((2, 3, 2, 2), np.float32)))
    assert_unchanged(bn, before, backend)


def test_parameters_live_on_the_backend(backend):
    bn = cnn.BatchNorm2d(3, dtype=np.float64, backend=backend.name)
    for a in (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked):
        assert isinstance(a, backend.xp.ndarray)
    assert bn.weight.dtype == np.float64 and bn.num_batches_tracked.shape == ()
    # float32 data through float64 parameters: output in the data's dtype, gradients in the parameters'.
    x = backend.asarray(np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32))
    y = bn(x)
    bn.backward(backend.asarray(np.ones((4, 3, 2, 2), np.float32)))
    assert y.dtype == np.float32 and bn.weight_grad.dtype == np.float64


@pytest.mark.parametrize("make,error,pattern", [
    (lambda: cnn.BatchNorm2d(3, momentum=1.5), ValueError, "momentum"),
    (lambda: cnn.BatchNorm2d(3, eps=-1.0), ValueError, "eps"),
    (lambda: cnn.BatchNorm2d(0), ValueError, "num_features"),
    (lambda: cnn.BatchNorm2d(3, dtype=np.int32), TypeError, "dtype"),
    (lambda: cnn.BatchNorm2d(3, channel_axis=0), ValueError, "channel_axis"),
    (lambda: cnn.BatchNorm2d(3, backend="nope"), ValueError, "backend"),
    (lambda: cnn.GroupNorm(3, 4), ValueError, "num_groups"),
    (lambda: cnn.LayerNorm("x"), TypeError, "normalized_shape"),
    (lambda: cnn.InstanceNorm1d(3, affine=1), TypeError, "affine"),
], ids=["momentum", "eps", "features", "dtype", "axis", "backend", "groups", "shape", "affine"])
def test_constructor_errors(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


def test_momentum_none_is_a_cumulative_average(backend):
    bn = cnn.BatchNorm1d(2, momentum=None, dtype=np.float64, backend=backend.name)
    data = batches((3, 5, 7), 2, "cf", seed=3)
    for xb in data:
        bn(backend.asarray(xb.reshape(len(xb), 2, -1).astype(np.float64)))
    means = [xb.astype(np.float64).mean(axis=(0, 2, 3)) for xb in data]
    close(backend.to_numpy(bn.running_mean), np.mean(means, axis=0), 1e-9, "running_mean")
    assert int(bn.num_batches_tracked) == 3



# -- out= ----------------------------------------------------------------------------

def same_bits(backend, got, want, what):
    """Bit-identical arrays on ``backend`` (NaN == NaN, -0 != +0), or both None."""
    bits_equal(backend.to_numpy(got), backend.to_numpy(want), what)


# (id, layer factory (channel_axis, backend), logical (N, C, ...) shape, modes): "train" normalizes
# with batch statistics (FrozenBatchNorm2d: its fixed ones), "eval" with the running statistics
OUT_LAYERS = [
    ("BatchNorm1d", lambda axis, be: cnn.BatchNorm1d(3, channel_axis=axis, backend=be), (6, 3), ("train", "eval")),
    ("BatchNorm1d-3d", lambda axis, be: cnn.BatchNorm1d(3, channel_axis=axis, backend=be), (4, 3, 5),
     ("train", "eval")),
    ("BatchNorm2d", lambda axis, be: cnn.BatchNorm2d(3, channel_axis=axis, backend=be), (4, 3, 5, 6),
     ("train", "eval")),
    ("BatchNorm3d", lambda axis, be: cnn.BatchNorm3d(3, channel_axis=axis, backend=be), (3, 3, 2, 3, 4),
     ("train", "eval")),
    ("FrozenBatchNorm2d", lambda axis, be: cnn.FrozenBatchNorm2d(3, channel_axis=axis, backend=be), (4, 3, 5, 6),
     ("train",)),
    ("InstanceNorm1d", lambda axis, be: cnn.InstanceNorm1d(3, affine=True, track_running_stats=True,
                                                           channel_axis=axis, backend=be), (3, 3, 8), ("train", "eval")),
    ("InstanceNorm2d", lambda axis, be: cnn.InstanceNorm2d(3, affine=True, track_running_stats=True,
                                                           channel_axis=axis, backend=be), (2, 3, 4, 5),
     ("train", "eval")),
    ("InstanceNorm3d", lambda axis, be: cnn.InstanceNorm3d(3, affine=True, channel_axis=axis, backend=be),
     (2, 3, 2, 3, 4), ("train",)),
    ("GroupNorm", lambda axis, be: cnn.GroupNorm(3, 6, channel_axis=axis, backend=be), (3, 6, 4, 5), ("train",)),
    ("LayerNorm", lambda axis, be: cnn.LayerNorm((5, 6), backend=be), (4, 3, 5, 6), ("train",)),
]
OUT_PARAMS = [pytest.param(make, shape, mode, layout, id=f"{name}-{mode}-{layout}")
              for name, make, shape, modes in OUT_LAYERS for mode in modes
              for layout in (["cf"] if name == "LayerNorm" else ["cf", "cl_strided"])]


def _out_layer(make, mode, layout, backend):
    """A fresh layer with non-trivial weight and running statistics, in ``mode``."""
    layer = make(axis_of(layout), backend.name)
    rng = np.random.default_rng(31)
    if layer.weight is not None:
        layer.weight[...] = backend.asarray(rng.uniform(0.5, 1.5, layer.weight.shape).astype(np.float32))
    if getattr(layer, "running_var", None) is not None:
        layer.running_mean[...] = backend.asarray(rng.standard_normal(layer.running_mean.shape).astype(np.float32))
        layer.running_var[...] = backend.asarray(rng.uniform(0.5, 2, layer.running_var.shape).astype(np.float32))
    return layer.train(mode == "train")


@pytest.mark.parametrize("make, shape, mode, layout", OUT_PARAMS)
def test_layer_out_and_in_place(backend, make, shape, mode, layout):
    """layer(x, out=) and backward(dy, out=) on every layer: out returned as itself, bit-identical to
    the plain call (y, dx, parameter gradients, running statistics); y over x; dx over dy; and after a
    forward in place, backward raises a ValueError that says why."""
    rng = np.random.default_rng(30)
    x_host = to_ours((1 + rng.standard_normal(shape)).astype(np.float32), layout)
    dy_host = to_ours(rng.standard_normal(shape).astype(np.float32), layout)
    xp = backend.xp

    def fresh():
        x = backend.asarray(x_host.copy(order="K"))
        dy = xp.empty_like(x)  # in x's layout, so that it can take dx
        dy[...] = backend.asarray(dy_host)
        return x, dy

    def state(layer):
        names = ("weight_grad", "bias_grad", "running_mean", "running_var", "num_batches_tracked")
        return {n: getattr(layer, n, None) for n in names}

    def same_state(layer, want, what):
        for name, value in state(layer).items():
            same_bits(backend, value, want[name], f"{what}: {name}")

    layer = _out_layer(make, mode, layout, backend)
    x, dy = fresh()
    y_ref = layer(x)
    dx_ref = layer.backward(dy)
    want = {k: None if a is None else a.copy() for k, a in state(layer).items()}

    layer = _out_layer(make, mode, layout, backend)
    x, dy = fresh()
    buf, dbuf = xp.empty_like(x), xp.empty_like(x)
    assert layer(x, out=buf) is buf
    same_bits(backend, buf, y_ref, "y into out")
    same_bits(backend, x, x_host, "x untouched")
    assert layer.backward(dy, out=dbuf) is dbuf
    same_bits(backend, dbuf, dx_ref, "dx into out")
    same_state(layer, want, "separate buffers")

    layer = _out_layer(make, mode, layout, backend)
    x, dy = fresh()
    assert layer.forward(x, out=x) is x
    same_bits(backend, x, y_ref, "y over x")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        same_bits(backend, getattr(layer, name, None), want[name], f"in place: {name}")
    with pytest.raises(ValueError, match=r"backward: the last forward wrote its output over its input \(out=x\)"):
        layer.backward(dy)
    assert layer.weight_grad is None

    layer = _out_layer(make, mode, layout, backend)
    x, dy = fresh()
    layer(x)
    assert layer.backward(dy, out=dy) is dy
    same_bits(backend, dy, dx_ref, "dx over dy")
    same_state(layer, want, "dx over dy")


@pytest.mark.parametrize("name", ["InstanceNorm1d", "InstanceNorm2d"])
def test_unbatched_instance_norm_out(backend, name):
    """Unbatched input: out has x's own shape and is returned as itself (not a view of it)."""
    shape = (3, 8) if name == "InstanceNorm1d" else (3, 4, 5)
    rng = np.random.default_rng(32)
    x_host = rng.standard_normal(shape).astype(np.float32)
    dy_host = rng.standard_normal(shape).astype(np.float32)
    make = lambda: getattr(cnn, name)(3, affine=True, backend=backend.name)  # noqa: E731
    ref = make()
    y_ref = ref(backend.asarray(x_host))
    dx_ref = ref.backward(backend.asarray(dy_host))
    layer = make()
    x = backend.asarray(x_host.copy())
    buf = backend.xp.empty_like(x)
    assert layer(x, out=buf) is buf
    same_bits(backend, buf, y_ref, "y")
    dy = backend.asarray(dy_host.copy())
    assert layer.backward(dy, out=dy) is dy
    same_bits(backend, dy, dx_ref, "dx over dy")
    same_bits(backend, layer.weight_grad, ref.weight_grad, "weight_grad")
    assert layer(x, out=x) is x
    same_bits(backend, x, y_ref, "y over x")
    with pytest.raises(ValueError, match=r"out=x"):
        layer.backward(backend.asarray(dy_host))
    with pytest.raises(ValueError, match=re.escape(f"out: expected shape {shape} (that of x)")):
        layer(backend.asarray(x_host), out=backend.xp.empty((1, *shape), np.float32))


def test_precise_bn_forward_honours_out(backend):
    """Inside precise_bn the layer normalizes with batch statistics through the seam: out is still y."""
    rng = np.random.default_rng(33)
    xs = [backend.asarray(rng.standard_normal((n, 3, 4)).astype(np.float32)) for n in (4, 6)]
    ref, bn = (cnn.BatchNorm1d(3, backend=backend.name).eval() for _ in range(2))
    with cnn.precise_bn([ref]):
        want = [ref(x) for x in xs]
    with cnn.precise_bn([bn]):
        for x, w in zip(xs, want):
            buf = backend.xp.empty_like(x)
            assert bn(x, out=buf) is buf
            same_bits(backend, buf, w, "y")
    same_bits(backend, bn.running_mean, ref.running_mean, "precise running_mean")
    same_bits(backend, bn.running_var, ref.running_var, "precise running_var")
    with cnn.precise_bn([bn]):
        x = xs[0].copy()
        assert bn(x, out=x) is x
        same_bits(backend, x, want[0], "y over x")


# what is wrong with out: (make it from x, error type, message); "overlap" is built from x's buffer
BAD_LAYER_OUTS = {
    "shape": (lambda x: np.empty(x.shape[:-1] + (x.shape[-1] + 1,), np.float32), ValueError, "out: expected shape"),
    "dtype": (lambda x: np.empty(x.shape, np.float64), TypeError, "out: expected dtype float32"),
    "layout": (lambda x: np.empty(x.shape[::-1], np.float32).T, ValueError, "out: expected a C-contiguous array"),
    "overlap": (None, ValueError, "out: overlaps {} partly"),
    "type": (lambda x: x.tolist(), TypeError, "out: the "),
}


@pytest.mark.parametrize("what", list(BAD_LAYER_OUTS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bad_out_changes_nothing(what, training):
    """A bad out is refused before the layer changes (running statistics, num_batches_tracked, the
    pending forward: a later backward still differentiates the last good forward); backward checks its
    out the same way and keeps the forward for a retry."""
    make_bad, error, match = BAD_LAYER_OUTS[what]
    numpy_case = BackendCase("numpy")
    rng = np.random.default_rng(34)
    base = rng.standard_normal((5, 3, 2, 2)).astype(np.float32)
    x = base[:4]
    bad = base[1:] if what == "overlap" else make_bad(x)
    bn, twin = (trained_bn(numpy_case).train(training) for _ in range(2))
    good_x = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    bn(good_x)
    twin(good_x)
    before, base_before = snapshot(bn, numpy_case), base.copy()
    with pytest.raises(error, match=match.format("x")):
        bn(x, out=bad)
    assert_unchanged(bn, before, numpy_case)
    np.testing.assert_array_equal(base, base_before)

    dbase = np.ones((5, 3, 2, 2), np.float32)
    dy, dbad = (dbase[:4], dbase[1:]) if what == "overlap" else (np.ones_like(good_x), make_bad(good_x))
    with pytest.raises(error, match=match.format("dy")):
        bn.backward(dy, out=dbad)
    assert bn.weight_grad is None
    # the last good forward is still the one differentiated, as by a twin that saw no bad out
    np.testing.assert_array_equal(bn.backward(dy), twin.backward(dy))
    np.testing.assert_array_equal(bn.weight_grad, twin.weight_grad)


def test_out_overlapping_layer_parameters_is_refused():
    ln = cnn.LayerNorm(6)
    buf = np.zeros((2, 6), np.float32)
    ln.weight = buf[0]  # a weight that is a row of out's memory
    with pytest.raises(ValueError, match="out: shares memory with weight"):
        ln(np.ones((2, 6), np.float32), out=buf)
    assert not buf.any()


def test_layer_out_is_keyword_only():
    bn = cnn.BatchNorm1d(3)
    x = np.ones((4, 3), np.float32)
    with pytest.raises(TypeError):
        bn(x, np.empty_like(x))
    with pytest.raises(TypeError):
        bn.forward(x, np.empty_like(x))
    bn(x)
    with pytest.raises(TypeError):
        bn.backward(x, np.empty_like(x))
