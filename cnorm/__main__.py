"""``python -m cnorm info | bench | demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    """Command-line entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m cnorm", description=__doc__)
    parser.add_argument("command", choices=["info", "bench", "demo"],
                        help="info: build and backends; bench: the benchmark; demo: the training demo "
                             "(each takes --help)")
    # Everything after the command is the command's own (so `demo --help` reaches the demo).
    args = parser.parse_args(argv[:1])
    rest = argv[1:]
    if args.command == "info":
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
