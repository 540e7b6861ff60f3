"""The regime curve over a sweep written by hand (no training): paired seed-level gaps of each X@RANK
against X per point, Holm over the table, "not testable" below 2 paired seeds, and the files of
``flexlora report DIR --sweep`` on a partial sweep (cells unfinished or not started)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml
from scipy import stats

from flexlora.cli import main
from flexlora.regime import regime_gaps, sweep_dirs
from helpers.report_runs import fake_run


def plan(point, cells):
    point.mkdir(parents=True, exist_ok=True)
    (point / "plan.json").write_text(json.dumps({"cells": [{"label": lb, "key": k} for lb, k in cells]}))


@pytest.fixture
def sweep(tmp_path):
    labels = [("fedit", "homo"), ("fedit@r200", "r200"), ("fedit@r30", "r30")]
    for steps in (4, 8, 16):
        plan(tmp_path / f"steps={steps}", [(lb, f"{lb}/{d}/seed{s}") for lb, d in labels for s in range(3)])
    p4, p8 = tmp_path / "steps=4", tmp_path / "steps=8"
    for s, (b, m, rb, rm) in enumerate([(2.0, 1.8, 20, 22), (2.5, 2.1, 25, 26), (2.2, 2.1, 22, 23)]):
        fake_run(p4, "fedit", "homo", s, [3.0, b], rouge=rb)
        fake_run(p4, "fedit@r200", "r200", s, [3.0, m], rouge=rm)
    fake_run(p4, "fedit@r30", "r30", 0, [3.0, 1.9], rouge=21)  # one seed: not testable
    for s, (b, m) in enumerate([(2.0, 1.0), (2.4, 1.5)]):
        fake_run(p8, "fedit", "homo", s, [3.0, b])
        fake_run(p8, "fedit@r200", "r200", s, [3.0, m])
    fake_run(p8, "fedit@r30", "r30", 0, [3.0, 9.9], finished=False)  # still running
    config = p4 / "cells/fedit/homo/seed0/config.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["federation"] |= {"clients_per_round": 4}
    raw["train"] = {"steps": 4, "batch_size": 4}
    config.write_text(yaml.safe_dump(raw))
    (tmp_path / "notes").mkdir()  # not a point
    return tmp_path


def test_gaps_pair_seeds_per_point_and_holm_covers_the_table(sweep):
    assert [n for n, _ in sweep_dirs(sweep)] == ["steps=4", "steps=8", "steps=16"]  # by value, not name
    gaps = regime_gaps(sweep)
    assert [g.metric for g in gaps] == ["loss"] * 6 + ["rougeL"] * 6
    loss = {(g.point, g.label): g for g in gaps if g.metric == "loss"}
    g4 = loss[("steps=4", "fedit@r200")]
    assert g4.x == 4 and g4.examples == 2 * 4 * 4 * 4 and g4.done == (3, 3, 3, 3)
    assert g4.diffs == pytest.approx((-0.2, -0.4, -0.1))
    p4 = stats.ttest_rel([1.8, 2.1, 2.1], [2.0, 2.5, 2.2]).pvalue
    assert g4.test.mean == pytest.approx(-0.7 / 3) and g4.test.p_t == pytest.approx(p4)
    half = stats.t.ppf(0.975, 2) * stats.tstd([-0.2, -0.4, -0.1]) / math.sqrt(3)
    assert g4.test.ci == pytest.approx((-0.7 / 3 - half, -0.7 / 3 + half))
    g8 = loss[("steps=8", "fedit@r200")]
    p8 = stats.ttest_rel([1.0, 1.5], [2.0, 2.4]).pvalue
    assert g8.diffs == pytest.approx((-1.0, -0.9)) and g8.test.p_t == pytest.approx(p8)
    # Holm over the two tested rows of the loss table, by hand
    low, high = sorted([p4, p8])
    holm = {low: min(1, 2 * low), high: min(1, max(2 * low, high))}
    assert g4.holm == pytest.approx(holm[p4]) and g8.holm == pytest.approx(holm[p8])
    # below 2 paired seeds: no test, out of the Holm family
    one, running, empty = (
        loss[k] for k in [("steps=4", "fedit@r30"), ("steps=8", "fedit@r30"), ("steps=16", "fedit@r200")]
    )
    assert one.diffs == pytest.approx((-0.1,)) and one.test is None and math.isnan(one.holm)
    assert running.done == (0, 3, 2, 3) and running.diffs == () and running.test is None
    assert empty.done == (0, 3, 0, 3) and empty.examples is None
    rouge = {(g.point, g.label): g for g in gaps if g.metric == "rougeL"}
    assert rouge[("steps=4", "fedit@r200")].diffs == pytest.approx((2, 1, 1))
    assert rouge[("steps=8", "fedit@r200")].test is None  # those runs have no Rouge-L


def test_report_sweep_writes_the_table_csv_and_plot(sweep, tmp_path, capsys):
    out = tmp_path / "regime"
    assert main(["report", str(sweep), "--sweep", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| steps=4 | 128 | fedit@r200 - fedit | 3/3, 3/3 | 3 | -0.2333 [" in text
    assert (
        "| steps=16 | - | fedit@r30 - fedit | 0/3, 0/3 | 0 | - | - | - | not testable (0 paired seed(s), 2 needed) |"
        in text
    )
    assert "| steps=4 | 128 | fedit@r30 - fedit | 1/3, 3/3 | 1 | -0.1000 (one seed) |" in text
    assert "Holm: adjusted over the 2 tested row(s)" in text
    rows = list(csv.DictReader(open(out / "regime.csv")))
    assert len(rows) == 12 and rows[0]["diffs"] == "-0.2 -0.4 -0.1" and rows[0]["paired_seeds"] == "3"
    assert rows[1]["p_t"] == "" and rows[1]["verdict"].startswith("not testable")
    assert (out / "regime_loss.png").stat().st_size > 0 and (out / "regime_rougeL.png").is_file()
    assert main(["report", str(tmp_path / "regime"), "--sweep"]) == 2  # no key=value point in it
    assert "no sweep point" in capsys.readouterr().err
