"""Server checkpoints: everything a round needs, as safetensors + JSON, written atomically.

``RUN_DIR/checkpoint/`` holds ``global.safetensors`` (the global state's factors) and ``server.json``
(completed round, method, metrics so far, rank assignment, resolved config). Every random choice of a run
is derived from ``(seed, round, client)``, so no RNG state needs saving: resuming from round ``t`` replays
rounds ``t+1...`` exactly as an uninterrupted run would. Nothing is ever unpickled.

Crash safety: a save writes a temporary sibling directory, fsyncs it, moves the old checkpoint aside to
``.checkpoint.old``, renames the new one into place and removes the old one (see
:class:`~flexlora.core.adapter_io.atomic_directory`). A process killed at any point leaves either
``checkpoint/`` (complete) or, killed between the two renames, only ``.checkpoint.old`` (complete), which
:func:`load_checkpoint` then reads and :func:`recover_checkpoint` (run by a resume) puts back, so a resume
always finds the last completed round.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flexlora.core.adapter_io import atomic_directory
from flexlora.core.aggregators import GlobalState
from flexlora.core.errors import AdapterError, AggregationError
from flexlora.core.safetensors_io import read_safetensors, write_safetensors

__all__ = ["ServerState", "save_checkpoint", "load_checkpoint", "recover_checkpoint", "CHECKPOINT_DIR"]

CHECKPOINT_DIR = "checkpoint"


@dataclass
class ServerState:
    """The server between rounds: ``round`` rounds are complete and ``global_state`` is their result."""

    round: int
    global_state: GlobalState
    assignment: dict[str, str]
    metrics: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(run_dir: str | os.PathLike, state: ServerState, config: dict[str, Any]) -> Path:
    """Write ``RUN_DIR/checkpoint`` atomically (temporary directory, fsync, rename)."""
    target = Path(run_dir) / CHECKPOINT_DIR
    with atomic_directory(target) as tmp:
        write_safetensors(tmp / "global.safetensors", state.global_state.to_tensors())
        server = {
            "round": state.round,
            "method": state.global_state.method,
            "assignment": state.assignment,
            "metrics": state.metrics,
            "config": config,
        }
        (tmp / "server.json").write_text(json.dumps(server, indent=1) + "\n")
    return target


def recover_checkpoint(run_dir: str | os.PathLike) -> bool:
    """Repair what a save killed midway left behind; returns whether ``RUN_DIR/checkpoint`` now exists.

    Without ``checkpoint/`` but with ``.checkpoint.old/`` (killed between the two renames), the old one is
    renamed back: it is the last completed round. Unfinished temporary directories and a superseded
    ``.checkpoint.old`` are removed. Call it only while no other process writes to ``run_dir``.
    """
    run_dir = Path(run_dir)
    target, old = run_dir / CHECKPOINT_DIR, run_dir / f".{CHECKPOINT_DIR}.old"
    if not target.exists() and (old / "server.json").is_file():
        old.rename(target)
    for leftover in run_dir.glob(f".{CHECKPOINT_DIR}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    return (target / "server.json").is_file()


def load_checkpoint(run_dir: str | os.PathLike) -> tuple[ServerState, dict[str, Any]]:
    """Read ``RUN_DIR/checkpoint`` (or ``.checkpoint.old`` left by a save killed between its renames); returns
    the server state and the config it was saved with. Reads only, never repairs.

    Raises:
        AdapterError: if the checkpoint is missing or malformed.
    """
    source = Path(run_dir) / CHECKPOINT_DIR
    if not source.exists() and (Path(run_dir) / f".{CHECKPOINT_DIR}.old" / "server.json").is_file():
        source = Path(run_dir) / f".{CHECKPOINT_DIR}.old"
    if not (source / "server.json").is_file():
        raise AdapterError(f"{source}: no checkpoint (server.json missing)")
    try:
        server = json.loads((source / "server.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AdapterError(f"{source / 'server.json'}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(server, dict):
        raise AdapterError(f"{source / 'server.json'}: not a JSON object")
    for key, kind in (
        ("round", int),
        ("method", str),
        ("assignment", dict),
        ("metrics", list),
        ("config", dict),
    ):
        if key not in server:
            raise AdapterError(f"{source / 'server.json'}: missing field {key!r}")
        if not isinstance(server[key], kind) or isinstance(server[key], bool) or server.get("round", 0) < 0:
            raise AdapterError(
                f"{source / 'server.json'}: field {key!r} must be a {kind.__name__} (round >= 0)"
            )
    tensors = read_safetensors(source / "global.safetensors")
    try:
        global_state = GlobalState.from_tensors(tensors, server["method"])
    except AggregationError as exc:
        raise AdapterError(f"{source / 'global.safetensors'}: {exc}") from None
    for name, lr in global_state.modules.items():
        if lr.B.ndim != 2 or lr.A.ndim != 2 or lr.B.shape[1] != lr.A.shape[0]:
            raise AdapterError(
                f"{source / 'global.safetensors'}: module {name!r}: B {tuple(lr.B.shape)} and A "
                f"{tuple(lr.A.shape)} do not form a product"
            )
        if not (torch.isfinite(lr.B).all() and torch.isfinite(lr.A).all()):
            raise AdapterError(f"{source / 'global.safetensors'}: module {name!r} has NaN or Inf values")
    state = ServerState(server["round"], global_state, dict(server["assignment"]), list(server["metrics"]))
    return state, server["config"]
