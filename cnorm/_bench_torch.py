"""cnorm inside PyTorch, timed: the adapters' per-call overhead and a CPU training step
of two models with and without ``cnorm.torch.replace_norms``.

1. Per-call overhead, on a tiny input (LayerNorm of (4, 64) float32, so the
   kernel's own time is small): cnorm.layer_norm on NumPy arrays, the same
   call on torch tensors (DLPack in and out), cnorm.torch.layer_norm (no grad)
   and its forward + backward with autograd, and torch.nn.functional.layer_norm
   for scale. Interleaved rounds, medians.
2. A training step (forward, backward, SGD step) of a ResNet-style network
   (BatchNorm2d and GroupNorm) and of a pre-norm transformer (LayerNorm and
   RMSNorm) built from torch.nn, with and without replace_norms, timed in
   interleaved rounds at the thread count and CPU level in force.

``python -m cnorm bench --pytorch`` runs it after the cases (``--pytorch-only``
alone); ``bench/torch_interop.py`` runs it with its own options.
"""

from __future__ import annotations

import copy
import statistics

import numpy as np
import torch

import cnorm
import cnorm.torch as ct


def interleaved(calls: dict, budget: float) -> dict:
    """Median seconds per call of each callable: cnorm._bench.time_calls's interleaved rounds
    (tiny calls timed in batches) until the budget is spent."""
    from ._bench import time_calls

    times = time_calls(calls, {k: 10 ** 6 for k in calls}, budget)
    return {k: statistics.median(v) for k, v in times.items()}


def overhead(budget: float) -> dict:
    rng = np.random.default_rng(0)
    xn = rng.standard_normal((4, 64)).astype(np.float32)
    wn, bn = np.ones(64, np.float32), np.zeros(64, np.float32)
    xt, wt, bt = torch.from_numpy(xn), torch.from_numpy(wn), torch.from_numpy(bn)
    xg = xt.clone().requires_grad_()
    wg = wt.clone().requires_grad_()
    dy = torch.ones_like(xt)

    def fwd_bwd():
        y = ct.layer_norm(xg, 64, wg, bt)
        y.backward(dy)

    def torch_fwd_bwd():
        y = torch.nn.functional.layer_norm(xg, (64,), wg, bt)
        y.backward(dy)

    calls = {
        "cnorm.layer_norm, NumPy arrays": lambda: cnorm.layer_norm(xn, 64, wn, bn),
        "cnorm.layer_norm, torch tensors (DLPack)": lambda: cnorm.layer_norm(xt, 64, wt, bt),
        "cnorm.torch.layer_norm (no grad)": lambda: ct.layer_norm(xt, 64, wt, bt),
        "cnorm.torch.layer_norm forward + backward": fwd_bwd,
        "torch F.layer_norm (no grad)": lambda: torch.nn.functional.layer_norm(xt, (64,), wt, bt),
        "torch F.layer_norm forward + backward": torch_fwd_bwd,
    }
    med = interleaved(calls, budget)
    base = med["cnorm.layer_norm, NumPy arrays"]
    print("per-call time, LayerNorm (4, 64) float32 (median, us; overhead against cnorm on NumPy arrays):")
    for k, t in med.items():
        print(f"  {k:46s} {t * 1e6:8.1f} us   {(t - base) * 1e6:+7.1f} us", flush=True)
    return {k: t for k, t in med.items()}


def resnet(width=64, groups=32):
    """A ResNet-style network: a stem, two residual blocks (BatchNorm2d, GroupNorm), a classifier."""
    class Block(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.n1 = torch.nn.BatchNorm2d(c)
            self.c2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.n2 = torch.nn.GroupNorm(groups, c)

        def forward(self, x):
            return torch.relu(x + self.n2(self.c2(torch.relu(self.n1(self.c1(x))))))

    return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.BatchNorm2d(width),
                               torch.nn.ReLU(), Block(width), Block(width), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(width, 10))


def transformer(d=256, depth=2, heads=8):
    """A pre-norm transformer (LayerNorm before attention, RMSNorm before the MLP) on (N, T, d) inputs."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.n1 = torch.nn.LayerNorm(d)
            self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
            self.n2 = torch.nn.RMSNorm(d)
            self.ff = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))

        def forward(self, x):
            h = self.n1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.ff(self.n2(x))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.Sequential(*[Block() for _ in range(depth)])
            self.norm = torch.nn.LayerNorm(d)
            self.out = torch.nn.Linear(d, 10)

        def forward(self, x):
            return self.out(self.norm(self.blocks(x)).mean(1))

    return Model()


MODELS = {
    "resnet": ("ResNet-style (BatchNorm2d, GroupNorm), batch (32, 3, 32, 32), width 64", resnet, (32, 3, 32, 32)),
    "transformer": ("pre-norm transformer (LayerNorm, RMSNorm), batch (16, 128, 256), 2 blocks", transformer,
                    (16, 128, 256)),
}


def training_step(model, x, target):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        return loss

    return step


def models(names, budget, channels_last, compile=False) -> dict:
    """compile: both models under ``torch.compile`` (Inductor; cnorm's operators are opaque
    custom operators there, the norms of torch.nn are Inductor's own code); the first steps,
    which compile, are run before the timing and not counted."""
    out = {}
    for name in names:
        what, build, shape = MODELS[name]
        torch.manual_seed(0)
        ref = build()
        ours = ct.replace_norms(copy.deepcopy(ref))
        x = torch.randn(*shape)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
            ref, ours = ref.to(memory_format=torch.channels_last), ours.to(memory_format=torch.channels_last)
        if compile:
            ref, ours = torch.compile(ref), torch.compile(ours)
        target = torch.randint(0, 10, (shape[0],))
        steps = {"torch.nn": training_step(ref, x, target), "replace_norms": training_step(ours, x, target)}
        if compile:
            losses = {}
            for k, step in steps.items():  # compile (forward and backward graphs) outside the timing
                for _ in range(3):
                    losses[k] = float(step().detach())
            bad = [k for k, v in losses.items() if not np.isfinite(v)]
            if bad:
                # (seen with ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine: Inductor's compiled
                # step gave NaN losses for both variants; timing garbage measures nothing)
                print(f"training step, {what}, torch.compile: not timed: non-finite loss from "
                      f"{', '.join(bad)} ({losses}); torch.compile at ATEN_CPU_CAPABILITY="
                      f"{torch.backends.cpu.get_cpu_capability()}", flush=True)
                out[name] = {"what": what + ", torch.compile", "not_timed": "non-finite loss", "losses": losses}
                continue
        med = interleaved(steps, budget)
        t, c = med["torch.nn"], med["replace_norms"]
        cl = ", channels_last" if channels_last and x.dim() == 4 else ""
        tc = ", torch.compile" if compile else ""
        print(f"training step, {what}{cl}{tc}: torch.nn {t * 1e3:.2f} ms, with replace_norms {c * 1e3:.2f} ms "
              f"({t / c:.2f}x)", flush=True)
        out[name] = {"what": what + cl + tc, "torch_nn_s": t, "replace_norms_s": c}
    return out


def run(budget: float = 20.0, names=("resnet", "transformer"), channels_last: bool = False,
        with_overhead: bool = True, compile: bool = False) -> dict:
    """Both parts; returns what they printed, as numbers (seconds)."""
    return {"overhead_s": overhead(budget) if with_overhead else {},
            "training_step": models(list(names), budget, channels_last, compile)}
