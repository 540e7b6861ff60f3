"""raFLoRA (Wu, Hu, Min and Wang, "Preventing Rank Collapse in Federated Low-Rank Adaptation with Client
Heterogeneity", arXiv 2602.13486, 2026).

The paper's diagnosis: with SVD-based redistribution (FlexLoRA), rank component ``j`` of the global update is
supplied only by the clients whose rank exceeds ``j``, yet the aggregate divides it by every client's weight,
``dW = sum_i p_i s_i B_i A_i``. Each round shrinks the components beyond the smallest rank by the share of
clients that hold them, so the energy collapses geometrically into the smallest shared rank.

The fix: split every local update into rank partitions and weight each partition by the clients that
actually contribute to it. With ``C_j = {i : r_i > j}`` the clients holding component ``j`` (0-based) of a
module and ``P_j = sum_{l in C_j} p_l``,

    ``dW = sum_i sum_{j < r_i} (p_i / P_j) s_i B_i[:, j] A_i[j, :]``,

i.e. column ``j`` of every ``B_i`` is re-weighted by ``p_i / P_j``. The partitions are the intervals between
consecutive distinct client ranks (the contributor set is constant inside each one), so the rule is the same
whether written per component or per partition. With equal ranks ``P_j = 1`` and raFLoRA is FlexLoRA
exactly. Redistribution is FlexLoRA's: the SVD of ``dW`` (factored, never formed while the sum of ranks is
small) and the best rank-``r`` approximation for a client of rank ``r``.

As the paper defines it / where we differ: not known. The method section (Sec. 5, "raFLoRA Method") and
the proof (App. A) could not be read here: searching the stored copies of the web, documentation and public
code (queries on raFLoRA, rank-partitioned aggregation, rank collapse in heterogeneous FedLoRA and the arXiv
number, on 2026-12-01) found the abstract of v1 and v2 and the paper's table of contents, but no text of
Sec. 5 and no code by the authors. So no equation of the paper is cited here, and none is tested. The rule
above is our reading of the abstract ("decomposes local updates into rank partitions and then aggregates each
partition weighted by its effective client contributions"; v2 adds that the collapse is "with SVD-based
allocation", i.e. FlexLoRA's redistribution, which this class keeps), with the data shares ``p_i``
renormalised over each partition's contributors so that it is FlexLoRA at equal ranks. If the paper defines
the effective contributions otherwise (e.g. equal weights ``1 / |C_j|``, or partitions at fixed rank
boundaries rather than at the clients' ranks), ``partition_weights`` is the one place to change. Check it
against the paper's equations before quoting results as raFLoRA's. The paper's training recipe is not part
of the aggregator.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from flexlora.core.aggregators.base import GlobalState, client_weights, validate_updates
from flexlora.core.aggregators.flexlora import FlexLoRA
from flexlora.core.lora import LoraFactors, LoraUpdate, LowRank
from flexlora.core.svd import svd_lowrank_product

__all__ = ["RaFLoRA", "partition_weights"]


def partition_weights(ranks: Sequence[int], weights: Sequence[float]) -> list[torch.Tensor]:
    """Per client ``i``, the ``r_i`` column weights ``p_i / P_j`` with ``P_j = sum_{l : r_l > j} p_l``."""
    r_max = max(ranks)
    p = torch.tensor(weights, dtype=torch.float64)
    covers = torch.tensor(ranks).unsqueeze(1) > torch.arange(r_max)  # (n, r_max): client i holds column j
    share = (p.unsqueeze(1) * covers).sum(0)  # (r_max,) P_j, > 0 for every j < r_max
    return [p[i] / share[:r] for i, r in enumerate(ranks)]


def partition_stack(
    factors: Sequence[LoraFactors], weights: Sequence[float], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[s_1 B_1 diag(w_1) | ... ]`` ``(d, R)`` and ``[A_1; ...]`` ``(R, k)``: their product is raFLoRA's ``dW``."""
    cols = partition_weights([f.rank for f in factors], weights)
    Bs = torch.cat([f.scale * f.B.to(dtype) * w.to(dtype) for f, w in zip(factors, cols, strict=True)], dim=1)
    As = torch.cat([f.A.to(dtype) for f in factors], dim=0)
    return Bs, As


class RaFLoRA(FlexLoRA):
    """FlexLoRA with rank-partitioned aggregation weights (module docstring); same arguments as FlexLoRA."""

    name = "raflora"

    def aggregate(self, updates: Sequence[LoraUpdate], previous: GlobalState | None = None) -> GlobalState:
        validate_updates(updates)
        weights = client_weights(updates)
        modules = {}
        for name in updates[0].modules:
            Bs, As = partition_stack([u.modules[name] for u in updates], weights, self.dtype)
            U, S, Vh = svd_lowrank_product(Bs, As, route=self.svd, max_rank=Bs.shape[1])
            modules[name] = LowRank(U * S, Vh)  # (d, q), (q, k)
        return GlobalState(modules, self.name, svd_form=True)

    def aggregate_stream(
        self, updates: Iterable[LoraUpdate], previous: GlobalState | None = None
    ) -> GlobalState:
        """The partition weights need every client's rank first: collect, then :meth:`aggregate` (not
        FlexLoRA's running sum, which would drop them)."""
        return self.aggregate(list(updates), previous)
