"""LoRA math: factors, the one scaling function, and low-rank global updates.

A client's LoRA on a module with base weight ``W (d x k)`` is ``B (d x r)``, ``A (r x k)`` and a scale
``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``). Its effective update is ``s * B @ A``. Aggregators work on
effective updates only; :func:`lora_scale` is the single place where the scale is computed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "ALPHA_RANGE",
    "LoraFactors",
    "LoraUpdate",
    "LowRank",
    "alpha_problem",
    "lora_scale",
    "factors_nbytes",
]

#: ``lora_alpha`` must lie in this closed range: the scale divides ``B`` when a global update is written back
#: as factors, so 0, subnormal or tiny alphas overflow it to Inf/NaN and huge ones flush it to zero.
ALPHA_RANGE = (1e-6, 1e6)


def alpha_problem(value: object) -> str | None:
    """What is wrong with ``value`` as a ``lora_alpha`` (not a real number, not finite, out of
    :data:`ALPHA_RANGE`), or ``None`` if it is usable."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number, got {value!r}"
    try:
        x = float(value)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        return f"must be finite, got {value!r}"
    lo, hi = ALPHA_RANGE
    if not lo <= x <= hi:
        return f"must be in [{lo:g}, {hi:g}], got {x!r}"
    return None


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """Return the LoRA scale ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA); 0 for rank 0."""
    if rank <= 0:
        return 0.0
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def factors_nbytes(factors: Mapping[str, LoraFactors]) -> int:
    """Bytes of the ``A`` and ``B`` tensors of ``factors``: what crosses the wire for them."""
    return sum(f.A.numel() * f.A.element_size() + f.B.numel() * f.B.element_size() for f in factors.values())


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA adapter; effective update ``scale * B @ A`` of shape ``(d, k)``.

    Args:
        A: ``(r, k)`` down projection.
        B: ``(d, r)`` up projection.
        alpha: ``lora_alpha`` of this module.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
    """

    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    use_rslora: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(d, k)``: the shape of the base weight this adapter updates."""
        return self.B.shape[0], self.A.shape[1]

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.use_rslora)

    def delta(self) -> torch.Tensor:
        """The dense effective update ``scale * B @ A`` ``(d, k)``; for tests and small modules."""
        return self.scale * (self.B @ self.A)


@dataclass
class LoraUpdate:
    """One client's adapter: factors per module (keyed by the module's path in the base model,
    e.g. ``model.layers.0.self_attn.q_proj``) and the number of training examples behind it."""

    modules: dict[str, LoraFactors]
    num_examples: int = 1
    client_id: str = ""

    def ranks(self) -> dict[str, int]:
        return {name: f.rank for name, f in self.modules.items()}


@dataclass
class LowRank:
    """A global update held in factored form ``dW = B @ A`` with every scale already folded in.

    Args:
        B: ``(d, q)``.
        A: ``(q, k)``. For FlexLoRA, ``B = U S`` and ``A = V^T`` with singular values in descending order.
    """

    B: torch.Tensor
    A: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    def delta(self) -> torch.Tensor:
        """The dense update ``B @ A`` ``(d, k)``."""
        return self.B @ self.A
