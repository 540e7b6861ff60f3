"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024).

``A`` is frozen at its shared initialisation and only ``B`` is trained, so averaging is exact:
``sum_i p_i s_i B_i A = (sum_i p_i s_i B_i) A``. With heterogeneous ranks, a client of rank ``r`` holds the
first ``r`` rows of the shared ``A``, and ``B`` is zero-padded before averaging. Suggested: a learning rate
several times larger than for LoRA (only half the parameters move).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexlora.core.aggregators.base import (
    Aggregator,
    GlobalState,
    _label,
    client_weights,
    pad_columns,
    validate_updates,
)
from flexlora.core.errors import AggregationError
from flexlora.core.lora import LoraUpdate, LowRank

__all__ = ["FFALoRA"]


class FFALoRA(Aggregator):
    """Average ``B`` over a frozen, shared ``A``.

    Args:
        atol: how far a client's ``A`` may drift from the shared one before the update is refused.
    """

    name = "ffa"

    def __init__(self, atol: float = 1e-5):
        self.atol = atol

    def hyperparameters(self) -> dict[str, object]:
        return {"atol": self.atol}

    def aggregate(self, updates: Sequence[LoraUpdate], previous: GlobalState | None = None) -> GlobalState:
        validate_updates(updates)
        weights = client_weights(updates)
        modules = {}
        for name in updates[0].modules:
            factors = [u.modules[name] for u in updates]
            if previous is not None and name in previous.modules:
                shared = previous.modules[name].A.float()
            else:
                shared = max(factors, key=lambda f: f.rank).A.float()
            for i, (u, f) in enumerate(zip(updates, factors, strict=True)):
                if f.rank > shared.shape[0] or not torch.allclose(
                    f.A.float(), shared[: f.rank], atol=self.atol
                ):
                    raise AggregationError(
                        f"{_label(u, i)}: module {name!r}: A differs from the shared frozen A; "
                        "FFA-LoRA needs A frozen at the shared initialisation"
                    )
            width = shared.shape[0]
            B = sum(
                p * pad_columns(f.scale * f.B.float(), width) for f, p in zip(factors, weights, strict=True)
            )
            modules[name] = LowRank(torch.as_tensor(B), shared)
        return GlobalState(modules, self.name)
