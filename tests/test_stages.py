"""The round loop is a schedule of stages: any :class:`flexlora.federation.Stage` runs its rounds with the
loop's sampling, retries, metrics and checkpoints, then the next stage takes over from its state."""

from __future__ import annotations

import pytest
import torch

from flexlora.contracts import TrainResult
from flexlora.core.aggregators import GlobalState
from flexlora.core.lora import LoraUpdate, LowRank
from flexlora.federation import AggregationStage
from helpers.round_loop import FakeEngine, make_federation, make_plan
from helpers.updates import SHAPES


class Warmup:
    """A stage that is not SLoRA: round ``t`` sets ``dW = t * 1 1^T`` (rank 1) on every module; with ``short``
    the first attempt of each round comes back with too few clients."""

    label = "warmup"

    def __init__(self, rounds: int, short: bool = False):
        self.rounds, self.short = rounds, short
        self.calls: list[tuple[int, list[str]]] = []

    def run_round(self, federation, state, round_, clients, tally):
        self.calls.append((round_, clients))
        if self.short and len(self.calls) % 2:
            tally.failures.update({c: "asleep" for c in clients})
            tally.results = []
            return None
        tally.results = [TrainResult(LoraUpdate({}, 2, c), {"steps": 1}) for c in clients]
        modules = {
            n: LowRank(torch.full((d, 1), float(round_)), torch.ones(1, k)) for n, (d, k) in SHAPES.items()
        }
        return GlobalState(modules, state.global_state.method)

    def round_metrics(self, federation, round_):
        return {"stage": self.label, "bytes": {"sent": round_, "received": 0}}


def test_a_custom_stage_runs_its_rounds_then_the_method_takes_over_from_its_state(tmp_path):
    engine, warmup = FakeEngine(), Warmup(rounds=2)
    plan = make_plan(rounds=3)
    fed = make_federation(tmp_path, plan, engine, schedule=(warmup, AggregationStage()))
    state = fed.run()
    assert [r for r, _ in warmup.calls] == [1, 2]
    assert [c for _, c in warmup.calls] == [plan.sample(1), plan.sample(2)]  # the loop's seeded samples
    assert engine.calls == [plan.sample(3)]  # the engine trained round 3 only
    lines = state.metrics[1:]
    assert [m.get("stage") for m in lines] == ["warmup", "warmup", None]
    assert [m["bytes"]["sent"] for m in lines[:2]] == [1, 2] and lines[0]["train_steps"] == 4
    assert all(m["received"] == 4 for m in lines)
    # round 3 started from the warm-up's state: its payloads were cut from dW = 2 * 1 1^T
    fresh = make_federation(tmp_path / "again", plan, FakeEngine(), schedule=(warmup, AggregationStage()))
    after_two = fresh.run_round(fresh.run_round(fresh.initial_state()))
    for name, (d, k) in SHAPES.items():
        torch.testing.assert_close(after_two.global_state.modules[name].delta(), torch.full((d, k), 2.0))
    (job,) = fresh.jobs(after_two, 3, plan.sample(3)[:1])
    some = next(iter(job.init.values()))
    assert some.B.abs().sum() > 0  # not the round-0 state (B = 0)


def test_any_stage_gets_the_loops_retries_with_a_fresh_sample(tmp_path):
    warmup = Warmup(rounds=1, short=True)
    plan = make_plan(rounds=2)
    fed = make_federation(
        tmp_path, plan, FakeEngine(), schedule=(warmup, AggregationStage()), round_retries=1
    )
    state = fed.run()
    first = state.metrics[1]
    assert first["attempts"] == 2 and set(first["failures"]) == set(warmup.calls[0][1])
    assert warmup.calls[1][1] == plan.sample(1, 1, exclude=warmup.calls[0][1])


def test_a_schedule_that_ends_before_the_plan_is_refused(tmp_path):
    with pytest.raises(ValueError, match="the schedule covers 2 rounds, the plan has 3"):
        make_federation(tmp_path, make_plan(rounds=3), FakeEngine(), schedule=(Warmup(rounds=2),))
