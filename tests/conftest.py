"""Fixtures shared by the suite: every test that takes ``backend`` runs on every backend,
and on the "cython" backend at every CPU level this machine supports.

A backend that cannot run here (CuPy without a GPU) is skipped with the reason
the registry gives; .ci/run separately fails if the compiled "cython" backend
did not build, so its absence can never pass silently in CI.
"""

import contextlib
import os

import numpy as np
import pytest

import cnorm
from cnorm import _cpu


class BackendCase:
    """A backend under test: its name and how to move arrays to and from it."""

    def __init__(self, name):
        self.name = name
        self.xp = np
        if name == "cupy":
            import cupy

            self.xp = cupy

    def asarray(self, a):
        """Host array → the backend's array type (a no-op for CPU backends)."""
        if a is None:
            return None
        return self.xp.asarray(a) if self.xp is not np else a

    def to_numpy(self, a):
        """Backend array → host NumPy array."""
        if a is None:
            return None
        return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)

    def __repr__(self):
        return self.name


def _backend_params():
    """(backend name, CPU level) pairs: the "cython" backend once per CPU level this
    machine runs (the kernels are compiled per level), best first."""
    params = []
    for name, why in cnorm.available_backends(with_reasons=True).items():
        if name == "cython" and why is None:
            params += [pytest.param((name, lv), id=f"cython-{lv}") for lv in reversed(_cpu.usable_levels())]
            continue
        marks = [pytest.mark.skip(reason=f"backend {name!r} unavailable: {why}")] if why else []
        if name == "cupy":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param((name, None), marks=marks, id=name))
    return params


@pytest.fixture(params=_backend_params())
def backend(request):
    """Each registered backend in turn (unavailable ones skipped with their reason),
    the "cython" backend at every CPU level this machine supports."""
    name, level = request.param
    with _cpu.use_level(level) if level else contextlib.nullcontext():
        yield BackendCase(name)


def tolerance(dtype):
    """Relative-to-scale tolerance for comparing a result of ``dtype`` with float64."""
    return {np.float64: 1e-9, np.float32: 1e-4}[np.dtype(dtype).type]


@pytest.fixture(autouse=True)
def _reset_backend_choice():
    """No test leaks a global backend choice into the next."""
    yield
    cnorm.set_backend("auto")


def _shadowed_source_tree():
    """Why these tests would test two different copies of cnorm, or None.

    Tests run ``python -m cnorm`` in subprocesses, which import cnorm from the
    current folder first. Run from an unpacked sdist's top folder, the tests
    would import the source tree's cnorm (no compiled kernels) instead of the
    installed cnorm-kernels, in the subprocesses or (python -m pytest) in
    pytest itself."""
    used = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(cnorm.__file__))))
    here = os.path.realpath(os.getcwd())
    if os.path.exists(os.path.join(here, "cnorm", "__init__.py")) and used != here:
        return f"the tests import cnorm from {used}, but their subprocesses would import the one in {here}"
    if _cpu.unavailable_reason() is None:
        return None
    from importlib.machinery import EXTENSION_SUFFIXES
    from importlib.metadata import distributions

    for dist in distributions(name="cnorm-kernels"):  # an egg-info in the folder, a site-packages install, ...
        site = os.path.realpath(dist.locate_file(""))
        compiled = any(os.path.exists(os.path.join(site, "cnorm", "_cpuinfo" + sfx)) for sfx in EXTENSION_SUFFIXES)
        if site != used and compiled:
            return (f"the tests import cnorm from {used}, which has no compiled kernels, "
                    f"while cnorm-kernels is installed, with them, in {site}")
    return None


def pytest_configure(config):
    why = _shadowed_source_tree()
    if why is not None:
        raise pytest.UsageError(f"{why}: to test the installed package, run the tests from their own folder "
                                "(cd tests && python -m pytest)")


def pytest_report_header(config):
    why = cnorm.available_backends(with_reasons=True)
    return f"cnorm {cnorm.__version__} from {os.path.dirname(os.path.abspath(cnorm.__file__))}; backends: " + ", ".join(f"{k}={'ok' if v is None else 'unavailable'}" for k, v in why.items()) + (
        f"; CPU levels tested: {', '.join(_cpu.usable_levels()) or 'none'}"
        f" (default {cnorm.get_cpu_capability()}); CI={os.environ.get('CI', '')}"
    )


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="run the tests marked slow (arrays past 2**31 elements: about 16 GiB of memory)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: needs --run-slow (python -m pytest --run-slow -m slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
