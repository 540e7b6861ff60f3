"""SLoRA: masks, sparse jobs that leave the base weights untouched, the sparse FedAvg, the SVD hand-over to
LoRA, and whole federations (with resume across the stage boundary) on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from flexlora.checkpoint import load_checkpoint
from flexlora.config import ConfigError
from flexlora.core.aggregators import GlobalState
from flexlora.core.safetensors_io import read_safetensors
from flexlora.data import open_source
from flexlora.federation import Federation
from flexlora.lora_host import LoraHost
from flexlora.models import load_model
from flexlora.run import resume_federation, run_federation
from flexlora.slora import (
    SparseStage,
    SparseUpdate,
    dense_state,
    mask_density,
    run_sparse_job,
    sparse_deltas,
    sparse_mask,
    truncate_state,
)
from flexlora.training import TrainConfig
from helpers.configs import tiny_config


# ---------------------------------------------------------------------------------------------- masks
def test_density_matches_lora_parameter_count():
    d, k, r = 64, 160, 4
    assert mask_density(r, d, k) * d * k == pytest.approx(r * (d + k))
    assert mask_density(200, 192, 576) == 1.0  # more than the matrix holds: full


def test_mask_is_seeded_distinct_and_sized():
    a = sparse_mask(30, 40, 0.1, seed=7)
    assert torch.equal(a, sparse_mask(30, 40, 0.1, seed=7))
    assert not torch.equal(a, sparse_mask(30, 40, 0.1, seed=8))
    assert len(a) == 120 and len(set(a.tolist())) == 120 and torch.equal(a, a.sort().values)
    assert a.min() >= 0 and a.max() < 1200
    assert torch.equal(sparse_mask(3, 4, 1.0, seed=0), torch.arange(12))
    with pytest.raises(ValueError, match="density"):
        sparse_mask(3, 4, 0.0, seed=0)


# ---------------------------------------------------------------------------------------------- the job
@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("tiny", device="cpu")
    source = open_source("synthetic", num_clients=4, examples_per_client=12, seed=0)
    return model, tokenizer, source


def _weights(model):
    return {n: (p, p.detach().clone()) for n, p in model.named_parameters()}


def test_sparse_deltas_restore_the_same_base_weights_even_on_error(tiny):
    model, _, _ = tiny
    name = "model.layers.0.self_attn.q_proj"
    before = _weights(model)
    W = dict(model.named_modules())[name].weight
    mask = torch.tensor([0, 5, 17])
    offset = torch.ones_like(W)
    with (
        pytest.raises(RuntimeError, match="boom"),
        sparse_deltas(model, {name: mask}, {name: offset}) as values,
    ):
        values[name].data[:] = torch.tensor([1.0, 2.0, 3.0])
        W_eff = dict(model.named_modules())[name].weight  # (d, k): W + G + scatter
        expected = (W.detach() + 1).reshape(-1)
        expected[mask] += torch.tensor([1.0, 2.0, 3.0])
        assert torch.equal(W_eff.reshape(-1), expected)
        raise RuntimeError("boom")
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for n, (param, copy) in before.items():
        assert after[n] is param and torch.equal(param, copy), n
    assert not any("parametrizations" in n for n, _ in model.named_modules())


def test_sparse_job_trains_only_the_mask_and_is_reproducible(tiny):
    model, tokenizer, source = tiny
    host = LoraHost(model, ["q_proj", "up_proj"])
    masks = {
        n: sparse_mask(d, k, mask_density(2, d, k), seed=i)
        for i, (n, (d, k)) in enumerate(host.shapes.items())
    }
    cfg = TrainConfig(steps=2, batch_size=2, max_length=48, lr=1e-2)
    before = _weights(model)
    a = run_sparse_job(model, tokenizer, source.load("0"), masks, None, cfg, seed=3)
    b = run_sparse_job(model, tokenizer, source.load("0"), masks, None, cfg, seed=3)
    for n, (param, copy) in before.items():
        assert torch.equal(param, copy), n
    assert isinstance(a.update, SparseUpdate) and a.update.num_examples == len(source.load("0").train)
    for n, (idx, v) in a.update.deltas.items():
        assert torch.equal(idx, masks[n]) and v.shape == idx.shape and v.abs().sum() > 0
        assert torch.equal(v, b.update.deltas[n][1])
    assert a.metrics["steps"] == 2 and a.metrics["trained_params"] == sum(len(m) for m in masks.values())


# ---------------------------------------------------------------------------------------------- server side
def _stage(tiny, rounds=2, keep=None, density=None):
    model, tokenizer, source = tiny
    shapes = LoraHost(model, ["q_proj"]).shapes
    ranks = {c: {n: 2 for n in shapes} for c in source.client_ids()}
    keep = keep or {n: 3 for n in shapes}
    cfg = TrainConfig(steps=1, batch_size=2, max_length=48)
    return SparseStage(
        model, tokenizer, source, cfg, ranks, keep, rounds, density=density, progress=False
    ), shapes


def test_aggregate_is_fedavg_of_sparse_deltas_on_top_of_g(tiny):
    stage, shapes = _stage(tiny)
    torch.manual_seed(0)
    G0 = {n: torch.randn(d, k) * 0.01 for n, (d, k) in shapes.items()}
    previous = dense_state(G0, "fedavg")
    updates = []
    for cid, n_ex in (("a", 1), ("b", 3)):
        deltas = {
            n: (sparse_mask(d, k, 0.2, seed=len(cid) + n_ex), torch.randn(round(0.2 * d * k)))
            for n, (d, k) in shapes.items()
        }
        updates.append(SparseUpdate(deltas, n_ex, cid))
    state = stage.aggregate(updates, previous, round_=1)
    for name, (d, k) in shapes.items():
        expected = G0[name].clone().reshape(-1)
        for u, p in zip(updates, (0.25, 0.75), strict=True):
            idx, v = u.deltas[name]
            expected[idx] += p * v
        lr = state.modules[name]
        assert lr.rank == min(d, k)  # exact SVD, all triplets
        torch.testing.assert_close(lr.delta(), expected.view(d, k), atol=1e-5, rtol=1e-5)
        S = lr.B.norm(dim=0)
        assert torch.all(S[:-1] >= S[1:] - 1e-6)  # descending singular values in B = U S


def test_last_stage_round_cuts_to_the_pool_rank_and_reports_energy(tiny):
    stage, shapes = _stage(tiny, rounds=1, keep=None)
    name = next(iter(shapes))
    d, k = shapes[name]
    U, _ = torch.linalg.qr(torch.randn(d, d))
    V, _ = torch.linalg.qr(torch.randn(k, k))
    S = torch.tensor([4.0, 3.0, 2.0, 1.0])
    G = U[:, :4] * S @ V[:, :4].T
    full = dense_state({name: G}, "fedavg")
    cut, kept = truncate_state(full, {name: 3})
    assert cut.modules[name].rank == 3
    torch.testing.assert_close(cut.modules[name].delta(), U[:, :3] * S[:3] @ V[:, :3].T, atol=1e-5, rtol=1e-5)
    assert kept == pytest.approx((16 + 9 + 4) / 30)
    state = stage.aggregate(
        [SparseUpdate({n: (torch.tensor([0]), torch.tensor([1.0])) for n in shapes}, 1)], full, 1
    )
    assert {lr.rank for lr in state.modules.values()} == {3}


def test_stage_trains_each_client_on_its_own_masks(tiny):
    stage, shapes = _stage(tiny)
    state = GlobalState.initial(shapes, {n: 3 for n in shapes}, "fedavg", seed=0)  # G = 0
    outcomes = stage.train(state, 1, ["0", "1"])
    assert [o.update.client_id for o in outcomes] == ["0", "1"]
    masks = [o.update.deltas[next(iter(shapes))][0] for o in outcomes]
    assert not torch.equal(masks[0], masks[1])
    d, k = next(iter(shapes.values()))
    assert len(masks[0]) == round(mask_density(2, d, k) * d * k)
    sent, received = stage.bytes_moved()
    assert sent > 0 and received == sum(o.update.nbytes() for o in outcomes)


# ---------------------------------------------------------------------------------------------- federations
@pytest.mark.parametrize(
    ("method", "distribution"), [("slora", "homo"), ("slora+flexlora", "heavy-tail-strong")]
)
def test_slora_federation_hands_over_to_lora(tmp_path, method, distribution):
    cfg = tiny_config(
        tmp_path,
        f"federation.method={method}",
        f"federation.distribution={distribution}",
        "federation.rounds=3",
        "federation.slora_rounds=2",
        "eval.generate=false",
    )
    result = run_federation(cfg, progress=False)
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("stage") for m in lines] == [None, "slora-sparse", "slora-sparse", None]
    assert all(m["received"] == 3 for m in lines[1:])
    assert lines[1]["bytes"]["received"] > 0
    state, _ = load_checkpoint(result.run_dir)
    widest = 8 if distribution == "homo" else 64  # tiny model: every module clips r200 at min(d, k)
    assert max(lr.rank for lr in state.global_state.modules.values()) <= widest
    if distribution == "homo":
        assert {lr.rank for lr in state.global_state.modules.values()} == {8}
    assert lines[1]["eval"]["loss"] != lines[0]["eval"]["loss"]  # stage 1 moved the model


def test_slora_resumes_across_the_stage_boundary(tmp_path, monkeypatch):
    args = (
        "federation.method=slora",
        "federation.distribution=homo",
        "federation.slora_rounds=1",
        "eval.generate=false",
    )
    straight = run_federation(tiny_config(tmp_path, *args, name="straight"), progress=False)
    real = Federation.run_round

    def crash(self, state):  # after the last sparse round, before the first LoRA round
        if state.round == 1:
            raise KeyboardInterrupt("simulated crash")
        return real(self, state)

    monkeypatch.setattr(Federation, "run_round", crash)
    cfg = tiny_config(tmp_path, *args, name="interrupted")
    with pytest.raises(KeyboardInterrupt):
        run_federation(cfg, progress=False)
    monkeypatch.setattr(Federation, "run_round", real)
    resumed = resume_federation(cfg.run_dir, progress=False)
    a = read_safetensors(straight.run_dir / "checkpoint" / "global.safetensors")
    b = read_safetensors(resumed.run_dir / "checkpoint" / "global.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["federation.method=slora", "federation.slora_rounds=2"],
            "slora_rounds: slora needs 1 <= slora_rounds < rounds",
        ),
        (["federation.method=slora", "federation.distribution=uniform"], "slora needs one rank"),
        (["federation.method=slora+flexlora", "federation.engine=flower"], "local engine only"),
        (["federation.slora_density=1.5"], "slora_density: must be in"),
    ],
)
def test_slora_config_errors_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, *overrides)
