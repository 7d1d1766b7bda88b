"""The compiled extension, OpenMP, and the info command."""

import importlib.util
import os
import subprocess
import sys

import pytest

import cnorm
from cnorm import _config

REQUIRED = os.environ.get("CI") == "true" or os.environ.get("CNORM_REQUIRE_EXTENSION") == "1"


def test_extension_built():
    if not _config.config()["extension_built"]:
        if REQUIRED:
            pytest.fail(f"the compiled extension did not build: {_config.EXTENSION_ERROR}")
        pytest.skip(f"compiled extension not built here: {_config.EXTENSION_ERROR}")
    info = _config.config()
    assert info["num_threads"] >= 1


def test_cython_backend_available_in_ci():
    why = cnorm.available_backends(with_reasons=True)["cython"]
    if why is not None:
        if REQUIRED:
            pytest.fail(f"the cython backend must build in CI: {why}")
        pytest.skip(f"cython backend unavailable here: {why}")
    assert "cython" in cnorm.available_backends()


def test_openmp_compiled_on_linux_gcc():
    if sys.platform != "linux" or not _config.config()["extension_built"]:
        pytest.skip("the OpenMP probe is only required on Linux with the extension built")
    assert _config.config()["openmp_compiled"], "GCC on Linux has -fopenmp: the probe should have found it"


def test_info_command_prints_config():
    out = subprocess.run([sys.executable, "-m", "cnorm", "info"], capture_output=True, text=True, check=True).stdout
    assert f"cnorm {cnorm.__version__}" in out
    for name in ("numpy", "cython", "cupy"):
        assert name in out
    assert "OpenMP" in out and "threads" in out


def _setup_module():
    """setup.py's functions, loaded without building (its setup() call is guarded)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    if not os.path.exists(path):
        pytest.skip("no setup.py beside the tests (an installed package)")
    spec = importlib.util.spec_from_file_location("cnorm_setup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unix_compiler():
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    if compiler.compiler_type != "unix":
        pytest.skip(f"the probe's flag handling is tested with a unix compiler, not {compiler.compiler_type}")
    customize_compiler(compiler)  # reads CC, CFLAGS, LDFLAGS, ... now
    return compiler


def test_openmp_probe_honours_ldflags(monkeypatch):
    """The probe links with the user's LDFLAGS, as the extensions are linked, and says why it failed."""
    setup = _setup_module()
    monkeypatch.delenv("CNORM_NO_OPENMP", raising=False)
    monkeypatch.setenv("LDFLAGS", "-lcnorm_no_such_library")
    said = []
    assert setup.probe_openmp(_unix_compiler(), report=said.append) is None
    assert said and all("failed to link" in s and "cnorm_no_such_library" in s for s in said), said


def test_openmp_probe_with_sanitizer_flags(monkeypatch):
    """With -fsanitize=address in CFLAGS/CXXFLAGS/LDFLAGS (tools/sanitize.sh) the probe still
    finds OpenMP: it once linked its program without them and fell back to a serial build."""
    if sys.platform != "linux":
        pytest.skip("AddressSanitizer builds are run on Linux")
    setup = _setup_module()
    monkeypatch.delenv("CNORM_NO_OPENMP", raising=False)
    plain = setup.probe_openmp(_unix_compiler(), report=lambda s: None)
    if plain is None:
        pytest.skip("this compiler has no OpenMP")
    monkeypatch.delenv("LD_PRELOAD", raising=False)  # under tools/sanitize.sh: programs bring their own runtime
    for name in ("CFLAGS", "CXXFLAGS", "LDFLAGS"):
        monkeypatch.setenv(name, "-fsanitize=address")
    compiler = _unix_compiler()
    _, why = setup._compile_and_run(compiler, "int main(void) { return 0; }\n")
    if why is not None:
        pytest.skip(f"no AddressSanitizer with this compiler: {why}")
    said = []
    assert setup.probe_openmp(compiler, report=said.append) == plain, said
