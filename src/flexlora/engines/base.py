"""The engine contract: how the round loop gets "train these clients from these payloads" done."""

from __future__ import annotations

from typing import Protocol

from flexlora.engines.jobs import TrainFailure, TrainJob, TrainResult

__all__ = ["Engine"]


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
