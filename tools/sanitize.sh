#!/usr/bin/env bash
# Build cnorm's compiled extensions with sanitizers, in a copy of the tree, and run tests under them.
#
#   tools/sanitize.sh [--address] [PYTEST_ARGS...]
#       AddressSanitizer + UndefinedBehaviorSanitizer (GCC by default; CC=clang CXX=clang++
#       also checks the masked and streaming vector accesses GCC does not instrument):
#       out-of-bounds and use-after-free accesses, misaligned or overflowing arithmetic in
#       the kernels and their Cython drivers. Runs the test suite but for the tests that run
#       external tools (qemu, nvcc) which do not run with the ASan runtime preloaded.
#   tools/sanitize.sh --thread [PYTEST_ARGS...]
#       ThreadSanitizer (GCC, with LLVM's libomp and its Archer tool, which tells TSan about
#       OpenMP's barriers and joins): data races between OpenMP threads and between
#       concurrent calls from Python threads. Runs the tests that call cnorm from several
#       threads, and those of the kernels' thread counts.
#
# PYTEST_ARGS that start with an option (-q, -x, -k EXPR) are added to the default selection;
# ones that start with a test path replace it.
#
# The copy (the tracked and untracked, not ignored, files: uncommitted edits included) is
# built in place in build/sanitize-<mode>/src (CNORM_SANITIZE_DIR overrides the folder),
# rebuilt only where sources changed; the repository's own build is left alone. The tests
# run against that copy with the sanitizer runtime preloaded (Python itself is not
# instrumented). Any sanitizer report fails the run: the runtimes write reports to
# build/sanitize-<mode>/reports/, printed at the end, so that one from a subprocess whose
# failure a test expected still counts. Exit status: 0 clean, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

user_tsan="${TSAN_OPTIONS:-}"
mode=address
case "${1:-}" in
    --address) shift ;;
    --thread) mode=thread; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
esac
work="${CNORM_SANITIZE_DIR:-$root/build/sanitize-$mode}"
py="${PYTHON:-python}"
mkdir -p "$work/src"
work="$(cd "$work" && pwd)"
src="$work/src"
reports="$work/reports"

# -- the copy (tools/copy_tree.sh: only what changed is rebuilt)
# shellcheck source=tools/copy_tree.sh
source tools/copy_tree.sh
copy_tree "$work"

# -- compilers, flags, runtime
cc="${CC:-gcc}" cxx="${CXX:-g++}"
if [ "$mode" = address ]; then
    san="-fsanitize=address,undefined -fno-sanitize-recover=undefined"
    if "$cc" --version 2> /dev/null | grep clang > /dev/null; then
        # clang instruments what GCC leaves unchecked: AVX-512 masked loads and stores (the
        # avx512 level's tails), streaming stores. Its runtime, shared, is found by rpath.
        runtime="$($cc -print-runtime-dir)/libclang_rt.asan-$(uname -m).so"
        link="$san -shared-libasan -Wl,-rpath,$(dirname "$runtime")"
    else
        runtime="$($cc -print-file-name=libasan.so)"
        link="$san"
    fi
else
    # OpenMP from LLVM's libomp, through the GNU ABI that GCC's -fopenmp calls (its libgomp.so
    # is libomp), with the Archer tool: libomp tells TSan of its forks, joins and barriers.
    # GCC's own libgomp is not instrumented and would only give false reports. (clang 14's
    # shared TSan runtime, which Python extensions need, crashes at start-up: GCC's works.)
    # Debian: apt-get install libomp-dev.
    omp_dir="${CNORM_LIBOMP_DIR:-$(ls -d /usr/lib/llvm-*/lib 2> /dev/null | sort -V | tail -n 1)}"
    archer="$omp_dir/libarcher.so"
    [ -f "$archer" ] && [ -e "$omp_dir/libgomp.so" ] \
        || { echo "sanitize: no libomp with Archer in '$omp_dir' (apt-get install libomp-dev)"; exit 1; }
    san="-fsanitize=thread"
    runtime="$($cc -print-file-name=libtsan.so)"
    link="$san -L$omp_dir -Wl,-rpath,$omp_dir"
fi
[ -f "$runtime" ] || { echo "sanitize: no sanitizer runtime for $cc (got '$runtime')"; exit 1; }
# The interpreter is C: the runtime, preloaded first, would find no C++ library to forward its
# __cxa_throw interceptor to (ASan aborts on the first C++ exception, matplotlib's for one)
cxxlib="$(readlink -f "$($cxx -print-file-name=libstdc++.so)")"
# setup.py puts its own flags after these: the kernels keep -O3 (the code users run, with
# the sanitizer checks in it); -g and frame pointers give the reports their stacks.
flags="$san -fno-omit-frame-pointer -g"

echo "== build ($mode sanitizer, $cc/$cxx) in $src"
start=$SECONDS
# setup.py runs its OpenMP probe program: under TSan, with the tool that makes OpenMP legible
if [ "$mode" = thread ]; then export OMP_TOOL_LIBRARIES="$archer" TSAN_OPTIONS="ignore_noninstrumented_modules=1"; fi
# setup.py rebuilds what is older than its sources; other compilers or flags: everything
config="$cc | $cxx | $flags | $link"
force=(); [ "$(cat "$work/config" 2> /dev/null)" = "$config" ] || force=(--force)
rm -f "$work/config"
(cd "$src" && CC="$cc" CXX="$cxx" CFLAGS="$flags" CXXFLAGS="$flags" LDFLAGS="$link" \
    "$py" setup.py build_ext --inplace "${force[@]}" > "$work/build.log" 2>&1) || { tail -60 "$work/build.log"; exit 1; }
echo "$config" > "$work/config"
grep "^cnorm: " "$work/build.log" || true
grep -q "^cnorm: OpenMP enabled" "$work/build.log" \
    || { echo "sanitize: the build fell back to serial (no OpenMP): see $work/build.log"; exit 1; }
if [ "$mode" = thread ]; then
    for so in "$src"/cnorm/backends/_kernels_*.so; do
        ldd "$so" | grep "$omp_dir/libomp" > /dev/null || { echo "sanitize: $so does not use $omp_dir's libomp"; exit 1; }
    done
fi
echo "built in $((SECONDS - start)) s"

# -- run
rm -rf "$reports" && mkdir -p "$reports"
export LD_PRELOAD="$runtime:$cxxlib${LD_PRELOAD:+:$LD_PRELOAD}"
export PYTHONMALLOC=malloc   # Python's objects from malloc too, where ASan's redzones see them
export CNORM_REQUIRE_EXTENSION=1
if [ "$mode" = address ]; then
    # leaks: CPython keeps much of what it allocates until exit, by design
    export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$reports/asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
    export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$reports/ubsan${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
    # The emulated-CPU tests (qemu-x86_64 -cpu Haswell/SandyBridge) check which instructions each
    # level uses, not memory; ASan's shadow memory does not fit under qemu-user (killed).
    # tests/test_cuda_compile.py runs nvcc on the CUDA sources (no compiled cnorm code), and nvcc
    # crashes with the preloaded ASan runtime.
    default_tests=(tests --deselect tests/test_cpu_levels.py::test_runs_on_an_emulated_cpu
                   --deselect tests/test_cuda_compile.py::test_kernels_compile_with_nvcc)
else
    export OMP_TOOL_LIBRARIES="$archer"
    # ignore_noninstrumented_modules: accesses through interceptors (memcpy, ...) made by the
    # uninstrumented interpreter, NumPy or libomp are not checked; the suppressions cover what
    # the interpreter's own synchronization hides from TSan (see the file)
    export TSAN_OPTIONS="halt_on_error=1:ignore_noninstrumented_modules=1:second_deadlock_stack=1:log_path=$reports/tsan:suppressions=$root/tools/tsan.supp${user_tsan:+:$user_tsan}"
    export ARCHER_OPTIONS="verbose=1${ARCHER_OPTIONS:+:$ARCHER_OPTIONS}"
    default_tests=(tests/test_cython_threads.py tests/test_distributed.py tests/test_dispatch.py)
fi
# options alone (the first argument starts with -) add to the default selection; tests replace it
if [ $# -eq 0 ] || [[ "$1" == -* ]]; then set -- "${default_tests[@]}" "$@"; fi

echo "== pytest $* (in $src)"
start=$SECONDS
cd "$src"
"$py" -c "import cnorm, sys; sys.exit(not cnorm.__file__.startswith('$src/'))" \
    || { echo "sanitize: cnorm is not imported from the sanitized copy"; exit 1; }
if [ "$mode" = thread ]; then  # without Archer every OpenMP join would be a (false) report
    said="$("$py" -c "import cnorm, numpy as np; cnorm.set_num_threads(2)
cnorm.batch_norm(np.ones((64, 8, 4096), np.float32), backend='cython')" 2>&1)" || { echo "$said"; exit 1; }
    grep -q "Archer detected OpenMP application with TSan" <<< "$said" \
        || { echo "$said"; echo "sanitize: the Archer tool is not active"; exit 1; }
fi
status=0
"$py" -m pytest -p no:cacheprovider "$@" || status=$?
echo "pytest exit status $status, $((SECONDS - start)) s"

if compgen -G "$reports/*" > /dev/null; then
    for f in "$reports"/*; do echo "== sanitizer report $f"; cat "$f"; done
    echo "sanitize: FAILED: sanitizer reports above ($mode)"
    exit 1
fi
[ "$status" -eq 0 ] || { echo "sanitize: FAILED: pytest exit status $status ($mode)"; exit 1; }
echo "sanitize: clean ($mode)"
