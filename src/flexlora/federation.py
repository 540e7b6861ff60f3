"""The round loop, written once and shared by every engine.

Each round: sample clients (seeded by round) -> cut each client's payload at its own ranks -> the engine
trains them -> validate and aggregate the updates -> evaluate on held-out clients -> checkpoint. Every
random choice is a function of ``(seed, round, client)``, so methods compared at the same seed see the
same clients, batches and initial ``A`` (paired schedules), and a resumed run replays exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from flexlora.checkpoint import ServerState, save_checkpoint
from flexlora.contracts import Engine, TrainFailure, TrainJob, TrainResult, stream_outcomes
from flexlora.core.aggregators import Aggregator, GlobalState
from flexlora.core.aggregators.base import exact_factors, leading_factors
from flexlora.core.aggregators.hetlora_cho import TailPenalty
from flexlora.core.errors import AggregationError
from flexlora.core.lora import LoraFactors, LoraUpdate
from flexlora.core.privacy import PrivateAggregator
from flexlora.core.ranks import RankType, module_ranks
from flexlora.core.validation import UpdateLimits, UpdateRejected, check_update
from flexlora.methods import ClientRecipe

__all__ = [
    "AggregationStage",
    "Federation",
    "FederationPlan",
    "RoundTally",
    "Stage",
    "check_outcome",
    "cut_jobs",
    "derive_seed",
]

log = logging.getLogger(__name__)
Evaluator = Callable[[dict[str, LoraFactors] | None], dict[str, Any]]


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (``derive_seed(seed, round, client_id)``)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


@dataclass
class FederationPlan:
    """What the loop needs besides the engine: who takes part, at which ranks, for how long.

    Args:
        pool: ids of the clients that may be sampled for training.
        rank_types: each pool client's resources.
        shapes: ``(d, k)`` of every adapted module of the base model.
        rounds, clients_per_round, min_clients, seed, eval_every: as in the config.
        alpha, use_rslora: the LoRA scale every payload is cut for.
    """

    pool: list[str]
    rank_types: dict[str, RankType]
    shapes: dict[str, tuple[int, int]]
    rounds: int
    clients_per_round: int | float
    min_clients: int
    seed: int
    alpha: float
    use_rslora: bool = False
    eval_every: int = 1

    def ranks(self, client_id: str) -> dict[str, int]:
        return module_ranks(self.rank_types[client_id], self.shapes)

    def sample(self, round_: int, attempt: int = 0, exclude: Collection[str] = ()) -> list[str]:
        """Clients of a round: ``clients_per_round`` of the pool (an int: a count; a float: a fraction). A retry
        (``attempt > 0``) draws afresh, seeded by ``(seed, round, attempt)``, from the clients not in
        ``exclude`` (those that failed earlier attempts), or from the whole pool if none is left."""
        k = self.clients_per_round
        n = math.ceil(k * len(self.pool)) if isinstance(k, float) else min(k, len(self.pool))
        if attempt == 0:
            return sorted(random.Random(derive_seed(self.seed, "sample", round_)).sample(self.pool, n))
        pool = [c for c in self.pool if c not in exclude] or self.pool
        rng = random.Random(derive_seed(self.seed, "sample", round_, attempt))
        return sorted(rng.sample(pool, min(n, len(pool))))

    def per_module_ranks(self, pick: Callable[..., int] = max) -> dict[str, int]:
        """Per module, ``pick`` (max or min) of the ranks the pool's clients use; ``max`` is the width of
        the initial state, ``min`` the smallest client's rank."""
        per_type = [
            module_ranks(t, self.shapes) for t in {t.name: t for t in self.rank_types.values()}.values()
        ]
        return {m: pick(r[m] for r in per_type) for m in self.shapes}


@dataclass
class RoundTally:
    """What a round's attempts leave behind besides the aggregate: the last attempt's results (updates
    dropped), every attempt's failures and rejections, and seconds spent training, validating, folding."""

    results: list[TrainResult] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    rejected: Counter = field(default_factory=Counter)
    train: float = 0.0
    validate: float = 0.0
    aggregate: float = 0.0


class Stage(Protocol):
    """One phase of a federation's schedule: it runs ``rounds`` consecutive rounds (``None``: every round left).

    :class:`Federation` walks its schedule in order; the round loop (sampling, retries, evaluation,
    checkpoints) is the same for every stage, only how a round trains and aggregates differs.
    """

    rounds: int | None

    def run_round(
        self, federation: Federation, state: ServerState, round_: int, clients: list[str], tally: RoundTally
    ) -> GlobalState | None:
        """Train ``clients`` from ``state`` and return the new global state, or ``None`` when fewer than
        ``federation.plan.min_clients`` valid updates came back (the round is then retried with a fresh
        sample). ``tally`` receives the results (updates dropped), failures and seconds."""
        ...

    def round_metrics(self, federation: Federation, round_: int) -> dict[str, Any]:
        """What the stage adds to the round's metrics once it has run: ``bytes`` ``{sent, received}`` (since
        the last call), and e.g. ``stage`` or ``privacy``."""
        ...


@dataclass(frozen=True)
class AggregationStage:
    """The method's own rounds: the engine trains each client's payload (:meth:`Federation.jobs`), each valid
    update is folded into the aggregate as it arrives (:meth:`Federation.train_and_fold`) by the method's
    aggregator, with its DP or robust wrapper; a private aggregator reports the privacy spent after
    ``round`` releases."""

    rounds: int | None = None

    def run_round(
        self, federation: Federation, state: ServerState, round_: int, clients: list[str], tally: RoundTally
    ) -> GlobalState | None:
        return federation.train_and_fold(state, round_, federation.jobs(state, round_, clients), tally)

    def round_metrics(self, federation: Federation, round_: int) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if isinstance(federation.aggregator, PrivateAggregator):
            metrics["privacy"] = federation.aggregator.privacy_spent(releases=round_)
        sent, received = federation.engine.bytes_moved()
        return {**metrics, "bytes": {"sent": sent, "received": received}}


class Federation:
    """Runs rounds ``state.round + 1 ... plan.rounds`` and checkpoints after each.

    Args:
        plan: clients, ranks and schedule.
        aggregator: the method.
        engine: carries out each round's training jobs.
        evaluate: called with the global adapter's exact factors (``None`` for the base model); returns
            metrics such as ``rougeL``, ``loss``.
        run_dir: where ``metrics.jsonl`` and ``checkpoint/`` go.
        config: the resolved config, saved in every checkpoint.
        schedule: the stages, in order, that run rounds ``1 ... plan.rounds`` (:class:`Stage`); by default
            the method's :class:`AggregationStage` for every round. SLoRA puts its sparse stage
            (:class:`flexlora.slora.SparseStage`) first.
        final_evaluate: evaluates the last round instead of ``evaluate`` (e.g. with generation).
        limits: bounds every client update must respect (:func:`flexlora.core.validation.check_update`).
        round_retries: a round with fewer than ``plan.min_clients`` valid updates is retried this many times
            with a fresh sample before the run stops.
        on_round: called with each round's metrics (round 0 too) once checkpointed (e.g. a tracker).
        recipe: the method's client recipe (:attr:`flexlora.methods.Method.client`), put into every job
            (``None``: the plain recipe, as ``fedavg``'s).
        tail_penalty: the recipe's tail penalty settings (``recipe.tail_penalty``: ``hetlora-cho``).
    """

    def __init__(
        self,
        plan: FederationPlan,
        aggregator: Aggregator,
        engine: Engine,
        evaluate: Evaluator,
        run_dir: str | Path,
        config: dict[str, Any],
        progress: bool = True,
        schedule: Sequence[Stage] = (AggregationStage(),),
        final_evaluate: Evaluator | None = None,
        limits: UpdateLimits | None = None,
        round_retries: int = 0,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        recipe: ClientRecipe | None = None,
        tail_penalty: TailPenalty | None = None,
    ):
        self.plan, self.aggregator, self.engine, self.evaluate = plan, aggregator, engine, evaluate
        self.run_dir, self.config, self.progress = Path(run_dir), config, progress
        self.schedule, self.final_evaluate = tuple(schedule), final_evaluate
        self.limits, self.round_retries = limits or UpdateLimits(), round_retries
        self.on_round = on_round or (lambda metrics: None)
        self.recipe = recipe or ClientRecipe()
        self.tail_penalty = tail_penalty if self.recipe.tail_penalty else None
        covered = sum(math.inf if s.rounds is None else s.rounds for s in self.schedule)
        if covered < plan.rounds:
            raise ValueError(f"the schedule covers {covered} rounds, the plan has {plan.rounds}")

    def stage(self, round_: int) -> Stage:
        """The stage that runs round ``round_`` (1-based): each stage of the schedule takes its ``rounds``
        rounds after the previous one's."""
        last = 0
        for stage in self.schedule:
            if stage.rounds is None or round_ <= last + stage.rounds:
                return stage
            last += stage.rounds
        raise ValueError(f"round {round_}: past the end of the schedule ({last} rounds)")

    def initial_state(self) -> ServerState:
        """Round 0: ``B = 0`` and a seeded ``A`` at each module's largest rank, shared by all methods."""
        init = GlobalState.initial(
            self.plan.shapes, self.plan.per_module_ranks(max), self.aggregator.name, self.plan.seed
        )
        assignment = {c: t.name for c, t in self.plan.rank_types.items()}
        return ServerState(0, init, assignment)

    # ---------------------------------------------------------------------------- one round
    def jobs(self, state: ServerState, round_: int, clients: list[str]) -> list[TrainJob]:
        """Each client's payload at its own ranks, with the method's client recipe (:func:`cut_jobs`)."""
        return cut_jobs(self.plan, self.aggregator, self.recipe, self.tail_penalty, state, round_, clients)

    def triage(
        self,
        round_: int,
        jobs: list[TrainJob],
        outcomes: Iterable[TrainResult | TrainFailure],
        tally: RoundTally,
    ) -> Iterator[LoraUpdate]:
        """Check each outcome against its job as it arrives (:func:`check_outcome`) and yield the valid updates;
        a bad update becomes a failure with its reason. ``tally`` records the results (their updates dropped:
        metrics and example counts only), ``{client: reason}`` of failures and rejections, rejections counted
        by kind (``num_examples``, ``A.shape``, ``norm``, ...) and the seconds spent training and validating."""
        it = iter(outcomes)
        for job in jobs:
            cid, t = job.client_id, time.perf_counter()
            outcome = next(it, None)
            t1 = time.perf_counter()
            tally.train += t1 - t
            update, reason, kind = check_outcome(self.plan, self.limits, job, outcome)
            tally.validate += time.perf_counter() - t1
            if update is None:
                if kind is not None:
                    tally.rejected[kind] += 1
                tally.failures[cid] = reason
                log.warning("round %d: client %s left out: %s", round_, cid, reason)
                continue
            tally.results.append(TrainResult(LoraUpdate({}, update.num_examples, cid), outcome.metrics))
            del outcome
            yield update
            del update

    def train_and_fold(
        self, state: ServerState, round_: int, jobs: list[TrainJob], tally: RoundTally
    ) -> GlobalState | None:
        """Train ``jobs`` and fold each valid update into the aggregate as it arrives, so the round never holds
        every client's update (:meth:`Aggregator.aggregate_stream`). ``None`` if fewer than
        ``plan.min_clients`` updates were valid."""
        tally.results = []
        if isinstance(self.aggregator, PrivateAggregator):
            self.aggregator.start_round(round_)  # seeds this round's noise
        inside = tally.train + tally.validate
        t = time.perf_counter()
        outcomes = stream_outcomes(self.engine, jobs)
        updates = self.triage(round_, jobs, outcomes, tally)
        try:
            new_global = self.aggregator.aggregate_stream(updates, previous=state.global_state)
        except AggregationError:
            if len(tally.results) >= self.plan.min_clients:
                raise
            new_global = None  # too few valid updates (none at all, say): the round is retried or stops
        finally:
            updates.close()
            outcomes.close()  # the engine finishes its round (the local one unloads its adapters)
        tally.aggregate += time.perf_counter() - t - (tally.train + tally.validate - inside)
        return new_global if len(tally.results) >= self.plan.min_clients else None

    def run_round(self, state: ServerState) -> ServerState:
        """Round ``state.round + 1``: the schedule's stage for it trains and aggregates (:meth:`attempt`), then
        the global update is evaluated, its metrics recorded and the state checkpointed."""
        round_, t0 = state.round + 1, time.perf_counter()
        stage, tally = self.stage(round_), RoundTally()
        new_global, clients, attempts = self.attempt(stage, state, round_, tally)
        t_trained = time.perf_counter()
        metrics = round_record(round_, clients, attempts, tally)
        if new_global.info:
            metrics["aggregation"] = dict(new_global.info)  # clipping and noise of a robust / private rule
        metrics.update(stage.round_metrics(self, round_))
        self.evaluate_round(round_, new_global, metrics)
        t_eval = time.perf_counter()
        metrics["spectrum"] = spectrum_summary(new_global, self.plan)
        metrics["seconds"] = {
            "train": t_trained - t0 - tally.validate - tally.aggregate,
            "validate": tally.validate,
            "aggregate": tally.aggregate,
            "eval": t_eval - t_trained,
            "client_train": sum(r.metrics.get("seconds", 0.0) for r in tally.results),
        }
        new_state = ServerState(round_, new_global, state.assignment, [*state.metrics, metrics])
        t_ckpt = time.perf_counter()
        save_checkpoint(self.run_dir, new_state, self.config)
        metrics["seconds"]["checkpoint"] = time.perf_counter() - t_ckpt
        metrics["seconds"]["total"] = time.perf_counter() - t0
        self.write_metrics(new_state.metrics)
        return new_state

    def attempt(
        self, stage: Stage, state: ServerState, round_: int, tally: RoundTally
    ) -> tuple[GlobalState, list[str], int]:
        """Run ``stage`` on a sample of clients until it has ``plan.min_clients`` valid updates, drawing a fresh
        sample (without the clients that failed) up to ``round_retries`` more times.

        Returns:
            ``(new global state, the last attempt's clients, attempts made)``.

        Raises:
            AggregationError: every attempt fell short; the checkpoint is untouched.
        """
        tries = self.round_retries + 1
        for attempt in range(tries):
            clients = self.plan.sample(round_, attempt, exclude=tally.failures)
            new_global = stage.run_round(self, state, round_, clients, tally)
            if new_global is not None:
                return new_global, clients, attempt + 1
            log.warning(
                "round %d, attempt %d of %d: %d valid updates, %d needed",
                round_,
                attempt + 1,
                tries,
                len(tally.results),
                self.plan.min_clients,
            )
        raise AggregationError(
            f"round {round_}: {len(tally.results)} valid updates, {self.plan.min_clients} needed, after "
            f"{tries} attempt(s) ({len(tally.failures)} clients failed or were refused); the run "
            f"stops, its checkpoint (round {state.round}) is untouched"
        )

    def evaluate_round(self, round_: int, new_global: GlobalState, metrics: dict[str, Any]) -> None:
        """Every ``plan.eval_every`` rounds and after the last (with ``final_evaluate`` when given), evaluate the
        global update into ``metrics["eval"]`` and count the tokens it read."""
        if round_ % self.plan.eval_every and round_ != self.plan.rounds:
            return
        final = round_ == self.plan.rounds and self.final_evaluate is not None
        evaluate = self.final_evaluate if final else self.evaluate
        metrics["eval"] = evaluate(exact_factors(new_global, self.plan.alpha, self.plan.use_rslora))
        metrics["eval_tokens"] = sum(
            e.get("tokens", 0) for e in (metrics["eval"], metrics["eval"].get("trained", {}))
        )

    # ---------------------------------------------------------------------------- the loop
    def run(self, state: ServerState | None = None) -> ServerState:
        """Run from ``state`` (a fresh start when ``None``) to the last round."""
        if state is None:
            state = self.initial_state()
            base = {"round": 0, "eval": self.evaluate(None)}
            state.metrics.append(base)
            save_checkpoint(self.run_dir, state, self.config)
            self.on_round(base)
        self.write_metrics(state.metrics)  # a resume: a kill may have come between checkpoint and metrics
        bar = tqdm(
            total=self.plan.rounds,
            initial=state.round,
            desc="rounds",
            unit="round",
            disable=not self.progress,
        )
        while state.round < self.plan.rounds:
            state = self.run_round(state)
            self.on_round(state.metrics[-1])
            bar.update(1)
            tqdm.write(round_summary(state.metrics[-1]))
        bar.close()
        return state

    def write_metrics(self, metrics: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.jsonl`` from the checkpointed list (so a resume never duplicates lines)."""
        path = self.run_dir / "metrics.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics))
        tmp.replace(path)


def cut_jobs(
    plan: FederationPlan,
    aggregator: Aggregator,
    recipe: ClientRecipe,
    tail_penalty: TailPenalty | None,
    state: ServerState,
    round_: int,
    clients: list[str],
) -> list[TrainJob]:
    """Each client's payload at its own ranks (``aggregator.payload`` of the global state, completed with
    rows seeded by ``(seed, "complete", round)``), and the method's client recipe: FLoRA-style methods start
    a fresh adapter on top of the (frozen) global update; FFA-LoRA freezes ``A``; FedIT trains with AdamW.
    ``tail_penalty``: the recipe's settings (``None`` without one). Every engine and
    :class:`flexlora.engines.flower.FlexLoRAStrategy` send these jobs."""
    global_state = dataclasses.replace(state.global_state, seed=derive_seed(plan.seed, "complete", round_))
    jobs = []
    for cid in clients:
        ranks = plan.ranks(cid)
        if recipe.fresh_adapter:
            # round 1 starts from the shared initial A, like every other method
            fresh_seed = plan.seed if round_ == 1 else derive_seed(plan.seed, "fresh", round_)
            fresh = GlobalState.initial(plan.shapes, ranks, aggregator.name, fresh_seed)
            init = leading_factors(fresh, ranks, plan.alpha, plan.use_rslora)
            frozen = (
                aggregator.payload(global_state, ranks, plan.alpha, plan.use_rslora) if round_ > 1 else None
            )
        else:
            init = aggregator.payload(global_state, ranks, plan.alpha, plan.use_rslora)
            frozen = None
        jobs.append(
            TrainJob(
                client_id=cid,
                round=round_,
                seed=derive_seed(plan.seed, "train", round_, cid),
                init=init,
                frozen=frozen,
                freeze_A=recipe.freeze_A,
                tail_penalty=tail_penalty,
                optimizer=recipe.optimizer,
            )
        )
    return jobs


def check_outcome(
    plan: FederationPlan, limits: UpdateLimits, job: TrainJob, outcome: object
) -> tuple[LoraUpdate | None, str | None, str | None]:
    """Check what the engine returned for ``job`` against what the client was sent
    (:func:`flexlora.core.validation.check_update`: its id, ranks, shapes, scale, ``limits`` and, with a
    frozen ``A``, that ``A``).

    Returns:
        ``(update, None, None)`` for a valid update, else ``(None, reason, kind)``: ``kind`` is the
        rejection's kind (``num_examples``, ``A.shape``, ``norm``, ...), ``None`` for a failed client.
    """
    if isinstance(outcome, TrainFailure):
        return None, outcome.reason, None
    if not isinstance(outcome, TrainResult):
        return None, f"the engine returned {type(outcome).__name__}, not a result", None
    cid = job.client_id
    try:
        check_update(
            outcome.update,
            client_id=cid,
            ranks=plan.ranks(cid),
            shapes=plan.shapes,
            alpha=plan.alpha,
            use_rslora=plan.use_rslora,
            limits=limits,
            frozen_A={n: f.A for n, f in job.init.items()} if job.freeze_A else None,
        )
    except UpdateRejected as exc:
        return None, str(exc), exc.kind
    return outcome.update, None, None


def _weighted_mean(results: list[TrainResult], key: str) -> float | None:
    """``sum_i n_i m_i / sum_i n_i`` over the clients that report ``key``; a value that is not finite (a
    diverged client) is left out with a logged reason, never averaged into the round's metrics."""
    pairs = []
    for r in results:
        value = r.metrics.get(key)
        if value is not None and not math.isfinite(value):
            log.warning(
                "client %s: %s = %r is not finite; left out of the round's mean",
                r.update.client_id,
                key,
                value,
            )
        elif value is not None:
            pairs.append((r.update.num_examples, value))
    total = sum(n for n, _ in pairs)
    return sum(n * v for n, v in pairs) / total if total else None


def round_record(round_: int, clients: list[str], attempts: int, tally: RoundTally) -> dict[str, Any]:
    """A round's metrics from its training: who was asked, what came back, what failed, what was trained."""
    results = tally.results
    return {
        "round": round_,
        "clients": clients,
        "received": len(results),
        "failures": tally.failures,
        "rejected": dict(tally.rejected),
        "attempts": attempts,
        "train_loss": _weighted_mean(results, "train_loss"),
        "train_steps": sum(r.metrics.get("steps", 0) for r in results),
        "train_tokens": int(sum(r.metrics.get("tokens", 0) for r in results)),  # non-padding
        "eval_tokens": 0,
    }


def spectrum_summary(state: GlobalState, plan: FederationPlan, top: int = 16) -> dict[str, Any]:
    """Leading singular values of ``dW`` (mean over layers, per module kind) and the share of its energy
    beyond the smallest client rank (averaged over modules): how much a rank-``r_min`` client loses."""
    smallest = plan.per_module_ranks(min)
    by_kind: dict[str, list[torch.Tensor]] = {}
    beyond = []
    for name in state.modules:
        S = state.singular_values(name).double()
        energy = float((S**2).sum())
        beyond.append(float((S[smallest[name] :] ** 2).sum()) / energy if energy > 0 else 0.0)
        padded = torch.nn.functional.pad(S[:top], (0, max(0, top - len(S[:top]))))
        by_kind.setdefault(name.rsplit(".", 1)[-1], []).append(padded)
    return {
        "top_singular_values": {k: torch.stack(v).mean(0).tolist() for k, v in sorted(by_kind.items())},
        "energy_beyond_min_rank": sum(beyond) / len(beyond) if beyond else 0.0,
    }


def round_summary(m: Mapping[str, Any]) -> str:
    """One readable line per round."""
    parts = [
        f"round {m['round']:>3}",
        f"received {m.get('received', 0)}, {len(m.get('failures', {}))} failures",
    ]
    if m.get("train_loss") is not None:
        parts.append(f"train loss {m['train_loss']:.4f}")
    for key in ("loss", "rougeL", "tf_argmax_rougeL"):
        if m.get("eval", {}).get(key) is not None:
            parts.append(f"eval {key} {m['eval'][key]:.3f}")
    if m.get("privacy"):
        parts.append(f"epsilon {m['privacy']['epsilon']:.3g}")
    if m.get("seconds", {}).get("total") is not None:
        parts.append(f"{m['seconds']['total']:.1f}s")
    return " | ".join(parts)
