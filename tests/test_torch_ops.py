"""cnorm.torch: the kernels as PyTorch operators and modules.

Against torch.nn over training and eval steps (outputs, input and parameter
gradients, running statistics) in float32, float64 and bfloat16, channels
last; state dicts both ways; gradcheck in float64; torch.library.opcheck
(schema, fake implementation, autograd registration); torch.compile with
fullgraph=True; and two small models (ResNet-style, transformer block)
trained with replace_norms matching the unreplaced model's losses.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch", reason="cnorm.torch needs PyTorch (installed by the test extra)")
ct = pytest.importorskip("cnorm.torch")
import cnorm.torch.nn as ctnn  # noqa: E402

TOL = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=2e-5, rtol=2e-5),
       torch.bfloat16: dict(atol=0.05, rtol=0.02)}

MODULES = [
    ("BatchNorm1d", lambda: torch.nn.BatchNorm1d(6), (8, 6)),
    ("BatchNorm1d (N, C, L)", lambda: torch.nn.BatchNorm1d(6), (8, 6, 7)),
    ("BatchNorm2d", lambda: torch.nn.BatchNorm2d(6), (4, 6, 5, 5)),
    ("BatchNorm2d momentum=None", lambda: torch.nn.BatchNorm2d(6, momentum=None), (4, 6, 5, 5)),
    ("BatchNorm2d untracked", lambda: torch.nn.BatchNorm2d(6, track_running_stats=False), (4, 6, 5, 5)),
    ("BatchNorm3d", lambda: torch.nn.BatchNorm3d(4), (2, 4, 3, 3, 3)),
    ("InstanceNorm2d", lambda: torch.nn.InstanceNorm2d(6), (4, 6, 5, 5)),
    ("InstanceNorm2d affine tracked", lambda: torch.nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
     (4, 6, 5, 5)),
    ("InstanceNorm1d unbatched", lambda: torch.nn.InstanceNorm1d(6, affine=True), (6, 9)),
    ("GroupNorm", lambda: torch.nn.GroupNorm(3, 6), (4, 6, 5, 5)),
    ("LayerNorm", lambda: torch.nn.LayerNorm((5, 5)), (4, 6, 5, 5)),
    ("LayerNorm no bias", lambda: torch.nn.LayerNorm(16, bias=False), (4, 7, 16)),
    ("RMSNorm", lambda: torch.nn.RMSNorm(16), (4, 7, 16)),
    ("RMSNorm eps", lambda: torch.nn.RMSNorm((7, 16), eps=1e-3, elementwise_affine=False), (4, 7, 16)),
]


def _pair(make, dtype):
    torch.manual_seed(0)
    ref = make().to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    ours = ct.replace_norms(copy.deepcopy(ref))
    assert type(ours).__module__ == "cnorm.torch.nn" and isinstance(ours, type(ref))
    return ref, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name, make, shape", MODULES, ids=[m[0] for m in MODULES])
def test_modules_match_torch_nn(name, make, shape, dtype):
    ref, ours = _pair(make, dtype)
    tol = TOL[dtype]
    g = torch.Generator().manual_seed(1)
    for step, mode in enumerate(("train", "train", "eval")):
        ref.train(mode == "train")
        ours.train(mode == "train")
        x = torch.randn(*shape, generator=g).to(dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa), ours(xb)
        torch.testing.assert_close(yb, ya, **tol, msg=f"{name} step {step} output")
        dy = torch.randn(*shape, generator=g).to(dtype)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xb.grad, xa.grad, **tol, msg=f"{name} step {step} dx")
        for (pn, pa), pb in zip(ref.named_parameters(), ours.parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, **tol, msg=f"{name} step {step} {pn}.grad")
            assert pb.grad.dtype == pa.dtype
            pa.grad = pb.grad = None
        for k, va in ref.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], va, **tol, msg=f"{name} step {step} {k}")


@pytest.mark.parametrize("make", [lambda: torch.nn.BatchNorm2d(8), lambda: torch.nn.GroupNorm(4, 8),
                                  lambda: torch.nn.InstanceNorm2d(8, affine=True)], ids=["bn", "gn", "in"])
def test_channels_last_is_preserved(make):
    ref, ours = _pair(make, torch.float32)
    x = torch.randn(4, 8, 6, 6).to(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), ours(xb)
    assert yb.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yb, ya, atol=2e-5, rtol=2e-5)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=2e-5, rtol=2e-5)


def test_state_dict_round_trips_both_ways():
    ref = torch.nn.BatchNorm2d(5)
    ref(torch.randn(4, 5, 3, 3))  # running statistics that are not the initial ones
    ours = ctnn.BatchNorm2d(5)
    ours.load_state_dict(ref.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
    ours(torch.randn(4, 5, 3, 3))
    back = torch.nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


_RM = torch.linspace(-1, 1, 4, dtype=torch.float64)
_RV = torch.linspace(0.5, 2, 4, dtype=torch.float64)


def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


GRADCHECK = [
    ("batch_norm train", lambda x, w, b: ct.batch_norm(x, None, None, w, b, True), (3, 4, 3, 3), (4,)),
    ("batch_norm eval", lambda x, w, b: ct.batch_norm(x, _RM, _RV, w, b, False), (3, 4, 3, 3), (4,)),
    ("instance_norm", lambda x, w, b: ct.instance_norm(x, weight=w, bias=b), (3, 4, 3, 3), (4,)),
    ("group_norm", lambda x, w, b: ct.group_norm(x, 2, w, b), (3, 4, 3, 3), (4,)),
    ("layer_norm", lambda x, w, b: ct.layer_norm(x, (3, 3), w, b), (3, 4, 3, 3), (3, 3)),
    ("rms_norm", lambda x, w, b: ct.rms_norm(x, (3, 3), w) + b, (3, 4, 3, 3), (3, 3)),
]


@pytest.mark.parametrize("name, fn, xshape, pshape", GRADCHECK, ids=[g[0] for g in GRADCHECK])
def test_gradcheck_float64(name, fn, xshape, pshape):
    torch.manual_seed(0)
    assert torch.autograd.gradcheck(fn, (_f64(*xshape), _f64(*pshape), _f64(*pshape)))


def test_opcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    w, b = torch.rand(4, requires_grad=True), torch.randn(4, requires_grad=True)
    rm, rv = torch.zeros(4), torch.ones(4)
    ops = torch.ops.cnorm
    cases = [
        (ops.batch_norm.default, (x, w, b, None, None, True, 1e-5)),
        (ops.batch_norm.default, (x, w, b, rm, rv, False, 1e-5)),
        (ops.instance_norm.default, (x, w, b, None, None, True, 1e-5)),
        (ops.group_norm.default, (x, 2, w, b, 1e-5)),
        (ops.layer_norm.default, (x, [5, 5], torch.rand(5, 5, requires_grad=True), None, 1e-5)),
        (ops.rms_norm.default, (x, [5], None, None)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def _resnet():
    from cnorm._bench_torch import resnet

    return resnet(width=16, groups=4)


def _transformer():
    from cnorm._bench_torch import transformer

    return transformer(d=32, depth=2, heads=4)


@pytest.mark.parametrize("build, shape", [(_resnet, (8, 3, 12, 12)), (_transformer, (8, 10, 32))],
                         ids=["resnet", "transformer"])
def test_models_train_alike_with_replace_norms(build, shape):
    torch.manual_seed(0)
    ref = build()
    ours = ct.replace_norms(copy.deepcopy(ref))
    replaced = [m for m in ours.modules() if type(m).__module__ == "cnorm.torch.nn"]
    assert len(replaced) >= 3
    opt_a = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    for step in range(6):
        x = torch.randn(*shape, generator=g)
        target = torch.randint(0, 10, (shape[0],), generator=g)
        losses = []
        for model, opt in ((ref, opt_a), (ours, opt_b)):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5), f"step {step}: {losses}"
    ref.eval()
    ours.eval()
    x = torch.randn(*shape, generator=g)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = ct.replace_norms(torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.GroupNorm(2, 8),
        torch.nn.InstanceNorm2d(8), torch.nn.Flatten(), torch.nn.LayerNorm(8 * 6 * 6), torch.nn.RMSNorm(8 * 6 * 6)))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(4, 3, 6, 6)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = eager(xa), compiled(xb)
        torch.testing.assert_close(yb, ya, atol=1e-6, rtol=1e-6)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model[1].running_mean, eager[1].running_mean)


def test_replace_norms_leaves_others_alone_and_checks_its_argument():
    class MyBN(torch.nn.BatchNorm2d):
        pass

    model = torch.nn.Sequential(MyBN(4), torch.nn.SyncBatchNorm(4), torch.nn.BatchNorm2d(4))
    assert ct.replace_norms(model) is model
    assert type(model[0]) is MyBN and type(model[1]) is torch.nn.SyncBatchNorm
    assert type(model[2]) is ctnn.BatchNorm2d
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        ct.replace_norms([torch.nn.BatchNorm2d(4)])


def test_eval_without_running_statistics_is_an_error():
    with pytest.raises(ValueError, match="running_mean, running_var"):
        ct.batch_norm(torch.randn(2, 3), None, None, training=False)


@pytest.mark.parametrize("which", ["add_layer_norm", "add_rms_norm"])
def test_fused_add_forms(which):
    torch.manual_seed(0)
    shape = (4, 6, 16)
    args = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    w = torch.rand(16, dtype=torch.float64, requires_grad=True) + 0.5
    b = torch.randn(16, dtype=torch.float64, requires_grad=True)
    if which == "add_layer_norm":
        def ours(x, r, w, b):
            return ct.add_layer_norm(x, r, 16, w, b)

        def ref(x, r, w, b):
            h = x + r
            return torch.nn.functional.layer_norm(h, (16,), w, b), h
        params = (w, b)
    else:
        def ours(x, r, w):
            return ct.add_rms_norm(x, r, 16, w)

        def ref(x, r, w):
            h = x + r
            return torch.nn.functional.rms_norm(h, (16,), w), h
        params = (w,)
    inputs = (*args, *params)
    assert torch.autograd.gradcheck(ours, inputs)
    ya, ha = ref(*inputs)
    yb, hb = ours(*inputs)
    torch.testing.assert_close(hb, ha)
    torch.testing.assert_close(yb, ya)
    grads_a = torch.autograd.grad(ya.square().sum() + ha.sin().sum(), inputs)
    grads_b = torch.autograd.grad(yb.square().sum() + hb.sin().sum(), inputs)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga)
    op = getattr(torch.ops.cnorm, which).default
    torch.library.opcheck(op, (*(a.float().detach().requires_grad_() for a in args), [16],
                               *(p.float().detach().requires_grad_() for p in params),
                               1e-5 if which == "add_layer_norm" else None))
