"""The compiled extension, OpenMP, and the info command."""

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
