"""load_model, target shapes and LoraHost adapter swaps on the tiny model; one SmolLM2 smoke test."""

from __future__ import annotations

import copy
import gc
import time
import weakref

import pytest
import torch
import torch.nn.functional as F

from flexlora.core.errors import AdapterError
from flexlora.core.lora import LoraFactors
from flexlora.lora_host import LoraHost
from flexlora.models import (
    ALL_PROJECTIONS,
    DEFAULT_TARGET_MODULES,
    cache_dir,
    load_model,
    response_logits,
    target_module_shapes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pristine(tiny):
    """A copy of the tiny base model taken before any adapter touched it."""
    return copy.deepcopy(tiny[0])


@pytest.fixture()
def host(tiny):
    model, _ = tiny
    host = LoraHost(model, ALL_PROJECTIONS)
    yield host
    host.unload()


def random_factors(shapes, ranks, alphas, seed=0, rslora=False):
    g = torch.Generator().manual_seed(seed)
    return {
        name: LoraFactors(
            torch.randn(r, k, generator=g) / k**0.5, torch.randn(d, r, generator=g) / r**0.5, float(a), rslora
        )
        for (name, (d, k)), r, a in zip(shapes.items(), ranks, alphas, strict=True)
    }


def merged_copy(base, *adapters):
    """A deep copy of the (adapter-free) base model with ``scale * B @ A`` of each adapter added to its weights."""
    merged = copy.deepcopy(base)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for adapter in adapters:
            for name, f in adapter.items():
                modules[name].weight += f.scale * (f.B @ f.A)
    return merged


def assert_close(got, want):
    """Equal up to float32 rounding (merged weights and a LoRA side path round differently)."""
    err = (got - want).abs().max().item()
    assert err < 1e-4 * max(1.0, want.abs().max().item()), err


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


# ----------------------------------------------------------------------------------------------------------
# loading


def test_tiny_model_is_seeded_and_frozen(tiny):
    model, tok = tiny
    again, _ = load_model("tiny", device="cpu")
    other, _ = load_model("tiny", device="cpu", seed=1)
    assert torch.equal(logits(model), logits(again))
    assert not torch.equal(logits(model), logits(other))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config.vocab_size == len(tok) == 259


def test_tiny_tokenizer_is_byte_level_and_has_specials(tiny):
    _, tok = tiny
    text = "héllo سلام 你好\n### x"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} == {256, 257, 258}
    assert tok.chat_template


def test_load_model_bf16_and_bad_dtype():
    model, _ = load_model("tiny", dtype="bf16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny", dtype="int8")


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXLORA_CACHE", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("FLEXLORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "flexlora"


def test_smollm2_cache_is_written_once_atomically_and_renewed_when_stale(monkeypatch, tmp_path):
    """The GGUF conversion, with the tiny model standing in for SmolLM2 (the real one takes 30 s)."""
    import transformers

    import flexlora.models as models

    gguf = tmp_path / "pkg" / models.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF stand-in")
    calls = []

    def fake(kind):
        def from_pretrained(path, gguf_file=None, **kwargs):
            calls.append(kind)
            assert gguf_file == gguf.name and path == gguf.parent
            return models._tiny_model(0) if kind == "model" else models._tiny_tokenizer()

        return from_pretrained

    monkeypatch.setattr(models, "_smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake("model"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake("tokenizer"))
    monkeypatch.setenv("FLEXLORA_CACHE", str(tmp_path / "cache"))
    path = models._smollm2_cache()
    assert path == tmp_path / "cache" / "models" / gguf.stem
    assert {"config.json", "model.safetensors", "tokenizer.json", models._CACHE_MARKER} <= {
        p.name for p in path.iterdir()
    }
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary directory left
    assert models._smollm2_cache() == path and len(calls) == 2  # cached: no second conversion
    gguf.write_bytes(b"GGUF stand-in, another version")
    models._smollm2_cache()
    assert len(calls) == 4  # the marker no longer matches the source: converted again


def test_target_module_shapes(tiny):
    model, _ = tiny
    default = target_module_shapes(model)
    assert DEFAULT_TARGET_MODULES == ("q_proj", "v_proj")
    assert list(default) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert default["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert default["model.layers.0.self_attn.v_proj"] == (32, 64)  # 2 kv heads x head dim 16
    every = target_module_shapes(model, ALL_PROJECTIONS)
    assert len(every) == 14
    assert every["model.layers.1.mlp.down_proj"] == (64, 160)


# ----------------------------------------------------------------------------------------------------------
# LoraHost


def test_adapter_output_is_base_plus_scaled_BA(tiny, host):
    model, _ = tiny
    name = "model.layers.0.self_attn.v_proj"
    f = LoraFactors(torch.randn(3, 64), torch.randn(32, 3), alpha=5.0)
    host.load({name: f})
    layer = dict(model.named_modules())[name]
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = x @ layer.base_layer.weight.T + (5.0 / 3) * x @ f.A.T @ f.B.T
        assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_whole_model_matches_merged_weights_at_heterogeneous_ranks(tiny, pristine, host, rslora):
    model, _ = tiny
    n = len(host.shapes)
    init = random_factors(
        host.shapes, [1 + i % 5 for i in range(n)], [2 + 3 * i for i in range(n)], rslora=rslora
    )
    host.load(init)
    layer = dict(model.named_modules())["model.layers.1.mlp.down_proj"]
    assert layer.r["trainable"] == init["model.layers.1.mlp.down_proj"].rank
    assert layer.scaling["trainable"] == pytest.approx(init["model.layers.1.mlp.down_proj"].scale)
    assert_close(logits(model), logits(merged_copy(pristine, init)))


def test_export_round_trips_per_module_ranks_and_alphas(host):
    names = list(host.shapes)
    init = random_factors(host.shapes, [1, 7, 2, 5, 3, 8, 4, 6, 2, 1, 9, 3, 5, 2], range(1, 15), seed=3)
    host.load(init)
    out = host.export()
    assert list(out) == names
    for name in names:
        assert torch.equal(out[name].A, init[name].A) and torch.equal(out[name].B, init[name].B)
        assert out[name].alpha == init[name].alpha and out[name].use_rslora == init[name].use_rslora
        assert out[name].A.device.type == "cpu" and out[name].A.dtype == torch.float32
        assert not out[name].A.requires_grad


def test_similar_module_names_do_not_collide():
    """``layers.1`` must not pick up the pattern of ``layers.11`` (and vice versa): keys are anchored."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=12, num_attention_heads=2
    )
    model = LlamaForCausalLM(config)
    host = LoraHost(model, ("q_proj",))
    init = {
        name: LoraFactors(torch.randn(1 + i, 16), torch.randn(16, 1 + i), float(i + 1))
        for i, name in enumerate(host.shapes)
    }
    host.load(init)
    out = host.export()
    assert {n: f.rank for n, f in out.items()} == {n: f.rank for n, f in init.items()}
    assert all(torch.equal(out[n].A, init[n].A) for n in init)


def test_unload_restores_the_base_exactly(tiny, host):
    model, _ = tiny
    before = logits(model)
    names = {n: type(m) for n, m in model.named_modules()}
    host.load(random_factors(host.shapes, [4] * 14, [8] * 14))
    assert not torch.equal(logits(model), before)
    host.unload()
    assert torch.equal(logits(model), before)
    assert {n: type(m) for n, m in model.named_modules()} == names
    assert not hasattr(model, "peft_config")
    assert not any(p.requires_grad for p in model.parameters())
    host.unload()  # a no-op


def test_frozen_and_trainable_are_both_active_and_only_trainable_learns(tiny, pristine, host):
    model, _ = tiny
    q = [n for n in host.shapes if n.endswith("q_proj")]
    train = random_factors({n: host.shapes[n] for n in q}, [2, 2], [4, 4], seed=1)
    frozen = random_factors(host.shapes, [3] * 14, [6] * 14, seed=2)  # covers more modules than `train`
    host.load(train, frozen=frozen)
    assert_close(logits(model), logits(merged_copy(pristine, train, frozen)))
    model(input_ids=IDS).logits.square().mean().backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    assert graded == {f"{n}.lora_{ab}.trainable.weight" for n in q for ab in "AB"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == graded
    assert list(host.export()) == q  # the frozen adapter is never exported
    model.zero_grad(set_to_none=True)


def test_freeze_A_trains_B_only(tiny, host):
    model, _ = tiny
    host.load(random_factors(host.shapes, [2] * 14, [4] * 14), freeze_A=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 14 and all(".lora_B.trainable." in n for n in trainable)
    assert len(host.trainable_parameters()) == 14


def test_load_replaces_the_previous_adapter_and_frees_it(tiny, pristine, host):
    model, _ = tiny
    n_params = len(list(model.parameters()))
    host.load(random_factors(host.shapes, [8] * 14, [16] * 14))
    layer = dict(model.named_modules())["model.layers.0.mlp.up_proj"]
    old = weakref.ref(layer.lora_A["trainable"].weight)
    del layer
    second = random_factors(host.shapes, [2] * 14, [4] * 14, seed=5)
    for _ in range(3):
        host.load(second)
    gc.collect()
    assert old() is None
    assert len(list(model.parameters())) == n_params + 2 * 14
    assert_close(logits(model), logits(merged_copy(pristine, second)))
    host.unload()
    assert len(list(model.parameters())) == n_params


def test_load_at_the_same_layout_reuses_the_adapter_and_only_overwrites_factors(tiny, pristine, host):
    model, _ = tiny
    host.load(random_factors(host.shapes, [4] * 14, [8] * 14, seed=1), freeze_A=True)
    weight = dict(model.named_modules())["model.layers.0.mlp.up_proj"].lora_A["trainable"].weight
    second = random_factors(host.shapes, [4] * 14, [8] * 14, seed=2)  # same ranks and alphas
    host.load(second)
    assert dict(model.named_modules())["model.layers.0.mlp.up_proj"].lora_A["trainable"].weight is weight
    assert_close(logits(model), logits(merged_copy(pristine, second)))
    assert len(host.trainable_parameters()) == 28  # freeze_A follows the new call
    other_alpha = random_factors(host.shapes, [4] * 14, [16] * 14, seed=2)  # a new layout: re-injected
    host.load(other_alpha)
    assert dict(model.named_modules())["model.layers.0.mlp.up_proj"].lora_A["trainable"].weight is not weight
    assert_close(logits(model), logits(merged_copy(pristine, other_alpha)))


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (
            {"model.layers.0.mlp.nope": LoraFactors(torch.zeros(2, 64), torch.zeros(64, 2), 1.0)},
            "not a target",
        ),
        (
            {"model.layers.0.self_attn.q_proj": LoraFactors(torch.zeros(2, 32), torch.zeros(64, 2), 1.0)},
            "fit",
        ),
        (
            {"model.layers.0.self_attn.q_proj": LoraFactors(torch.zeros(2, 64), torch.zeros(64, 3), 1.0)},
            "fit",
        ),
        (
            {"model.layers.0.self_attn.q_proj": LoraFactors(torch.zeros(0, 64), torch.zeros(64, 0), 1.0)},
            "rank 0",
        ),
        (
            {
                "model.layers.0.self_attn.q_proj": LoraFactors(
                    torch.zeros(2, 64), torch.zeros(64, 2), 1.0, True
                ),
                "model.layers.1.self_attn.q_proj": LoraFactors(torch.zeros(2, 64), torch.zeros(64, 2), 1.0),
            },
            "use_rslora",
        ),
        ({}, "no modules"),
    ],
)
def test_bad_adapters_are_refused_and_nothing_changes(tiny, host, bad, match):
    model, _ = tiny
    good = random_factors(host.shapes, [2] * 14, [4] * 14)
    host.load(good)
    with pytest.raises(AdapterError, match=match):
        host.load(bad)
    assert host.loaded and torch.equal(
        host.export()["model.layers.0.self_attn.q_proj"].A, good["model.layers.0.self_attn.q_proj"].A
    )


def test_host_refuses_models_without_targets_or_already_wrapped(tiny, host):
    model, _ = tiny
    with pytest.raises(ValueError, match="no nn.Linear"):
        LoraHost(model, ("nothing",))
    host.load(random_factors(host.shapes, [1] * 14, [1] * 14))
    with pytest.raises(ValueError, match="PEFT"):
        LoraHost(model)
    with pytest.raises(RuntimeError, match="load"):
        LoraHost(load_model("tiny", device="cpu")[0]).export()


def test_response_logits_match_the_full_forward(tiny):
    model, _ = tiny
    labels = IDS.clone()
    labels[0, :7] = -100
    labels[1, :3] = -100
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=mask, labels=labels)
        picked, targets = response_logits(model, IDS, mask, labels)
    keep = labels[:, 1:] != -100
    assert torch.allclose(picked, out.logits[:, :-1][keep], atol=1e-5)
    assert torch.equal(targets, labels[:, 1:][keep])
    assert F.cross_entropy(picked, targets).item() == pytest.approx(out.loss.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# the real model (the cache makes this quick after the first run ever, which converts the GGUF file)


def test_smollm2_loads_runs_and_trains_one_step():
    from flexlora.contracts import TrainJob
    from flexlora.data.examples import ClientData, ClientInfo, Example
    from flexlora.training import TrainConfig, run_train_job

    start = time.perf_counter()
    model, tok = load_model("smollm2", device="cpu")
    loaded = time.perf_counter() - start
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert tok.pad_token_id is not None
    host = LoraHost(model)
    shapes = host.shapes
    assert shapes["model.layers.0.self_attn.v_proj"] == (192, 576)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert " Paris" in tok.decode(model(input_ids=ids).logits[0, -1].topk(5).indices.tolist())
    examples = [Example("Answer briefly.", "What is 2 + 2?", "4"), Example("Say hi.", "", "Hi!")]
    data = ClientData(ClientInfo("c", "t", "cat", 2), train=examples)
    init = {n: LoraFactors(torch.randn(8, k) * 0.01, torch.zeros(d, 8), 16.0) for n, (d, k) in shapes.items()}
    result = run_train_job(host, tok, data, TrainJob("c", 1, 0, init), TrainConfig(steps=1, batch_size=2))
    assert result.metrics["steps"] == 1 and 0 < result.metrics["train_loss"] < 20
    assert any(f.B.abs().sum() > 0 for f in result.update.modules.values())
    print(f"SmolLM2 load {loaded:.1f} s, one step {result.metrics['seconds']:.1f} s")
