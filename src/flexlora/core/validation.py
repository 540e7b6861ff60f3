"""Checks every client update must pass before it touches the global state.

A client is sent factors at its own per-module ranks ``r_m`` for the base model's modules ``W_m (d_m, k_m)``.
Whatever carries its reply (a function call, Flower messages, a file), the update it sends back is refused
unless it has

* exactly the modules it was sent (no missing, no extra ones);
* ``A_m (r_m, k_m)`` and ``B_m (d_m, r_m)``: the declared rank and the base model's shape;
* a floating dtype (``float16``, ``bfloat16``, ``float32``, ``float64``) and finite values;
* the ``lora_alpha`` and rsLoRA flag it was sent (a client cannot change the scale its update is read with);
* ``A_m`` unchanged where ``A`` is frozen (FFA-LoRA);
* an integer example count in ``[1, max_examples]`` (it weighs the client in ``p_i = n_i / sum_j n_j``);
* optionally, a bounded norm of its effective update ``||dW_i||_F <= norm_bound``, with
  ``||dW_i||_F^2 = sum_m ||s_m B_m A_m||_F^2`` computed without forming ``B_m A_m`` from the ``r x r`` Gram
  matrices: ``||B A||_F^2 = tr((B^T B)(A A^T))``, in ``O((d + k) r^2)`` per module.

:func:`check_update` raises :class:`UpdateRejected` naming the client and the field; the round loop turns
that into a failure that leaves the update out of the round (see :meth:`flexlora.federation.Federation.triage`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from flexlora.core.errors import AdapterError
from flexlora.core.lora import LoraFactors, LoraUpdate

__all__ = [
    "ALLOWED_DTYPES",
    "MAX_EXAMPLES",
    "UpdateLimits",
    "UpdateRejected",
    "check_update",
    "update_norm",
    "product_norm_sq",
]

#: The largest credible example count: a larger claim would dominate the weighted average.
MAX_EXAMPLES = 10_000_000
ALLOWED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class UpdateRejected(AdapterError):
    """A client update failed a check; it is left out of the round and nothing else changes.

    Args:
        client_id: the sender.
        field: what is wrong: ``num_examples``, ``modules``, ``modules[<name>].A``, ``norm``, ...
        problem: how it is wrong.
    """

    def __init__(self, client_id: str, field: str, problem: str):
        self.client_id, self.field, self.problem = client_id, field, problem
        super().__init__(f"client {client_id!r}: {field}: {problem}; left out of this round")

    @property
    def kind(self) -> str:
        """The field without the module name (``modules[q].A`` -> ``A``), for counting rejections by kind."""
        return self.field.rsplit("].", 1)[-1] if "]." in self.field else self.field


@dataclass(frozen=True)
class UpdateLimits:
    """Bounds a credible update respects.

    Args:
        max_examples: the largest accepted example count.
        norm_bound: the largest accepted ``||dW_i||_F`` over all modules (``None``: unbounded).
    """

    max_examples: int = MAX_EXAMPLES
    norm_bound: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_examples, int) or self.max_examples < 1:
            raise ValueError(f"max_examples must be an integer >= 1, got {self.max_examples!r}")
        if self.norm_bound is not None and not (self.norm_bound > 0 and math.isfinite(self.norm_bound)):
            raise ValueError(f"norm_bound must be a finite number > 0, got {self.norm_bound!r}")


def product_norm_sq(f: LoraFactors) -> float:
    """``||s B A||_F^2 = s^2 tr((B^T B)(A A^T))`` in float64, never forming ``B A`` ``(d, k)``."""
    B, A = f.B.double(), f.A.double()
    return f.scale**2 * float(torch.trace((B.T @ B) @ (A @ A.T)).clamp_min(0))


def update_norm(modules: Mapping[str, LoraFactors]) -> float:
    """``||dW||_F = sqrt(sum_m ||s_m B_m A_m||_F^2)``: the norm of a client's whole effective update."""
    return math.sqrt(sum(product_norm_sq(f) for f in modules.values()))


def check_update(
    update: object,
    *,
    client_id: str,
    ranks: Mapping[str, int],
    shapes: Mapping[str, tuple[int, int]],
    alpha: float,
    use_rslora: bool = False,
    limits: UpdateLimits | None = None,
    frozen_A: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """Refuse a client update that does not match what the client was sent.

    Args:
        update: the client's :class:`LoraUpdate` (anything else is refused).
        client_id: the client the job was for; the update must carry the same id.
        ranks: the per-module ranks the client was sent (``FederationPlan.ranks(client_id)``).
        shapes: ``(d, k)`` of every module of the base model (``FederationPlan.shapes``).
        alpha, use_rslora: the LoRA scale the client was sent.
        limits: example-count and norm bounds.
        frozen_A: per module, the ``A (r, k)`` the client had to keep (FFA-LoRA), else ``None``.

    Returns:
        ``||dW_i||_F``, the norm of the update's effective ``sum_m s_m B_m A_m`` (for logs and clipping).

    Raises:
        UpdateRejected: naming the client and the field, at the first failed check.
    """
    limits = limits or UpdateLimits()

    def refuse(field: str, problem: str) -> UpdateRejected:
        return UpdateRejected(client_id, field, problem)

    if not isinstance(update, LoraUpdate) or not isinstance(update.modules, Mapping):
        raise refuse("update", f"expected a LoraUpdate with a modules mapping, got {type(update).__name__}")
    if update.client_id != client_id:
        raise refuse("client_id", f"update is for client {update.client_id!r}")
    n = update.num_examples
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or not 1 <= n <= limits.max_examples:
        raise refuse("num_examples", f"must be an integer in [1, {limits.max_examples}], got {n!r}")
    got, want = set(update.modules), set(ranks)
    if got != want:
        if want - got:
            raise refuse(
                "modules", f"{len(want - got)} sent module(s) missing, e.g. {sorted(want - got)[0]!r}"
            )
        raise refuse("modules", f"{len(got - want)} module(s) never sent, e.g. {sorted(got - want)[0]!r}")
    for name in sorted(ranks):
        f, r = update.modules[name], ranks[name]
        if name not in shapes:
            raise refuse(f"modules[{name}]", "is not a module of the base model")
        d, k = shapes[name]
        if not isinstance(f, LoraFactors):
            raise refuse(f"modules[{name}]", f"expected LoraFactors, got {type(f).__name__}")
        for label, t, shape in (("A", f.A, (r, k)), ("B", f.B, (d, r))):
            field = f"modules[{name}].{label}"
            if not isinstance(t, torch.Tensor):
                raise refuse(field, f"expected a tensor, got {type(t).__name__}")
            if t.dtype not in ALLOWED_DTYPES:
                raise refuse(f"{field}.dtype", f"{t.dtype} is not one of float16, bfloat16, float32, float64")
            if tuple(t.shape) != shape:
                raise refuse(
                    f"{field}.shape",
                    f"is {tuple(t.shape)}, expected {shape} (rank {r} was sent, base {d}x{k})",
                )
            if not bool(torch.isfinite(t).all()):
                raise refuse(f"{field}.values", "has NaN or Inf values")
        if (
            isinstance(f.alpha, bool)
            or not isinstance(f.alpha, numbers.Real)
            or float(f.alpha) != float(alpha)
        ):
            raise refuse(f"modules[{name}].alpha", f"is {f.alpha!r}, {alpha!r} was sent")
        if bool(f.use_rslora) != bool(use_rslora):
            raise refuse(f"modules[{name}].use_rslora", f"is {f.use_rslora!r}, {use_rslora!r} was sent")
        if frozen_A is not None and name in frozen_A:
            ref = frozen_A[name]
            if not torch.allclose(f.A.to(ref.dtype), ref, rtol=0.0, atol=1e-5):
                raise refuse(f"modules[{name}].A.values", "changed, but A is frozen for this method")
    norm = update_norm(update.modules)
    if not math.isfinite(norm):
        raise refuse("norm", "||dW||_F overflows")
    if limits.norm_bound is not None and norm > limits.norm_bound:
        raise refuse("norm", f"||dW||_F = {norm:.4g} exceeds the bound {limits.norm_bound:g}")
    return norm
