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
def machine():
    _bench.keep_freed_memory()  # same allocator policy as `python -m cnorm bench`
    return _bench.machine()


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        quick = metafunc.config.getoption("--bench-quick") or os.environ.get("CNORM_BENCH_QUICK")
        cases = _bench.quick_cases() if quick else _bench.issue_cases()
        metafunc.parametrize("case", cases, ids=[c.name for c in cases], scope="module")
