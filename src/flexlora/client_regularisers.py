"""Client-side extras a method asks of local training, installed around it by one hook in
:func:`flexlora.training.run_train_job`.

Today one: ``hetlora-cho``'s tail regulariser and rank self-pruning
(:class:`flexlora.core.aggregators.hetlora_cho.TailPenalty`), carried by ``TrainJob.tail_penalty``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from flexlora.contracts import TrainJob
from flexlora.core.lora import LoraFactors
from flexlora.lora_host import LoraHost

__all__ = ["regularised"]


@contextlib.contextmanager
def regularised(host: LoraHost, job: TrainJob) -> Iterator[None]:
    """Train inside this block: with ``job.tail_penalty``, its gradient joins every optimizer step, and on a
    normal exit the adapter's weak tails are pruned in place (zeroed) before the caller exports it."""
    penalty = job.tail_penalty
    if penalty is None:
        yield
        return
    pairs = host.trainable_pairs()
    with penalty.during_training(list(pairs.values())):
        yield
    with torch.no_grad():
        for A, B in pairs.values():
            pruned = penalty.prune({"m": LoraFactors(A.detach(), B.detach(), alpha=1.0)})["m"]
            A.copy_(pruned.A)
            B.copy_(pruned.B)
