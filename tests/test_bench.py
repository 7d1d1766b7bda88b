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
