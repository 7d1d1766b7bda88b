"""LayerNorm backward of long rows: cnorm's public API against PyTorch autograd.

    python bench/ln_long_rows.py [--threads 2] [--repeat 7] [--other DIR]

Both at the same thread count, timed in interleaved rounds on the same data
(each timed call follows an untimed one of the same library, so that the
other library's spinning OpenMP threads are not timed), with glibc keeping
freed memory (``_bench.keep_freed_memory``, mallopt: as a training loop's
caching allocator would, no page faults on fresh outputs; not what a plain
NumPy loop pays, which ``python -m cnorm bench`` measures by default). The
first line of the output names that policy. Prints the median ms of each
and their ratio. ``--other DIR`` runs cnorm with the kernels module found in
DIR (as ``bench/ab_kernels.py --other``). cnorm is imported from this
checkout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (shape, dtype, affine)
CASES = [
    ((1, 1 << 27), "float16", False),
    ((1, 1 << 27), "float16", True),
    ((1, 1 << 24), "float32", True),
    ((1, 1 << 24), "bfloat16", True),
    ((8, 1 << 20), "float32", True),
    ((8, 1 << 20), "float32", False),
    ((8, 1 << 20), "bfloat16", True),
    ((64, 32768), "float32", True),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--other", default=None, help="folder holding another build's _kernels*.so")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    import torch.nn.functional as F

    import cnorm
    from cnorm import _bench, _cpu
    from cnorm._dtypes import BFLOAT16

    if args.other:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from ab_kernels import load_other

        _cpu.K = load_other(args.other)
    kept = _bench.keep_freed_memory()
    cnorm.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(f"cnorm level {_cpu.K.LEVEL}{' (other)' if args.other else ''}, {args.threads} threads, "
          f"torch {torch.__version__}, allocator: {_bench.ALLOCATOR[kept]}")
    for shape, dn, affine in CASES:
        npdt = BFLOAT16 if dn == "bfloat16" else np.dtype(dn)
        c = shape[-1]
        rng = np.random.default_rng(0)
        x32 = rng.standard_normal(shape, dtype=np.float32) * 2 + 1
        dy32 = rng.standard_normal(shape, dtype=np.float32)
        x, dy = x32.astype(npdt), dy32.astype(npdt)
        w = rng.uniform(0.5, 1.5, c).astype(np.float32) if affine else None
        b = rng.standard_normal(c).astype(np.float32) if affine else None
        _, saved = cnorm.layer_norm_forward(x, (c,), w, b, 1e-5, backend="cython")
        tdt = getattr(torch, dn)
        tx = torch.from_numpy(x32).to(tdt).requires_grad_(True)
        tdy = torch.from_numpy(dy32).to(tdt)
        tw = torch.from_numpy(w).to(tdt).requires_grad_(True) if affine else None
        tb = torch.from_numpy(b).to(tdt).requires_grad_(True) if affine else None
        ty = F.layer_norm(tx, (c,), tw, tb, 1e-5)
        del x32, dy32

        def c_call():
            cnorm.layer_norm_backward(dy, x, saved, w)

        def t_call():
            for t in (tx, tw, tb):
                if t is not None:
                    t.grad = None
            ty.backward(tdy, retain_graph=True)

        times = {"cnorm": [], "torch": []}
        for _ in range(args.repeat):
            for name, call in (("cnorm", c_call), ("torch", t_call)):
                call()  # absorbs the other library's spinning threads
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
        mc, mt = statistics.median(times["cnorm"]), statistics.median(times["torch"])
        print(f"{'x'.join(map(str, shape)):14s}{dn:>9s}{' affine' if affine else ' plain ':>8s}"
              f"  cnorm {mc * 1e3:8.1f} ms  torch {mt * 1e3:8.1f} ms  cnorm/torch {mc / mt:5.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
