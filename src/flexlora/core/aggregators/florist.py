"""FLoRIST (Ramesh and Dass, "FLoRIST: Singular Value Thresholding for Efficient and Accurate Federated
Fine-Tuning of Large Language Models", MLSys 2026, arXiv 2506.09199).

Each round the server forms the exact aggregate ``dW = sum_i p_i s_i B_i A_i`` from the stacked factors,
without forming ``dW``: the SVD of the small stacked core gives ``dW = U S V^T`` (the route of
:func:`flexlora.core.svd.svd_lowrank_product`; the paper's pipeline, SVDs of the stacked ``B`` and ``A`` and
then of their ``R x R`` product, is the same decomposition). It then keeps the smallest rank ``k`` whose
singular values hold a share ``tau`` of the energy,

    ``k = min { k : sum_{j <= k} S_j^2 >= tau * sum_j S_j^2 }``  (all triplets when rounding keeps the
    cumulative share below ``tau``, as in the authors' code),

and the round's global adapter ``U_k S_k``, ``V_k^T`` is one pair shared by every client, whatever its rank.
As in the authors' code, clients merge the global adapter into their frozen base and train a fresh LoRA at
their own rank the next round, so the state is cumulative: each round's thresholded adapter is appended to
the previous state, which is recompressed exactly by an SVD once wider than ``min(d, k)`` (as FLoRA's).
The payload is that whole state. ``tau = 1`` keeps every triplet: the round's update is then FLoRA's.
The paper's two settings are ``tau`` tuned for accuracy (FLoRIST-O) and the smallest ``tau`` that holds it
(FLoRIST-E); its examples use 0.80 to 0.99.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexlora.core.aggregators.base import GlobalState, client_weights, stack_scaled, validate_updates
from flexlora.core.aggregators.flora import FLoRA, accumulate
from flexlora.core.lora import LoraUpdate
from flexlora.core.svd import svd_lowrank_product

__all__ = ["FLoRIST", "energy_rank"]


def energy_rank(S: torch.Tensor, threshold: float) -> int:
    """The smallest ``k >= 1`` whose leading singular values ``S`` (descending) hold ``threshold`` of the
    energy; ``len(S)`` when none does (rounding) and 1 for an all-zero ``S``."""
    energy = S.double() ** 2
    total = float(energy.sum())
    if total == 0:
        return min(1, len(S))
    reached = (torch.cumsum(energy, 0) / total >= threshold).nonzero()
    return int(reached[0]) + 1 if len(reached) else len(S)


class FLoRIST(FLoRA):
    """Exact stacked aggregation, singular-value thresholding to one shared global rank per module.

    Args:
        threshold: ``tau`` in ``(0, 1]``, the share of the round's energy kept.
    """

    name = "florist"

    def __init__(self, threshold: float = 0.9):
        if not 0 < threshold <= 1:
            raise ValueError(f"florist threshold must lie in (0, 1], got {threshold!r}")
        self.threshold = threshold

    def hyperparameters(self) -> dict[str, object]:
        return {"threshold": self.threshold}

    def aggregate(self, updates: Sequence[LoraUpdate], previous: GlobalState | None = None) -> GlobalState:
        validate_updates(updates)
        weights = client_weights(updates)
        modules, kept = {}, []
        for name in updates[0].modules:
            factors = [u.modules[name] for u in updates]
            Bs, As = stack_scaled(factors, weights, torch.float32)  # (d, R), (R, k)
            U, S, Vh = svd_lowrank_product(Bs, As, max_rank=Bs.shape[1])
            k = energy_rank(S, self.threshold)
            kept.append(k)
            modules[name] = accumulate(previous, name, U[:, :k] * S[:k], Vh[:k])
        return GlobalState(modules, self.name, info={"florist_mean_rank": sum(kept) / len(kept)})
