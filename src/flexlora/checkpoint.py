"""Server checkpoints: everything a round needs, as safetensors + JSON, written atomically.

``RUN_DIR/checkpoint/`` holds ``global.safetensors`` (the global state's factors) and ``server.json``
(completed round, method, metrics so far, rank assignment, resolved config). Every random choice of a run
is derived from ``(seed, round, client)``, so no RNG state needs saving: resuming from round ``t`` replays
rounds ``t+1...`` exactly as an uninterrupted run would. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexlora.core.adapter_io import atomic_directory
from flexlora.core.aggregators import GlobalState
from flexlora.core.errors import AdapterError
from flexlora.core.safetensors_io import read_safetensors, write_safetensors

__all__ = ["ServerState", "save_checkpoint", "load_checkpoint", "CHECKPOINT_DIR"]

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


def load_checkpoint(run_dir: str | os.PathLike) -> tuple[ServerState, dict[str, Any]]:
    """Read ``RUN_DIR/checkpoint``; returns the server state and the config it was saved with.

    Raises:
        AdapterError: if the checkpoint is missing or malformed.
    """
    source = Path(run_dir) / CHECKPOINT_DIR
    if not (source / "server.json").is_file():
        raise AdapterError(f"{source}: no checkpoint (server.json missing)")
    try:
        server = json.loads((source / "server.json").read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{source / 'server.json'}: not valid JSON ({exc.msg})") from None
    for key in ("round", "method", "assignment", "metrics", "config"):
        if key not in server:
            raise AdapterError(f"{source / 'server.json'}: missing field {key!r}")
    tensors = read_safetensors(source / "global.safetensors")
    state = ServerState(
        round=int(server["round"]),
        global_state=GlobalState.from_tensors(tensors, server["method"]),
        assignment=dict(server["assignment"]),
        metrics=list(server["metrics"]),
    )
    return state, server["config"]
