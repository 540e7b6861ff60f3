"""The ``flexlora run`` recipe: build -> set up -> run -> clean up.

Builds every component from a :class:`RunConfig` (data source, client split, rank assignment, base model
with its LoRA host, aggregator, engine, evaluator), runs the federation, and writes the run directory:

``config.yaml`` (resolved), ``run.json`` (seed, package versions, command), ``assignment.json`` (each client's
rank type), ``metrics.jsonl`` (one line per round), ``checkpoint/`` (after every round), ``adapters/full``
(the exact global update as a PEFT adapter) and ``adapters/<rank type>`` (what a client of that type
receives), ``summary.json``, ``log.txt``, and the marker ``.flexlora-run``.

A new run is validated whole (config, data source, model name) before its directory is touched; an existing
directory is replaced (``overwrite``) only when it is a flexlora run (it carries ``.flexlora-run``, or is an
older run whose ``run.json`` has flexlora's fields). A resume refuses to start over when the run has
progressed past its first checkpoint but the checkpoint is gone, and does nothing for a finished run.
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

from flexlora.budget import assignment_record, budget_rank_types
from flexlora.checkpoint import CHECKPOINT_DIR, check_shapes, load_checkpoint, recover_checkpoint
from flexlora.config import ConfigError, RunConfig, SecurityConfig, load_config
from flexlora.core.adapter_io import write_adapter
from flexlora.core.aggregators.base import exact_factors
from flexlora.core.aggregators.hetlora_cho import TailPenalty
from flexlora.core.budget import Budget
from flexlora.core.errors import AdapterError
from flexlora.core.output_dirs import RUN_MARKER, OutputError, has_marker, write_marker
from flexlora.core.privacy import PrivateAggregator
from flexlora.core.ranks import assign_rank_types, module_ranks, parse_rank_type
from flexlora.core.robust import RobustAggregator
from flexlora.core.safe_load import load_json
from flexlora.core.validation import UpdateLimits
from flexlora.data import open_source
from flexlora.data.splits import seeded_rng, split_clients, split_validation
from flexlora.federation import AggregationStage, Federation, FederationPlan, Stage
from flexlora.methods import Method, get_method
from flexlora.precision import resolve_precision
from flexlora.tracking import tracked

__all__ = [
    "RunResult",
    "run_federation",
    "resume_federation",
    "environment",
    "build_aggregator",
    "harden",
    "client_side",
    "make_plan",
    "stages_for",
    "write_outputs",
    "check_run",
    "is_run_dir",
]

log = logging.getLogger("flexlora")
PACKAGES = ("flexlora", "torch", "transformers", "peft", "flwr", "safetensors", "gguf", "rouge-score")


@dataclass
class RunResult:
    run_dir: Path
    metrics: list[dict[str, Any]]
    note: str | None = None  # e.g. that a resumed run had already finished

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
    """The registered method's aggregator (SLoRA's: that of its dense second stage), its options read from
    the ``federation`` section."""
    return get_method(cfg.federation.method).build(cfg.federation)


def _harden(aggregator, cfg: RunConfig, plan: FederationPlan | None):
    """:func:`harden` with the ``security`` section, DP's sampling sizes read from ``plan``."""
    sizes = {} if plan is None else {"expected_clients": len(plan.sample(1)), "population": len(plan.pool)}
    method = get_method(cfg.federation.method)
    return harden(aggregator, method, cfg.security, seed=cfg.federation.seed, **sizes)


def harden(
    aggregator,
    method: Method,
    security: SecurityConfig,
    *,
    seed: int,
    expected_clients: int | None = None,
    population: int | None = None,
):
    """Wrap ``method``'s aggregator in the differential privacy or robust rule ``security`` asks for, in the
    space the registered method declares (:attr:`Method.space`). The round loop and
    :class:`flexlora.engines.flower.FlexLoRAStrategy` both wrap their aggregator here.

    Args:
        seed: the DP noise seed (the run seed).
        expected_clients, population: clients sampled per round and clients that may be sampled (DP only).

    Raises:
        ValueError: DP asked for a method whose update is not linear in its clients' contributions, or
            without the sampling sizes.
    """
    if security.dp_noise_multiplier > 0:
        if not method.dp:
            raise ValueError(
                f"security.dp_noise_multiplier: differential privacy does not support {method.name}"
            )
        if expected_clients is None or population is None:
            raise ValueError(
                "security.dp_noise_multiplier: differential privacy needs the population (the clients that "
                "may be sampled; FlexLoRAStrategy: population=)"
            )
        return PrivateAggregator(
            aggregator,
            clip_norm=security.clip_norm,
            noise_multiplier=security.dp_noise_multiplier,
            expected_clients=expected_clients,
            population=population,
            delta=security.dp_delta,
            seed=seed,
            secure_noise=security.dp_secure_noise,
            space=method.space,
        )
    if security.robust != "none":
        return RobustAggregator(
            aggregator, security.robust, security.clip_norm, security.trim_fraction, space=method.space
        )
    return aggregator


def client_side(cfg: RunConfig) -> dict[str, Any]:
    """The :class:`Federation` keywords of the method's client recipe: the recipe, and with a tail penalty
    its settings from the ``federation`` section."""
    fed, recipe = cfg.federation, get_method(cfg.federation.method).client
    penalty = (
        TailPenalty(fed.hetlora_lambda, fed.hetlora_gamma, fed.hetlora_threshold)
        if recipe.tail_penalty
        else None
    )
    return {"recipe": recipe, "tail_penalty": penalty}


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


#: stage name -> ``"module:builder"``, a builder taking ``(cfg, host, tokenizer, source, plan, progress)`` and
#: returning a :class:`flexlora.federation.Stage` (imported when a run asks for it, like the engines).
_STAGE_BUILDERS = {"slora-sparse": "flexlora.slora:build_sparse_stage"}


def stages_for(
    cfg: RunConfig, host, tokenizer, source, plan: FederationPlan, progress: bool
) -> tuple[Stage, ...]:
    """The federation's schedule: the method's own extra stages, in order, then its aggregation rounds."""
    stages = []
    for name in get_method(cfg.federation.method).client.stages:
        module, builder = _STAGE_BUILDERS[name].split(":")
        build = getattr(importlib.import_module(module), builder)
        stages.append(build(cfg, host, tokenizer, source, plan, progress))
    return (*stages, AggregationStage())


def _rank_types(cfg: RunConfig, host, clients: list[str], resumed: Path | None) -> tuple[list, list[dict]]:
    """Each client's rank type from the distribution, or from its budget (with what the budget allowed; a
    resumed run keeps the types it started with, since a time estimate depends on the machine's speed)."""
    fed, train = cfg.federation, cfg.train
    if fed.distribution != "budgets":
        return assign_rank_types(len(clients), fed.distribution, fed.seed), [{}] * len(clients)
    if resumed is not None:  # read once; a tampered record is refused in one line
        path = resumed / "assignment.json"
        saved = load_json(path)
        try:
            notes = [saved[c] for c in clients]
            return [parse_rank_type(n["rank_type"]) for n in notes], notes
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: no budget rank type recorded for every client ({exc!r})") from None
    budgets = [Budget.from_dict(b) for b in fed.budgets]
    return budget_rank_types(
        host.model, host.shapes, budgets, len(clients), train.batch_size, train.max_length, train.steps
    )


def _setup_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def _client_split(cfg: RunConfig, source) -> tuple[list[str], list[str], list[str]]:
    """``(training, held-out, validation)`` client ids: the seeded held-out split, then the validation clients
    taken out of the training pool, then the pool capped at ``data.max_clients`` (a seeded sample)."""
    data, seed = cfg.data, cfg.federation.seed
    heldout_arg = {"heldout_ids": data.heldout_ids} if data.heldout_ids else {"num_heldout": data.num_heldout}
    train_ids, heldout_ids = split_clients(source, seed=seed, **heldout_arg)
    train_ids, validation_ids = split_validation(train_ids, data.num_validation, seed)
    if data.max_clients is not None and data.max_clients < len(train_ids):
        train_ids = sorted(seeded_rng(seed, "pool").sample(train_ids, data.max_clients))
    return train_ids, heldout_ids, validation_ids


def _evaluators(cfg: RunConfig, host, tokenizer, source, eval_ids: list[str], trained_ids: list[str]):
    """``(evaluate, final_evaluate)`` of the global adapter's exact factors (``None``: the base model) on
    ``eval_ids`` (and on ``trained_ids`` under ``trained``). ``final_evaluate`` (``None`` unless
    ``eval.generate_final_only``) generates at the last round only."""
    from flexlora.evaluation import evaluate_clients

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

    return evaluate, final_evaluate if cfg.eval.generate_final_only else None


def _execute(cfg: RunConfig, run_dir: Path, resume: bool, progress: bool) -> RunResult:
    from flexlora.lora_host import LoraHost
    from flexlora.models import config_module_shapes, load_model

    # ---------------------------------------------------------------- build
    data = cfg.data
    source = open_source(data.path, data.format, **data.options)
    train_ids, heldout_ids, validation_ids = _client_split(cfg, source)
    state = None
    if resume:  # checked whole, module shapes included (from the model's config), before the model loads
        state, _ = load_checkpoint(run_dir)
        check_shapes(
            state.global_state, config_module_shapes(cfg.model.name, cfg.model.target_modules), run_dir
        )
    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device, seed=cfg.federation.seed)
    host = LoraHost(model, cfg.model.target_modules)
    types, notes = _rank_types(cfg, host, train_ids, run_dir if resume else None)
    plan = make_plan(cfg, dict(zip(train_ids, types, strict=True)), host.shapes)
    pool = validation_ids if data.eval_on == "validation" else heldout_ids
    eval_ids = pool[: cfg.federation.eval_clients] if cfg.federation.eval_clients else pool
    evaluate, final_evaluate = _evaluators(
        cfg, host, tokenizer, source, eval_ids, train_ids[: cfg.federation.eval_trained_clients]
    )
    aggregator = build_aggregator(cfg, plan)
    engine = _engine(cfg, host, tokenizer, source, progress)
    log.info(
        "method %r, engine %s, %d training clients, %d held out",
        aggregator,
        engine.name,
        len(train_ids),
        len(heldout_ids),
    )
    (run_dir / "assignment.json").write_text(
        json.dumps(assignment_record(plan.rank_types, dict(zip(train_ids, notes, strict=True))), indent=1)
    )
    federation = Federation(
        plan,
        aggregator,
        engine,
        evaluate,
        run_dir,
        cfg.to_dict(),
        progress=progress,
        schedule=stages_for(cfg, host, tokenizer, source, plan, progress),
        final_evaluate=final_evaluate,
        limits=UpdateLimits(cfg.security.max_examples, cfg.security.norm_bound),
        round_retries=cfg.security.round_retries,
        **client_side(cfg),
    )
    # ---------------------------------------------------------------- run
    if state is not None:
        log.info("resuming after round %d", state.round)
    try:
        with tracked(federation, cfg.tracking, run_dir, cfg.to_dict()):
            state = federation.run(state)
    finally:
        engine.close()
    # ---------------------------------------------------------------- outputs
    write_outputs(run_dir, state, plan, aggregator, cfg.model.name)
    return RunResult(run_dir, state.metrics)


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a flexlora run directory: it carries ``.flexlora-run``, or (a run from before the
    marker) its ``run.json`` is an object with flexlora's ``seed``, ``argv`` and ``packages``."""
    if has_marker(path, RUN_MARKER):
        return True
    try:
        info = load_json(path / "run.json", max_bytes=2**20)
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and {"seed", "argv", "packages"} <= set(info)


def check_run(cfg: RunConfig) -> None:
    """Everything about a new run that can fail before it starts: its data source opens and splits, and its
    model name is known (:func:`flexlora.models.check_model_name`). Writes nothing but the data cache."""
    from flexlora.models import check_model_name

    data = cfg.data
    source = open_source(data.path, data.format, **data.options)
    heldout_arg = {"heldout_ids": data.heldout_ids} if data.heldout_ids else {"num_heldout": data.num_heldout}
    split_clients(source, seed=cfg.federation.seed, **heldout_arg)
    check_model_name(cfg.model.name)


def run_federation(cfg: RunConfig, overwrite: bool = False, progress: bool = True) -> RunResult:
    """Start a new run in ``cfg.run_dir``, after :func:`check_run`.

    Raises:
        ConfigError: the run directory already holds a run (resume it, or pass ``overwrite``).
        OutputError: the run directory exists and is not a flexlora run (never replaced).
    """
    run_dir = cfg.run_dir
    check_run(cfg)
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise OutputError(f"{run_dir}: exists and is not a run directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not is_run_dir(run_dir):
            raise OutputError(
                f"{run_dir}: a non-empty directory that is not a flexlora run (no {RUN_MARKER}); choose another "
                "name or output_dir"
            )
        if not overwrite:
            raise ConfigError(
                f"{run_dir} already holds a run: resume it with --resume {run_dir}, or --overwrite"
            )
        shutil.rmtree(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        _write_run_files(cfg, run_dir)
    except OSError:  # a full or failing disk: leave no stub of a run that never started
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    handler = _setup_logging(run_dir)
    try:
        return _execute(cfg, run_dir, resume=False, progress=progress)
    finally:
        log.removeHandler(handler)
        handler.close()


def _write_run_files(cfg: RunConfig, run_dir: Path) -> None:
    """The marker, ``config.yaml`` (whole or not at all: a resume may start from it) and ``run.json``."""
    write_marker(run_dir, RUN_MARKER, "flexlora run")
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(run_dir / "config.yaml")
    info = {
        "seed": cfg.federation.seed,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "precision": {  # what train/eval.precision resolved to on this machine
            "train": resolve_precision(cfg.train.precision, cfg.model.device),
            "eval": resolve_precision(cfg.eval.precision, cfg.model.device),
        },
        **environment(),
    }
    (run_dir / "run.json").write_text(json.dumps(info, indent=1) + "\n")


def resume_federation(run_dir: str | Path, progress: bool = True) -> RunResult:
    """Continue an interrupted run from its last checkpoint, with the config it was started with. A run killed
    before its first checkpoint starts over from its ``config.yaml``; a save killed midway is repaired first
    (:func:`flexlora.checkpoint.recover_checkpoint`); a finished run is returned as it is.

    Raises:
        ValueError: not a flexlora run; a checkpoint that fails its checks (naming the file); a run that has
            progressed (``metrics.jsonl``, ``summary.json`` or ``checkpoint/``) but has no ``server.json``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not is_run_dir(run_dir):
        raise OutputError(f"{run_dir}: not a flexlora run directory (no {RUN_MARKER} or run.json)")
    resume = recover_checkpoint(run_dir)
    if resume:
        state, raw = load_checkpoint(run_dir)
        cfg = load_config(raw=raw)
        if state.round >= cfg.federation.rounds and (run_dir / "summary.json").is_file():
            note = (
                f"{run_dir} already finished (round {state.round} of {cfg.federation.rounds}); nothing to do"
            )
            return RunResult(run_dir, state.metrics, note)
    else:
        progressed = [n for n in (CHECKPOINT_DIR, "metrics.jsonl", "summary.json") if (run_dir / n).exists()]
        if progressed:
            raise AdapterError(
                f"{run_dir / CHECKPOINT_DIR / 'server.json'}: missing, but the run has progressed (it has "
                f"{', '.join(progressed)}); refusing to start over. Start a new run with --overwrite"
            )
        cfg = load_config(run_dir / "config.yaml")
    handler = _setup_logging(run_dir)
    try:
        if not resume:
            log.info("%s has no checkpoint yet: starting over from its config.yaml", run_dir)
        return _execute(cfg, run_dir, resume=resume, progress=progress)
    finally:
        log.removeHandler(handler)
        handler.close()
