"""Fused activations: interleaved A/B timing of a norm with its activation fused
against the plain norm, the unfused composition (the plain norm with a NumPy
activation around it) and PyTorch eager (``F.relu(F.batch_norm(...))`` and its
autograd backward's ops).

    python bench/activation_ab.py [--threads 2] [--dtypes float32,bfloat16] [--base DIR]

Cases: BatchNorm + ReLU on (32, 64, 56, 56) and GroupNorm(32) + SiLU on
(16, 256, 32, 32), training forward and backward. Every variant is timed in
the same interleaved rounds (cnorm._bench.time_calls: median of many calls,
each after an untimed one) on rotating copies of the inputs that move over
twice the last-level cache, so a shared machine's drift hits all alike.
glibc keeps freed memory (cnorm._bench.keep_freed_memory): no variant pays
page faults for fresh outputs. PyTorch runs at the same thread count; its
backward is timed as the ops its autograd runs (threshold_backward or
silu_backward, then native_batch_norm_backward or native_group_norm_backward)
on saved forward results, so no graph is rebuilt per call.

``--base DIR``: also time the plain norm (no activation) with the kernels
module found in DIR (a ``_kernels_<level>*.so`` of another build, e.g. of the
commit before the fused activations), called through the kernel entry points
both builds share: the act == 0 path against the code before it; and a few
more plain cases that way (``--plain-cases``: LayerNorm rows short and long,
channels-last BatchNorm, eval affine).

Run it from the checkout with ``PYTHONPATH=.`` (an editable install of another
checkout would otherwise be imported).
"""

from __future__ import annotations

import argparse
import glob
import importlib.machinery
import importlib.util
import math
import os
import statistics
import sys

import numpy as np


def load_module(folder: str, level: str):
    paths = glob.glob(os.path.join(folder, f"_kernels_{level}*.so"))
    if len(paths) != 1:
        raise SystemExit(f"--base: expected one _kernels_{level}*.so in {folder}, found {paths}")
    name = os.path.basename(paths[0]).split(".")[0]
    loader = importlib.machinery.ExtensionFileLoader(name, paths[0])
    spec = importlib.util.spec_from_loader(name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


class Rot:
    """Copies of one array, handed out in turn."""

    def __init__(self, a, n):
        self.items = [a] + [a.clone() if hasattr(a, "clone") else a.copy() for _ in range(n - 1)]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def numpy_act(z, act):
    """The composition's forward activation: relu in place, silu into a new array (z is kept for backward)."""
    if act == "relu":
        return np.maximum(z, 0, out=z)
    t = np.negative(z)
    np.exp(t, out=t)
    t += 1
    return np.divide(z, t, out=t)


def plain_ab(K, base, args, llc, _bench):
    """The plain (no activation) kernels of this build against the base build's, float32."""
    rng = np.random.default_rng(1)
    nt = args.threads
    # (name, cl, N, C, S, G): LayerNorm short and long rows, BatchNorm channels-last, GroupNorm channels-last
    for name, cl, n, c, s, g in (("layer_norm (8192, 64)", False, 8192, 64, 1, 1),
                                 ("layer_norm (1024, 4096)", False, 1024, 4096, 1, 1),
                                 ("batch_norm cl (256, 56*56, 64)", True, 32, 64, 3136, 0),
                                 ("group_norm cl (16, 1024, 256) G32", True, 16, 256, 1024, 32)):
        shape = (n, s, c) if cl else (n, c, s)
        x0 = rng.standard_normal(shape, dtype=np.float32)
        dy0 = rng.standard_normal(shape, dtype=np.float32)
        w = rng.uniform(0.5, 1.5, c).astype(np.float32)
        b = rng.standard_normal(c).astype(np.float32)
        copies = max(2, math.ceil(2 * llc / (2 * x0.nbytes)) + 1)
        xs, dys = Rot(x0, copies), Rot(dy0, copies)
        _, mean, _, rstd = K.forward_train(x0, cl, n, c, s, g, w, b, 1e-5, nt, None)
        y0 = np.empty_like(x0)

        def fwd(mod):
            return lambda: mod.forward_train(xs.next(), cl, n, c, s, g, w, b, 1e-5, nt, None)

        def bwd(mod):
            def call():
                dx = np.empty_like(x0)
                if g == 0:
                    dw, db = np.empty_like(w), np.empty_like(w)
                    mod.cross_backward(dys.next(), xs.next(), dx, cl, n, c, s, mean, rstd, w, dw, db, mod.TRAIN, nt)
                else:
                    mod.group_backward(dys.next(), xs.next(), dx, cl, n, c, s, g, mean, rstd, w, nt)
            return call

        def aff(mod):
            return lambda: mod.affine(xs.next(), y0, cl, n, c, s, w, b, nt)

        for what, mk in (("fwd", fwd), ("bwd", bwd), ("eval fwd", aff)):
            times = _bench.time_calls({"K": mk(K), "base": mk(base)}, {"K": args.repeat, "base": args.repeat},
                                      budget_s=args.budget / 2)
            stat = min if args.stat == "min" else statistics.median
            med = {k: stat(v) * 1e3 for k, v in times.items()}
            print(f"plain {name} {what}: K {med['K']:.3f}, base {med['base']:.3f} | K/base {med['K'] / med['base']:.3f}",
                  flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--repeat", type=int, default=25)
    parser.add_argument("--budget", type=float, default=25.0, help="seconds per case (at least 3 rounds)")
    parser.add_argument("--base", default=None, help="folder holding another build's kernels modules")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="per-variant statistic (min: on a machine shared with other work, where a "
                             "descheduled thread stretches a parallel region by a time slice)")
    parser.add_argument("--reverse", action="store_true",
                        help="time the variants of a round in the reverse order (order effects)")
    parser.add_argument("--plain-cases", action="store_true",
                        help="with --base: also LayerNorm rows, channels-last BatchNorm and the eval affine, plain")
    args = parser.parse_args(argv)

    import cnorm
    from cnorm import _bench, _cpu
    from cnorm._dtypes import BFLOAT16

    cnorm.set_num_threads(args.threads)
    level = cnorm.get_cpu_capability()
    K = _cpu.K
    base = load_module(args.base, level) if args.base else None
    torch = None
    if not args.no_torch:
        import torch

        torch.set_num_threads(args.threads)
    kept = _bench.keep_freed_memory()
    llc = _bench.machine()["llc_bytes"]
    print(f"level {level}, {args.threads} threads, allocator: {_bench.ALLOCATOR[kept]}, "
          f"torch {torch.__version__ if torch else '-'}; {args.stat} ms per call")
    if base is not None and args.plain_cases:
        plain_ab(K, base, args, llc, _bench)
    cases = [("batch_norm", "relu", (32, 64, 56, 56), 0), ("group_norm", "silu", (16, 256, 32, 32), 32)]
    for dname in [d for d in args.dtypes.split(",") if d]:
        dt = BFLOAT16 if dname == "bfloat16" else np.dtype(dname)
        tdt = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dname]
        for norm, act, shape, groups in cases:
            rng = np.random.default_rng(0)
            n, c = shape[0], shape[1]
            s = math.prod(shape[2:])
            x0 = (rng.standard_normal(shape, dtype=np.float32) * 2 + 1).astype(dt)
            dy0 = rng.standard_normal(shape, dtype=np.float32).astype(dt)
            w = rng.uniform(0.5, 1.5, c).astype(np.float32)
            b = rng.standard_normal(c).astype(np.float32)
            copies = max(2, math.ceil(2 * llc / (2 * x0.nbytes)) + 1)
            xs, dys = Rot(x0, copies), Rot(dy0, copies)

            if norm == "batch_norm":
                def fwd(x, activation=None):
                    return cnorm.batch_norm_forward(x, w, b, activation=activation)

                bwd = cnorm.batch_norm_backward
            else:
                def fwd(x, activation=None):
                    return cnorm.group_norm_forward(x, groups, w, b, activation=activation)

                bwd = cnorm.group_norm_backward
            _, saved_act = fwd(x0, act)
            z0, saved_plain = fwd(x0)
            zy0 = z0.copy() if act == "silu" else numpy_act(z0.copy(), act)  # what the composition keeps

            fw = {"fused": lambda: fwd(xs.next(), act),
                  "plain": lambda: fwd(xs.next()),
                  "unfused": lambda: numpy_act(fwd(xs.next())[0], act)}
            bw = {"fused": lambda: bwd(dys.next(), xs.next(), saved_act, w),
                  "plain": lambda: bwd(dys.next(), xs.next(), saved_plain, w),
                  "unfused": lambda: bwd(_bench._np_act_grad(dys.next(), zy0, act), xs.next(), saved_plain, w)}
            if base is not None:
                # the plain norm through the entry points both builds share (no act argument)
                mean, rstd = saved_plain.mean, saved_plain.rstd
                G = 0 if norm == "batch_norm" else groups

                def kf(mod):
                    return lambda: mod.forward_train(xs.next().reshape(n, c, s), False, n, c, s, G, w, b, 1e-5,
                                                     args.threads, None)

                def kb(mod):
                    def call():
                        x3, dy3 = xs.next().reshape(n, c, s), dys.next().reshape(n, c, s)
                        dx = np.empty_like(x3)
                        if G == 0:
                            dw, db = np.empty_like(w), np.empty_like(w)
                            mod.cross_backward(dy3, x3, dx, False, n, c, s, mean, rstd, w, dw, db, mod.TRAIN,
                                               args.threads)
                        else:
                            mod.group_backward(dy3, x3, dx, False, n, c, s, G, mean, rstd, w, args.threads)
                        return dx
                    return call

                fw["K plain"], fw["base plain"] = kf(K), kf(base)
                bw["K plain"], bw["base plain"] = kb(K), kb(base)
            if torch is not None:
                F = torch.nn.functional
                tx = Rot(torch.from_numpy(x0.astype(np.float32)).to(getattr(torch, tdt)), copies)
                tdy = Rot(torch.from_numpy(dy0.astype(np.float32)).to(getattr(torch, tdt)), copies)
                tw, tb = torch.from_numpy(w), torch.from_numpy(b)
                if dname != "float32":  # PyTorch CPU norms want parameters of the input's dtype
                    tw, tb = tw.to(getattr(torch, tdt)), tb.to(getattr(torch, tdt))
                tact = F.relu if act == "relu" else F.silu
                if norm == "batch_norm":
                    def tfwd():
                        with torch.no_grad():
                            return tact(F.batch_norm(tx.next(), None, None, tw, tb, True, 0.1, 1e-5))
                    out, sm, si = torch.ops.aten.native_batch_norm(tx.items[0], tw, tb, None, None, True, 0.1, 1e-5)

                    def tbwd():
                        g = (torch.ops.aten.threshold_backward(tdy.next(), ty0, 0) if act == "relu"
                             else torch.ops.aten.silu_backward(tdy.next(), out))
                        return torch.ops.aten.native_batch_norm_backward(g, tx.next(), tw, None, None, sm, si,
                                                                         True, 1e-5, [True, True, True])
                else:
                    def tfwd():
                        with torch.no_grad():
                            return tact(F.group_norm(tx.next(), groups, tw, tb, 1e-5))
                    out, sm, si = torch.ops.aten.native_group_norm(tx.items[0], tw, tb, n, c, s, groups, 1e-5)

                    def tbwd():
                        g = (torch.ops.aten.threshold_backward(tdy.next(), ty0, 0) if act == "relu"
                             else torch.ops.aten.silu_backward(tdy.next(), out))
                        return torch.ops.aten.native_group_norm_backward(g, tx.next(), sm, si, tw, n, c, s, groups,
                                                                         [True, True, True])
                ty0 = torch.relu(out)
                fw["torch"], bw["torch"] = tfwd, tbwd
            for direction, calls in (("fwd", fw), ("bwd", bw)):
                if args.reverse:
                    calls = dict(reversed(list(calls.items())))
                times = _bench.time_calls(calls, {k: args.repeat for k in calls}, budget_s=args.budget)
                stat = min if args.stat == "min" else statistics.median
                med = {k: stat(times[k]) * 1e3 for k in (fw if direction == "fwd" else bw)}
                f = med["fused"]
                parts = [f"{k} {v:.3f}" for k, v in med.items()]
                ratios = [f"fused/plain {f / med['plain']:.3f}", f"unfused/fused {med['unfused'] / f:.2f}"]
                if "torch" in med:
                    ratios.append(f"torch/fused {med['torch'] / f:.2f}")
                if "base plain" in med:
                    ratios.append(f"K plain/base plain {med['K plain'] / med['base plain']:.3f}")
                print(f"{norm}+{act} {shape} {dname} {direction}: " + ", ".join(parts) + " | " + ", ".join(ratios),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
