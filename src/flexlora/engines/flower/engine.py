"""The Flower engine: our round loop's training jobs carried out as Flower messages over a ``Grid``.

Two placements:

* ``simulation``: nodes are interchangeable workers (Flower's simulation runtime, or a few SuperNodes that
  can read every client's data). Each job goes to a live node, round-robin; the message carries the client
  id and the factors to start from.
* ``deployment``: each SuperNode is one client, with its own data partition and its declared rank
  (``--node-config 'client-id="7" lora-rank=8'``). :meth:`FlowerEngine.roster` asks every node once; the
  round loop samples from that roster, and each job goes to the node that holds its client.

A node that errors, times out or replies with a malformed update becomes a :class:`TrainFailure` with the
reason; the round goes on with the others.

Example::

    engine = FlowerEngine(grid, "deployment", round_timeout=600)
    roster = engine.roster()          # {"7": RankType("r8", 8, 8), ...}
    outcomes = engine.train(jobs)     # one TrainResult or TrainFailure per job, in job order
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from flwr.app import ConfigRecord, Message, MessageType
from flwr.serverapp import Grid

from flexlora.contracts import TrainFailure, TrainJob, TrainResult
from flexlora.core.ranks import RankType
from flexlora.engines.flower.nodes import NodeBook, exchange, wait_for_nodes
from flexlora.engines.flower.records import (
    MAX_EXAMPLES,
    SETTINGS_RECORD,
    ReplyError,
    factors_nbytes,
    job_to_content,
    update_from_reply,
)

__all__ = ["FlowerEngine", "Placement"]

log = logging.getLogger(__name__)

Placement = Literal["simulation", "deployment"]


class FlowerEngine:
    """Implements :class:`flexlora.contracts.Engine` on a Flower ``Grid`` inside a ServerApp.

    Args:
        grid: the ServerApp's grid.
        placement: ``simulation`` (any node runs any client) or ``deployment`` (a node is one client).
        settings: client-side settings sent with every job (``model``, ``data``, ``train`` sections of the
            run config); ``None`` lets nodes use their own run config.
        round_timeout: seconds to wait for a round's replies.
        min_nodes: nodes to wait for before the first round, at most ``wait_timeout`` seconds.
        query_timeout: seconds to wait for the nodes' declarations (deployment).
        poll_interval: seconds between pulls of replies.
        max_examples: a reply claiming more training examples is refused.
        on_close: called by :meth:`close` (e.g. to stop a simulation runtime).

    Raises:
        ValueError: unknown placement.
    """

    name = "flower"

    def __init__(
        self,
        grid: Grid,
        placement: Placement = "simulation",
        *,
        settings: Mapping[str, Any] | None = None,
        round_timeout: float = 600.0,
        min_nodes: int = 1,
        wait_timeout: float = 300.0,
        query_timeout: float = 60.0,
        poll_interval: float = 0.2,
        max_examples: int = MAX_EXAMPLES,
        on_close: Callable[[], None] | None = None,
    ):
        if placement not in ("simulation", "deployment"):
            raise ValueError(f"placement must be 'simulation' or 'deployment', got {placement!r}")
        self.grid, self.placement = grid, placement
        self.settings = None if settings is None else json.dumps(dict(settings), sort_keys=True)
        self.round_timeout, self.poll_interval, self.max_examples = round_timeout, poll_interval, max_examples
        self.min_nodes, self.wait_timeout = min_nodes, wait_timeout
        self.book = NodeBook(query_timeout=query_timeout)
        self._on_close = on_close
        self._sent = self._received = 0
        self._by_client: dict[str, int] = {}
        self._next = 0  # round-robin position (simulation)
        self.rounds: list[dict[str, Any]] = []  # per round: each job's node, ranks, bytes, outcome

    # --------------------------------------------------------------------------------------- nodes
    def nodes(self) -> list[int]:
        """Connected node ids, sorted (waits up to ``wait_timeout`` for ``min_nodes``).

        Raises:
            TimeoutError: too few nodes connected.
        """
        return wait_for_nodes(self.grid, self.min_nodes, self.wait_timeout)

    def roster(self) -> dict[str, RankType]:
        """Deployment: every node's declared client id and rank type, asked once per node.

        Returns:
            ``{client_id: rank_type}`` in client-id order.

        Raises:
            ValueError: a node declared no ``client-id`` or no rank, or two nodes declared the same client.
        """
        nodes = self.book.query(self.grid, self.nodes())
        roster: dict[str, RankType] = {}
        for node in nodes:
            decl = self.book.declared[node]
            if decl.client_id is None or decl.rank_type is None:
                raise ValueError(
                    f"node {node}: a deployment node must declare client-id and lora-rank (or lora-rank-type) "
                    f"in its --node-config, got {decl}"
                )
            if decl.client_id in self._by_client and self._by_client[decl.client_id] != node:
                raise ValueError(
                    f"nodes {self._by_client[decl.client_id]} and {node} both declare client-id {decl.client_id!r}"
                )
            self._by_client[decl.client_id] = node
            roster[decl.client_id] = decl.rank_type
        log.info(
            "roster: %s", ", ".join(f"{c}@node {self._by_client[c]} ({t.name})" for c, t in roster.items())
        )
        return dict(sorted(roster.items()))

    def _place(self, jobs: list[TrainJob]) -> list[int | str]:
        """A node id per job, or the reason it cannot be placed."""
        live = self.nodes()
        if self.placement == "simulation":
            placed: list[int | str] = [live[(self._next + i) % len(live)] for i in range(len(jobs))]
            self._next += len(jobs)
            return placed
        if not self._by_client:
            self.roster()
        out: list[int | str] = []
        for job in jobs:
            node = self._by_client.get(job.client_id)
            if node is None:
                out.append(f"no node declares client-id {job.client_id!r}")
            elif node not in live:
                out.append(f"node {node} of client {job.client_id!r} is not connected")
            else:
                out.append(node)
        return out

    # --------------------------------------------------------------------------------------- training
    def train(self, jobs: list[TrainJob]) -> list[TrainResult | TrainFailure]:
        """Send each job to its node and collect the replies, at most ``round_timeout`` seconds.

        Returns:
            One :class:`TrainResult` or :class:`TrainFailure` per job, in job order; never raises for a
            single node's failure.
        """
        t0 = time.perf_counter()
        placed = self._place(jobs)
        outcomes: list[TrainResult | TrainFailure | None] = [None] * len(jobs)
        messages, index = [], []
        for i, (job, node) in enumerate(zip(jobs, placed, strict=True)):
            if isinstance(node, str):
                outcomes[i] = TrainFailure(job.client_id, node)
                continue
            content = job_to_content(job)
            if self.settings is not None:
                content[SETTINGS_RECORD] = ConfigRecord({"json": self.settings})
            ttl = self.round_timeout + 60.0  # expired jobs never reach a node that comes back late
            messages.append(Message(content, node, MessageType.TRAIN, ttl=ttl, group_id=str(job.round)))
            index.append(i)
            self._sent += factors_nbytes(job.init) + factors_nbytes(job.frozen)
        replies, gone = (
            exchange(self.grid, messages, self.round_timeout, self.poll_interval) if messages else ([], set())
        )
        record: dict[str, Any] = {"round": jobs[0].round if jobs else None, "jobs": []}
        for i, reply in zip(index, replies, strict=True):
            job, node = jobs[i], placed[i]
            entry = {
                "client": job.client_id,
                "node": node,
                "ranks": sorted({f.rank for f in job.init.values()}),
                "bytes_sent": factors_nbytes(job.init) + factors_nbytes(job.frozen),
            }
            outcomes[i] = self._outcome(job, node, reply, entry, node in gone)
            record["jobs"].append(entry)
        failures = [o for o in outcomes if isinstance(o, TrainFailure)]
        log.info(
            "round %s: received %d results, %d failures (%.1fs)",
            record["round"],
            len(jobs) - len(failures),
            len(failures),
            time.perf_counter() - t0,
        )
        for f in failures:
            log.warning("\tclient %s left out: %s", f.client_id, f.reason)
        self.rounds.append(record)
        return [o for o in outcomes if o is not None]

    def _outcome(
        self, job: TrainJob, node: int, reply: Message | None, entry: dict, gone: bool
    ) -> TrainResult | TrainFailure:
        if reply is None and gone:
            reason = f"node {node} went offline during the round; left out of this round"
        elif reply is None:
            reason = f"node {node}: no reply within {self.round_timeout:g}s; left out of this round"
        elif reply.has_error():
            reason = (
                f"node {node}: {reply.error.reason} (error code {reply.error.code}); left out of this round"
            )
        else:
            try:
                update, metrics, nbytes = update_from_reply(
                    reply.content, job.init, job.client_id, node, self.max_examples
                )
            except ReplyError as exc:
                reason = str(exc)
            else:
                self._received += nbytes
                entry.update(bytes_received=nbytes, num_examples=update.num_examples)
                entry["trained_ranks"] = sorted({f.rank for f in update.modules.values()})
                return TrainResult(update, metrics)
        entry["failure"] = reason
        return TrainFailure(job.client_id, reason)

    def bytes_moved(self) -> tuple[int, int]:
        """Tensor bytes sent to and received from nodes since the last call."""
        moved = (self._sent, self._received)
        self._sent = self._received = 0
        return moved

    def close(self) -> None:
        """Release the grid's owner (a simulation runtime stops; a ServerApp's grid is left to Flower)."""
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()
