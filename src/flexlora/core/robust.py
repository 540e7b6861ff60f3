"""Robust aggregation for hostile federations: norm clipping, coordinate-wise trimmed mean and median,
wrapped around any :class:`~flexlora.core.aggregators.Aggregator`.

**Clipping.** Client ``i``'s contribution is its effective update ``dW_i = {s_m B_m A_m}_m`` over all modules,
of norm ``||dW_i||_F`` (see :func:`flexlora.core.validation.update_norm`). It is scaled by
``c_i = min(1, C / ||dW_i||_F)``, done exactly and rank-preservingly as ``B_m <- c_i B_m``. ``C`` is
``clip_norm``, or the median of the round's norms when unset (a hostile client then weighs at most as much
as the median one). Clipping is then followed by the wrapped aggregator's own weighted rule.

**What "median" means for low-rank factors.** Coordinates of ``B_i`` and ``A_i`` are not comparable across
clients: ``B A = (B G)(G^{-1} A)`` for any invertible ``G``, and ranks differ. The robust rule is therefore
applied in the space where the wrapped aggregator averages:

The space is the wrapped method's (:attr:`flexlora.methods.Method.space`), given by the caller.

* *Product space* (``flexlora``, ``flora``, ``raflora``, ``florist``, whose global update is built from the
  products ``s_i B_i A_i``; the consensus replaces raFLoRA's partition weights): every ``dW_i``
  of a module lies in the column span of ``Bs = [s_1 B_1 | ... | s_n B_n]`` ``(d, R)`` and the row span of
  ``As = [A_1; ...; A_n]`` ``(R, k)``. With ``Ub`` ``(d, p)`` the left singular vectors of ``Bs`` and ``Va``
  ``(k, q)`` those of ``As^T`` (canonical: ``Bs Bs^T = sum_i s_i^2 B_i B_i^T`` does not depend on client
  order), ``dW_i = Ub M_i Va^T`` exactly, with the core ``M_i = (Ub^T s_i B_i)(A_i Va)`` ``(p, q)``,
  ``p, q <= R``. The rule is applied entrywise to the cores, ``M* = median_i M_i`` (or the trimmed mean),
  and ``M* = U' S V'^T`` gives the consensus ``B* = Ub U' S`` ``(d, rank)``, ``A* = V'^T Va^T``. A
  direction only a minority of clients uses has coordinate 0 for the others, so its median is 0. Cost
  ``O((d + k) R^2 + n R^2 + R^3)``; ``dW`` is never formed. Coordinate-wise rules are equivariant to
  permutations and sign flips of the basis, so the result does not depend on client order.
* *Factor space* (``fedavg``, ``hetlora``, ``ffa``, which average ``s_i B_i`` and ``A_i`` separately, zero-padded
  to the largest rank): the rule is applied entrywise to ``s_i B_i`` and ``A_i``; column ``j`` of ``B`` and
  row ``j`` of ``A`` are taken over the clients whose rank exceeds ``j`` (so a frozen, shared ``A`` of
  FFA-LoRA stays exactly shared).

The consensus goes to the wrapped aggregator as a single update of scale 1, which then stores it its usual
way (FlexLoRA: its SVD, i.e. itself; FLoRA: stacked onto the previous state; FedAvg/HetLoRA/FFA: as is).
Robust rules weigh clients equally: example counts are the clients' own claims. The trimmed mean drops
``floor(trim * n)`` of the values at each end of every coordinate; its breakdown point is ``trim``, the
median's is ``1/2``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Literal

import torch

from flexlora.core.aggregators.base import Aggregator, GlobalState, validate_updates
from flexlora.core.lora import LoraFactors, LoraUpdate
from flexlora.core.validation import update_norm

__all__ = [
    "ROBUST_RULES",
    "RobustAggregator",
    "robust_mean",
    "clip_updates",
    "product_consensus",
    "factor_consensus",
]

Rule = Literal["clip", "trimmed", "median"]
ROBUST_RULES: tuple[str, ...] = ("none", "clip", "trimmed", "median")


def robust_mean(x: torch.Tensor, rule: str, trim: float = 0.1) -> torch.Tensor:
    """Entrywise ``median`` or ``trimmed`` mean over dim 0 of ``x`` ``(n, ...)``.

    The median of an even count is the mean of the two middle values; the trimmed mean sorts each entry's
    ``n`` values and averages all but the ``floor(trim * n)`` smallest and largest.
    """
    n = x.shape[0]
    s, _ = torch.sort(x, dim=0)
    if rule == "median":
        return s[(n - 1) // 2 : n // 2 + 1].mean(0)
    if rule == "trimmed":
        t = min(int(math.floor(trim * n)), (n - 1) // 2)
        return s[t : n - t].mean(0)
    raise ValueError(f"unknown robust rule {rule!r}: use 'median' or 'trimmed'")


def clip_updates(
    updates: Sequence[LoraUpdate], clip_norm: float | None
) -> tuple[list[LoraUpdate], dict[str, float]]:
    """Scale each update to ``||dW_i||_F <= C`` by ``B <- min(1, C / ||dW_i||_F) B`` (``C``: ``clip_norm``, else the
    median norm of ``updates``). Returns the clipped updates and ``{clip_norm, clipped, median_norm, max_norm}``."""
    norms = [update_norm(u.modules) for u in updates]
    bound = clip_norm if clip_norm is not None else statistics.median(norms)
    out = []
    for u, norm in zip(updates, norms, strict=True):
        c = 1.0 if norm <= bound or norm == 0 else bound / norm
        modules = {n: replace(f, B=f.B * c) for n, f in u.modules.items()} if c < 1.0 else dict(u.modules)
        out.append(LoraUpdate(modules, u.num_examples, u.client_id))
    info = {
        "clip_norm": float(bound),
        "clipped": float(sum(n > bound for n in norms)),
        "median_norm": float(statistics.median(norms)),
        "max_norm": float(max(norms)),
    }
    return out, info


def _unit_scale(A: torch.Tensor, B: torch.Tensor) -> LoraFactors:
    """Factors whose scale is exactly 1 (``alpha = r``), so ``s B A = B A``."""
    return LoraFactors(A.contiguous(), B.contiguous(), alpha=float(A.shape[0]))


def product_consensus(
    factors: Sequence[LoraFactors], rule: str, trim: float = 0.1, dtype: torch.dtype = torch.float64
) -> LoraFactors:
    """The robust consensus of the clients' ``s_i B_i A_i`` in their common principal basis (module docstring).

    Returns:
        Factors of scale 1 with ``B A = Ub M* Va^T``, at the rank of ``M*`` (at least 1).
    """
    Bs = torch.cat([f.scale * f.B.to(dtype) for f in factors], dim=1)  # (d, R)
    As = torch.cat([f.A.to(dtype) for f in factors], dim=0)  # (R, k)
    Ub = torch.linalg.svd(Bs, full_matrices=False).U  # (d, p): spans every s_i B_i
    Va = torch.linalg.svd(As.T, full_matrices=False).U  # (k, q): spans every A_i^T
    cores = torch.stack(
        [(Ub.T @ (f.scale * f.B.to(dtype))) @ (f.A.to(dtype) @ Va) for f in factors]
    )  # (n, p, q)
    U, S, Vh = torch.linalg.svd(robust_mean(cores, rule, trim), full_matrices=False)
    tol = S.max() * max(U.shape[0], Vh.shape[1]) * torch.finfo(dtype).eps if S.numel() else 0.0
    r = max(1, int((S > tol).sum()))
    out_dtype = factors[0].B.dtype if factors[0].B.is_floating_point() else torch.float32
    return _unit_scale((Vh[:r] @ Va.T).to(out_dtype), ((Ub @ U[:, :r]) * S[:r]).to(out_dtype))


def factor_consensus(factors: Sequence[LoraFactors], rule: str, trim: float = 0.1) -> LoraFactors:
    """Entrywise robust ``s_i B_i`` ``(d, r_max)`` and ``A_i`` ``(r_max, k)``; column / row ``j`` over the clients
    of rank ``> j``."""
    r_max = max(f.rank for f in factors)
    d, k = factors[0].shape
    B = torch.zeros(d, r_max, dtype=torch.float32)
    A = torch.zeros(r_max, k, dtype=torch.float32)
    levels = sorted({f.rank for f in factors})
    lo = 0
    for hi in levels:
        have = [f for f in factors if f.rank >= hi]  # clients that hold columns/rows lo..hi-1
        B[:, lo:hi] = robust_mean(torch.stack([f.scale * f.B[:, lo:hi].float() for f in have]), rule, trim)
        A[lo:hi] = robust_mean(torch.stack([f.A[lo:hi].float() for f in have]), rule, trim)
        lo = hi
    return _unit_scale(A, B)


class RobustAggregator(Aggregator):
    """``rule`` (``clip``, ``trimmed`` or ``median``) around ``inner``; see the module docstring for the math.

    Args:
        inner: the method (its payloads, state layout and name are kept).
        rule: ``clip``: clip, then ``inner``'s weighted rule; ``trimmed`` / ``median``: (clip if ``clip_norm``
            is set, then) the robust consensus, stored by ``inner``.
        clip_norm: ``C``; ``None``: the median of the round's norms for ``clip``, no clipping otherwise.
        trim: fraction trimmed at each end by ``trimmed``, in ``[0, 0.5)``.
        space: ``product`` or ``factor``, where ``inner`` averages (:attr:`flexlora.methods.Method.space`).

    Raises:
        ValueError: unknown rule or space, bad ``trim`` or ``clip_norm``.

    Example:
        >>> agg = RobustAggregator(FlexLoRA(), "median", space="product")                  # doctest: +SKIP
        >>> state = agg.aggregate(updates)   # state.info: clip and norm statistics  # doctest: +SKIP
    """

    def __init__(
        self,
        inner: Aggregator,
        rule: Rule = "median",
        clip_norm: float | None = None,
        trim: float = 0.1,
        *,
        space: str,
    ):
        if rule not in ("clip", "trimmed", "median"):
            raise ValueError(f"robust rule must be 'clip', 'trimmed' or 'median', got {rule!r}")
        if not 0 <= trim < 0.5:
            raise ValueError(f"trim must lie in [0, 0.5), got {trim!r}")
        if clip_norm is not None and not (clip_norm > 0 and math.isfinite(clip_norm)):
            raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
        if space not in ("product", "factor"):
            raise ValueError(f"space must be 'product' or 'factor', got {space!r}")
        self.inner, self.rule, self.clip_norm, self.trim = inner, rule, clip_norm, trim
        self.name, self.space = inner.name, space

    def hyperparameters(self) -> dict[str, object]:
        return {
            "inner": self.inner,
            "rule": self.rule,
            "clip_norm": self.clip_norm,
            "trim": self.trim,
            "space": self.space,
        }

    def aggregate(self, updates: Sequence[LoraUpdate], previous: GlobalState | None = None) -> GlobalState:
        validate_updates(updates)
        info: dict[str, float] = {}
        if self.rule == "clip" or self.clip_norm is not None:
            updates, info = clip_updates(updates, self.clip_norm)
        if self.rule == "clip":
            state = self.inner.aggregate(updates, previous=previous)
        else:
            combine = product_consensus if self.space == "product" else factor_consensus
            consensus = {
                name: combine([u.modules[name] for u in updates], self.rule, self.trim)
                for name in updates[0].modules
            }
            state = self.inner.aggregate([LoraUpdate(consensus, 1, "consensus")], previous=previous)
        state.info.update(info)
        return state

    def payload(
        self, state: GlobalState, ranks: Mapping[str, int], alpha: float, use_rslora: bool = False
    ) -> dict[str, LoraFactors]:
        return self.inner.payload(state, ranks, alpha, use_rslora)
