#!/usr/bin/env bash
# Short GPU run: BatchNorm tests on "cupy" (huge values included) and the large-case timing.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
timeout 100 python3 -m pytest -q -p no:cacheprovider -x tests/test_mixed_precision.py tests/test_cupy_backend.py \
    -k "cupy and (batch_norm or cross or channel or bn or huge or long)" 2>&1 | tail -8
timeout 60 python3 bench/gpu_bn_check.py
