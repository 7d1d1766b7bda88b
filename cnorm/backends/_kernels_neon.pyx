# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The "cython" backend's kernels compiled for the neon level (AArch64 Advanced SIMD, ARMv8.0-A).

Imported by cnorm/_cpu.py only on a CPU that supports the level; the source
is cnorm/backends/cpu/ (see kernels.pxi there).
"""

include "cpu/kernels.pxi"
