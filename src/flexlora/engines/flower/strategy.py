"""A Flower ``Strategy`` that aggregates LoRA adapters of heterogeneous ranks with any method of our core.

Flower's FedAvg sends one shared payload to every node. FlexLoRA cannot: each node receives the global
update truncated to its own rank, so :meth:`FlexLoRAStrategy.configure_train` builds one ``RecordDict`` per
node. Replies are triaged (errors logged with node and reason; malformed updates refused with a
:class:`~flexlora.engines.flower.records.ReplyError`) and the rest go to the aggregator.

Example (inside your own ``ServerApp``)::

    from flwr.app import ArrayRecord
    from flexlora.engines.flower import FlexLoRAStrategy

    @app.main()
    def main(grid, context):
        strategy = FlexLoRAStrategy("flexlora", shapes=shapes, distribution="heavy-tail-strong")
        result = strategy.start(grid, ArrayRecord(), num_rounds=10)  # empty: the shared seeded init

Payloads are cut by :meth:`flexlora.federation.Federation.jobs`, so a Flower run and an in-process run at
the same seed start every client from the same factors.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flexlora.checkpoint import ServerState
from flexlora.contracts import TrainJob
from flexlora.core.aggregators import GlobalState
from flexlora.core.lora import LoraUpdate, alpha_problem
from flexlora.core.ranks import module_ranks
from flexlora.core.validation import UpdateLimits, UpdateRejected, check_update
from flexlora.engines.flower.nodes import NodeBook, wait_for_nodes
from flexlora.engines.flower.records import (
    MAX_EXAMPLES,
    ReplyError,
    factors_nbytes,
    finite_metrics,
    job_to_content,
    state_from_arrays,
    state_to_arrays,
    update_from_reply,
)
from flexlora.federation import Federation, FederationPlan, derive_seed
from flexlora.methods import get_method

__all__ = ["FlexLoRAStrategy"]

log = logging.getLogger(__name__)


class FlexLoRAStrategy(Strategy):
    """Heterogeneous-rank LoRA aggregation as a Flower strategy.

    Args:
        method: ``flexlora``, ``fedavg`` / ``fedit``, ``hetlora``, ``flora``, ``ffa``, ``raflora`` or ``florist``.
        shapes: ``(d, k)`` of every adapted module of the base model (``flexlora.models.target_module_shapes``).
        alpha, use_rslora: the LoRA scale payloads are cut for.
        distribution: rank types of nodes that declare none (a distribution name or a list of types).
        seed: seeds node sampling, the rank placement and every client's init (as in the local engine).
        fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes: as in
            Flower's FedAvg. Federated evaluation (loss on the nodes' eval data) is off by default.
        min_train_replies: valid updates needed for a round to count; with fewer, the global state is kept.
        query_timeout: seconds to wait for nodes to declare their ranks.
        wait_timeout: seconds to wait for ``min_available_nodes`` to connect.
        max_examples: a reply claiming more training examples is refused.
        norm_bound: a reply whose effective update has ``||dW_i||_F`` above this is refused (as
            ``security.norm_bound`` does in the round loop); ``None``: only the overflow guard applies.
        method_options: keyword arguments of the aggregator (e.g. ``{"svd": "dense"}``).

    Raises:
        ValueError: unknown method or bad option.
    """

    def __init__(
        self,
        method: str = "flexlora",
        *,
        shapes: Mapping[str, tuple[int, int]],
        alpha: float = 16.0,
        use_rslora: bool = False,
        distribution: str | Sequence[str | int] = "homo",
        seed: int = 0,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        min_train_replies: int = 1,
        query_timeout: float = 60.0,
        wait_timeout: float = 600.0,
        max_examples: int = MAX_EXAMPLES,
        norm_bound: float | None = None,
        method_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not 0.0 <= fraction_train <= 1.0 or not 0.0 <= fraction_evaluate <= 1.0:
            raise ValueError(f"fractions must be in [0, 1], got {fraction_train}, {fraction_evaluate}")
        if problem := alpha_problem(alpha):
            raise ValueError(f"alpha {problem}")
        self.recipe = get_method(method).client
        self.aggregator = get_method(method).make_aggregator(**dict(method_options or {}))
        self.method = method
        self.shapes = {name: (int(d), int(k)) for name, (d, k) in shapes.items()}
        self.alpha, self.use_rslora, self.seed = float(alpha), bool(use_rslora), int(seed)
        self.fraction_train, self.fraction_evaluate = fraction_train, fraction_evaluate
        self.min_train_nodes = 0 if fraction_train == 0 else min_train_nodes
        self.min_evaluate_nodes = 0 if fraction_evaluate == 0 else min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.min_train_replies = max(1, min_train_replies)
        self.wait_timeout, self.max_examples = wait_timeout, max_examples
        self.limits = UpdateLimits(max_examples, norm_bound)  # ValueError for a bad bound
        self.book = NodeBook(distribution, seed, query_timeout)
        self.state: GlobalState | None = None
        self._arrays: ArrayRecord | None = None  # the record self.state was sent or returned as
        self._sent: dict[int, TrainJob] = {}
        self.history: list[dict[str, Any]] = []  # per round: each node's client, rank type, bytes, outcome

    # ------------------------------------------------------------------------------------------ helpers
    def summary(self) -> None:
        """Log the method and its hyperparameters as a tree."""
        log.info("FlexLoRAStrategy")
        log.info("├── method: %r", self.aggregator)
        log.info(
            "├── modules: %d, alpha %g%s",
            len(self.shapes),
            self.alpha,
            " (rsLoRA)" if self.use_rslora else "",
        )
        log.info("├── distribution (undeclared nodes): %s, seed %d", self.book.distribution, self.seed)
        log.info("├── fraction: train %.2f | evaluate %.2f", self.fraction_train, self.fraction_evaluate)
        log.info(
            "├── minimum nodes: train %d | evaluate %d | available %d",
            self.min_train_nodes,
            self.min_evaluate_nodes,
            self.min_available_nodes,
        )
        log.info("├── update norm bound: %s", self.limits.norm_bound)
        log.info("└── minimum valid replies per round: %d", self.min_train_replies)

    def _sample(self, grid: Grid, fraction: float, minimum: int, server_round: int, what: str) -> list[int]:
        nodes = wait_for_nodes(grid, max(self.min_available_nodes, minimum), self.wait_timeout)
        size = min(len(nodes), max(int(len(nodes) * fraction), minimum))
        rng = random.Random(derive_seed(self.seed, what, server_round))
        sampled = sorted(rng.sample(nodes, size))
        log.info("%s: sampled %d nodes (out of %d)", what, len(sampled), len(nodes))
        known = self.book.query(grid, sampled, server_round)
        return [n for n in known if self._holds_its_client(n)]

    def _holds_its_client(self, node: int) -> bool:
        """A node trains as its declared client only if it is that client's first declarer."""
        client = self.book.client_id(node)
        if client is None or self.book.owner(client) == node:
            return True
        log.warning(
            "node %d declares client-id %r, node %d's; left out", node, client, self.book.owner(client)
        )
        return False

    def _label(self, node: int) -> str:
        """The client a node trains as: its declared ``client-id``, else ``node-<id>``."""
        return self.book.client_id(node) or f"node-{node}"

    def _global(self, arrays: ArrayRecord) -> GlobalState:
        """The state ``arrays`` holds; an empty record means the shared seeded init at the largest ranks."""
        if arrays is self._arrays and self.state is not None:
            return self.state
        if len(arrays) == 0:
            widest: dict[str, int] = {}
            for node in self.book.declared:
                for name, r in module_ranks(self.book.rank_type(node), self.shapes).items():
                    widest[name] = max(widest.get(name, 0), r)
            state = GlobalState.initial(self.shapes, widest, self.aggregator.name, self.seed)
        else:
            state = state_from_arrays(arrays, self.aggregator.name)
        self.state, self._arrays = state, arrays
        return state

    def _messages(
        self, state: GlobalState, server_round: int, nodes: list[int], config: ConfigRecord, message_type: str
    ) -> tuple[list[Message], dict[int, TrainJob]]:
        """One message per node, with that node's payload at its own ranks (built by the round loop's
        :meth:`Federation.jobs`)."""
        labels = [self._label(n) for n in nodes]
        plan = FederationPlan(
            pool=labels,
            rank_types={lab: self.book.rank_type(n) for lab, n in zip(labels, nodes, strict=True)},
            shapes=self.shapes,
            rounds=server_round,
            clients_per_round=len(labels),
            min_clients=self.min_train_replies,
            seed=self.seed,
            alpha=self.alpha,
            use_rslora=self.use_rslora,
        )
        federation = Federation(plan, self.aggregator, None, None, ".", {}, recipe=self.recipe)  # type: ignore[arg-type]
        jobs = federation.jobs(ServerState(server_round - 1, state, {}), server_round, labels)
        messages, sent = [], {}
        for node, job in zip(nodes, jobs, strict=True):
            content = job_to_content(job)
            cfg = content["config"]
            for key, value in config.items():
                cfg.setdefault(key, value)
            cfg["server-round"] = server_round
            if self.book.client_id(node) is None:
                cfg["client-id"] = ""  # the node trains on its own partition
            messages.append(Message(content, node, message_type, group_id=str(server_round)))
            sent[node] = job
        return messages, sent

    # ------------------------------------------------------------------------------------------ training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and build one train message per node, at that node's own ranks.

        Args:
            server_round: 1-based round, injected as ``server-round``.
            arrays: the global state from the previous round (an empty record for the seeded init).
            config: extra entries for every node's ``config`` record.
            grid: used to sample nodes and ask new nodes for their ranks.

        Returns:
            The messages (none if ``fraction_train`` is 0).

        Raises:
            TimeoutError: fewer than ``min_available_nodes`` connected within ``wait_timeout``.
        """
        self._sent = {}
        if self.fraction_train == 0.0:
            return []
        nodes = self._sample(grid, self.fraction_train, self.min_train_nodes, server_round, "configure_train")
        state = self._global(arrays)
        messages, self._sent = self._messages(state, server_round, nodes, config, MessageType.TRAIN)
        self.history.append(
            {
                "round": server_round,
                "nodes": {
                    node: {
                        "client": self._label(node),
                        "rank_type": self.book.rank_type(node).name,
                        "bytes_sent": factors_nbytes(job.init) + factors_nbytes(job.frozen),
                    }
                    for node, job in self._sent.items()
                },
            }
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Triage the replies, check each update against what its node was sent, and aggregate.

        Returns:
            The new global state and the round's metrics (example-weighted train metrics, ``num-results``,
            ``num-failures``, ``bytes-sent``, ``bytes-received``); ``(None, None)`` when fewer than
            ``min_train_replies`` valid updates arrived (the global state is kept).
        """
        record = self.history[-1] if self.history and self.history[-1]["round"] == server_round else None
        updates: list[LoraUpdate] = []
        metrics: list[dict[str, float]] = []
        failures: dict[int, str] = {}
        received = 0
        for msg in replies:
            node = msg.metadata.src_node_id
            job = self._sent.pop(node, None)
            if msg.has_error():
                failures[node] = f"error {msg.error.code}: {msg.error.reason}"
            elif job is None:
                failures[node] = "unexpected reply (no train message was sent to it this round)"
            else:
                claimed = "" if self.book.client_id(node) is None else job.client_id
                try:
                    update, extra, nbytes = update_from_reply(
                        msg.content, job.init, claimed, node, self.max_examples
                    )
                    update.client_id = update.client_id or job.client_id
                    check_update(  # the same checks as our round loop applies on every engine
                        update,
                        client_id=update.client_id,
                        ranks={n: f.rank for n, f in job.init.items()},
                        shapes=self.shapes,
                        alpha=self.alpha,
                        use_rslora=self.use_rslora,
                        limits=self.limits,
                        frozen_A={n: f.A for n, f in job.init.items()} if job.freeze_A else None,
                    )
                except (ReplyError, UpdateRejected) as exc:
                    failures[node] = str(exc)
                else:
                    updates.append(update)
                    metrics.append({**extra, "num-examples": update.num_examples})
                    received += nbytes
                    if record is not None:
                        record["nodes"][node]["bytes_received"] = nbytes
        for node in self._sent:
            failures[node] = "no reply before the round's timeout"
        self._sent = {}
        log.info("aggregate_train: received %d results and %d failures", len(updates), len(failures))
        for node, reason in failures.items():
            log.warning("\tnode %d left out of round %d: %s", node, server_round, reason)
            if record is not None and node in record["nodes"]:
                record["nodes"][node]["failure"] = reason
        if len(updates) < self.min_train_replies:
            log.warning(
                "round %d: %d valid updates, %d needed; the global state is kept",
                server_round,
                len(updates),
                self.min_train_replies,
            )
            return None, None
        self.state = self.aggregator.aggregate(updates, previous=self.state)
        self._arrays = state_to_arrays(self.state)
        out = _weighted(metrics)
        out["num-results"], out["num-failures"] = len(updates), len(failures)
        out["bytes-received"] = received
        if record is not None:
            out["bytes-sent"] = sum(n["bytes_sent"] for n in record["nodes"].values())
        return self._arrays, out

    # ---------------------------------------------------------------------------------------- evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled node the global state at its own ranks, to report its loss on its eval data
        (off unless ``fraction_evaluate > 0``)."""
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(
            grid, self.fraction_evaluate, self.min_evaluate_nodes, server_round, "configure_evaluate"
        )
        messages, _ = self._messages(self._global(arrays), server_round, nodes, config, MessageType.EVALUATE)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the nodes' evaluation metrics (errors are logged and left out)."""
        rows = []
        for msg in replies:
            if msg.has_error():
                log.warning("node %d: evaluation failed: %s", msg.metadata.src_node_id, msg.error.reason)
                continue
            node = msg.metadata.src_node_id
            m = msg.content.metric_records.get("metrics")
            n = None if m is None else m.get("num-examples")
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.max_examples:
                log.warning(
                    "node %d: evaluation reply without num-examples in [1, %d]", node, self.max_examples
                )
                continue
            rows.append({**finite_metrics(node, m), "num-examples": n})
        return _weighted(rows) if rows else None


def _weighted(rows: list[dict[str, float]]) -> MetricRecord:
    """Example-weighted means of every metric (``num-examples`` summed); a mean that overflows is dropped
    with a logged reason."""
    total = sum(r["num-examples"] for r in rows)
    out = MetricRecord({"num-examples": int(total)})
    keys = sorted({k for r in rows for k in r} - {"num-examples"})
    for key in keys:
        pairs = [(r["num-examples"], r[key]) for r in rows if key in r]
        weight = sum(n for n, _ in pairs)
        mean = sum(n * v for n, v in pairs) / weight if weight else math.nan
        if math.isfinite(mean):
            out[key] = mean
        else:
            log.warning("round metric %s is not finite (overflow); dropped", key)
    return out
