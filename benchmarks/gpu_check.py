"""GPU readiness: a 2-round SmolLM2-135M federation in bf16 on CUDA, then the seconds per local step, the
training tokens per second and the peak GPU memory. Without CUDA it says so and exits 0 (the project never
needs a GPU). Run by ``benchmarks/gpu_check.sh``, which also runs the aggregation benchmark on CUDA.

    python benchmarks/gpu_check.py [--rounds 2] [--out runs/gpu-check]

Precision: ``train.precision=bf16`` and ``eval.precision=bf16`` (autocast, fp32 LoRA factors and optimiser)
where this checkout has those options; otherwise the model itself is loaded in bfloat16 (``model.dtype``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def precision_overrides() -> list[str]:
    """bf16 autocast where the config has a precision switch, else a bf16 model."""
    from flexlora.evaluation import EvalConfig
    from flexlora.training import TrainConfig

    out = [
        f"{section}.precision=bf16"
        for section, cls in (("train", TrainConfig), ("eval", EvalConfig))
        if "precision" in {f.name for f in dataclasses.fields(cls)}
    ]
    return out or ["model.dtype=bfloat16"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, help="run directory parent (default: a temporary directory)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check.")
        return 0
    from flexlora.config import load_config
    from flexlora.run import run_federation

    out = args.out or Path(tempfile.mkdtemp(prefix="flexlora-gpu-check-"))
    overrides = [
        "name=gpu-check",
        f"output_dir={out}",
        f"federation.rounds={args.rounds}",
        "model.device=cuda",
        *precision_overrides(),
    ]
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    print(
        f"gpu_check: {torch.cuda.get_device_name()}; configs/demo.yaml with {' '.join(overrides)}", flush=True
    )
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = run_federation(cfg, overwrite=True, progress=False)
    wall = time.perf_counter() - start
    rows = [m for m in result.metrics if m.get("round", 0) >= 1]
    steps = sum(m.get("train_steps", 0) for m in rows)
    train_s = sum(m["seconds"]["client_train"] for m in rows)
    tokens = sum(m.get("train_tokens") or 0 for m in rows)
    if not tokens:  # before train_tokens was recorded: an upper bound from the batch shape
        tokens = steps * cfg.train.batch_size * cfg.train.max_length
        print(
            "gpu_check: metrics carry no train_tokens; tokens/s below is batch x max_length (an upper bound)"
        )
    print(f"rounds {len(rows)}, local steps {steps}, wall {wall:.1f} s (model load and evaluation included)")
    print(f"s/step {train_s / max(steps, 1):.3f}")
    print(f"tokens/s {tokens / max(train_s, 1e-9):.0f}")
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"run directory {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
