"""Flower's simulation runtime driven by our round loop: the same run as the in-process engine, message by
message (2 rounds, tiny model); both must give the same losses, since the ClientApp runs the same client
code from the same payloads and seeds."""

from __future__ import annotations

import json

import pytest
import torch

from flexlora.config import load_config
from flexlora.core.adapter_io import read_adapter
from flexlora.run import run_federation

pytestmark = pytest.mark.timeout(400)

OVERRIDES = [
    "model.name=tiny",
    "data.path=synthetic",
    "data.options={num_clients: 6, examples_per_client: 12, seed: 0}",
    "data.num_heldout=2",
    "federation.rounds=2",
    "federation.clients_per_round=2",
    "federation.distribution=uniform",
    "train.steps=2",
    "train.batch_size=4",
    "train.max_length=48",
    "eval.generate=false",
    "eval.max_examples_per_client=2",
]


def _run(engine: str, out) -> list[dict]:
    cfg = load_config(
        None, [*OVERRIDES, f"federation.engine={engine}", f"output_dir={out}", f"name={engine}"]
    )
    return run_federation(cfg, progress=False).metrics


def test_simulation_matches_the_in_process_engine(tmp_path, one_thread):
    local = _run("local", tmp_path)
    flower = _run("flower", tmp_path)
    assert [m["round"] for m in flower] == [0, 1, 2]
    for a, b in zip(local[1:], flower[1:], strict=True):
        assert b["received"] == 2 and b["failures"] == {}
        assert b["clients"] == a["clients"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["eval"]["loss"] == pytest.approx(a["eval"]["loss"], rel=1e-5)
        assert b["bytes"] == a["bytes"]  # the same tensors cross the boundary
    assert (tmp_path / "flower" / "adapters" / "full" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "flower" / "assignment.json").read_text()) == json.loads(
        (tmp_path / "local" / "assignment.json").read_text()
    )
    # the final global adapters agree to float tolerance
    ours, theirs = (
        read_adapter(tmp_path / name / "adapters" / "full")[0].modules for name in ("local", "flower")
    )
    assert ours.keys() == theirs.keys()
    for name, f in ours.items():
        torch.testing.assert_close(theirs[name].delta(), f.delta(), rtol=1e-5, atol=1e-6)
