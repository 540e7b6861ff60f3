"""Measure one rank type: a short real training run in a fresh process, its peak memory and step time.

Run by :func:`flexlora.budget.measure` as ``python -m flexlora.rank_probe '<json spec>'``; prints one JSON
line. The process loads the model, installs a LoRA adapter at the rank type, resets the peak-RSS counter
(``/proc/self/clear_refs``), then runs :func:`flexlora.training.optimise` twice for one step on full-length
sequences with a label at every position (the worst case of the batch shape): the first step warms up, the
second is timed. The peak is the process's resident high-water mark over both (CUDA: the allocator's peak).
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from pathlib import Path

import torch

from flexlora.core.lora import LoraFactors
from flexlora.core.ranks import RankType, module_ranks
from flexlora.data.examples import Example
from flexlora.lora_host import LoraHost
from flexlora.models import load_model
from flexlora.training import TrainConfig, optimise

__all__ = ["main", "probe"]

_WORDS = "the of and model client rank update round memory budget token layer weight adapter".split()


def _status_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status`` (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the resident high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    hwm = _status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _examples(n: int, seq_len: int) -> list[Example]:
    """Examples longer than ``seq_len`` tokens in any tokenizer (at least one token per word)."""
    rng = random.Random(0)
    text = lambda: " ".join(rng.choice(_WORDS) for _ in range(seq_len))  # noqa: E731
    return [Example(text(), text(), text()) for _ in range(n)]


def probe(spec: dict) -> dict:
    """Measure the rank type in ``spec`` (``model``, ``targets``, ``attn``, ``mlp``, ``batch``, ``seq_len``,
    ``dtype``, ``device``). Returns ``peak_bytes``, ``loaded_bytes`` (before training), ``step_seconds``."""
    model, tokenizer = load_model(spec["model"], spec["dtype"], spec["device"])
    host = LoraHost(model, spec["targets"])
    ranks = module_ranks(RankType("probe", spec["attn"], spec["mlp"]), host.shapes)
    init = {
        m: LoraFactors(
            torch.randn(r, host.shapes[m][1]) / host.shapes[m][1] ** 0.5,
            torch.zeros(host.shapes[m][0], r),
            16.0,
        )
        for m, r in ranks.items()
    }
    host.load(init)
    cuda = next(model.parameters()).is_cuda
    cfg = TrainConfig(steps=1, batch_size=spec["batch"], max_length=spec["seq_len"], loss_on="all")
    examples = _examples(spec["batch"], spec["seq_len"])
    loaded = torch.cuda.memory_allocated() if cuda else _status_bytes("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset = cuda or _reset_peak()
    optimise(host.model, tokenizer, examples, host.trainable_parameters(), cfg, seed=0)
    start = time.perf_counter()
    optimise(host.model, tokenizer, examples, host.trainable_parameters(), cfg, seed=1)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss()
    return {"peak_bytes": peak, "loaded_bytes": loaded, "step_seconds": seconds, "peak_reset": reset}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(json.dumps(probe(json.loads(args[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
