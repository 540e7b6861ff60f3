"""FlexLoRAStrategy: one payload per node at its own rank, and aggregation equal to the core's."""

from __future__ import annotations

import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict

from flexlora.core.aggregators import GlobalState
from flexlora.core.ranks import module_ranks
from flexlora.engines.flower import FlexLoRAStrategy
from flexlora.engines.flower.records import job_from_content, state_from_arrays, update_from_reply
from flexlora.methods import make_aggregator
from helpers.flower_fakes import FakeGrid, trainer

SHAPES = {"layers.0.self_attn.q_proj": (12, 10), "layers.0.mlp.up_proj": (16, 10)}
METHODS = ["flexlora", "hetlora", "flora", "ffa", "fedavg"]


def _round(strategy: FlexLoRAStrategy, grid: FakeGrid, server_round: int, arrays: ArrayRecord):
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord({"lr": 0.1}), grid))
    replies = grid.send_and_receive(messages)
    return messages, replies


@pytest.mark.parametrize("method", METHODS)
def test_each_node_gets_its_own_rank_and_aggregation_equals_the_core(method):
    ranks = {101: 8, 102: 8} if method == "fedavg" else {101: 2, 102: "attn4-mlp6", 103: 8}
    grid = FakeGrid(
        {
            n: trainer({"lora-rank": r} if isinstance(r, int) else {"lora-rank-type": r}, 10 + n % 7)
            for n, r in ranks.items()
        }
    )
    strategy = FlexLoRAStrategy(method, shapes=SHAPES, alpha=8.0, min_train_nodes=len(ranks), seed=1)
    arrays = ArrayRecord()
    for server_round in (1, 2):
        previous = strategy.state if server_round > 1 else None
        messages, replies = _round(strategy, grid, server_round, arrays)
        # one message per node, each at that node's ranks, with the round and the caller's config
        assert sorted(m.metadata.dst_node_id for m in messages) == sorted(ranks)
        for m in messages:
            job = job_from_content(m.content)
            want = module_ranks(strategy.book.rank_type(m.metadata.dst_node_id), SHAPES)
            assert {n: f.rank for n, f in job.init.items()} == want
            assert m.content["config"]["server-round"] == server_round and m.content["config"]["lr"] == 0.1
        if server_round == 1:
            previous = strategy.state  # the seeded init the strategy started from
        # what the core makes of the same updates
        updates = []
        for reply in replies:
            node = reply.metadata.src_node_id
            sent = next(job_from_content(m.content) for m in messages if m.metadata.dst_node_id == node)
            update, _, _ = update_from_reply(reply.content, sent.init, "", node)
            updates.append(update)
        expected = make_aggregator(method).aggregate(updates, previous=previous)
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        got = state_from_arrays(arrays, method)
        for name, lr in expected.modules.items():
            torch.testing.assert_close(got.modules[name].delta(), lr.delta(), rtol=1e-5, atol=1e-6)
        assert metrics["num-results"] == len(ranks) and metrics["num-failures"] == 0
        assert metrics["train_loss"] == pytest.approx(1.0 / server_round)
        assert metrics["bytes-sent"] > 0 and metrics["bytes-received"] > 0


def test_initial_state_is_the_shared_seeded_init_at_the_widest_rank():
    grid = FakeGrid({1: trainer({"lora-rank": 2}), 2: trainer({"lora-rank": 6})})
    strategy = FlexLoRAStrategy(shapes=SHAPES, seed=4)
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    expected = GlobalState.initial(SHAPES, {n: 6 for n in SHAPES}, "flexlora", seed=4)
    for name, lr in expected.modules.items():
        assert torch.equal(strategy.state.modules[name].A, lr.A)
    by_node = {m.metadata.dst_node_id: job_from_content(m.content) for m in messages}
    first = next(iter(SHAPES))
    assert torch.equal(by_node[1].init[first].A, expected.modules[first].A[:2])


def test_undeclared_nodes_follow_the_distribution():
    grid = FakeGrid({n: trainer({"partition-id": i}) for i, n in enumerate([5, 6, 7, 8])})
    strategy = FlexLoRAStrategy(shapes=SHAPES, distribution=["r2", "r4"], min_train_nodes=4)
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    got = {m.metadata.dst_node_id: strategy.book.rank_type(m.metadata.dst_node_id).name for m in messages}
    assert got == {5: "r2", 6: "r4", 7: "r2", 8: "r4"}
    assert all(m.content["config"]["client-id"] == "" for m in messages)  # nodes train their own partition


def test_bad_and_failed_replies_are_left_out_and_the_round_goes_on(caplog):
    def broken(msg):
        reply = trainer({"lora-rank": 4})(msg)
        if msg.metadata.message_type == "train":
            del reply.content["update"][next(iter(reply.content["update"]))]
        return reply

    def raising(msg):
        if msg.metadata.message_type == "query":
            return trainer({"lora-rank": 4})(msg)
        return Message(Error(code=0, reason="CUDA out of memory"), reply_to=msg)

    grid = FakeGrid(
        {
            1: trainer({"lora-rank": 2}),
            2: broken,
            3: raising,
            4: lambda m: trainer({"lora-rank": 2})(m) if m.metadata.message_type == "query" else None,
        }
    )
    strategy = FlexLoRAStrategy(shapes=SHAPES, min_train_nodes=4)
    with caplog.at_level(logging.WARNING):
        _, replies = _round(strategy, grid, 1, ArrayRecord())
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["num-results"] == 1 and metrics["num-failures"] == 3
    text = caplog.text
    assert "node 2 left out of round 1: node 2: update: missing 1 array" in text
    assert "node 3 left out of round 1: error 0: CUDA out of memory" in text
    assert "node 4 left out of round 1: no reply" in text


def test_too_few_replies_keep_the_global_state():
    grid = FakeGrid({1: trainer({"lora-rank": 2}), 2: trainer({"lora-rank": 2})})
    strategy = FlexLoRAStrategy(shapes=SHAPES, min_train_replies=3)
    _, replies = _round(strategy, grid, 1, ArrayRecord())
    assert strategy.aggregate_train(1, replies) == (None, None)


def test_nodes_that_do_not_answer_the_query_are_skipped():
    grid = FakeGrid({1: trainer({"lora-rank": 2}), 2: lambda m: None})
    strategy = FlexLoRAStrategy(shapes=SHAPES, min_train_nodes=2)
    strategy.book.query_timeout = 0.1
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert [m.metadata.dst_node_id for m in messages] == [1]


def test_evaluation_is_off_by_default_and_weighted_when_on():
    grid = FakeGrid({1: trainer({"lora-rank": 2})})
    strategy = FlexLoRAStrategy(shapes=SHAPES, min_train_nodes=1, min_available_nodes=1)
    assert list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid)) == []
    on = FlexLoRAStrategy(shapes=SHAPES, fraction_evaluate=1.0, min_evaluate_nodes=1, min_available_nodes=1)
    messages = list(on.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid))
    assert [m.metadata.message_type for m in messages] == ["evaluate"]

    def reply(n, loss):
        from flwr.app import MetricRecord

        msg = Message(RecordDict(), 1, "evaluate")
        msg.metadata.__dict__["_message_id"] = "x"
        return Message(
            RecordDict({"metrics": MetricRecord({"num-examples": n, "eval_loss": loss})}), reply_to=msg
        )

    out = on.aggregate_evaluate(1, [reply(1, 1.0), reply(3, 2.0)])
    assert out["eval_loss"] == pytest.approx(1.75) and out["num-examples"] == 4


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        FlexLoRAStrategy("fedprox", shapes=SHAPES)
