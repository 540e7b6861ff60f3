"""Flower reply records built from seeded LoRA factors, for tests of what nodes send back."""

from __future__ import annotations

import torch
from flwr.app import RecordDict

from flexlora.contracts import TrainResult
from flexlora.core.lora import LoraFactors, LoraUpdate
from flexlora.engines.flower.records import reply_content

SHAPES = {"layers.0.q_proj": (8, 6), "layers.0.mlp.up_proj": (10, 6)}


def factors(rank: int, seed: int = 0, alpha: float = 16.0) -> dict[str, LoraFactors]:
    gen = torch.Generator().manual_seed(seed)
    return {
        n: LoraFactors(torch.randn(rank, k, generator=gen), torch.randn(d, rank, generator=gen), alpha)
        for n, (d, k) in SHAPES.items()
    }


def reply_with(**changes) -> RecordDict:
    """A good train reply (rank 3, 12 examples from ``c1``) with ``record.item=value`` changes (``__`` stands
    for ``.`` in an item name; ``None`` deletes the record or item)."""
    content = reply_content(TrainResult(LoraUpdate(factors(3, seed=5), 12, "c1"), {"train_loss": 0.5}))
    for key, value in changes.items():
        record, _, item = key.partition(".")
        if item:
            if value is None:
                del content[record][item.replace("__", ".")]
            else:
                content[record][item.replace("__", ".")] = value
        elif value is None:
            del content[record]
        else:
            content[record] = value
    return content
