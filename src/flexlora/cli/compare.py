"""``flexlora compare``: the paper's grid of methods x resource distributions x seeds, resumable.

flexlora compare CONFIG [--methods flexlora,hetlora,...] [--distributions homo,uniform,heavy-tail-strong]
                        [--seeds N | --seeds 0,1,2] [--out DIR] [--set key=value ...] [--order method|seed]
                        [--status] [--dry-run] [--no-report] [--archive-only]

CONFIG is a run config, optionally with a ``compare:`` section (methods, distributions, seeds,
method_overrides, variants, sweep, out, order); options given here win. With ``sweep``, every command acts
on each point's comparison (OUT/<key>=<value>) in turn. Finished cells are reused, interrupted ones resumed
from their checkpoint: rerun the same command to continue. ``--status`` prints where every cell stands;
``--dry-run`` lists the cells. At the end ``flexlora report`` runs on OUT (tables and plots in OUT/report).
With ``compare.archive: DIR``, every finished cell's final global adapter at rank <= 64 is kept in DIR
(flexlora.archive); ``--archive-only`` writes what is missing there for the cells finished so far and runs
nothing.
"""

from __future__ import annotations

import argparse

from flexlora.cli.run import add_set_option

__all__ = ["add_parser", "run"]


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return list(range(int(text))) if "," not in text else [int(x) for x in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds takes a count (3) or a list (0,1,2), got {text!r}"
        ) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="run the methods x distributions x seeds grid", description=__doc__)
    p.add_argument("config", help="base YAML config (see configs/study-*.yaml)")
    p.add_argument("--methods", type=_list, help="comma-separated; METHOD@RANK for a homogeneous one at RANK")
    p.add_argument("--distributions", type=_list, help="comma-separated resource distributions")
    p.add_argument("--seeds", type=_seeds, help="a count (seeds 0..N-1) or a comma-separated list")
    p.add_argument("--out", help="comparison directory (default: OUTPUT_DIR/compare-<config name>)")
    add_set_option(p, "override a key of every cell's config (repeatable)")
    p.add_argument("--order", choices=("method", "seed"), help="run all seeds of a method first (default)")
    p.add_argument("--status", action="store_true", help="print every cell's state and exit")
    p.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    p.add_argument("--no-report", action="store_true", help="do not write OUT/report at the end")
    p.add_argument("--archive-only", action="store_true", help="archive the finished cells (compare.archive)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one line per round)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flexlora.compare import load_comparisons

    comparisons = load_comparisons(
        args.config, args.methods, args.distributions, args.seeds, args.out, args.overrides, args.order
    )
    codes = []
    for comparison in comparisons:  # one per point of compare.sweep
        if len(comparisons) > 1:
            print(f"== {comparison.out}")
        codes.append(_run_one(args, comparison))
    return max(codes)


def _run_one(args: argparse.Namespace, comparison) -> int:
    from flexlora.compare import run_comparison

    if args.dry_run:
        for i, cell in enumerate(comparison.cells, 1):
            extra = f"  [{' '.join(cell.overrides)}]" if cell.overrides else ""
            print(f"{i:>3}  {cell.key}{extra}")
        print(f"{len(comparison.cells)} cells -> {comparison.out}")
        return 0
    if args.status:
        print(comparison.progress(), end="")
        return 0
    if args.archive_only:
        return _archive_only(comparison)
    states = run_comparison(comparison, progress=not args.no_progress)
    print(comparison.progress(), end="")
    if not args.no_report and "done" in states.values():
        from flexlora.report import build_report

        report = build_report([comparison.out], comparison.out / "report")
        print(f"report: {comparison.out / 'report'} ({report['runs']} finished runs)")
    return 1 if "failed" in states.values() else 0


def _archive_only(comparison) -> int:
    """Archive every finished cell not archived yet (one line each); 1 if any failed."""
    from flexlora.archive import archive_cell
    from flexlora.compare import cell_state, claim
    from flexlora.config import ConfigError

    if comparison.archive is None:
        raise ConfigError("--archive-only: the config sets no compare.archive directory")
    failed = False
    for cell, cfg in comparison.configs().items():
        if cell_state(cfg.run_dir, cfg.federation.rounds) != "done":
            continue
        with claim(comparison.out, cell) as mine:
            line = archive_cell(cfg.run_dir, comparison.archive / cell.key) if mine else "claimed elsewhere"
        failed |= "FAILED" in line
        print(f"{cell.key}: {line}")
    return 1 if failed else 0
