"""CPU levels: the kernels compiled per instruction-set level, the choice at
import, CNORM_CPU_CAPABILITY, agreement between levels, and the package on
emulated CPUs without AVX-512 (qemu-x86_64), where an instruction that leaked
into the wrong level fails as it would on a user's machine.

The rest of the suite runs the "cython" backend at every level this machine
supports (conftest's ``backend`` fixture).
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import cnorm
from cnorm import _cpu
from cnorm._dtypes import BFLOAT16, FLOAT16
from cnorm.backends.base import Problem
from cnorm.backends.cython_backend import CythonBackend

REQUIRED = os.environ.get("CI") == "true" or os.environ.get("CNORM_REQUIRE_EXTENSION") == "1"
QEMU_REQUIRED = os.environ.get("CNORM_REQUIRE_QEMU") == "1"
HERE = os.path.dirname(os.path.abspath(__file__))
USABLE = _cpu.usable_levels()
needs_kernels = pytest.mark.skipif(not USABLE, reason=f"no compiled kernels: {_cpu.unavailable_reason()}")


def run_python(code, env=None, prefix=()):
    """Run ``python -c code`` (under ``prefix``, e.g. an emulator) with CNORM_CPU_CAPABILITY
    from ``env`` only; (returncode, stdout, stderr)."""
    full = {k: v for k, v in os.environ.items() if k != _cpu.ENV}
    full.update(env or {})
    p = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, env=full,
                       timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_capability_is_the_best_usable_level():
    if not USABLE:
        pytest.skip(f"no compiled kernels: {_cpu.unavailable_reason()}")
    code = "import cnorm; print(cnorm.get_cpu_capability())"
    rc, out, err = run_python(code)
    assert rc == 0, err
    assert out.strip() == USABLE[-1]
    assert cnorm.get_cpu_capability() in _cpu.platform_levels()


def test_every_level_of_the_platform_is_compiled():
    """The default build compiles every level (CI: a missing one fails)."""
    missing = [lv for lv in _cpu.platform_levels() if lv not in _cpu.compiled_levels()]
    if missing and not REQUIRED:
        pytest.skip(f"levels not compiled in this build: {missing}")
    assert not missing, f"levels not compiled: {missing}"


@needs_kernels
@pytest.mark.parametrize("level", USABLE)
def test_environment_variable_forces_a_level(level):
    rc, out, err = run_python("import cnorm; print(cnorm.get_cpu_capability())", {_cpu.ENV: level.upper()})
    assert rc == 0, err
    assert out.strip() == level
    assert "Warning" not in err


def test_unknown_level_is_an_error_naming_the_valid_ones():
    rc, _, err = run_python("import cnorm", {_cpu.ENV: "avx9000"})
    assert rc != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("ValueError") and _cpu.ENV in last and "avx9000" in last
    for lv in _cpu.platform_levels():
        assert lv in last


def test_level_above_the_cpu_warns_and_takes_the_best_supported(monkeypatch):
    """(Decided here from fake CPU facts; tests below do it on an emulated CPU.)"""
    monkeypatch.setattr(_cpu, "platform_levels", lambda: _cpu.X86_LEVELS)   # the same on any machine
    monkeypatch.setattr(_cpu, "compiled_levels", lambda: ["baseline", "avx2", "avx512"])
    monkeypatch.setattr(_cpu, "supported_levels", lambda: ["baseline", "avx2"])
    order, why = _cpu._choose("avx512")
    assert order == ["avx2", "baseline"]
    assert "avx512" in why and "does not support" in why and "using avx2" in why
    assert _cpu._choose(None) == (["avx2", "baseline"], None)
    assert _cpu._choose("baseline") == (["baseline"], None)
    monkeypatch.setattr(_cpu, "compiled_levels", lambda: ["baseline", "avx512"])
    order, why = _cpu._choose("avx2")
    assert order == ["baseline"] and "no avx2 kernels" in why


def test_aarch64_without_asimd_warns_and_takes_baseline(monkeypatch):
    """The AArch64 choice, from fake CPU facts (any machine)."""
    monkeypatch.setattr(_cpu, "platform_levels", lambda: _cpu.AARCH64_LEVELS)
    monkeypatch.setattr(_cpu, "compiled_levels", lambda: ["baseline", "neon"])
    monkeypatch.setattr(_cpu, "supported_levels", lambda: ["baseline", "neon"])
    assert _cpu._choose(None) == (["neon", "baseline"], None)
    assert _cpu._choose("baseline") == (["baseline"], None)
    monkeypatch.setattr(_cpu, "supported_levels", lambda: ["baseline"])
    order, why = _cpu._choose("neon")
    assert order == ["baseline"] and "does not support" in why and "using baseline" in why


@pytest.mark.skipif(not getattr(_cpu._cpuinfo, "AARCH64", False), reason="an AArch64 check")
def test_aarch64_detection_finds_asimd():
    """Every AArch64 core has ASIMD, so the detection (hwcaps, sysctl) must report it
    and the neon level must be supported; a build with it chooses it."""
    assert "asimd" in _cpu.cpu_features()
    assert _cpu.supported_levels() == ["baseline", "neon"]
    if "neon" in _cpu.compiled_levels():
        rc, out, err = run_python("import cnorm; print(cnorm.get_cpu_capability())")
        assert rc == 0 and out.strip() == "neon", err


def test_use_level_refuses_what_cannot_run():
    with pytest.raises(ValueError, match="level"):
        with _cpu.use_level("avx9000"):
            pass


def test_info_command_reports_the_levels():
    out = subprocess.run([sys.executable, "-m", "cnorm", "info"], capture_output=True, text=True,
                         check=True).stdout
    assert "CPU levels" in out
    for lv in _cpu.compiled_levels():
        assert lv in out
    if USABLE:
        assert f"in use {cnorm.get_cpu_capability()}" in out


# -- levels agree -------------------------------------------------------------------

PROBLEMS = [Problem("cf", 4, 16, 300), Problem("cl", 4, 48, 70), Problem("cf", 3, 8, 1100, 2),
            Problem("cl", 2, 64, 50, 4), Problem("cf", 64, 768, 1, 1), Problem("cf", 32, 64, 1, 1),
            Problem("cf", 5, 100, 1, 1), Problem("cl", 300, 64, 1), Problem("cl", 3, 20, 33),
            Problem("cf", 2, 3, 70000), Problem("cl", 2, 24, 40, 3), Problem("cf", 9, 5, 37, 5),
            # long rows: the column-tiled LayerNorm backward (pieces, tiles and their tails), G = 1 and 4
            Problem("cf", 3, 20011, 1, 1), Problem("cf", 2, 40000, 1, 4)]


def _run(p, dt):
    """Forward (training and eval) and backward outputs of problem p at the current level."""
    rng = np.random.default_rng(1)
    pt = np.float64 if dt == np.float64 else np.float32
    x = (rng.standard_normal(p.shape3) * 3 + 2).astype(dt)
    dy = rng.standard_normal(p.shape3).astype(dt)
    w = rng.uniform(0.5, 1.5, p.c).astype(pt)
    b = rng.standard_normal(p.c).astype(pt)
    k = CythonBackend()
    y, mean, var, rstd = k.forward_train(x, p, w, b, 1e-5)
    dx, dw, db = k.backward_train(dy, x, p, mean, rstd, w)
    out = [y, mean, var, rstd, dx, dw, db]
    if p.cross_sample:
        out.append(k.forward_eval(x, p, w, b))
        out += list(k.backward_eval(dy, x, p, mean, rstd, w))
    return out


@pytest.mark.skipif(len(USABLE) < 2, reason="fewer than two CPU levels run here")
@pytest.mark.parametrize("dt", [np.float32, np.float64, FLOAT16, BFLOAT16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("p", PROBLEMS, ids=str)
def test_levels_agree(p, dt):
    """Levels with FMA (avx2, avx512; neon on AArch64) give the same bits: the same 16-lane arithmetic
    in the same order. The baseline level rounds a*b + c twice: within the
    suite's tolerances of them."""
    results = {}
    for lv in USABLE:
        with _cpu.use_level(lv):
            results[lv] = _run(p, dt)
    fma = [lv for lv in USABLE if lv != "baseline"]
    for lv in fma[1:]:
        for a, b in zip(results[fma[0]], results[lv]):
            assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)), \
                f"{lv} differs from {fma[0]}"
    if "baseline" in results and fma:
        tol = {np.float32: 2e-5, np.float64: 1e-12}.get(np.dtype(dt).type, 2.0 ** -7)
        for a, b in zip(results["baseline"], results[fma[0]]):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert np.max(np.abs(a - b)) <= tol * max(1.0, float(np.max(np.abs(b))))


# -- emulated CPUs ------------------------------------------------------------------

QEMU = shutil.which("qemu-x86_64")


@pytest.mark.skipif(not _cpu.platform_levels()[-1] == "avx512", reason="an x86-64 check")
@pytest.mark.parametrize("model, level, forced", [
    ("Haswell", "avx2", None),             # AVX2, FMA, F16C; no AVX-512
    ("SandyBridge", "baseline", None),     # AVX but no AVX2: the x86-64-v2 kernels
    ("Haswell", "avx2", "avx512"),         # a level above the CPU: a warning, the best it runs
])
def test_runs_on_an_emulated_cpu(model, level, forced):
    if QEMU is None:
        if QEMU_REQUIRED:
            pytest.fail("qemu-x86_64 is required here (CNORM_REQUIRE_QEMU=1) but not found")
        pytest.skip("qemu-x86_64 not installed (Debian: apt-get install qemu-user)")
    if level not in _cpu.compiled_levels():
        pytest.skip(f"level {level} not compiled in this build")
    env = {_cpu.ENV: forced} if forced else {}
    code = f"import runpy, sys; sys.argv = ['cpu_check', {level!r}]; runpy.run_path({os.path.join(HERE, 'cpu_check.py')!r}, run_name='__main__')"
    rc, out, err = run_python(code, env, prefix=(QEMU, "-cpu", model))
    assert rc == 0, f"under qemu -cpu {model}: rc {rc}\n{out}\n{err[-2000:]}"
    assert f"level {level}" in out and out.strip().endswith("ok"), out
    if forced:
        assert f"{_cpu.ENV}={forced}" in err and "does not support" in err


# -- conversions ----------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("level", USABLE)
@pytest.mark.parametrize("dt, quiet", [(BFLOAT16, 0x0040), (FLOAT16, 0x0200)], ids=["bfloat16", "float16"])
def test_every_half_value_survives_load_and_store(dt, quiet, level):
    """All 65536 bit patterns through y = x·1 + (-0): widened on load, rounded on
    store by each level's vector code (the head, body and tail of the sweep alike),
    every value comes back as it was - NaN with its payload, the quiet bit set (as
    the scalar conversions define)."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    x = bits.view(dt).reshape(1, 1, -1)
    y = np.empty_like(x)
    one, minus_zero = np.ones(1, np.float32), np.full(1, -0.0, np.float32)
    nan = np.isnan(x.astype(np.float32)).ravel()
    want = np.where(nan, bits | quiet, bits)
    with _cpu.use_level(level):
        for shift in (0, 3):  # output alignments: the sweep's head differs
            _cpu.K.affine(x[..., shift:], y[..., shift:], False, 1, 1, x.shape[-1] - shift, one, minus_zero, 1)
            got = y.view(np.uint16).ravel()[shift:]
            bad = np.flatnonzero(got != want[shift:])
            assert bad.size == 0, f"{bad.size} values differ, e.g. {want[shift:][bad[:3]]} -> {got[bad[:3]]}"


@needs_kernels
@pytest.mark.parametrize("level", USABLE)
@pytest.mark.parametrize("dt", [BFLOAT16, FLOAT16], ids=["bfloat16", "float16"])
def test_nan_parameters_give_nan_not_a_number(dt, level):
    """A NaN whose low payload bits are all set (from a NaN weight) must round to
    NaN: rounding by adding to the bits would carry it into -0 or Inf."""
    x = np.ones((1, 1, 100), dt)
    y = np.empty_like(x)
    zero = np.zeros(1, np.float32)
    for payload in (0x7FFFFFFF, 0xFFFFFFFF, 0x7FC08001):
        scale = np.array([payload], np.uint32).view(np.float32)
        with _cpu.use_level(level):
            _cpu.K.affine(x, y, False, 1, 1, 100, scale, zero, 1)
        assert np.isnan(y.astype(np.float32)).all(), f"NaN weight {payload:#x} gave {y.view(np.uint16)[0, 0, :3]}"


def test_avx512_bf16_key_only_on_x86(monkeypatch):
    """info()'s cpu_avx512_bf16_used is an x86-64 fact: there on x86-64, absent on AArch64
    (where cpu_bfcvt_used says whether BFCVTN converts), and show_config prints either way."""
    # (the level lists too: on the other architecture the real ones would look up its bits)
    monkeypatch.setattr(_cpu, "platform_levels", lambda: _cpu.X86_LEVELS)
    monkeypatch.setattr(_cpu, "compiled_levels", lambda: list(_cpu.X86_LEVELS))
    monkeypatch.setattr(_cpu, "supported_levels", lambda: list(_cpu.X86_LEVELS))
    assert isinstance(_cpu.info()["cpu_avx512_bf16_used"], bool)
    monkeypatch.setattr(_cpu, "platform_levels", lambda: _cpu.AARCH64_LEVELS)
    monkeypatch.setattr(_cpu, "compiled_levels", lambda: ["baseline", "neon"])
    monkeypatch.setattr(_cpu, "supported_levels", lambda: ["baseline", "neon"])
    assert "cpu_avx512_bf16_used" not in _cpu.info()
    assert isinstance(_cpu.info()["cpu_bfcvt_used"], bool)
    cnorm.show_config()
