"""The aggregator contract and what every aggregator shares: validation, weights, global state.

An aggregator turns client updates into a :class:`GlobalState` (per module, the global update to the base
weight in factored form ``dW = B @ A``, scales folded in) and turns a global state into a client's
payload at that client's per-module ranks. Nothing else: sampling, training and I/O live above.
"""

from __future__ import annotations

import math
import numbers
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from flexlora.core.errors import AggregationError
from flexlora.core.lora import LoraFactors, LoraUpdate, LowRank, lora_scale
from flexlora.core.svd import complete_rows

__all__ = [
    "Aggregator",
    "GlobalState",
    "client_weights",
    "validate_updates",
    "validate_update",
    "skeleton",
    "stack_scaled",
    "pad_columns",
    "leading_factors",
    "exact_factors",
]


@dataclass
class GlobalState:
    """The global model's update to each base weight: ``modules[name].delta()`` is ``dW (d, k)``.

    ``svd_form``: every module is already an SVD, ``B = U S`` and ``A = V^T`` (orthonormal columns of ``U``
    and rows of ``V^T``, ``S`` descending), so its singular values are the column norms of ``B``.
    ``seed``: seeds the fresh ``A`` rows of payloads cut beyond its rank (:func:`leading_factors`, per module);
    the round loop sets it from the run's seed and the round.
    """

    modules: dict[str, LowRank]
    method: str
    info: dict[str, float] = field(default_factory=dict)
    svd_form: bool = False
    seed: int = 0

    def singular_values(self, name: str, top: int | None = None) -> torch.Tensor:
        """Singular values of ``dW`` for one module, descending: ``B``'s column norms in SVD form, else the
        factored route (never forms ``dW``)."""
        from flexlora.core.svd import svd_lowrank_product

        lr = self.modules[name]
        if self.svd_form:
            return lr.B.norm(dim=0)[:top]
        return svd_lowrank_product(lr.B, lr.A, route="auto", max_rank=top).S

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``{name.B, name.A}`` tensors for safetensors (contiguous, on CPU)."""
        out = {}
        for name, lr in self.modules.items():
            out[f"{name}.B"] = lr.B.detach().contiguous().cpu()
            out[f"{name}.A"] = lr.A.detach().contiguous().cpu()
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], method: str) -> GlobalState:
        names = sorted({k.rsplit(".", 1)[0] for k in tensors})
        missing = [n for n in names if f"{n}.A" not in tensors or f"{n}.B" not in tensors]
        if missing:
            raise AggregationError(f"global state is missing A or B for module {missing[0]!r}")
        return cls({n: LowRank(tensors[f"{n}.B"], tensors[f"{n}.A"]) for n in names}, method)

    @classmethod
    def initial(
        cls, shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int], method: str, seed: int = 0
    ) -> GlobalState:
        """The round-0 state shared by every method: ``B = 0`` and ``A`` drawn like PEFT's default init
        (Kaiming-uniform with ``a = sqrt(5)``, i.e. ``U(-1/sqrt(k), 1/sqrt(k))``) at each module's largest
        rank. A client of rank ``r`` starts from the first ``r`` rows, so paired runs share their init."""
        modules = {}
        for name in sorted(shapes):
            d, k = shapes[name]
            r = ranks[name]
            # one generator per module, so the first r rows do not depend on other modules' ranks
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            A = (torch.rand(r, k, generator=gen) * 2 - 1) / math.sqrt(k)
            modules[name] = LowRank(torch.zeros(d, r), A)
        return cls(modules, method)


def client_weights(updates: Sequence[LoraUpdate]) -> list[float]:
    """``p_i = n_i / sum_j n_j`` over the clients of this round."""
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def _label(u: LoraUpdate, i: int) -> str:
    return f"client {u.client_id!r}" if u.client_id else f"client #{i}"


def validate_updates(updates: Sequence[LoraUpdate]) -> None:
    """Refuse updates that cannot be aggregated together; the message names the client and module.

    Checks: at least one update, and :func:`validate_update` of each against the first.
    """
    if not updates:
        raise AggregationError("no client updates to aggregate")
    for i, u in enumerate(updates):
        validate_update(u, i, updates[0])


def validate_update(u: LoraUpdate, i: int, ref: LoraUpdate) -> None:
    """Refuse update number ``i`` if it cannot be aggregated with ``ref`` (the round's first update).

    Checks: a positive example count; the same module set and module shapes as ``ref``; ``B (d, r)`` and
    ``A (r, k)`` agree on ``r``; floating dtype; finite values and ``lora_alpha``.
    """
    who = _label(u, i)
    n = u.num_examples
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n <= 0:
        raise AggregationError(f"{who}: num_examples must be a positive integer, got {n!r}")
    if set(u.modules) != set(ref.modules):
        diff = sorted(set(u.modules) ^ set(ref.modules))
        raise AggregationError(f"{who}: module set differs from {_label(ref, 0)} (e.g. {diff[0]!r})")
    for name, f in u.modules.items():
        if f.A.ndim != 2 or f.B.ndim != 2 or f.B.shape[1] != f.A.shape[0]:
            raise AggregationError(
                f"{who}: module {name!r}: B {tuple(f.B.shape)} and A {tuple(f.A.shape)} disagree on the rank"
            )
        if f.shape != ref.modules[name].shape:
            raise AggregationError(
                f"{who}: module {name!r} has shape {f.shape}, {_label(ref, 0)} has {ref.modules[name].shape}"
            )
        if not math.isfinite(f.alpha):
            raise AggregationError(f"{who}: module {name!r} has non-finite lora_alpha {f.alpha!r}")
        for label, t in (("A", f.A), ("B", f.B)):
            if not t.is_floating_point():
                raise AggregationError(f"{who}: module {name!r} {label} has non-float dtype {t.dtype}")
            if not torch.isfinite(t).all():
                raise AggregationError(f"{who}: module {name!r} {label} has NaN or Inf values")


def skeleton(u: LoraUpdate) -> LoraUpdate:
    """``u`` with its tensors replaced by empty ones of the same ``(d, k)`` on the meta device: enough to
    validate other updates against (:func:`validate_update`), at no memory."""
    modules = {
        name: LoraFactors(
            torch.empty(0, f.A.shape[-1], device="meta"), torch.empty(f.B.shape[0], 0, device="meta"), f.alpha
        )
        for name, f in u.modules.items()
    }
    return LoraUpdate(modules, u.num_examples, u.client_id)


def stack_scaled(
    factors: Sequence[LoraFactors], weights: Sequence[float], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[p_1 s_1 B_1 | ... | p_n s_n B_n]`` ``(d, R)`` and ``[A_1; ...; A_n]`` ``(R, k)``, ``R = sum r_i``:
    their product is ``sum_i p_i s_i B_i A_i`` exactly."""
    Bs = torch.cat([(p * f.scale) * f.B.to(dtype) for f, p in zip(factors, weights, strict=True)], dim=1)
    As = torch.cat([f.A.to(dtype) for f in factors], dim=0)
    return Bs, As


def pad_columns(B: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad ``B (d, r)`` on the right to ``(d, width)``."""
    return torch.nn.functional.pad(B, (0, width - B.shape[1]))


def leading_factors(
    state: GlobalState, ranks: Mapping[str, int], alpha: float, use_rslora: bool = False
) -> dict[str, LoraFactors]:
    """Cut rank-``r`` factors from a state: ``B = B_g[:, :r] / s_r`` and ``A = A_g[:r]``; beyond the state's
    rank, zero ``B`` columns and fresh orthonormal ``A`` rows (:func:`complete_rows`, seeded by ``state.seed``
    and the module's name, so each module, round and run draws its own).

    Raises:
        AggregationError: a rank is negative or above ``min(d, k)`` of its module (clip with
            :func:`flexlora.core.ranks.module_ranks`); no payload is cut.
    """
    out = {}
    for name, r in ranks.items():
        lr = state.modules[name]
        if not 0 <= r <= min(lr.shape):
            raise AggregationError(
                f"payload: module {name!r} of shape {lr.shape} cannot take rank {r}: "
                f"ranks must lie in [0, min(d, k) = {min(lr.shape)}]"
            )
        B = pad_columns(lr.B[:, :r], r) / lora_scale(alpha, r, use_rslora)
        A = complete_rows(lr.A, r, seed=state.seed * 1_000_003 + zlib.crc32(name.encode()))
        out[name] = LoraFactors(A, B, alpha, use_rslora)
    return out


def exact_factors(state: GlobalState, alpha: float, use_rslora: bool = False) -> dict[str, LoraFactors]:
    """The whole state as LoRA factors at each module's own rank ``q``: ``s_q B A`` is exactly ``dW``."""
    return {
        name: LoraFactors(lr.A, lr.B / lora_scale(alpha, lr.rank, use_rslora), alpha, use_rslora)
        for name, lr in state.modules.items()
    }


class Aggregator(ABC):
    """Combine client updates into a global state, and cut payloads from it.

    Subclasses set ``name`` and implement :meth:`aggregate`; :meth:`payload` defaults to the leading ``r``
    columns of ``B`` / rows of ``A`` (zero / fresh orthonormal rows beyond the state's rank).
    """

    name: str = ""

    @abstractmethod
    def aggregate(self, updates: Sequence[LoraUpdate], previous: GlobalState | None = None) -> GlobalState:
        """Combine validated client updates (``previous`` is the state they started from)."""

    def aggregate_stream(
        self, updates: Iterable[LoraUpdate], previous: GlobalState | None = None
    ) -> GlobalState:
        """:meth:`aggregate` over updates that arrive one at a time (a generator reading them as they come).

        Methods whose result is a running sum (FlexLoRA) fold each update and drop it, so memory does not
        grow with the number of clients; the default collects them and calls :meth:`aggregate`.
        """
        return self.aggregate(list(updates), previous)

    def hyperparameters(self) -> dict[str, object]:
        """Shown in logs and saved with runs."""
        return {}

    def payload(
        self, state: GlobalState, ranks: Mapping[str, int], alpha: float, use_rslora: bool = False
    ) -> dict[str, LoraFactors]:
        """The factors a client of per-module ``ranks`` starts from (see :func:`leading_factors`)."""
        return leading_factors(state, ranks, alpha, use_rslora)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({params})"
