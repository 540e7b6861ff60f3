"""Federation costs on SmolLM2-135M-Instruct and Natural Instructions, on this machine.

Measures, each case in a fresh subprocess (peak RSS from ``getrusage``):
* seconds per local step and per round (excluding the first round, which pays the first-step warm-up);
* peak memory with a pool of 50 clients vs all 1,455 (lazy loading: they should be about the same);
* the framework's overhead per round: round wall time minus local training and evaluation time
  (payload cutting, aggregation, data loading, spectrum, checkpoint), as a share of the round.

    python benchmarks/bench_federation.py --out docs/benchmarks-federation.md [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NI = ROOT.parent / "shared" / "data" / "natural-instructions-1613.jsonl.gz"


def child(pool: int, rounds: int, clients: int, steps: int, out: str) -> None:
    from flexlora.config import load_config
    from flexlora.run import run_federation

    cfg = load_config(
        ROOT / "configs" / "natural-instructions-cpu.yaml",
        [
            f"name=bench-pool{pool}",
            f"output_dir={out}",
            f"data.path={NI}",
            f"data.max_clients={pool}",
            "data.num_heldout=20",
            f"federation.rounds={rounds}",
            f"federation.clients_per_round={clients}",
            "federation.eval_every=1",
            "federation.eval_clients=10",
            f"train.steps={steps}",
            "eval.max_examples_per_client=2",
            "eval.generate=false",
        ],
    )
    result = run_federation(cfg, progress=False)
    rows = result.metrics[2:]  # round 1 pays the first-step warm-up
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steps = sum(m["train_steps"] for m in rows)
    train = sum(m["seconds"]["client_train"] for m in rows)
    total = sum(m["seconds"]["total"] for m in rows)
    evals = sum(m["seconds"]["eval"] for m in rows)
    agg = sum(m["seconds"]["aggregate"] for m in rows)
    print(
        json.dumps(
            {
                "pool": pool,
                "rounds_timed": len(rows),
                "peak_rss_mb": peak,
                "step_s": train / steps,
                "round_s": total / len(rows),
                "train_s": train / len(rows),
                "eval_s": evals / len(rows),
                "aggregate_s": agg / len(rows),
                "overhead_share": (total - train - evals) / total,
                "framework_share": (total - train - evals - agg) / total,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pools", default="50,1435")
    p.add_argument("--clients", type=int, default=4, help="clients per round")
    p.add_argument("--steps", type=int, default=3, help="local steps per client")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            child(args.child, args.rounds, args.clients, args.steps, tmp)
        return
    rows = []
    for pool in map(int, args.pools.split(",")):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(pool), "--rounds", str(args.rounds)]
            + ["--clients", str(args.clients), "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = [
        "| pool | peak RSS (MB) | s / local step | s / round | train s | eval s | aggregate s "
        "| overhead share | of which not aggregation |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pool']} | {r['peak_rss_mb']:.0f} | {r['step_s']:.2f} | {r['round_s']:.1f} | {r['train_s']:.1f} | "
            f"{r['eval_s']:.1f} | {r['aggregate_s']:.2f} | {100 * r['overhead_share']:.1f}% "
            f"| {100 * r['framework_share']:.1f}% |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(
            "# Federation costs (SmolLM2-135M-Instruct, Natural Instructions, 2 CPU cores)\n\n"
            f"`python benchmarks/bench_federation.py --rounds {args.rounds} --clients {args.clients} "
            f"--steps {args.steps} --out {args.out}`\n\n"
            f"LoRA on all 7 projections, heavy-tail-strong ranks, {args.clients} clients x {args.steps} steps at "
            "batch 4 per round, "
            "teacher-forced evaluation on 10 held-out clients x 2 examples; the first round is excluded.\n\n"
            f"{table}\n"
        )


if __name__ == "__main__":
    main()
