"""Report statistics by hand (mean/SD, relative improvement, the sign-flip test) and the report's files,
on run directories written by hand (no training)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

from flexlora.cli import main
from flexlora.report import (
    baseline_of,
    build_report,
    collect_runs,
    mean_sd,
    reference_of,
    sign_flip_test,
    summarize,
)


# ---------------------------------------------------------------------------------------------- statistics
def test_mean_sd():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_sd([5.0])[0] == 5.0 and math.isnan(mean_sd([5.0])[1])
    assert all(math.isnan(x) for x in mean_sd([]))


@pytest.mark.parametrize(
    ("diffs", "p"),
    [
        ([1.0, 2.0, 3.0], 2 / 8),  # only +++ and --- reach |mean| = 2
        ([1.0, -1.0], 1.0),
        ([0.0, 0.0, 0.0], 1.0),
        ([3.0, 1.0, 1.0, 1.0], 2 / 16),  # |sum| = 6 needs four equal signs
        ([3.0, 1.0, 1.0, -1.0], 8 / 16),  # |+-3 + t| >= 4 iff t (the 1s) has the 3's sign: 8 of 16
    ],
)
def test_sign_flip_exact_small_cases(diffs, p):
    assert sign_flip_test(diffs) == pytest.approx(p)


def test_sign_flip_monte_carlo_detects_a_shift_and_not_noise():
    shifted = [1.0 + 0.1 * ((i * 7) % 5 - 2) for i in range(60)]
    assert sign_flip_test(shifted) == pytest.approx(1 / 20_001)
    symmetric = [x * (-1) ** i for i, x in enumerate(range(1, 61))]  # mean -0.5 on spread 35
    assert sign_flip_test(symmetric) > 0.5
    assert sign_flip_test(shifted, seed=1) == sign_flip_test(shifted, seed=1)


def test_baselines():
    assert baseline_of("flexlora") == "fedit" and baseline_of("hetlora", "fedavg") == "fedavg"
    assert baseline_of("slora+flexlora") == "slora" and baseline_of("fedit@r200") == "fedit"
    assert baseline_of("fedit") is None and baseline_of("slora") is None


# ---------------------------------------------------------------------------------------------- fake runs
def fake_run(root, label, dist, seed, losses, rouge=None, per_client=None, rounds=None, finished=True):
    """A run directory with one eval per round (round 0 = base) and a final Rouge-L."""
    run = root / "cells" / label / dist / f"seed{seed}"
    run.mkdir(parents=True)
    rounds = rounds or len(losses)
    method = label.split("@")[0]
    config = {"federation": {"method": method, "distribution": dist, "seed": seed, "rounds": rounds}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "cell.json").write_text(json.dumps({"label": label, "distribution": dist, "seed": seed}))
    records = [{"round": 0, "eval": {"loss": 5.0, "rougeL": None, "proxy_rougeL": 1.0}}]
    done = losses if finished else losses[:-1]
    for r, loss in enumerate(done, 1):
        ev = {"loss": loss, "rougeL": None, "proxy_rougeL": 10.0 + r}
        if r == rounds and rouge is not None:
            ev["rougeL"] = rouge
        clients = per_client or {"c1": 0.0, "c2": 0.0}
        ev["per_client"] = {
            c: {"loss": loss + off, "rougeL": ev["rougeL"], "proxy_rougeL": 1.0} for c, off in clients.items()
        }
        ev["per_category"] = {"qa": {"loss": loss - 0.1, "rougeL": None, "proxy_rougeL": 1.0}}
        spectrum = {
            "top_singular_values": {"q_proj": [3.0 / r, 1.0 / r, 0.0]},
            "energy_beyond_min_rank": 0.1 * r,
        }
        records.append({"round": r, "eval": ev, "spectrum": spectrum})
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in records))
    return run


@pytest.fixture
def grid(tmp_path):
    fake_run(tmp_path, "fedit", "homo", 0, [3.0, 2.0], rouge=20.0, per_client={"c1": 0.1, "c2": -0.1})
    fake_run(tmp_path, "fedit", "homo", 1, [3.0, 2.5], rouge=25.0, per_client={"c1": 0.1, "c2": -0.1})
    fake_run(tmp_path, "flexlora", "uniform", 0, [3.0, 1.8], rouge=22.0, per_client={"c1": 0.0, "c2": -0.2})
    fake_run(tmp_path, "flexlora", "uniform", 1, [3.0, 2.0], rouge=24.0, per_client={"c1": 0.0, "c2": -0.2})
    fake_run(tmp_path, "flexlora", "uniform", 2, [3.0, 9.9], finished=False)  # still running: left out
    fake_run(tmp_path, "fedit@r200", "r200", 0, [3.0, 1.5], rouge=30.0)
    (tmp_path / "plan.json").write_text(json.dumps({"cells": [{}] * 7}))
    return tmp_path


def test_summary_pairs_seeds_with_the_homogeneous_baseline(grid):
    records, plan = collect_runs([grid])
    assert len(records) == 5 and len(plan["cells"]) == 7
    rows = {(r.label, r.distribution): r for r in summarize(records)}
    flex = rows[("flexlora", "uniform")]
    assert flex.seeds == [0, 1] and flex.baseline == "fedit"
    assert flex.values["loss"] == [1.8, 2.0]
    # loss: 100 (b - m) / b per seed; Rouge-L: 100 (m - b) / b
    assert flex.rel["loss"] == pytest.approx([10.0, 20.0])
    assert flex.rel["rougeL"] == pytest.approx([10.0, -4.0])
    assert flex.diff["loss"] == pytest.approx([-0.2, -0.5])
    # per-(seed, client) loss differences: seed 0: -0.3, -0.3; seed 1: -0.6, -0.6 -> all negative, n = 4
    assert flex.n_pairs["loss"] == 4 and flex.p_clients["loss"] == pytest.approx(2 / 16)
    assert flex.p_seeds["loss"] == pytest.approx(2 / 4)
    assert flex.category_rel["loss"]["qa"] == pytest.approx((100 * 0.2 / 1.9 + 100 * 0.5 / 2.4) / 2)
    assert flex.category_gain["loss"]["qa"] == pytest.approx((0.2 + 0.5) / 2)  # b - m: > 0 is better
    ref = rows[("fedit@r200", "r200")]
    assert ref.baseline == "fedit" and ref.rel["loss"] == pytest.approx([25.0])
    # one paired seed: nothing to test over seeds
    assert "loss" in ref.p_clients and "loss" not in ref.p_seeds
    assert rows[("fedit", "homo")].rel == {}


def test_head_to_head_pairs_each_method_with_another_at_the_same_distribution(grid, capsys):
    assert reference_of("flexlora", "uniform") == ("fedit", "homo")
    assert reference_of("flexlora", "uniform", against="hetlora") == ("hetlora", "uniform")
    assert reference_of("hetlora", "uniform", against="hetlora") is None
    fake_run(grid, "hetlora", "uniform", 0, [3.0, 2.0], rouge=20.0, per_client={"c1": 0.1, "c2": 0.1})
    fake_run(grid, "hetlora", "uniform", 1, [3.0, 2.5], rouge=20.0, per_client={"c1": 0.1, "c2": 0.1})
    records, _ = collect_runs([grid])
    rows = {(r.label, r.distribution): r for r in summarize(records, against="hetlora")}
    flex = rows[("flexlora", "uniform")]
    assert (flex.baseline, flex.reference_distribution) == ("hetlora", "uniform")
    # flexlora 1.8, 2.0 vs hetlora 2.0, 2.5 at the same seeds; per client: -0.2 - 0.1 etc., all negative
    assert flex.diff["loss"] == pytest.approx([-0.2, -0.5]) and flex.rel["rougeL"] == pytest.approx(
        [10.0, 20.0]
    )
    assert flex.n_pairs["loss"] == 4 and flex.p_clients["loss"] == pytest.approx(2 / 16)
    assert rows[("fedit", "homo")].rel == {} and rows[("hetlora", "uniform")].baseline is None
    assert main(["report", str(grid), "--against", "hetlora", "--out", str(grid / "h2h"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "**loss** vs hetlora at the same distribution" in out
    assert "| flexlora | uniform | hetlora (uniform) | 2 |" in out


def test_last_n_evaluations_are_averaged(grid):
    records, _ = collect_runs([grid], last=2)
    fedit0 = next(r for r in records if r.label == "fedit" and r.seed == 0)
    assert fedit0.scores["loss"] == pytest.approx(2.5)  # rounds 1 and 2, never the base model's round 0
    assert fedit0.scores["rougeL"] == 20.0  # only the last round generated


def test_report_files_and_cli(grid, capsys):
    report = build_report([grid], grid / "report")
    names = {p.name for p in report["files"]}
    assert {"results.md", "results.csv", "per_category.csv"} <= names
    assert {"loss_by_round.png", "spectrum_by_round.png", "energy_beyond_min_rank.png"} <= names
    assert "improvement_by_category_loss.png" in names
    assert all(p.stat().st_size > 0 for p in report["files"])
    text = (grid / "report" / "results.md").read_text()
    assert "5 finished runs of 7 planned cells" in text and "| flexlora | uniform | 2 |" in text
    rows = list(csv.DictReader(open(grid / "report" / "results.csv")))
    flex = next(r for r in rows if r["method"] == "flexlora")
    assert float(flex["loss_rel_mean"]) == pytest.approx(15.0) and flex["seeds"] == "0 1"
    assert main(["report", str(grid), "--out", str(grid / "r2"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "**loss** vs the paired homogeneous baseline" in out and "5 finished runs of 7 planned" in out
    assert main(["report", str(grid / "nope")]) == 2


def test_kept_records_rebuild_the_same_tables_and_new_runs_replace_archived_ones(grid, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    assert main(["report", str(grid), "--out", str(out), "--no-plots", "--keep-records"]) == 0
    kept = out / "records"
    assert (kept / "plan.json").is_file() and (
        kept / "fedit@r200" / "r200" / "seed0" / "metrics.jsonl"
    ).is_file()
    assert not (kept / "flexlora" / "uniform" / "seed2").exists()  # unfinished runs are not kept
    first = (out / "results.csv").read_text()
    again = tmp_path_factory.mktemp("again")
    assert main(["report", str(kept), "--out", str(again), "--no-plots"]) == 0
    assert (again / "results.csv").read_text() == first
    # a rerun of one cell listed before the archive wins; the archive's other cells still count
    new = tmp_path_factory.mktemp("new")
    fake_run(new, "fedit@r200", "r200", 0, [3.0, 1.2], rouge=31.0)
    records, plan = collect_runs([new, kept])
    assert len(records) == 5 and len(plan["cells"]) == 7
    assert next(r for r in records if r.label == "fedit@r200").scores["loss"] == 1.2
    (new / "plan.json").write_text(json.dumps({"cells": [{}] * 9}))  # the newer comparison's plan wins too
    assert len(collect_runs([new, kept])[1]["cells"]) == 9
    # and rewriting the archive from itself plus the new run keeps exactly the table's runs
    assert main(["report", str(new), str(kept), "--out", str(out), "--no-plots", "--keep-records"]) == 0
    assert sorted(p.parent.relative_to(kept).as_posix() for p in kept.rglob("metrics.jsonl")) == [
        "fedit/homo/seed0",
        "fedit/homo/seed1",
        "fedit@r200/r200/seed0",
        "flexlora/uniform/seed0",
        "flexlora/uniform/seed1",
    ]
    assert '"loss": 1.2' in (kept / "fedit@r200" / "r200" / "seed0" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("lines, figure_legend", [(3, False), (8, True)])
def test_many_lines_share_one_figure_legend(lines, figure_legend):
    from flexlora.plots import _grid, _legends

    fig, axes = _grid(2)
    for ax in axes:
        for i in range(lines):
            ax.plot([0, 1], [i, i], label=f"method{i}")
    _legends(fig, axes)
    assert len(fig.legends) == int(figure_legend)
    assert all((ax.get_legend() is None) == figure_legend for ax in axes)
    if figure_legend:  # one entry per method, not one per subplot
        assert [t.get_text() for t in fig.legends[0].get_texts()] == [f"method{i}" for i in range(lines)]
