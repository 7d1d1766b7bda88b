"""Two pytest-benchmark groups per (norm, direction, shape, layout), at the same
thread count: ``<case>`` with the plain calls of numpy, cython and torch (each
allocates its output), ``<case> [out]`` with the out variants of cython and
torch (the same call writing into a buffer reused across calls: cnorm's
``out=``, PyTorch's ``aten`` ``.out`` overload; where PyTorch has none, as for
instance_norm, its plain call, with ``out_variant`` False in extra_info).
Fused cases (RMSNorm, add+norm, norm+activation) add ``unfused``: cnorm's
own unfused sequence of the same work (for RMSNorm, LayerNorm on the shape).

Run with ``pytest bench --benchmark-group-by=group`` (``--bench-quick`` for
the small cases, ``--bench-keep-freed-memory`` for glibc keeping freed memory;
the default is glibc's own policy; ``--bench-out-buffers one`` for one out
buffer reused by every call instead of one per input copy). Every case runs
in this one process: under glibc's default policy whether a plain call's
output is page-faulted depends on what was freed before (``python -m cnorm
bench --isolate`` runs each case in a fresh process). Each benchmark checks its result against
the NumPy reference before timing; inputs rotate among copies larger than the
last-level cache.
"""

import pytest

from cnorm import _bench

# (backend, variant): the NumPy reference is timed plain only
VARIANTS = [("numpy", "plain"), ("cython", "plain"), ("torch", "plain"), ("cython", "out"), ("torch", "out"),
            ("unfused", "plain")]
_inputs = {}


def _case_inputs(case, llc):
    if case not in _inputs:
        _inputs.clear()  # one case's copies at a time
        inp = _bench.make_inputs(case, _bench.n_copies(case, llc))
        _inputs[case] = (inp, _bench.reference(case, inp))
    return _inputs[case]


@pytest.mark.parametrize("backend_name,variant", VARIANTS,
                         ids=[_bench._key(b, v).replace(" ", "-") for b, v in VARIANTS])
def test_norm(benchmark, case, backend_name, variant, threads, machine, cpu_level, allocator, out_buffers):
    if backend_name == "unfused" and not case.has_baseline:
        pytest.skip("not a fused case: no unfused sequence to time")
    if backend_name == "torch":
        pytest.importorskip("torch")
    elif backend_name != "unfused":
        import cnorm

        if backend_name not in cnorm.available_backends():
            pytest.fail(f"backend {backend_name!r} is not available: "
                        f"{cnorm.available_backends(with_reasons=True)[backend_name]}")
    inp, want = _case_inputs(case, machine["llc_bytes"])
    group = case.name + (" [out]" if variant == "out" else "")
    info = {}
    if variant == "out" and backend_name == "torch":
        op = _bench.torch_out_op(case)
        info = {"out_variant": op is not None, "out_op": op and f"aten::{op}",
                "out_kernel": op and _bench.torch_out_kernel(op)}
        if op is None:  # no out variant: its plain call, marked
            variant = "plain"
    call, first = _bench.runner(case, inp, backend_name, variant, out_buffers)
    tol = (_bench.tolerance(case.np_dtype) if backend_name not in ("torch", "unfused") or case.dtype == "float32"
           else 2.0 ** -5)
    got = first()
    if not (backend_name == "unfused" and case.norm == "rms_norm" and not case.fuse):  # (LayerNorm's values)
        _bench.check(got, want, f"{case.name} [{_bench._key(backend_name, variant)}]", tol)
    benchmark.group = group
    benchmark.extra_info.update(threads=threads, machine=machine["cpu"], cores=machine["cores"],
                                bytes=case.nbytes, floor_factor=case.floor_factor, cpu_level=cpu_level,
                                allocator=allocator["description"], variant=variant,
                                out_buffers=out_buffers if variant == "out" else None, **info)
    rounds = 3 if backend_name == "numpy" else (200 if case.latency else 10)
    benchmark.pedantic(call, rounds=rounds, iterations=50 if case.latency else 1, warmup_rounds=1)
