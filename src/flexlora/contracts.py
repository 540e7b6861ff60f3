"""What crosses the boundary between the server's round loop and a client, whatever carries it (a
function call in the local engine, Flower messages in the Flower engine): the training job, its result or
failure, and the engine protocol that carries a round's jobs. It sits below the round loop, so the round
loop, the client code and every engine import it from here."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from flexlora.core.aggregators.hetlora_cho import TailPenalty
from flexlora.core.lora import LoraFactors, LoraUpdate

__all__ = ["TrainJob", "TrainResult", "TrainFailure", "Engine", "stream_outcomes"]


@dataclass
class TrainJob:
    """Train one client for one round.

    Args:
        client_id: which client's data to train on.
        round: 1-based server round.
        seed: seeds the client's batch order and dropout for this round (paired across methods).
        init: the factors the client's trainable adapter starts from, per module (its ranks are the
            client's ranks).
        frozen: FLoRA-style methods: a frozen update added to the base model while training (``None``
            otherwise).
        freeze_A: FFA-LoRA: train ``B`` only.
        tail_penalty: ``hetlora-cho``: the tail regulariser and self-pruning rule (``None`` otherwise).
        optimizer: the local optimizer the method prescribes (FedIT: ``adamw``); ``None``: ``train.optimizer``.
    """

    client_id: str
    round: int
    seed: int
    init: dict[str, LoraFactors]
    frozen: dict[str, LoraFactors] | None = None
    freeze_A: bool = False
    tail_penalty: TailPenalty | None = None
    optimizer: str | None = None


@dataclass
class TrainResult:
    """A client's trained adapter (``update.num_examples`` = its training examples) and its metrics
    (``train_loss``, ``steps``, ``seconds``, ...)."""

    update: LoraUpdate
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainFailure:
    """A client that errored, timed out or sent an invalid update; left out of the round."""

    client_id: str
    reason: str


class Engine(Protocol):
    """Carries out one round's training jobs. The local engine calls the client code in-process, one
    client after another; the Flower engine sends one message per job and collects the replies.

    ``train`` returns one entry per job, in job order: a :class:`TrainResult` or a :class:`TrainFailure`
    (errors, timeouts, refused replies). It never raises for a single client's failure.
    """

    name: str

    def train(self, jobs: list[TrainJob]) -> list[TrainResult | TrainFailure]: ...

    def bytes_moved(self) -> tuple[int, int]:
        """Bytes sent to and received from clients since the last call (payload tensors and replies)."""
        ...

    def close(self) -> None: ...


def stream_outcomes(engine: Engine, jobs: list[TrainJob]) -> Iterator[TrainResult | TrainFailure]:
    """The outcomes of ``jobs`` in job order, each as soon as it is ready: the engine's ``train_stream``
    where it has one (the local engine yields each client when it has trained it, so the round loop can
    fold that update and drop it before the next client trains), else its ``train`` list."""
    stream = getattr(engine, "train_stream", None)
    yield from stream(jobs) if stream is not None else engine.train(jobs)
