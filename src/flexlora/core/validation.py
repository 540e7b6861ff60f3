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
* a finite, and optionally bounded, norm of its effective update ``||dW_i||_F <= norm_bound``, with
  ``||dW_i||_F^2 = sum_m ||s_m B_m A_m||_F^2``.

The norm check is cheap in the common case: ``||s B A||_F <= |s| ||B||_F ||A||_F`` gives an upper bound in
one pass over the factors (``O((d + k) r)``); only when the bound exceeds ``norm_bound`` (or
:data:`MAX_NORM`) is the exact norm computed, from the ``r x r`` Gram matrices without forming ``B A``:
``||B A||_F^2 = tr((B^T B)(A A^T))``, ``O((d + k) r^2)`` per module. All checks together cost a few passes
over the update's bytes.

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
    "MAX_NORM",
    "UpdateLimits",
    "UpdateRejected",
    "check_update",
    "update_norm",
    "norm_upper_bound",
    "product_norm_sq",
]

#: The largest credible example count: a larger claim would dominate the weighted average.
MAX_EXAMPLES = 10_000_000
ALLOWED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: An update norm beyond this is refused even without ``norm_bound``: float32 aggregation would overflow.
MAX_NORM = 1e18


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
    """``||s B A||_F^2 = s^2 tr((B^T B)(A A^T)) = s^2 sum((B^T B) * (A A^T))`` (both Gram matrices are
    symmetric), never forming ``B A`` ``(d, k)``; Gram matrices in the factors' precision (at least float32),
    their contraction in float64."""
    dtype = torch.float64 if f.B.dtype == torch.float64 else torch.float32
    B, A = f.B.to(dtype), f.A.to(dtype)
    gram = ((B.T @ B).double() * (A @ A.T).double()).sum()  # (r, r) * (r, r)
    return f.scale**2 * float(gram.clamp_min(0))


def _fro(t: torch.Tensor) -> float:
    """``||t||_F`` in one fast pass (float32, float64 for float64 tensors); NaN or Inf if any entry is."""
    return float(
        torch.linalg.vector_norm(t, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    )


def norm_upper_bound(modules: Mapping[str, LoraFactors]) -> float:
    """``sqrt(sum_m s_m^2 ||B_m||_F^2 ||A_m||_F^2) >= ||dW||_F``, in one pass over the factors."""
    return math.sqrt(sum((f.scale * _fro(f.B) * _fro(f.A)) ** 2 for f in modules.values()))


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
) -> None:
    """Refuse a client update that does not match what the client was sent.

    Args:
        update: the client's :class:`LoraUpdate` (anything else is refused).
        client_id: the client the job was for; the update must carry the same id.
        ranks: the per-module ranks the client was sent (``FederationPlan.ranks(client_id)``).
        shapes: ``(d, k)`` of every module of the base model (``FederationPlan.shapes``).
        alpha, use_rslora: the LoRA scale the client was sent.
        limits: example-count and norm bounds.
        frozen_A: per module, the ``A (r, k)`` the client had to keep (FFA-LoRA), else ``None``.

    Raises:
        UpdateRejected: naming the client and the field, at the first failed check.
    """
    limits = limits or UpdateLimits()
    _check_envelope(update, client_id, ranks, limits)
    upper: dict[str, float] = {}  # s_m^2 ||B_m||_F^2 ||A_m||_F^2 >= ||s_m B_m A_m||_F^2
    for name in sorted(ranks):
        f = update.modules[name]
        _check_module(client_id, name, f, shapes, alpha, use_rslora)
        fro_A = _check_factor(client_id, name, f, "A", ranks[name], shapes[name])
        fro_B = _check_factor(client_id, name, f, "B", ranks[name], shapes[name])
        if frozen_A is not None and name in frozen_A:
            ref = frozen_A[name]
            if not torch.allclose(f.A.to(ref.dtype), ref, rtol=0.0, atol=1e-5):
                raise UpdateRejected(
                    client_id, f"modules[{name}].A.values", "changed, but A is frozen for this method"
                )
        upper[name] = (f.scale * fro_A * fro_B) ** 2
    _check_norm(client_id, update.modules, upper, limits)


def _check_envelope(update: object, client_id: str, ranks: Mapping[str, int], limits: UpdateLimits) -> None:
    """The update's type, sender, example count ``n`` in ``[1, max_examples]`` and module set (exactly the
    modules sent)."""
    if not isinstance(update, LoraUpdate) or not isinstance(update.modules, Mapping):
        raise UpdateRejected(
            client_id, "update", f"expected a LoraUpdate with a modules mapping, got {type(update).__name__}"
        )
    if update.client_id != client_id:
        raise UpdateRejected(client_id, "client_id", f"update is for client {update.client_id!r}")
    n = update.num_examples
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or not 1 <= n <= limits.max_examples:
        raise UpdateRejected(
            client_id, "num_examples", f"must be an integer in [1, {limits.max_examples}], got {n!r}"
        )
    got, want = set(update.modules), set(ranks)
    if want - got:
        missing = want - got
        raise UpdateRejected(
            client_id, "modules", f"{len(missing)} sent module(s) missing, e.g. {sorted(missing)[0]!r}"
        )
    if got - want:
        extra = got - want
        raise UpdateRejected(
            client_id, "modules", f"{len(extra)} module(s) never sent, e.g. {sorted(extra)[0]!r}"
        )


def _check_module(
    client_id: str,
    name: str,
    f: object,
    shapes: Mapping[str, tuple[int, int]],
    alpha: float,
    use_rslora: bool,
) -> None:
    """Module ``name`` exists in the base model and carries :class:`LoraFactors` with the scale sent
    (``lora_alpha`` and the rsLoRA flag)."""
    field = f"modules[{name}]"
    if name not in shapes:
        raise UpdateRejected(client_id, field, "is not a module of the base model")
    if not isinstance(f, LoraFactors):
        raise UpdateRejected(client_id, field, f"expected LoraFactors, got {type(f).__name__}")
    if isinstance(f.alpha, bool) or not isinstance(f.alpha, numbers.Real) or float(f.alpha) != float(alpha):
        raise UpdateRejected(client_id, f"{field}.alpha", f"is {f.alpha!r}, {alpha!r} was sent")
    if bool(f.use_rslora) != bool(use_rslora):
        raise UpdateRejected(
            client_id, f"{field}.use_rslora", f"is {f.use_rslora!r}, {use_rslora!r} was sent"
        )


def _check_factor(
    client_id: str, name: str, f: LoraFactors, label: str, rank: int, shape: tuple[int, int]
) -> float:
    """Factor ``label`` (``A (r, k)`` or ``B (d, r)``) of module ``name`` is a finite floating tensor of the
    sent rank and the base model's shape; returns its ``||.||_F``."""
    d, k = shape
    t, want = (f.A, (rank, k)) if label == "A" else (f.B, (d, rank))
    field = f"modules[{name}].{label}"
    if not isinstance(t, torch.Tensor):
        raise UpdateRejected(client_id, field, f"expected a tensor, got {type(t).__name__}")
    if t.dtype not in ALLOWED_DTYPES:
        raise UpdateRejected(
            client_id, f"{field}.dtype", f"{t.dtype} is not one of float16, bfloat16, float32, float64"
        )
    if tuple(t.shape) != want:
        raise UpdateRejected(
            client_id,
            f"{field}.shape",
            f"is {tuple(t.shape)}, expected {want} (rank {rank} was sent, base {d}x{k})",
        )
    fro = _fro(t)  # NaN or Inf iff an entry is, or the squares overflow (entries beyond ~1e19)
    if not math.isfinite(fro):
        raise UpdateRejected(client_id, f"{field}.values", "has NaN or Inf values (or overflowing ones)")
    return fro


def _check_norm(
    client_id: str, modules: Mapping[str, LoraFactors], upper: Mapping[str, float], limits: UpdateLimits
) -> None:
    """``||dW||_F`` is at most ``norm_bound`` (when set) and :data:`MAX_NORM`; ``upper`` holds the cheap
    per-module bounds on ``||s_m B_m A_m||_F^2``."""
    bound = min(limits.norm_bound or MAX_NORM, MAX_NORM)
    norm = _bounded_norm(modules, upper, bound)
    if norm is not None and not norm <= MAX_NORM:
        raise UpdateRejected(
            client_id, "norm", f"||dW||_F >= {norm:.4g} is absurd (over {MAX_NORM:g}) or overflows"
        )
    if norm is not None:
        raise UpdateRejected(
            client_id, "norm", f"||dW||_F >= {norm:.4g} exceeds the bound {limits.norm_bound:g}"
        )


def _bounded_norm(
    modules: Mapping[str, LoraFactors], upper: Mapping[str, float], bound: float
) -> float | None:
    """``None`` if ``||dW||_F <= bound``, else a lower bound on ``||dW||_F`` above ``bound``.

    Exact per-module norms replace the cheap bounds ``upper[m] >= ||s B_m A_m||_F^2``, largest first, only
    until the total either fits under ``bound`` (accept) or the exact part alone exceeds it (refuse)."""
    order = sorted(upper, key=upper.get, reverse=True)
    # rest[i]: the cheap bounds of the modules not yet computed exactly
    rest = [sum(upper[n] for n in order[i:]) for i in range(len(order))]
    exact = 0.0
    for i, name in enumerate(order):
        if exact + rest[i] <= bound**2:  # False for NaN or inf: then compute
            return None
        exact += product_norm_sq(modules[name])
        if not exact <= bound**2:
            return math.sqrt(exact)
    return None
