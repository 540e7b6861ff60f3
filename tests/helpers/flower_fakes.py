"""A Grid without a Flower runtime, messages go straight to Python handlers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from flexlora.contracts import TrainResult
from flexlora.core.lora import LoraFactors, LoraUpdate
from flexlora.engines.flower.nodes import NODE_RECORD
from flexlora.engines.flower.records import job_from_content, node_declaration, reply_content

Handler = Callable[[Message], Message | None]


def fake_update(job, num_examples: int, seed: int) -> LoraUpdate:
    """A 'trained' adapter: the init plus seeded noise, at the init's ranks."""
    gen = torch.Generator().manual_seed(seed)
    modules = {
        name: LoraFactors(
            f.A + (0.0 if job.freeze_A else 0.1) * torch.randn(f.A.shape, generator=gen),
            f.B + 0.1 * torch.randn(f.B.shape, generator=gen),
            f.alpha,
            f.use_rslora,
        )
        for name, f in job.init.items()
    }
    return LoraUpdate(modules, num_examples, job.client_id)


def trainer(node_config: dict, num_examples: int = 10, seed: int = 0) -> Handler:
    """A node that answers queries from ``node_config`` and 'trains' with :func:`fake_update`."""

    def handle(msg: Message) -> Message | None:
        kind = msg.metadata.message_type
        if kind == MessageType.QUERY:
            record = node_declaration(node_config).to_record()
            return Message(RecordDict({NODE_RECORD: record}), reply_to=msg)
        job = job_from_content(msg.content)
        if not job.client_id:
            job.client_id = str(node_config.get("client-id", f"p{node_config.get('partition-id', 0)}"))
        update = fake_update(job, num_examples, seed + msg.metadata.dst_node_id + job.round)
        return Message(reply_content(TrainResult(update, {"train_loss": 1.0 / job.round})), reply_to=msg)

    return handle


class FakeGrid(Grid):
    """Calls ``handlers[node](message)`` on push; ``None`` from a handler means the reply never comes."""

    def __init__(self, handlers: dict[int, Handler]):
        if TaskIdentity._run_id is None:  # what a ServerApp process has set when messages are built
            TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        self.handlers = handlers
        self.pending: dict[str, Message] = {}
        self.sent: list[Message] = []

    def set_run(self, run) -> None:  # pragma: no cover - not used
        pass

    @property
    def run(self):  # pragma: no cover - not used
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.handlers)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            self.sent.append(msg)
            handler = self.handlers.get(msg.metadata.dst_node_id)
            reply = handler(msg) if handler else None
            if reply is not None:
                self.pending[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.pending.pop(m) for m in list(message_ids) if m in self.pending]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
