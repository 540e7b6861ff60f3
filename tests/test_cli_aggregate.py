"""``flexlora aggregate``: the command-line contract, end to end on PEFT directories."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from flexlora.cli import main
from flexlora.core.adapter_io import read_adapter, write_adapter
from flexlora.core.lora import LoraFactors
from flexlora.core.safetensors_io import read_safetensors, write_safetensors
from helpers.models import tiny_llama_model

SHAPES = {  # the q/v/gate projections of the tiny Llama in conftest
    **{f"model.layers.{i}.self_attn.q_proj": (32, 32) for i in range(2)},
    **{f"model.layers.{i}.self_attn.v_proj": (16, 32) for i in range(2)},
    **{f"model.layers.{i}.mlp.gate_proj": (64, 32) for i in range(2)},
}


def _client(path, rank, alpha=16.0, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    factors = {
        n: LoraFactors(torch.randn(rank, k, generator=gen), torch.randn(d, rank, generator=gen) / 10, alpha)
        for n, (d, k) in shapes.items()
    }
    write_adapter(path, factors, base_model="tiny")
    return factors


@pytest.fixture
def clients(tmp_path):
    specs = [(2, 16.0), (4, 16.0), (8, 32.0)]
    return [(tmp_path / f"c{i}", _client(tmp_path / f"c{i}", r, a, seed=i)) for i, (r, a) in enumerate(specs)]


def test_aggregate_writes_best_rank_r_adapters(tmp_path, clients, capsys):
    out = tmp_path / "out"
    weights = [10, 30, 60]
    code = main(
        ["aggregate", *[str(p) for p, _ in clients], "--out", str(out), "--rank", "4", "--rank", "20"]
        + ["--weights", ",".join(map(str, weights))]
    )
    assert code == 0
    assert "aggregated 3 clients x 6 modules" in capsys.readouterr().out
    p = [w / sum(weights) for w in weights]
    rank4, cfg4 = read_adapter(out / "rank-4")
    rank20, _ = read_adapter(out / "rank-20")
    assert cfg4.lora_alpha == 32.0  # clients disagree: the largest alpha
    for name in SHAPES:
        dW = sum(pi * f[name].delta() for pi, (_, f) in zip(p, clients, strict=True))
        U, S, Vh = torch.linalg.svd(dW)
        best4 = U[:, :4] * S[:4] @ Vh[:4]
        torch.testing.assert_close(rank4.modules[name].delta(), best4, rtol=1e-4, atol=1e-5)
        # rank 20 >= sum of ranks (14) where the module allows it: exact; v_proj clips to 16 >= 14 too.
        torch.testing.assert_close(rank20.modules[name].delta(), dW, rtol=1e-4, atol=1e-5)
        assert rank20.modules[name].rank == min(20, *SHAPES[name])
    summary = json.loads((out / "aggregate.json").read_text())
    assert summary["weights"] == weights and summary["ranks"] == [4, 20]


def test_randomized_streams_many_clients_within_one_percent_of_the_best_truncation(tmp_path):
    dirs = [tmp_path / f"c{i}" for i in range(6)]
    clients = [_client(path, 8, seed=i) for i, path in enumerate(dirs)]  # R = 48 > min(d, k): folded dense
    out = tmp_path / "out"
    assert main(["aggregate", *map(str, dirs), "--out", str(out), "--rank", "4", "--randomized"]) == 0
    rank4, _ = read_adapter(out / "rank-4")
    for name in SHAPES:
        dW = sum(f[name].delta() for f in clients) / len(clients)
        optimal = torch.linalg.svdvals(dW)[4:].norm()
        assert (rank4.modules[name].delta() - dW).norm() <= 1.01 * optimal
    assert json.loads((out / "aggregate.json").read_text())["aggregator"]["top"] == 4


def test_output_loads_in_peft(tmp_path, clients):
    out = tmp_path / "out"
    assert main(["aggregate", *[str(p) for p, _ in clients], "--out", str(out), "--rank", "20"]) == 0
    model = PeftModel.from_pretrained(tiny_llama_model(), out / "rank-20")
    assert model.peft_config["default"].rank_pattern  # v_proj clipped to 16 travels via rank_pattern


@pytest.mark.parametrize("method", ["fedavg", "hetlora", "flora", "ffa"])
def test_other_methods(tmp_path, method):
    dirs = [tmp_path / f"c{i}" for i in range(2)]
    first = _client(dirs[0], 4, seed=0)
    if method == "ffa":  # a frozen shared A: clients differ only in B
        gen = torch.Generator().manual_seed(5)
        write_adapter(
            dirs[1],
            {n: LoraFactors(f.A, torch.randn(f.B.shape, generator=gen), 16.0) for n, f in first.items()},
        )
    else:
        _client(dirs[1], 4, seed=1)
    code = main(
        ["aggregate", *map(str, dirs), "--out", str(tmp_path / "o"), "--rank", "4", "--method", method]
    )
    assert code == 0
    exact = 0.5 * sum(read_adapter(d)[0].modules["model.layers.0.mlp.gate_proj"].delta() for d in dirs)
    got = read_adapter(tmp_path / "o" / "rank-4")[0].modules["model.layers.0.mlp.gate_proj"]
    if method in ("flora", "ffa"):  # exact aggregation rules
        torch.testing.assert_close(got.delta(), exact, rtol=1e-4, atol=1e-5)
    assert got.rank == (8 if method == "flora" else 4)


def _fails(tmp_path, capsys, dirs, match, extra=()):
    out = tmp_path / "out"
    code = main(["aggregate", *map(str, dirs), "--out", str(out), "--rank", "4", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert match in err, err
    assert not out.exists()
    return err


def test_nan_client_refused_and_nothing_written(tmp_path, clients, capsys):
    bad = clients[1][0] / "adapter_model.safetensors"
    tensors = read_safetensors(bad)
    key = "base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight"
    tensors[key][0, 0] = float("nan")
    write_safetensors(bad, tensors)
    err = _fails(tmp_path, capsys, [p for p, _ in clients], "NaN or Inf")
    assert str(clients[1][0]) in err and key in err


def test_shape_mismatch_between_clients_refused(tmp_path, clients, capsys):
    other = tmp_path / "other"
    _client(other, 2, shapes={**SHAPES, "model.layers.0.mlp.gate_proj": (48, 32)})
    err = _fails(tmp_path, capsys, [clients[0][0], other], "has shape (48, 32)")
    assert "gate_proj" in err and str(other) in err


def test_different_module_sets_refused(tmp_path, clients, capsys):
    other = tmp_path / "other"
    _client(other, 2, shapes={k: v for k, v in SHAPES.items() if "gate" not in k})
    _fails(tmp_path, capsys, [clients[0][0], other], "module set differs")


def test_fedavg_rank_mismatch_refused(tmp_path, clients, capsys):
    _fails(tmp_path, capsys, [p for p, _ in clients], "needs one rank per module", ["--method", "fedavg"])


def test_weights_count_must_match(tmp_path, clients, capsys):
    _fails(tmp_path, capsys, [p for p, _ in clients], "--weights has 2 values", ["--weights", "1,2"])


def test_existing_output_untouched_on_failure(tmp_path, clients, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".flexlora-aggregate").write_text("{}")  # an earlier output, replaceable with --overwrite
    (out / "keep.txt").write_text("previous result")
    (clients[0][0] / "adapter_config.json").unlink()
    code = main(["aggregate", *[str(p) for p, _ in clients], "--out", str(out), "--rank", "4", "--overwrite"])
    assert code == 2 and "missing adapter_config.json" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "previous result"


def test_console_entry_point_exit_code(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flexlora.cli",
            "aggregate",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o"),
        ]
        + ["--rank", "4"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"flexlora: error: {tmp_path / 'nope'}: not an adapter directory"
