"""One pytest-benchmark group per (norm, direction, shape, layout), rows numpy,
cython and torch at the same thread count.

Run with ``pytest bench --benchmark-group-by=group`` (``--bench-quick`` for
the small cases). Each benchmark checks its result against the NumPy reference
before timing; inputs rotate among copies larger than the last-level cache.
"""

import pytest

from cnorm import _bench

BACKENDS = ["numpy", "cython", "torch"]
_inputs = {}


def _case_inputs(case, llc):
    if case not in _inputs:
        _inputs.clear()  # one case's copies at a time
        inp = _bench.make_inputs(case, _bench.n_copies(case, llc))
        _inputs[case] = (inp, _bench.reference(case, inp))
    return _inputs[case]


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_norm(benchmark, case, backend_name, threads, machine, cpu_level):
    if backend_name == "torch":
        pytest.importorskip("torch")
    else:
        import cnorm

        if backend_name not in cnorm.available_backends():
            pytest.fail(f"backend {backend_name!r} is not available: "
                        f"{cnorm.available_backends(with_reasons=True)[backend_name]}")
    inp, want = _case_inputs(case, machine["llc_bytes"])
    call, first = _bench.runner(case, inp, backend_name)
    _bench.check(first(), want, f"{case.name} [{backend_name}]")
    benchmark.group = case.name
    benchmark.extra_info.update(threads=threads, machine=machine["cpu"], cores=machine["cores"],
                                bytes=case.nbytes, floor_factor=case.floor_factor, cpu_level=cpu_level)
    rounds = 3 if backend_name == "numpy" else (200 if case.latency else 10)
    benchmark.pedantic(call, rounds=rounds, iterations=50 if case.latency else 1, warmup_rounds=1)
