"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024).

Zero-pad every client's factors to the largest rank ``r_max`` and average them: ``B_g = sum_i w_i pad(s_i B_i)``,
``A_g = sum_i w_i pad(A_i)``; a client of rank ``r`` takes the leading ``r`` columns of ``B_g / s_r`` and rows of
``A_g``. Weights are ``p_i = n_i / sum n`` or, with ``sparsity_weighted``, proportional to ``p_i ||s_i B_i A_i||_F``
(HetLoRA's sparsity-weighted aggregation, computed per module without forming the product:
``||B A||_F^2 = tr((B^T B)(A A^T))``). Scales are folded into ``B`` so that clients whose ``alpha / r``
differ agree on the magnitude of the update (the paper assumes one scale).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexlora.core.aggregators.base import (
    Aggregator,
    GlobalState,
    client_weights,
    pad_columns,
    validate_updates,
)
from flexlora.core.lora import LoraFactors, LoraUpdate, LowRank

__all__ = ["HetLoRA", "product_norm"]


def product_norm(f: LoraFactors) -> float:
    """``||s B A||_F`` in ``O((d + k) r^2)``."""
    B, A = f.B.double(), f.A.double()
    return abs(f.scale) * float(torch.trace((B.T @ B) @ (A @ A.T)).clamp_min(0).sqrt())


class HetLoRA(Aggregator):
    """Zero-padding aggregation with truncation back to each client's rank.

    Args:
        sparsity_weighted: weight clients by ``p_i`` times the Frobenius norm of their update.
    """

    name = "hetlora"

    def __init__(self, sparsity_weighted: bool = False):
        self.sparsity_weighted = sparsity_weighted

    def hyperparameters(self) -> dict[str, object]:
        return {"sparsity_weighted": self.sparsity_weighted}

    def module_weights(self, factors: Sequence[LoraFactors], weights: Sequence[float]) -> list[float]:
        if not self.sparsity_weighted:
            return list(weights)
        raw = [p * product_norm(f) for f, p in zip(factors, weights, strict=True)]
        total = sum(raw)
        return list(weights) if total == 0 else [w / total for w in raw]

    def aggregate(self, updates: Sequence[LoraUpdate], previous: GlobalState | None = None) -> GlobalState:
        validate_updates(updates)
        weights = client_weights(updates)
        modules = {}
        for name in updates[0].modules:
            factors = [u.modules[name] for u in updates]
            r_max = max(f.rank for f in factors)
            w = self.module_weights(factors, weights)
            B = sum(p * pad_columns(f.scale * f.B.float(), r_max) for f, p in zip(factors, w, strict=True))
            A = sum(p * pad_columns(f.A.float().T, r_max).T for f, p in zip(factors, w, strict=True))
            modules[name] = LowRank(torch.as_tensor(B), torch.as_tensor(A))  # (d, r_max), (r_max, k)
        return GlobalState(modules, self.name)
