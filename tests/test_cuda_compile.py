"""The CUDA kernels compile with nvcc, for every instance the cupy backend launches.

Runs without a GPU (and without CuPy): each .cu file is compiled for sm_80
and sm_90 together with a translation unit that takes the address of every
template instance of :func:`cnorm.backends.cupy_backend.name_expressions`,
which forces nvcc to instantiate and assemble each of them, as NVRTC does at
run time. Skipped, with the reason, only where nvcc is not installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from cnorm.backends.cupy_backend import CUDA_TYPES, KERNEL_DIR, KERNEL_FILES, kernel_source, name_expressions

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA kernels cannot be compiled here")


def instantiation_source(file_name: str) -> str:
    """A translation unit instantiating every kernel of ``file_name`` for every data type."""
    lines = [f'#include "{file_name}"', "void* cnorm_instances[] = {"]
    for ctype in CUDA_TYPES.values():
        lines += [f"    (void*)&{expr}," for expr in name_expressions(ctype)[file_name]]
    lines.append("};")
    return "\n".join(lines) + "\n"


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("file_name", KERNEL_FILES)
def test_kernels_compile_with_nvcc(file_name, arch, tmp_path):
    src = tmp_path / f"instances_{file_name}"
    src.write_text(instantiation_source(file_name))
    cmd = [NVCC, "-c", f"-arch={arch}", "--std=c++17", "--Werror", "all-warnings", f"-I{KERNEL_DIR}",
           str(src), "-o", str(tmp_path / "kernels.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"


@pytest.mark.parametrize("file_name", KERNEL_FILES)
def test_every_kernel_template_is_instantiated(file_name):
    """Each __global__ template in a file appears in name_expressions for every type."""
    source = kernel_source(file_name)
    kernels = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", source))
    assert kernels, f"no kernels found in {file_name}"
    for ctype in CUDA_TYPES.values():
        launched = {expr.split("<")[0] for expr in name_expressions(ctype)[file_name]}
        assert launched == kernels, f"{file_name} {ctype}: kernels {sorted(kernels)} vs instances {sorted(launched)}"
    assert '#include "common.cuh"' not in source  # inlined for CuPy's cache key
