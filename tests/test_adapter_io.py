"""PEFT adapter directories: round trips with real PEFT on a tiny random Llama, and refused input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from flexlora.core.adapter_io import read_adapter, write_adapter
from flexlora.core.errors import AdapterError
from flexlora.core.lora import LoraFactors
from flexlora.core.safetensors_io import read_safetensors
from helpers.models import tiny_llama_model

TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj")


def _shapes(model) -> dict[str, tuple[int, int]]:
    return {
        name: tuple(m.weight.shape)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    }


def _factors(shapes, rank_of, alpha_of, rslora=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (d, k) in shapes.items():
        r = rank_of(name)
        out[name] = LoraFactors(
            torch.randn(r, k, generator=gen), torch.randn(d, r, generator=gen), alpha_of(name), rslora
        )
    return out


def _hetero(shapes):
    # layer 0 attention at rank 2, layer 1 attention at 4 (v_proj at its full 16), MLP at 8; alphas differ.
    def rank(n):
        if "v_proj" in n and "layers.1" in n:
            return 16
        return 8 if "mlp" in n else (2 if "layers.0" in n else 4)

    return _factors(shapes, rank, lambda n: 32.0 if "gate" in n else 16.0)


def test_written_adapter_loads_in_peft_with_exact_weights(tmp_path, tiny_llama):
    shapes = _shapes(tiny_llama)
    factors = _hetero(shapes)
    write_adapter(tmp_path / "a", factors, base_model="tiny")
    base = {n: m.weight.detach().clone() for n, m in tiny_llama.named_modules() if n in shapes}
    model = PeftModel.from_pretrained(tiny_llama, tmp_path / "a")
    merged = model.merge_and_unload()
    modules = dict(merged.named_modules())
    for name, f in factors.items():
        expected = base[name] + f.scale * f.B @ f.A
        torch.testing.assert_close(modules[name].weight, expected, rtol=1e-5, atol=1e-5)
    untouched = [n for n, m in merged.named_modules() if n.endswith("o_proj")]
    assert untouched and all(not hasattr(modules[n], "lora_A") for n in untouched)


def test_peft_saved_adapter_reads_back_with_its_scales(tmp_path):
    model = tiny_llama_model()
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 6},
        alpha_pattern={"v_proj": 24},
        use_rslora=True,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "p")
    update, cfg = read_adapter(tmp_path / "p")
    lora_modules = {
        n: m for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and n.endswith("proj")
    }
    assert len(update.modules) == len(lora_modules) == 4
    for name, module in lora_modules.items():
        key = name.removeprefix("base_model.model.")
        f = update.modules[key]
        torch.testing.assert_close(f.A, module.lora_A["default"].weight)
        torch.testing.assert_close(f.B, module.lora_B["default"].weight)
        assert f.scale == pytest.approx(module.scaling["default"])
    assert update.modules["model.layers.1.self_attn.q_proj"].rank == 6
    assert update.modules["model.layers.0.self_attn.v_proj"].scale == pytest.approx(24 / math.sqrt(4))


def test_round_trip_preserves_factors(tmp_path, tiny_llama):
    factors = _hetero(_shapes(tiny_llama))
    write_adapter(tmp_path / "a", factors)
    update, _ = read_adapter(tmp_path / "a")
    assert update.modules.keys() == factors.keys()
    for name, f in factors.items():
        g = update.modules[name]
        assert (g.rank, g.alpha, g.use_rslora) == (f.rank, f.alpha, f.use_rslora)
        torch.testing.assert_close(g.delta(), f.delta())


# ---------------------------------------------------------------------------- refused input
def _write_good(path, tiny=None):
    shapes = _shapes(tiny or tiny_llama_model())
    write_adapter(path, _factors(shapes, lambda n: 2, lambda n: 16.0))
    return path


def _set_tensor(path, key_part, fn):
    from flexlora.core.safetensors_io import write_safetensors

    tensors = read_safetensors(path / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if key_part in k)
    tensors[key] = fn(tensors[key])
    write_safetensors(path / "adapter_model.safetensors", tensors)
    return key


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_refused(tmp_path, value):
    d = _write_good(tmp_path / "c")
    key = _set_tensor(d, "lora_B", lambda t: t.index_fill(0, torch.tensor([0]), value))
    with pytest.raises(AdapterError, match=f"{key}.*NaN or Inf"):
        read_adapter(d)


def test_rank_disagreement_refused(tmp_path):
    d = _write_good(tmp_path / "c")
    _set_tensor(d, "layers.0.self_attn.q_proj.lora_A", lambda t: torch.cat([t, t]))
    with pytest.raises(AdapterError, match="q_proj.*disagree on the rank"):
        read_adapter(d)


def test_config_rank_disagreement_refused(tmp_path):
    d = _write_good(tmp_path / "c")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 3
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="declares rank 3"):
        read_adapter(d)


def test_missing_config_refused(tmp_path):
    d = _write_good(tmp_path / "c")
    (d / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="missing adapter_config.json"):
        read_adapter(d)


def test_pickle_refused_without_unpickling(tmp_path, monkeypatch):
    d = _write_good(tmp_path / "c")
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(AdapterError, match="adapter_model.bin.*pickle"):
        read_adapter(d)


def test_truncated_file_refused(tmp_path):
    d = _write_good(tmp_path / "c")
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        read_adapter(d)


def test_garbage_file_refused(tmp_path):
    d = _write_good(tmp_path / "c")
    (d / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_adapter(d)


def test_absurd_declared_shape_refused_before_allocation(tmp_path):
    d = tmp_path / "c"
    _write_good(d)
    header = {
        "base_model.model.x.lora_A.weight": {
            "dtype": "F32",
            "shape": [10**9, 10**9],
            "data_offsets": [0, 16],
        },
    }
    raw = json.dumps(header).encode()
    (d / "adapter_model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 16)
    with pytest.raises(AdapterError, match="corrupt or forged header"):
        read_adapter(d)


def test_integer_dtype_refused(tmp_path):
    d = _write_good(tmp_path / "c")
    _set_tensor(d, "lora_A", lambda t: t.to(torch.int32))
    with pytest.raises(AdapterError, match="dtype 'I32'"):
        read_adapter(d)


def test_module_with_only_one_factor_refused(tmp_path):
    from flexlora.core.safetensors_io import write_safetensors

    d = _write_good(tmp_path / "c")
    tensors = read_safetensors(d / "adapter_model.safetensors")
    tensors.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    write_safetensors(d / "adapter_model.safetensors", tensors)
    with pytest.raises(AdapterError, match="q_proj.*no lora_B"):
        read_adapter(d)
