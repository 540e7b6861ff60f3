"""A well-formed client update on three small modules, and the tweaks that make it malformed."""

from __future__ import annotations

from dataclasses import replace

import torch

from flexlora.core.lora import LoraFactors, LoraUpdate

SHAPES = {"layers.0.q_proj": (8, 6), "layers.0.v_proj": (4, 6), "layers.0.up_proj": (10, 6)}
RANKS = {"layers.0.q_proj": 2, "layers.0.v_proj": 2, "layers.0.up_proj": 3}
ALPHA = 16.0


def good_update(client_id="c0", seed=0, ranks=RANKS, num_examples=10) -> LoraUpdate:
    gen = torch.Generator().manual_seed(seed)
    modules = {
        n: LoraFactors(
            torch.randn(r, SHAPES[n][1], generator=gen), torch.randn(SHAPES[n][0], r, generator=gen), ALPHA
        )
        for n, r in ranks.items()
    }
    return LoraUpdate(modules, num_examples, client_id)


def changed(update, name="layers.0.q_proj", **changes) -> LoraUpdate:
    """``update`` with fields of module ``name``'s factors replaced (``A=``, ``B=``, ``alpha=`` ...)."""
    modules = dict(update.modules)
    modules[name] = replace(modules[name], **changes)
    return LoraUpdate(modules, update.num_examples, update.client_id)


def without(update, name="layers.0.v_proj") -> LoraUpdate:
    return LoraUpdate(
        {n: f for n, f in update.modules.items() if n != name}, update.num_examples, update.client_id
    )


def with_extra(update) -> LoraUpdate:
    extra = LoraFactors(torch.zeros(2, 6), torch.zeros(8, 2), ALPHA)
    return LoraUpdate({**update.modules, "layers.0.o_proj": extra}, update.num_examples, update.client_id)


def poisoned(t: torch.Tensor, value=float("nan")) -> torch.Tensor:
    """A copy of ``t`` with its first entry set to ``value``."""
    t = t.clone()
    t[0, 0] = value
    return t
