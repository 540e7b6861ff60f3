"""Report pairing and statistics by hand (relative improvement, seed-level CI and tests, Holm, the
secondary client-level test), legacy metric names, and the report's files, on run directories written by
hand (no training)."""

from __future__ import annotations

import csv
import json
import math

import pytest

from flexlora.cli import main
from flexlora.report import (
    baseline_of,
    build_report,
    collect_runs,
    normalize_eval,
    reference_of,
    summarize,
)
from helpers.report_runs import fake_run


def test_baselines():
    assert baseline_of("flexlora") == "fedit" and baseline_of("hetlora", "fedavg") == "fedavg"
    assert baseline_of("slora+flexlora") == "slora" and baseline_of("fedit@r200") == "fedit"
    assert baseline_of("fedit") is None and baseline_of("slora") is None


# ---------------------------------------------------------------------------------------------- fake runs
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
    assert flex.rel["rougeL_unstemmed"] == pytest.approx([100 * 2 / 19, -100 / 24])
    # seed level: d = -0.2, -0.5 (2 seeds, both better); t on 1 df: p = 1 - (2 / pi) atan(0.35 / 0.15)
    t = flex.seed_diff["loss"]
    assert flex.better["loss"] == 2 and t.mean == pytest.approx(-0.35) and t.p_sign == pytest.approx(2 / 4)
    assert t.p_t == pytest.approx(1 - 2 / math.pi * math.atan(0.35 / 0.15))
    assert t.ci[1] == pytest.approx(-0.35 + math.tan(0.475 * math.pi) * 0.15)
    assert flex.holm_t["loss"] == pytest.approx(t.p_t)  # the only seed-level test of the loss table
    # secondary, per-(seed, client) differences: seed 0: -0.3, -0.3; seed 1: -0.6, -0.6 -> all negative
    assert flex.clients["loss"].n == 4 and flex.clients["loss"].p == pytest.approx(2 / 16)
    assert flex.category_rel["loss"]["qa"] == pytest.approx((100 * 0.2 / 1.9 + 100 * 0.5 / 2.4) / 2)
    assert flex.category_gain["loss"]["qa"] == pytest.approx((0.2 + 0.5) / 2)  # b - m: > 0 is better
    ref = rows[("fedit@r200", "r200")]
    assert ref.baseline == "fedit" and ref.rel["loss"] == pytest.approx([25.0])
    # one paired seed: nothing to test over seeds, and no member of the Holm family
    assert "loss" in ref.clients and math.isnan(ref.seed_diff["loss"].p_t) and math.isnan(ref.holm_t["loss"])
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
    assert flex.clients["loss"].n == 4 and flex.clients["loss"].p == pytest.approx(2 / 16)
    assert rows[("fedit", "homo")].rel == {} and rows[("hetlora", "uniform")].baseline is None
    assert main(["report", str(grid), "--against", "hetlora", "--out", str(grid / "h2h"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "**loss** vs hetlora at the same distribution" in out
    assert "| flexlora | uniform | hetlora (uniform) | 2 |" in out


def test_holm_adjusts_the_seed_level_p_values_within_each_table(grid):
    fake_run(grid, "hetlora", "uniform", 0, [3.0, 2.2], rouge=20.0)
    fake_run(grid, "hetlora", "uniform", 1, [3.0, 2.4], rouge=20.0)
    rows = {(r.label, r.distribution): r for r in summarize(collect_runs([grid])[0])}
    flex, het = rows[("flexlora", "uniform")], rows[("hetlora", "uniform")]
    # loss vs fedit (2.0, 2.5): flexlora d = -0.2, -0.5 (|t| = 7/3), hetlora d = 0.2, -0.1 (|t| = 1/3), 1 df
    p_flex = 1 - 2 / math.pi * math.atan(7 / 3)
    p_het = 1 - 2 / math.pi * math.atan(1 / 3)
    assert flex.seed_diff["loss"].p_t == pytest.approx(p_flex) and het.seed_diff["loss"].p_t == pytest.approx(
        p_het
    )
    # Holm over the two: the smaller times 2, the larger times 1 (kept >= the first)
    assert flex.holm_t["loss"] == pytest.approx(2 * p_flex) and het.holm_t["loss"] == pytest.approx(p_het)
    assert het.better["loss"] == 1 and flex.better["loss"] == 2  # hetlora: 2.4 < 2.5 at seed 1 only
    assert flex.holm_sign["loss"] == pytest.approx(1.0)  # 2 * 0.5 capped at 1


def test_legacy_records_are_read_with_renamed_metrics_and_the_gap_is_said(tmp_path):
    ev = {"rougeL": 3.0, "proxy_rougeL": 4.0, "per_client": {"a": {"rougeL": 1.0, "proxy_rougeL": 2.0}}}
    assert normalize_eval(ev) == {
        "rougeL_unstemmed": 3.0,
        "tf_argmax_rougeL": 4.0,
        "per_client": {"a": {"rougeL_unstemmed": 1.0, "tf_argmax_rougeL": 2.0}},
    }
    new = {"rougeL": 5.0, "rougeL_unstemmed": 4.0, "tf_argmax_rougeL": 1.0}
    assert normalize_eval(dict(new)) == new
    clients = {f"c{i}": 0.01 * i for i in range(10)}  # 10 clients x 2 seeds = 20 pairs: Monte Carlo
    for seed, (base, flex) in enumerate([(2.0, 1.8), (2.5, 2.0)]):
        fake_run(tmp_path, "fedit", "homo", seed, [3.0, base], rouge=20.0, per_client=clients, legacy=True)
        fake_run(
            tmp_path, "flexlora", "uniform", seed, [3.0, flex], rouge=22.0, per_client=clients, legacy=True
        )
    records, _ = collect_runs([tmp_path])
    assert all(r.scores["rougeL"] is None and r.scores["tf_argmax_rougeL"] == 12.0 for r in records)
    assert {r.scores["rougeL_unstemmed"] for r in records} == {20.0, 22.0}
    build_report([tmp_path], tmp_path / "report", plots=False)
    text = (tmp_path / "report" / "results.md").read_text()
    assert "lack it. In 0 of 4 runs here." in text and "| Rouge-L (unstemmed) |" in text
    assert "**Rouge-L (unstemmed)** vs" in text and "**Rouge-L (NI scorer)** vs" not in text
    # every per-client loss difference is negative: no draw is as extreme, and the table says only a bound
    assert "≤ 1/20001 (n=20, MC 20000 draws, none as extreme)" in text and "<0.001" not in text


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
    # runs.csv: the per-seed numbers; flexlora seed 0 (loss 1.8; clients 1.8, 1.6) vs fedit (2.0; 2.1, 1.9)
    runs = {(r["method"], r["seed"]): r for r in csv.DictReader(open(grid / "report" / "runs.csv"))}
    assert len(runs) == 5 and "runs.csv" in names
    run = runs[("flexlora", "0")]
    assert run["reference"] == "fedit (homo)" and float(run["loss_diff"]) == pytest.approx(-0.2)
    assert float(run["loss_rel_pct"]) == pytest.approx(10.0)
    assert run["loss_clients_better"] == "2/2" and run["rougeL_clients_better"] == "2/2"  # 22 > 20
    # final spectrum (round 2): top singular values 3/2, 1/2, 0; energy beyond the smallest rank 0.1 * 2
    assert float(run["q_proj_top_sv"]) == 1.5 and float(run["q_proj_norm_top16"]) == pytest.approx(
        math.sqrt(2.5)
    )
    assert float(run["energy_beyond_min_rank_all_modules"]) == pytest.approx(0.2)
    assert runs[("fedit", "0")]["reference"] == "" and runs[("fedit", "0")]["loss_diff"] == ""
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
