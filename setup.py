"""Build cnorm's Cython extensions, with OpenMP when the compiler has it.

OpenMP flags by platform (the probe below tries them in order and builds a
serial extension when none works):

* GCC and LLVM clang on Linux: ``-fopenmp`` to compile and link.
* Apple clang (macOS): ``-Xpreprocessor -fopenmp`` to compile and ``-lomp``
  to link, with libomp installed (``brew install libomp``) and its include/lib
  folders on CPPFLAGS/LDFLAGS.
* MSVC (Windows): ``/openmp`` (or ``/openmp:llvm`` for OpenMP 3+ features).

Set ``CNORM_NO_OPENMP=1`` to force a serial build.
"""

import os
import tempfile
import textwrap

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_CANDIDATES = {
    "msvc": [(["/openmp"], [])],
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


def probe_openmp(compiler):
    """Return (compile_args, link_args) that build an OpenMP program, or None."""
    if os.environ.get("CNORM_NO_OPENMP"):
        return None
    kind = "msvc" if compiler.compiler_type == "msvc" else "unix"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(PROBE_SOURCE)
        for cflags, lflags in OPENMP_CANDIDATES[kind]:
            try:
                objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
                compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=lflags)
            except Exception:  # noqa: BLE001 - any failure means "not this flag"
                continue
            return cflags, lflags
    return None


def optimization_flags(compiler):
    """-O3, plus -march=native unless CNORM_NATIVE=0 (portable wheels)."""
    if compiler.compiler_type == "msvc":
        return ["/O2"]
    flags = ["-O3"]
    if os.environ.get("CNORM_NATIVE", "1") != "0":
        flags.append("-march=native")
    return flags


class BuildExtWithOpenMP(build_ext):
    """build_ext that adds OpenMP flags when the compiler supports them."""

    def build_extensions(self):
        flags = probe_openmp(self.compiler)
        opt = optimization_flags(self.compiler)
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args) + opt
            if flags is not None:
                ext.extra_compile_args += flags[0]
                ext.extra_link_args = list(ext.extra_link_args) + flags[1]
            ext.define_macros = list(ext.define_macros) + [
                ("CNORM_OPENMP_FLAGS", '"%s"' % " ".join(flags[0]) if flags else '""')
            ]
        print("cnorm: OpenMP", "enabled with %s" % " ".join(flags[0]) if flags else "not available: serial build")
        super().build_extensions()


def extension(name, source, depends=()):
    return Extension(
        name,
        [source],
        depends=list(depends),
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
    )


EXTENSIONS = [
    extension("cnorm._openmp", "cnorm/_openmp.pyx"),
    extension("cnorm.backends._kernels", "cnorm/backends/_kernels.pyx", ["cnorm/backends/_kernels.h"]),
]

setup(
    ext_modules=cythonize(
        EXTENSIONS,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
    cmdclass={"build_ext": BuildExtWithOpenMP},
)
