"""Rank types from a client's resources: the cost of each type on a model, measured or estimated.

* :func:`rank_table` gives, for every rank type, the estimated peak memory and step time
  (:mod:`flexlora.core.budget`) and, when asked, the measured ones (a short real training run per type in a
  fresh process, :mod:`flexlora.rank_probe`), cached under ``<cache>/ranks/`` keyed by model, targets, batch,
  sequence length, dtype, device and rank, so a type is measured once per machine.
* :func:`pick` chooses the largest type that fits a :class:`~flexlora.core.budget.Budget`, measured where
  measured, else estimated.
* :func:`budget_rank_types` maps the in-process engine's ``federation.budgets`` to clients' rank types (by
  estimate only, so a run is reproducible), and :func:`assignment_record` writes them to ``assignment.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flexlora.core.budget import (
    GIB,
    RUNTIME_BYTES,
    Budget,
    Cost,
    ModelDims,
    StepShape,
    choose,
    estimate,
    reason,
)
from flexlora.core.ranks import RANK_TYPES, RankType

__all__ = [
    "RankRow",
    "assignment_record",
    "budget_rank_types",
    "costs",
    "gemm_flops_per_second",
    "measure",
    "model_dims",
    "pick",
    "rank_table",
]

log = logging.getLogger(__name__)
PROBE_VERSION = 1
PROBE_TIMEOUT = 1800.0


@dataclass(frozen=True)
class RankRow:
    """One rank type's cost: the estimate, and the measurement where there is one."""

    rank_type: RankType
    estimate: Cost
    estimated_seconds: float
    measured_bytes: int | None = None
    measured_seconds: float | None = None

    @property
    def peak_bytes(self) -> int:
        return self.measured_bytes if self.measured_bytes is not None else self.estimate.total

    @property
    def step_seconds(self) -> float:
        return self.measured_seconds if self.measured_seconds is not None else self.estimated_seconds

    def to_dict(self) -> dict:
        return {
            "rank_type": self.rank_type.name,
            "estimated_gb": round(self.estimate.total / GIB, 3),
            "measured_gb": None if self.measured_bytes is None else round(self.measured_bytes / GIB, 3),
            "estimated_step_seconds": round(self.estimated_seconds, 3),
            "measured_step_seconds": self.measured_seconds,
        }


# ---------------------------------------------------------------------------------------------- estimate
def model_dims(model: nn.Module) -> ModelDims:
    """The sizes of a loaded Llama-like model that :func:`flexlora.core.budget.estimate` needs."""
    cfg = model.config
    decoder = model.get_decoder()
    linear = sum(m.weight.numel() for m in decoder.modules() if isinstance(m, nn.Linear))
    return ModelDims(
        hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size,
        layers=cfg.num_hidden_layers,
        heads=cfg.num_attention_heads,
        vocab=cfg.vocab_size,
        params=sum(p.numel() for p in model.parameters()),
        linear_params=linear,
    )


def gemm_flops_per_second(step: StepShape, dims: ModelDims, device: torch.device, repeats: int = 3) -> float:
    """Measured rate of a matmul the size of an MLP projection of the step (``(T, h) @ (h, i)``)."""
    dtype = {2: torch.bfloat16, 4: torch.float32}.get(step.dtype_bytes, torch.float32)
    x = torch.randn(step.tokens, dims.hidden, dtype=dtype, device=device)
    w = torch.randn(dims.hidden, dims.intermediate, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x @ w
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2.0 * step.tokens * dims.hidden * dims.intermediate / max(best, 1e-9)


# ---------------------------------------------------------------------------------------------- measure
def _cache_path(spec: Mapping) -> Path:
    from flexlora.models import cache_dir

    key = json.dumps({**spec, "torch": torch.__version__, "probe": PROBE_VERSION}, sort_keys=True)
    return cache_dir() / "ranks" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _read_cache(spec: Mapping) -> dict | None:
    try:
        record = json.loads(_cache_path(spec).read_text())
        return record["result"] if record.get("spec") == dict(spec) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def measure(spec: Mapping, use_cache: bool = True, cached_only: bool = False) -> dict | None:
    """Peak memory and step time of one rank type, from the cache or a fresh probe process.

    Args:
        spec: ``model``, ``targets``, ``attn``, ``mlp``, ``batch``, ``seq_len``, ``dtype``, ``device``.
        use_cache: read and write ``<cache>/ranks/``.
        cached_only: never start a probe (None when not cached).

    Returns:
        ``{"peak_bytes", "loaded_bytes", "step_seconds", ...}``, or None when the probe failed (logged).
    """
    if use_cache and (hit := _read_cache(spec)) is not None:
        return hit
    if cached_only:
        return None
    cmd = [sys.executable, "-m", "flexlora.rank_probe", json.dumps(dict(spec))]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        log.warning("measuring %s timed out after %.0f s; using the estimate", spec, PROBE_TIMEOUT)
        return None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        log.warning(
            "measuring rank %s/%s failed (exit %d): %s", spec["attn"], spec["mlp"], done.returncode, tail
        )
        return None
    result = json.loads(lines[-1])
    if use_cache:
        path = _cache_path(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"spec": dict(spec), "result": result}))
        tmp.replace(path)
    return result


# ---------------------------------------------------------------------------------------------- table
def rank_table(
    model_name: str,
    targets: Sequence[str],
    batch: int,
    seq_len: int,
    dtype: str = "float32",
    device: str = "auto",
    mode: str = "measure",
    rank_types: Iterable[RankType] = RANK_TYPES.values(),
) -> list[RankRow]:
    """Every rank type's estimated (and measured) peak memory and step time on this machine.

    Args:
        mode: ``measure`` (probe types not cached yet), ``cached`` (measurements already cached, else the
            estimate) or ``estimate``.

    Raises:
        ValueError: unknown mode, or no target module in the model.
    """
    from flexlora.lora_host import LoraHost
    from flexlora.models import load_model

    if mode not in ("measure", "cached", "estimate"):
        raise ValueError(f"mode must be measure, cached or estimate, got {mode!r}")
    model, _ = load_model(model_name, dtype, device)
    shapes, dims = LoraHost(model, targets).shapes, model_dims(model)
    where = next(model.parameters()).device
    step = StepShape(batch, seq_len, next(model.parameters()).element_size())
    rate = gemm_flops_per_second(step, dims, where)
    del model  # the probes load their own copy
    runtime = 0 if where.type == "cuda" else RUNTIME_BYTES
    base = {"model": model_name, "targets": sorted(targets), "batch": batch, "seq_len": seq_len}
    base |= {"dtype": dtype, "device": str(where)}
    rows = []
    for rank_type in rank_types:
        cost = estimate(dims, shapes, rank_type, step, runtime)
        hit = None
        if mode != "estimate":
            spec = {**base, "attn": rank_type.attn, "mlp": rank_type.mlp}
            hit = measure(spec, cached_only=mode == "cached")
        rows.append(
            RankRow(
                rank_type,
                cost,
                cost.flops / rate,
                None if hit is None else int(hit["peak_bytes"]),
                None if hit is None else float(hit["step_seconds"]),
            )
        )
    return rows


def pick(rows: Sequence[RankRow], budget: Budget, steps_per_round: int | None) -> RankRow:
    """The largest rank type of ``rows`` (smallest first) that fits ``budget``.

    Raises:
        flexlora.core.budget.BudgetError: nothing fits (one line).
    """
    name = choose(costs(rows), budget, steps_per_round)
    return next(r for r in rows if r.rank_type.name == name)


def costs(rows: Sequence[RankRow]) -> list[tuple[str, int, float]]:
    """``(rank type, peak bytes, seconds per step)`` of each row, as :func:`flexlora.core.budget.choose` and
    :func:`flexlora.core.budget.reason` take them (measured where measured, else estimated)."""
    return [(r.rank_type.name, r.peak_bytes, r.step_seconds) for r in rows]


# ---------------------------------------------------------------------------------------------- runs
def budget_rank_types(
    model: nn.Module,
    shapes: Mapping[str, tuple[int, int]],
    budgets: Sequence[Budget],
    num_clients: int,
    batch: int,
    seq_len: int,
    steps_per_round: int | None,
) -> tuple[list[RankType], list[dict]]:
    """Rank types for ``num_clients`` clients given ``budgets`` (cycled), by estimate.

    Returns:
        The rank types, and per client what ``assignment.json`` records (budget, estimated peak and round
        time, and the reason in one line: :func:`flexlora.core.budget.reason`).

    Raises:
        flexlora.core.budget.BudgetError: a budget that no rank type fits.
    """
    dims, where = model_dims(model), next(model.parameters()).device
    step = StepShape(batch, seq_len, next(model.parameters()).element_size())
    rate = gemm_flops_per_second(step, dims, where) if any(b.seconds_per_round for b in budgets) else None
    runtime = 0 if where.type == "cuda" else RUNTIME_BYTES
    rows = []
    for rank_type in RANK_TYPES.values():
        cost = estimate(dims, shapes, rank_type, step, runtime)
        rows.append(RankRow(rank_type, cost, cost.flops / rate if rate else 0.0))
    types, notes = [], []
    for i in range(num_clients):
        budget = budgets[i % len(budgets)]
        row = pick(rows, budget, steps_per_round)
        types.append(row.rank_type)
        note = {"memory_gb": budget.memory_gb, "estimated_gb": round(row.peak_bytes / GIB, 3)}
        note["reason"] = reason(costs(rows), budget, steps_per_round) + " (estimated)"
        if budget.seconds_per_round is not None:
            note |= {
                "seconds_per_round": budget.seconds_per_round,
                "estimated_seconds_per_round": round(row.step_seconds * steps_per_round, 3),
            }
        notes.append(note)
    return types, notes


def assignment_record(rank_types: Mapping[str, RankType], notes: Mapping[str, dict] | None = None) -> dict:
    """``assignment.json``: each client's rank type name, or ``{"rank_type": name, **budget note}`` for a
    client whose type came from a budget."""
    notes = notes or {}
    return {c: {"rank_type": t.name, **notes[c]} if notes.get(c) else t.name for c, t in rank_types.items()}
