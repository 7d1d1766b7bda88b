"""``python -m cnorm bench``'s bookkeeping on a tiny case (no timing is asserted)."""

from cnorm import _bench


def test_case_floor_uses_a_copy_timed_in_its_rounds():
    case = _bench.Case("batch_norm", "fwd", (4, 8, 16, 16))
    row = _bench.run_case(case, ["cython"], 1, repeat=3, budget_s=0.5, llc_bytes=1 << 16)
    assert row["copy_bandwidth_Bps"] > 0
    assert row["floor_s"] == case.floor_factor * case.nbytes / row["copy_bandwidth_Bps"]
    res = row["results"]["cython"]
    assert res["n"] >= 3 and res["floor_fraction"] == row["floor_s"] / res["median_s"]
    assert _bench.COPY not in row["results"]  # the reference is not reported as a backend


def test_rotation_outgrows_any_last_level_cache():
    # a 300 MB LLC (the 16-core Xeon host of the device machines) once held a
    # whole rotation of 16 copies: inputs and the floor's copy came from cache
    case = _bench.Case("batch_norm", "bwd", (32, 64, 56, 56), dtype="bfloat16")
    per = 2 * case.nbytes  # x and dy
    for llc in (1 << 20, 32 << 20, 300 << 20):
        n = _bench.n_copies(case, llc)
        assert n * per > 2 * llc and n * per <= _bench.COPIES_BYTES
    assert _bench.n_copies(case, 64 << 30) * per <= _bench.COPIES_BYTES  # capped by memory


def test_cpu_capability_runs_both_libraries_at_that_level(tmp_path):
    """--cpu-capability LEVEL: cnorm's kernels at LEVEL, PyTorch at the matching
    ATEN_CPU_CAPABILITY, both recorded in bench.json."""
    import json
    import os
    import subprocess
    import sys

    import pytest

    from cnorm import _cpu

    pytest.importorskip("torch")
    if "baseline" not in _cpu.usable_levels():
        pytest.skip("the baseline level is not compiled here")
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", _cpu.ENV)}
    subprocess.run([sys.executable, "-m", "cnorm", "bench", "--quick", "--cpu-capability", "baseline",
                    "--backends", "cython,torch", "--dtypes", "float32", "--filter", "layer_norm-fwd-32x64",
                    "--repeat", "3", "--out", str(tmp_path)], check=True, env=env, capture_output=True)
    with open(tmp_path / "bench.json") as f:
        report = json.load(f)
    assert report["cpu_capability"] == {"cnorm": "baseline", "torch": "default"}
    bad = subprocess.run([sys.executable, "-m", "cnorm", "bench", "--cpu-capability", "avx9000"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--cpu-capability" in bad.stderr and "avx9000" in bad.stderr
