"""End-to-end federations on the tiny model: every method and distribution, resume, outputs, configs."""

from __future__ import annotations

import json

import pytest
import torch

from flexlora.checkpoint import load_checkpoint
from flexlora.cli import main
from flexlora.config import ConfigError, load_config
from flexlora.core.adapter_io import read_adapter
from flexlora.core.safetensors_io import read_safetensors
from flexlora.federation import Federation
from flexlora.run import resume_federation, run_federation
from helpers.configs import tiny_config
from helpers.data import SHARED_DATA, needs_shared_data

CASES = [
    ("flexlora", "heavy-tail-strong"),
    ("flexlora", "uniform"),
    ("flexlora", "normal"),
    ("flexlora", "heavy-tail-light"),
    ("flexlora", "homo"),
    ("fedavg", "homo"),
    ("fedit", "homo"),
    ("hetlora", "uniform"),
    ("flora", "heavy-tail-strong"),
    ("ffa", "uniform"),
    ("raflora", "heavy-tail-strong"),
    ("florist", "uniform"),
]


@pytest.mark.parametrize(("method", "distribution"), CASES)
def test_every_method_and_distribution_runs(tmp_path, method, distribution):
    cfg = tiny_config(
        tmp_path,
        f"federation.method={method}",
        f"federation.distribution={distribution}",
        "eval.generate=false",
    )
    result = run_federation(cfg, progress=False)
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [0, 1, 2]
    assert all(m["received"] == 3 and not m["failures"] for m in lines[1:])
    assert all(torch.isfinite(torch.tensor(m["eval"]["loss"])) for m in lines)
    full, _ = read_adapter(result.run_dir / "adapters" / "full")
    assert full.modules and all(torch.isfinite(f.B).all() for f in full.modules.values())
    assignment = json.loads((result.run_dir / "assignment.json").read_text())
    for rank_type in set(assignment.values()):
        assert (result.run_dir / "adapters" / rank_type / "adapter_config.json").is_file()


def test_run_dir_records_config_versions_and_spectrum(tmp_path):
    result = run_federation(tiny_config(tmp_path), progress=False)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["seed"] == 0 and info["packages"]["torch"].startswith("2.13")
    assert load_config(result.run_dir / "config.yaml").model.name == "tiny"
    final = result.final
    assert {"rougeL", "rougeL_unstemmed", "loss", "tf_argmax_rougeL", "num_examples", "per_category"} <= set(
        final["eval"]
    )
    assert final["bytes"]["sent"] > 0 and final["bytes"]["received"] > 0
    spectrum = final["spectrum"]["top_singular_values"]
    assert set(spectrum) == {"q_proj", "v_proj", "up_proj"}
    assert spectrum["q_proj"][0] >= spectrum["q_proj"][1] >= 0


def test_rounds_record_tokens_and_the_run_its_resolved_precision(tmp_path):
    from flexlora.precision import resolve_precision

    cfg = tiny_config(
        tmp_path,
        "federation.eval_every=2",
        "train.precision=auto",
        "train.group_by_length=true",
        "eval.precision=bf16",
    )
    result = run_federation(cfg, progress=False)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["precision"] == {"train": resolve_precision("auto", "cpu"), "eval": "bf16"}
    saved = load_config(result.run_dir / "config.yaml")
    assert saved.train.precision == "auto" and saved.train.group_by_length and saved.eval.precision == "bf16"
    first, second = result.metrics[1:]
    for m in (first, second):  # 3 clients x 2 steps x 2 examples of at most 48 tokens
        assert 0 < m["train_tokens"] <= 3 * 2 * 2 * 48 and isinstance(m["train_tokens"], int)
    assert first["eval_tokens"] == 0 and "eval" not in first  # no evaluation in round 1
    assert second["eval_tokens"] == second["eval"]["tokens"] > 0


def test_resume_after_interruption_gives_identical_weights(tmp_path, monkeypatch):
    straight = run_federation(tiny_config(tmp_path, "federation.rounds=3", name="straight"), progress=False)
    real = Federation.run_round

    def crash_in_round_3(self, state):
        if state.round == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(self, state)

    monkeypatch.setattr(Federation, "run_round", crash_in_round_3)
    cfg = tiny_config(tmp_path, "federation.rounds=3", name="interrupted")
    with pytest.raises(KeyboardInterrupt):
        run_federation(cfg, progress=False)
    assert load_checkpoint(cfg.run_dir)[0].round == 2
    monkeypatch.setattr(Federation, "run_round", real)
    resumed = resume_federation(cfg.run_dir, progress=False)
    a = read_safetensors(straight.run_dir / "checkpoint" / "global.safetensors")
    b = read_safetensors(resumed.run_dir / "checkpoint" / "global.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [m["round"] for m in resumed.metrics] == [0, 1, 2, 3]
    assert resumed.final["eval"]["loss"] == straight.final["eval"]["loss"]


def test_same_seed_pairs_clients_across_methods(tmp_path):
    runs = [
        run_federation(
            tiny_config(tmp_path, f"federation.method={m}", f"federation.distribution={d}", name=m),
            progress=False,
        )
        for m, d in (("flexlora", "heavy-tail-strong"), ("fedavg", "homo"))
    ]
    assert [m.get("clients") for m in runs[0].metrics] == [m.get("clients") for m in runs[1].metrics]


def test_existing_run_is_not_overwritten(tmp_path):
    cfg = tiny_config(tmp_path, "federation.rounds=1")
    run_federation(cfg, progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_federation(cfg, progress=False)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("federation.rounds=zero", "federation.rounds: expected int"),
        ("federation.roundz=3", "federation.roundz: unknown key"),
        ("federation.method=fedsgd", "federation.method: 'fedsgd' is not one of"),
        ("federation.distribution=zipf", "federation.distribution: 'zipf' is not one of"),
        ("train.lr=-1", "train: .*lr must be a number > 0"),
        ("model.dtype=int8", "model.dtype: 'int8'"),
    ],
)
def test_bad_config_names_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, override)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["federation.method=hetlora-cho", "federation.hetlora_gamma=1.0"], "hetlora_\\*: gamma must lie"),
        (
            ["federation.method=hetlora-cho", "federation.engine=flower"],
            "hetlora-cho runs on the local engine only",
        ),
        (["data.eval_on=validation"], "data.eval_on: 'validation' needs data.num_validation"),
        (["data.eval_on=test"], "data.eval_on: 'test' is not one of"),
    ],
)
def test_new_study_keys_are_checked(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, *overrides)


def test_fedavg_refuses_heterogeneous_ranks_before_loading_anything(tmp_path):
    with pytest.raises(ConfigError, match="federation.distribution: fedavg needs one rank"):
        tiny_config(tmp_path, "federation.method=fedavg", "federation.distribution=uniform")


def test_all_errors_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as info:
        tiny_config(tmp_path, "federation.rounds=x", "model.colour=red", "eval.nope=1")
    text = str(info.value)
    assert "federation.rounds" in text and "model.colour" in text and "eval.nope" in text


def test_cli_run_and_resume(tmp_path, capsys):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        "model: {name: tiny, target_modules: [q_proj, v_proj]}\n"
        "data: {path: synthetic, options: {num_clients: 6, examples_per_client: 8}, num_heldout: 1}\n"
        "federation: {rounds: 1, clients_per_round: 2}\n"
        "train: {steps: 1, batch_size: 2, max_length: 32}\n"
        "eval: {max_examples_per_client: 1, max_new_tokens: 2}\n"
    )
    args = ["run", str(cfg_path), "--set", f"output_dir={tmp_path}", "--set", "name=cli", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "final: round   1" in out and str(tmp_path / "cli") in out
    assert main(["run", "--resume", str(tmp_path / "cli"), "--no-progress"]) == 0  # already complete: no-op
    assert main(["run", str(cfg_path), "--set", "federation.rounds=0"]) == 2
    assert "federation.rounds: must be >= 1" in capsys.readouterr().err


@needs_shared_data(SHARED_DATA / "flexlora-ni-layout-sample")
def test_smollm2_two_clients_one_round(tmp_path):
    """Integration: the real SmolLM2-135M-Instruct on two Natural Instructions clients, one round."""
    cfg = load_config(
        None,
        [
            "name=smollm2",
            f"output_dir={tmp_path}",
            "model.name=smollm2",
            f"data.path={SHARED_DATA / 'flexlora-ni-layout-sample'}",
            "data.max_clients=2",
            "data.num_heldout=1",
            "federation.rounds=1",
            "federation.clients_per_round=2",
            "federation.distribution=[r8, r30]",
            "train.steps=1",
            "train.batch_size=2",
            "train.max_length=128",
            "eval.max_examples_per_client=2",
            "eval.max_new_tokens=8",
        ],
    )
    result = run_federation(cfg, progress=False)
    assert result.final["received"] == 2
    assert result.final["eval"]["num_examples"] == 2
    r30, _ = read_adapter(result.run_dir / "adapters" / "r30")
    assert {f.rank for f in r30.modules.values()} == {30}


def test_a_non_finite_client_metric_is_left_out_of_the_round_mean_with_a_logged_reason(caplog):
    from flexlora.contracts import TrainResult
    from flexlora.core.lora import LoraUpdate
    from flexlora.federation import _weighted_mean

    results = [
        TrainResult(LoraUpdate({}, num_examples=1, client_id="a"), {"train_loss": 1.0}),
        TrainResult(LoraUpdate({}, num_examples=3, client_id="b"), {"train_loss": 2.0}),
        TrainResult(LoraUpdate({}, num_examples=5, client_id="c"), {"train_loss": float("inf")}),
        TrainResult(LoraUpdate({}, num_examples=5, client_id="d"), {"train_loss": float("nan")}),
        TrainResult(LoraUpdate({}, num_examples=5, client_id="e"), {}),
    ]
    assert _weighted_mean(results, "train_loss") == pytest.approx((1.0 + 3 * 2.0) / 4)
    assert "client c: train_loss = inf is not finite" in caplog.text and "client d" in caplog.text
    assert _weighted_mean(results[2:], "train_loss") is None


def test_a_checkpoint_of_the_wrong_shape_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from flexlora.core.errors import AdapterError
    from flexlora.core.safetensors_io import write_safetensors
    from flexlora.lora_host import LoraHost
    from flexlora.models import config_module_shapes, load_model

    model, _ = load_model("tiny")
    assert config_module_shapes("tiny", ("q_proj", "v_proj")) == LoraHost(model, ("q_proj", "v_proj")).shapes
    cfg = tiny_config(tmp_path, "federation.rounds=2")
    real = Federation.run_round

    def crash_in_round_2(self, state):
        if state.round == 1:
            raise KeyboardInterrupt("simulated crash")
        return real(self, state)

    monkeypatch.setattr(Federation, "run_round", crash_in_round_2)  # a run to resume, after round 1
    with pytest.raises(KeyboardInterrupt):
        run_federation(cfg, progress=False)
    monkeypatch.setattr(Federation, "run_round", real)
    path = cfg.run_dir / "checkpoint" / "global.safetensors"
    tensors = read_safetensors(path)
    key = next(k for k in tensors if k.endswith("A"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    write_safetensors(path, tensors)
    (cfg.run_dir / "checkpoint" / "manifest.json").unlink()  # a pre-manifest checkpoint: shapes still checked
    monkeypatch.setattr("flexlora.models.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(AdapterError, match="the model's is"):
        resume_federation(cfg.run_dir, progress=False)
