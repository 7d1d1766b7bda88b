# cython: language_level=3
"""What this CPU and operating system support, for choosing a kernel level.

Compiled without instruction-set flags (see cnorm/backends/cpu/cpu_features.h): it
runs before a level is chosen, on any x86-64 or AArch64 CPU. The feature bits
mean different things on the two (X86, AARCH64 say which).
"""

cdef extern from "backends/cpu/cpu_features.h":
    unsigned int cn_cpu_features()
    int CN_X86
    int CN_AARCH64
    unsigned int CN_LEVEL_NEON_FEATURES
    unsigned int CN_F_ASIMD, CN_F_FPHP, CN_F_ASIMDHP, CN_F_ARM_BF16
    unsigned int CN_LEVEL_BASELINE_FEATURES
    unsigned int CN_LEVEL_AVX2_FEATURES
    unsigned int CN_LEVEL_AVX512_FEATURES
    unsigned int CN_F_SSE3, CN_F_SSSE3, CN_F_SSE41, CN_F_SSE42, CN_F_POPCNT, CN_F_AVX, CN_F_AVX2
    unsigned int CN_F_FMA, CN_F_F16C, CN_F_BMI1, CN_F_BMI2, CN_F_LZCNT, CN_F_MOVBE, CN_F_AVX512F
    unsigned int CN_F_AVX512BW, CN_F_AVX512VL, CN_F_AVX512DQ, CN_F_AVX512CD, CN_F_AVX512BF16
    unsigned int CN_F_OS_YMM, CN_F_OS_ZMM

X86 = bool(CN_X86)
AARCH64 = bool(CN_AARCH64)

#: x86-64 feature name -> bit, in the order show_config prints them
X86_FEATURE_BITS = {
    "sse3": CN_F_SSE3, "ssse3": CN_F_SSSE3, "sse4.1": CN_F_SSE41, "sse4.2": CN_F_SSE42,
    "popcnt": CN_F_POPCNT, "avx": CN_F_AVX, "avx2": CN_F_AVX2, "fma": CN_F_FMA, "f16c": CN_F_F16C,
    "bmi1": CN_F_BMI1, "bmi2": CN_F_BMI2, "lzcnt": CN_F_LZCNT, "movbe": CN_F_MOVBE,
    "avx512f": CN_F_AVX512F, "avx512bw": CN_F_AVX512BW, "avx512vl": CN_F_AVX512VL,
    "avx512dq": CN_F_AVX512DQ, "avx512cd": CN_F_AVX512CD, "avx512bf16": CN_F_AVX512BF16,
    "os-ymm-state": CN_F_OS_YMM, "os-zmm-state": CN_F_OS_ZMM,
}

#: AArch64 feature name -> bit (Linux /proc/cpuinfo's names)
AARCH64_FEATURE_BITS = {"asimd": CN_F_ASIMD, "fphp": CN_F_FPHP, "asimdhp": CN_F_ASIMDHP, "bf16": CN_F_ARM_BF16}

#: what each x86-64 level's kernels were compiled to use
X86_LEVEL_BITS = {
    "baseline": CN_LEVEL_BASELINE_FEATURES,
    "avx2": CN_LEVEL_AVX2_FEATURES,
    "avx512": CN_LEVEL_AVX512_FEATURES,
}
#: the same for AArch64: the portable baseline needs nothing, neon ASIMD
AARCH64_LEVEL_BITS = {"baseline": 0, "neon": CN_LEVEL_NEON_FEATURES}

#: this platform's names and levels (empty on other architectures)
FEATURE_BITS = X86_FEATURE_BITS if X86 else AARCH64_FEATURE_BITS if AARCH64 else {}
LEVEL_BITS = X86_LEVEL_BITS if X86 else AARCH64_LEVEL_BITS if AARCH64 else {"baseline": 0}


def features():
    """The CN_F_* bits of this CPU and OS (x86-64 or AArch64 meanings; 0 elsewhere)."""
    return cn_cpu_features()
