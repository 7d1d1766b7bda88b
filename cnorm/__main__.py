"""The command line: ``python -m cnorm info | bench | demo`` (also ``cnorm ...``) and ``--version``."""

from __future__ import annotations

import argparse
import os
import sys

DISTRIBUTION = "cnorm-kernels"  # what pip installs; the import name is cnorm

DESCRIPTION = "cnorm: normalization layers for NumPy and CuPy. Each command takes --help."
COMMANDS = {  # name: (summary in the command list, description in its --help or None: the command's own)
    "info": ("show the build (compiled kernels, OpenMP, threads, CPU levels) and which backends work here",
             "Print cnorm's version and build (compiled kernels, OpenMP, threads, CPU levels) and which "
             "backends work here, with the reason for each one that does not."),
    "bench": ("time cnorm's backends against NumPy and PyTorch and the memory floor", None),
    "demo": ("train a small network on handwritten digits with and without BatchNorm", None),
}


def version() -> str:
    """The installed distribution's version, else (a source tree) ``cnorm.__version__``."""
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        return dist_version(DISTRIBUTION)
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _prog() -> str:
    """``cnorm`` when run as the console script, else ``python -m cnorm``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "cnorm" if os.path.splitext(name)[0] == "cnorm" else "python -m cnorm"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser: --version and the commands. Each command parses its own
    options (everything after the command goes to it, ``--help`` included)."""
    parser = argparse.ArgumentParser(prog=prog or _prog(), description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"cnorm {version()}",
                        help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (summary, _) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def info_parser(prog: str) -> argparse.ArgumentParser:
    """``info`` takes no options but --help."""
    return argparse.ArgumentParser(prog=f"{prog} info", description=COMMANDS["info"][1])


def main(argv=None) -> int:
    """Command-line entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = _prog()
    # The options before the command are parsed here, those after it by the command.
    split = next((i + 1 for i, a in enumerate(argv) if a in COMMANDS), len(argv))
    args = build_parser(prog).parse_args(argv[:split])
    rest = argv[split:]
    if args.command == "info":
        info_parser(prog).parse_args(rest)  # --help, or an error naming an unknown option
        from ._config import show_config

        show_config()
        return 0
    if args.command == "bench":
        from . import _bench

        return _bench.main(rest)
    from . import _demo

    return _demo.main(rest)


if __name__ == "__main__":
    sys.exit(main())
