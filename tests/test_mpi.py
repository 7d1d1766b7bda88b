"""SyncBatchNorm across real processes: ``mpiexec -n 1/2/3`` running tests/mpi_worker.py.

Ranks hold uneven batches (5, 0 and 11 samples with three ranks); each must
match single-process BatchNorm on the concatenated batch, and a bad input on
one rank, or ranks that disagree with each other, must raise on every rank
within seconds. An uncaught exception on one rank must end the job when it
runs under ``python -m mpi4py``, as the README's launch line says. mpi4py and the mpich wheel
(which provides mpiexec) come with ``pip install "cnorm-kernels[test]"``: in CI
(CI=true) their absence fails these tests instead of skipping them.

Where the "cupy" backend works, the same grid also runs with CuPy arrays on
2 and 3 ranks sharing the one current GPU: their statistics travel through MPI
via host memory (NCCL refuses two ranks on one device), and each rank must
match single-process cupy BatchNorm. Elsewhere that test is skipped with the
backend registry's reason.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import cnorm

pytestmark = pytest.mark.mpi

WORKER = Path(__file__).with_name("mpi_worker.py")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


CUPY_UNAVAILABLE = cnorm.available_backends(with_reasons=True)["cupy"]


def find_mpiexec():
    """$MPIEXEC if set, else the mpiexec installed beside this Python (the mpich wheel's), else the first on PATH.

    The one beside the interpreter comes before PATH: an unrelated system
    mpiexec on PATH would start ranks that the MPI library mpi4py loaded does
    not see as one job (each would be a singleton). $MPIEXEC is for an MPI
    installed elsewhere (e.g. the mpich wheel unpacked under another prefix).
    """
    if os.environ.get("MPIEXEC"):
        return os.environ["MPIEXEC"]
    names = ("mpiexec", "mpiexec.exe", "mpirun")
    dirs = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]
    user = sysconfig.get_path("scripts", f"{os.name}_user")
    if user:
        dirs.append(Path(user))
    for d in dirs:
        for name in names:
            if (d / name).is_file() and os.access(d / name, os.X_OK):
                return str(d / name)
    return shutil.which("mpiexec") or shutil.which("mpirun")


@pytest.fixture(scope="module")
def mpiexec():
    missing = []
    if importlib.util.find_spec("mpi4py") is None:
        missing.append("mpi4py")
    path = find_mpiexec()
    if path is None:
        missing.append("mpiexec")
    if missing:
        why = f"{' and '.join(missing)} not found: pip install 'cnorm-kernels[mpi]' (mpi4py and the mpich wheel)"
        if IN_CI:
            pytest.fail(f"{why}; CI installs cnorm-kernels[test], which includes them")
        pytest.skip(why)
    return path


def run_job(mpiexec, n, mode, out, timeout, python_args=()):
    """Run the worker on ``n`` ranks (``python *python_args mpi_worker.py``); return (cmd, returncode, stdout, stderr).

    Fails the test, after killing the whole job, if it has not ended within ``timeout`` seconds.
    """
    env = dict(os.environ)
    root = str(Path(cnorm.__file__).resolve().parents[1])  # the cnorm under test, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"  # n ranks share the cores; no OpenMP oversubscription
    env.setdefault("HYDRA_LAUNCHER", "fork")  # MPICH: start local ranks directly, never over ssh
    cmd = [mpiexec, "-n", str(n), sys.executable, *python_args, str(WORKER), mode, str(n), str(out)]
    # A session of its own, so that a hung job is killed whole (mpiexec and every rank).
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout} s (a rank hung?)\n"
                    f"stdout: {stdout[-3000:]}\nstderr: {stderr[-3000:]}")
    return cmd, proc.returncode, stdout, stderr


def launch(mpiexec, n, mode, tmp_path, timeout):
    """Run the worker on ``n`` ranks; return each rank's result dict, in rank order."""
    out = tmp_path / f"{mode}-{n}"
    out.mkdir()
    cmd, returncode, stdout, stderr = run_job(mpiexec, n, mode, out, timeout)
    files = sorted(out.glob("rank*.json"))
    assert returncode == 0 and len(files) == n, (
        f"{' '.join(cmd)} exited with {returncode}, {len(files)} of {n} ranks reported\n"
        f"stdout: {stdout[-3000:]}\nstderr: {stderr[-3000:]}"
    )
    results = sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["rank"])
    for r in results:
        assert "error" not in r, f"rank {r['rank']}: {r['error']}"
        assert r["size"] == n
    return results


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ranks_match_single_process_batchnorm(mpiexec, n, tmp_path):
    """Functional grid (layouts incl. channels-last, dtypes, affine, |mean| >> std) and the layer."""
    for r in launch(mpiexec, n, "match", tmp_path, timeout=120):
        assert r["cases"] >= 10, r
        assert not r["failures"], f"rank {r['rank']}:\n" + "\n".join(r["failures"])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_bad_input_on_one_rank_fails_every_rank(mpiexec, n, tmp_path):
    """The last rank's bad x (functional and layer) or dy: every rank raises within seconds."""
    results = launch(mpiexec, n, "fail", tmp_path, timeout=30)
    bad = n - 1
    expected = {"forward": "expected 3 channels", "layer": "expected 3 channels", "backward": "dy: expected shape",
                "forward-unpinned": "x: expected 3 channels on every rank"}  # found by the handshake
    for r in results:
        calls = r["calls"]
        assert set(calls) == set(expected) - ({"forward-unpinned"} if n == 1 else set())
        for what, got in calls.items():
            where = f"rank {r['rank']} of {n}, {what}"
            assert got["type"] is not None, f"{where}: no error raised"
            assert got["seconds"] < 5, f"{where}: took {got['seconds']:.1f} s to fail"
            if r["rank"] == bad:
                assert got["type"] in ("ValueError", "TypeError") and not got["peer"], got
                assert expected[what] in got["message"], got
            else:
                assert got["peer"] and f"rank {bad} of {n}" in got["message"], got


@pytest.mark.parametrize("n", [2, 3])
def test_ranks_disagreeing_with_each_other_all_raise(mpiexec, n, tmp_path):
    """One rank's arguments are consistent but disagree with the others' (4 channels where they have 3, in
    a functional forward with running statistics, one without any parameter, a layer, a backward of
    another forward; a backward where the others run a forward). Collectives of different sizes made
    MPICH abort the job ("Message truncated") after the 4-channel rank had returned wrong output and
    running statistics; now the handshake finds it: the odd rank (rank 1 of 2: rank 0 is the reference;
    rank 0 of 3: the majority is) raises a ValueError, the others a PeerError naming it, no running
    statistic or gradient changes, and the next call works."""
    results = launch(mpiexec, n, "mismatch", tmp_path, timeout=60)
    odd = 1 if n == 2 else 0
    channels = "x: expected 3 channels on every rank"
    expected = {"forward": channels, "forward-unpinned": channels, "layer": channels,
                "backward": f"saved: rank {odd} of {n} differentiates its synchronized forward call",
                "out-of-step": f"rank {odd} of {n} is out of step with the others"}
    for r in results:
        calls = r["calls"]
        assert calls.pop("odd") == odd
        assert set(calls) == set(expected)
        for what, got in calls.items():
            where = f"rank {r['rank']} of {n}, {what}"
            assert got["type"] is not None, f"{where}: no error raised"
            assert got["seconds"] < 5, f"{where}: took {got['seconds']:.1f} s to fail"
            assert got["untouched"], f"{where}: running statistics changed"
            assert not any(got["gradients"]), f"{where}: a gradient was set"
            if r["rank"] == odd:
                assert got["type"] == "ValueError" and not got["peer"], got
                assert expected[what] in got["message"], got
            else:
                assert got["peer"] and f"rank {odd} of {n}" in got["message"], got


@pytest.mark.parametrize("n", [2, 3])
def test_uncaught_exception_under_python_m_mpi4py_ends_the_job(mpiexec, n, tmp_path):
    """What the README's launch line promises: under ``python -m mpi4py``, rank 1's uncaught exception
    aborts the job while the other ranks wait in a SyncBatchNorm forward (with plain ``python`` they
    would wait forever)."""
    out = tmp_path / f"uncaught-{n}"
    out.mkdir()
    cmd, returncode, stdout, stderr = run_job(mpiexec, n, "uncaught", out, timeout=60, python_args=("-m", "mpi4py"))
    waiting = sorted(f.name for f in out.glob("waiting*"))
    assert returncode != 0, f"{' '.join(cmd)} exited with 0\nstdout: {stdout[-3000:]}\nstderr: {stderr[-3000:]}"
    assert "RuntimeError: rank 1 ends with an uncaught exception" in stderr, stderr[-3000:]
    assert waiting == [f"waiting{r}" for r in range(n) if r != 1], waiting  # they were in the collective ...
    assert not list(out.glob("left*")), "a waiting rank got past the collective"  # ... and never left it


@pytest.mark.gpu
@pytest.mark.skipif(CUPY_UNAVAILABLE is not None, reason=f"backend 'cupy' unavailable: {CUPY_UNAVAILABLE}")
@pytest.mark.parametrize("n", [2, 3])
def test_cupy_ranks_on_one_gpu_match_single_process_batchnorm(mpiexec, n, tmp_path):
    """The grid and the layer with CuPy arrays, n ranks on one GPU exchanging through MPI via host memory."""
    results = launch(mpiexec, n, "match-cupy", tmp_path, timeout=150)
    for r in results:
        assert r["cases"] >= 10, r
        assert r["exchange"] == "MPIExchange", f"rank {r['rank']}: ranks sharing one GPU used {r['exchange']}"
        assert not r["failures"], f"rank {r['rank']}:\n" + "\n".join(r["failures"])
    assert len({r["device"] for r in results}) == 1, [r["device"] for r in results]
