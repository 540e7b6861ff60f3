"""TrainConfig validation, batch order, and run_train_job on the tiny model."""

from __future__ import annotations

import pytest
import torch

from flexlora.contracts import TrainJob
from flexlora.core.lora import LoraFactors
from flexlora.data.examples import ClientData, ClientInfo, Example
from flexlora.lora_host import LoraHost
from flexlora.models import ALL_PROJECTIONS, load_model
from flexlora.prompts import collate, encode_example
from flexlora.training import LENGTH_WINDOW, TrainConfig, batch_order, group_by_length, run_train_job

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def host(tiny):
    return LoraHost(tiny[0], ALL_PROJECTIONS)


WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date"]
DATA = ClientData(
    ClientInfo("c1", "echo", "repeat", len(WORDS)),
    train=[Example("Repeat.", w, f"{w} {w}", "repeat") for w in WORDS],
)
FAST = TrainConfig(steps=3, batch_size=4, lr=5e-3, max_length=64)


def init_factors(host, rank=4, alpha=8.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        n: LoraFactors(torch.randn(rank, k, generator=g) / k**0.5, torch.zeros(d, rank), alpha)
        for n, (d, k) in host.shapes.items()
    }


def logits(model):
    with torch.no_grad():
        return model(input_ids=torch.arange(20).unsqueeze(0)).logits


# ----------------------------------------------------------------------------------------------------------
# config


def test_config_defaults_are_valid_and_steps_or_epochs():
    assert TrainConfig().num_steps(100) == 10
    cfg = TrainConfig(steps=None, epochs=2, batch_size=4, grad_accum=2)
    assert cfg.num_steps(10) == 3  # ceil(2 * 10 / 4) = 5 micro-batches -> 3 steps
    assert TrainConfig(steps=None, epochs=0.1).num_steps(5) == 1
    with pytest.raises(ValueError, match=r"exactly one of steps and epochs.*steps=10, epochs=1"):
        TrainConfig(epochs=1)
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig(steps=None)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("steps", 2.5),
        ("batch_size", 0),
        ("grad_accum", True),
        ("lr", -1.0),
        ("schedule", "step"),
        ("warmup_steps", -1),
        ("optimizer", "adam"),
        ("weight_decay", -0.1),
        ("max_grad_norm", -1.0),
        ("loss_on", "prompt"),
        ("max_length", 1),
        ("template", "vicuna"),
    ],
)
def test_config_names_the_bad_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"{field} .*{value!r}"):
        TrainConfig(**{field: value})


def test_config_reports_every_error_at_once():
    with pytest.raises(ValueError) as err:
        TrainConfig(lr=0, optimizer="lion", schedule="poly")
    assert all(name in str(err.value) for name in ("lr", "optimizer", "schedule"))


def test_batch_order_is_full_seeded_and_covers_each_pass():
    order = batch_order(7, 3, 7, torch.Generator().manual_seed(1))
    assert all(len(b) == 3 for b in order)
    flat = [i for b in order for i in b]
    assert sorted(flat[:7]) == list(range(7)) and sorted(flat[7:14]) == list(range(7))
    assert order == batch_order(7, 3, 7, torch.Generator().manual_seed(1))
    assert order != batch_order(7, 3, 7, torch.Generator().manual_seed(2))
    assert batch_order(2, 4, 1, torch.Generator().manual_seed(0))[0].count(0) == 2  # n < batch: repeats


def test_group_by_length_is_seeded_and_a_permutation_of_each_window():
    lengths = [5, 40, 7, 33, 12, 3, 28, 9, 50, 1]
    batches = batch_order(10, 2, 2 * LENGTH_WINDOW + 3, torch.Generator().manual_seed(4))
    grouped = group_by_length(batches, lengths, torch.Generator().manual_seed(9))
    assert grouped == group_by_length(batches, lengths, torch.Generator().manual_seed(9))
    assert [len(b) for b in grouped] == [len(b) for b in batches]
    for start in range(0, len(batches), LENGTH_WINDOW):  # the same examples, window by window
        window = slice(start, start + LENGTH_WINDOW)
        assert sorted(i for b in grouped[window] for i in b) == sorted(i for b in batches[window] for i in b)

    def padding(order):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in order)

    assert padding(grouped) < padding(batches) / 2


@pytest.mark.parametrize("config", ["group", "bf16"])
def test_grouping_and_bf16_train_the_same_examples_as_the_default(tiny, host, config):
    """One window covers the round, so grouping reorders the same examples: the non-padding token count is
    the one of the plain batches; bf16 autocast keeps float32 factors and a loss close to float32's."""
    _, tok = tiny
    cfg = TrainConfig(steps=3, batch_size=2, lr=5e-3, max_length=64)
    other = {"group": {"group_by_length": True}, "bf16": {"precision": "bf16"}}[config]
    init = init_factors(host)
    plain = run_train_job(host, tok, DATA, TrainJob("c1", 1, 3, init), cfg)
    result = run_train_job(host, tok, DATA, TrainJob("c1", 1, 3, init), TrainConfig(**{**vars(cfg), **other}))
    batches = batch_order(len(WORDS), 2, 3, torch.Generator().manual_seed(3))
    lengths = [len(encode_example(tok, ex, 64)["input_ids"]) for ex in DATA.train]
    assert plain.metrics["tokens"] == result.metrics["tokens"] == sum(lengths[i] for b in batches for i in b)
    assert all(f.A.dtype == f.B.dtype == torch.float32 for f in result.update.modules.values())
    assert result.metrics["train_loss"] == pytest.approx(plain.metrics["train_loss"], rel=0.05)


def test_label_position_loss_and_gradients_equal_the_full_logits_loss(tiny, host):
    """The training loss (lm_head at the labelled positions only) and its LoRA gradients equal those of the
    model's own full-logits loss on a right-padded batch, in float32."""
    from flexlora.models import response_logits

    model, tok = tiny
    batch = collate([encode_example(tok, ex, 64) for ex in DATA.train[:3]], tok.pad_token_id)
    init = init_factors(host)
    init = {n: LoraFactors(f.A, torch.randn_like(f.B) * 0.1, f.alpha) for n, f in init.items()}
    host.load(init)
    try:
        params = host.trainable_parameters()
        full = model(**batch).loss
        full_grads = torch.autograd.grad(full, params)
        logits, targets = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        ours = torch.nn.functional.cross_entropy(logits, targets)
        our_grads = torch.autograd.grad(ours, params)
    finally:
        host.unload()
    assert ours.item() == pytest.approx(full.item(), rel=1e-6)
    for a, b in zip(full_grads, our_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_precision_is_checked():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, auto, got 'fp16'"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="group_by_length must be true or false"):
        TrainConfig(group_by_length="yes")


# ----------------------------------------------------------------------------------------------------------
# run_train_job


def test_result_carries_the_update_and_metrics_and_the_host_is_unloaded(tiny, host):
    model, tok = tiny
    before = logits(model)
    init = init_factors(host)
    result = run_train_job(host, tok, DATA, TrainJob("c1", 1, 0, init), FAST)
    update = result.update
    assert update.client_id == "c1" and update.num_examples == len(WORDS)
    assert update.ranks() == {n: 4 for n in host.shapes}
    assert all(f.alpha == 8.0 for f in update.modules.values())
    assert all(not torch.equal(update.modules[n].B, init[n].B) for n in init)
    assert set(result.metrics) >= {"train_loss", "steps", "seconds", "tokens"}
    assert result.metrics["steps"] == 3 and result.metrics["tokens"] > 0
    assert not host.loaded and torch.equal(logits(model), before)


def test_same_job_is_bit_identical_and_the_seed_matters(tiny, host):
    _, tok = tiny
    init = init_factors(host)
    torch.manual_seed(123)
    a = run_train_job(host, tok, DATA, TrainJob("c1", 1, 7, init), FAST)
    outside = torch.rand(1)
    torch.manual_seed(123)
    b = run_train_job(host, tok, DATA, TrainJob("c1", 1, 7, init), FAST)
    assert torch.equal(outside, torch.rand(1))  # the caller's RNG is untouched
    c = run_train_job(host, tok, DATA, TrainJob("c1", 1, 8, init), FAST)
    for name in init:
        assert torch.equal(a.update.modules[name].A, b.update.modules[name].A)
        assert torch.equal(a.update.modules[name].B, b.update.modules[name].B)
    assert a.metrics["train_loss"] == b.metrics["train_loss"]
    assert any(not torch.equal(a.update.modules[n].B, c.update.modules[n].B) for n in init)


def test_a_kept_adapter_trains_like_a_fresh_one_and_the_local_engine_unloads_after_the_round(tiny, host):
    from flexlora.engines.local import LocalEngine

    model, tok = tiny
    before = logits(model)
    init = init_factors(host, seed=3)
    fresh = run_train_job(host, tok, DATA, TrainJob("c1", 1, 7, init), FAST)
    run_train_job(host, tok, DATA, TrainJob("c1", 1, 9, init_factors(host, seed=4)), FAST, keep_adapter=True)
    assert host.loaded
    kept = run_train_job(host, tok, DATA, TrainJob("c1", 1, 7, init), FAST, keep_adapter=True)  # reused
    for name in init:
        assert torch.equal(fresh.update.modules[name].B, kept.update.modules[name].B)
    host.unload()

    class Source:
        def load(self, client_id):
            return DATA

    engine = LocalEngine(host, tok, Source(), FAST, progress=False)
    results = engine.train([TrainJob("c1", 1, 7, init), TrainJob("c1", 1, 8, init)])
    assert torch.equal(results[0].update.modules[name].B, fresh.update.modules[name].B)
    assert not host.loaded and torch.equal(logits(model), before)


def test_training_lowers_the_loss(tiny, host):
    _, tok = tiny
    init = init_factors(host, rank=8)
    cfg = TrainConfig(steps=30, batch_size=4, lr=1e-2, max_length=64, schedule="cosine", warmup_steps=2)
    first = run_train_job(host, tok, DATA, TrainJob("c1", 1, 0, init), TrainConfig(steps=1, max_length=64))
    result = run_train_job(host, tok, DATA, TrainJob("c1", 1, 0, init), cfg)
    assert result.metrics["train_loss_last"] < 0.7 * first.metrics["train_loss"]


def test_freeze_A_keeps_A(tiny, host):
    _, tok = tiny
    init = init_factors(host)
    result = run_train_job(host, tok, DATA, TrainJob("c1", 1, 0, init, freeze_A=True), FAST)
    for name, f in result.update.modules.items():
        assert torch.equal(f.A, init[name].A) and not torch.equal(f.B, init[name].B)


def test_frozen_update_shapes_training_but_is_not_returned(tiny, host):
    model, tok = tiny
    before = logits(model)
    init = init_factors(host)
    g = torch.Generator().manual_seed(9)
    frozen = {
        n: LoraFactors(torch.randn(2, k, generator=g), torch.randn(d, 2, generator=g), 2.0)
        for n, (d, k) in host.shapes.items()
    }
    plain = run_train_job(host, tok, DATA, TrainJob("c1", 1, 0, init), FAST)
    on_top = run_train_job(host, tok, DATA, TrainJob("c1", 1, 0, init, frozen=frozen), FAST)
    assert set(on_top.update.modules) == set(init)
    assert on_top.metrics["train_loss"] != plain.metrics["train_loss"]
    assert torch.equal(logits(model), before)


def test_grad_accum_equals_one_big_batch(tiny, host):
    _, tok = tiny
    init = init_factors(host)
    big = TrainConfig(
        steps=2, batch_size=4, grad_accum=1, lr=0.5, optimizer="sgd", max_grad_norm=None, max_length=64
    )
    small = TrainConfig(
        steps=2, batch_size=2, grad_accum=2, lr=0.5, optimizer="sgd", max_grad_norm=None, max_length=64
    )
    a = run_train_job(host, tok, DATA, TrainJob("c1", 1, 3, init), big)
    b = run_train_job(host, tok, DATA, TrainJob("c1", 1, 3, init), small)
    assert a.metrics["train_loss"] == pytest.approx(b.metrics["train_loss"], rel=1e-5)
    for name in init:
        assert torch.allclose(a.update.modules[name].B, b.update.modules[name].B, atol=1e-6)


def test_epochs_loss_on_all_and_linear_schedule_run(tiny, host):
    _, tok = tiny
    cfg = TrainConfig(steps=None, epochs=1, batch_size=4, loss_on="all", schedule="linear", max_length=64)
    result = run_train_job(host, tok, DATA, TrainJob("c1", 1, 0, init_factors(host)), cfg)
    assert result.metrics["steps"] == 2  # ceil(7 / 4)
    assert result.metrics["loss_tokens"] > 2 * 4 * 10  # prompt tokens count too


def test_bad_jobs_are_refused_and_leave_the_host_clean(tiny, host):
    _, tok = tiny
    init = init_factors(host)
    with pytest.raises(ValueError, match="client 'c2'"):
        run_train_job(host, tok, DATA, TrainJob("c2", 1, 0, init), FAST)
    empty = ClientData(ClientInfo("c3", "t", "c", 0))
    with pytest.raises(ValueError, match="no training examples"):
        run_train_job(host, tok, empty, TrainJob("c3", 1, 0, init), FAST)
    bad = dict(init)
    bad["model.layers.0.self_attn.q_proj"] = LoraFactors(torch.zeros(4, 3), torch.zeros(64, 4), 8.0)
    with pytest.raises(ValueError, match="q_proj"):
        run_train_job(host, tok, DATA, TrainJob("c1", 1, 0, bad), FAST)
    assert not host.loaded


def test_bf16_base_trains_float32_factors():
    model, tok = load_model("tiny", dtype="bfloat16", device="cpu")
    host = LoraHost(model)
    init = init_factors(host)
    host.load(init)
    layer = dict(model.named_modules())["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A["trainable"].weight.dtype == torch.float32
    assert layer.base_layer.weight.dtype == torch.bfloat16
    host.unload()
    result = run_train_job(host, tok, DATA, TrainJob("c1", 1, 0, init), FAST)
    assert torch.isfinite(torch.tensor(result.metrics["train_loss"]))
    assert all(f.B.dtype == torch.float32 and f.B.abs().sum() > 0 for f in result.update.modules.values())
