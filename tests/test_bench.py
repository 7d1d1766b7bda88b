"""``python -m cnorm bench``'s bookkeeping on a tiny case (no timing is asserted)."""

import pytest

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


def _checked(monkeypatch):
    """The labels of every result _bench.check compares with the reference."""
    seen = []
    check = _bench.check

    def spy(got, want, what, tol=1e-4):
        seen.append(what.rsplit("[", 1)[1].rstrip("]"))
        check(got, want, what, tol)

    monkeypatch.setattr(_bench, "check", spy)
    return seen


def test_plain_and_out_variants_are_checked_and_timed_in_the_same_rounds(monkeypatch):
    pytest.importorskip("torch")
    seen = _checked(monkeypatch)
    case = _bench.Case("batch_norm", "bwd", (4, 8, 16, 16))
    row = _bench.run_case(case, ["numpy", "cython", "torch"], 1, repeat=3, budget_s=0.5, llc_bytes=1 << 16)
    assert sorted(seen) == ["cython", "cython out", "numpy", "torch", "torch out"]
    res = row["results"]
    assert "out" not in res["numpy"] and "out_speedup" not in res["numpy"]  # the reference: plain only
    for b in ("cython", "torch"):
        plain, out = res[b], res[b]["out"]
        assert plain["n"] >= 3 and out["n"] >= 3 and out["out_variant"] is True
        assert out["floor_fraction"] == row["floor_s"] / out["median_s"]
        assert res[b]["out_speedup"] == plain["median_s"] / out["median_s"]
        assert plain["minor_faults_per_call"] >= 0 and out["minor_faults_per_call"] >= 0
    assert res["cython"]["speedup_vs_torch"] == res["torch"]["median_s"] / res["cython"]["median_s"]
    cn_out, torch_out = res["cython"]["out"], res["torch"]["out"]
    assert cn_out["speedup_vs_torch"] == torch_out["median_s"] / cn_out["median_s"]
    assert res["cython"]["out"]["out_op"] == "cnorm.batch_norm_backward(out=)"
    assert res["torch"]["out"]["out_op"] == "aten::native_batch_norm_backward.out"
    assert res["torch"]["out"]["out_kernel"] in (True, False, None)


def test_out_variants_write_into_one_reused_buffer_per_input_copy():
    case = _bench.Case("layer_norm", "fwd", (64, 32))
    inp = _bench.make_inputs(case, 3)
    call, first = _bench.runner(case, inp, "cython", "out", out_buffers="per-copy")
    bufs = {id(call()) for _ in range(6)} | {id(first())}
    assert len(bufs) == 3  # one per copy, the same ones every round
    assert not any(b is x for x in inp.xs for b in bufs)


def test_torch_without_an_out_variant_reports_its_plain_call(monkeypatch):
    pytest.importorskip("torch")
    seen = _checked(monkeypatch)
    case = _bench.Case("instance_norm", "fwd", (2, 4, 8, 8))
    assert _bench.torch_out_op(case) is None
    row = _bench.run_case(case, ["cython", "torch"], 1, repeat=3, budget_s=0.5, llc_bytes=1 << 16)
    assert sorted(seen) == ["cython", "cython out", "torch"]  # no second torch call to check
    torch_res = row["results"]["torch"]
    out = torch_res["out"]
    assert out["out_variant"] is False and out["out_op"] is None
    assert out["median_s"] == torch_res["median_s"] and out["n"] == torch_res["n"]
    cn_out = row["results"]["cython"]["out"]
    assert cn_out["speedup_vs_torch"] == out["median_s"] / cn_out["median_s"]  # out vs torch's plain call
    table = _bench.format_table([row], ["cython", "torch"])
    assert "*" in table.splitlines()[2] and "no out variant" in table


def _bench_main(monkeypatch, tmp_path, *flags):
    """``python -m cnorm bench`` in this process on one tiny case, with mallopt spied on:
    (the number of keep_freed_memory calls, stdout, bench.json)."""
    import json

    calls = []
    monkeypatch.setattr(_bench, "keep_freed_memory", lambda: calls.append(1) or True)
    out = tmp_path / "-".join(flags or ("default",))
    assert _bench.main(["--quick", "--backends", "cython", "--dtypes", "float32", "--filter", "layer_norm-fwd-32x64",
                        "--repeat", "3", "--out", str(out), *flags]) == 0
    with open(out / "bench.json") as f:
        return len(calls), json.load(f)


def test_default_allocator_policy_is_glibcs_and_recorded(monkeypatch, tmp_path, capsys):
    n, report = _bench_main(monkeypatch, tmp_path)
    stdout = capsys.readouterr().out
    assert n == 0  # no mallopt unless asked
    assert report["allocator"]["policy"] == "default" and report["freed_memory_kept"] is False
    assert stdout.splitlines()[0] == f"allocator: {_bench.ALLOCATOR[False]}"
    assert set(report["cases"][0]["results"]["cython"]) >= {"out", "out_speedup"}

    n, report = _bench_main(monkeypatch, tmp_path, "--keep-freed-memory")
    assert n == 1
    assert report["allocator"]["policy"] == "keep_freed_memory" and report["freed_memory_kept"] is True
    assert capsys.readouterr().out.splitlines()[0] == f"allocator: {_bench.ALLOCATOR[True]}"

    n, report = _bench_main(monkeypatch, tmp_path, "--system-malloc")  # deprecated: the default now
    assert n == 0 and report["allocator"]["policy"] == "default"
    assert "deprecated" in capsys.readouterr().err


def test_to_markdown_renders_plain_and_out_columns(tmp_path):
    import importlib.util
    import json
    import os

    spec = importlib.util.spec_from_file_location(
        "to_markdown", os.path.join(os.path.dirname(__file__), "..", "bench", "to_markdown.py"))
    md = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(md)

    def res(ms, out_ms, **out):
        return {"median_s": ms / 1e3, "n": 3, "floor_fraction": 0.5, "speedup_vs_torch": None,
                "out": {"median_s": out_ms / 1e3, "n": 3, "floor_fraction": 0.25, "out_variant": True, **out}}

    cases = []
    for name, torch_out in (("batch_norm-fwd-4x8-cf", {"out_kernel": True}),
                            ("layer_norm-fwd-4x8-cf", {"out_kernel": False}),
                            ("instance_norm-fwd-4x8x2-cf", {"out_variant": False})):
        cn, tr = res(2.0, 1.0), res(4.0, 4.0, **torch_out)
        cn.update(out_speedup=2.0, speedup_vs_torch=2.0)
        cn["out"]["speedup_vs_torch"] = 4.0
        cases.append({"case": name, "latency": False, "copy_bandwidth_Bps": 1e10,
                      "results": {"cython": cn, "torch": tr}})
    report = {"machine": {"cpu": "cpu", "cores": 2}, "threads": 2, "torch": "2.13.0", "copy_bandwidth_Bps": 1e10,
              "cpu_capability": {"cnorm": "avx2", "torch": "avx2"}, "cases": cases,
              "allocator": _bench.allocator_policy(False)}
    text = md.table(report)
    assert _bench.ALLOCATOR[False] in text.splitlines()[0]
    assert "| cnorm plain ms | cnorm out ms | out speed-up | torch plain ms | torch out ms |" in text
    rows = [line for line in text.splitlines() if line.startswith("| batch") or line.startswith("| layer")
            or line.startswith("| instance")]
    assert rows[0] == "| batch_norm-fwd-4x8-cf | float32 | 2 | 1 | 2.00 | 4 | 4 | 2.00 | 4.00 | 25% | 25% |"
    assert "| 4† |" in rows[1] and "| 4\\* |" in rows[2] and "† PyTorch" in text and "\\* PyTorch" in text
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    for ratio, label in (("plain", "plain vs plain"), ("out", "out vs out")):
        assert md.main(["--levels", str(path), "--ratio", ratio]) == 0
    summary = md.levels([report], "out")
    assert "(out vs out)" in summary and "| 3 of 3 | 4.00 (batch_norm-fwd-4x8-cf float32) |" in summary
    fused = {"case": "add+rms_norm-fwd-4x8-cf-bfloat16", "latency": False, "copy_bandwidth_Bps": 1e10,
             "baseline": {"median_s": 3e-3, "n": 3},
             "results": {"cython": {**res(1.5, 1.0), "speedup_vs_unfused": 2.0, "speedup_vs_torch": 4.0},
                         "torch": res(6.0, 6.0)}}
    text = md.fused_table([{**report, "cases": cases + [fused]}])
    assert "| add+rms_norm-fwd-4x8-cf | bfloat16 | 1.5 | 3 | 6 | 2.00 | 4.00 |" in text
    assert "batch_norm-fwd-4x8-cf" not in text  # (only the rows with an unfused sequence)


def test_out_buffers_one_reuses_a_single_buffer():
    pytest.importorskip("torch")
    case = _bench.Case("group_norm", "bwd", (2, 8, 4, 4), groups=2)
    inp = _bench.make_inputs(case, 3)
    want = _bench.reference(case, inp)
    for backend in ("cython", "torch"):
        call, first = _bench.runner(case, inp, backend, "out", out_buffers="one")
        _bench.check(first(), want, backend)
        dx = (lambda r: r[0]) if backend == "torch" else (lambda r: r)
        ptrs = {(dx(call()).data_ptr() if backend == "torch" else dx(call()).ctypes.data) for _ in range(4)}
        assert len(ptrs) == 1
    with pytest.raises(ValueError, match="out_buffers"):
        _bench.runner(case, inp, "cython", "out", out_buffers="two")


def test_isolate_runs_each_case_in_a_fresh_process(monkeypatch, tmp_path, capsys):
    import subprocess

    children = []
    run = subprocess.run

    def spy(cmd, *a, **kw):
        children.append(cmd)
        return run(cmd, *a, **kw)

    monkeypatch.setattr(subprocess, "run", spy)
    n, report = _bench_main(monkeypatch, tmp_path, "--isolate", "--out-buffers", "one")
    assert n == 0 and report["isolated"] is True and report["out_buffers"] == "one"
    (cmd,) = children
    assert cmd[cmd.index("--case") + 1] == "layer_norm-fwd-32x64-cf" and "--keep-freed-memory" not in cmd
    assert cmd[cmd.index("--out-buffers") + 1] == "one"
    (row,) = report["cases"]
    assert row["case"] == "layer_norm-fwd-32x64-cf" and row["results"]["cython"]["out"]["n"] >= 3
    assert "cases: each in a fresh process" in capsys.readouterr().out


def test_out_summary_separates_fresh_outputs(tmp_path, capsys):
    """bench/out_summary.py: out speed-ups split by whether the plain call page-faulted,
    and out against a kept-memory run's plain calls."""
    import importlib.util
    import json
    import os

    spec = importlib.util.spec_from_file_location(
        "out_summary", os.path.join(os.path.dirname(__file__), "..", "bench", "out_summary.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def report(plain_a, out_a, faults_a, plain_b, out_b):
        def res(plain, out, faults):
            return {"cython": {"median_s": plain, "n": 3, "minor_faults_per_call": faults,
                               "out": {"median_s": out, "n": 3}}}
        return {"cases": [{"case": "a", "results": res(plain_a, out_a, faults_a)},
                          {"case": "b", "results": res(plain_b, out_b, 0.0)}]}

    default, kept = tmp_path / "d.json", tmp_path / "k.json"
    default.write_text(json.dumps(report(4e-3, 2e-3, 500.0, 1e-3, 1e-3)))
    kept.write_text(json.dumps(report(2.2e-3, 2e-3, 0.0, 1e-3, 1e-3)))
    assert mod.main([str(default), str(kept)]) == 0
    text = capsys.readouterr().out
    assert "| a | 500 | 4 | 2 | 2.00 | 2.2 | 1.10 |" in text
    assert "page-faults its output (1 cases): 2.00 (a) to 2.00 (a)" in text
    assert "where it does not (1 cases): 1.00 (b)" in text


@pytest.mark.parametrize("case", [
    _bench.Case("rms_norm", "fwd", (64, 96)),
    _bench.Case("rms_norm", "bwd", (64, 96)),
    _bench.Case("layer_norm", "fwd", (64, 96), fuse="add"),
    _bench.Case("rms_norm", "bwd", (64, 96), fuse="add"),
    _bench.Case("batch_norm", "bwd", (4, 8, 6, 6), fuse="relu"),
    _bench.Case("group_norm", "fwd", (2, 8, 6, 6), groups=4, fuse="silu"),
    _bench.Case("group_norm", "bwd", (2, 8, 6, 6), groups=4, fuse="silu", dtype="bfloat16"),
], ids=lambda c: c.name)
def test_fused_cases_check_every_runner_and_time_the_unfused_sequence(monkeypatch, case):
    """Fused rows: cnorm fused (plain, out), PyTorch eager doing the same work and cnorm's
    unfused sequence, each checked against the NumPy reference and timed in the same rounds."""
    pytest.importorskip("torch")
    seen = _checked(monkeypatch)
    row = _bench.run_case(case, ["numpy", "cython", "torch"], 1, repeat=3, budget_s=0.3, llc_bytes=1 << 16)
    want = ["cython", "cython out", "numpy", "torch"]
    if case.fuse:  # (an RMSNorm row's baseline is LayerNorm: timed, not compared)
        want.append("unfused")
    assert sorted(seen) == sorted(want)
    res = row["results"]
    assert res["torch"]["out"]["out_variant"] is False  # PyTorch has no fused op: its plain call
    assert row["baseline"]["n"] >= 3
    assert res["cython"]["speedup_vs_unfused"] == row["baseline"]["median_s"] / res["cython"]["median_s"]
    assert row["floor_s"] == case.floor_factor * case.nbytes / row["copy_bandwidth_Bps"]
    assert case.floor_factor == (4 if case.fuse == "add" else 2 if case.direction == "fwd" else 3)


def test_default_cases_include_the_fused_rows():
    names = {c.name for c in _bench.fused_cases()}
    assert {"rms_norm-fwd-8192x768-cf", "rms_norm-bwd-2048x4096-cf", "add+rms_norm-fwd-8192x768-cf",
            "add+layer_norm-bwd-8192x768-cf", "batch_norm+relu-fwd-32x64x56x56-cf",
            "group_norm+silu-G32-bwd-16x256x32x32-cf"} <= names
    halves = {c.name for c in _bench.half_cases(("bfloat16", "float16"))}
    assert "batch_norm+relu-fwd-32x64x56x56-cf-bfloat16" in halves
    assert not any(n.endswith("float16") and "+" in n and "bfloat16" not in n for n in halves)


def test_pytorch_section_times_the_adapters_and_both_models(tmp_path):
    """--pytorch-only: the adapters' per-call times and both models' training steps,
    with and without replace_norms, printed and written to pytorch.json."""
    import json
    import os
    import subprocess
    import sys

    import pytest

    pytest.importorskip("torch")
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    run = subprocess.run([sys.executable, "-m", "cnorm", "bench", "--pytorch-only", "--quick", "--threads", "1",
                          "--quiet", "--out", str(tmp_path)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    with open(tmp_path / "pytorch.json") as f:
        report = json.load(f)
    assert set(report["training_step"]) == {"resnet", "transformer"}
    for row in report["training_step"].values():
        assert row["torch_nn_s"] > 0 and row["replace_norms_s"] > 0
        assert f"{row['torch_nn_s'] * 1e3:.2f} ms" in run.stdout
    assert "cnorm.layer_norm, torch tensors (DLPack)" in report["overhead_s"]
    assert report["threads"] == 1 and report["cpu_level"] in ("baseline", "avx2", "avx512")


def test_training_step_under_torch_compile(monkeypatch, capsys):
    """bench/torch_interop.py --compile: both variants of a model under torch.compile
    (Inductor), the compiling steps untimed, the line printed."""
    import pytest

    torch = pytest.importorskip("torch")
    from cnorm import _bench_torch as bt

    def tiny():
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(),
                                   torch.nn.Linear(32, 10))

    monkeypatch.setitem(bt.MODELS, "tiny", ("a tiny LayerNorm network", tiny, (8, 16)))
    out = bt.models(["tiny"], 0.2, False, compile=True)
    row = out["tiny"]
    assert row["what"].endswith(", torch.compile") and row["torch_nn_s"] > 0 and row["replace_norms_s"] > 0
    assert "training step, a tiny LayerNorm network, torch.compile: torch.nn" in capsys.readouterr().out
