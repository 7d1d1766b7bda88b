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
