"""The ``flexlora run`` recipe: build -> set up -> run -> clean up.

Builds every component from a :class:`RunConfig` (data source, client split, rank assignment, base model
with its LoRA host, aggregator, engine, evaluator), runs the federation, and writes the run directory:

``config.yaml`` (resolved), ``run.json`` (seed, package versions, command), ``assignment.json`` (each client's
rank type), ``metrics.jsonl`` (one line per round), ``checkpoint/`` (after every round), ``adapters/full``
(the exact global update as a PEFT adapter) and ``adapters/<rank type>`` (what a client of that type
receives), ``summary.json``, ``log.txt``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from flexlora.checkpoint import CHECKPOINT_DIR, load_checkpoint, recover_checkpoint
from flexlora.config import SLORA_METHODS, ConfigError, RunConfig, load_config
from flexlora.core.adapter_io import write_adapter
from flexlora.core.aggregators import make_aggregator
from flexlora.core.aggregators.base import exact_factors
from flexlora.core.privacy import PrivateAggregator
from flexlora.core.ranks import assign_rank_types, module_ranks
from flexlora.core.robust import RobustAggregator
from flexlora.core.validation import UpdateLimits
from flexlora.data import open_source
from flexlora.data.splits import seeded_rng, split_clients, split_validation
from flexlora.federation import Federation, FederationPlan
from flexlora.tracking import tracked

__all__ = [
    "RunResult",
    "run_federation",
    "resume_federation",
    "environment",
    "build_aggregator",
    "make_plan",
    "write_outputs",
]

log = logging.getLogger("flexlora")
PACKAGES = ("flexlora", "torch", "transformers", "peft", "flwr", "safetensors", "gguf", "rouge-score")


@dataclass
class RunResult:
    run_dir: Path
    metrics: list[dict[str, Any]]

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1]


def environment() -> dict[str, Any]:
    """Package versions and platform, saved with every run."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions}


def build_aggregator(cfg: RunConfig, plan: FederationPlan):
    """The configured method, wrapped in the ``security`` section's DP or robust rule."""
    return _harden(_method(cfg), cfg, plan)


def _method(cfg: RunConfig):
    # SLoRA's second stage: FedAvg at the homogeneous rank, or FlexLoRA with heterogeneous ranks
    stage2 = {"slora": "fedavg", "slora+flexlora": "flexlora"}
    method = stage2.get(cfg.federation.method, cfg.federation.method)
    kwargs: dict[str, Any] = {}
    if method.startswith("flexlora") or method == "raflora":  # flexlora, its factor-balance controls, raflora
        kwargs["svd"] = cfg.federation.svd
    elif method == "florist":
        kwargs["threshold"] = cfg.federation.florist_threshold
    elif method == "hetlora":
        kwargs["sparsity_weighted"] = cfg.federation.sparsity_weighted
    elif method == "hetlora-cho":
        fed = cfg.federation
        kwargs.update(gamma=fed.hetlora_gamma, lam=fed.hetlora_lambda, threshold=fed.hetlora_threshold)
    return make_aggregator(method, **kwargs)


def _harden(aggregator, cfg: RunConfig, plan: FederationPlan):
    """Wrap the method in the configured differential privacy or robust rule (the ``security`` section)."""
    sec = cfg.security
    if sec.dp_noise_multiplier > 0:
        return PrivateAggregator(
            aggregator,
            clip_norm=sec.clip_norm,
            noise_multiplier=sec.dp_noise_multiplier,
            expected_clients=len(plan.sample(1)),
            population=len(plan.pool),
            delta=sec.dp_delta,
            seed=cfg.federation.seed,
            secure_noise=sec.dp_secure_noise,
        )
    if sec.robust != "none":
        return RobustAggregator(aggregator, sec.robust, sec.clip_norm, sec.trim_fraction)
    return aggregator


def make_plan(cfg: RunConfig, rank_types: dict, shapes: dict[str, tuple[int, int]]) -> FederationPlan:
    """The federation plan of a config, for a pool given as ``{client_id: RankType}``."""
    fed = cfg.federation
    return FederationPlan(
        pool=list(rank_types),
        rank_types=rank_types,
        shapes=shapes,
        rounds=fed.rounds,
        clients_per_round=fed.clients_per_round,
        min_clients=fed.min_clients,
        seed=fed.seed,
        alpha=cfg.model.lora_alpha,
        use_rslora=cfg.model.use_rslora,
        eval_every=fed.eval_every,
    )


def write_outputs(run_dir: Path, state, plan: FederationPlan, aggregator, model_name: str) -> None:
    """``adapters/full`` (the exact global update), ``adapters/<rank type>`` (what a client of each type in
    the pool receives) and ``summary.json``."""
    adapters = run_dir / "adapters"
    write_adapter(
        adapters / "full", exact_factors(state.global_state, plan.alpha, plan.use_rslora), model_name
    )
    for rank_type in {t.name: t for t in plan.rank_types.values()}.values():
        factors = aggregator.payload(
            state.global_state, module_ranks(rank_type, plan.shapes), plan.alpha, plan.use_rslora
        )
        write_adapter(adapters / rank_type.name, factors, model_name)
    summary = {
        "run_dir": str(run_dir),
        "rounds": state.round,
        "final": state.metrics[-1],
        "initial": state.metrics[0],
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


#: ``federation.engine`` -> ``"module:factory"``, a factory taking ``(cfg, host, tokenizer, source, progress)``.
#: The engines are the top floor and import the round loop; the round loop only names them, and imports the
#: one a run asks for when the run starts.
_ENGINE_FACTORIES = {
    "local": "flexlora.engines.local:local_engine",
    "flower": "flexlora.engines.flower.simulation:flower_engine",
}


def _engine(cfg: RunConfig, host, tokenizer, source, progress: bool):
    module, factory = _ENGINE_FACTORIES[cfg.federation.engine].split(":")
    return getattr(importlib.import_module(module), factory)(cfg, host, tokenizer, source, progress)


def _setup_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def _execute(cfg: RunConfig, run_dir: Path, resume: bool, progress: bool) -> RunResult:
    from flexlora.evaluation import evaluate_clients
    from flexlora.models import LoraHost, load_model

    # ---------------------------------------------------------------- build
    data = cfg.data
    source = open_source(data.path, data.format, **data.options)
    heldout_arg = {"heldout_ids": data.heldout_ids} if data.heldout_ids else {"num_heldout": data.num_heldout}
    train_ids, heldout_ids = split_clients(source, seed=cfg.federation.seed, **heldout_arg)
    train_ids, validation_ids = split_validation(train_ids, data.num_validation, cfg.federation.seed)
    if data.max_clients is not None and data.max_clients < len(train_ids):
        train_ids = sorted(seeded_rng(cfg.federation.seed, "pool").sample(train_ids, data.max_clients))
    types = assign_rank_types(len(train_ids), cfg.federation.distribution, cfg.federation.seed)
    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device, seed=cfg.federation.seed)
    host = LoraHost(model, cfg.model.target_modules)
    plan = make_plan(cfg, dict(zip(train_ids, types, strict=True)), host.shapes)
    pool = validation_ids if data.eval_on == "validation" else heldout_ids
    eval_ids = pool[: cfg.federation.eval_clients] if cfg.federation.eval_clients else pool
    trained_ids = train_ids[: cfg.federation.eval_trained_clients]

    def evaluate(factors, generate: bool = cfg.eval.generate and not cfg.eval.generate_final_only):
        eval_cfg = dataclasses.replace(cfg.eval, generate=generate)
        if factors is not None:
            host.load(factors)
        try:
            out = evaluate_clients(host.model, tokenizer, map(source.load, eval_ids), "test", eval_cfg)
            if trained_ids:
                out["trained"] = evaluate_clients(
                    host.model, tokenizer, map(source.load, trained_ids), "test", eval_cfg
                )
        finally:
            host.unload()
        return out

    def final_evaluate(factors):
        return evaluate(factors, generate=cfg.eval.generate)

    aggregator = build_aggregator(cfg, plan)
    if cfg.federation.method == "fedit":  # FedIT is FedAvg with AdamW as the local optimiser
        cfg.train = dataclasses.replace(cfg.train, optimizer="adamw")
    engine = _engine(cfg, host, tokenizer, source, progress)
    log.info(
        "method %r, engine %s, %d training clients, %d held out",
        aggregator,
        engine.name,
        len(train_ids),
        len(heldout_ids),
    )
    (run_dir / "assignment.json").write_text(
        json.dumps({c: t.name for c, t in plan.rank_types.items()}, indent=1)
    )
    sparse_stage = None
    if cfg.federation.method in SLORA_METHODS:
        from flexlora.slora import SparseStage

        sparse_stage = SparseStage(
            host.model,
            tokenizer,
            source,
            cfg.train,
            {c: plan.ranks(c) for c in plan.pool},
            plan.per_module_ranks(max),
            cfg.federation.slora_rounds,
            seed=cfg.federation.seed,
            density=cfg.federation.slora_density,
            lr=cfg.federation.slora_lr,
            progress=progress,
        )
        log.info("SLoRA stage 1: %s", sparse_stage.hyperparameters())
    federation = Federation(
        plan,
        aggregator,
        engine,
        evaluate,
        run_dir,
        cfg.to_dict(),
        progress=progress,
        sparse_stage=sparse_stage,
        final_evaluate=final_evaluate if cfg.eval.generate_final_only else None,
        limits=UpdateLimits(cfg.security.max_examples, cfg.security.norm_bound),
        round_retries=cfg.security.round_retries,
    )
    # ---------------------------------------------------------------- run
    state = None
    if resume:
        state, _ = load_checkpoint(run_dir)
        log.info("resuming after round %d", state.round)
    try:
        with tracked(federation, cfg.tracking, run_dir, cfg.to_dict()):
            state = federation.run(state)
    finally:
        engine.close()
    # ---------------------------------------------------------------- outputs
    write_outputs(run_dir, state, plan, aggregator, cfg.model.name)
    return RunResult(run_dir, state.metrics)


def run_federation(cfg: RunConfig, overwrite: bool = False, progress: bool = True) -> RunResult:
    """Start a new run in ``cfg.run_dir``.

    Raises:
        ConfigError: the run directory already holds a run (resume it, or pass ``overwrite``).
    """
    run_dir = cfg.run_dir
    if (run_dir / CHECKPOINT_DIR).exists() and not overwrite:
        raise ConfigError(f"{run_dir} already holds a run: resume it with --resume {run_dir}, or --overwrite")
    if overwrite:
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.yaml.tmp"  # written whole or not at all: a resume may start from it
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(run_dir / "config.yaml")
    info = {
        "seed": cfg.federation.seed,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        **environment(),
    }
    (run_dir / "run.json").write_text(json.dumps(info, indent=1) + "\n")
    handler = _setup_logging(run_dir)
    try:
        return _execute(cfg, run_dir, resume=False, progress=progress)
    finally:
        log.removeHandler(handler)
        handler.close()


def resume_federation(run_dir: str | Path, progress: bool = True) -> RunResult:
    """Continue an interrupted run from its last checkpoint, with the config it was started with. A run killed
    before its first checkpoint starts over from its ``config.yaml``; a save killed midway is repaired first
    (:func:`flexlora.checkpoint.recover_checkpoint`)."""
    run_dir = Path(run_dir)
    resume = recover_checkpoint(run_dir) or not (run_dir / "config.yaml").is_file()
    if resume:
        _, raw = load_checkpoint(run_dir)
        cfg = load_config(raw=raw)
    else:
        cfg = load_config(run_dir / "config.yaml")
    handler = _setup_logging(run_dir)
    try:
        if not resume:
            log.info("%s has no checkpoint yet: starting over from its config.yaml", run_dir)
        return _execute(cfg, run_dir, resume=resume, progress=progress)
    finally:
        log.removeHandler(handler)
        handler.close()
