# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The "cython" backend's kernels compiled for the avx512 level (x86-64-v4: AVX-512 F/BW/VL/DQ; AVX512-BF16 where the CPU has it).

Imported by cnorm/_cpu.py only on a CPU that supports the level; the source
is cnorm/backends/cpu/ (see kernels.pxi there).
"""

include "cpu/kernels.pxi"
