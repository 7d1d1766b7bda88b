/* cnorm's CPU kernels, written once against the vector layer (vec/vec.hpp)
   and compiled once per instruction-set level: setup.py builds one extension
   module per level (cnorm.backends._kernels_<level>), each from the same
   sources with that level's flags and a CN_LEVEL_* macro, and
   cnorm/_cpu.py imports the best one this CPU runs.

   The kernel families, one header each:
     runs.hpp         lane-wise reductions over a run (channels-first statistics
                      and gradients; LayerNorm double fallbacks)
     rows.hpp         row statistics and the LayerNorm backward
     cl_stats.hpp     channels-last column statistics and gradient sums
     elementwise.hpp  normalize / affine / dx sweeps, streaming stores
   The Cython side (kernels.pxi and the files it includes) holds the
   parallel drivers: blocks, merges, threads. */
#ifndef CN_KERNELS_HPP
#define CN_KERNELS_HPP
#include "rows.hpp"
/* Cython emits every combination of the drivers' two fused types (storage x
   statistics); only four are called, the rest are dead code by design. */
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wunused-function"
#endif

namespace {
/* The level this copy was compiled for, and one-time set-up (the avx512
   level asks whether the CPU has the AVX512-BF16 conversions, the neon level
   whether it has BFCVTN). */
inline const char* cn_level_name() { return CN_VEC_LEVEL; }
inline int cn_level_has_fma() { return CN_VEC_FMA; }
#if defined(CN_NATIVE_AVX512_HPP) || defined(CN_NATIVE_NEON_HPP)
inline int cn_level_hw_bf16() { return cn_hw_bf16; }
#else
inline int cn_level_hw_bf16() { return 0; }
#endif
}  // namespace
#endif
