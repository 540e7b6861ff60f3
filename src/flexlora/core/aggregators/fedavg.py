"""FedAvg / FedIT over LoRA factors (McMahan et al., 2017; Zhang et al., "Towards Building the
Federated GPT: Federated Instruction Tuning", 2023).

``B_g = sum_i p_i s_i B_i`` and ``A_g = sum_i p_i A_i``, averaged separately, so the global update is
``B_g A_g``, which is not the average of the products (the known inexactness of this baseline). Every
client must share one rank per module (the "bucket effect": everyone trains at the smallest rank).
FedIT is the same aggregation with AdamW as the local optimiser. Suggested: homogeneous rank 8.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from flexlora.core.aggregators.base import Aggregator, GlobalState, client_weights, validate_updates
from flexlora.core.errors import AggregationError
from flexlora.core.lora import LoraFactors, LoraUpdate, LowRank

__all__ = ["FedAvg"]


class FedAvg(Aggregator):
    """Separate weighted averages of ``A`` and scale-folded ``B``; homogeneous ranks only."""

    name = "fedavg"

    def aggregate(self, updates: Sequence[LoraUpdate], previous: GlobalState | None = None) -> GlobalState:
        validate_updates(updates)
        weights = client_weights(updates)
        modules = {}
        for name in updates[0].modules:
            factors = [u.modules[name] for u in updates]
            ranks = sorted({f.rank for f in factors})
            if len(ranks) > 1:
                raise AggregationError(
                    f"{self.name} needs one rank per module, module {name!r} has ranks {ranks}: "
                    "use flexlora or hetlora for heterogeneous ranks"
                )
            B = sum(p * f.scale * f.B.float() for f, p in zip(factors, weights, strict=True))
            A = sum(p * f.A.float() for f, p in zip(factors, weights, strict=True))
            modules[name] = LowRank(torch.as_tensor(B), torch.as_tensor(A))
        return GlobalState(modules, self.name)

    def payload(
        self, state: GlobalState, ranks: Mapping[str, int], alpha: float, use_rslora: bool = False
    ) -> dict[str, LoraFactors]:
        for name, r in ranks.items():
            if r != state.modules[name].rank:
                raise AggregationError(
                    f"{self.name} payload: module {name!r} is held at rank {state.modules[name].rank}, "
                    f"rank {r} was asked; FedAvg cannot change ranks"
                )
        return super().payload(state, ranks, alpha, use_rslora)
