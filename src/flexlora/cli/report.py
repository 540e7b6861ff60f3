"""``flexlora report``: tables and plots from finished runs.

flexlora report RUN_DIR... [--out DIR] [--baseline fedit | --against METHOD] [--last N] [--no-plots]
    [--keep-records] [--no-progress] [--sweep]

RUN_DIR is a run directory, or any directory holding runs (a ``flexlora compare`` output). Unfinished runs
are left out. Writes ``results.md``, ``results.csv``, ``per_category.csv``, ``runs.csv`` (one row per run:
the per-seed numbers) and the PNG plots to ``--out``
(default: the first RUN_DIR's ``report/``) and prints the Markdown table. ``--against hetlora`` pairs every
method with HetLoRA at the same distribution (a head-to-head table) instead of with the homogeneous baseline.
``--keep-records`` also copies each run's small files (config, metrics, provenance; no checkpoint) to
``OUT/records``, from which ``flexlora report OUT/records`` rebuilds the same tables: commit them with the
tables. A cell found twice is taken from the first RUN_DIR that has it, so
``flexlora report runs/study results/study/records --out results/study --keep-records`` adds new runs to an
archive. The runs read so far are counted on stderr (``--no-progress``: not). ``--sweep``: RUN_DIR is a
sweep (``compare.sweep``, one comparison per ``key=value`` subdirectory); writes the regime curve instead,
each ``X@RANK`` against ``X`` at every point (``regime.md``, ``regime.csv``, ``regime_<metric>.png``;
default ``--out``: RUN_DIR/regime; :mod:`flexlora.regime`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexlora.methods import DEFAULT_BASELINE

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="tables and plots from finished runs", description=__doc__)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories or their parents")
    p.add_argument("--out", type=Path, help="output directory (default: FIRST_RUN_DIR/report)")
    p.add_argument(
        "--baseline", default=DEFAULT_BASELINE, help="homogeneous baseline of heterogeneous methods"
    )
    p.add_argument(
        "--against", metavar="METHOD", help="pair every method with METHOD at the same distribution instead"
    )
    p.add_argument("--last", type=int, default=1, help="average each metric over the last N evaluations")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--keep-records", action="store_true", help="also copy the runs' records to OUT/records")
    p.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    p.add_argument("--sweep", action="store_true", help="RUN_DIR is a sweep: the rank gap against budget")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flexlora.progress import Progress, reporting
    from flexlora.report import build_report

    if args.last < 1:
        raise ValueError(f"--last must be >= 1, got {args.last}")
    missing = [str(p) for p in args.runs if not p.is_dir()]
    if missing:
        raise ValueError(f"not a directory: {', '.join(missing)}")
    if args.sweep:
        return _regime(args)
    out = args.out or args.runs[0] / "report"
    with reporting(Progress([("reading runs", None)], unit="run", enabled=not args.no_progress)):
        report = build_report(
            args.runs,
            out,
            baseline=args.baseline,
            last=args.last,
            plots=not args.no_plots,
            against=args.against,
            records_too=args.keep_records,
        )
    print((out / "results.md").read_text(), end="")
    planned = f" of {report['planned']} planned" if report["planned"] else ""
    print(f"\n{report['runs']} finished runs{planned}; files in {out}:")
    for path in report["files"]:
        print(f"  {path}")
    return 0


def _regime(args: argparse.Namespace) -> int:
    from flexlora.regime import build_regime

    if len(args.runs) != 1:
        raise ValueError("--sweep takes one sweep directory")
    out = args.out or args.runs[0] / "regime"
    regime = build_regime(args.runs[0], out, last=args.last, plots=not args.no_plots)
    print((out / "regime.md").read_text(), end="")
    print(f"files in {out}:")
    for path in regime["files"]:
        print(f"  {path}")
    return 0
