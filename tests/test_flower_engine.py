"""FlowerEngine on a fake grid: placement, failures as TrainFailure, byte accounting."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from flwr.app import Error, Message

from flexlora.contracts import TrainFailure, TrainJob, TrainResult
from flexlora.core.lora import LoraFactors
from flexlora.core.ranks import RankType
from flexlora.engines.flower import FlowerEngine
from flexlora.engines.flower.records import factors_nbytes, job_from_content
from helpers.flower_fakes import FakeGrid, trainer

SHAPES = {"q_proj": (8, 6), "v_proj": (4, 6)}


def job(client: str, rank: int, round_: int = 1) -> TrainJob:
    init = {n: LoraFactors(torch.randn(rank, k), torch.zeros(d, rank), 16.0) for n, (d, k) in SHAPES.items()}
    return TrainJob(client, round_, seed=7, init=init)


def test_simulation_placement_spreads_jobs_and_keeps_job_order():
    grid = FakeGrid({11: trainer({}), 12: trainer({})})
    engine = FlowerEngine(grid, "simulation", settings={"model": {"name": "tiny"}}, poll_interval=0.01)
    jobs = [job("a", 2), job("b", 4), job("c", 1)]
    outcomes = engine.train(jobs)
    assert [o.update.client_id for o in outcomes] == ["a", "b", "c"]
    assert [m.metadata.dst_node_id for m in grid.sent] == [11, 12, 11]
    assert all(m.content["settings"]["json"] == '{"model": {"name": "tiny"}}' for m in grid.sent)
    for o, j in zip(outcomes, jobs, strict=True):
        assert {n: f.rank for n, f in o.update.modules.items()} == {n: f.rank for n, f in j.init.items()}
    sent = sum(factors_nbytes(j.init) for j in jobs)
    assert engine.bytes_moved() == (sent, sent) and engine.bytes_moved() == (0, 0)
    assert [e["ranks"] for e in engine.rounds[0]["jobs"]] == [[2], [4], [1]]


def test_deployment_maps_clients_to_their_nodes():
    grid = FakeGrid(
        {
            21: trainer({"lora-rank": 4, "client-id": "alice"}),
            22: trainer({"lora-rank-type": "attn2-mlp8", "client-id": "bob"}),
        }
    )
    engine = FlowerEngine(grid, "deployment", poll_interval=0.01)
    assert engine.roster() == {"alice": RankType("r4", 4, 4), "bob": RankType("attn2-mlp8", 2, 8)}
    engine.train([job("bob", 2), job("alice", 4)])
    assert [(m.metadata.dst_node_id, job_from_content(m.content).client_id) for m in grid.sent[-2:]] == [
        (22, "bob"),
        (21, "alice"),
    ]
    assert "settings" not in grid.sent[-1].content  # nodes use their own run config


def test_deployment_refuses_ambiguous_or_incomplete_declarations():
    same = FakeGrid(
        {1: trainer({"lora-rank": 4, "client-id": "x"}), 2: trainer({"lora-rank": 4, "client-id": "x"})}
    )
    with pytest.raises(ValueError, match="both declare client-id 'x'"):
        FlowerEngine(same, "deployment", poll_interval=0.01).roster()
    with pytest.raises(ValueError, match="node 3: a deployment node must declare client-id"):
        FlowerEngine(FakeGrid({3: trainer({"lora-rank": 4})}), "deployment", poll_interval=0.01).roster()


def test_failures_become_train_failures_with_reasons(caplog):
    def error(msg):
        if msg.metadata.message_type == "query":
            return trainer({"lora-rank": 2, "client-id": "e"})(msg)
        return Message(Error(code=3, reason="ClientApp raised ValueError"), reply_to=msg)

    def silent(msg):
        return (
            trainer({"lora-rank": 2, "client-id": "s"})(msg) if msg.metadata.message_type == "query" else None
        )

    def nan(msg):
        reply = trainer({"lora-rank": 2, "client-id": "n"})(msg)
        if msg.metadata.message_type == "train":
            from flwr.app import Array

            arrays = reply.content["update"]
            arrays["q_proj.A"] = Array(float("nan") * arrays["q_proj.A"].numpy())
        return reply

    grid = FakeGrid({1: trainer({"lora-rank": 2, "client-id": "ok"}), 2: error, 3: silent, 4: nan})
    engine = FlowerEngine(grid, "deployment", round_timeout=0.3, poll_interval=0.01)
    engine.roster()
    grid.handlers[5] = trainer({"lora-rank": 2, "client-id": "late"})
    del grid.handlers[4]  # node 4 went offline after declaring
    with caplog.at_level(logging.INFO):
        out = engine.train([job(c, 2) for c in ("ok", "e", "s", "n", "nobody")])
    assert isinstance(out[0], TrainResult)
    reasons = [o.reason for o in out[1:]]
    assert all(isinstance(o, TrainFailure) for o in out[1:])
    assert "node 2: ClientApp raised ValueError (error code 3)" in reasons[0]
    assert reasons[1] == "node 3: no reply within 0.3s; left out of this round"
    assert reasons[2] == "node 4 of client 'n' is not connected"
    assert reasons[3] == "no node declares client-id 'nobody'"
    assert "client e left out" in caplog.text and "received 1 results, 4 failures" in caplog.text


def test_malformed_reply_is_a_failure_naming_node_and_field():
    def shrink(msg):
        reply = trainer({"lora-rank": 2, "client-id": "x"})(msg)
        if msg.metadata.message_type == "train":
            from flwr.app import Array

            reply.content["update"]["v_proj.B"] = Array(
                reply.content["update"]["v_proj.B"].numpy()[:, :1].copy()
            )
        return reply

    engine = FlowerEngine(FakeGrid({9: shrink}), "deployment", poll_interval=0.01)
    (out,) = engine.train([job("x", 2)])
    assert isinstance(out, TrainFailure)
    assert out.reason == (
        "node 9: update[v_proj.B]: has shape (4, 1), expected (4, 2) (rank 2 was sent); left out of this round"
    )


def test_unknown_placement_is_refused():
    with pytest.raises(ValueError, match="placement"):
        FlowerEngine(FakeGrid({}), "cloud")


def test_a_node_that_goes_offline_is_not_waited_for():
    grid = FakeGrid({})

    def crash(msg):  # answers the query, then disappears while its job is pending
        if msg.metadata.message_type == "query":
            return trainer({"lora-rank": 2, "client-id": "c"})(msg)
        del grid.handlers[4]
        return None

    grid.handlers.update({4: crash, 5: trainer({"lora-rank": 2, "client-id": "d"})})
    engine = FlowerEngine(grid, "deployment", round_timeout=60, poll_interval=0.01)
    start = time.monotonic()
    out = engine.train([job("c", 2), job("d", 2)])
    assert time.monotonic() - start < 10  # not the 60 s timeout
    assert out[0].reason == "node 4 went offline during the round; left out of this round"
    assert isinstance(out[1], TrainResult)
