"""Crash safety: real ``flexlora run`` processes killed with SIGKILL at named points, then resumed with
``flexlora run --resume``, end bit-for-bit where an uninterrupted run ends.

Each process runs the CLI through a small driver that makes it SIGKILL itself at the ``n``-th call of a
named point (``FLEXLORA_KILL_AT=point:n``), so the kills land exactly where they are meant to, with no
test hook in the package. Two run directories (``a``, ``b``) are killed again and again, each resume at the
next point, and resumed to the end; both must match an uninterrupted run (``straight``):

==========  =========================================================================================
a eval:1    during the round-0 evaluation, before any checkpoint exists (the resume starts over)
a train:3   during local training: the 3rd optimizer step (round 1, second client)
a aggr:2    during aggregation: the 2nd module's SVD of round 1
b write:2   while writing round 1's checkpoint (the 1st write is round 0's): ``global.safetensors``
            written into the temporary directory, ``server.json`` not yet
b swap:2    round 2's save, between moving the old checkpoint aside and renaming the new one in
b placed:2  round 2's save, after the new checkpoint is in place, before the old one is removed (the
            1st such rename in that process is the resume putting ``.checkpoint.old`` back)
==========  =========================================================================================
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexlora.core.safetensors_io import read_safetensors

DRIVER = r"""
import os, pathlib, signal, sys

point, nth = os.environ.get("FLEXLORA_KILL_AT", "none:0").split(":")
nth, seen = int(nth), [0]


def hit():
    seen[0] += 1
    if seen[0] == nth:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def wrap(owner, name, after=False, when=lambda *a, **k: True):
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if not after and when(*args, **kwargs):
            hit()
        out = real(*args, **kwargs)
        if after and when(*args, **kwargs):
            hit()
        return out

    setattr(owner, name, wrapper)


if point == "eval":
    import flexlora.evaluation as m
    wrap(m, "evaluate_clients")
elif point == "train":
    import torch
    wrap(torch.optim.AdamW, "step")
elif point == "aggregate":
    from flexlora.core.lowrank_sum import LowRankSum
    wrap(LowRankSum, "svd")
elif point == "write":
    import flexlora.checkpoint as m
    wrap(m, "write_safetensors", after=True)
elif point == "swap":
    wrap(pathlib.Path, "rename", after=True, when=lambda src, dst: src.name == "checkpoint")
elif point == "placed":
    wrap(pathlib.Path, "rename", after=True, when=lambda src, dst: pathlib.Path(dst).name == "checkpoint")

from flexlora.cli import main

sys.exit(main(sys.argv[1:]))
"""

CONFIG = """\
model: {name: tiny, target_modules: [q_proj, v_proj]}
data: {path: synthetic, options: {num_clients: 6, examples_per_client: 8, seed: 0}, num_heldout: 1}
federation: {method: flexlora, distribution: uniform, rounds: 2, clients_per_round: 2}
train: {steps: 2, batch_size: 2, max_length: 32, optimizer: adamw}
eval: {max_examples_per_client: 1, max_new_tokens: 2, generate: false}
"""
CHAINS = {"a": ["eval:1", "train:3", "aggregate:2"], "b": ["write:2", "swap:2", "placed:2"]}


def _launch(tmp_path: Path, args: list[str], kill_at: str | None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env.pop("FLEXLORA_KILL_AT", None)
    if kill_at:
        env["FLEXLORA_KILL_AT"] = kill_at
    return subprocess.Popen(
        [sys.executable, str(tmp_path / "driver.py"), "run", *args, "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.mark.timeout(900)
def test_sigkill_at_every_point_then_resume_matches_an_uninterrupted_run(tmp_path):
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "c.yaml").write_text(CONFIG)
    start = [str(tmp_path / "c.yaml"), "--set", f"output_dir={tmp_path}"]
    straight = _launch(tmp_path, [*start, "--set", "name=straight"], None)
    # two run directories killed side by side (each step's processes run in parallel), then resumed to the end
    leftovers: dict[str, list[tuple[bool, list[str]]]] = {name: [] for name in CHAINS}
    for step in range(max(map(len, CHAINS.values())) + 1):
        procs = {}
        for name, chain in CHAINS.items():
            args = [*start, "--set", f"name={name}"] if step == 0 else ["--resume", str(tmp_path / name)]
            if step <= len(chain):
                procs[name] = (
                    chain[step] if step < len(chain) else None,
                    _launch(tmp_path, args, None if step == len(chain) else chain[step]),
                )
        for name, (point, proc) in procs.items():
            code, out = _finish(proc)
            assert code == (-9 if point else 0), f"{name} at {point}: exited {code}:\n{out[-3000:]}"
            run_dir = tmp_path / name
            left = sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".checkpoint"))
            leftovers[name].append(((run_dir / "checkpoint").is_dir(), left))
    # each kill left behind what it was meant to: every window of a save was really hit
    assert leftovers["a"][0] == (False, [])  # killed before the first checkpoint
    b = leftovers["b"]
    assert b[0][0] and any(n != ".checkpoint.old" for n in b[0][1])  # a half-written temporary directory
    assert not b[1][0] and ".checkpoint.old" in b[1][1]  # between the two renames: no checkpoint/
    assert b[2][0] and ".checkpoint.old" in b[2][1]  # placed, old one not yet removed
    code, out = _finish(straight)
    assert code == 0, out[-3000:]

    reference = tmp_path / "straight"
    ref_lines = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    adapters = sorted(p.name for p in (reference / "adapters").iterdir())
    for name in CHAINS:
        run_dir = tmp_path / name
        a = read_safetensors(reference / "checkpoint" / "global.safetensors")
        b = read_safetensors(run_dir / "checkpoint" / "global.safetensors")
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
        assert "full" in adapters and adapters == sorted(p.name for p in (run_dir / "adapters").iterdir())
        for adapter in adapters:
            x = read_safetensors(reference / "adapters" / adapter / "adapter_model.safetensors")
            y = read_safetensors(run_dir / "adapters" / adapter / "adapter_model.safetensors")
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (name, adapter)
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [m["round"] for m in lines] == [0, 1, 2]
        assert [m["eval"]["loss"] for m in lines] == [m["eval"]["loss"] for m in ref_lines]
        assert not [p for p in run_dir.iterdir() if p.name.startswith(".checkpoint")]
