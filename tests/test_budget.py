"""Rank types from a client's budget: the estimate, the chooser, measurement, runs and SuperNodes."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict

from flexlora.budget import model_dims, pick, rank_table
from flexlora.cli import main
from flexlora.config import ConfigError, load_config
from flexlora.core.budget import GIB, LORA_COPIES, Budget, BudgetError, StepShape, choose, estimate
from flexlora.core.ranks import RANK_TYPES, RankType
from flexlora.engines.flower import FlowerEngine
from flexlora.engines.flower.auto_rank import MAX_REASON_CHARS, budget_note, node_record
from flexlora.engines.flower.deployment import run_deployment
from flexlora.engines.flower.nodes import NODE_RECORD
from flexlora.engines.flower.records import ReplyError
from flexlora.lora_host import LoraHost
from flexlora.models import ALL_PROJECTIONS, load_model
from flexlora.run import _rank_types, run_federation
from helpers.flower_fakes import FakeGrid, trainer

STEP = StepShape(batch=4, seq_len=64)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXLORA_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_model("tiny", device="cpu")
    return model, LoraHost(model, ALL_PROJECTIONS).shapes


# ---------------------------------------------------------------------------------------------- estimate
def test_estimate_grows_with_rank_and_stops_at_full_rank(tiny):
    model, shapes = tiny
    dims = model_dims(model)
    totals = [estimate(dims, shapes, RankType(f"r{r}", r, r), STEP).total for r in range(1, 200)]
    assert all(a <= b for a, b in zip(totals, totals[1:], strict=False))
    assert totals[0] < totals[63] == totals[-1]  # tiny's widest module is 64 x 160: rank 64 is full
    by_type = [estimate(dims, shapes, t, STEP) for t in RANK_TYPES.values()]
    assert all(a.total <= b.total and a.flops <= b.flops for a, b in zip(by_type, by_type[1:], strict=False))
    # the LoRA state: the factors, their gradients, AdamW's two moments and its sqrt(v) buffer, in float32
    r8 = by_type[0]
    assert r8.lora == LORA_COPIES * 4 * sum(min(8, d, k) * (d + k) for d, k in shapes.values())
    assert r8.weights == 4 * sum(p.numel() for p in model.parameters())


def test_chooser_takes_the_largest_fitting_type_and_refuses_in_one_line():
    costs = [
        ("r8", 1 * GIB, 1.0),
        ("r30", 2 * GIB, 2.0),
        ("attn30-mlp200", 3 * GIB, 3.0),
        ("r200", 4 * GIB, 4.0),
    ]
    assert choose(costs, Budget(2.5)) == "r30"
    assert choose(costs, Budget(99)) == "r200"
    assert choose(costs, Budget(4)) == "r200"  # the budget is inclusive
    assert choose(costs, Budget(99, seconds_per_round=6.0), steps_per_round=2) == "attn30-mlp200"
    with pytest.raises(BudgetError) as exc:
        choose(costs, Budget(0.5))
    assert "\n" not in str(exc.value)
    assert "0.5 GiB" in str(exc.value) and "r8" in str(exc.value) and "1.00 GiB" in str(exc.value)
    with pytest.raises(BudgetError, match="steps per round"):
        choose(costs, Budget(99, seconds_per_round=1.0))
    for bad in ({"memory_gb": 0}, {"memory_gb": "4"}, {"seconds_per_round": 3}, {"memory_gb": 4, "cpu": 2}):
        with pytest.raises(ValueError):
            Budget.from_dict(bad)
    assert Budget.from_dict({"memory-gb": 4, "seconds-per-round": 9}) == Budget(4, 9)


# ---------------------------------------------------------------------------------------------- CLI
def test_ranks_cli_prints_the_table_and_the_choice(capsys):
    assert main(["ranks", "--model", "tiny", "--memory-gb", "64", "--estimate-only", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in RANK_TYPES)
    assert out.strip().splitlines()[-1].startswith("largest rank type within 64 GiB: r200 (estimated")
    assert out.strip().splitlines()[-2].endswith("of a budget of 64 GiB; it is the largest rank type")
    # a time budget: the round time of every type is printed, and the choice names the seconds
    argv = ["ranks", "--model", "tiny", "--memory-gb", "64", "--seconds-per-round", "1e6", "--steps", "3"]
    assert main([*argv, "--estimate-only", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert (
        lines[-2].startswith("why: r200 needs")
        and "s per round of a budget of 64 GiB and 1e+06 s" in lines[-2]
    )
    assert lines[-1].startswith("largest rank type within 64 GiB and 1e+06 s per round: r200 (estimated")
    assert (
        main(["ranks", "--model", "tiny", "--memory-gb", "0.01", "--estimate-only", "--device", "cpu"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flexlora: error: no rank type fits a budget of 0.01 GiB")


def test_measured_types_are_cached_and_a_tight_budget_is_never_exceeded():
    """Choose by estimate with a budget equal to the chosen type's estimate (as a run or a SuperNode without
    measurements does), then train every type for real in a fresh process: the chosen one's measured peak stays
    within the budget, and the measurements come back from the cache."""
    args = ("tiny", ["q_proj", "v_proj"], 2, 32, "float32", "cpu")
    estimated = rank_table(*args, mode="estimate")
    budget = Budget(estimated[1].estimate.total / GIB)  # tight: exactly r30's estimate
    chosen = pick(estimated, budget, steps_per_round=1)
    assert chosen.rank_type.name in ("r30", "attn30-mlp200")  # attn30-mlp200 costs r30's on q, v only
    measured = rank_table(*args, mode="measure")
    assert all(r.measured_bytes and r.measured_seconds for r in measured)
    peak = next(r for r in measured if r.rank_type == chosen.rank_type).measured_bytes
    assert peak <= budget.memory_gb * GIB
    again = rank_table(*args, mode="cached")
    assert [r.measured_bytes for r in again] == [r.measured_bytes for r in measured]  # from the cache


# ---------------------------------------------------------------------------------------------- runs
def test_budgets_distribution_is_recorded_in_assignment(tmp_path):
    # the budgets: plenty, and exactly r8's estimate for this run's model, targets and batch shape
    r8 = rank_table("tiny", ALL_PROJECTIONS, 4, 256, "float32", "cpu", "estimate")[0].estimate.total / GIB
    raw = {
        "name": "budgets",
        "output_dir": str(tmp_path),
        "model": {"name": "tiny", "device": "cpu", "target_modules": list(ALL_PROJECTIONS)},
        "data": {"path": "synthetic", "options": {"num_clients": 5}, "num_heldout": 1},
        "federation": {
            "distribution": "budgets",
            "budgets": [{"memory_gb": 64}, {"memory_gb": r8}],
            "rounds": 1,
            "clients_per_round": 2,
        },
        "train": {"steps": 1},
        "eval": {"generate": False},
    }
    cfg = load_config(raw=raw)
    result = run_federation(cfg, progress=False)
    record = json.loads((result.run_dir / "assignment.json").read_text())
    assert len(record) == 4
    values = list(record.values())
    assert [v["memory_gb"] for v in values] == [64, r8, 64, r8]  # cycled over the clients
    assert [v["rank_type"] for v in values] == ["r200", "r8", "r200", "r8"]
    # a resumed run keeps the recorded types; a tampered record is refused in one line
    types, notes = _rank_types(cfg, None, list(record), result.run_dir)
    assert [t.name for t in types] == ["r200", "r8", "r200", "r8"] and notes == values
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "assignment.json").write_text('{"0": "r8"}')
    with pytest.raises(ValueError, match="assignment.json"):
        _rank_types(cfg, None, list(record), tmp_path / "bad")
    with pytest.raises(ConfigError, match="federation.budgets"):
        load_config(raw={"federation": {"distribution": "budgets"}})
    with pytest.raises(ConfigError, match=r"federation.budgets\[0\]: memory-gb must be a positive"):
        load_config(raw={"federation": {"distribution": "budgets", "budgets": [{"memory_gb": -1}]}})


def test_time_budgets_choose_types_within_the_seconds_and_say_why(tmp_path, monkeypatch):
    """``federation.budgets`` with seconds: each client takes the largest type whose estimated round fits, and
    ``assignment.json`` records the round time and why. The machine's matmul rate is pinned (1 GFLOP/s) so the
    estimate, and with it the assignment, is the same on any machine."""
    monkeypatch.setattr("flexlora.budget.gemm_flops_per_second", lambda *args, **kwargs: 1e9)
    rows = rank_table("tiny", ALL_PROJECTIONS, 4, 256, "float32", "cpu", "estimate")
    per_round = [2 * r.step_seconds for r in rows]  # train.steps = 2
    assert per_round == sorted(per_round) and per_round[1] < per_round[2]
    raw = {
        "name": "time-budgets",
        "output_dir": str(tmp_path),
        "model": {"name": "tiny", "device": "cpu", "target_modules": list(ALL_PROJECTIONS)},
        "data": {"path": "synthetic", "options": {"num_clients": 3}, "num_heldout": 1},
        "federation": {
            "distribution": "budgets",
            # exactly r30's estimated round; and time to spare
            "budgets": [
                {"memory_gb": 64, "seconds_per_round": per_round[1]},
                {"memory_gb": 64, "seconds_per_round": 1e6},
            ],
            "rounds": 1,
            "clients_per_round": 2,
        },
        "train": {"steps": 2},
        "eval": {"generate": False},
    }
    result = run_federation(load_config(raw=raw), progress=False)
    tight, spare = json.loads((result.run_dir / "assignment.json").read_text()).values()
    assert tight["rank_type"] == "r30" and spare["rank_type"] == "r200"
    for note in (tight, spare):
        assert note["estimated_seconds_per_round"] <= note["seconds_per_round"]
    assert tight["estimated_seconds_per_round"] == round(per_round[1], 3)
    # the time binds, not the memory: the next type up is named with its round time only
    assert tight["reason"].startswith(
        f"r30 needs {rows[1].peak_bytes / GIB:.2f} GiB and {per_round[1]:.1f} s"
    )
    assert tight["reason"].endswith(f"attn30-mlp200 would need {per_round[2]:.1f} s per round (estimated)")
    assert spare["reason"].endswith("it is the largest rank type (estimated)")


def _auto_node(node_config: dict, run_config: dict):
    """A fake SuperNode whose query is answered by the real ``lora-rank="auto"`` code."""
    fake = trainer(node_config)

    def handle(msg: Message) -> Message | None:
        if msg.metadata.message_type == MessageType.QUERY:
            try:
                record = node_record(node_config, run_config)
            except ValueError as exc:  # what Flower makes of a ClientApp that raises
                return Message(Error(code=3, reason=str(exc)), reply_to=msg)
            return Message(RecordDict({NODE_RECORD: record}), reply_to=msg)
        return fake(msg)

    return handle


def test_supernode_auto_rank_is_chosen_from_its_budget_and_recorded(tmp_path, caplog):
    run_config = {"model": "tiny", "local-steps": 1, "set": "model.device=cpu"}
    grid = FakeGrid(
        {
            31: _auto_node({"lora-rank": "auto", "memory-gb": 64.0, "client-id": "big"}, run_config),
            32: trainer({"lora-rank": 8, "client-id": "fixed"}),
            33: _auto_node({"lora-rank": "auto", "memory-gb": 0.01, "client-id": "small"}, run_config),
        }
    )
    cfg = load_config(
        raw={
            "name": "deploy",
            "output_dir": str(tmp_path),
            "model": {"name": "tiny", "device": "cpu"},
            "data": {"path": "none"},
            "federation": {"engine": "flower", "rounds": 1, "clients_per_round": 2, "distribution": "homo"},
        }
    )
    engine = FlowerEngine(grid, "deployment", poll_interval=0.01, query_timeout=5)
    with pytest.raises(BudgetError):
        node_record({"lora-rank": "auto", "memory-gb": 0.01}, run_config)
    with pytest.raises(ValueError, match="memory-gb"):
        node_record({"lora-rank": "auto"}, run_config)
    with caplog.at_level("WARNING"):
        run_dir = run_deployment(cfg, engine)
    assert any(
        "node 33: query failed: no rank type fits a budget of 0.01 GiB" in r.message for r in caplog.records
    )
    record = json.loads((run_dir / "assignment.json").read_text())
    # the node that fits nothing is left out; the others trained at their rank types
    assert record["fixed"] == "r8" and set(record) == {"big", "fixed"}
    assert record["big"]["rank_type"] == "r200" and record["big"]["memory_gb"] == 64.0
    assert 0 < record["big"]["estimated_gb"] < 64
    assert record["big"]["reason"].endswith("of a budget of 64 GiB; it is the largest rank type (estimated)")


def test_a_nodes_budget_reason_is_one_bounded_line():
    good = ConfigRecord({"memory-gb": 4.0, "estimated-gb": 1.5, "budget-reason": "r8 needs 1.50 GiB"})
    assert budget_note(good, 7) == {"reason": "r8 needs 1.50 GiB", "memory_gb": 4.0, "estimated_gb": 1.5}
    for bad in ("two\nlines", "x" * (MAX_REASON_CHARS + 1), 3.0):
        with pytest.raises(ReplyError, match=r"node\[budget-reason\]"):
            budget_note(ConfigRecord({"memory-gb": 4.0, "budget-reason": bad}), 7)
