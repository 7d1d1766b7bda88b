"""pytest-benchmark settings for cnorm's benchmark suite (``pytest bench``)."""

import contextlib
import os

import pytest

from cnorm import _bench


def pytest_addoption(parser):
    parser.addoption("--bench-threads", type=int, default=None,
                     help="threads for every backend (default: cnorm.get_num_threads())")
    parser.addoption("--bench-quick", action="store_true", help="the small CI cases")
    parser.addoption("--bench-cpu-capability", default=None,
                     help="cnorm's CPU level (default: the one chosen at import); PyTorch runs at the matching "
                          "ATEN_CPU_CAPABILITY")
    parser.addoption("--bench-keep-freed-memory", action="store_true",
                     help="make glibc keep freed memory (mallopt), as `python -m cnorm bench --keep-freed-memory`: "
                          "plain calls no longer pay the page faults of fresh outputs (default: glibc's policy)")
    parser.addoption("--bench-out-buffers", choices=_bench.OUT_BUFFERS, default=_bench.DEFAULT_OUT_BUFFERS,
                     help="the out variants' buffers: one per rotating input copy, or one for every call "
                          "(as python -m cnorm bench --out-buffers; default: %(default)s)")


@pytest.fixture(scope="session")
def cpu_level(request):
    """cnorm's kernels at the requested CPU level for the session, PyTorch at the
    matching ATEN_CPU_CAPABILITY (set before PyTorch is imported)."""
    from cnorm import _cpu

    level = request.config.getoption("--bench-cpu-capability") or _cpu.get_cpu_capability()
    if level in _cpu.ATEN_CAPABILITY:
        os.environ["ATEN_CPU_CAPABILITY"] = _cpu.ATEN_CAPABILITY[level]
    with _cpu.use_level(level) if level else contextlib.nullcontext():
        yield level


@pytest.fixture(scope="session")
def threads(request, cpu_level):
    import cnorm

    n = request.config.getoption("--bench-threads") or cnorm.get_num_threads()
    cnorm.set_num_threads(n)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass
    return n


@pytest.fixture(scope="session")
def out_buffers(request):
    return request.config.getoption("--bench-out-buffers")


@pytest.fixture(scope="session")
def allocator(request):
    """The allocator policy of the session, as `python -m cnorm bench`'s: glibc's default
    unless --bench-keep-freed-memory (then for the rest of the process)."""
    kept = _bench.keep_freed_memory() if request.config.getoption("--bench-keep-freed-memory") else False
    return _bench.allocator_policy(kept)


@pytest.fixture(scope="session")
def machine(allocator):
    return _bench.machine()


def pytest_report_header(config):
    kept = config.getoption("--bench-keep-freed-memory")
    return f"cnorm bench allocator: {_bench.ALLOCATOR[bool(kept)]}"


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        quick = metafunc.config.getoption("--bench-quick") or os.environ.get("CNORM_BENCH_QUICK")
        cases = (_bench.quick_cases() + _bench.quick_fused_cases()) if quick else \
            (_bench.issue_cases() + _bench.fused_cases())
        metafunc.parametrize("case", cases, ids=[c.name for c in cases], scope="module")
