"""TensorBoard and MLflow tracking: settings, flattening, a tracked tiny run read back, lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flexlora.compare import Cell, config_differences
from flexlora.config import ConfigError, load_config
from flexlora.run import resume_federation, run_federation
from flexlora.tracking import flatten_metrics, tracking_settings

ROUND_KEYS = {
    "train_loss",
    "eval/loss",
    "seconds/train",
    "seconds/total",
    "bytes/sent",
    "bytes/received",
    "spectrum/energy_beyond_min_rank",
    "spectrum/top_singular_values/q_proj/0",
}


def tiny_config(tmp_path, *overrides):
    base = [
        "name=tracked",
        f"output_dir={tmp_path}",
        "model.name=tiny",
        "data.path=synthetic",
        "data.options={num_clients: 6, examples_per_client: 8, seed: 0}",
        "data.num_heldout=2",
        "federation.rounds=2",
        "federation.clients_per_round=2",
        "train.steps=1",
        "train.batch_size=2",
        "train.max_length=32",
        "eval.max_examples_per_client=1",
        "eval.generate=false",
    ]
    return load_config(None, [*base, *overrides])


def test_settings_from_a_list_or_a_mapping():
    assert tracking_settings([]).enabled is False
    assert tracking_settings({}).enabled is False
    s = tracking_settings(["tensorboard", "mlflow"])
    assert s.tensorboard and s.mlflow and s.mlflow_uri is None
    s = tracking_settings({"mlflow": "sqlite:///x.db", "experiment": "e"})
    assert not s.tensorboard and s.mlflow and s.mlflow_uri == "sqlite:///x.db" and s.experiment == "e"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tracking=[wandb]", "tracking: 'wandb' is not one of"),
        ("tracking={tensorboard: yes please}", "tracking.tensorboard: unexpected value"),
        ("tracking={comet: true}", "tracking.comet: unknown key"),
        ("tracking=3", "tracking: expected"),
    ],
)
def test_bad_tracking_config_names_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        tiny_config(tmp_path, override)


def test_flatten_keeps_numbers_under_jsonl_names():
    line = {
        "round": 3,
        "clients": ["a", "b"],
        "train_loss": 1.5,
        "failures": {"c": "timeout"},
        "rejected": {"norm": 1},
        "eval": {
            "loss": 2.0,
            "per_client": {"x": {"loss": 1.0}},
            "per_category": {"Q&A (yes)": {"rougeL": 3}},
        },
        "spectrum": {"top_singular_values": {"q_proj": [0.5, 0.25]}, "energy_beyond_min_rank": 0.1},
        "flag": True,
        "nan": float("nan"),
    }
    assert flatten_metrics(line) == {
        "train_loss": 1.5,
        "rejected/norm": 1.0,
        "eval/loss": 2.0,
        "eval/per_category/Q_A _yes_/rougeL": 3.0,
        "spectrum/top_singular_values/q_proj/0": 0.5,
        "spectrum/top_singular_values/q_proj/1": 0.25,
        "spectrum/energy_beyond_min_rank": 0.1,
    }


def test_a_tracked_run_writes_tensorboard_events_and_an_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tmp_path, "tracking=[tensorboard, mlflow]")
    result = run_federation(cfg, progress=False)
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = set(flatten_metrics(lines[1]))
    assert ROUND_KEYS <= expected

    assert list(result.run_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(result.run_dir))
    events.Reload()
    assert expected <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 1, 2]
    assert events.Scalars("train_loss")[-1].value == pytest.approx(lines[2]["train_loss"])

    marker = json.loads((result.run_dir / "mlflow_run.json").read_text())
    assert marker["uri"] == (tmp_path / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=marker["uri"])
    run = client.get_run(marker["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert expected <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [0, 1, 2]
    assert run.data.params["federation.method"] == "flexlora"

    # a resumed run logs into the same MLflow run
    (result.run_dir / "summary.json").unlink()
    resume_federation(result.run_dir, progress=False)
    assert json.loads((result.run_dir / "mlflow_run.json").read_text())["run_id"] == marker["run_id"]


def test_compare_cells_are_separate_runs_of_one_store(tmp_path):
    base = tiny_config(tmp_path, "tracking={tensorboard: true, mlflow: true}").to_dict()
    out = tmp_path / "grid"
    a = Cell("flexlora", "flexlora", "uniform", 0).run_config(base, out)
    b = Cell("raflora", "raflora", "uniform", 1).run_config(base, out)
    assert a.tracking["mlflow"] == b.tracking["mlflow"] == (out / "mlruns").resolve().as_uri()
    assert a.tracking["experiment"] == "grid"
    assert (a.tracking["run_name"], b.tracking["run_name"]) == (
        "flexlora/uniform/seed0",
        "raflora/uniform/seed1",
    )
    assert a.run_dir != b.run_dir  # and TensorBoard's event files go to each cell's own run directory
    # a run made before tracking existed is not refused for it
    saved = {k: v for k, v in a.to_dict().items() if k != "tracking"}
    assert config_differences(saved, a.to_dict()) == []


def test_a_run_without_tracking_never_imports_the_trackers():
    code = (
        "import sys\n"
        "from flexlora.config import load_config\n"
        "from flexlora.tracking import open_tracker\n"
        "import flexlora.run, flexlora.compare\n"
        "assert open_tracker(load_config().tracking, '.', {}) is None\n"
        "loaded = [m for m in sys.modules if m.startswith(('mlflow', 'tensorboard', 'torch.utils.tensorboard'))]\n"
        "assert not loaded, loaded\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": src, "OMP_NUM_THREADS": "1"})
