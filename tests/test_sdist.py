"""The source distribution holds what its own tests need.

An sdist once left out conftest.py, helpers.py and reference.py, so the tests
it shipped could not run. This builds the sdist from a copy of the source tree
(python -m build --sdist, without isolation: no download) and checks that every
file of tests/ and bench/ (tests load bench's scripts), the LICENSE, README.md,
setup.py and pyproject.toml are in it.
"""

import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_NAMES = {"__pycache__", ".hypothesis", ".benchmarks", ".pytest_cache", "build", "dist", ".git", "_build",
              "generated", "bench_results"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".so", ".pyd")


def _skipped(name):
    return name in SKIP_NAMES or name.endswith(SKIP_SUFFIXES) or name.endswith(".egg-info")


def _files_under(folder):
    """Files under ``ROOT/folder``, relative to ROOT, caches and build outputs left out."""
    found = []
    for d, dirs, files in os.walk(os.path.join(ROOT, folder)):
        dirs[:] = [x for x in dirs if not _skipped(x)]
        found += [os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/") for f in files if not _skipped(f)]
    return found


def test_sdist_holds_the_test_helpers(tmp_path):
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in"):
        if not os.path.exists(os.path.join(ROOT, name)):
            pytest.skip(f"no {name} beside the tests (an installed package, not a source tree)")
    pytest.importorskip("build", reason="python -m build is in the test extra: pip install -e '.[test]'")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if _skipped(n)])
    run = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                          str(src)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "license" not in run.stderr.lower() or "deprecat" not in run.stderr.lower(), run.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    assert sdist.name.startswith("cnorm_kernels-"), sdist.name
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {"LICENSE", "README.md", "setup.py", "pyproject.toml",
                "tests/conftest.py", "tests/helpers.py", "tests/reference.py"}
    expected.update(_files_under("tests"))
    expected.update(_files_under("bench"))
    missing = sorted(expected - names)
    assert not missing, f"the sdist lacks {missing}"
