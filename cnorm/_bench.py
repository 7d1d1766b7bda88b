"""``python -m cnorm bench``: cnorm's backends against PyTorch and the memory floor.

For every case (norm, direction, shape, layout) each backend is timed through
the public functional API at one thread count, and the report gives its median
time, its ratio to PyTorch's, and the fraction of the memory floor it
reaches. The floor is the time to move the bytes a fused kernel must move —
2 x bytes(x) for a forward (read x, write y), 3 x bytes(x) for a backward
(read x and dy, write dx), with bytes(x) counted in x's own dtype (half for
float16 and bfloat16 rows) — at the copy bandwidth measured in the same run:
each case times, as one more call in its interleaved rounds, a copy of its
own input (the same rotating copies, all threads, streaming stores), so the
floor sees the same memory, sizes and share of a shared machine's bandwidth
as the case (one copy at the start moved between 23 and 40 GB/s from run to
run). Inputs rotate among enough copies that the last-level cache cannot hold
them between calls. Every timed call is checked against the NumPy reference
first.

The same cases drive the pytest-benchmark suite in ``bench/``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

EPS = 1e-5


@dataclass(frozen=True)
class Case:
    """One benchmark case: a norm, a direction, a shape and a memory layout.

    ``shape`` is the logical NCHW-style shape for channels-first and the
    NHWC-style array shape for channels-last (as users pass it).
    """

    norm: str                 # batch_norm | layer_norm | group_norm | instance_norm
    direction: str            # fwd | bwd
    shape: tuple
    layout: str = "cf"        # cf | cl
    training: bool = True     # BatchNorm eval mode when False
    groups: int = 0           # GroupNorm's G
    latency: bool = False     # a per-call latency case: no floor
    dtype: str = "float32"    # float32 | bfloat16 | float16 (x, y, dy, dx; parameters stay float32)

    @property
    def name(self) -> str:
        """Human id used as the pytest-benchmark group and the report row."""
        mode = "" if self.training else "-eval"
        g = f"-G{self.groups}" if self.groups else ""
        dt = "" if self.dtype == "float32" else f"-{self.dtype}"
        return f"{self.norm}{mode}{g}-{self.direction}-{'x'.join(map(str, self.shape))}-{self.layout}{dt}"

    @property
    def np_dtype(self) -> np.dtype:
        from ._dtypes import BFLOAT16

        return BFLOAT16 if self.dtype == "bfloat16" else np.dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.np_dtype.itemsize

    @property
    def floor_factor(self) -> int:
        """Bytes moved by a fused kernel, in units of bytes(x)."""
        return 2 if self.direction == "fwd" else 3

    @property
    def channel_axis(self) -> int:
        return -1 if self.layout == "cl" else 1


def _pair(norm, shape, layout="cf", **kw):
    return [Case(norm, d, shape, layout, **kw) for d in ("fwd", "bwd")]


def issue_cases() -> list[Case]:
    """The cases issue 3 sets speed targets for (float32)."""
    return [
        *_pair("batch_norm", (32, 64, 56, 56)),
        *_pair("batch_norm", (32, 56, 56, 64), "cl"),
        *_pair("batch_norm", (32, 64, 56, 56), training=False),
        *_pair("batch_norm", (4096, 1024)),
        *_pair("layer_norm", (8192, 768)),
        *_pair("layer_norm", (2048, 4096)),
        *_pair("group_norm", (16, 256, 32, 32), groups=32),
        *_pair("group_norm", (16, 32, 32, 256), "cl", groups=32),
        *_pair("instance_norm", (16, 64, 128, 128)),
        Case("layer_norm", "fwd", (32, 64), latency=True),
    ]


def half_cases(dtypes=("bfloat16", "float16"), quick: bool = False) -> list[Case]:
    """The same cases with half-precision data (issue 5): float32 statistics and parameters."""
    from dataclasses import replace

    base = quick_cases() if quick else issue_cases()
    return [replace(c, dtype=dt) for dt in dtypes for c in base if not c.latency]


def quick_cases() -> list[Case]:
    """Smaller versions of every kernel path, for a CI smoke run."""
    return [
        *_pair("batch_norm", (8, 32, 28, 28)),
        *_pair("batch_norm", (8, 28, 28, 32), "cl"),
        Case("batch_norm", "fwd", (8, 32, 28, 28), training=False),
        *_pair("batch_norm", (512, 256)),
        *_pair("layer_norm", (1024, 768)),
        *_pair("group_norm", (4, 64, 16, 16), groups=8),
        *_pair("group_norm", (4, 16, 16, 64), "cl", groups=8),
        *_pair("instance_norm", (4, 16, 64, 64)),
        Case("layer_norm", "fwd", (32, 64), latency=True),
    ]


# -- inputs and calls ------------------------------------------------------------

@dataclass
class Inputs:
    """Rotating copies of x and dy plus the parameters of one case."""

    xs: list
    dys: list
    weight: np.ndarray
    bias: np.ndarray
    running_mean: np.ndarray | None = None
    running_var: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    cursor: int = 0

    def next(self) -> int:
        """The copy for the next call of any runner: one rotation shared by all of
        them, so a copy is used again only after every other copy (over twice
        the last-level cache) went through - cold for every backend alike. (Per-
        runner rotations let one backend's call find the copy another backend
        had just read still in cache.)"""
        self.cursor = (self.cursor + 1) % len(self.xs)
        return self.cursor


# Most bytes of input copies one case may hold (x and dy of every copy).
COPIES_BYTES = 2 << 30


def n_copies(case: Case, llc_bytes: int) -> int:
    """Copies so that one rotation (x and dy) moves over twice the LLC, whatever its
    size: a fixed cap (once 16 copies) let a 300 MB LLC hold the whole rotation,
    so that inputs and the floor's copy came from the cache, not memory."""
    if case.latency:
        return 4
    per = case.nbytes * (2 if case.direction == "bwd" else 1)
    return max(2, min(COPIES_BYTES // per, math.ceil(2 * llc_bytes / per) + 1))


def make_inputs(case: Case, copies: int, seed: int = 0) -> Inputs:
    rng = np.random.default_rng(seed)
    c = case.shape[-1] if (case.layout == "cl" or case.norm == "layer_norm") else case.shape[1]
    dt = case.np_dtype
    # copies of one draw: a rotation over twice a large LLC takes dozens of them, and
    # the caches see distinct addresses whatever the values
    x = (rng.standard_normal(case.shape, dtype=np.float32) * 2 + 1).astype(dt)
    xs = [x] + [x.copy() for _ in range(copies - 1)]
    dy = rng.standard_normal(case.shape, dtype=np.float32).astype(dt) if case.direction == "bwd" else None
    dys = [dy] + [dy.copy() for _ in range(copies - 1)] if dy is not None else []
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    inp = Inputs(xs, dys, w, b)
    if case.norm == "batch_norm" and not case.training:
        inp.running_mean = rng.standard_normal(c).astype(np.float32)
        inp.running_var = rng.uniform(0.5, 2.0, c).astype(np.float32)
    return inp


def _cnorm_forward(case: Case, inp: Inputs, x, backend, saved: bool = True):
    """``(y, saved)`` from the ``*_forward`` API; with ``saved=False`` the plain
    call (``cnorm.layer_norm`` ...) and ``(y, None)``: what a forward-only
    (inference) caller runs, as PyTorch does without autograd."""
    import cnorm

    fn = getattr(cnorm, case.norm + "_forward" if saved else case.norm)
    if case.norm == "batch_norm":
        rm = None if inp.running_mean is None else inp.running_mean.copy()
        rv = None if inp.running_var is None else inp.running_var.copy()
        out = fn(x, inp.weight, inp.bias, rm, rv, case.training, 0.1, EPS, case.channel_axis, backend)
    elif case.norm == "layer_norm":
        out = fn(x, (case.shape[-1],), inp.weight, inp.bias, EPS, backend)
    elif case.norm == "group_norm":
        out = fn(x, case.groups, inp.weight, inp.bias, EPS, case.channel_axis, backend)
    else:
        out = fn(x, inp.weight, inp.bias, None, None, True, 0.1, EPS, case.channel_axis, backend)
    return out if saved else (out, None)


def _cnorm_backward(case: Case, dy, x, saved, weight):
    import cnorm

    fn = getattr(cnorm, f"{case.norm}_backward")
    return fn(dy, x, saved, weight)


def cnorm_runner(case: Case, inp: Inputs, backend: str):
    """A zero-argument call that runs one cnorm call on the next copy, and its first result."""
    if case.direction == "fwd":
        def call():  # forward only, like PyTorch's timed call: no state kept for a backward
            i = inp.next()
            return _cnorm_forward(case, inp, inp.xs[i], backend, saved=False)[0]

        first = lambda: _cnorm_forward(case, inp, inp.xs[0], backend, saved=False)[0]  # noqa: E731
        return call, first
    saved = [_cnorm_forward(case, inp, x, backend)[1] for x in inp.xs]

    def call():
        i = inp.next()
        return _cnorm_backward(case, inp.dys[i], inp.xs[i], saved[i], inp.weight)[0]

    first = lambda: _cnorm_backward(case, inp.dys[0], inp.xs[0], saved[0], inp.weight)[0]  # noqa: E731
    return call, first


def torch_runner(case: Case, inp: Inputs):
    """Same as :func:`cnorm_runner` with PyTorch CPU (channels-last as a permuted NHWC view)."""
    import torch
    import torch.nn.functional as F

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[case.dtype]

    def from_numpy(a):
        if a.dtype == np.float32:
            return torch.from_numpy(a)
        return torch.from_numpy(a.astype(np.float32)).to(tdtype)  # setup only, not timed

    def tensor(a):
        t = from_numpy(a) if isinstance(a, np.ndarray) else a
        if case.layout == "cl":
            t = t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))  # NHWC memory, NCHW logical
        return t

    w, b = torch.from_numpy(inp.weight), torch.from_numpy(inp.bias)
    if case.norm == "layer_norm":  # PyTorch CPU layer_norm wants parameters in the input dtype
        w, b = w.to(tdtype), b.to(tdtype)
    if case.direction == "bwd":
        w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    rm = None if inp.running_mean is None else torch.from_numpy(inp.running_mean.copy())
    rv = None if inp.running_var is None else torch.from_numpy(inp.running_var.copy())

    def fwd(t):
        if case.norm == "batch_norm":
            return F.batch_norm(t, rm, rv, w, b, case.training, 0.1, EPS)
        if case.norm == "layer_norm":
            return F.layer_norm(t, (case.shape[-1],), w, b, EPS)
        if case.norm == "group_norm":
            return F.group_norm(t, case.groups, w, b, EPS)
        return F.instance_norm(t, weight=w, bias=b, eps=EPS)

    def to_numpy(t):
        t = t.detach()
        if case.layout == "cl":  # back to the NHWC array users passed
            t = t.permute(0, *range(2, t.dim()), 1)
        return t.contiguous().float().numpy()

    xs = [tensor(x) for x in inp.xs]
    if case.direction == "fwd":
        def call():
            i = inp.next()
            return fwd(xs[i])

        return call, lambda: to_numpy(fwd(xs[0]))
    # leaves in the user's layout; the norm sees their NCHW-logical views
    leaves = [from_numpy(a).requires_grad_(True) for a in inp.xs]
    with torch.enable_grad():
        outs = [fwd(tensor(leaf)) for leaf in leaves]
    grads = [tensor(dy) for dy in inp.dys]

    def call():
        i = inp.next()
        return torch.autograd.grad(outs[i], (leaves[i], w, b), grads[i], retain_graph=True)

    def first():
        dx = torch.autograd.grad(outs[0], (leaves[0], w, b), grads[0], retain_graph=True)[0]
        return dx.detach().float().numpy()  # the leaf has the user's (NHWC or NCHW) layout

    return call, first


def reference(case: Case, inp: Inputs) -> np.ndarray:
    """The NumPy backend's result on copy 0: what every row is checked against."""
    if case.direction == "fwd":
        return np.asarray(_cnorm_forward(case, inp, inp.xs[0], "numpy")[0])
    saved = _cnorm_forward(case, inp, inp.xs[0], "numpy")[1]
    return np.asarray(_cnorm_backward(case, inp.dys[0], inp.xs[0], saved, inp.weight)[0])


def tolerance(dtype) -> float:
    """Error allowed against the reference, relative to scale: float32 1e-4; half
    types two units in the last place (both sides round to the same format)."""
    return {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}.get(str(np.dtype(dtype)), 1e-4)


def check(got, want, what: str, tol: float = 1e-4) -> None:
    """Assert a result matches the reference to ``tol`` of its scale."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(want))))
    err = float(np.max(np.abs(got - want))) / scale
    if not err <= tol:
        raise AssertionError(f"{what}: max error {err:.2e} of scale {scale:.3g} vs the NumPy reference")


def runner(case: Case, inp: Inputs, backend: str):
    """(call, first) for a backend name: a cnorm backend or "torch"."""
    if backend == "torch":
        return torch_runner(case, inp)
    return cnorm_runner(case, inp, backend)


# -- machine facts -----------------------------------------------------------------

def cache_bytes(level: int, default: int) -> int:
    """Size of the CPU's cache of ``level`` from sysfs (Linux), else ``default``."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            with open(os.path.join(base, idx, "level")) as f:
                if int(f.read()) != level:
                    continue
            with open(os.path.join(base, idx, "size")) as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
            return int(s.rstrip("KMG")) * mult
    except OSError:
        pass
    return default


def machine() -> dict:
    """CPU model, cores, caches: recorded with every result."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "l2_bytes": cache_bytes(2, 1 << 20),
            "llc_bytes": cache_bytes(3, 32 << 20), "python": platform.python_version(),
            "numpy": np.__version__}


def copy_runner(inp: "Inputs", threads: int):
    """A zero-argument call that copies the next of the case's input copies into one
    output array (streaming stores, ``threads`` threads): the floor's reference."""
    from . import _cpu

    parallel_copy = _cpu.K.parallel_copy
    dst = np.empty_like(inp.xs[0])

    def call():
        i = inp.next()
        parallel_copy(inp.xs[i], dst, threads)

    return call


def copy_bandwidth(threads: int, nbytes: int = 256 << 20, repeat: int = 7) -> float:
    """Bytes per second (read + write) of a large array copy on ``threads`` threads."""
    from . import _cpu

    parallel_copy = _cpu.K.parallel_copy
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    parallel_copy(src, dst, threads)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        parallel_copy(src, dst, threads)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory instead of returning it to the OS.

    Otherwise every large output is a fresh mmap that the kernel zero-fills
    on first touch — as costly as a normalization itself — for every backend
    alike; a training loop's caching allocator does not pay it. Returns False
    where this is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        # mallopt takes a C int: 1 << 62 would truncate to 0 (trim everything), so use INT_MAX.
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1)))
    except (OSError, AttributeError):
        return False


# -- timing ------------------------------------------------------------------------

def time_calls(calls: dict, repeats: dict, budget_s: float) -> dict:
    """Seconds per call of each named zero-argument call, interleaved.

    One warm-up each, then rounds in which every call is timed once (tiny
    calls as a batch), until each has its ``repeats`` samples or the budget
    is spent (at least 3 samples each). Interleaving makes every backend see
    the same drift of a shared machine's load, so their ratios hold. Each
    sample follows one untimed call of the same backend: the OpenMP threads
    of the backend timed before it (PyTorch bundles its own runtime) spin for
    a while after its last call and would otherwise be timed too.
    """
    inner = {}
    for name, call in calls.items():
        call()
        t0 = time.perf_counter()
        call()
        dt = time.perf_counter() - t0
        inner[name] = max(1, int(2e-3 / max(dt, 1e-7))) if dt < 1e-4 else 1  # tiny calls: time batches
    times = {name: [] for name in calls}
    start = time.perf_counter()
    while True:
        pending = [n for n in calls if len(times[n]) < repeats[n]]
        if not pending or (time.perf_counter() - start > budget_s and min(map(len, times.values())) >= 3):
            return times
        for name in pending:
            call, k = calls[name], inner[name]
            call()  # absorbs the previous backend's spinning threads (see above)
            t0 = time.perf_counter()
            for _ in range(k):
                call()
            times[name].append((time.perf_counter() - t0) / k)


COPY = "memory copy"  # the floor's reference call in the timing rounds


def run_case(case: Case, backends, threads: int, repeat: int, budget_s: float,
             llc_bytes: int) -> dict:
    inp = make_inputs(case, n_copies(case, llc_bytes))
    want = reference(case, inp)
    row = {"case": case.name, "norm": case.norm, "direction": case.direction, "shape": list(case.shape),
           "layout": case.layout, "bytes": case.nbytes, "latency": case.latency, "results": {}}
    calls = {} if case.latency else {COPY: copy_runner(inp, threads)}
    for name in backends:
        try:
            call, first = runner(case, inp, name)
            got = first()
        except (RuntimeError, TypeError) as exc:  # e.g. a PyTorch CPU kernel missing for a half type
            if name != "torch":
                raise
            print(f"  {case.name}: no torch row ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})",
                  file=sys.stderr)
            continue
        # PyTorch's half kernels round intermediates (and bfloat16 parameter
        # gradients) to the half type: its rows get a sanity bound, not cnorm's.
        tol = tolerance(case.np_dtype) if name != "torch" or case.dtype == "float32" else 2.0 ** -5
        check(got, want, f"{case.name} [{name}]", tol)
        calls[name] = call
    repeats = {name: repeat if name != "numpy" else max(3, repeat // 3) for name in calls}
    timed = time_calls(calls, repeats, budget_s)
    floor = None
    if not case.latency:
        row["copy_bandwidth_Bps"] = 2 * case.nbytes / statistics.median(timed.pop(COPY))
        floor = case.floor_factor * case.nbytes / row["copy_bandwidth_Bps"]
    row["floor_s"] = floor
    for name, times in timed.items():
        med = statistics.median(times)
        row["results"][name] = {"median_s": med, "min_s": min(times), "n": len(times),
                                "floor_fraction": None if case.latency else floor / med}
    ref = row["results"].get("torch")
    for name in backends:  # a backend without a row (torch lacking a half kernel)
        row["results"].setdefault(name, {"median_s": float("nan"), "min_s": float("nan"), "n": 0,
                                         "floor_fraction": None})
    for r in row["results"].values():
        r["speedup_vs_torch"] = (ref["median_s"] / r["median_s"]) if ref else None
    return row


def format_table(rows, backends) -> str:
    head = f"{'case':44s}" + "".join(f"{b + ' ms':>12s}" for b in backends)
    head += "".join(f"{'x torch ' + b:>16s}" for b in backends if b != "torch")
    head += "".join(f"{'floor ' + b:>13s}" for b in backends)
    lines = [head, "-" * len(head)]
    for row in rows:
        res = row["results"]
        unit = 1e6 if row["latency"] else 1e3
        line = f"{row['case'] + (' (us)' if row['latency'] else ''):44s}"
        line += "".join(f"{res[b]['median_s'] * unit:12.2f}" if res[b]["n"] else f"{'-':>12s}"
                        for b in backends)
        for b in backends:
            if b != "torch":
                s = res[b]["speedup_vs_torch"]
                line += f"{s:16.2f}" if s else f"{'-':>16s}"
        for b in backends:
            f = res[b]["floor_fraction"]
            line += f"{f:13.0%}" if f else f"{'-':>13s}"
        lines.append(line)
    return "\n".join(lines)


def plot(rows, backends, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["case"] for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.7 * len(rows)), 10), sharex=True)
    width = 0.8 / len(backends)
    xs = np.arange(len(rows))
    for i, b in enumerate(backends):
        sp = [r["results"][b]["speedup_vs_torch"] or 0 for r in rows]
        fl = [r["results"][b]["floor_fraction"] or 0 for r in rows]
        axes[0].bar(xs + i * width, sp, width, label=b)
        axes[1].bar(xs + i * width, fl, width, label=b)
    axes[0].set_yscale("log")
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylabel("speed relative to PyTorch (higher is faster)")
    axes[1].axhline(0.75, color="k", lw=0.8, ls="--")
    axes[1].set_ylabel("fraction of memory floor")
    axes[1].set_xticks(xs + 0.4 - width / 2)
    axes[1].set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    """Run the benchmark; see ``python -m cnorm bench --help``."""
    parser = argparse.ArgumentParser(prog="python -m cnorm bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_results", help="output folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="small cases, few repeats (CI smoke)")
    parser.add_argument("--threads", type=int, default=None, help="threads for every backend (default: all)")
    parser.add_argument("--backends", default="numpy,cython,torch",
                        help="comma-separated; cnorm backend names and 'torch' (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per backend and case")
    parser.add_argument("--filter", default="", help="run only cases whose name contains this")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16",
                        help="comma-separated data dtypes; half rows reuse the float32 cases (default: %(default)s)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's default policy: large outputs are fresh, zero-filled pages each call")
    parser.add_argument("--cpu-capability", default=None, metavar="LEVEL",
                        help="run cnorm's kernels at this CPU level (baseline, avx2, avx512) and PyTorch at "
                             "the matching ATEN_CPU_CAPABILITY (default, avx2, avx512); default: the level "
                             "cnorm chose for this CPU")
    args = parser.parse_args(argv)

    import cnorm

    from . import _cpu

    level = args.cpu_capability or _cpu.get_cpu_capability()
    if args.cpu_capability is not None and level not in _cpu.usable_levels():
        print(f"--cpu-capability: expected one of the levels compiled and supported here "
              f"({', '.join(_cpu.usable_levels()) or 'none'}), got {level!r}", file=sys.stderr)
        return 2
    threads = args.threads or cnorm.get_num_threads()
    cnorm.set_num_threads(threads)
    backends = [b for b in args.backends.split(",") if b]
    if "torch" in backends and not _torch_at_level(level, threads):
        backends.remove("torch")
    missing = [b for b in backends if b != "torch" and b not in cnorm.available_backends()]
    if missing:
        print(f"backends not available here: {missing}", file=sys.stderr)
        return 2
    kept = False if args.system_malloc else keep_freed_memory()
    # NumPy's BLAS is not used by any case; its idle worker threads would only compete for the cores
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"), \
            (_cpu.use_level(level) if level is not None else contextlib.nullcontext()):
        return _run(args, backends, threads, kept)


def _torch_at_level(level, threads: int) -> bool:
    """Import PyTorch with ATEN_CPU_CAPABILITY matching cnorm's level (read by PyTorch
    at its first CPU kernel, so set before the import); False if it is not installed.
    A PyTorch that chose another level (it runs no higher than this CPU supports)
    is reported, not hidden."""
    from ._cpu import ATEN_CAPABILITY

    want = ATEN_CAPABILITY.get(level)
    if want is not None:
        if "torch" in sys.modules and os.environ.get("ATEN_CPU_CAPABILITY", "").lower() != want:
            print(f"PyTorch was imported before the benchmark set ATEN_CPU_CAPABILITY={want}: "
                  "its rows may run at another level", file=sys.stderr)
        os.environ["ATEN_CPU_CAPABILITY"] = want
    try:
        import torch
    except ImportError:
        print("torch is not installed: no PyTorch rows", file=sys.stderr)
        return False
    torch.set_num_threads(threads)
    got = torch.backends.cpu.get_cpu_capability().lower()
    if want is not None and got != want:
        print(f"PyTorch runs at {got}, not {want}", file=sys.stderr)
    return True


def _run(args, backends, threads: int, kept: bool) -> int:
    """The cases of ``args`` on ``backends``: progress lines, the table, bench.json and bench.png."""
    info = machine()
    dtypes = [d for d in args.dtypes.split(",") if d]
    cases = (quick_cases() if args.quick else issue_cases()) if "float32" in dtypes else []
    halves = tuple(d for d in dtypes if d != "float32")
    cases += half_cases(halves, args.quick) if halves else []
    cases = [c for c in cases if args.filter in c.name]
    repeat = args.repeat or (5 if args.quick else 15)
    budget = 1.0 if args.quick else 4.0
    bandwidth = copy_bandwidth(threads)
    levels = cpu_levels(backends)
    print(f"{info['cpu']}, {info['cores']} cores, threads={threads}, copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s at the start (each case's floor uses its own), "
          f"freed memory kept: {kept}")
    print(f"CPU level: cnorm {levels['cnorm']}, PyTorch {levels['torch'] or '-'}")
    rows = []
    for case in cases:
        rows.append(run_case(case, backends, threads, repeat, budget, info["llc_bytes"]))
        print(f"  {case.name}: " + ", ".join(f"{b} {r['median_s'] * 1e3:.3f} ms"
                                              for b, r in rows[-1]["results"].items()), flush=True)
    print()
    print(format_table(rows, backends))
    os.makedirs(args.out, exist_ok=True)
    result = {"machine": info, "threads": threads, "copy_bandwidth_Bps": bandwidth, "cpu_capability": levels,
              "freed_memory_kept": kept, "backends": backends, "quick": args.quick,
              "torch": _torch_version(), "cases": rows}
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, backends, os.path.join(args.out, "bench.png"))
    print(f"\nwrote {os.path.join(args.out, 'bench.json')} and bench.png")
    return 0


def cpu_levels(backends) -> dict:
    """The CPU level each library runs at in this process: cnorm's kernels and
    PyTorch's (its ATEN_CPU_CAPABILITY names)."""
    from . import _cpu

    torch_level = None
    if "torch" in backends:
        import torch

        torch_level = torch.backends.cpu.get_cpu_capability().lower()
    return {"cnorm": _cpu.get_cpu_capability(), "torch": torch_level}


def _torch_version():
    try:
        import torch

        return torch.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
