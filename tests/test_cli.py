"""The command line: --version, help in plain words, unknown options rejected."""

import re
import subprocess
import sys

import pytest

import cnorm
from cnorm import __main__ as cli

COMMANDS = ["info", "bench", "demo"]
# reStructuredText left in help text: ``literal``, `ref`, :func:`x`, :py:meth:`x`
ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`")


def _cnorm(*args):
    return subprocess.run([sys.executable, "-m", "cnorm", *args], capture_output=True, text=True)


def _expected_version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cnorm-kernels")
    except PackageNotFoundError:
        return cnorm.__version__


def test_version():
    run = _cnorm("--version")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"cnorm {_expected_version()}"
    assert cli.version() == _expected_version()


def test_console_script_runs_the_same_main(monkeypatch, capsys):
    """`cnorm --version`: the console script the package declares is this main, named cnorm."""
    from importlib.metadata import entry_points

    scripts = [ep for ep in entry_points(group="console_scripts", name="cnorm")]
    if not scripts:
        pytest.skip("no cnorm console script installed here (a source tree): pip install -e .")
    assert {ep.value for ep in scripts} == {"cnorm.__main__:main"}
    main = scripts[0].load()
    monkeypatch.setattr(sys, "argv", ["/usr/bin/cnorm", "--version"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"cnorm {_expected_version()}"
    monkeypatch.setattr(sys, "argv", ["/usr/bin/cnorm", "--help"])
    with pytest.raises(SystemExit):
        main()
    assert capsys.readouterr().out.startswith("usage: cnorm ")


@pytest.mark.parametrize("command", [None] + COMMANDS)
def test_help_is_plain_words(command):
    args = ([command] if command else []) + ["--help"]
    run = _cnorm(*args)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"usage: python -m cnorm{' ' + command if command else ''} ")
    assert "`" not in run.stdout, run.stdout
    assert not ROLE.search(run.stdout), run.stdout
    if command is None:
        for name in COMMANDS:
            assert f"\n    {name} " in run.stdout, run.stdout  # each command listed with what it does


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_option_is_an_error(command):
    run = _cnorm(command, "--bogus")
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert f"python -m cnorm {command}: error: unrecognized arguments: --bogus" in run.stderr, run.stderr
    assert run.stdout == ""  # nothing ran


def test_unknown_command_and_no_command_are_errors():
    run = _cnorm("bogus")
    assert run.returncode == 2 and "invalid choice: 'bogus'" in run.stderr, run.stderr
    run = _cnorm()
    assert run.returncode == 2 and "required: command" in run.stderr, run.stderr
