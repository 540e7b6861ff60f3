"""Which nodes are there, and what each one declared: the query round-trip and the rank book.

A SuperNode declares its resources in its node config (``lora-rank=8`` or ``lora-rank-type="attn30-mlp200"``)
and, in a deployment, the data partition it holds (``client-id="7"``). The server learns them with one
``query`` message per node, answered by the ClientApp from its node config and cached for the run. Nodes
that declare no rank (simulation's virtual nodes) get one from the run's distribution.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from flexlora.core.ranks import RankType, assign_rank_types
from flexlora.engines.flower.auto_rank import budget_note
from flexlora.engines.flower.records import NodeDeclaration, ReplyError

__all__ = ["NodeBook", "exchange", "wait_for_nodes"]

log = logging.getLogger(__name__)

NODE_RECORD = "node"


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, poll: float = 1.0) -> list[int]:
    """Wait until at least ``minimum`` nodes are connected, at most ``timeout`` seconds.

    Returns:
        The connected node ids, sorted.

    Raises:
        TimeoutError: fewer than ``minimum`` nodes connected in time.
    """
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{len(nodes)} node(s) connected after {timeout:.0f}s, {minimum} needed")
        log.info("waiting for nodes: %d connected, %d needed", len(nodes), minimum)
        time.sleep(poll)
    return nodes


def exchange(
    grid: Grid, messages: Sequence[Message], timeout: float, poll: float = 0.2, liveness: float = 2.0
) -> tuple[list[Message | None], set[int]]:
    """Push ``messages`` and pull their replies until all arrived or ``timeout`` seconds passed.

    Like :meth:`Grid.send_and_receive`, but the replies come back in message order (``None`` where none
    arrived), the poll interval is ours (Flower's grid sleeps 3 s between pulls), and every ``liveness``
    seconds the connected nodes are checked: a message whose node went offline is not waited for.

    Returns:
        The replies in message order, and the destination nodes found offline meanwhile.
    """
    ids = list(grid.push_messages(messages))
    index = {mid: i for i, mid in enumerate(ids) if mid}
    replies: list[Message | None] = [None] * len(messages)
    pending = set(index)
    gone: set[int] = set()
    start = time.monotonic()
    checked = start
    while pending:
        for reply in grid.pull_messages(list(pending)):
            mid = reply.metadata.reply_to_message_id
            if mid in pending:
                replies[index[mid]] = reply
                pending.discard(mid)
        now = time.monotonic()
        if pending and now - checked >= liveness:
            checked = now
            live = set(grid.get_node_ids())
            for mid in list(pending):
                node = messages[index[mid]].metadata.dst_node_id
                if node not in live:
                    gone.add(node)
                    pending.discard(mid)
        if not pending or now - start >= timeout:
            break
        time.sleep(poll)
    return replies, gone


class NodeBook:
    """Node declarations, queried once per node and cached, and the rank type each node trains at.

    Args:
        distribution: rank types for nodes that declare none: a distribution name (``heavy-tail-strong``)
            or an explicit list (``["r8", "r30"]``); see :func:`flexlora.core.ranks.assign_rank_types`.
        seed: seeds the placement of the distribution's quotas on nodes.
        query_timeout: seconds to wait for query replies.
    """

    def __init__(
        self, distribution: str | Sequence[str | int] = "homo", seed: int = 0, query_timeout: float = 60.0
    ):
        self.distribution = distribution
        self.seed = seed
        self.query_timeout = query_timeout
        self.declared: dict[int, NodeDeclaration] = {}
        self._assigned: dict[int, RankType] = {}
        self._owner: dict[str, int] = {}  # client-id -> the first node that declared it
        self.budgets: dict[int, dict | None] = {}

    def query(self, grid: Grid, node_ids: Iterable[int], round_: int = 0) -> list[int]:
        """Ask the nodes not asked yet for their declarations.

        A node that declares a ``client-id`` which a node that is still connected declared in an earlier
        query is left out (logged): a late node cannot take over another node's client. Two nodes that
        declare the same id in one query are both recorded; the deployment roster refuses that run.

        Returns:
            The given node ids whose declaration is known (nodes that failed to answer are logged and left
            out; they are asked again next time).
        """
        node_ids = list(node_ids)
        new = [n for n in node_ids if n not in self.declared]
        if new:
            messages = [
                Message(RecordDict({"config": ConfigRecord({"server-round": round_})}), n, MessageType.QUERY)
                for n in new
            ]
            replies, _ = exchange(grid, messages, self.query_timeout)
            earlier, live = dict(self._owner), set(grid.get_node_ids())
            for node, reply in zip(new, replies, strict=True):
                if reply is None:
                    log.warning(
                        "node %d: no answer to the query within %.0fs; left out", node, self.query_timeout
                    )
                elif reply.has_error():
                    log.warning("node %d: query failed: %s; left out", node, reply.error.reason)
                else:
                    try:
                        record = reply.content.config_records.get(NODE_RECORD)
                        if record is None:
                            raise ReplyError(node, NODE_RECORD, "no ConfigRecord 'node' in the query reply")
                        note = budget_note(record, node)  # lora-rank="auto": the budget it was chosen by
                        decl = NodeDeclaration.from_record(record, node)
                        holder = earlier.get(decl.client_id) if decl.client_id else None
                        if holder is not None and holder != node and holder in live:
                            raise ReplyError(
                                node, "node[client-id]", f"{decl.client_id!r} is node {holder}'s client"
                            )
                        self.declared[node] = decl
                        self.budgets[node] = note
                        if decl.client_id and self._owner.get(decl.client_id) not in live:
                            self._owner[decl.client_id] = node
                    except ReplyError as exc:
                        log.warning("%s", exc)
            self._assign()
        return [n for n in node_ids if n in self.declared]

    def _assign(self) -> None:
        """Place the distribution on undeclared nodes, ordered by (partition-id, node id); late nodes extend
        the list, so earlier assignments never change."""
        todo = sorted(
            (n for n, d in self.declared.items() if d.rank_type is None and n not in self._assigned),
            key=lambda n: (
                self.declared[n].partition_id if self.declared[n].partition_id is not None else n,
                n,
            ),
        )
        if not todo:
            return
        start = len(self._assigned)
        types = assign_rank_types(start + len(todo), self.distribution, self.seed)
        for i, node in enumerate(todo):
            self._assigned[node] = types[start + i]

    def rank_type(self, node: int) -> RankType:
        """The node's declared rank type, else the one the distribution gave it.

        Raises:
            KeyError: the node was never queried successfully.
        """
        declared = self.declared[node].rank_type
        return declared if declared is not None else self._assigned[node]

    def owner(self, client_id: str) -> int | None:
        """The node that first declared ``client_id`` (and holds it while connected)."""
        return self._owner.get(client_id)

    def client_id(self, node: int) -> str | None:
        return self.declared[node].client_id if node in self.declared else None

    def forget(self, node: int) -> None:
        """Drop a node's cached declaration (it is asked again if it comes back)."""
        self.declared.pop(node, None)
        self.budgets.pop(node, None)
