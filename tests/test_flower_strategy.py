"""FlexLoRAStrategy: one payload per node at its own rank, and aggregation equal to the core's."""

from __future__ import annotations

import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict

from flexlora.checkpoint import ServerState
from flexlora.config import FederationConfig, RunConfig, SecurityConfig
from flexlora.core.aggregators import GlobalState
from flexlora.core.ranks import module_ranks, parse_rank_type
from flexlora.engines.flower import FlexLoRAStrategy
from flexlora.engines.flower.records import job_from_content, state_from_arrays, update_from_reply
from flexlora.federation import FederationPlan, cut_jobs
from flexlora.methods import get_method, make_aggregator
from flexlora.run import build_aggregator
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


# ------------------------------------------------------------------ the round loop's pieces, DP and robust
def _three_nodes() -> FakeGrid:
    return FakeGrid(
        {
            101: trainer({"lora-rank": 2}, 10),
            102: trainer({"lora-rank": 4}, 20),
            103: trainer({"lora-rank": 4}, 30),
        }
    )


def _updates(messages, replies):
    """The replies' updates, each as the client the strategy sent it to (the round loop's client ids)."""
    jobs = {m.metadata.dst_node_id: job_from_content(m.content) for m in messages}
    out = []
    for reply in replies:
        job = jobs[reply.metadata.src_node_id]
        update, _, _ = update_from_reply(reply.content, job.init, "", reply.metadata.src_node_id)
        update.client_id = job.client_id
        out.append(update)
    return out


def _round_loop_aggregator(method: str, security: SecurityConfig, pool: list[str], seed: int = 1):
    """What ``flexlora run`` builds for the same method and security section over ``pool``."""
    cfg = RunConfig(federation=FederationConfig(method=method, seed=seed), security=security)
    plan = FederationPlan(pool, {}, SHAPES, 1, len(pool), 1, 1, 8.0)
    return build_aggregator(cfg, plan)


@pytest.mark.parametrize("method", ["flexlora", "flora", "ffa", "fedit"])
def test_payloads_are_the_round_loops_jobs_with_the_methods_recipe(method):
    grid = FakeGrid({n: trainer({"lora-rank": 4}) for n in (1, 2)})
    strategy = FlexLoRAStrategy(method, shapes=SHAPES, alpha=8.0, seed=3)
    arrays = ArrayRecord()
    for server_round in (1, 2):  # round 2: FLoRA's frozen global update
        messages, replies = _round(strategy, grid, server_round, arrays)
        state = ServerState(server_round - 1, strategy.state, {})
        labels = [f"node-{m.metadata.dst_node_id}" for m in messages]
        plan = FederationPlan(labels, {c: parse_rank_type("r4") for c in labels}, SHAPES, 2, 2, 1, 3, 8.0)
        inner = make_aggregator(method)
        want = cut_jobs(plan, inner, get_method(method).client, None, state, server_round, labels)
        for msg, job in zip(messages, want, strict=True):
            got = job_from_content(msg.content)
            assert (got.seed, got.freeze_A, got.optimizer) == (job.seed, job.freeze_A, job.optimizer)
            for name, f in job.init.items():
                assert torch.equal(got.init[name].A, f.A) and torch.equal(got.init[name].B, f.B)
            assert (got.frozen is None) == (job.frozen is None)
        arrays, _ = strategy.aggregate_train(server_round, replies)
    assert job_from_content(messages[0].content).optimizer == ("adamw" if method == "fedit" else None)
    assert job_from_content(messages[0].content).freeze_A == (method == "ffa")


@pytest.mark.parametrize(("rule", "clip"), [("median", None), ("clip", 0.05)])
def test_a_robust_rule_gives_the_round_loops_global_state(rule, clip):
    security = SecurityConfig(robust=rule, clip_norm=clip)
    strategy = FlexLoRAStrategy(shapes=SHAPES, alpha=8.0, min_train_nodes=3, seed=1, security=security)
    grid = _three_nodes()
    messages, replies = _round(strategy, grid, 1, ArrayRecord())
    previous, updates = strategy.state, _updates(messages, replies)
    arrays, _ = strategy.aggregate_train(1, replies)
    pool = [u.client_id for u in updates]
    want = _round_loop_aggregator("flexlora", security, pool).aggregate_stream(
        iter(updates), previous=previous
    )
    plain = make_aggregator("flexlora").aggregate(updates, previous=previous)
    got = state_from_arrays(arrays, "flexlora")
    for name, lr in want.modules.items():
        torch.testing.assert_close(got.modules[name].delta(), lr.delta(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(lr.delta(), plain.modules[name].delta())  # the rule did act


def test_dp_in_the_strategy_adds_the_round_loops_reproducible_noise():
    security = SecurityConfig(clip_norm=0.5, dp_noise_multiplier=1.0)

    def one_round():
        strategy = FlexLoRAStrategy(
            shapes=SHAPES, alpha=8.0, min_train_nodes=3, seed=1, security=security, population=3
        )
        messages, replies = _round(strategy, _three_nodes(), 1, ArrayRecord())
        previous, updates = strategy.state, _updates(messages, replies)
        arrays, metrics = strategy.aggregate_train(1, replies)
        return state_from_arrays(arrays, "flexlora"), metrics, previous, updates

    got, metrics, previous, updates = one_round()
    again = one_round()[0]
    round_loop = _round_loop_aggregator("flexlora", security, [u.client_id for u in updates])
    round_loop.start_round(1)  # as train_and_fold does
    want = round_loop.aggregate_stream(iter(updates), previous=previous)
    other_seed = _round_loop_aggregator("flexlora", security, [u.client_id for u in updates], seed=2)
    other_seed.start_round(1)
    other = other_seed.aggregate_stream(iter(updates), previous=previous)
    for name, lr in want.modules.items():
        torch.testing.assert_close(got.modules[name].delta(), lr.delta(), rtol=1e-5, atol=1e-6)
        assert torch.equal(got.modules[name].delta(), again.modules[name].delta())
        assert not torch.allclose(lr.delta(), other.modules[name].delta())  # seeded noise was added
    assert metrics["dp-epsilon"] > 0
    assert round_loop.expected_clients == 3 and round_loop.population == 3
    # DP's denominator is what the strategy samples: max(int(population * fraction_train), min_train_nodes)
    sampled = FlexLoRAStrategy(shapes=SHAPES, security=security, population=10, fraction_train=0.35)
    assert (sampled.aggregator.expected_clients, sampled.aggregator.population) == (3, 10)


def test_the_strategy_refuses_what_it_cannot_run_in_one_line():
    dp = SecurityConfig(clip_norm=1.0, dp_noise_multiplier=1.0)
    cases = [
        ({"method": "slora"}, "local engine only"),
        ({"method": "slora+flexlora"}, "local engine only"),
        ({"method": "hetlora-cho"}, "local engine only"),
        ({"security": dp}, "population"),
        ({"method": "hetlora", "security": dp, "population": 10}, "hetlora is not supported"),
        (
            {"security": SecurityConfig(clip_norm=1.0, dp_noise_multiplier=1.0, robust="median")},
            "cannot be combined",
        ),
        ({"security": SecurityConfig(trim_fraction=0.7)}, "security.trim_fraction"),
        ({"security": SecurityConfig(), "norm_bound": 1.0}, "norm_bound"),
        ({"security": SecurityConfig(round_retries=1)}, "round_retries"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(ValueError, match=needle) as info:
            FlexLoRAStrategy(shapes=SHAPES, **kwargs)
        assert "\n" not in str(info.value)
