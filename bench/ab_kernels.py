"""Interleaved A/B timing of kernel modules: CPU levels of this build against
each other, or against another build's kernels module.

    python bench/ab_kernels.py --levels avx512,avx2 [--other DIR] [--filter layer_norm]

Every variant runs the benchmark's cases through the public API with the
"cython" backend's kernels module swapped (cnorm._cpu.K), in interleaved
rounds on the same rotating inputs, so a shared machine's drift hits all
variants alike. ``--other DIR`` adds the kernels module found in DIR (a
``_kernels*.so`` built from another checkout with the same Python wrapper
signatures), named ``other``. Prints the median (``--stat min``: the best)
ms per variant and the ratio of each to the first.

It compares kernels, not what a user's loop pays: glibc keeps freed memory
(``_bench.keep_freed_memory``, mallopt), so that no variant's time includes
the page faults of a fresh output array (``python -m cnorm bench`` runs with
glibc's default policy, unless ``--keep-freed-memory``). The first line of
the output says so.
"""

from __future__ import annotations

import argparse
import glob
import importlib.machinery
import importlib.util
import os
import statistics
import sys

import numpy as np


def load_other(folder: str):
    """The kernels module of another build: the one ``_kernels*.so`` in ``folder``."""
    paths = glob.glob(os.path.join(folder, "_kernels*.so"))
    if len(paths) != 1:
        raise SystemExit(f"--other: expected one _kernels*.so in {folder}, found {paths}")
    name = os.path.basename(paths[0]).split(".")[0]  # PyInit_<name> must match
    loader = importlib.machinery.ExtensionFileLoader(name, paths[0])
    spec = importlib.util.spec_from_loader(name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def extra_cases(dtypes):
    """Per-sample backward cases the issue's set lacks, in each of ``dtypes``."""
    from cnorm._bench import Case

    out = []
    for dt in dtypes:
        if dt == "float32":
            out.append(Case("layer_norm", "bwd", (32, 64), latency=True))
        out += [Case("layer_norm", "bwd", shape, dtype=dt)
                for shape in ((256, 16384), (64, 32768), (8, 1 << 20), (1, 1 << 24))]
        out.append(Case("group_norm", "bwd", (64, 65536), groups=64, dtype=dt))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="avx512,avx2,baseline", help="levels of this build to compare")
    parser.add_argument("--other", default=None, help="folder holding another build's _kernels*.so")
    parser.add_argument("--filter", default="", help="only cases whose name contains this")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="per-variant statistic (min: on a machine shared with other work, where a "
                             "descheduled thread stretches a parallel region by a time slice)")
    parser.add_argument("--extra", action="store_true",
                        help="add per-sample backward cases outside the issue's set: per-token and "
                             "long LayerNorm rows, GroupNorm on (N, C)")
    args = parser.parse_args(argv)

    import cnorm
    from cnorm import _bench, _cpu

    cnorm.set_num_threads(args.threads)
    levels = {}
    for lv in [lv for lv in args.levels.split(",") if lv]:
        mod = _cpu.kernel_module(lv)
        if mod is None:
            raise SystemExit(f"level {lv} is not compiled or not supported here")
        levels[lv] = mod
    # The other build only after this build's levels: an extension module of the
    # same file name loaded first would be returned again for the level's import
    # (seen with --levels avx2: both variants were the other build's module).
    variants = {"other": load_other(args.other)} if args.other else {}
    variants.update(levels)
    if args.other and any(mod is variants["other"] for mod in levels.values()):
        raise SystemExit("--other: the other build's module is one of this build's levels")
    dtypes = [d for d in args.dtypes.split(",") if d]
    cases = _bench.issue_cases() if "float32" in dtypes else []
    halves = tuple(d for d in dtypes if d != "float32")
    cases += _bench.half_cases(halves) if halves else []
    if args.extra:
        cases += extra_cases(dtypes)
    cases = [c for c in cases if args.filter in c.name]
    kept = _bench.keep_freed_memory()  # kernels alone: no page faults of fresh outputs (see the docstring)
    print(f"allocator: {_bench.ALLOCATOR[kept]}")
    llc = _bench.machine()["llc_bytes"]
    names = list(variants)
    print(f"{'case':52s}" + "".join(f"{n + ' ms':>12s}" for n in names)
          + "".join(f"{n + '/' + names[0]:>16s}" for n in names[1:]))
    for case in cases:
        inp = _bench.make_inputs(case, _bench.n_copies(case, llc))
        want = _bench.reference(case, inp)
        calls = {}
        for name, mod in variants.items():
            _cpu.K = mod
            call, first = _bench.cnorm_runner(case, inp, "cython")
            _bench.check(first(), want, f"{case.name} [{name}]", _bench.tolerance(case.np_dtype))

            def timed(call=call, mod=mod):
                _cpu.K = mod
                return call()

            calls[name] = timed
        times = _bench.time_calls(calls, {n: args.repeat for n in calls}, budget_s=6.0)
        stat = min if args.stat == "min" else statistics.median
        med = {n: stat(t) for n, t in times.items()}
        unit = 1e6 if case.latency else 1e3
        print(f"{case.name + (' (us)' if case.latency else ''):52s}"
              + "".join(f"{med[n] * unit:12.3f}" for n in names)
              + "".join(f"{med[n] / med[names[0]]:16.2f}" for n in names[1:]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
