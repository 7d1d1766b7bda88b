#!/usr/bin/env bash
# The CPU benchmark on a machine with more cores than the development VM (the
# device machine's 16 host cores): whether the kernels that are compute-bound
# on 2 cores reach the memory floor once enough cores share the memory
# bandwidth. One call: build, machine facts, the half-precision and float32
# rows on all cores, then the BatchNorm rows on 2 cores of the same machine.
# Results go to $OUT (or ./cpu_scaling_out).
#
#   bash bench/cpu_scaling.sh [THREADS]        (default: all cores)
set -u
OUT=${OUT:-cpu_scaling_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
T=${1:-$(nproc)}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

{ lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket|L2|L3|NUMA node\(s\)"; nproc; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
$PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
stamp "built"

bench() {  # name, seconds, threads, dtypes, case filter
    timeout "$2" $PY -m cnorm bench --threads "$3" --backends cython,torch --dtypes "$4" \
        --filter "${5:-}" --repeat 10 --out "$OUT/$1" > "$OUT/$1.log" 2>&1
    echo "$1 exit $?" >> "$OUT/$1.log"
    stamp "$1"
    grep -E "^(case|batch|layer|group|instance)|exit" "$OUT/$1.log" | grep -v ": cython"
}
bench "t${T}_half" 230 "$T" bfloat16,float16
bench "t${T}_f32" 110 "$T" float32
bench "t2_bn" 120 2 bfloat16 56x56
