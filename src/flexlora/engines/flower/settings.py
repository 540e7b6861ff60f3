"""Flower run config <-> our :class:`~flexlora.config.RunConfig`, and what a node needs to train.

``flwr run . <connection> --run-config '...'`` sets the keys of ``[tool.flwr.app.config]`` (see
:data:`FLOWER_DEFAULTS`). The named keys map onto our config; ``config-file`` names a flexlora YAML file and
``set`` carries any other ``--set``-style overrides, space-separated (``set="train.lr=1e-3 eval.generate=false"``).
Flower-only keys (placement, timeouts) stay in :class:`FlowerOptions`.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flexlora.config import ConfigError, DataConfig, ModelConfig, RunConfig, load_config
from flexlora.training import TrainConfig

__all__ = [
    "FLOWER_DEFAULTS",
    "FlowerOptions",
    "check_on_flower",
    "client_settings",
    "parse_client_settings",
    "run_config_from_flower",
]

#: ``[tool.flwr.app.config]`` keys and their defaults (pyproject.toml holds the same values).
FLOWER_DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 3,
    "model": "tiny",
    "method": "flexlora",
    "distribution": "homo",
    "data-path": "synthetic",
    "clients-per-round": 2,
    "local-steps": 2,
    "seed": 0,
    "output-dir": "runs",
    "run-name": "flower",
    "config-file": "",
    "set": "",
    "placement": "simulation",
    "round-timeout": 600.0,
    "min-nodes": 1,
    "wait-timeout": 300.0,
}

#: the last override of every config run on Flower: validated with the engine it runs on, at either placement
ON_FLOWER = "federation.engine=flower"

# Flower key -> dotted key of our config
_MAPPED = {
    "num-server-rounds": "federation.rounds",
    "model": "model.name",
    "method": "federation.method",
    "distribution": "federation.distribution",
    "data-path": "data.path",
    "clients-per-round": "federation.clients_per_round",
    "local-steps": "train.steps",
    "seed": "federation.seed",
    "output-dir": "output_dir",
    "run-name": "name",
}


@dataclass(frozen=True)
class FlowerOptions:
    """Flower-only settings of a ServerApp run.

    Args:
        placement: ``simulation`` (any node runs any client) or ``deployment`` (one node per client).
        round_timeout: seconds to wait for a round's replies.
        min_nodes: nodes to wait for before the first round.
        wait_timeout: seconds to wait for them.
    """

    placement: str = "simulation"
    round_timeout: float = 600.0
    min_nodes: int = 1
    wait_timeout: float = 300.0


def run_config_from_flower(run_config: Mapping[str, Any]) -> tuple[RunConfig, FlowerOptions]:
    """Build and validate our config from a Flower run config (missing keys take :data:`FLOWER_DEFAULTS`), once
    the engine (Flower, whatever ``set`` says) and the placement are known.

    Raises:
        ConfigError: listing every bad key, named as in our config (``federation.rounds: ...``), or an
            unknown Flower key.
    """
    unknown = sorted(set(run_config) - set(FLOWER_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"unknown run-config key(s) {unknown}: use one of {sorted(FLOWER_DEFAULTS)} or 'set'"
        )
    raw = {**FLOWER_DEFAULTS, **run_config}
    placement = str(raw["placement"])
    if placement not in ("simulation", "deployment"):
        raise ConfigError(f"placement: {placement!r} is not one of ['deployment', 'simulation']")
    overrides = []
    for key, dotted in _MAPPED.items():
        value = raw[key]
        if key == "distribution" and isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",") if v.strip()]
        overrides.append(f"{dotted}={json.dumps(value)}")
    overrides += [*shlex.split(str(raw["set"])), ON_FLOWER]
    cfg = load_config(str(raw["config-file"]) or None, overrides)
    options = FlowerOptions(
        placement, float(raw["round-timeout"]), int(raw["min-nodes"]), float(raw["wait-timeout"])
    )
    return cfg, options


def check_on_flower(cfg: RunConfig) -> None:
    """Validate ``cfg`` as a run on Flower (``federation.engine=flower``, whatever it says), so what only the
    local engine carries (SLoRA's sparse stage, HetLoRA-Cho's client regulariser) is refused before a run starts.

    Raises:
        ConfigError: naming every key Flower cannot run as configured.
    """
    load_config(raw=cfg.to_dict(), overrides=[ON_FLOWER])


def client_settings(cfg: RunConfig) -> dict[str, Any]:
    """What a node needs to train exactly as the in-process engine: model, data and train sections, and the
    seed (it seeds the tiny model's weights)."""
    return {
        "model": dataclasses.asdict(cfg.model),
        "data": dataclasses.asdict(cfg.data),
        "train": dataclasses.asdict(cfg.train),
        "seed": cfg.federation.seed,
    }


def parse_client_settings(raw: Mapping[str, Any]) -> tuple[ModelConfig, DataConfig, TrainConfig, int]:
    """Inverse of :func:`client_settings`.

    Raises:
        ValueError: a section is missing or has unknown or invalid fields.
    """
    try:
        return (
            ModelConfig(**raw["model"]),
            DataConfig(**raw["data"]),
            TrainConfig(**raw["train"]),
            int(raw["seed"]),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed client settings: {exc}") from None
