"""Build cnorm's compiled extensions: the kernels once per CPU level, with OpenMP
when the compiler has it.

CPU levels. The kernels (cnorm/backends/cpu/) are compiled into one module per
instruction-set level, ``cnorm.backends._kernels_<level>``, each from the same
sources with that level's flags; at import cnorm picks the best level the CPU
and the OS support (cnorm/_cpu.py). On x86-64:

* ``baseline``: x86-64-v2 (SSE4.2, POPCNT), what NumPy 2 requires;
* ``avx2``: x86-64-v3 (AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE);
* ``avx512``: x86-64-v4 (AVX-512 F/BW/VL/DQ/CD); AVX512-BF16 is used where the
  CPU has it, found at run time, never required.

On AArch64:

* ``baseline``: the portable C++ of the x86 baseline's kind (no FMA);
* ``neon``: Advanced SIMD (ASIMD) intrinsics, ARMv8.0-A only, so no flag:
  FMLA, and float16 through FCVTL/FCVTN, are ARMv8.0 (only float16
  arithmetic, which the kernels never do, needs ARMv8.2's FP16), so the level
  runs on every AArch64 core (Cortex-A53/A72, Graviton 1-4, Ampere, Grace,
  Apple M1 and later).

With MSVC on Windows on ARM only ``baseline`` is built (see LEVEL_FLAGS).
Elsewhere only ``baseline`` (portable C++) is built. Nothing else gets level
flags: ``cnorm._cpuinfo`` (the detection) and ``cnorm._openmp`` run before a
level is chosen and must run on any CPU of the platform.

Environment variables:

* ``CNORM_NATIVE=1``: also tune the best level this build machine supports
  for this machine (``-march=native``). A local opt-in: such a build may not
  run on another CPU, even one of the same level.
* ``CNORM_CPU_LEVELS=baseline,avx2``: build only these levels (default: all of
  the platform's; a CPU with none of them runs the NumPy backend only).
* ``CNORM_NO_OPENMP=1``: a serial build.
* ``CNORM_PROBE_EMULATOR="qemu-aarch64 -L /sysroot"``: a cross build's probe
  programs (below) are run by this command (as CMake's
  CROSSCOMPILING_EMULATOR); without it they cannot run, and the OpenMP probe
  fails (tools/aarch64_test.sh sets it).

OpenMP flags by platform (the probe tries them in order and builds serially
when none works): GCC and LLVM clang ``-fopenmp``; Apple clang
``-Xpreprocessor -fopenmp`` with ``-lomp`` (``brew install libomp``, its
include/lib folders on CPPFLAGS/LDFLAGS); MSVC ``/openmp:llvm`` (LLVM's runtime,
libomp140.x86_64.dll, chosen only when the probe's program finds that DLL on
PATH: Visual Studio does not put it there), then ``/openmp`` (MSVC's own
vcomp140.dll, OpenMP 2.0, which is enough for the kernels; the Windows wheels
are built with it, delvewheel grafting the DLL in). The probe builds
its test programs, in C and in C++, with the compilers and the flags the
extensions get: ``CC``/``CXX``, ``CFLAGS``/``CXXFLAGS``/``CPPFLAGS`` and
``LDFLAGS`` (a sanitizer build, tools/sanitize.sh, links with
``-fsanitize=...``; a probe linked without it would fail and build serially).
It says why each candidate failed when it falls back to a serial build.

No compiler. Building from source needs a C and a C++ compiler. Before
anything is compiled (and before Cython runs) the build compiles two tiny
programs with the compiler the extensions would get (``CC``/``CXX`` included)
and, when that fails, stops with a message saying what to install on each
platform (``NO_COMPILER`` below). There is no NumPy-only fallback: a build
without the compiled kernels would be slow in every call, so it is an error,
not a warning. A prebuilt wheel needs no compiler.
"""

import contextlib
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

X86_64 = platform.machine().lower() in ("x86_64", "amd64", "x64")
AARCH64 = platform.machine().lower() in ("aarch64", "arm64")

# Flags of each level (GCC/clang; MSVC below). Explicit feature flags rather
# than -march=x86-64-vN, so that older compilers build them too and the
# detection (cnorm/backends/cpu/cpu_features.h) checks exactly what was enabled.
X86_BASELINE = ["-msse3", "-mssse3", "-msse4.1", "-msse4.2", "-mpopcnt"]
X86_AVX2 = X86_BASELINE + ["-mavx", "-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt", "-mmovbe"]
X86_AVX512 = X86_AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512cd"]
LEVEL_FLAGS = {
    "unix": ({"baseline": X86_BASELINE, "avx2": X86_AVX2, "avx512": X86_AVX512} if X86_64
             else {"baseline": [], "neon": []} if AARCH64 else {"baseline": []}),
    # MSVC: /arch:AVX2 and /arch:AVX512 (F/CD/BW/DQ/VL) name the same feature sets; the baseline
    # needs no flag (MSVC allows the SSE4.1 intrinsics of native_sse.hpp without one). On Windows on
    # ARM (MSVC arm64) the baseline alone: MSVC's arm_neon.h differs from GCC's and clang's
    # (native_neon.hpp is written and tested against those), and no such build can be run here, so
    # the neon level is left out there rather than shipped untested.
    "msvc": ({"baseline": [], "avx2": ["/arch:AVX2"], "avx512": ["/arch:AVX512"]} if X86_64
             else {"baseline": []}),
}
LEVELS = list(LEVEL_FLAGS["unix"])

OPENMP_CANDIDATES = {
    # /openmp:llvm (Visual Studio 2019 16.9 and later; x64 and arm64): LLVM's OpenMP runtime
    # (libomp140.<arch>.dll), OpenMP 3.1+, when the probe can run it (the DLL on PATH); else
    # /openmp: MSVC's own runtime (vcomp140.dll), OpenMP 2.0, which is enough: Cython's prange
    # emits only parallel (if, num_threads, private) and for (nowait, firstprivate, lastprivate,
    # schedule(static, n)) over a signed index, and the kernels' C++ has no OpenMP of its own.
    "msvc": [(["/openmp:llvm"], []), (["/openmp"], [])],
    "unix": [
        (["-fopenmp"], ["-fopenmp"]),
        (["-Xpreprocessor", "-fopenmp"], ["-lomp"]),
    ],
}

PROBE_SOURCE = textwrap.dedent(
    """
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return omp_get_max_threads() > 0 && n > 0 ? 0 : 1;
    }
    """
)

# Prints the best level this machine runs (for CNORM_NATIVE=1).
HOST_LEVEL_SOURCE = textwrap.dedent(
    """
    #include <stdio.h>
    #include "cpu_features.h"
    int main(void) {
        unsigned f = cn_cpu_features();
        puts((f & CN_LEVEL_AVX512_FEATURES) == CN_LEVEL_AVX512_FEATURES ? "avx512"
             : (f & CN_LEVEL_AVX2_FEATURES) == CN_LEVEL_AVX2_FEATURES ? "avx2" : "baseline");
        return 0;
    }
    """
)


def _user_link_flags(compiler, lang):
    """The flags of the user's environment that the extensions' link gets.

    distutils links an extension with ``LDSHARED`` + ``LDFLAGS`` + ``CFLAGS``
    (``CXXFLAGS`` for C++) + ``CPPFLAGS``, but a program with the bare ``CC``
    (``CXX``): without these a probe would miss what they change, such as the
    runtime of ``-fsanitize=address`` or a ``-L`` folder of libomp.
    """
    if compiler.compiler_type == "msvc":  # distutils' MSVC compiler reads none of them
        return []
    names = ("LDFLAGS", "CXXFLAGS" if lang == "c++" else "CFLAGS", "CPPFLAGS")
    return [flag for name in names for flag in shlex.split(os.environ.get(name, ""))]


@contextlib.contextmanager
def _output_to(path):
    """Send this process's stdout and stderr, the compiler's included, to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "wb") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _compile_and_run(compiler, source, cflags=(), lflags=(), include_dirs=(), lang="c"):
    """Build ``source`` as a program in ``lang`` ("c" or "c++") as the extensions are
    built (same compiler and flags) and run it: ``(stdout, None)``, or ``(None, why)``
    when it does not build or run."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp" if lang == "c++" else "probe.c")
        with open(src, "w") as f:
            f.write(source)
        log = os.path.join(tmp, "probe.log")
        stage = "compile"
        try:
            with _output_to(log):
                objs = compiler.compile([src], output_dir=tmp, extra_postargs=list(cflags),
                                        include_dirs=list(include_dirs))
                stage = "link"
                compiler.link_executable(objs, "probe", output_dir=tmp, target_lang=lang,
                                         extra_preargs=_user_link_flags(compiler, lang),
                                         extra_postargs=list(lflags))
            stage = "run"
            exe = os.path.join(tmp, "probe" + (".exe" if os.name == "nt" else ""))
            runner = shlex.split(os.environ.get("CNORM_PROBE_EMULATOR", ""))
            # errors="replace": a message in another encoding (an emulator's, a localized shell's)
            # must not turn into a decoding error that hides it
            run = subprocess.run(runner + [exe], capture_output=True, text=True, errors="replace")
            if run.returncode != 0:
                with open(log, "w") as f:
                    f.write(f"{run.stdout}\n{run.stderr}\nexit status {run.returncode}\n")
                raise RuntimeError(f"exit status {run.returncode}")
            return run.stdout, None
        except Exception as e:  # noqa: BLE001 - any failure means "no"; say why
            with open(log, errors="replace") as f:
                said = [ln.strip() for ln in f if ln.strip()] or [str(e)]
            return None, f"{lang} program failed to {stage}: {' | '.join(said[-4:])}"


NO_COMPILER = """\
cnorm-kernels: cannot build from source: no working C/C++ compiler ({why}).

cnorm's kernels are compiled when it is installed from source, which needs a
C and a C++ compiler. Install one, then install cnorm-kernels again:

  Debian, Ubuntu:  sudo apt install build-essential
  Fedora, RHEL:    sudo dnf install gcc gcc-c++
  macOS:           xcode-select --install   (and for OpenMP: brew install libomp)
  Windows:         Build Tools for Visual Studio, with the "Desktop development with C++" workload

The compiler is taken from CC and CXX when they are set. A prebuilt wheel needs
no compiler: pip install --only-binary=:all: cnorm-kernels (where one exists
for your platform and Python)."""

# A C and a C++ program (the kernels are C++, with its standard library): the
# smallest check that the compilers the extensions get can be run.
COMPILER_CHECKS = (
    ("C", "check.c", "int main(void) { return 0; }\n"),
    ("C++", "check.cpp", "#include <vector>\nint main() { std::vector<int> v(1); return v[0]; }\n"),
)


def default_compiler():
    """The compiler build_ext would use by default, set up from CC, CXX, CFLAGS, ..."""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    return compiler


def compiler_problem(compiler=None):
    """Why ``compiler`` (default: build_ext's) cannot compile a C and a C++ file, or None."""
    try:
        compiler = default_compiler() if compiler is None else compiler
    except Exception as e:  # noqa: BLE001 - no compiler for this platform at all
        return f"no compiler for this platform: {e}"
    with tempfile.TemporaryDirectory() as tmp:
        for lang, name, source in COMPILER_CHECKS:
            src = os.path.join(tmp, name)
            with open(src, "w") as f:
                f.write(source)
            log = os.path.join(tmp, name + ".log")
            try:
                with _output_to(log):
                    compiler.compile([src], output_dir=tmp)
            except Exception as e:  # noqa: BLE001 - a missing program, a failed compile, no MSVC: say which
                with open(log, errors="replace") as f:
                    said = [ln.strip() for ln in f if ln.strip()] + [str(e)]
                return f"the {lang} compiler failed: {' | '.join(said[-3:])}"
    return None


def require_compiler(compiler=None):
    """Stop the build, saying what to install, when no working C/C++ compiler is found."""
    why = compiler_problem(compiler)
    if why is not None:
        raise SystemExit(NO_COMPILER.format(why=why))


def probe_openmp(compiler, report=print):
    """Return (compile_args, link_args) that build an OpenMP program, or None.

    A candidate must build and run a C and a C++ program (the extensions are
    both). ``report`` is told why each candidate failed."""
    if os.environ.get("CNORM_NO_OPENMP"):
        report("cnorm: OpenMP not probed: CNORM_NO_OPENMP is set")
        return None
    kind = "msvc" if compiler.compiler_type == "msvc" else "unix"
    for cflags, lflags in OPENMP_CANDIDATES[kind]:
        for lang in ("c", "c++"):
            out, why = _compile_and_run(compiler, PROBE_SOURCE, cflags, lflags, lang=lang)
            if why is not None:
                report(f"cnorm: OpenMP probe: {' '.join(cflags + lflags)}: {why}")
                break
        else:
            return cflags, lflags
    return None


def host_level(compiler):
    """The best level this build machine runs, or None if that cannot be told."""
    out, _ = _compile_and_run(compiler, HOST_LEVEL_SOURCE, include_dirs=["cnorm/backends/cpu"])
    return out.strip() if out else None


def levels_to_build():
    wanted = os.environ.get("CNORM_CPU_LEVELS")
    if not wanted:
        return LEVELS
    chosen = [lv.strip() for lv in wanted.split(",") if lv.strip()]
    unknown = [lv for lv in chosen if lv not in LEVELS]
    if unknown:
        raise SystemExit(f"CNORM_CPU_LEVELS: unknown level(s) {unknown}; this platform has {LEVELS}")
    return chosen


def unbuilt_levels(extensions, kind):
    """Names of the level modules among ``extensions`` that compilers of ``kind`` do not build
    (LEVEL_FLAGS: MSVC on AArch64 builds the baseline alone)."""
    return [ext.name for ext in extensions
            if "._kernels_" in ext.name and ext.name.rpartition("._kernels_")[2] not in LEVEL_FLAGS[kind]]


class BuildExt(build_ext):
    """build_ext with OpenMP where the compiler has it and per-level kernel flags."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:  # the level modules are independent: compile them side by side
            self.parallel = os.cpu_count() or 1

    def build_extensions(self):
        require_compiler(self.compiler)  # the compiler chosen for this build (--compiler, CC, ...)
        kind = "msvc" if self.compiler.compiler_type == "msvc" else "unix"
        skipped = unbuilt_levels(self.extensions, kind)
        if skipped:
            print(f"cnorm: not built with this compiler ({kind}): {', '.join(skipped)}")
            self.extensions = [ext for ext in self.extensions if ext.name not in skipped]
        omp = probe_openmp(self.compiler)
        native = os.environ.get("CNORM_NATIVE", "0") == "1" and kind == "unix"
        # off x86 the best level is the platform's last: every AArch64 CPU runs neon
        tuned = host_level(self.compiler) if native and X86_64 else (LEVELS[-1] if native else None)
        for ext in self.extensions:
            level = ext.name.rpartition("._kernels_")[2] if "._kernels_" in ext.name else None
            args = ["/O2"] if kind == "msvc" else ["-O3"]
            if level is not None:
                # -ffp-contract=off: one rounding per operation as written, so levels differ only where
                # the vector code says so. -fno-wrapv: Python's CFLAGS carry -fwrapv, under which GCC
                # no longer unrolls the kernels' counted loops (row sums 10-20% slower from memory).
                # MSVC: /fp:precise contracts nothing into FMA from Visual Studio 2022 on (/fp:contract
                # would), as -ffp-contract=off.
                args += LEVEL_FLAGS[kind][level] + (["/fp:precise"] if kind == "msvc" else [
                    "-ffp-contract=off", "-fno-wrapv", "-fvisibility=hidden"])
                if level == tuned:
                    args.append("-march=native")
                    print(f"cnorm: level {level} tuned for this machine (-march=native)")
            if omp is not None:
                args += omp[0]
                ext.extra_link_args = list(ext.extra_link_args) + omp[1]
            ext.extra_compile_args = list(ext.extra_compile_args) + args
            ext.define_macros = list(ext.define_macros) + [
                ("CNORM_OPENMP_FLAGS", '"%s"' % " ".join(omp[0]) if omp else '""')
            ]
        if omp:
            print("cnorm: OpenMP enabled with", " ".join(omp[0] + omp[1]))
        else:
            print("cnorm: WARNING: OpenMP not available: a SERIAL build (every kernel on one thread);"
                  " the reasons are above")
        super().build_extensions()


def extension(name, source, depends=(), level=None):
    macros = [("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")]
    if level is not None:
        macros.append(("CN_LEVEL_" + level.upper(), "1"))
    return Extension(
        name,
        [source],
        depends=list(depends),
        include_dirs=[np.get_include()],
        define_macros=macros,
        language="c++" if level is not None else "c",
    )


def kernel_sources():
    root = "cnorm/backends/cpu"
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                  if f.endswith((".hpp", ".h", ".pxi")))


EXTENSIONS = [
    extension("cnorm._openmp", "cnorm/_openmp.pyx"),
    extension("cnorm._cpuinfo", "cnorm/_cpuinfo.pyx", ["cnorm/backends/cpu/cpu_features.h"]),
] + [
    extension(f"cnorm.backends._kernels_{lv}", f"cnorm/backends/_kernels_{lv}.pyx", kernel_sources(), level=lv)
    for lv in levels_to_build()
]

# Commands that compile the extensions (pip's wheel and editable builds run bdist_wheel and
# editable_wheel); an sdist or metadata needs no compiler.
COMPILING_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop", "bdist"}

if __name__ == "__main__":  # as pip, build and `python setup.py` run it; tests import the probe alone
    if COMPILING_COMMANDS.intersection(sys.argv[1:]):
        require_compiler()  # before Cython runs: fail in a second, not after it
    setup(
        ext_modules=cythonize(
            EXTENSIONS,
            language_level=3,
            compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
            nthreads=os.cpu_count() or 1,
        ),
        cmdclass={"build_ext": BuildExt},
    )
