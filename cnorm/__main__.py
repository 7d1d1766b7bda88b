"""``python -m cnorm info | bench | demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    """Command-line entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m cnorm", description=__doc__)
    parser.add_argument("command", choices=["info", "bench", "demo"], help="what to run")
    args, rest = parser.parse_known_args(argv)
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
