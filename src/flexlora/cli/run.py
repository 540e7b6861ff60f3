"""``flexlora run``: a federation from a YAML config, or the continuation of an interrupted one.

flexlora run CONFIG.yaml [--set key=value ...] [--overwrite]
flexlora run --resume RUN_DIR
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "add_set_option", "run"]


def add_set_option(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable), collected in ``args.overrides``."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a federation", description=__doc__)
    p.add_argument("config", nargs="?", help="YAML config (see configs/)")
    add_set_option(p, "override a config key, e.g. federation.rounds=3 (repeatable)")
    p.add_argument("--engine", choices=("local", "flower"), help="shorthand for --set federation.engine=...")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flexlora.config import load_config
    from flexlora.federation import round_summary
    from flexlora.run import resume_federation, run_federation

    if args.resume:
        if args.config or args.overrides:
            raise ValueError("--resume takes the run's saved config; give no CONFIG or --set with it")
        result = resume_federation(args.resume, progress=not args.no_progress)
    else:
        if not args.config:
            raise ValueError("give a CONFIG file (or --resume RUN_DIR)")
        overrides = args.overrides + ([f"federation.engine={args.engine}"] if args.engine else [])
        cfg = load_config(args.config, overrides)
        result = run_federation(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    if result.note:
        print(result.note)
    print(f"final: {round_summary(result.final)}")
    print(f"outputs: {result.run_dir} (metrics.jsonl, adapters/, checkpoint/)")
    return 0
