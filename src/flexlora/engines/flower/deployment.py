"""The deployment recipe: one SuperNode per client, the federation's pool and ranks declared by the nodes.

Same round loop (:class:`flexlora.federation.Federation`) and the same outputs as ``flexlora run``
(``metrics.jsonl``, ``checkpoint/``, ``adapters/full`` and ``adapters/<rank type>``, ``summary.json``), but the
pool is the set of connected nodes' ``client-id`` and each client's rank type is what its node declared, not a
draw from a distribution. The server needs no client data: with ``data-path="none"`` it evaluates nothing;
otherwise it evaluates the global adapter on the held-out clients of its own copy of the source.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from flexlora.budget import assignment_record
from flexlora.config import RunConfig
from flexlora.core.validation import UpdateLimits
from flexlora.engines.flower.engine import FlowerEngine
from flexlora.engines.flower.settings import check_on_flower
from flexlora.federation import Federation
from flexlora.run import build_aggregator, client_side, make_plan, write_outputs
from flexlora.tracking import tracked

__all__ = ["run_deployment"]

log = logging.getLogger(__name__)


def _evaluator(cfg: RunConfig, host, tokenizer, exclude: set[str]):
    """Evaluate on the server's own held-out clients (never one a node trains on); nothing without data."""
    if cfg.data.path in ("", "none"):
        return lambda factors: {}
    from flexlora.data import open_source
    from flexlora.data.splits import split_clients
    from flexlora.evaluation import evaluate_clients

    source = open_source(cfg.data.path, cfg.data.format, **cfg.data.options)
    heldout_arg = (
        {"heldout_ids": cfg.data.heldout_ids}
        if cfg.data.heldout_ids
        else {"num_heldout": cfg.data.num_heldout}
    )
    _, heldout = split_clients(source, seed=cfg.federation.seed, **heldout_arg)
    heldout = [c for c in heldout if c not in exclude][: cfg.federation.eval_clients or None]
    if not heldout:
        log.warning("no held-out client outside the federation: the global adapter is not evaluated")
        return lambda factors: {}

    def evaluate(factors):
        if factors is not None:
            host.load(factors)
        try:
            return evaluate_clients(host.model, tokenizer, map(source.load, heldout), "test", cfg.eval)
        finally:
            host.unload()

    return evaluate


def run_deployment(cfg: RunConfig, engine: FlowerEngine) -> Path:
    """Run the federation over the engine's nodes, one client per node, and write the run directory.

    Returns:
        The run directory.

    Raises:
        flexlora.config.ConfigError: the config asks for what Flower does not carry (SLoRA's sparse stage,
            say), before anything is written.
        ValueError: a node declared no client id or rank, or two declared the same client.
        flexlora.core.errors.AggregationError: a round got fewer than ``federation.min_clients`` updates.
    """
    from flexlora.lora_host import LoraHost
    from flexlora.models import load_model

    check_on_flower(cfg)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    roster = engine.roster()
    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device, seed=cfg.federation.seed)
    host = LoraHost(model, cfg.model.target_modules)
    plan = make_plan(cfg, roster, host.shapes)
    notes = {engine.book.client_id(n): note for n, note in engine.book.budgets.items()}
    (run_dir / "assignment.json").write_text(json.dumps(assignment_record(roster, notes), indent=1))
    # the same method, robust / DP wrapping and update limits as `flexlora run` (the `security` section)
    aggregator = build_aggregator(cfg, plan)
    log.info("deployment: method %r over %d nodes", aggregator, len(roster))
    evaluate = _evaluator(cfg, host, tokenizer, set(roster))
    federation = Federation(
        plan,
        aggregator,
        engine,
        evaluate,
        run_dir,
        cfg.to_dict(),
        progress=False,
        limits=UpdateLimits(cfg.security.max_examples, cfg.security.norm_bound),
        round_retries=cfg.security.round_retries,
        **client_side(cfg),
    )
    with tracked(federation, cfg.tracking, run_dir, cfg.to_dict()):
        state = federation.run()
    write_outputs(run_dir, state, plan, aggregator, cfg.model.name)
    return run_dir
