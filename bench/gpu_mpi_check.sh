#!/usr/bin/env bash
# One run on a GPU machine: SyncBatchNorm's MPI tests with the CuPy path live
# (tests/test_mpi.py, tests/test_distributed.py): 2 and 3 ranks on the one GPU,
# exchanging their statistics through MPI via host memory.
#
# The device image has CuPy and an mpi4py but no MPI runtime and no network,
# so the mpi4py and mpich wheels travel in .whl/ (git-ignored; see the
# device README's pip download recipe, cp312 manylinux x86_64):
#
#   mpi4py-4.1.2-cp312-*.whl   installed with --target /tmp/site (ahead of the image's mpi4py)
#   mpich-5.0.2-py3-none-*.whl installed with --prefix /tmp/mpich: its libmpi and mpiexec are
#                              wheel *data* files, which `pip install --target` drops
#
# Logs go to $OUT (or ./gpu_mpi_check_out); the output ends with a summary.
#
#   bash bench/gpu_mpi_check.sh
set -u
OUT=${OUT:-gpu_mpi_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COLUMNS=200
PY=${PYTHON:-python3}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

stamp "install wheels"
PIP="$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
$PIP --target /tmp/site .whl/mpi4py-*.whl > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
$PIP --ignore-installed --prefix /tmp/mpich .whl/mpich-*.whl >> "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
MPIEXEC=$(find /tmp/mpich /tmp/site -name mpiexec -type f -perm -u+x 2> /dev/null | head -1)
LIBMPI=$(find /tmp/mpich /tmp/site -name 'libmpi.so.12' 2> /dev/null | head -1)
if [ -z "$MPIEXEC" ] || [ -z "$LIBMPI" ]; then
    echo "mpiexec ($MPIEXEC) or libmpi.so.12 ($LIBMPI) not found after installing the mpich wheel"
    find /tmp/mpich /tmp/site -maxdepth 3 | head -50
    exit 1
fi
export MPIEXEC PYTHONPATH="/tmp/site:$PWD" PATH="$(dirname "$MPIEXEC"):$PATH"
export LD_LIBRARY_PATH="$(dirname "$LIBMPI")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export HYDRA_LAUNCHER=fork

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>} MPIEXEC=$MPIEXEC LIBMPI=$LIBMPI"
    $PY -c "import sys, numpy; print(sys.version.split()[0], 'numpy', numpy.__version__)"
    $PY -c "import cupy; print('cupy', cupy.__version__, cupy.cuda.runtime.getDeviceCount(), 'device(s)')"
    $PY -c "import mpi4py; from mpi4py import MPI; print('mpi4py', mpi4py.__version__, mpi4py.__file__); print(MPI.Get_library_version().splitlines()[0])"
    echo "--- mpiexec -n 2 hello"
    timeout 60 "$MPIEXEC" -n 2 $PY -c "from mpi4py import MPI; c = MPI.COMM_WORLD; print('rank', c.rank, 'of', c.size, 'sum', c.allreduce(c.rank + 1))"
    echo "hello exit $?"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The Cython extensions are git-ignored build outputs: build them here.
stamp "build_ext"
$PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
echo "build exit $?" | tee -a "$OUT/build.log"
$PY -c "import cnorm; print(cnorm.available_backends(with_reasons=True))" 2>&1 | tee -a "$OUT/env.txt"

stamp "pytest"
timeout 170 $PY -m pytest -q -p no:cacheprovider tests/test_mpi.py tests/test_distributed.py -rfEs --durations=10 \
    > "$OUT/pytest.log" 2>&1
echo "pytest exit $?" >> "$OUT/pytest.log"
stamp "done"

echo "=== build"; tail -2 "$OUT/build.log"
echo "=== pytest"; grep -vE "^[.sFEx]+ *\[" "$OUT/pytest.log" | tail -60
