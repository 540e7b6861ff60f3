"""Flower records: our types round-trip, and malformed replies are refused with the node and field named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from flexlora.contracts import TrainJob, TrainResult
from flexlora.core.aggregators import GlobalState
from flexlora.core.lora import LoraFactors, LoraUpdate
from flexlora.core.ranks import RankType
from flexlora.engines.flower.records import (
    NodeDeclaration,
    ReplyError,
    factors_from_records,
    factors_nbytes,
    factors_to_records,
    job_from_content,
    job_to_content,
    node_declaration,
    reply_content,
    state_from_arrays,
    state_to_arrays,
    update_from_reply,
)
from helpers.flower_records import SHAPES, factors, reply_with


def test_factors_round_trip_keeps_values_alphas_and_rslora():
    sent = factors(3)
    sent["layers.0.q_proj"] = LoraFactors(sent["layers.0.q_proj"].A, sent["layers.0.q_proj"].B, 8.0, True)
    arrays, lora = factors_to_records(sent)
    back = factors_from_records(arrays, lora)
    assert set(back) == set(sent)
    for name, f in sent.items():
        assert torch.equal(back[name].A, f.A) and torch.equal(back[name].B, f.B)
        assert (back[name].alpha, back[name].use_rslora) == (f.alpha, f.use_rslora)
    assert factors_nbytes(sent) == sum(4 * (f.A.numel() + f.B.numel()) for f in sent.values())


def test_bfloat16_travels_as_float32():
    f = LoraFactors(torch.randn(2, 6).bfloat16(), torch.randn(8, 2).bfloat16(), 16.0)
    arrays, lora = factors_to_records({"m": f})
    back = factors_from_records(arrays, lora)["m"]
    assert back.A.dtype == torch.float32 and torch.equal(back.A, f.A.float())


def test_job_round_trip_with_frozen_and_flags():
    job = TrainJob("c7", round=3, seed=99, init=factors(2), frozen=factors(5, seed=1), freeze_A=True)
    back = job_from_content(job_to_content(job))
    assert (back.client_id, back.round, back.seed, back.freeze_A) == ("c7", 3, 99, True)
    assert {n: f.rank for n, f in back.init.items()} == {n: 2 for n in SHAPES}
    assert {n: f.rank for n, f in back.frozen.items()} == {n: 5 for n in SHAPES}
    assert job_from_content(job_to_content(TrainJob("c", 1, 0, factors(1)))).frozen is None


def test_state_round_trip():
    state = GlobalState.initial(SHAPES, {n: 4 for n in SHAPES}, "flexlora", seed=3)
    back = state_from_arrays(state_to_arrays(state), "flexlora")
    for name, lr in state.modules.items():
        assert torch.equal(back.modules[name].A, lr.A) and torch.equal(back.modules[name].B, lr.B)


def test_good_reply_decodes_with_the_sent_alphas():
    sent = factors(3, alpha=8.0)
    result = TrainResult(
        LoraUpdate(factors(3, seed=5, alpha=999.0), 12, "c1"), {"train_loss": 0.5, "steps": 2}
    )
    update, metrics, nbytes = update_from_reply(reply_content(result), sent, "c1", node=7)
    assert update.num_examples == 12 and update.client_id == "c1"
    assert all(f.alpha == 8.0 for f in update.modules.values())  # the node cannot change the scale
    assert metrics == {"train_loss": 0.5, "steps": 2.0}
    assert nbytes == factors_nbytes(sent)


NAN = np.full((3, 6), np.nan, dtype=np.float32)
BAD_REPLIES = {
    "missing module": ({"update.layers__0__q_proj__A": None}, "update: missing 1 array"),
    "extra module": (
        {"update.layers__9__q_proj__A": Array(np.zeros((3, 6), np.float32))},
        "unexpected array",
    ),
    "wrong rank": ({"update.layers__0__q_proj__A": Array(np.zeros((4, 6), np.float32))}, "rank 3 was sent"),
    "wrong width": ({"update.layers__0__q_proj__B": Array(np.zeros((9, 3), np.float32))}, "expected (8, 3)"),
    "integer dtype": (
        {"update.layers__0__q_proj__A": Array(np.zeros((3, 6), np.int64))},
        "non-float dtype int64",
    ),
    "NaN": ({"update.layers__0__q_proj__A": Array(NAN)}, "NaN or Inf"),
    "Inf": ({"update.layers__0__mlp__up_proj__B": Array(np.full((10, 3), np.inf, np.float32))}, "NaN or Inf"),
    "not npy": (
        {"update.layers__0__q_proj__A": Array("float32", (3, 6), "numpy.ndarray", b"junk")},
        "decoded",
    ),
    "zero examples": ({"metrics.num-examples": 0}, "metrics[num-examples]"),
    "negative examples": ({"metrics.num-examples": -4}, "metrics[num-examples]"),
    "absurd examples": ({"metrics.num-examples": 10**12}, "metrics[num-examples]"),
    "fractional examples": ({"metrics.num-examples": 2.5}, "metrics[num-examples]"),
    "no examples": ({"metrics.num-examples": None}, "metrics[num-examples]"),
    "no update": ({"update": None}, "update: no ArrayRecord"),
    "no metrics": ({"metrics": None}, "metrics: no MetricRecord"),
    "other client": ({"config": ConfigRecord({"client-id": "c2"})}, "config[client-id]"),
}


@pytest.mark.parametrize("case", list(BAD_REPLIES))
def test_bad_reply_is_refused_naming_node_and_field(case):
    changes, needle = BAD_REPLIES[case]
    with pytest.raises(ReplyError) as info:
        update_from_reply(reply_with(**changes), factors(3), "c1", node=7)
    message = str(info.value)
    assert message.startswith("node 7: ") and needle in message
    assert message.endswith("; left out of this round")


def test_a_node_training_its_own_partition_names_its_client():
    update, _, _ = update_from_reply(reply_with(), factors(3), "", node=7)
    assert update.client_id == "c1"


def test_metric_record_rejects_nothing_we_send():
    content = reply_content(
        TrainResult(LoraUpdate(factors(1), 3, "c"), {"x": float("nan"), "ok": True, "s": 2})
    )
    assert dict(content["metrics"]) == {"num-examples": 3, "s": 2}
    assert isinstance(content["update"], ArrayRecord) and isinstance(content["metrics"], MetricRecord)


def test_node_declarations():
    assert node_declaration({"lora-rank": 8}).rank_type == RankType("r8", 8, 8)
    assert node_declaration({"lora-rank-type": "attn30-mlp200", "client-id": 3}) == NodeDeclaration(
        RankType("attn30-mlp200", 30, 200), "3", None
    )
    assert node_declaration({"partition-id": 2, "num-partitions": 4}) == NodeDeclaration(None, None, 2)
    for bad in ({"lora-rank": 0}, {"lora-rank": "r8", "lora-rank-type": "r8"}, {"lora-rank-type": "big"}):
        with pytest.raises(ValueError, match="lora-rank"):
            node_declaration(bad)
    for decl in (node_declaration({"lora-rank-type": "attn4-mlp6", "client-id": "x"}), NodeDeclaration()):
        assert NodeDeclaration.from_record(decl.to_record()) == decl
