"""The documentation: the site builds without a warning, and every example runs.

Each check runs in a subprocess, as a user or CI would run it from the
repository root:

* ``python -m sphinx -W --keep-going -b html docs ...``: any warning (a broken
  reference, a malformed docstring, a page missing from the table of contents)
  fails the build;
* ``python -m sphinx -b doctest docs ...``: the examples of every page and of
  every docstring the API reference includes;
* ``python -m pytest --doctest-modules cnorm``: the examples of every
  docstring in the package, the modules the site does not show included;
* the SyncBatchNorm training script of the distributed guide, under
  ``mpiexec -n 2``.

Sphinx, numpydoc, the theme and MyST come with the ``test`` extra (and the
``docs`` extra); without Sphinx the checks skip, saying so.
"""

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sphinx") is None,
    reason="Sphinx is not installed: pip install -e '.[docs]' (or '.[test]') to build and test the documentation",
)


def run(cmd, timeout, env=None):
    """Run ``cmd`` from the repository root in its own session; return (returncode, output)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} did not finish within {timeout} s\n{out[-3000:]}")
    return proc.returncode, out


@pytest.fixture(scope="module")
def doctrees(tmp_path_factory):
    """One doctree cache shared by the HTML and doctest builds (the second reuses the first's reading)."""
    return tmp_path_factory.mktemp("doctrees")


def test_html_builds_without_warnings(doctrees, tmp_path):
    out = tmp_path / "html"
    code, log = run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                     "-d", str(doctrees), str(DOCS), str(out)], timeout=300)
    assert code == 0, f"the HTML build failed or warned (sphinx -W):\n{log[-6000:]}"
    assert log.strip() == "", f"sphinx -q printed something (a warning?):\n{log[-6000:]}"
    # The site has its parts: the guide, the benchmark results (from the README) and the API reference.
    for page in ("index", "getting_started", "guide/layers", "guide/fused", "benchmarks", "architecture",
                 "design_notes", "api/nn", "changelog"):
        assert (out / f"{page}.html").is_file(), f"{page}.html was not built"
    api = (out / "api" / "nn.html").read_text(encoding="utf-8")
    for method in ("backward", "eval", "train", "state_dict", "load_state_dict", "freeze", "fold_into"):
        assert f'id="cnorm.nn.BatchNorm2d.{method}"' in api, f"BatchNorm2d.{method} is not documented"
    bench = (out / "benchmarks.html").read_text(encoding="utf-8")
    assert bench.count("<table") >= 2, "the README's benchmark tables were not included in benchmarks.html"
    # Nothing a reader sees points outside the repository.
    for page in out.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert "../shared" not in text and "DESIGN.md" not in text, f"{page.name} points outside the repository"


def test_doctests_of_pages_and_api_reference(doctrees, tmp_path):
    out = tmp_path / "doctest"
    code, log = run([sys.executable, "-m", "sphinx", "-q", "-b", "doctest",
                     "-d", str(doctrees), str(DOCS), str(out)], timeout=300)
    report = (out / "output.txt").read_text(encoding="utf-8") if (out / "output.txt").is_file() else ""
    first_failure = report.find("*" * 20)  # doctest frames each failing example with a line of stars
    failures = report[first_failure:first_failure + 6000] if first_failure >= 0 else report[-3000:]
    assert code == 0, f"an example in the documentation failed (sphinx -b doctest):\n{log[-3000:]}\n{failures}"
    # The examples really ran: the summary counts them (the pages hold a few hundred).
    counts = re.search(r"Doctest summary\n=+\n\s*(\d+) tests\n\s*(\d+) failures in tests", report)
    assert counts, f"no doctest summary in output.txt:\n{report[-3000:]}"
    assert int(counts.group(1)) >= 200 and int(counts.group(2)) == 0, counts.group(0)


def test_docstring_examples_of_the_package():
    code, log = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--doctest-modules",
                     str(ROOT / "cnorm")], timeout=300)
    assert code == 0, f"a docstring example failed (pytest --doctest-modules cnorm):\n{log[-6000:]}"
    passed = re.search(r"(\d+) passed", log)
    assert passed and int(passed.group(1)) >= 20, f"too few docstring examples ran:\n{log[-3000:]}"


def test_sync_batchnorm_training_script_runs_under_mpiexec():
    from test_mpi import find_mpiexec

    missing = [what for what, ok in (("mpi4py", importlib.util.find_spec("mpi4py") is not None),
                                     ("mpiexec", find_mpiexec() is not None)) if not ok]
    if missing:
        why = f"{' and '.join(missing)} not found: pip install -e '.[mpi]' (mpi4py and the mpich wheel)"
        if IN_CI:
            pytest.fail(f"{why}; CI installs the test extra, which includes them")
        pytest.skip(why)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("HYDRA_LAUNCHER", "fork")
    code, log = run([find_mpiexec(), "-n", "2", sys.executable, "-m", "mpi4py",
                     str(DOCS / "examples" / "train_sync.py")], timeout=120, env=env)
    assert code == 0, f"docs/examples/train_sync.py failed under mpiexec -n 2:\n{log[-6000:]}"
    assert "2 ranks, 20 steps: running statistics identical on every rank" in log, log[-3000:]
