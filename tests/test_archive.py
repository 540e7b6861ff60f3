"""The rank-64 adapter archive: the best rank-q approximation by the numbers (Eckart-Young), written as a
PEFT adapter that reads back to it, kept on re-runs, refused over foreign directories, and written by a tiny
comparison (also for cells finished before the archive was set)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from flexlora.archive import archive_run, truncate_state
from flexlora.checkpoint import ServerState, save_checkpoint
from flexlora.cli import main
from flexlora.core.adapter_io import read_adapter
from flexlora.core.aggregators.base import GlobalState
from flexlora.core.errors import AdapterError
from flexlora.core.lora import LowRank
from flexlora.core.output_dirs import OutputError
from helpers.configs import tiny_base


def finished_run(tmp_path, round_=3, rounds=3):
    """A run directory whose checkpoint holds two modules: rank 80 (cut to 64) and rank 5 (kept whole)."""
    gen = torch.Generator().manual_seed(0)
    modules = {
        "layers.0.q_proj": LowRank(torch.randn(100, 80, generator=gen), torch.randn(80, 90, generator=gen)),
        "layers.0.v_proj": LowRank(torch.randn(40, 5, generator=gen), torch.randn(5, 90, generator=gen)),
    }
    config = {
        "federation": {"rounds": rounds, "method": "fedit"},
        "model": {"name": "tiny", "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    }
    run = tmp_path / "run"
    save_checkpoint(run, ServerState(round_, GlobalState(modules, "fedavg"), {}, []), config)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run, modules


def test_the_archive_is_the_best_rank_64_approximation(tmp_path):
    run, modules = finished_run(tmp_path)
    assert "archived at rank <= 64" in archive_run(run, tmp_path / "arch")
    update, config = read_adapter(tmp_path / "arch" / "adapter")
    info = json.loads((tmp_path / "arch" / "archive.json").read_text())
    assert config.base_model_name_or_path == "tiny" and (tmp_path / "arch" / "config.yaml").is_file()
    for name, lr in modules.items():
        dW = (lr.B @ lr.A).double()
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        q = min(64, lr.rank)
        best = U[:, :q] @ torch.diag(S[:q]) @ Vh[:q]  # Eckart-Young: the best rank-q approximation
        archived = update.modules[name].delta().double()
        assert update.modules[name].rank == info["modules"][name]["rank"] == q
        assert torch.allclose(archived, best, atol=1e-4 * S[0].item())
        # ||dW - dW_q||_F is the norm of the dropped singular values (0 for the rank-5 module)
        tail = torch.linalg.norm(dW - archived).item()
        assert tail == pytest.approx(S[q:].norm().item(), rel=1e-3, abs=1e-4 * S[0].item())
        assert info["modules"][name]["tail"] == pytest.approx(
            S[q:].norm().item(), rel=1e-4, abs=1e-6 * S[0].item()
        )
        assert info["modules"][name]["norm"] == pytest.approx(S.norm().item(), rel=1e-5)
    assert info["modules"]["layers.0.q_proj"]["tail"] > 0


def test_a_rerun_keeps_the_entry_and_foreign_or_unfinished_runs_are_refused(tmp_path):
    run, _ = finished_run(tmp_path)
    dest = tmp_path / "arch"
    archive_run(run, dest)
    before = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    assert archive_run(run, dest).startswith("archive kept")
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == before
    assert truncate_state(GlobalState({"m": LowRank(torch.zeros(4, 2), torch.zeros(2, 3))}, "x"))[1] == {
        "m": {"rank": 0, "norm": 0.0, "tail": 0.0}
    }
    (tmp_path / "mine").mkdir()
    with pytest.raises(OutputError, match="not an archive entry"):
        archive_run(run, tmp_path / "mine")
    unfinished, _ = finished_run(tmp_path / "u", round_=2)
    with pytest.raises(AdapterError, match="has not finished"):
        archive_run(unfinished, tmp_path / "arch2")


def test_a_comparison_archives_its_cells_also_those_finished_before(tmp_path, capsys):

    config, out = tiny_base(tmp_path), tmp_path / "cmp"
    raw = yaml.safe_load(config.read_text())
    raw["compare"]["seeds"] = 1
    config.write_text(yaml.safe_dump(raw))
    assert main(["compare", str(config), "--out", str(out), "--no-progress", "--no-report"]) == 0
    raw["compare"]["archive"] = str(tmp_path / "archive")
    config.write_text(yaml.safe_dump(raw))
    assert main(["compare", str(config), "--out", str(out), "--archive-only"]) == 0
    text = capsys.readouterr().out
    assert "fedit/homo/seed0: archived" in text and "flexlora/uniform/seed0: archived" in text
    entry = tmp_path / "archive" / "flexlora" / "uniform" / "seed0"
    update, _ = read_adapter(entry / "adapter")
    full, _ = read_adapter(out / "cells" / "flexlora" / "uniform" / "seed0" / "adapters" / "full")
    for name, f in full.modules.items():  # the tiny model's modules are at most 64 wide: nothing is cut
        assert torch.allclose(update.modules[name].delta(), f.delta(), atol=1e-5)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "archive").rglob("*")}
    assert main(["compare", str(config), "--out", str(out), "--no-progress", "--no-report"]) == 0
    assert "flexlora/uniform/seed0: archive kept" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "archive").rglob("*")} == before


def test_a_sweep_archives_each_point_apart_and_a_bad_archive_key_is_refused(tmp_path):
    from pathlib import Path

    from flexlora.compare import load_comparisons
    from flexlora.config import ConfigError

    path = tmp_path / "s.yaml"
    path.write_text(
        "model: {name: tiny}\n"
        "compare: {methods: [fedit], seeds: 1, out: OUT, archive: ARCH, sweep: {train.steps: [4, 16]}}\n"
    )
    assert [c.archive for c in load_comparisons(path)] == [Path("ARCH/steps=4"), Path("ARCH/steps=16")]
    path.write_text("model: {name: tiny}\ncompare: {methods: [fedit], seeds: 1, archive: [a]}\n")
    with pytest.raises(ConfigError, match="compare.archive: expected a directory"):
        load_comparisons(path)
