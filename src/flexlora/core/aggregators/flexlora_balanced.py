"""Factor-balance controls for FlexLoRA: the same aggregation and the same product ``s B A``, another split.

FlexLoRA (:mod:`flexlora.core.aggregators.flexlora`) hands a client ``B = U_r S_r / s`` and ``A = V_r^T``,
all singular values in ``B`` and rows of ``A`` of norm 1. The paper's code does the same
(alibaba/FederatedScope, branch ``FlexLoRA``, ``fed_utils/adaptive_peft.py``, ``distribute_weight_fast``:
``lora_B = U diag(S) / (alpha / r)``, ``lora_A = V^T``). FedIT's ``A`` stays near PEFT's Kaiming-uniform
init, ``U(-1/sqrt(k), 1/sqrt(k))``, whose rows have norm ``sqrt(k / (3k)) = 1/sqrt(3) ~ 0.58``. With Adam,
which moves every entry by about the learning rate, a step on ``B`` changes ``s B A`` in proportion to the
norm of ``A``'s rows: under FlexLoRA about ``sqrt(3) ~ 1.7`` times more than under FedIT. These controls
keep FlexLoRA's rule and change only the split, so a difference between them and ``flexlora`` is the
balance's, not the rule's:

* ``flexlora-initnorm``: ``A = c V_r^T`` and ``B = U_r S_r / (c s)`` with ``c = 1/sqrt(3)``, FedIT's
  expected init row norm;
* ``flexlora-sqrt``: the balanced split ``B = U_r sqrt(S_r) / s`` and ``A = sqrt(S_r) V_r^T``.

Both rescale each rank-one component ``s B[:, j] A[j]`` on its own, so ``s B A`` stays exactly FlexLoRA's
best rank-``r`` approximation, and neither needs the state to be flagged as an SVD (a state read back from
a checkpoint or a Flower message is split the same way). A component with a zero ``B`` column (a direction
beyond the global update's rank) keeps FlexLoRA's ``A`` row under ``flexlora-sqrt`` so that it still
trains; a module whose ``B`` is all zero (the shared round-0 init) is handed out unchanged, so every method
starts from the same Kaiming ``A``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from flexlora.core.aggregators.base import GlobalState
from flexlora.core.aggregators.flexlora import FlexLoRA
from flexlora.core.lora import LoraFactors

__all__ = ["FEDIT_A_ROW_NORM", "FlexLoRAInitNorm", "FlexLoRASqrt", "init_norm_split", "sqrt_split"]

#: expected row norm of PEFT's default LoRA ``A`` init, ``U(-1/sqrt(k), 1/sqrt(k))`` over ``k`` entries
FEDIT_A_ROW_NORM = 1 / math.sqrt(3)


def _live(f: LoraFactors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per component ``j``: ``||s B[:, j]||``, ``||A[j]||`` and whether both are nonzero."""
    b, a = abs(f.scale) * f.B.norm(dim=0), f.A.norm(dim=1)
    return b, a, (b > 0) & (a > 0)


def _rescale(f: LoraFactors, t: torch.Tensor) -> LoraFactors:
    """``A[j] * t_j`` and ``B[:, j] / t_j``: each component's product, hence ``s B A``, is unchanged."""
    return LoraFactors(f.A * t[:, None], f.B / t, f.alpha, f.use_rslora)


def sqrt_split(f: LoraFactors) -> LoraFactors:
    """Balance each component: ``||A[j]|| = s ||B[:, j]|| = sqrt(sigma_j)`` with ``sigma_j = s ||B[:, j]|| ||A[j]||``
    (for SVD-form factors, ``B = U sqrt(S) / s`` and ``A = sqrt(S) V^T``); dead components are unchanged."""
    b, a, live = _live(f)
    t = torch.where(live, (b / a.clamp_min(torch.finfo(a.dtype).tiny)).sqrt(), torch.ones_like(a))
    return _rescale(f, t)


def init_norm_split(f: LoraFactors, norm: float = FEDIT_A_ROW_NORM) -> LoraFactors:
    """Every nonzero ``A`` row to norm ``norm``, its ``B`` column compensated; all-zero ``B``: unchanged."""
    if not bool(f.B.any()):
        return f
    a = f.A.norm(dim=1)
    return _rescale(f, torch.where(a > 0, norm / a.clamp_min(torch.finfo(a.dtype).tiny), torch.ones_like(a)))


class _Resplit(FlexLoRA):
    """FlexLoRA whose payload factors are re-split by :attr:`split` (``s B A`` unchanged)."""

    split: staticmethod

    def payload(
        self, state: GlobalState, ranks: Mapping[str, int], alpha: float, use_rslora: bool = False
    ) -> dict[str, LoraFactors]:
        factors = super().payload(state, ranks, alpha, use_rslora)
        return {n: self.split(f) for n, f in factors.items()}


class FlexLoRAInitNorm(_Resplit):
    """FlexLoRA with ``A``'s rows at FedIT's init norm ``c`` and ``B`` divided by ``c``."""

    name = "flexlora-initnorm"
    split = staticmethod(init_norm_split)


class FlexLoRASqrt(_Resplit):
    """FlexLoRA with the balanced split ``B = U sqrt(S) / s``, ``A = sqrt(S) V^T`` (see :func:`sqrt_split`)."""

    name = "flexlora-sqrt"
    split = staticmethod(sqrt_split)
