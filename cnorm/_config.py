"""Build facts, thread control and ``show_config``."""

from __future__ import annotations

import os
import platform
import sys

try:
    from . import _openmp
    EXTENSION_ERROR = None
except ImportError as exc:  # the package still works, on the NumPy backend
    _openmp = None
    EXTENSION_ERROR = str(exc)


def get_num_threads() -> int:
    """Return how many threads the next CPU kernel call from this thread will use.

    Without :func:`set_num_threads`: ``omp_get_max_threads()`` read now in the
    calling thread (``OMP_NUM_THREADS``, else the CPU count), so a
    ``threadpoolctl.threadpool_limits`` block applies. After ``set_num_threads(n)``:
    n in every Python thread, unless the calling thread has a lower OpenMP limit
    set in it (a ``threadpool_limits`` block below n that differs from the
    OpenMP default). 1 without OpenMP.
    """
    return _openmp.get_num_threads() if _openmp is not None else 1


def set_num_threads(n: int) -> None:
    """Set the number of threads cnorm's CPU kernels use, process-wide.

    The count holds in every Python thread, those started later included; a
    ``threadpoolctl.threadpool_limits`` block that sets a lower limit in a
    thread still lowers it there (see :func:`get_num_threads`).

    Parameters
    ----------
    n : int
        A positive thread count: a Python or NumPy integer, not a bool.
    """
    import operator

    from ._validate import type_name

    try:
        if isinstance(n, bool):  # numpy.bool is no integer to operator.index either
            raise TypeError
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n: expected an int, got {type_name(n)}") from None
    if not 1 <= n <= 2**31 - 1:
        from ._validate import short_repr

        raise ValueError(f"n: expected a positive thread count below 2**31, got {short_repr(n)}")
    if _openmp is not None:
        _openmp.set_num_threads(n)


def openmp_runtime() -> str:
    """Name and path of the OpenMP runtime loaded in this process, if any."""
    try:
        from threadpoolctl import threadpool_info

        libs = [i for i in threadpool_info() if i.get("user_api") == "openmp"]
        if libs:
            return "; ".join(f"{i['internal_api']} {i.get('version') or ''} ({i['filepath']})".replace("  ", " ")
                             for i in libs)
    except ImportError:
        pass
    return "none found"


def config() -> dict:
    """The facts :func:`show_config` prints, as a dict."""
    from . import __version__, _cpu
    from .backends import available_backends

    return {
        "cnorm": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "extension_built": _openmp is not None,
        "extension_error": EXTENSION_ERROR,
        "openmp_compiled": bool(_openmp and _openmp.openmp_enabled()),
        "openmp_version": _openmp.openmp_version() if _openmp else 0,
        "openmp_flags": _openmp.openmp_flags() if _openmp else "",
        "openmp_runtime": openmp_runtime(),
        "num_threads": get_num_threads(),
        **_cpu.info(),
        "backends": available_backends(with_reasons=True),
    }


def show_config() -> None:
    """Print version, build (extension, OpenMP), threads, CPU levels and each backend's availability."""
    info = config()
    print(f"cnorm {info['cnorm']} (Python {info['python']}, {info['platform']})")
    built = "yes" if info["extension_built"] else f"no ({info['extension_error']})"
    print(f"  compiled extension : {built}")
    if info["openmp_compiled"]:
        print(f"  OpenMP             : yes, _OPENMP={info['openmp_version']}, flags {info['openmp_flags']}")
    else:
        print("  OpenMP             : no (serial build)")
    print(f"  OpenMP runtime     : {info['openmp_runtime']}")
    print(f"  threads            : {info['num_threads']} (of {info['cpu_count']} CPUs)")
    print(f"  CPU levels         : compiled {', '.join(info['cpu_levels_compiled']) or 'none'}; "
          f"this CPU supports {', '.join(info['cpu_levels_supported']) or 'none'}")
    if info["cpu_level"] is None:
        print(f"  CPU level          : none in use ({info['cpu_level_error']})")
    else:
        how = (f"forced by CNORM_CPU_CAPABILITY={info['cpu_level_forced']}" if info["cpu_level_forced"]
               else "the best compiled level this CPU supports")
        bf16 = ("; AVX512-BF16 conversions used" if info.get("cpu_avx512_bf16_used")
                else "; BFCVT conversions used" if info.get("cpu_bfcvt_used") else "")
        print(f"  CPU level          : in use {info['cpu_level']} ({how}){bf16}")
    print("  backends:")
    for name, why in info["backends"].items():
        print(f"    {name:<7} {'available' if why is None else 'unavailable: ' + why}")
