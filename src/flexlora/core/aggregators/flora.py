"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024).

Stacking: ``B_g = [p_1 s_1 B_1 | ... | p_n s_n B_n]`` and ``A_g = [A_1; ...; A_n]``, so ``B_g A_g`` is the exact
``sum_i p_i s_i B_i A_i``. Clients add the stacked update to their frozen base weights and train a fresh
LoRA at their own rank each round, so the state is cumulative over rounds: each round's stack is appended
to the previous one. The payload is the whole stack (its size grows with the sum of ranks); once the stack
is wider than ``min(d, k)`` it is recompressed exactly by an SVD (no information is lost).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from flexlora.core.aggregators.base import (
    Aggregator,
    GlobalState,
    client_weights,
    exact_factors,
    stack_scaled,
    validate_updates,
)
from flexlora.core.lora import LoraFactors, LoraUpdate, LowRank
from flexlora.core.svd import svd_lowrank_product

__all__ = ["FLoRA", "accumulate"]


def accumulate(previous: GlobalState | None, name: str, B: torch.Tensor, A: torch.Tensor) -> LowRank:
    """The cumulative state ``[B_prev | B] [A_prev; A]`` of module ``name`` (``B`` (d, r), ``A`` (r, k)),
    recompressed exactly by a dense SVD once it is wider than ``min(d, k)``."""
    if previous is not None and name in previous.modules and previous.modules[name].B.any():
        B = torch.cat([previous.modules[name].B.float(), B], dim=1)
        A = torch.cat([previous.modules[name].A.float(), A], dim=0)
    if B.shape[1] > min(B.shape[0], A.shape[1]):
        U, S, Vh = svd_lowrank_product(B, A, route="dense")
        B, A = U * S, Vh
    return LowRank(B, A)


class FLoRA(Aggregator):
    """Exact stacking aggregation; the client merges the payload and starts a fresh adapter."""

    name = "flora"

    def aggregate(self, updates: Sequence[LoraUpdate], previous: GlobalState | None = None) -> GlobalState:
        validate_updates(updates)
        weights = client_weights(updates)
        modules = {}
        for name in updates[0].modules:
            B, A = stack_scaled([u.modules[name] for u in updates], weights, torch.float32)  # (d, R), (R, k)
            modules[name] = accumulate(previous, name, B, A)
        return GlobalState(modules, self.name)

    def payload(
        self, state: GlobalState, ranks: Mapping[str, int], alpha: float, use_rslora: bool = False
    ) -> dict[str, LoraFactors]:
        """The whole stack at its own rank ``q`` (requested ranks are ignored): ``B = B_g / s_q``."""
        full = exact_factors(state, alpha, use_rslora)
        return {name: full[name] for name in ranks}
