"""Held-out loss after 10 rounds, fp32 vs bf16 (training and evaluation), paired by seed, on the tiny model.

A FlexLoRA federation on the synthetic data (20 clients, 4 per round, 4 local steps), once with
``train.precision`` and ``eval.precision`` at ``fp32`` and once at ``bf16``, for each seed; prints one JSON
line per run and the paired differences against the spread over seeds.

    python benchmarks/bench_precision.py --seeds 3 --out /tmp/bench-precision
"""

from __future__ import annotations

import argparse
import json
import statistics

from flexlora.config import load_config
from flexlora.run import run_federation


def run(seed: int, precision: str, out: str) -> float:
    cfg = load_config(
        None,
        [
            f"name={precision}-seed{seed}",
            f"output_dir={out}",
            "model.name=tiny",
            "data.path=synthetic",
            "data.options={num_clients: 20, examples_per_client: 24, seed: 0}",
            "data.num_heldout=4",
            "federation.rounds=10",
            "federation.clients_per_round=4",
            f"federation.seed={seed}",
            "federation.eval_every=10",
            "train.steps=4",
            "train.batch_size=4",
            "train.max_length=64",
            "train.lr=0.005",
            f"train.precision={precision}",
            f"eval.precision={precision}",
            "eval.generate=false",
            "eval.max_examples_per_client=4",
        ],
    )
    return run_federation(cfg, overwrite=True, progress=False).final["eval"]["loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="/tmp/bench-precision", help="where the runs go")
    args = p.parse_args()
    losses = {(s, prec): run(s, prec, args.out) for s in range(args.seeds) for prec in ("fp32", "bf16")}
    for (seed, precision), loss in losses.items():
        print(json.dumps({"seed": seed, "precision": precision, "heldout_loss_r10": loss}))
    fp32 = [losses[s, "fp32"] for s in range(args.seeds)]
    diffs = [losses[s, "bf16"] - losses[s, "fp32"] for s in range(args.seeds)]
    print(
        json.dumps(
            {
                "fp32_sd_over_seeds": statistics.stdev(fp32),
                "bf16_minus_fp32": diffs,
                "mean_diff": statistics.mean(diffs),
            }
        )
    )


if __name__ == "__main__":
    main()
