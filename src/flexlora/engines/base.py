"""The engine contract: how the round loop gets "train these clients from these payloads" done."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from flexlora.engines.jobs import TrainFailure, TrainJob, TrainResult

__all__ = ["Engine", "stream_outcomes"]


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
