#!/usr/bin/env bash
# A check, on Linux, of the kernels' MSVC side (the _MSC_VER branches of
# half.hpp, vec/*.hpp and cpu_features.h) at the three x86-64 levels:
#   1. the kernel headers are preprocessed as MSVC x64 would see them
#      (_MSC_VER and _M_X64 defined, __GNUC__/__clang__/__x86_64__ not), with
#      empty stand-ins for the system headers, so only cnorm's own text remains;
#   2. that text must hold no GCC/clang-only construct (__builtin_*,
#      __attribute__, inline asm, __restrict__, GCC pragmas, typeof, __int128);
#   3. the Cython-generated module is compiled (syntax only) against that text
#      by clang in C++14 (MSVC's default standard) with -fms-extensions and
#      -Werror=vla, which instantiates every kernel template.
# What it cannot tell: whether MSVC's own headers declare every intrinsic used
# (clang's are used) or MSVC's code generation; only an MSVC build can.
# Usage: tools/msvc_branch_check.sh   (needs clang++, Cython, NumPy)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/stub/sys"
for h in stddef.h stdint.h string.h type_traits atomic immintrin.h math.h xmmintrin.h smmintrin.h \
         arm_neon.h intrin.h cpuid.h sys/auxv.h sys/sysctl.h; do
    echo "/* stand-in */" > "$work/stub/$h"
done
"$py" -m cython -3 --cplus -X boundscheck=False -X wraparound=False -X cdivision=True \
    cnorm/backends/_kernels_baseline.pyx -o "$work/kernels.cpp" 2>/dev/null
pyinc="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
npinc="$("$py" -c 'import numpy; print(numpy.get_include())')"
fail=0
for lv in BASELINE AVX2 AVX512; do
    case $lv in
        BASELINE) flags="-msse4.2 -mpopcnt" ;;
        AVX2) flags="-mavx2 -mfma -mf16c" ;;
        AVX512) flags="-mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512cd" ;;
    esac
    mkdir -p "$work/$lv/cpu"
    pp="$work/$lv/pp.hpp"
    clang++ -E -P -nostdinc -isystem "$work/stub" -U__GNUC__ -U__clang__ -U__x86_64__ \
        -D_MSC_VER=1940 -D_M_X64=100 -D_WIN64 -DCN_LEVEL_$lv=1 -x c++ \
        -Icnorm/backends/cpu cnorm/backends/cpu/kernels.hpp -o "$pp"
    grep -q "__forceinline" "$pp" || { echo "$lv: the MSVC branch was not taken"; fail=1; }
    if grep -nE "__builtin|__attribute__|__asm|\basm *\(|GCC|__restrict__|__int128|typeof" "$pp"; then
        echo "$lv: GCC/clang-only constructs on the MSVC side (above)"; fail=1
    fi
    {
        printf '#include <stddef.h>\n#include <stdint.h>\n#include <string.h>\n#include <type_traits>\n'
        printf '#include <atomic>\n#include <math.h>\n#include <immintrin.h>\n'
        printf 'extern "C" void __cpuidex(int*, int, int);  /* MSVC intrin.h */\n'
        cat "$pp"
    } > "$work/$lv/cpu/kernels.hpp"
    if clang++ -std=c++14 -fms-extensions -Werror=vla -Wno-language-extension-token -fsyntax-only \
        -DCN_LEVEL_$lv=1 -DNPY_NO_DEPRECATED_API=NPY_2_0_API_VERSION $flags \
        -I"$work/$lv" -I"$pyinc" -I"$npinc" -Icnorm/backends "$work/kernels.cpp"; then
        echo "$lv: MSVC side ok"
    else
        echo "$lv: MSVC side fails to compile (above)"; fail=1
    fi
done
exit $fail
