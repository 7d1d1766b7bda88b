#!/usr/bin/env bash
# Build cnorm with clang and LLVM's OpenMP runtime (libomp), as on macOS, in a copy of
# the tree, and run the test suite against that build.
#
#   tools/clang_test.sh [PYTEST_ARGS...]
#
# The default selection is the whole suite but for the tests that run external
# tools on the package (qemu's emulated CPUs, nvcc), which do not depend on the
# compiler of the kernels. PYTEST_ARGS that start with an option (-q, -x, -k EXPR)
# are added to it; ones that start with a test path replace it.
#
# Needs clang and libomp (Debian: apt-get install clang libomp-dev); CC/CXX choose
# another clang (CC=clang-16 CXX=clang++-16). The copy (tracked and untracked, not
# ignored, files) is built in build/clang/src (CNORM_CLANG_DIR overrides), rebuilt
# only where sources changed; the repository's own build is left alone. The run
# fails if the build fell back to serial or its kernels do not use libomp.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
work="${CNORM_CLANG_DIR:-$root/build/clang}"
py="${PYTHON:-python}"
cc="${CC:-clang}" cxx="${CXX:-clang++}"
"$cc" --version 2> /dev/null | grep -q clang || { echo "clang_test: '$cc' is not clang (apt-get install clang)"; exit 1; }
mkdir -p "$work/src"
work="$(cd "$work" && pwd)"
src="$work/src"

# -- the copy (tools/copy_tree.sh: only what changed is rebuilt)
# shellcheck source=tools/copy_tree.sh
source tools/copy_tree.sh
copy_tree "$work"

echo "== build ($cc/$cxx) in $src"
start=$SECONDS
config="$cc | $cxx"
force=(); [ "$(cat "$work/config" 2> /dev/null)" = "$config" ] || force=(--force)
rm -f "$work/config"
(cd "$src" && CC="$cc" CXX="$cxx" "$py" setup.py build_ext --inplace --parallel 2 "${force[@]}" > "$work/build.log" 2>&1) \
    || { tail -60 "$work/build.log"; exit 1; }
echo "$config" > "$work/config"
grep "^cnorm: " "$work/build.log" || true
grep -q "^cnorm: OpenMP enabled" "$work/build.log" \
    || { echo "clang_test: the build fell back to serial (no OpenMP): see $work/build.log"; exit 1; }
for so in "$src"/cnorm/backends/_kernels_*.so; do
    [ "$(ldd "$so" | grep -c "libomp")" -gt 0 ] || { echo "clang_test: $so does not use LLVM's libomp"; ldd "$so"; exit 1; }
done
# (grep -c reads all of strings' output: grep -q would stop it early, a failure under pipefail)
[ "$(strings "$src"/cnorm/backends/_kernels_baseline*.so | grep -c "clang version")" -gt 0 ] \
    || { echo "clang_test: the kernels were not compiled by clang"; exit 1; }
echo "built in $((SECONDS - start)) s"

default_tests=(tests --deselect tests/test_cpu_levels.py::test_runs_on_an_emulated_cpu
               --deselect tests/test_cuda_compile.py::test_kernels_compile_with_nvcc)
if [ $# -eq 0 ] || [[ "$1" == -* ]]; then set -- "${default_tests[@]}" "$@"; fi

echo "== pytest $* (in $src)"
cd "$src"
export CNORM_REQUIRE_EXTENSION=1
"$py" -c "import cnorm, sys; sys.exit(not cnorm.__file__.startswith('$src/'))" \
    || { echo "clang_test: cnorm is not imported from the clang build"; exit 1; }
"$py" -c "import cnorm._config as c; i = c.config(); print('OpenMP runtime:', i['openmp_runtime'], '- level:', i['cpu_level'])"
"$py" -m pytest -p no:cacheprovider "$@"
