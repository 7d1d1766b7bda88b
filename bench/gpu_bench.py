"""GPU benchmark: cnorm's "cupy" kernels against PyTorch CUDA on the same device.

Times each kernels-issue case plus two that fill a large GPU (LayerNorm
(65536, 4096) and BatchNorm (256, 64, 112, 112)), forward and backward, with
CUDA events (median of repeated runs after warm-up), at the Backend level:
the front end's per-call work is host-side validation that does not touch
the data. Inputs rotate among copies so that repeated runs do not hit L2.
Achieved bandwidth counts the memory floor (forward: read x, write y;
backward: read x and dy, write dx) and is compared with a device-to-device
copy measured in the same run. Each case also checks cnorm's output against
PyTorch's.

Two times per case and library: "per call", events around each call as a
user sees it (host-side launch work included, which dominates small cases),
and "device", the GPU time alone: a spin kernel holds the stream while the
host queues `reps` calls, so the events time the calls back to back with no
host gaps. Bandwidth percentages use the device time. A second table times
the per-sample row kernels' variants (vectors per thread, registers or
shared memory) on the LayerNorm/GroupNorm/InstanceNorm forward cases.

Usage::

    python bench/gpu_bench.py [--json results.json] [--reps 30] [--quick]

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np


def median_ms(fn, cp, reps, warmup=3):
    """Median time of ``fn()`` in ms with CUDA events on CuPy's current stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


SPIN_SRC = r'''
extern "C" __global__ void cnorm_spin(long long cycles) {
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) {
    }
}
'''
_SPIN = {}


def device_ms(fn, cp, reps, host_ms):
    """GPU time of ``fn()`` in ms: ``reps`` calls queued behind a spin kernel, timed back to back."""
    if "k" not in _SPIN:
        _SPIN["k"] = cp.RawKernel(SPIN_SRC, "cnorm_spin")
        _SPIN["hz"] = cp.cuda.Device().attributes["ClockRate"] * 1e3  # kHz -> Hz
    fn()
    # Hold the stream long enough for the host to queue every call (2x its per-call time, + 2 ms).
    cycles = int(_SPIN["hz"] * (2 * host_ms * reps + 2.0) / 1e3)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    _SPIN["k"]((1,), (1,), (np.int64(cycles),))
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) / reps


def copy_bandwidth(cp, reps):
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    n = 1 << 28  # 1 GiB of float32
    src = cp.random.standard_normal(n, dtype=cp.float32)
    dst = cp.empty_like(src)
    ms = median_ms(lambda: cp.copyto(dst, src), cp, reps)
    del src, dst
    return 2 * n * 4 / ms / 1e6


def cases(quick):
    """(label, norm, torch shape, layout, dtype) of every benchmarked case."""
    out = [
        ("BatchNorm train", "bn", (32, 64, 56, 56), "cf", "float32"),
        ("BatchNorm train NHWC", "bn", (32, 64, 56, 56), "cl", "float32"),
        ("BatchNorm eval", "bn_eval", (32, 64, 56, 56), "cf", "float32"),
        ("BatchNorm1d", "bn", (4096, 1024), "cl", "float32"),
        ("LayerNorm", "ln", (8192, 768), "cl", "float32"),
        ("LayerNorm", "ln", (2048, 4096), "cl", "float32"),
        ("GroupNorm G=32", "gn", (16, 256, 32, 32), "cf", "float32"),
        ("GroupNorm G=32 NHWC", "gn", (16, 256, 32, 32), "cl", "float32"),
        ("InstanceNorm", "in", (16, 64, 128, 128), "cf", "float32"),
        ("LayerNorm (latency)", "ln", (32, 64), "cl", "float32"),
        ("LayerNorm large", "ln", (65536, 4096), "cl", "float32"),
        ("BatchNorm large", "bn", (256, 64, 112, 112), "cf", "float32"),
        ("LayerNorm large", "ln", (65536, 4096), "cl", "float16"),
        ("BatchNorm large", "bn", (256, 64, 112, 112), "cf", "float16"),
    ]
    if quick:
        out = [c for c in out if "large" not in c[0]]
    return out


def problem_of(norm, shape, layout):
    """The Problem and 3-D shape cnorm's front end makes for this case."""
    from cnorm.backends.base import Problem

    n, c = shape[0], shape[1]
    s = math.prod(shape[2:])
    if norm == "ln":
        return Problem("cl", n, c, 1, 1)
    groups = {"bn": 0, "bn_eval": 0, "gn": 32, "in": c}[norm]
    return Problem(layout, n, c, s, groups)


# Per-sample forward cases whose row-kernel variants are timed: (label, norm, shape, layout, dtype).
VARIANT_CASES = [
    ("LayerNorm large", "ln", (65536, 4096), "cl", "float32"),
    ("LayerNorm large", "ln", (65536, 4096), "cl", "float16"),
    ("LayerNorm", "ln", (8192, 768), "cl", "float32"),
    ("InstanceNorm", "in", (16, 64, 128, 128), "cf", "float32"),
    ("GroupNorm G=32", "gn", (16, 256, 32, 32), "cf", "float32"),
    ("GroupNorm G=32 NHWC", "gn", (16, 256, 32, 32), "cl", "float32"),
]
# (name, backend attributes): register rows aiming at 1, 2, 4, 8 vectors per thread; shared-memory rows.
VARIANTS = [("regs items=1", {"row_items": 1}), ("regs items=2", {"row_items": 2}),
            ("regs items=4", {"row_items": 4}), ("regs items=8", {"row_items": 8}),
            ("smem rows", {"row_registers": False})]


def run_variants(cp, backend, label, norm, shape, layout, dtype_name, reps, copy_gbs):
    """Forward device time of each row-kernel variant on one case."""
    p = problem_of(norm, shape, layout)
    dtype = np.dtype(dtype_name)
    sd = np.float32 if dtype != np.float64 else np.float64
    nbytes = math.prod(shape) * dtype.itemsize
    copies = max(1, min(8, math.ceil(256e6 / nbytes)))
    rng = cp.random.default_rng(1)
    xs = [(rng.standard_normal(p.shape3, dtype=cp.float32) * 2 + 1).astype(dtype) for _ in range(copies)]
    w = (rng.random(p.c, dtype=cp.float32) + 0.5).astype(sd)
    b = rng.standard_normal(p.c, dtype=cp.float32).astype(sd)
    out = {"case": label, "shape": list(shape), "layout": layout, "dtype": dtype_name}
    k = [0]

    def step():
        backend.forward_train(xs[k[0] % copies], p, w, b, 1e-5)
        k[0] += 1

    ref = None
    for name, attrs in VARIANTS:
        for a, v in attrs.items():
            setattr(backend, a, v)
        try:
            y = backend.forward_train(xs[0], p, w, b, 1e-5)[0]
            if ref is None:
                ref = y
            err = float(cp.abs(y.astype(cp.float32) - ref.astype(cp.float32)).max())
            host = median_ms(step, cp, max(3, reps // 4))
            ms = device_ms(step, cp, reps, host)
            out[name] = {"ms": ms, "pct_copy": 100 * 2 * nbytes / ms / 1e6 / copy_gbs, "max_diff": err}
        finally:
            for a in attrs:
                delattr(backend, a)
    return out


def run_case(cp, torch, backend, label, norm, shape, layout, dtype_name, reps, copy_gbs):
    import torch.nn.functional as F

    p = problem_of(norm, shape, layout)
    dtype = np.dtype(dtype_name)
    sd = np.float32 if dtype != np.float64 else np.float64
    nbytes = math.prod(shape) * dtype.itemsize
    copies = max(1, min(8, math.ceil(256e6 / nbytes)))  # > 2x L2 per rotation
    rng = cp.random.default_rng(0)
    xs = [(rng.standard_normal(p.shape3, dtype=cp.float32) * 2 + 1).astype(dtype) for _ in range(copies)]
    dys = [rng.standard_normal(p.shape3, dtype=cp.float32).astype(dtype) for _ in range(copies)]
    w = (rng.random(p.c, dtype=cp.float32) + 0.5).astype(sd)
    b = rng.standard_normal(p.c, dtype=cp.float32).astype(sd)
    eps = 1e-5

    # Torch tensors sharing the same memory, in the case's logical shape and memory format.
    def to_torch(a3):
        t = torch.from_dlpack(a3)
        if norm == "ln":
            return t.view(shape)
        if layout == "cf":
            return t.view(shape)
        # (N, S, C) storage seen as an NCHW tensor in channels-last memory format.
        return t.view(shape[0], *shape[2:], shape[1]).movedim(-1, 1)

    txs = [to_torch(a).requires_grad_(True) for a in xs]
    tdys = [to_torch(a) for a in dys]
    tw = torch.from_dlpack(w).to(txs[0].dtype if norm == "ln" else torch.float32).requires_grad_(True)
    tb = torch.from_dlpack(b).to(tw.dtype).requires_grad_(True)
    rm = torch.zeros(p.c, device="cuda")
    rv = torch.ones(p.c, device="cuda")

    def torch_fwd(tx):
        if norm == "bn":
            return F.batch_norm(tx, rm, rv, tw, tb, training=True, momentum=0.1, eps=eps)
        if norm == "bn_eval":
            return F.batch_norm(tx, rm, rv, tw, tb, training=False, eps=eps)
        if norm == "ln":
            return F.layer_norm(tx, (shape[-1],), tw, tb, eps)
        if norm == "gn":
            return F.group_norm(tx, 32, tw, tb, eps)
        return F.instance_norm(tx, weight=tw, bias=tb, eps=eps)

    scale = (w / cp.sqrt(cp.ones(p.c, dtype=sd) + eps)).astype(sd)
    shift = b

    def cn_fwd(i):
        if norm == "bn_eval":
            return backend.forward_eval(xs[i], p, scale, shift), None, None
        y, mean, _, rstd = backend.forward_train(xs[i], p, w, b, eps)
        return y, mean, rstd

    saved = [cn_fwd(i) for i in range(copies)]

    def cn_bwd(i):
        _, mean, rstd = saved[i]
        if norm == "bn_eval":
            ones = cp.ones(p.c, dtype=sd)
            return backend.backward_eval(dys[i], xs[i], p, cp.zeros(p.c, dtype=sd), ones / cp.sqrt(ones + eps), w)
        return backend.backward_train(dys[i], xs[i], p, mean, rstd, w)

    tys = [torch_fwd(tx) for tx in txs]
    # Correctness: the first copy, against PyTorch.
    y_cn = torch.from_dlpack(saved[0][0]).float()
    y_t = tys[0].detach().float()
    if layout == "cl" and norm != "ln":
        y_t = y_t.movedim(1, -1).reshape(y_cn.shape)
    else:
        y_t = y_t.reshape(y_cn.shape)
    err_y = ((y_cn - y_t).abs().max() / y_t.abs().max()).item()
    dx_cn = torch.from_dlpack(cn_bwd(0)[0]).float()
    dx_t = torch.autograd.grad(tys[0], txs[0], tdys[0], retain_graph=True)[0].float()
    dx_t = (dx_t.movedim(1, -1) if layout == "cl" and norm != "ln" else dx_t).reshape(dx_cn.shape)
    err_dx = ((dx_cn - dx_t).abs().max() / dx_t.abs().max()).item()

    k = [0]

    def rot(fn):
        def step():
            fn(k[0] % copies)
            k[0] += 1
        return step

    params = [tw, tb] if norm != "bn_eval" else []
    res = {
        "case": label, "shape": list(shape), "layout": layout, "dtype": dtype_name,
        "err_y_vs_torch": err_y, "err_dx_vs_torch": err_dx,
    }
    fns = {
        "cnorm_fwd": rot(cn_fwd),
        "torch_fwd": rot(lambda i: torch_fwd(txs[i])),
        "cnorm_bwd": rot(cn_bwd),
        "torch_bwd": rot(lambda i: torch.autograd.grad(tys[i], [txs[i], *params], tdys[i], retain_graph=True)),
    }
    for key, fn in fns.items():
        res[f"{key}_ms"] = median_ms(fn, cp, reps)
        res[f"{key}_dev_ms"] = device_ms(fn, cp, reps, res[f"{key}_ms"])
    # A device-to-device copy of x itself (the same rotation): the bandwidth a kernel of
    # this size can reach, launch and tail included.
    dst = cp.empty_like(xs[0])
    copy_fn = rot(lambda i: cp.copyto(dst, xs[i]))
    res["copy_x_dev_ms"] = device_ms(copy_fn, cp, reps, median_ms(copy_fn, cp, reps))
    del dst
    for d, floor in (("fwd", 2 * nbytes), ("bwd", 3 * nbytes)):
        for who in ("cnorm", "torch"):
            res[f"{who}_{d}_pct_copy"] = 100 * floor / res[f"{who}_{d}_dev_ms"] / 1e6 / copy_gbs
        # the same against the same-size copy (backward moves 1.5 times a copy's bytes)
        res[f"cnorm_{d}_pct_copy_x"] = 100 * res["copy_x_dev_ms"] * floor / (2 * nbytes) / res[f"cnorm_{d}_dev_ms"]
    return res


def table(results, copy_gbs, device):
    lines = [
        f"Device: {device}; device-to-device copy {copy_gbs:.0f} GB/s (read + write).",
        "",
        "Per call: CUDA events around each call, host launch work included. Device: the GPU time",
        "of calls queued back to back (no host gaps); the % of copy columns use it. \"% of x copy\":",
        "against a device-to-device copy of x itself (same size, so the same launch and tail costs).",
        "",
        "| case | shape | layout | dtype | dir | cnorm ms per call | torch ms per call | speed-up per call "
        "| cnorm ms device | torch ms device | speed-up device | cnorm % of copy | torch % of copy "
        "| cnorm % of x copy | err vs torch |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        for d in ("fwd", "bwd"):
            cn, t = r[f"cnorm_{d}_ms"], r[f"torch_{d}_ms"]
            cnd, td = r[f"cnorm_{d}_dev_ms"], r[f"torch_{d}_dev_ms"]
            err = r["err_y_vs_torch"] if d == "fwd" else r["err_dx_vs_torch"]
            lines.append(
                f"| {r['case']} | {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['dtype']} | {d} | "
                f"{cn:.4f} | {t:.4f} | {t / cn:.2f}x | {cnd:.4f} | {td:.4f} | {td / cnd:.2f}x | "
                f"{r[f'cnorm_{d}_pct_copy']:.0f}% | {r[f'torch_{d}_pct_copy']:.0f}% | "
                f"{r[f'cnorm_{d}_pct_copy_x']:.0f}% | {err:.1e} |")
    return "\n".join(lines)


def variant_table(variants):
    names = [n for n, _ in VARIANTS]
    lines = [
        "Row-kernel variants, forward, device time in ms (% of copy); max |y diff| to the first variant",
        "below 1e-4 (float32) or 1e-2 (float16) unless marked.",
        "",
        "| case | shape | layout | dtype | " + " | ".join(names) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    for v in variants:
        cells = []
        for n in names:
            r = v.get(n)
            if r is None:
                cells.append("-")
                continue
            mark = "" if r["max_diff"] < (1e-4 if v["dtype"] == "float32" else 1e-2) else f" diff {r['max_diff']:.1e}"
            cells.append(f"{r['ms']:.4f} ({r['pct_copy']:.0f}%){mark}")
        lines.append(f"| {v['case']} | {'x'.join(map(str, v['shape']))} | {v['layout']} | {v['dtype']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="skip the two large cases")
    ap.add_argument("--no-variants", action="store_true", help="skip the row-kernel variants table")
    args = ap.parse_args(argv)

    import cupy as cp
    import torch

    from cnorm.backends import get_backend_instance

    backend = get_backend_instance("cupy")
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    device = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    copy_gbs = copy_bandwidth(cp, args.reps)
    results = []
    failed = []
    for label, norm, shape, layout, dtype in cases(args.quick):
        try:
            r = run_case(cp, torch, backend, label, norm, shape, layout, dtype, args.reps, copy_gbs)
        except Exception as exc:  # noqa: BLE001 - report and go on: one failing case must not lose the table
            print(f"{label} {shape} {layout} {dtype}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            failed.append(label)
            cp.get_default_memory_pool().free_all_blocks()
            continue
        results.append(r)
        print(f"{label} {shape} {layout} {dtype}: per call fwd {r['cnorm_fwd_ms']:.4f} vs {r['torch_fwd_ms']:.4f} ms, "
              f"bwd {r['cnorm_bwd_ms']:.4f} vs {r['torch_bwd_ms']:.4f} ms; device fwd {r['cnorm_fwd_dev_ms']:.4f} vs "
              f"{r['torch_fwd_dev_ms']:.4f} ({r['cnorm_fwd_pct_copy']:.0f}% of copy), bwd {r['cnorm_bwd_dev_ms']:.4f} "
              f"vs {r['torch_bwd_dev_ms']:.4f}", file=sys.stderr, flush=True)
        cp.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()
    variants = []
    if not args.no_variants:
        for label, norm, shape, layout, dtype in VARIANT_CASES:
            if args.quick and "large" in label:
                continue
            try:
                variants.append(run_variants(cp, backend, label, norm, shape, layout, dtype, args.reps, copy_gbs))
                print(f"variants {label} {shape} {dtype}: " + ", ".join(
                    f"{n} {v['ms']:.4f}" for n, v in variants[-1].items() if isinstance(v, dict)),
                    file=sys.stderr, flush=True)
            except Exception as exc:  # noqa: BLE001 - a failing variant must not lose the main table
                print(f"variants {label} {shape} {dtype}: {type(exc).__name__}: {exc}", file=sys.stderr)
            cp.get_default_memory_pool().free_all_blocks()
    text = table(results, copy_gbs, device)
    if variants:
        text += "\n\n" + variant_table(variants)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "copy_gbs": copy_gbs, "results": results, "variants": variants}, f,
                      indent=1)
    bad = [r["case"] for r in results if max(r["err_y_vs_torch"], r["err_dx_vs_torch"]) > 5e-2] + failed
    if bad:
        print(f"cnorm disagrees with PyTorch on: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
