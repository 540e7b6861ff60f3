"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources", NeurIPS 2024).

Aggregate: ``dW = sum_i p_i s_i B_i A_i`` with ``p_i = n_i / sum_j n_j`` and ``s_i`` each client's LoRA scale,
then ``dW = U S V^T``. Redistribute: a client of rank ``r`` and scale ``s_r`` receives
``B = U_r S_r / s_r`` and ``A = V_r^T``, so ``s_r B A`` is the best rank-``r`` approximation of ``dW``
(Eckart-Young: its Frobenius error is the norm of the tail singular values). All singular values go into
``B``, as in the paper's code.

The state keeps ``U S`` and ``V^T`` with at most ``R = sum_i r_i`` triplets, which is exact since
``rank(dW) <= R``. Updates are folded one at a time into a running sum of ``n_i s_i B_i A_i``
(:class:`flexlora.core.lowrank_sum.LowRankSum`, divided by ``sum_j n_j`` at the end), so the server's memory
does not grow with the number of clients. With ``top``, only the leading ``top`` triplets are kept (all a
client of rank ``<= top`` is ever sent), found by randomized subspace iteration where the sum is dense: for
``flexlora aggregate``, whose only output is payloads; the round loop keeps the exact state.
Suggested use: any mix of client ranks; learning rate per rank scale (see docs).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from flexlora.core.aggregators.base import Aggregator, GlobalState, skeleton, validate_update
from flexlora.core.errors import AggregationError
from flexlora.core.lora import LoraUpdate, LowRank
from flexlora.core.lowrank_sum import LowRankSum
from flexlora.core.svd import SVDRoute, choose_route

__all__ = ["FlexLoRA"]


class FlexLoRA(Aggregator):
    """SVD-based heterogeneous-rank aggregation.

    Args:
        svd: ``auto`` (factored while ``R <= min(d, k) / 2``, else dense), ``dense`` or ``factored``.
        dtype: dtype of the aggregation arithmetic (float32 by default; float64 for reference checks).
        top: keep only the leading ``top`` triplets per module (randomized where the sum is dense; see
            :func:`flexlora.core.svd.top_svd`); ``None`` keeps the exact ``dW``.

    Example:
        >>> state = FlexLoRA().aggregate(updates)            # doctest: +SKIP
        >>> factors = FlexLoRA().payload(state, {"q": 8}, alpha=16)  # doctest: +SKIP
    """

    name = "flexlora"

    def __init__(self, svd: SVDRoute = "auto", dtype: torch.dtype = torch.float32, top: int | None = None):
        choose_route(1, 1, 0, svd)  # validates the route name
        if top is not None and top <= 0:
            raise ValueError(f"top must be a positive rank, got {top}")
        self.svd = svd
        self.dtype = dtype
        self.top = top

    def hyperparameters(self) -> dict[str, object]:
        params: dict[str, object] = {"svd": self.svd, "dtype": str(self.dtype).removeprefix("torch.")}
        if self.top is not None:
            params["top"] = self.top
        return params

    def aggregate(self, updates: Sequence[LoraUpdate], previous: GlobalState | None = None) -> GlobalState:
        return self.aggregate_stream(updates, previous)

    def aggregate_stream(
        self, updates: Iterable[LoraUpdate], previous: GlobalState | None = None
    ) -> GlobalState:
        """Fold each update into per-module running sums of ``n_i s_i B_i A_i`` as it arrives (validated
        against the first), then take each sum's SVD and divide by ``sum_i n_i``."""
        sums, total = self._fold(updates)
        modules = {}
        for name in list(sums):
            U, S, Vh = sums.pop(name).svd(self.top)  # each sum freed once its SVD is taken
            modules[name] = LowRank(U.mul_(S / total), Vh)  # (d, q), (q, k); in place: no second U
        return GlobalState(modules, self.name, svd_form=True)

    def _fold(self, updates: Iterable[LoraUpdate]) -> tuple[dict[str, LowRankSum], int]:
        """The running sums and ``sum_i n_i``. Each update is released before the next is read (no
        ``enumerate``, whose reused result tuple would hold it), and a function of its own, so that nothing
        holds the last one while the SVDs run."""
        sums: dict[str, LowRankSum] = {}
        first, total, count = None, 0, 0
        for u in updates:
            validate_update(u, count, first or u)
            first = first or skeleton(u)  # what later updates are checked against, without its tensors
            total, count = total + u.num_examples, count + 1
            self._add(sums, u)
            del u
        if first is None:
            raise AggregationError("no client updates to aggregate")
        return sums, total

    def _add(self, sums: dict[str, LowRankSum], u: LoraUpdate) -> None:
        """Fold ``n s B A`` of each of ``u``'s modules into its running sum."""
        for name, f in u.modules.items():
            acc = sums.setdefault(name, LowRankSum(self.svd))
            acc.add(f.B.to(self.dtype), f.A.to(self.dtype), scale=u.num_examples * f.scale)  # (d, r), (r, k)
