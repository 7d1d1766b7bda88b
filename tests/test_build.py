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


def test_probe_programs_run_under_the_emulator_named(monkeypatch):
    """CNORM_PROBE_EMULATOR (a cross build's qemu) is the command the probe programs run under:
    "env" runs them as they are, a command that fails makes the probe fail to run."""
    setup = _setup_module()
    compiler = _unix_compiler()
    hello = "#include <stdio.h>\nint main(void) { puts(\"ran\"); return 0; }\n"
    monkeypatch.delenv("CNORM_PROBE_EMULATOR", raising=False)
    if setup._compile_and_run(compiler, hello)[0] is None:
        pytest.skip("the programs this compiler builds do not run here by themselves (an emulated "
                    "interpreter, as under tools/aarch64_test.sh: its cross builds name the emulator)")
    monkeypatch.setenv("CNORM_PROBE_EMULATOR", "env")
    out, why = setup._compile_and_run(compiler, hello)
    assert why is None and out.strip() == "ran", why
    monkeypatch.setenv("CNORM_PROBE_EMULATOR", "false")
    out, why = setup._compile_and_run(compiler, "int main(void) { return 0; }\n")
    assert out is None and "failed to run" in why, why


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


def test_no_compiler_stops_the_build_early_saying_what_to_install(tmp_path):
    """Without a working C compiler (CC names none) `setup.py build_ext` stops before Cython
    runs or anything compiles, with what to install on each platform."""
    _setup_module()  # skips where there is no setup.py (an installed package)
    from setuptools._distutils.ccompiler import get_default_compiler

    if get_default_compiler() != "unix":
        pytest.skip(f"CC chooses the compiler of unix builds, not of {get_default_compiler()}")
    # setup.py alone, without the sources: Cython, run before the check, would fail on the missing .pyx
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "src").mkdir()
    with open(os.path.join(root, "setup.py")) as f:
        (tmp_path / "src" / "setup.py").write_text(f.read())
    env = dict(os.environ, CC=str(tmp_path / "nonexistent" / "cc"))
    run = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                          "--build-temp", str(tmp_path / "temp")], cwd=tmp_path / "src", env=env,
                         capture_output=True, text=True)
    said = run.stdout + run.stderr
    assert run.returncode != 0, said
    assert "no working C/C++ compiler" in said and "nonexistent" in said, said
    for hint in ("apt install build-essential", "dnf install gcc gcc-c++", "xcode-select --install",
                 "brew install libomp", "Build Tools for Visual Studio", "--only-binary=:all: cnorm-kernels"):
        assert hint in said, (hint, said)
    assert "Compiling" not in said and "Cythonizing" not in said, said  # stopped before Cython
    assert not (tmp_path / "lib").exists() and not (tmp_path / "temp").exists()


def test_compiler_check_passes_with_the_build_compiler():
    """The check must not stop a build that can compile (a C and a C++ file here)."""
    setup = _setup_module()
    compiler = setup.default_compiler()
    why = setup.compiler_problem(compiler)
    if why is not None and not REQUIRED and not _config.config()["extension_built"]:
        pytest.skip(f"no working compiler here: {why}")
    assert why is None


def test_msvc_on_arm64_builds_the_baseline_only(monkeypatch):
    """Windows on ARM: MSVC gets the baseline level alone (its arm_neon.h is not the one the neon
    level is written against); GCC/clang on AArch64 keep neon. The MSVC OpenMP probe tries
    /openmp:llvm, then /openmp."""
    import platform
    from types import SimpleNamespace

    monkeypatch.setattr(platform, "machine", lambda: "ARM64")
    setup = _setup_module()
    assert setup.LEVEL_FLAGS["msvc"] == {"baseline": []}
    assert list(setup.LEVEL_FLAGS["unix"]) == ["baseline", "neon"]
    exts = [SimpleNamespace(name=n) for n in ("cnorm._openmp", "cnorm.backends._kernels_baseline",
                                              "cnorm.backends._kernels_neon")]
    assert setup.unbuilt_levels(exts, "msvc") == ["cnorm.backends._kernels_neon"]
    assert setup.unbuilt_levels(exts, "unix") == []
    assert [c for c, _ in setup.OPENMP_CANDIDATES["msvc"]] == [["/openmp:llvm"], ["/openmp"]]
