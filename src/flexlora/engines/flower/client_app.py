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

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from flexlora.engines.flower.node_service import forward, keeps_model

__all__ = ["app"]

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
    from flexlora.engines.flower.worker import train_reply

    return Message(train_reply(msg.content, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss of the sent adapter on the client's eval examples (federated evaluation)."""
    if keeps_model(context.node_config):
        return Message(forward("evaluate", msg.content, context), reply_to=msg)
    from flexlora.engines.flower.worker import evaluate_reply

    return Message(evaluate_reply(msg.content, context), reply_to=msg)
