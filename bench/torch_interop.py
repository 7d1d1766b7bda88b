"""cnorm inside PyTorch: the adapters' per-call overhead and a CPU training step of two models.

    python bench/torch_interop.py [--threads 2] [--budget 20] [--models resnet,transformer] [--channels-last]
                                  [--compile]

What it times: see cnorm/_bench_torch.py (``python -m cnorm bench --pytorch``
runs the same at the benchmark's thread count and CPU level). ``--compile``:
the training steps of both variants under ``torch.compile`` (the first steps,
which compile, untimed). Set the CPU
level with CNORM_CPU_CAPABILITY and ATEN_CPU_CAPABILITY (e.g. avx2 for both).
Run it from the checkout with ``PYTHONPATH=.``.
"""

from __future__ import annotations

import argparse
import os

import torch

import cnorm
from cnorm import _bench_torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per comparison")
    parser.add_argument("--models", default="resnet,transformer")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-overhead", action="store_true")
    parser.add_argument("--compile", action="store_true", help="the models under torch.compile")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cnorm.set_num_threads(args.threads)
    print(f"cnorm {cnorm.__version__} at {cnorm.get_cpu_capability()}, torch {torch.__version__} "
          f"(ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'default')}, "
          f"{torch.backends.cpu.get_cpu_capability()}), {args.threads} threads")
    _bench_torch.run(args.budget, [m for m in args.models.split(",") if m], args.channels_last,
                     not args.no_overhead, args.compile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
