"""The round loop folds each client's update into the aggregate as the engine yields it."""

from __future__ import annotations

import gc
import weakref

import torch

from helpers.round_loop import FakeEngine, make_federation, make_plan


class StreamingEngine(FakeEngine):
    """The fake engine, one outcome at a time, counting how many clients' updates are alive at once."""

    def __init__(self):
        super().__init__()
        self.alive: set[str] = set()
        self.peak = 0

    def train_stream(self, jobs):
        for job in jobs:
            (outcome,) = self.train([job])
            self.alive.add(job.client_id)
            weakref.finalize(outcome.update, self.alive.discard, job.client_id)
            gc.collect()
            self.peak = max(self.peak, len(self.alive))
            yield outcome
            del outcome


def test_round_streams_updates_and_matches_the_list_engine(tmp_path):
    plan = make_plan(pool=12, per_round=12, rounds=2)
    streaming = StreamingEngine()
    streamed = make_federation(tmp_path / "s", plan, streaming).run()
    listed = make_federation(tmp_path / "l", plan, FakeEngine()).run()
    assert streaming.peak <= 2  # of 12 clients: the last folded and the one arriving
    for name, lr in listed.global_state.modules.items():
        torch.testing.assert_close(streamed.global_state.modules[name].delta(), lr.delta())
    assert streamed.metrics[-1]["received"] == 12
