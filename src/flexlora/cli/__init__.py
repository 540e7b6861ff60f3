"""The ``flexlora`` command line: one sub-command per module in this package.

Errors that users can fix (bad files, bad configs) print one line ``flexlora: error: ...`` and exit 2,
without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from flexlora.cli import aggregate, compare, evaluate, ranks, report, run
from flexlora.core.errors import AdapterError, AggregationError

__all__ = ["main", "build_parser"]

COMMANDS = (run, evaluate, aggregate, compare, report, ranks)
USER_ERRORS = (AdapterError, AggregationError, ValueError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexlora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"flexlora: error: {exc}", file=sys.stderr)
        return 2
