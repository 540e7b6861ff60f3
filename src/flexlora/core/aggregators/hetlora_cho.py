"""HetLoRA as Cho et al. define it ("Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", EMNLP 2024): rank self-pruning on the client and sparsity-weighted aggregation on the server.

``hetlora`` (:mod:`flexlora.core.aggregators.hetlora`) is the variant the FlexLoRA authors ran: zero-padding
and truncation, clients weighted by data size, no pruning. (Their ``heterolora.py`` on the FederatedScope
``FlexLoRA`` branch adds ``lambd * ||B_tail|| ||A_tail||`` to the loss but on ``param.data``, which carries
no gradient, with the tail from ``round(0.99 r)``, empty for ``r < 50``: the penalty does not train.)
Records before this module name that variant ``hetlora``, and it keeps the name. This module is
``hetlora-cho``:

* **Regulariser** (client): the loss gains ``lambda * sum_m ||B_m[:, p:]||_F ||A_m[p:]||_F`` with
  ``p = floor(gamma r)``, the tail of the last ``r - p`` rank components of each module. It is applied
  as its gradient, added once per optimizer step (:meth:`TailPenalty.add_gradients`).
* **Self-pruning** (client, after local training): a module whose tail is weak,
  ``||B_tail|| ||A_tail|| < threshold * ((r - p) / r) * ||B|| ||A||`` (less than ``threshold`` times the
  tail's even share of the whole), sends its update at rank ``p``: the tail is zeroed, which the
  zero-padding aggregation treats exactly as a rank-``p`` update (:meth:`TailPenalty.prune`).
* **Sparsity-weighted aggregation** (server): zero-pad, then weight client ``i`` by
  ``||s_i B_i A_i||_F / Z`` per module (the paper's ``||S_i|| / Z``; no data-size factor), then truncate.

Differences from the paper, stated: the paper's client keeps its pruned rank ``floor(gamma r)`` in later
rounds; here every client trains at its assigned rank each round (the server's rank plan is fixed, and an
update must have the planned shape), so pruning shapes what a client sends, not its later compute. The
relative threshold rule above is this module's reading of "prune when the tail's norm is small"; ``gamma``,
``lambda`` and ``threshold`` are ``federation.hetlora_gamma``, ``hetlora_lambda``, ``hetlora_threshold``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from flexlora.core.aggregators.hetlora import HetLoRA, product_norm
from flexlora.core.lora import LoraFactors

__all__ = ["HetLoRACho", "TailPenalty"]


@dataclass(frozen=True)
class TailPenalty:
    """The client side of ``hetlora-cho``: the tail regulariser and the self-pruning rule (module doc)."""

    lam: float = 1e-3
    gamma: float = 0.99
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.gamma < 1):
            raise ValueError(f"gamma must lie in (0, 1), got {self.gamma!r}")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"lambda must be a finite number >= 0, got {self.lam!r}")
        if not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise ValueError(f"threshold must be a finite number >= 0, got {self.threshold!r}")

    def tail_start(self, rank: int) -> int:
        """``p = floor(gamma r)``: the tail is components ``p .. r-1`` (at least one for ``r >= 1``)."""
        return math.floor(self.gamma * rank)

    def value(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``||B[:, p:]||_F ||A[p:]||_F`` for one module (differentiable)."""
        p = self.tail_start(A.shape[0])
        return B[:, p:].norm() * A[p:].norm()

    @torch.no_grad()
    def add_gradients(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add ``lambda`` times the penalty's gradient to each ``(A, B)``'s ``.grad``:
        ``d/dB_tail = ||A_tail|| B_tail / ||B_tail||`` and ``d/dA_tail = ||B_tail|| A_tail / ||A_tail||``
        (zero where a norm is zero)."""
        for A, B in pairs:
            p = self.tail_start(A.shape[0])
            a, b = A[p:], B[:, p:]
            na, nb = a.norm(), b.norm()
            if na == 0 or nb == 0 or self.lam == 0:
                continue
            for param, grad in ((A, (self.lam * nb / na) * a), (B, (self.lam * na / nb) * b)):
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                if param is A:
                    param.grad[p:] += grad
                else:
                    param.grad[:, p:] += grad

    @contextlib.contextmanager
    def during_training(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
        """Add the penalty's gradient before every optimizer step taken inside the block (a global optimizer
        step pre-hook, removed on exit): once per step however many micro-batches the step has."""
        handle = register_optimizer_step_pre_hook(lambda *_: self.add_gradients(pairs))
        try:
            yield
        finally:
            handle.remove()

    def should_prune(self, f: LoraFactors) -> bool:
        """Whether the tail carries less than ``threshold`` times its even share of ``||B|| ||A||``."""
        r = f.rank
        if r < 2:
            return False
        p = self.tail_start(r)
        tail = float(f.B[:, p:].norm() * f.A[p:].norm())
        whole = float(f.B.norm() * f.A.norm())
        return tail < self.threshold * ((r - p) / r) * whole

    def prune(self, factors: Mapping[str, LoraFactors]) -> dict[str, LoraFactors]:
        """Each module with a weak tail (:meth:`should_prune`) with its tail zeroed (rank ``p`` in effect)."""
        out = {}
        for name, f in factors.items():
            if self.should_prune(f):
                p = self.tail_start(f.rank)
                A, B = f.A.clone(), f.B.clone()
                A[p:], B[:, p:] = 0, 0
                f = LoraFactors(A, B, f.alpha, f.use_rslora)
            out[name] = f
        return out


class HetLoRACho(HetLoRA):
    """Sparsity-weighted zero-padding aggregation; clients train with :class:`TailPenalty`.

    Args:
        gamma, lam, threshold: the client's :class:`TailPenalty`.
    """

    name = "hetlora-cho"

    def __init__(self, gamma: float = 0.99, lam: float = 1e-3, threshold: float = 0.5):
        super().__init__(sparsity_weighted=True)
        self.tail_penalty = TailPenalty(lam=lam, gamma=gamma, threshold=threshold)

    def hyperparameters(self) -> dict[str, object]:
        t = self.tail_penalty
        return {"sparsity_weighted": True, "gamma": t.gamma, "lambda": t.lam, "threshold": t.threshold}

    def module_weights(self, factors: Sequence[LoraFactors], weights: Sequence[float]) -> list[float]:
        """``||s_i B_i A_i||_F / Z`` (the paper's weights: sparsity only, not data size); equal if all zero."""
        raw = [product_norm(f) for f in factors]
        total = sum(raw)
        return [1 / len(raw)] * len(raw) if total == 0 else [w / total for w in raw]
