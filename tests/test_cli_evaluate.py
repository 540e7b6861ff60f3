"""``flexlora evaluate``: base model and adapter on a data source, JSON contract."""

from __future__ import annotations

import json

import torch

from flexlora.cli import main
from flexlora.core.adapter_io import write_adapter
from flexlora.core.lora import LoraFactors
from flexlora.lora_host import LoraHost
from flexlora.models import load_model

ARGS = ["evaluate", "--data", "synthetic", "--model", "tiny", "--clients", "3"]
ARGS += ["--max-examples-per-client", "2", "--max-new-tokens", "3", "--json"]


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_evaluate_base_and_adapter(tmp_path, capsys):
    assert main(ARGS) == 0
    base = _last_json(capsys)
    assert {"rougeL", "loss", "num_examples", "per_category"} <= set(base)
    assert base["num_examples"] == 6 and 0 <= base["rougeL"] <= 100

    shapes = LoraHost(load_model("tiny")[0], ["q_proj", "v_proj"]).shapes
    gen = torch.Generator().manual_seed(0)
    factors = {
        n: LoraFactors(torch.randn(4, k, generator=gen), torch.randn(d, 4, generator=gen), 16.0)
        for n, (d, k) in shapes.items()
    }
    write_adapter(tmp_path / "a", factors, base_model="tiny")
    assert main([*ARGS, "--adapter", str(tmp_path / "a")]) == 0
    tuned = _last_json(capsys)
    assert tuned["num_examples"] == 6 and tuned["loss"] != base["loss"]


def test_evaluate_refuses_bad_adapter(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    assert main([*ARGS, "--adapter", str(tmp_path / "a")]) == 2
    assert "missing adapter_config.json" in capsys.readouterr().err
