"""The comparison grid: which cells, their configs, and a resumable tiny grid through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import flexlora.run
from flexlora.cli import main
from flexlora.compare import Cell, cell_state, load_comparison, plan_cells, run_comparison
from flexlora.config import ConfigError
from flexlora.federation import Federation
from helpers.configs import tiny_base


# ---------------------------------------------------------------------------------------------- the plan
def test_default_grid_follows_the_paper():
    cells = plan_cells(seeds=[0])
    keys = [c.key for c in cells]
    for method in ("flexlora", "hetlora", "flora", "ffa", "slora+flexlora"):
        assert f"{method}/uniform/seed0" in keys and f"{method}/heavy-tail-strong/seed0" in keys
    assert "flexlora/homo/seed0" in keys  # the SVD-rule control at the baseline's ranks
    assert "hetlora/homo/seed0" not in keys
    for method in ("fedavg", "fedit", "slora"):
        assert f"{method}/homo/seed0" in keys and f"{method}@r200/r200/seed0" in keys
    assert len(keys) == len(set(keys)) == 5 * 2 + 1 + 3 + 3


def test_order_and_overrides():
    cells = plan_cells(
        ["fedavg", "fedavg@r30", "flexlora"],
        ["uniform"],
        [0, 1],
        {"fedavg": ["train.optimizer=sgd"], "fedavg@r30": ["train.lr=0.1"]},
    )
    assert [c.key for c in cells] == [
        "fedavg/homo/seed0",
        "fedavg/homo/seed1",
        "fedavg@r30/r30/seed0",
        "fedavg@r30/r30/seed1",
        "flexlora/uniform/seed0",
        "flexlora/uniform/seed1",
    ]
    assert cells[0].overrides == ("train.optimizer=sgd",)
    assert cells[2].overrides == ("train.optimizer=sgd", "train.lr=0.1")
    by_seed = plan_cells(["fedit", "flexlora"], ["uniform"], [0, 1], order="seed")
    assert [c.key for c in by_seed] == [
        "fedit/homo/seed0",
        "flexlora/uniform/seed0",
        "fedit/homo/seed1",
        "flexlora/uniform/seed1",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((["fedsgd"],), "unknown method 'fedsgd'"),
        ((["hetlora@r30"],), "only homogeneous methods"),
        ((["fedit"], ["zipf"]), "unknown distribution 'zipf'"),
        ((["fedit"], ["homo"], []), "no cell"),
    ],
)
def test_bad_plans_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        plan_cells(*args)


def test_cell_config_sets_the_cell_keys(tmp_path):
    cell = Cell("fedit@r200", "fedit", "r200", 2, ("train.lr=0.01",))
    cfg = cell.run_config({"model": {"name": "tiny"}}, tmp_path, ["federation.rounds=3"])
    assert cfg.federation.method == "fedit" and cfg.federation.distribution == ["r200"]
    assert cfg.federation.seed == 2 and cfg.federation.rounds == 3 and cfg.train.lr == 0.01
    assert cfg.run_dir == tmp_path / "cells" / "fedit@r200" / "r200" / "seed2"
    with pytest.raises(ConfigError, match=r"cell fedit@r200/r200/seed2: (.|\n)*lr must be"):
        Cell("fedit@r200", "fedit", "r200", 2, ("train.lr=-1",)).run_config({}, tmp_path)


def test_compare_section_and_its_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {name: tiny}\n"
        "compare: {methods: [fedit, flexlora], distributions: [uniform], seeds: 2, "
        "method_overrides: {fedit: [train.lr=0.01]}}\n"
    )
    comparison = load_comparison(path)
    assert [c.key for c in comparison.cells] == [
        "fedit/homo/seed0",
        "fedit/homo/seed1",
        "flexlora/uniform/seed0",
        "flexlora/uniform/seed1",
    ]
    assert comparison.out.name == "compare-c" and "compare" not in comparison.base
    assert len(load_comparison(path, seeds=[5]).cells) == 2
    path.write_text("compare: {method: [fedit]}\n")
    with pytest.raises(ConfigError, match="compare: unknown key"):
        load_comparison(path)


# ---------------------------------------------------------------------------------------------- a tiny grid
def test_grid_runs_resumes_reuses_and_reports(tmp_path, monkeypatch, capsys):
    config, out = tiny_base(tmp_path), tmp_path / "cmp"
    # ---- an interrupted first attempt: the third cell crashes in its second round
    real = Federation.run_round
    calls = {"n": 0}

    def crash_once(self, state):
        calls["n"] += 1
        if calls["n"] == 6:  # cells 1-2 take rounds 1-4; cell 3 (flexlora seed 0) crashes in round 2
            raise KeyboardInterrupt("simulated crash")
        return real(self, state)

    monkeypatch.setattr(Federation, "run_round", crash_once)
    comparison = load_comparison(config, out=out)
    with pytest.raises(KeyboardInterrupt):
        run_comparison(comparison, progress=False)
    monkeypatch.setattr(Federation, "run_round", real)
    states = [cell_state(out / "cells" / c.key, 2) for c in comparison.cells]
    assert states == ["done", "done", "partial", "todo"]
    # ---- the same command again: reuse 2, resume 1, run 1
    resumed = []
    real_resume = flexlora.run.resume_federation
    monkeypatch.setattr(
        flexlora.run, "resume_federation", lambda d, **kw: resumed.append(d) or real_resume(d, **kw)
    )
    assert main(["compare", str(config), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert (
        "[cell 1/4] fedit/homo/seed0: done" in text and "[cell 3/4] flexlora/uniform/seed0: partial" in text
    )
    assert resumed == [out / "cells" / "flexlora" / "uniform" / "seed0"]
    assert "4/4 cells done" in (out / "progress.md").read_text()
    metrics = [
        json.loads(x) for x in (out / "cells/flexlora/uniform/seed0/metrics.jsonl").read_text().splitlines()
    ]
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert metrics[1]["eval"]["rougeL"] is None and metrics[2]["eval"]["rougeL"] is not None  # Rouge-L once
    assert set(metrics[2]["eval"]["per_client"]) and all(
        "loss" in v for v in metrics[2]["eval"]["per_client"].values()
    )
    # ---- the report: flexlora under uniform against fedit, paired over 2 seeds x 2 held-out clients
    table = (out / "report" / "results.md").read_text()
    assert "| flexlora | uniform | 2 |" in table and "fedit (homo)" in table and "(n=4, exact)" in table
    assert (out / "report" / "loss_by_round.png").is_file()
    # ---- nothing left to do; a changed config is refused, not mixed in
    monkeypatch.setattr(flexlora.run, "run_federation", lambda *a, **k: pytest.fail("reran a finished cell"))
    assert main(["compare", str(config), "--out", str(out), "--no-progress", "--no-report"]) == 0
    assert main(["compare", str(config), "--out", str(out), "--set", "train.lr=0.01"]) == 2
    assert "holds a run with another config (train.lr: 0.0003 -> 0.01)" in capsys.readouterr().err
    assert main(["compare", str(config), "--out", str(out), "--status"]) == 0
    assert "| 4 | flexlora/uniform/seed1 | done | 2/2 |" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["study-ni", "study-dolly"])
def test_study_configs_open_with_their_command_and_plan_valid_cells(name):
    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    assert path.read_text().startswith(f"# nohup nice -n 10 .venv/bin/flexlora compare configs/{name}.yaml")
    comparison = load_comparison(path)  # validates every cell's config
    keys = {c.key for c in comparison.cells}
    assert {"fedit/homo/seed0", "flexlora/uniform/seed0", "hetlora/heavy-tail-strong/seed0"} <= keys
    fedavg = next(c for c in comparison.cells if c.label == "fedavg")
    assert "train.optimizer=sgd" in fedavg.overrides


def test_workers_share_a_grid_a_cell_claimed_by_another_process_is_skipped(tmp_path, monkeypatch):
    import fcntl

    import flexlora.run

    comparison = load_comparison(tiny_base(tmp_path), out=tmp_path / "cmp", seeds=[0])
    ran = []

    def fake_run(cfg, **kwargs):
        ran.append(cfg.run_dir)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(flexlora.run, "run_federation", fake_run)
    held_cell = comparison.cells[0]
    (tmp_path / "cmp" / "locks").mkdir(parents=True)
    with open(tmp_path / "cmp" / "locks" / (held_cell.key.replace("/", "__") + ".lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another worker is running this cell
        states = run_comparison(comparison, progress=False)
    assert states[held_cell.key] == "elsewhere"
    assert all(states[c.key] == "done" for c in comparison.cells[1:])
    assert ran == [tmp_path / "cmp" / "cells" / c.key for c in comparison.cells[1:]]
    # the claims are released: a later worker takes the cell the first one left
    ran.clear()
    run_comparison(comparison, progress=False)
    assert tmp_path / "cmp" / "cells" / held_cell.key in ran


def test_the_plan_keeps_cells_planned_by_earlier_runs_of_a_subset(tmp_path):
    base, out = tiny_base(tmp_path), tmp_path / "cmp"
    load_comparison(base, out=out, methods=["fedit"]).write_plan()
    full = load_comparison(base, out=out)
    full.write_plan()
    load_comparison(base, out=out, methods=["flexlora"], seeds=[1]).write_plan()
    keys = [c["key"] for c in json.loads((out / "plan.json").read_text())["cells"]]
    assert keys[0] == "fedit/homo/seed0" and sorted(keys) == sorted(c.key for c in full.cells)


def test_a_key_added_since_a_run_was_saved_differs_only_off_its_default():
    from flexlora.compare import config_differences
    from flexlora.config import RunConfig

    planned = RunConfig().to_dict()
    saved = RunConfig().to_dict()
    del saved["federation"]["hetlora_gamma"]  # a run saved before the key existed
    assert config_differences(saved, planned) == []
    planned["federation"]["hetlora_gamma"] = 0.5
    assert config_differences(saved, planned) == ["federation.hetlora_gamma: None -> 0.5"]


def test_labelled_variants_run_where_their_method_runs_with_their_keys():
    variants = {
        "flexlora-rslora": {"method": "flexlora", "set": ["model.use_rslora=true"]},
        "fedit-r200-lr": {"method": "fedit@r200", "set": ["train.lr=0.01"]},
    }
    cells = plan_cells(
        ["flexlora-rslora", "fedit-r200-lr"],
        ["homo", "uniform"],
        [0],
        {"flexlora": ["train.lr=0.002"], "flexlora-rslora": ["train.steps=3"]},
        variants=variants,
    )
    assert [(c.key, c.method, c.overrides) for c in cells] == [
        (
            "flexlora-rslora/homo/seed0",
            "flexlora",
            ("train.lr=0.002", "model.use_rslora=true", "train.steps=3"),
        ),
        (
            "flexlora-rslora/uniform/seed0",
            "flexlora",
            ("train.lr=0.002", "model.use_rslora=true", "train.steps=3"),
        ),
        ("fedit-r200-lr/r200/seed0", "fedit", ("train.lr=0.01",)),
    ]
    cfg = cells[1].run_config({"model": {"name": "tiny"}}, Path("/tmp/x"))
    assert cfg.model.use_rslora and cfg.federation.method == "flexlora" and cfg.train.lr == 0.002
    for bad in (
        {"flexlora": {"method": "flexlora"}},
        {"a/b": {"method": "fedit"}},
        {"v": {"method": "nope"}},
    ):
        with pytest.raises(ValueError):
            plan_cells(list(bad), ["uniform"], [0], variants=bad)


def test_sweep_makes_one_comparison_per_point(tmp_path):
    from flexlora.compare import load_comparisons, sweep_points

    assert sweep_points({}) == [("", [])]
    assert sweep_points({"train.steps": [4, 8], "train.lr": [0.001]}) == [
        ("steps=4,lr=0.001", ["train.steps=4", "train.lr=0.001"]),
        ("steps=8,lr=0.001", ["train.steps=8", "train.lr=0.001"]),
    ]
    for bad in (
        {"train.steps": []},
        {"train.steps": [4, 4]},
        {"a.x": [1], "b.x": [2]},
        {"train.lr": ["a/b"]},
    ):
        with pytest.raises(ValueError):
            sweep_points(bad)
    path = tmp_path / "s.yaml"
    path.write_text(
        "model: {name: tiny}\n"
        "compare: {methods: [fedit], seeds: 1, out: OUT, sweep: {train.steps: [4, 16]}}\n"
    )
    comparisons = load_comparisons(path, overrides=["train.lr=0.01"])
    assert [c.out for c in comparisons] == [Path("OUT/steps=4"), Path("OUT/steps=16")]
    cfgs = [next(iter(c.configs().values())) for c in comparisons]
    assert [(c.train.steps, c.train.lr) for c in cfgs] == [(4, 0.01), (16, 0.01)]
    assert cfgs[1].run_dir == Path("OUT/steps=16/cells/fedit/homo/seed0")
    with pytest.raises(ConfigError, match="makes 2 comparisons"):
        load_comparison(path)
