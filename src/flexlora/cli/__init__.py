"""The ``flexlora`` command line: one sub-command per module in this package.

The error contract: every error prints one line ``flexlora: error: ...`` on stderr, never a traceback.
Exit code 2: bad input that the user can fix (arguments, configs, data files, adapters, checkpoints, output
paths that would overwrite something flexlora did not write). Exit code 1: the environment failed (a
read-only or full filesystem, a missing model package, out of memory). 130: interrupted (Ctrl-C or
SIGTERM); temporary directories are removed on the way out.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from flexlora.cli import aggregate, compare, evaluate, ranks, report, run
from flexlora.core.errors import EnvironmentFailure

__all__ = ["main", "build_parser", "USER_ERRORS", "ENVIRONMENT_ERRORS"]

COMMANDS = (run, evaluate, aggregate, compare, report, ranks)
USER_ERRORS = (ValueError,)  # AdapterError, AggregationError, ConfigError, LoadError, OutputError, ...
ENVIRONMENT_ERRORS = (OSError, EnvironmentFailure, MemoryError)


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error of the contract (no usage block); ``--help`` still shows it."""

    def error(self, message: str):
        self.exit(2, f"flexlora: error: {self.prog}: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flexlora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def _terminate(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so context managers remove their temporary directories


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        return _fail(exc, 2)
    except ENVIRONMENT_ERRORS as exc:
        return _fail(exc, 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _fail(exc: BaseException | str, code: int) -> int:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    if isinstance(exc, MemoryError):
        text = f"out of memory {text}"
    print(f"flexlora: error: {' '.join(text.split())}", file=sys.stderr)
    return code
