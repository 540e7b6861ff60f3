"""``flexlora ranks``: which rank type fits a client's memory (and time) budget on this machine.

    flexlora ranks --model smollm2 --targets q_proj v_proj --memory-gb 4 [--seconds-per-round 60]
                   [--batch-size 4] [--max-length 192] [--steps 2] [--dtype float32] [--device auto]
                   [--estimate-only | --cached-only]

Measures each rank type with a short real training step in a fresh process (cached under
``<cache>/ranks/``; later calls are instant), or only estimates it (``--estimate-only``), prints the table
of estimated and measured peak memory and seconds per round, why the choice (what it needs, and what the next
type up would need beyond the budget), and the largest type that fits. Exits 2 with one line when none fits.
"""

from __future__ import annotations

import argparse

from flexlora.core.budget import GIB, Budget
from flexlora.models import DEFAULT_TARGET_MODULES

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ranks", help="the largest rank type that fits a budget", description=__doc__)
    p.add_argument("--model", default="smollm2", help="smollm2, tiny or a local model directory")
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGET_MODULES), help="LoRA target modules")
    p.add_argument("--memory-gb", type=float, required=True, help="memory budget in GiB")
    p.add_argument("--seconds-per-round", type=float, help="time budget of a round's local training")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=192, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per round")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--estimate-only", dest="mode", action="store_const", const="estimate")
    mode.add_argument("--cached-only", dest="mode", action="store_const", const="cached")
    p.set_defaults(func=run, mode="measure")


def _gb(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _seconds(value: float | None, steps: int) -> str:
    return "-" if value is None else f"{value * steps:.1f}"


def run(args: argparse.Namespace) -> int:
    from flexlora.budget import costs, pick, rank_table
    from flexlora.core.budget import reason

    budget = Budget(args.memory_gb, args.seconds_per_round)
    if args.batch_size < 1 or args.max_length < 2 or args.steps < 1:
        raise ValueError("--batch-size and --steps must be >= 1 and --max-length >= 2")
    rows = rank_table(
        args.model, args.targets, args.batch_size, args.max_length, args.dtype, args.device, args.mode
    )
    head = ("rank type", "est. GiB", "measured GiB", "est. error %", "est. s/round", "measured s/round")
    print(
        f"{args.model}, LoRA on {' '.join(args.targets)}, batch {args.batch_size} x {args.max_length} tokens, "
        f"{args.steps} steps per round, {args.dtype}"
    )
    print("  ".join(f"{h:>16}" for h in head))
    for r in rows:
        cells = (
            r.rank_type.name,
            _gb(r.estimate.total),
            _gb(r.measured_bytes),
            "-" if r.measured_bytes is None else f"{100 * (r.estimate.total / r.measured_bytes - 1):+.1f}",
            _seconds(r.estimated_seconds, args.steps),
            _seconds(r.measured_seconds, args.steps),
        )
        print("  ".join(f"{c:>16}" for c in cells))
    chosen = pick(rows, budget, args.steps)
    print(f"why: {reason(costs(rows), budget, args.steps)}")
    source = "measured" if chosen.measured_bytes is not None else "estimated"
    print(
        f"largest rank type within {args.memory_gb:g} GiB"
        + (f" and {args.seconds_per_round:g} s per round" if args.seconds_per_round else "")
        + f": {chosen.rank_type.name} ({source} {chosen.peak_bytes / GIB:.2f} GiB)"
    )
    return 0
