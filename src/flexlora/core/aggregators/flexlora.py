"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources", NeurIPS 2024).

Aggregate: ``dW = sum_i p_i s_i B_i A_i`` with ``p_i = n_i / sum_j n_j`` and ``s_i`` each client's LoRA scale,
then ``dW = U S V^T``. Redistribute: a client of rank ``r`` and scale ``s_r`` receives
``B = U_r S_r / s_r`` and ``A = V_r^T``, so ``s_r B A`` is the best rank-``r`` approximation of ``dW``
(Eckart-Young: its Frobenius error is the norm of the tail singular values). All singular values go into
``B``, as in the paper's code.

The state keeps ``U S`` and ``V^T`` with at most ``R = sum_i r_i`` triplets, which is exact since
``rank(dW) <= R``. Suggested use: any mix of client ranks; learning rate per rank scale (see docs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexlora.core.aggregators.base import (
    Aggregator,
    GlobalState,
    client_weights,
    stack_scaled,
    validate_updates,
)
from flexlora.core.lora import LoraUpdate, LowRank
from flexlora.core.svd import SVDRoute, choose_route, svd_lowrank_product

__all__ = ["FlexLoRA"]


class FlexLoRA(Aggregator):
    """SVD-based heterogeneous-rank aggregation.

    Args:
        svd: ``auto`` (factored while ``R <= min(d, k) / 2``, else dense), ``dense`` or ``factored``.
        dtype: dtype of the aggregation arithmetic (float32 by default; float64 for reference checks).

    Example:
        >>> state = FlexLoRA().aggregate(updates)            # doctest: +SKIP
        >>> factors = FlexLoRA().payload(state, {"q": 8}, alpha=16)  # doctest: +SKIP
    """

    name = "flexlora"

    def __init__(self, svd: SVDRoute = "auto", dtype: torch.dtype = torch.float32):
        choose_route(1, 1, 0, svd)  # validates the route name
        self.svd = svd
        self.dtype = dtype

    def hyperparameters(self) -> dict[str, object]:
        return {"svd": self.svd, "dtype": str(self.dtype).removeprefix("torch.")}

    def aggregate(self, updates: Sequence[LoraUpdate], previous: GlobalState | None = None) -> GlobalState:
        validate_updates(updates)
        weights = client_weights(updates)
        modules = {}
        for name in updates[0].modules:
            Bs, As = stack_scaled([u.modules[name] for u in updates], weights, self.dtype)  # (d, R), (R, k)
            U, S, Vh = svd_lowrank_product(Bs, As, route=self.svd, max_rank=Bs.shape[1])
            modules[name] = LowRank(U * S, Vh)  # (d, q), (q, k)
        return GlobalState(modules, self.name, svd_form=True)
