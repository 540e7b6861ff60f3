"""Server checkpoints: everything a round needs, as safetensors + JSON, written atomically.

``RUN_DIR/checkpoint/`` holds ``global.safetensors`` (the global state's factors), ``server.json``
(completed round, the method and the aggregator whose state it holds, e.g. ``fedit`` and ``fedavg``, metrics
so far, rank assignment, resolved config; a checkpoint from before ``state`` was recorded names the
aggregator as its method) and ``manifest.json`` (the size
and sha256 of both). A load checks the checkpoint whole before anything else happens: the manifest against
the files, ``server.json``'s fields and sizes, the round against the config's ``federation.rounds``, the
method against the config's, every module against ``model.target_modules`` and its factors' shapes; the
model's own shapes are checked by :func:`check_shapes` as soon as the model is built, before any training.
A checkpoint written before manifests existed (no ``manifest.json``) is still read, with every check but
the hashes. Every random choice of a run
is derived from ``(seed, round, client)``, so no RNG state needs saving: resuming from round ``t`` replays
rounds ``t+1...`` exactly as an uninterrupted run would. Nothing is ever unpickled.

Crash safety: a save writes a temporary sibling directory, fsyncs it, moves the old checkpoint aside to
``.checkpoint.old``, renames the new one into place and removes the old one (see
:class:`~flexlora.core.adapter_io.atomic_directory`). A process killed at any point leaves either
``checkpoint/`` (complete) or, killed between the two renames, only ``.checkpoint.old`` (complete), which
:func:`load_checkpoint` then reads and :func:`recover_checkpoint` (run by a resume) puts back, so a resume
always finds the last completed round. Recovery never removes ``.checkpoint.old`` unless ``checkpoint/``
passes every check.
"""

from __future__ import annotations

import hashlib
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
from flexlora.core.safe_load import LoadError, load_json
from flexlora.core.safetensors_io import read_safetensors, write_safetensors
from flexlora.methods import METHODS

__all__ = [
    "ServerState",
    "save_checkpoint",
    "load_checkpoint",
    "recover_checkpoint",
    "check_shapes",
    "CHECKPOINT_DIR",
]

CHECKPOINT_DIR = "checkpoint"
MANIFEST = "manifest.json"
FILES = ("global.safetensors", "server.json")
MAX_SERVER_JSON_BYTES = 256 * 2**20


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
        fed = config.get("federation")
        method = fed.get("method") if isinstance(fed, dict) else None
        server = {
            "round": state.round,
            "method": method if isinstance(method, str) else state.global_state.method,
            "state": state.global_state.method,
            "assignment": state.assignment,
            "metrics": state.metrics,
            "config": config,
        }
        (tmp / "server.json").write_text(json.dumps(server, indent=1) + "\n")
        manifest = {"format": 1, "files": {name: _digest(tmp / name) for name in FILES}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return target


def _digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _verify_manifest(source: Path) -> None:
    """Every file that ``manifest.json`` lists has its size and sha256 (sizes first: no hashing of a file
    that is already wrong). No manifest: a checkpoint from before manifests, accepted."""
    if not (source / MANIFEST).exists():
        return
    where = source / MANIFEST
    try:
        manifest = load_json(where, max_bytes=2**20)
    except LoadError as exc:
        raise AdapterError(str(exc)) from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or set(files) != set(FILES):
        raise AdapterError(f"{where}: must list exactly {list(FILES)} under 'files'")
    for name, want in files.items():
        if not (
            isinstance(want, dict)
            and isinstance(want.get("bytes"), int)
            and isinstance(want.get("sha256"), str)
        ):
            raise AdapterError(f"{where}: entry {name!r} needs integer 'bytes' and string 'sha256'")
        path = source / name
        if not path.is_file():
            raise AdapterError(f"{path}: missing (listed in {MANIFEST})")
        if path.stat().st_size != want["bytes"]:
            raise AdapterError(f"{path}: {path.stat().st_size} bytes, {MANIFEST} says {want['bytes']}")
        if _digest(path)["sha256"] != want["sha256"]:
            raise AdapterError(f"{path}: sha256 differs from {MANIFEST} (corrupt or edited)")


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
    elif (
        target.exists() and old.exists()
    ):  # killed after placing the new one: keep the old unless it is whole
        try:
            load_checkpoint(run_dir)
        except AdapterError as exc:
            raise AdapterError(
                f"{exc}; the previous checkpoint is kept in {old}: move it to {target} to resume from it"
            ) from None
    for leftover in run_dir.glob(f".{CHECKPOINT_DIR}.*"):
        if leftover.is_dir() and not leftover.is_symlink():
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
    _verify_manifest(source)
    try:
        server = load_json(source / "server.json", max_bytes=MAX_SERVER_JSON_BYTES)
    except LoadError as exc:
        raise AdapterError(str(exc)) from None
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
    if not isinstance(server.setdefault("state", server["method"]), str):
        raise AdapterError(f"{source / 'server.json'}: field 'state' must be a str")
    tensors = read_safetensors(source / "global.safetensors")
    try:
        global_state = GlobalState.from_tensors(tensors, server["state"])
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
    _check_config(server, global_state, source)
    state = ServerState(server["round"], global_state, dict(server["assignment"]), list(server["metrics"]))
    return state, server["config"]


def _check_config(server: dict[str, Any], state: GlobalState, source: Path) -> None:
    """The checkpoint agrees with the config saved in it: round, method (and the aggregator state that method
    keeps, :mod:`flexlora.methods`) and module names. A config too malformed to compare is left to the config
    loader, which names its bad keys."""
    fed, model = server["config"].get("federation"), server["config"].get("model")
    where = source / "server.json"
    if isinstance(fed, dict) and isinstance(fed.get("rounds"), int) and server["round"] > fed["rounds"]:
        raise AdapterError(f"{where}: round {server['round']} is beyond the config's {fed['rounds']} rounds")
    method = fed.get("method") if isinstance(fed, dict) else None
    if isinstance(method, str):
        kept = METHODS[method].aggregator_class().name if method in METHODS else method
        if server["method"] not in (method, kept) or server["state"] != kept:
            raise AdapterError(
                f"{where}: method {server['method']!r} (state {server['state']!r}) does not match the "
                f"config's {method!r}"
            )
    targets = model.get("target_modules") if isinstance(model, dict) else None
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        stray = [n for n in state.modules if n.rsplit(".", 1)[-1] not in targets]
        if stray:
            raise AdapterError(
                f"{source / 'global.safetensors'}: module {stray[0]!r} is not one of the config's "
                f"target_modules {targets}"
            )


def check_shapes(state: GlobalState, shapes: dict[str, tuple[int, int]], run_dir: str | os.PathLike) -> None:
    """The checkpoint's modules are exactly the model's LoRA modules, each ``B A`` of the module's shape."""
    where = Path(run_dir) / CHECKPOINT_DIR / "global.safetensors"
    missing, extra = sorted(set(shapes) - set(state.modules)), sorted(set(state.modules) - set(shapes))
    if missing or extra:
        what = f"lacks module {missing[0]!r}" if missing else f"has module {extra[0]!r} the model lacks"
        raise AdapterError(f"{where}: {what}")
    for name, lr in state.modules.items():
        shape = (lr.B.shape[0], lr.A.shape[1])
        if shape != tuple(shapes[name]):
            raise AdapterError(f"{where}: module {name!r} is {shape}, the model's is {tuple(shapes[name])}")
