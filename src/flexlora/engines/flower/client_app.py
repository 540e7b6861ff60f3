"""The flexlora ``ClientApp``: declares the node's resources, trains jobs, reports eval loss.

Thin by design: the message is decoded by :mod:`.records`, the job runs through the same
:func:`flexlora.training.run_train_job` as the in-process engine, and the reply is encoded by :mod:`.records`.
Node config keys: ``lora-rank`` / ``lora-rank-type`` (resources; ``lora-rank="auto"`` with ``memory-gb`` and
optionally ``seconds-per-round``: chosen from the budget, :mod:`.auto_rank`), ``client-id`` (data partition),
``data-path`` / ``data-format`` (the node's own data), ``keep-model=true`` (a node-local worker keeps the
model loaded across messages, :mod:`.node_service`). Importing this module imports neither torch nor the
model code: a kept node's ClientApp process only forwards the message.
"""

from __future__ import annotations

import dataclasses

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flexlora.engines.flower.node_service import forward, keeps_model

__all__ = ["app", "train_reply", "evaluate_reply"]

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer the server's question "what are your rank and client?" from the node config."""
    from flexlora.engines.flower.auto_rank import node_record
    from flexlora.engines.flower.nodes import NODE_RECORD

    record = node_record(context.node_config, context.run_config)  # lora-rank="auto": from its budget
    return Message(RecordDict({NODE_RECORD: record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the job's client from the job's factors and reply with the update."""
    if keeps_model(context.node_config):
        return Message(forward("train", msg.content, context), reply_to=msg)
    return Message(train_reply(msg.content, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss of the sent adapter on the client's eval examples (federated evaluation)."""
    if keeps_model(context.node_config):
        return Message(forward("evaluate", msg.content, context), reply_to=msg)
    return Message(evaluate_reply(msg.content, context), reply_to=msg)


def train_reply(content: RecordDict, context: Context) -> RecordDict:
    """The reply content of a ``train`` message: the trained update and its metrics."""
    from flexlora.engines.flower.records import job_from_content, reply_content
    from flexlora.engines.flower.worker import own_client, worker_for
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
    from flexlora.engines.flower.worker import own_client, worker_for
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
