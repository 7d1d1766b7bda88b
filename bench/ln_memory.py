"""Memory (and time) of one LayerNorm backward call: cnorm against PyTorch.

    python bench/ln_memory.py [--threads 2] [--impls cnorm,torch] [--other DIR] [--cases NAME,...]

Each figure comes from a fresh subprocess that builds the inputs, runs the
forward, then measures the backward call alone:

* ``peak MiB``: the rise of the process's peak resident set (VmHWM, reset
  through /proc/self/clear_refs just before the call) over its resident set
  just before the call - everything the call touched, outputs included;
* ``out MiB``: the arrays the call returned (dx, dweight, dbias; cnorm's
  front end also allocates dweight/dbias when the layer has no affine
  parameters and drops them);
* ``traced MiB``: tracemalloc's peak during the call (NumPy allocations:
  cnorm's outputs and kernel scratch; PyTorch's allocator is invisible to it);
* ``first ms``: the measured call's wall time (first touch of its memory
  included; PyTorch's first call at a size also pays lazy initialization);
* ``warm ms``: the best of three more calls.

``--other DIR`` runs cnorm with the kernels module found in DIR (a
``_kernels*.so`` of another build, as ``bench/ab_kernels.py --other``), to
print the figures of the code before a change with the same script. cnorm
is imported from this checkout (the folder above bench/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# this checkout's cnorm, not an installed (or editable-installed) one
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name: (input shape, normalized dims, dtype, affine)
CASES = {
    "1x2^27-f16": ((1, 1 << 27), 1, "float16", False),
    "1x2^27-f16-affine": ((1, 1 << 27), 1, "float16", True),
    "8x256x64x64-f32": ((8, 256, 64, 64), 3, "float32", True),
    "8192x768-f32": ((8192, 768), 1, "float32", True),
}


def _status(key: str) -> int:
    """A /proc/self/status field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    """VmHWM := VmRSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(impl: str, name: str, threads: int, other: str | None) -> dict:
    import gc
    import tracemalloc

    import numpy as np

    shape, nd, dtname, affine = CASES[name]
    rng = np.random.default_rng(0)
    nshape = shape[len(shape) - nd:]
    if impl == "torch":
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(threads)
        tdt = getattr(torch, dtname)
        x = (torch.randn(shape) * 2 + 1).to(tdt).requires_grad_(True)
        dy = torch.randn(shape).to(tdt)
        w = torch.empty(nshape).uniform_(0.5, 1.5).to(tdt).requires_grad_(True) if affine else None
        b = torch.randn(nshape).to(tdt).requires_grad_(True) if affine else None
        y = F.layer_norm(x, nshape, w, b, 1e-5)
        # a small call first: lazy initialization (thread pool, dispatch) is not the call's
        xs = torch.ones((2, 64), dtype=tdt, requires_grad=True)
        F.layer_norm(xs, (64,), None, None, 1e-5).sum().backward()
        gc.collect()

        def call():
            for t in (x, w, b):
                if t is not None:
                    t.grad = None
            y.backward(dy, retain_graph=True)
            return [t.grad for t in (x, w, b) if t is not None]

        def nbytes(a):
            return a.numel() * a.element_size()
    else:
        sys.path.insert(0, ROOT)
        import cnorm
        from cnorm import _cpu

        if other:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from ab_kernels import load_other

            _cpu.K = load_other(other)
        cnorm.set_num_threads(threads)
        dt = np.dtype(dtname)
        x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 1).astype(dt)
        dy = rng.standard_normal(shape, dtype=np.float32).astype(dt)
        w = rng.uniform(0.5, 1.5, nshape).astype(np.float32) if affine else None
        b = rng.standard_normal(nshape).astype(np.float32) if affine else None
        _, saved = cnorm.layer_norm_forward(x, nshape, w, b, 1e-5, backend="cython")
        xs = np.ones((2, 64), dt)
        cnorm.layer_norm_backward(xs, xs, cnorm.layer_norm_forward(xs, (64,), backend="cython")[1])
        gc.collect()

        def call():
            return cnorm.layer_norm_backward(dy, x, saved, w)

        def nbytes(a):
            return 0 if a is None else a.nbytes
    _reset_peak()
    rss0 = _status("VmRSS")
    tracemalloc.start()
    t0 = time.perf_counter()
    out = call()
    t1 = time.perf_counter()
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    peak = _status("VmHWM") - rss0
    outbytes = sum(nbytes(a) for a in out)
    del out
    warm = []
    for _ in range(3):
        t2 = time.perf_counter()
        call()
        warm.append(time.perf_counter() - t2)
    return {"impl": impl, "case": name, "threads": threads, "peak": peak, "out": outbytes,
            "traced": traced if impl == "cnorm" else None, "ms": (t1 - t0) * 1e3, "warm_ms": min(warm) * 1e3}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--impls", default="cnorm,torch")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--other", default=None, help="folder holding another build's _kernels*.so")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        impl, name = args.child.split(":", 1)
        print(json.dumps(child(impl, name, args.threads, args.other)))
        return 0
    mib = 1 << 20
    print(f"{'case':20s}{'impl':>14s}{'peak MiB':>10s}{'out MiB':>10s}{'traced MiB':>12s}{'first ms':>10s}"
          f"{'warm ms':>10s}")
    for name in args.cases.split(","):
        for impl in args.impls.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{impl}:{name}",
                   "--threads", str(args.threads)] + (["--other", args.other] if args.other else [])
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode:
                print(f"{name:20s}{impl:>14s}  failed: {run.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            r = json.loads(run.stdout.strip().splitlines()[-1])
            traced = "-" if r["traced"] is None else f"{r['traced'] / mib:.1f}"
            print(f"{name:20s}{impl + (' (other)' if args.other and impl == 'cnorm' else ''):>14s}"
                  f"{r['peak'] / mib:10.1f}{r['out'] / mib:10.1f}{traced:>12s}{r['ms']:10.1f}{r['warm_ms']:10.1f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
