"""The node side: one base model and one data source per process, and a node's own client.

A ClientApp process keeps its :class:`~flexlora.lora_host.LoraHost` and data source in :data:`_CACHE`, keyed
by the settings that built them, so Flower's simulation actors load the model once for the whole run (a
deployment SuperNode starts a fresh ClientApp process per message and so loads it per message; the tiny model
and SmolLM2's safetensors cache load in about a second).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from flwr.app import Context, MetricRecord, RecordDict

from flexlora.engines.flower.records import SETTINGS_RECORD
from flexlora.engines.flower.settings import client_settings, parse_client_settings, run_config_from_flower
from flexlora.training import TrainConfig

__all__ = ["Worker", "worker_for", "own_client", "train_reply", "evaluate_reply"]

log = logging.getLogger(__name__)


@dataclass
class Worker:
    """What a node trains with: the model host, its tokenizer, the data source and the train settings."""

    host: Any
    tokenizer: Any
    source: Any
    train: TrainConfig


_CACHE: dict[str, tuple[Any, Any, Any]] = {}


def _settings(content: RecordDict, context: Context) -> dict[str, Any]:
    """Settings sent with the job (simulation engine), else the node's run config (plain Flower runs).
    A node's own ``data-path`` (node config) always wins: a deployment node reads only its own data."""
    if SETTINGS_RECORD in content:
        raw = json.loads(str(content[SETTINGS_RECORD]["json"]))
    else:
        cfg, _ = run_config_from_flower(dict(context.run_config))
        raw = client_settings(cfg)
    if "data-path" in context.node_config:
        raw["data"] = {**raw["data"], "path": str(context.node_config["data-path"])}
        if "data-format" in context.node_config:
            raw["data"]["format"] = str(context.node_config["data-format"]) or None
    return raw


def worker_for(content: RecordDict, context: Context) -> Worker:
    """The process-wide worker for this message's settings (built on first use).

    Raises:
        ValueError: malformed settings.
    """
    from flexlora.data import open_source
    from flexlora.lora_host import LoraHost
    from flexlora.models import load_model

    model_cfg, data_cfg, train_cfg, seed = parse_client_settings(_settings(content, context))
    key = json.dumps({"model": asdict(model_cfg), "data": asdict(data_cfg), "seed": seed}, sort_keys=True)
    if key not in _CACHE:
        _CACHE.clear()  # one model per process
        model, tokenizer = load_model(model_cfg.name, model_cfg.dtype, model_cfg.device, seed=seed)
        host = LoraHost(model, model_cfg.target_modules)
        source = open_source(data_cfg.path, data_cfg.format, **data_cfg.options)
        _CACHE[key] = (host, tokenizer, source)
        log.info("node %s: loaded model %r and %r", context.node_id, model_cfg.name, source)
    host, tokenizer, source = _CACHE[key]
    return Worker(host, tokenizer, source, train_cfg)


def own_client(source: Any, node_config: Mapping[str, Any]) -> str:
    """The client a node trains as when the server leaves it open: ``client-id`` from the node config, else
    Flower's ``partition-id`` into the source's clients, else the source's only client.

    Raises:
        ValueError: none of these identifies a client of ``source``.
    """
    ids = source.client_ids()
    if "client-id" in node_config:
        cid = str(node_config["client-id"])
        if cid not in ids:
            raise ValueError(f"node config client-id={cid!r} is not a client of {source!r}")
        return cid
    if "partition-id" in node_config:
        return ids[int(node_config["partition-id"]) % len(ids)]
    if len(ids) == 1:
        return ids[0]
    raise ValueError(f"set client-id in the node config: {source!r} has {len(ids)} clients")


def train_reply(content: RecordDict, context: Context) -> RecordDict:
    """The reply content of a ``train`` message: the trained update and its metrics."""
    from flexlora.engines.flower.records import job_from_content, reply_content
    from flexlora.training import run_train_job

    job = job_from_content(content)
    worker = worker_for(content, context)
    if not job.client_id:
        job = dataclasses.replace(job, client_id=own_client(worker.source, context.node_config))
    result = run_train_job(
        worker.host, worker.tokenizer, worker.source.load(job.client_id), job, worker.train
    )
    return reply_content(result)


def evaluate_reply(content: RecordDict, context: Context) -> RecordDict:
    """The reply content of an ``evaluate`` message: the sent adapter's loss on the client's examples."""
    from flexlora.engines.flower.records import job_from_content
    from flexlora.evaluation import EvalConfig, evaluate_clients

    job = job_from_content(content)
    worker = worker_for(content, context)
    client_id = job.client_id or own_client(worker.source, context.node_config)
    worker.host.load(job.init, frozen=job.frozen)
    try:
        cfg = EvalConfig(generate=False, template=worker.train.template, max_length=worker.train.max_length)
        out = evaluate_clients(
            worker.host.model, worker.tokenizer, [worker.source.load(client_id)], "eval", cfg
        )
    finally:
        worker.host.unload()
    metrics = MetricRecord({"num-examples": int(out["num_examples"]), "eval_loss": float(out["loss"])})
    return RecordDict({"metrics": metrics})
