"""CPU levels: which compiled copy of the kernels runs on this machine.

The "cython" backend's kernels are compiled once per instruction-set level
(``cnorm.backends._kernels_<level>``; see setup.py). At import, cnorm picks
the best level that is compiled and that this CPU and operating system
support, as PyTorch does with ``ATEN_CPU_CAPABILITY`` and NumPy with its
dispatch targets:

========== =================================================================
``avx512`` x86-64-v4: AVX-512 F/BW/VL/DQ/CD (and AVX512-BF16 conversions
           where the CPU has them, found at run time)
``avx2``   x86-64-v3: AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE
``baseline`` x86-64-v2 (SSE4.2, POPCNT), what NumPy 2 itself requires; the
           portable C++ build on other architectures
========== =================================================================

On AArch64 (Linux: the kernel's hwcaps; macOS: sysctl):

========== =================================================================
``neon``   ARMv8.0-A Advanced SIMD (ASIMD): every AArch64 core
``baseline`` the portable C++ build
========== =================================================================

``CNORM_CPU_CAPABILITY=<level>`` (read at import) forces a
level: one above what the CPU supports gives a warning and the best
supported level; an unknown name is a ``ValueError`` listing the valid ones.
A level module is imported only once the CPU is known to support it, since
its code may hold instructions other CPUs lack.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import warnings

ENV = "CNORM_CPU_CAPABILITY"
X86_LEVELS = ("baseline", "avx2", "avx512")
AARCH64_LEVELS = ("baseline", "neon")
#: PyTorch's ATEN_CPU_CAPABILITY for the same instruction sets (the benchmark compares like with like).
#: On aarch64 ATen's "default" is its NEON build (its other choice, "sve256", is wider than
#: neon), so neon maps to it; ATen has no portable-only build, so baseline does too.
ATEN_CAPABILITY = {"baseline": "default", "avx2": "avx2", "avx512": "avx512", "neon": "default"}

try:
    from . import _cpuinfo
except ImportError as exc:  # a source tree that was never built: NumPy backend only
    _cpuinfo = None
    _CPUINFO_ERROR = str(exc)
else:
    _CPUINFO_ERROR = None


def platform_levels() -> tuple[str, ...]:
    """The levels this platform has, lowest first."""
    if _cpuinfo is not None and _cpuinfo.X86:
        return X86_LEVELS
    if _cpuinfo is not None and getattr(_cpuinfo, "AARCH64", False):
        return AARCH64_LEVELS
    return ("baseline",)


def _module_name(level: str) -> str:
    return f"cnorm.backends._kernels_{level}"


def compiled_levels() -> list[str]:
    """Levels whose kernels this installation holds (found without importing them)."""
    try:
        return [lv for lv in platform_levels() if importlib.util.find_spec(_module_name(lv)) is not None]
    except ImportError:  # pragma: no cover - cnorm.backends itself missing
        return []


def cpu_features() -> list[str]:
    """Names of the instruction sets (and OS register state) found on this CPU."""
    if _cpuinfo is None or not _cpuinfo.FEATURE_BITS:
        return []
    bits = _cpuinfo.features()
    return [name for name, bit in _cpuinfo.FEATURE_BITS.items() if bits & bit]


def supported_levels() -> list[str]:
    """Levels this CPU and operating system can run, lowest first."""
    if _cpuinfo is None:
        return []
    if platform_levels() == ("baseline",):
        return ["baseline"]
    bits = _cpuinfo.features()
    return [lv for lv in platform_levels() if bits & _cpuinfo.LEVEL_BITS[lv] == _cpuinfo.LEVEL_BITS[lv]]


def _requested() -> str | None:
    """CNORM_CPU_CAPABILITY, validated (None when unset or empty)."""
    raw = os.environ.get(ENV, "").strip().lower()
    if not raw:
        return None
    if raw not in platform_levels():
        raise ValueError(f"{ENV}: expected one of {', '.join(platform_levels())} on this platform, "
                         f"got {os.environ[ENV]!r}")
    return raw


def _choose(requested: str | None) -> tuple[list[str], str | None]:
    """The levels to try, best first, and the warning the choice deserves (or None)."""
    compiled, supported = compiled_levels(), supported_levels()
    usable = [lv for lv in compiled if lv in supported]
    if requested is None:
        return usable[::-1], None
    if requested not in supported:
        best = usable[-1] if usable else "none"
        return usable[::-1], (f"{ENV}={requested}: this CPU does not support it (it supports "
                              f"{', '.join(supported) or 'no kernel level'}); using {best}")
    order = [lv for lv in usable[::-1] if platform_levels().index(lv) <= platform_levels().index(requested)]
    if requested in compiled:
        return order, None
    fallback = order[0] if order else (usable[-1] if usable else "none")
    return order or usable[::-1], (f"{ENV}={requested}: this build has no {requested} kernels "
                                   f"(compiled: {', '.join(compiled) or 'none'}); using {fallback}")


K = None  # the kernels module in use (cnorm.backends.cython_backend calls through it); K.LEVEL is its level
_ERROR = None  # why no kernels module could be loaded
_FORCED = None  # CNORM_CPU_CAPABILITY, validated


def _load(order: list[str]) -> None:
    global K, _ERROR
    errors = []
    for lv in order:
        try:
            mod = importlib.import_module(_module_name(lv))
        except ImportError as exc:
            errors.append(f"{lv}: {exc}")
            continue
        K, _ERROR = mod, None
        if errors:
            warnings.warn(f"cnorm: kernels of a higher level failed to import ({'; '.join(errors)}); using {lv}",
                          RuntimeWarning, stacklevel=3)
        return
    K = None
    if _cpuinfo is None:
        _ERROR = f"the compiled extension is not built ({_CPUINFO_ERROR})"
    elif not compiled_levels():
        _ERROR = "no kernel level was compiled"
    elif not supported_levels():
        _ERROR = ("this CPU lacks the instructions of every compiled level"
                  + (" (x86-64-v2 at least)" if platform_levels() == X86_LEVELS else ""))
    else:
        _ERROR = "; ".join(errors) or "no compiled level is supported by this CPU"


def _init() -> None:
    global _FORCED
    _FORCED = _requested()
    order, why = _choose(_FORCED)
    if why:
        warnings.warn(why, RuntimeWarning, stacklevel=3)
    _load(order)


def get_cpu_capability() -> str | None:
    """Return the CPU level cnorm's kernels run at: ``"baseline"``, ``"avx2"`` or ``"avx512"``
    (x86-64), ``"baseline"`` or ``"neon"`` (AArch64).

    Chosen at import (the best level compiled and supported here, or
    ``CNORM_CPU_CAPABILITY``); None when the compiled kernels are not
    available (cnorm then runs its NumPy backend only).

    Examples
    --------
    >>> import cnorm
    >>> cnorm.get_cpu_capability() in ("baseline", "avx2", "avx512", "neon")
    True
    """
    return None if K is None else K.LEVEL


def unavailable_reason() -> str | None:
    """Why no kernels module is loaded, or None."""
    return None if K is not None else _ERROR


def kernel_module(level: str):
    """The kernels module of ``level`` if it is compiled and this CPU supports it, else None."""
    if level not in compiled_levels() or level not in supported_levels():
        return None
    return importlib.import_module(_module_name(level))


@contextlib.contextmanager
def use_level(level: str):
    """Run the kernels of ``level`` inside the block (tests and the benchmark).

    ``ValueError`` for a level that is unknown, not compiled or not supported
    by this CPU: unlike CNORM_CPU_CAPABILITY, an explicit request never falls
    back.
    """
    global K
    mod = kernel_module(level) if level in platform_levels() else None
    if mod is None:
        raise ValueError(f"level: expected one of the levels compiled and supported here "
                         f"({', '.join(usable_levels()) or 'none'}), got {level!r}")
    saved, K = K, mod
    try:
        yield mod
    finally:
        K = saved


def usable_levels() -> list[str]:
    """Levels both compiled and supported here, lowest first."""
    supported = supported_levels()
    return [lv for lv in compiled_levels() if lv in supported]


def info() -> dict:
    """The level facts show_config prints.

    ``cpu_avx512_bf16_used`` (whether the avx512 level in use converts to
    bfloat16 with the CPU's AVX512-BF16 instructions) is an x86-64 question:
    the key is there on x86-64 only; ``cpu_bfcvt_used`` (whether the neon
    level converts with BFCVTN, FEAT_BF16) is its AArch64 counterpart.
    """
    facts = {
        "cpu_levels_compiled": compiled_levels(),
        "cpu_levels_supported": supported_levels(),
        "cpu_level": get_cpu_capability(),
        "cpu_level_forced": _FORCED,
        "cpu_features": cpu_features(),
        "cpu_level_error": unavailable_reason(),
    }
    if platform_levels() == X86_LEVELS:
        facts["cpu_avx512_bf16_used"] = bool(K is not None and K.HW_BF16)
    elif platform_levels() == AARCH64_LEVELS:
        facts["cpu_bfcvt_used"] = bool(K is not None and K.HW_BF16)
    return facts


_init()
