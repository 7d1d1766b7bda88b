#!/usr/bin/env bash
# One run on a GPU machine: the GPU benchmark (with the row-kernel variants),
# the cupy backend's tests, then the shared parametrized suite restricted to
# "cupy". Logs go to $OUT (or ./gpu_check_out); the end of the output is a
# summary and the benchmark tables. Each stage has its own time limit so that
# the summary always prints (about 240 s in all at most).
#
#   bash bench/gpu_check.sh [--quick]      (--quick: benchmark without the large cases)
set -u
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COLUMNS=250 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The device machine runs commands as root, which Open MPI's mpiexec refuses without these.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PY=${PYTHON:-python3}
QUICK=${1:-}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    $PY -c "import sys, cupy, numpy, torch; print(sys.version); print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"
    $PY -c "import cnorm; print(cnorm.available_backends(with_reasons=True))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The Cython extensions are git-ignored build outputs: build them here, beside the GPU work.
($PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo "build exit $?" >> "$OUT/build.log") &
BUILD=$!

stamp "bench"
timeout 90 $PY bench/gpu_bench.py --reps 20 --json "$OUT/bench.json" $QUICK > "$OUT/bench.md" 2> "$OUT/bench_progress.log"
echo "gpu_bench exit $?" >> "$OUT/bench_progress.log"

stamp "test_cupy_backend"
timeout 60 $PY -m pytest -q -p no:cacheprovider -n 8 --timeout=50 tests/test_cupy_backend.py -rfE \
    > "$OUT/test_cupy.log" 2>&1
echo "test_cupy_backend exit $?" >> "$OUT/test_cupy.log"

wait $BUILD
stamp "suite -k cupy"
if [ -d tests ] && ls tests/test_functional.py > /dev/null 2>&1; then
    timeout 80 $PY -m pytest -q -p no:cacheprovider -n 8 --timeout=60 -k cupy tests \
        --ignore=tests/test_cupy_backend.py --ignore=tests/test_cuda_compile.py -rfE \
        > "$OUT/suite_cupy.log" 2>&1
    echo "suite -k cupy exit $?" >> "$OUT/suite_cupy.log"
fi
stamp "done"

echo "=== build"; tail -3 "$OUT/build.log"
echo "=== test_cupy_backend"; grep -E "^(FAILED|ERROR)|passed|failed|exit" "$OUT/test_cupy.log" | head -40
echo "=== suite -k cupy"; grep -E "^(FAILED|ERROR)|passed|failed|exit" "$OUT/suite_cupy.log" 2> /dev/null | head -40
echo "=== bench"
if [ -s "$OUT/bench.md" ]; then
    grep -vE "^(LayerNorm|BatchNorm|GroupNorm|InstanceNorm|variants)" "$OUT/bench_progress.log" | tail -8
    cat "$OUT/bench.md"
else
    tail -40 "$OUT/bench_progress.log"  # the benchmark did not finish: its per-case progress lines
fi
