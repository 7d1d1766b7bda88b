"""``python -m cnorm bench``'s report: trust checks and the progress counter on made-up
numbers (no timing is asserted), the OpenMP wait policy the runtimes see, the plot."""

import io
import json
import os
import re
import subprocess
import sys

import pytest

from cnorm import _bench, _bench_report as rep

GB = 1e9


# -- trust checks: pure functions on synthetic numbers -----------------------------------

def test_copy_spread_flags_an_unsteady_bandwidth_only():
    assert rep.copy_spread([10 * GB, 12 * GB, 11 * GB]) == pytest.approx(0.2)
    assert rep.copy_spread([10 * GB]) is None and rep.copy_spread([]) is None
    assert rep.check_copy([10 * GB, 12 * GB, 11 * GB]) is None  # 20%: within the limit
    w = rep.check_copy([0.7 * GB, 73.6 * GB, 20 * GB])
    assert w["code"] == "B" and "0.7 to 73.6 GB/s" in w["detail"]
    assert "busy" in w["remedy"] and "rerun" in w["remedy"]
    assert rep.check_copy([10 * GB, 12.6 * GB]) is not None  # 26% > 25%
    assert rep.check_copy([10 * GB, 12.6 * GB], limit=0.3) is None


def test_floor_check_flags_results_faster_than_memory_allows():
    assert rep.check_floor({"cython": 0.95, "torch": 1.05, "numpy": None}) is None  # within noise
    w = rep.check_floor({"cython out": 2.04, "torch out": 5.07, "numpy": 0.3})
    assert w["code"] == "F" and "torch out" in w["detail"] and "507%" in w["detail"]
    assert "cython out" in w["detail"] and "numpy" not in w["detail"]
    assert "floor" in w["remedy"] and "rerun" in w["remedy"]
    assert rep.check_floor({"cython": 1.12}) is not None  # median at 89% of the floor's time
    assert rep.check_floor({"cython": 1.10}) is None      # at 91%


@pytest.mark.parametrize("load1,others,threads,cores,avail,expect", [
    (0.5, 0, 2, 2, 2, None),
    (2.0, 0, 2, 2, 2, None),           # the benchmark's own threads fill the cores: fine
    (3.2, 0, 2, 2, 2, "load average 3.20 above 2 cores"),
    (0.5, 1, 2, 2, 2, "1 other runnable threads"),
    (0.5, 1, 2, 4, 4, None),           # room for the other thread
    (0.5, 0, 4, 8, 2, "4 threads asked for, 2 cores available"),
    (None, None, 2, 2, 2, None),       # unknown (not Linux): no claim
])
def test_load_check(load1, others, threads, cores, avail, expect):
    w = rep.check_load(load1, others, threads, cores, avail)
    if expect is None:
        assert w is None
    else:
        assert w["code"] == "L" and expect in w["detail"] and "noisy" in w["remedy"]


def _row(bandwidths, cython_floor, torch_out_floor, load1=0.1, others=0):
    return {"case": "layer_norm-fwd-8x8-cf", "copy_bandwidths_Bps": bandwidths, "load_average": load1,
            "runnable_others": others,
            "results": {"cython": {"floor_fraction": 0.5, "out": {"floor_fraction": cython_floor,
                                                                  "out_variant": True}},
                        "torch": {"floor_fraction": 0.4, "out": {"floor_fraction": torch_out_floor,
                                                                 "out_variant": True}}}}


def test_trust_of_a_row_and_the_table_footnotes():
    good = _row([10 * GB, 11 * GB], 0.8, 0.7)
    bad = _row([0.7 * GB, 73.6 * GB], 2.04, 5.07, load1=5.0)
    t_good, t_bad = rep.trust(good, 2, 2, 2), rep.trust(bad, 2, 2, 2)
    assert t_good == {"ok": True, "codes": "", "warnings": []}
    assert t_bad["ok"] is False and t_bad["codes"] == "BFL"
    assert [w["code"] for w in t_bad["warnings"]] == ["B", "F", "L"]
    # a PyTorch "out" that is its plain call (no out variant) is not counted twice
    plain_only = _row([10 * GB, 11 * GB], 0.8, 3.0)
    plain_only["results"]["torch"]["out"]["out_variant"] = False
    assert rep.trust(plain_only, 2, 2, 2)["ok"]

    good["trust"], bad["trust"] = t_good, t_bad
    notes = rep.trust_notes([good, bad])
    assert notes[0].startswith("check: 1 of 2 cases failed")
    assert any(n.strip().startswith("B:") and "frequency scaling" in n for n in notes)
    assert any(n.strip().startswith("F:") and "floor was measured low" in n for n in notes)
    assert any(n.strip().startswith("L:") and "other work is running" in n for n in notes)
    assert "every case passed" in rep.trust_notes([good])[0]


def test_table_marks_the_untrusted_rows():
    rows = []
    for name, trust in (("a-fwd-8-cf", {"ok": True, "codes": "", "warnings": []}),
                        ("b-fwd-8-cf", {"ok": False, "codes": "BF", "warnings": []})):
        res = {"median_s": 1e-3, "n": 3, "floor_fraction": 0.5, "speedup_vs_torch": None}
        rows.append({"case": name, "latency": False, "trust": trust, "results": {"cython": {**res,
                     "out_speedup": 1.0, "out": {**res, "out_variant": True}}}})
    table = _bench.format_table(rows, ["cython"]).splitlines()
    assert table[0].split()[-1] == "check"
    assert table[2].split()[-1] == "ok" and table[3].split()[-1] == "BF"
    assert any(line.startswith("  B:") for line in table) and not any(line.startswith("  L:") for line in table)


# -- progress counter ------------------------------------------------------------------------

class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_estimate_left_uses_the_budget_then_the_cases_done():
    assert rep.estimate_left(0, 10, 0.0, 5.0) == 50.0      # nothing done: the per-case estimate
    assert rep.estimate_left(2, 10, 30.0, 5.0) == 120.0    # 15 s a case so far, 8 left
    assert rep.estimate_left(10, 10, 99.0, 5.0) == 0


def test_progress_plain_lines_off_a_terminal():
    clock, out = _Clock(), io.StringIO()
    p = rep.Progress(3, 4.0, stream=out, clock=clock, tty=False)
    p.start_case("a")  # nothing on a log until a case is done
    assert out.getvalue() == ""
    clock.now += 10
    p.case_done("a")
    clock.now += 20
    p.case_done("b")
    lines = out.getvalue().splitlines()
    assert lines == ["bench: 1/3 cases done, 0:10 elapsed, about 0:20 left: a",
                     "bench: 2/3 cases done, 0:30 elapsed, about 0:15 left: b"]
    assert "\r" not in out.getvalue()


def test_progress_in_place_on_a_terminal_and_quiet():
    clock, out = _Clock(), io.StringIO()
    p = rep.Progress(2, 3600.0, stream=out, clock=clock, tty=True)
    p.start_case("first")
    assert out.getvalue() == "\r\x1b[Kbench: 0/2 cases done, 0:00 elapsed, about 2:00:00 left (now: first)"
    p.clear()
    clock.now += 65
    p.case_done()
    p.clear()
    assert out.getvalue().count("\r\x1b[K") == 4 and "\n" not in out.getvalue()
    assert "1/2 cases done, 1:05 elapsed, about 1:05 left" in out.getvalue()
    quiet = io.StringIO()
    q = rep.Progress(2, 1.0, stream=quiet, clock=clock, tty=False, enabled=False)
    q.start_case("x")
    q.case_done("x")
    q.clear()
    assert quiet.getvalue() == ""


# -- OpenMP wait policy ------------------------------------------------------------------------

def test_wait_policy_plan():
    assert rep.wait_policy_plan({}, started=True, reexec_ok=True) == "reexec"
    assert rep.wait_policy_plan({}, started=True, reexec_ok=False) == "late"
    assert rep.wait_policy_plan({}, started=False, reexec_ok=False) == "set"
    assert rep.wait_policy_plan({"OMP_WAIT_POLICY": "active"}, True, True) == "user"
    assert rep.wait_policy_plan(rep.passive_env(), True, True) == "set"  # the re-executed process
    assert rep.wait_policy_record("late", {})["value"] is None


def _display_blocks(stderr: str):
    """The OpenMP runtimes' OMP_DISPLAY_ENV=VERBOSE blocks: (wait policy, how long a thread spins) each.

    libgomp shows the spin count (GOMP_SPINCOUNT, 0 when passive); LLVM's libomp (a clang
    build's runtime) shows OMP_WAIT_POLICY='PASSIVE' even by default, and what the policy set
    in KMP_BLOCKTIME (ms a thread spins: 200 by default, 0 when passive). Other runtimes show
    neither and are left out."""
    blocks = re.findall(r"OPENMP DISPLAY ENVIRONMENT BEGIN(.*?)OPENMP DISPLAY ENVIRONMENT END", stderr, re.S)
    found = [(re.search(r"OMP_WAIT_POLICY\s*=\s*'(\w+)'", b),
              re.search(r"(?:GOMP_SPINCOUNT|KMP_BLOCKTIME)\s*=\s*'(\d+)'", b)) for b in blocks]
    return [(w.group(1), n.group(1)) for w, n in found if w and n]


def _bench_subprocess(tmp_path, env_extra, *flags):
    env = {k: v for k, v in os.environ.items()
           if k not in (rep.WAIT_POLICY, rep.WAIT_POLICY_SET, "OMP_DISPLAY_ENV", "GOMP_SPINCOUNT")}
    env.update(env_extra, OMP_DISPLAY_ENV="VERBOSE")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "cnorm", "bench", "--quick", "--dtypes", "float32",
                           "--filter", "layer_norm-fwd-32x64", "--repeat", "3", "--out", str(out), *flags],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out / "bench.json") as f:
        return proc, json.load(f)


def test_bench_sets_a_passive_wait_policy_before_the_runtimes_start(tmp_path):
    """Unset by the user: the benchmark re-executes itself with OMP_WAIT_POLICY=PASSIVE, so
    every OpenMP runtime of the timing process (cnorm's libgomp, PyTorch's) starts with it:
    libgomp's OMP_DISPLAY_ENV shows a spin count of 0 (PASSIVE) in each runtime of the
    re-executed process (the first block is the process before it re-executed)."""
    from cnorm import _config

    if not _config.config()["openmp_compiled"]:
        pytest.skip("cnorm's extension is built without OpenMP")
    backends = "cython,torch" if _has_torch() else "cython"
    proc, report = _bench_subprocess(tmp_path, {}, "--backends", backends)
    blocks = _display_blocks(proc.stderr)
    if not blocks:
        pytest.skip("this OpenMP runtime does not show libgomp's spin count under OMP_DISPLAY_ENV (not libgomp)")
    assert len(blocks) >= 2, proc.stderr[-2000:]  # before and after the re-exec
    assert blocks[0][1] != "0"  # the default: spins
    assert all(b == ("PASSIVE", "0") for b in blocks[1:]), blocks
    assert report["openmp_wait_policy"]["value"] == "PASSIVE"
    assert "set by the benchmark" in report["openmp_wait_policy"]["source"]
    assert "OpenMP wait policy: PASSIVE (set by the benchmark" in proc.stdout
    if "torch" in backends:  # PyTorch ran in the same process, on the runtime(s) shown above
        assert report["cases"][0]["results"]["torch"]["n"] >= 3


def test_bench_keeps_the_users_wait_policy(tmp_path):
    from cnorm import _config

    if not _config.config()["openmp_compiled"]:
        pytest.skip("cnorm's extension is built without OpenMP")
    proc, report = _bench_subprocess(tmp_path, {"OMP_WAIT_POLICY": "passive"}, "--backends", "cython")
    # every runtime in the process (cnorm's, and any other library's) runs the user's policy
    assert all(b == ("PASSIVE", "0") for b in _display_blocks(proc.stderr))
    assert report["openmp_wait_policy"] == {"value": "passive", "source": "set by the user (OMP_WAIT_POLICY)"}
    assert "OpenMP wait policy: passive (set by the user" in proc.stdout


def _has_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# -- a tiny real run: the counter on stderr, --quiet, the trust fields in bench.json ---------------

def test_tiny_run_reports_progress_and_trust(tmp_path, capsys):
    args = ["--quick", "--backends", "cython", "--dtypes", "float32", "--filter", "batch_norm-fwd-8x32x28x28-cf",
            "--repeat", "3"]
    assert _bench.main([*args, "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert re.search(r"^bench: 1/1 cases done, \d+:\d\d elapsed, about 0:00 left: batch_norm-fwd-8x32x28x28-cf$",
                     captured.err, re.M), captured.err
    assert "OpenMP wait policy:" in captured.out and "check" in captured.out
    with open(tmp_path / "a" / "bench.json") as f:
        report = json.load(f)
    (row,) = report["cases"]
    assert set(row["trust"]) == {"ok", "codes", "warnings"}
    assert len(row["copy_bandwidths_Bps"]) >= 3 and row["cores_available"] >= 1
    assert set(report["trust_checks"]["notes"]) == {"B", "F", "L"}
    assert report["versions"]["cnorm"] and report["versions"]["numpy"]

    assert _bench.main([*args, "--quiet", "--out", str(tmp_path / "b")]) == 0
    assert "cases done" not in capsys.readouterr().err


# -- the plot ------------------------------------------------------------------------------

def _plot_rows():
    cases = [_bench.Case("batch_norm", "fwd", (32, 64, 56, 56)),
             _bench.Case("batch_norm", "bwd", (32, 56, 56, 64), "cl", dtype="bfloat16"),
             _bench.Case("batch_norm", "fwd", (32, 64, 56, 56), training=False),
             _bench.Case("layer_norm", "fwd", (32, 64), latency=True),
             _bench.Case("group_norm", "bwd", (16, 256, 32, 32), groups=32, dtype="float16"),
             _bench.Case("instance_norm", "fwd", (16, 64, 128, 128)),
             _bench.Case("rms_norm", "fwd", (8192, 768)),
             _bench.Case("layer_norm", "bwd", (8192, 768), fuse="add"),
             _bench.Case("batch_norm", "fwd", (32, 64, 56, 56), fuse="relu")]
    rows = []
    for i, c in enumerate(cases):
        def res(speedup, floor):
            return {"median_s": 1e-3, "n": 3, "floor_fraction": None if c.latency else floor,
                    "speedup_vs_torch": speedup}
        rows.append({"case": c.name, "norm": c.norm, "dtype": c.dtype, "latency": c.latency,
                     "floor_s": None if c.latency else 1e-3,
                     "trust": {"ok": i != 1, "codes": "" if i != 1 else "BL", "warnings": []},
                     "results": {"cython": {**res(0.8 + i, 0.5), "out": {**res(1.1 + i, 0.6), "out_variant": True}},
                                 "torch": {**res(1.0, 0.3), "out": {**res(1.0, 0.2), "out_variant": True}}}})
    return rows


def test_plot_groups_rows_by_norm_with_short_labels():
    rows = _plot_rows()
    layout = rep.plot_layout(rows)
    assert [t for t, _ in layout] == ["BatchNorm", "LayerNorm", "InstanceNorm", "GroupNorm", "RMSNorm",
                                      "Fused: residual add + norm, norm + activation"]
    assert sum(len(m) for _, m in layout) == len(rows)
    labels = [rep.short_label(r) for _, m in layout for r in m]
    assert labels == ["fwd 32×64×56×56", "bwd 32×56×56×64 NHWC bf16", "fwd 32×64×56×56 eval",
                      "fwd 32×64 latency", "fwd 16×64×128×128", "bwd 16×256×32×32 G32 f16", "fwd 8192×768",
                      "add+LN bwd 8192×768", "BN+relu fwd 32×64×56×56"]
    assert max(map(len, labels)) <= 30


def test_plot_title_names_machine_threads_level_versions_and_date():
    title = rep.plot_title({"cpu": "Some CPU", "threads": 2, "levels": {"cnorm": "avx2", "torch": "avx2"},
                            "versions": {"cnorm": "0.1.0", "torch": "2.13.0+cpu", "numpy": "2.4.6"},
                            "date": "2026-12-02"})
    for part in ("Some CPU", "2 threads", "cnorm avx2", "PyTorch avx2", "cnorm 0.1.0", "torch 2.13.0+cpu",
                 "numpy 2.4.6", "2026-12-02"):
        assert part in title


def test_plot_writes_a_figure_of_readable_size(tmp_path):
    pytest.importorskip("matplotlib")
    import struct

    def size(p):  # a PNG's IHDR: width and height
        return struct.unpack(">II", p.read_bytes()[16:24])

    rows = _plot_rows() * 6  # as many rows as a full run
    path = tmp_path / "bench.png"
    rep.plot(rows, ["numpy", "cython", "torch"], str(path), {"cpu": "cpu", "threads": 2})
    width, height = size(path)
    assert width <= 1400 and height <= 40 * len(rows)  # not 4000 px wide; about 25 px a row
    rep.plot(rows[:3], ["cython"], str(path))  # no PyTorch: a figure still
    assert size(path)[0] <= 1400


def test_to_markdown_header_names_the_wait_policy_and_untrusted_cases():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "to_markdown", os.path.join(os.path.dirname(__file__), "..", "bench", "to_markdown.py"))
    md = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(md)
    report = {"machine": {"cpu": "cpu", "cores": 2}, "threads": 2, "torch": "2.13.0", "copy_bandwidth_Bps": 1e10,
              "openmp_wait_policy": {"value": "PASSIVE", "source": "set by the benchmark"},
              "cases": [{"case": "a", "copy_bandwidth_Bps": 1e10, "trust": {"codes": "B"}},
                        {"case": "b", "copy_bandwidth_Bps": 1e10, "trust": {"codes": ""}}]}
    text = md.header(report)
    assert "OpenMP wait policy: PASSIVE" in text and "1 of 2 cases failed" in text
    del report["openmp_wait_policy"], report["cases"][0]["trust"]  # an older bench.json
    assert "wait policy" not in md.header(report) and "failed" not in md.header(report)
