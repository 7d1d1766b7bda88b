#!/usr/bin/env bash
# One run on a GPU machine: the cupy backend's tests, the GPU benchmark, then
# the shared parametrized suite restricted to "cupy". Logs go to $OUT (or
# ./gpu_check_out); the end of the output is a summary and the benchmark table.
#
#   bash bench/gpu_check.sh [--quick]      (--quick: benchmark without the two large cases)
set -u
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COLUMNS=250 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
QUICK=${1:-}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    $PY -c "import sys, cupy, numpy, torch; print(sys.version); print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"
    $PY -c "import cnorm; print(cnorm.available_backends(with_reasons=True))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The Cython extensions are git-ignored build outputs: build them here, beside the GPU work.
($PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo "build exit $?" >> "$OUT/build.log") &
BUILD=$!

timeout 150 $PY -m pytest -q -p no:cacheprovider --timeout=120 tests/test_cupy_backend.py -rfE \
    > "$OUT/test_cupy.log" 2>&1
echo "test_cupy_backend exit $?" >> "$OUT/test_cupy.log"

timeout 140 $PY bench/gpu_bench.py --reps 20 --json "$OUT/bench.json" $QUICK > "$OUT/bench.md" 2> "$OUT/bench_progress.log"
echo "gpu_bench exit $?" >> "$OUT/bench_progress.log"

wait $BUILD
if [ -d tests ] && ls tests/test_functional.py > /dev/null 2>&1; then
    timeout 80 $PY -m pytest -q -p no:cacheprovider --timeout=60 -k cupy tests \
        --ignore=tests/test_cupy_backend.py --ignore=tests/test_cuda_compile.py --maxfail=40 -rfE \
        > "$OUT/suite_cupy.log" 2>&1
    echo "suite -k cupy exit $?" >> "$OUT/suite_cupy.log"
fi

echo "=== build"; tail -3 "$OUT/build.log"
echo "=== test_cupy_backend"; grep -E "^(FAILED|ERROR)|passed|failed|exit" "$OUT/test_cupy.log" | head -40
echo "=== suite -k cupy"; grep -E "^(FAILED|ERROR)|passed|failed|exit" "$OUT/suite_cupy.log" 2> /dev/null | head -40
echo "=== bench"; tail -5 "$OUT/bench_progress.log"; cat "$OUT/bench.md"
