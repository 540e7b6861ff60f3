"""The in-process engine: one base model, clients trained one after another in this process."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from tqdm.auto import tqdm

from flexlora.contracts import TrainFailure, TrainJob, TrainResult
from flexlora.core.lora import factors_nbytes

__all__ = ["LocalEngine", "local_engine"]

log = logging.getLogger(__name__)


class LocalEngine:
    """Runs each job with :func:`flexlora.training.run_train_job` on a shared :class:`LoraHost`.

    A client whose training raises is reported as a :class:`TrainFailure` (with the traceback logged), so
    one broken client cannot stop the round.
    """

    name = "local"

    def __init__(self, host, tokenizer, source, train_cfg, progress: bool = True):
        self.host, self.tokenizer, self.source, self.train_cfg = host, tokenizer, source, train_cfg
        self.progress = progress
        self._sent = self._received = 0

    def train(self, jobs: list[TrainJob]) -> list[TrainResult | TrainFailure]:
        return list(self.train_stream(jobs))

    def train_stream(self, jobs: list[TrainJob]) -> Iterator[TrainResult | TrainFailure]:
        """Train the jobs one after another, yielding each outcome as soon as it is there."""
        from flexlora.training import run_train_job

        try:
            for job in tqdm(jobs, desc="clients", leave=False, disable=not self.progress, unit="client"):
                self._sent += factors_nbytes(job.init) + factors_nbytes(job.frozen or {})
                try:
                    data = self.source.load(job.client_id)
                    # clients at the same ranks reuse one injected adapter; unloaded after the round
                    result = run_train_job(
                        self.host, self.tokenizer, data, job, self.train_cfg, keep_adapter=True
                    )
                except Exception as exc:  # one client's failure must not stop the federation
                    log.exception("client %s failed in round %d", job.client_id, job.round)
                    yield TrainFailure(job.client_id, f"{type(exc).__name__}: {exc}")
                    continue
                self._received += factors_nbytes(result.update.modules)
                yield result
                del result  # the caller folds it; do not hold it while the next client trains
        finally:
            self.host.unload()

    def bytes_moved(self) -> tuple[int, int]:
        moved = (self._sent, self._received)
        self._sent = self._received = 0
        return moved

    def close(self) -> None:
        pass


def local_engine(cfg, host, tokenizer, source, progress: bool) -> LocalEngine:
    """``federation.engine: local``: clients of ``source`` trained on ``host``, one after another."""
    return LocalEngine(host, tokenizer, source, cfg.train, progress=progress)
