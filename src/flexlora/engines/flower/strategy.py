"""A Flower ``Strategy`` that aggregates LoRA adapters of heterogeneous ranks with any method of our core.

Flower's FedAvg sends one shared payload to every node. FlexLoRA cannot: each node receives the global
update truncated to its own rank, so :meth:`FlexLoRAStrategy.configure_train` builds one ``RecordDict`` per
node. It is built from the round loop's pieces (:mod:`flexlora.federation`): payloads are cut by
:func:`~flexlora.federation.cut_jobs` (so a Flower run and an in-process run at the same seed start every
client from the same factors, with the method's client recipe), each decoded reply is checked by
:func:`~flexlora.federation.check_outcome` (errors logged with node and reason; malformed replies refused with a
:class:`~flexlora.engines.flower.records.ReplyError`), and the aggregator is wrapped in the DP or robust rule
of a :class:`~flexlora.config.SecurityConfig` by :func:`flexlora.run.harden`, as in ``flexlora run``.

Example (inside your own ``ServerApp``)::

    from flwr.app import ArrayRecord
    from flexlora.engines.flower import FlexLoRAStrategy

    @app.main()
    def main(grid, context):
        strategy = FlexLoRAStrategy("flexlora", shapes=shapes, distribution="heavy-tail-strong")
        result = strategy.start(grid, ArrayRecord(), num_rounds=10)  # empty: the shared seeded init

With a robust rule or client-level DP (``population``: the nodes that may be sampled; DP's denominator is
the number the strategy samples from them)::

    FlexLoRAStrategy("flexlora", shapes=shapes, security=SecurityConfig(robust="median"))
    FlexLoRAStrategy("flexlora", shapes=shapes, population=100, fraction_train=0.1,
                     security=SecurityConfig(clip_norm=1.0, dp_noise_multiplier=1.0))
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flexlora.checkpoint import ServerState
from flexlora.config import SecurityConfig, security_problems
from flexlora.contracts import TrainJob, TrainResult
from flexlora.core.aggregators import GlobalState
from flexlora.core.lora import LoraUpdate, alpha_problem
from flexlora.core.privacy import PrivateAggregator
from flexlora.core.ranks import module_ranks
from flexlora.core.validation import UpdateLimits
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
from flexlora.federation import FederationPlan, check_outcome, cut_jobs, derive_seed
from flexlora.methods import Method, get_method
from flexlora.run import harden

__all__ = ["FlexLoRAStrategy"]

log = logging.getLogger(__name__)


class FlexLoRAStrategy(Strategy):
    """Heterogeneous-rank LoRA aggregation as a Flower strategy.

    Args:
        method: a registered method that runs on Flower (:data:`flexlora.methods.METHODS`: ``flexlora``,
            ``fedavg``, ``fedit``, ``hetlora``, ``flora``, ``ffa``, ``raflora``, ``florist``, ...).
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
        security: the round loop's ``security`` section: its ``robust`` rule or client-level DP wraps the
            aggregator (:func:`flexlora.run.harden`); its ``max_examples`` and ``norm_bound`` replace the
            arguments of those names (give one or the other). ``round_retries`` must be 0.
        population: the nodes that may be sampled; DP needs it (its denominator ``m`` is what the strategy
            samples from ``population`` nodes: ``max(int(population * fraction_train), min_train_nodes)``).

    Raises:
        ValueError: unknown method, a method Flower cannot run (stages or a tail penalty), bad option,
            DP for a method it does not support or without ``population``.
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
        security: SecurityConfig | None = None,
        population: int | None = None,
    ) -> None:
        if not 0.0 <= fraction_train <= 1.0 or not 0.0 <= fraction_evaluate <= 1.0:
            raise ValueError(f"fractions must be in [0, 1], got {fraction_train}, {fraction_evaluate}")
        if problem := alpha_problem(alpha):
            raise ValueError(f"alpha {problem}")
        spec = _flower_method(method)
        self.recipe, self.method = spec.client, method
        self.shapes = {name: (int(d), int(k)) for name, (d, k) in shapes.items()}
        self.alpha, self.use_rslora, self.seed = float(alpha), bool(use_rslora), int(seed)
        self.fraction_train, self.fraction_evaluate = fraction_train, fraction_evaluate
        self.min_train_nodes = 0 if fraction_train == 0 else min_train_nodes
        self.min_evaluate_nodes = 0 if fraction_evaluate == 0 else min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.min_train_replies = max(1, min_train_replies)
        self.security = _security(security, max_examples, norm_bound, method)
        self.wait_timeout, self.max_examples = wait_timeout, self.security.max_examples
        self.limits = UpdateLimits(self.max_examples, self.security.norm_bound)  # ValueError for a bad bound
        self.aggregator = self._hardened(spec, method_options, population)
        self._releases = 0  # rounds aggregated (DP's releases)
        self.book = NodeBook(distribution, seed, query_timeout)
        self.state: GlobalState | None = None
        self._arrays: ArrayRecord | None = None  # the record self.state was sent or returned as
        self._sent: dict[int, TrainJob] = {}
        self._plan: FederationPlan | None = None  # the plan the train messages of this round were cut from
        self.history: list[dict[str, Any]] = []  # per round: each node's client, rank type, bytes, outcome

    # ------------------------------------------------------------------------------------------ helpers
    def _hardened(self, spec: Method, options: Mapping[str, Any] | None, population: int | None):
        """The method's aggregator wrapped in the ``security`` rule by the round loop's :func:`harden`; DP's
        ``m`` is what :meth:`_sample` draws from ``population`` nodes."""
        inner = spec.make_aggregator(**dict(options or {}))
        if population is None:
            return harden(inner, spec, self.security, seed=self.seed)
        m = min(population, max(int(population * self.fraction_train), self.min_train_nodes))
        return harden(inner, spec, self.security, seed=self.seed, expected_clients=m, population=population)

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

    def _plan_for(self, server_round: int, nodes: list[int]) -> FederationPlan:
        """The round loop's plan of a round: the sampled nodes' clients at their declared ranks."""
        labels = [self._label(n) for n in nodes]
        return FederationPlan(
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

    def _messages(
        self,
        plan: FederationPlan,
        state: GlobalState,
        server_round: int,
        nodes: list[int],
        config: ConfigRecord,
        message_type: str,
    ) -> tuple[list[Message], dict[int, TrainJob]]:
        """One message per node, with that node's payload at its own ranks (the round loop's
        :func:`~flexlora.federation.cut_jobs`)."""
        server_state = ServerState(server_round - 1, state, {})
        jobs = cut_jobs(plan, self.aggregator, self.recipe, None, server_state, server_round, plan.pool)
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
        self._plan = self._plan_for(server_round, nodes)
        messages, self._sent = self._messages(
            self._plan, self._global(arrays), server_round, nodes, config, MessageType.TRAIN
        )
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
        """Decode each reply, check its update against what its node was sent (the round loop's
        :func:`~flexlora.federation.check_outcome`), and aggregate the valid ones.

        Returns:
            The new global state and the round's metrics (example-weighted train metrics, ``num-results``,
            ``num-failures``, ``bytes-sent``, ``bytes-received``, with DP ``dp-epsilon``); ``(None, None)``
            when fewer than ``min_train_replies`` valid updates arrived (the global state is kept).
        """
        record = self.history[-1] if self.history and self.history[-1]["round"] == server_round else None
        nodes = record["nodes"] if record is not None else defaultdict(dict)
        updates: list[LoraUpdate] = []
        metrics: list[dict[str, float]] = []
        failures: dict[int, str] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            result, reason, nbytes = self._check_reply(msg, self._sent.pop(node, None))
            if result is None:
                failures[node] = reason
                continue
            updates.append(result.update)
            metrics.append({**result.metrics, "num-examples": result.update.num_examples})
            nodes[node]["bytes_received"] = nbytes
        failures.update({node: "no reply before the round's timeout" for node in self._sent})
        self._sent = {}
        log.info("aggregate_train: received %d results and %d failures", len(updates), len(failures))
        _log_failures(server_round, failures, nodes)
        if len(updates) < self.min_train_replies:
            log.warning(
                "round %d: %d valid updates, %d needed; the global state is kept",
                server_round,
                len(updates),
                self.min_train_replies,
            )
            return None, None
        out = _weighted(metrics)
        out.update(self._aggregate(server_round, updates))
        out["num-results"], out["num-failures"] = len(updates), len(failures)
        out["bytes-received"] = sum(n.get("bytes_received", 0) for n in nodes.values())
        if record is not None:
            out["bytes-sent"] = sum(n["bytes_sent"] for n in nodes.values())
        return self._arrays, out

    def _check_reply(self, msg: Message, job: TrainJob | None) -> tuple[TrainResult | None, str, int]:
        """Decode a train reply and check its update as the round loop checks an engine's outcome
        (:func:`~flexlora.federation.check_outcome`).

        Returns:
            ``(result, "", tensor bytes received)``, or ``(None, why the reply is left out, 0)``.
        """
        node = msg.metadata.src_node_id
        if msg.has_error():
            return None, f"error {msg.error.code}: {msg.error.reason}", 0
        if job is None:
            return None, "unexpected reply (no train message was sent to it this round)", 0
        claimed = "" if self.book.client_id(node) is None else job.client_id
        try:
            update, extra, nbytes = update_from_reply(msg.content, job.init, claimed, node, self.max_examples)
        except ReplyError as exc:
            return None, str(exc), 0
        update.client_id = job.client_id  # a node on its own partition trains as the round's ``node-<id>``
        result = TrainResult(update, extra)
        _, reason, _ = check_outcome(self._plan, self.limits, job, result)
        return (None, reason, 0) if reason else (result, "", nbytes)

    def _aggregate(self, server_round: int, updates: list[LoraUpdate]) -> dict[str, float]:
        """Aggregate ``updates`` into the new global state, as the round loop's aggregation stage does (a
        private aggregator seeds its noise by round first); the privacy spent with DP."""
        self._releases += 1
        if isinstance(self.aggregator, PrivateAggregator):
            self.aggregator.start_round(server_round)
        self.state = self.aggregator.aggregate(updates, previous=self.state)
        self._arrays = state_to_arrays(self.state)
        if isinstance(self.aggregator, PrivateAggregator):
            return {"dp-epsilon": self.aggregator.privacy_spent(releases=self._releases)["epsilon"]}
        return {}

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
        plan, state = self._plan_for(server_round, nodes), self._global(arrays)
        messages, _ = self._messages(plan, state, server_round, nodes, config, MessageType.EVALUATE)
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


def _flower_method(name: str) -> Method:
    """The registered method ``name``, refused in one line when its recipe is not carried by Flower."""
    spec = get_method(name)
    if "flower" not in spec.engines:
        raise ValueError(f"{name} runs on the local engine only ({spec.not_carried()})")
    return spec


def _security(
    security: SecurityConfig | None, max_examples: int, norm_bound: float | None, method: str
) -> SecurityConfig:
    """The strategy's security settings: ``security`` (checked as the round loop checks its ``security``
    section, e.g. a robust rule and DP together are refused), or the update bounds given as arguments."""
    if security is None:
        return SecurityConfig(max_examples=max_examples, norm_bound=norm_bound)
    if norm_bound is not None or max_examples != MAX_EXAMPLES:
        raise ValueError(
            "norm_bound, max_examples: with security= set security.norm_bound, security.max_examples"
        )
    if security.round_retries:
        raise ValueError("security.round_retries: Flower runs the rounds, a strategy cannot retry one; use 0")
    if problems := security_problems(security, method):
        raise ValueError("; ".join(problems))
    return security


def _log_failures(server_round: int, failures: dict[int, str], nodes: dict[int, dict[str, Any]]) -> None:
    """Log each node left out of the round, and record why in its history entry."""
    for node, reason in failures.items():
        log.warning("\tnode %d left out of round %d: %s", node, server_round, reason)
        if node in nodes:
            nodes[node]["failure"] = reason


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
