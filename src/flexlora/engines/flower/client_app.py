"""The flexlora ``ClientApp``: declares the node's resources, trains jobs, reports eval loss.

Thin by design: the message is decoded by :mod:`.records`, the job runs through the same
:func:`flexlora.training.run_train_job` as the in-process engine, and the reply is encoded by :mod:`.records`.
Node config keys: ``lora-rank`` / ``lora-rank-type`` (resources; ``lora-rank="auto"`` with ``memory-gb`` and
optionally ``seconds-per-round``: chosen from the budget, :mod:`.auto_rank`), ``client-id`` (data partition),
``data-path`` / ``data-format`` (the node's own data).
"""

from __future__ import annotations

import dataclasses

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flexlora.engines.flower.auto_rank import node_record
from flexlora.engines.flower.nodes import NODE_RECORD
from flexlora.engines.flower.records import job_from_content, reply_content
from flexlora.engines.flower.worker import own_client, worker_for

__all__ = ["app"]

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer the server's question "what are your rank and client?" from the node config."""
    record = node_record(context.node_config, context.run_config)  # lora-rank="auto": from its budget
    return Message(RecordDict({NODE_RECORD: record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the job's client from the job's factors and reply with the update."""
    from flexlora.training import run_train_job

    job = job_from_content(msg.content)
    worker = worker_for(msg.content, context)
    if not job.client_id:
        job = dataclasses.replace(job, client_id=own_client(worker.source, context.node_config))
    result = run_train_job(
        worker.host, worker.tokenizer, worker.source.load(job.client_id), job, worker.train
    )
    return Message(reply_content(result), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss of the sent adapter on the client's eval examples (federated evaluation)."""
    from flexlora.evaluation import EvalConfig, evaluate_clients

    job = job_from_content(msg.content)
    worker = worker_for(msg.content, context)
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
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
