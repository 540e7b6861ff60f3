"""SLoRA's first stage: federated sparse fine-tuning, then LoRA initialised from the SVD of its update
(Babakniya et al., "SLoRA: Federated Parameter Efficient Fine-Tuning of Language Models", 2023).

Stage 1 (rounds ``1 ... T_s``). Client ``i`` trains the entries of each target weight ``W (d, k)`` picked by
its own seeded random mask ``M_i`` (fixed across rounds), on top of the global update ``G`` so far:

    ``W_eff = W + G + scatter(M_i, v_i)``,   ``v_i (nnz_i,)`` trainable, zero at the start of each round.

The mask density follows the client's resources: a client of rank ``r`` on the module trains as many
parameters as its LoRA would, ``rho = r (d + k) / (d k)`` (capped at 1), unless ``slora_density`` fixes one
density for everyone. The server takes FedAvg of the sparse deltas (zero outside each mask),
``G <- G + sum_i p_i scatter(M_i, v_i)`` with ``p_i = n_i / sum_j n_j``, and keeps ``G`` as its exact SVD
``G = (U S) V^T`` (all ``min(d, k)`` triplets), so checkpoints, resume, evaluation and the spectrum metrics
of the round loop work unchanged.

Transition (end of round ``T_s``): ``G`` is cut to its leading ``q`` triplets, ``q`` = the largest rank any
client of the pool uses on the module. Stage 2 is an ordinary federation from that state: FedAvg at the
homogeneous rank (``slora``), or FlexLoRA with heterogeneous ranks (``slora+flexlora``); a client of rank
``r`` starts from ``B = U_r S_r / s_r``, ``A = V_r^T``, the best rank-``r`` approximation of ``G``.

Memory: the base weights are never written. Each job registers a parametrization on the target modules
(``W`` stays the same ``Parameter`` object) and removes it afterwards, also on error; the only extra
tensors are one dense ``G`` per module per round (shared by the round's clients), the masks and values
of one client, and the optimizer state of those values. No model copy is made.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from flexlora.checkpoint import ServerState
from flexlora.contracts import TrainFailure, TrainResult
from flexlora.core.aggregators.base import GlobalState
from flexlora.core.errors import AggregationError
from flexlora.core.lora import LowRank
from flexlora.data.examples import ClientData
from flexlora.federation import Federation, FederationPlan, RoundTally, derive_seed
from flexlora.models import model_device
from flexlora.training import TrainConfig, optimise

__all__ = [
    "SparseDelta",
    "SparseStage",
    "SparseUpdate",
    "build_sparse_stage",
    "dense_state",
    "mask_density",
    "run_sparse_job",
    "sparse_deltas",
    "sparse_mask",
    "truncate_state",
]

log = logging.getLogger(__name__)

#: the stage's name in a method's recipe and in each of its rounds' metrics (``stage``)
STAGE_NAME = "slora-sparse"


# ---------------------------------------------------------------------------------------------- masks
def mask_density(rank: int, d: int, k: int) -> float:
    """``r (d + k) / (d k)`` capped at 1: the share of ``W (d, k)`` that holds as many parameters as a
    rank-``r`` LoRA (``B (d, r)`` plus ``A (r, k)``)."""
    return min(1.0, rank * (d + k) / (d * k))


def sparse_mask(d: int, k: int, density: float, seed: int) -> torch.Tensor:
    """A seeded random mask of ``W (d, k)``: ``max(1, round(density d k))`` distinct flat indices, sorted.

    Returns:
        ``(nnz,)`` int64 indices into ``W.reshape(-1)``.
    """
    if not 0 < density <= 1:
        raise ValueError(f"mask density must be in (0, 1], got {density}")
    n = d * k
    nnz = max(1, min(n, round(density * n)))
    if nnz == n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:nnz].sort().values


def _module_seed(seed: int, client_id: str, module: str) -> int:
    return zlib.crc32(f"{seed}/slora-mask/{client_id}/{module}".encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------- the job
class SparseDelta(nn.Module):
    """Parametrization ``W -> W + G + scatter(idx, values)`` (``G`` optional, dense ``(d, k)``)."""

    def __init__(self, idx: torch.Tensor, values: nn.Parameter, offset: torch.Tensor | None = None):
        super().__init__()
        self.idx, self.values, self.offset = idx, values, offset

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        base = W if self.offset is None else W + self.offset
        # out-of-place index_add: differentiable in `values`, never touches W
        return base.reshape(-1).index_add(0, self.idx, self.values.to(W.dtype)).view_as(W)


@contextmanager
def sparse_deltas(
    model: nn.Module, masks: Mapping[str, torch.Tensor], offsets: Mapping[str, torch.Tensor] | None = None
) -> Iterator[dict[str, nn.Parameter]]:
    """Make the masked entries of each named module's weight trainable, on top of ``offsets``.

    Yields ``{module: values (nnz,)}``, zero-initialised float32 parameters. On exit every parametrization
    is removed with the original weight put back (the same ``Parameter``, bit-identical).
    """
    modules = dict(model.named_modules())
    device = model_device(model)
    values: dict[str, nn.Parameter] = {}
    try:
        for name, idx in masks.items():
            module = modules[name]
            idx = idx.to(device)
            values[name] = nn.Parameter(torch.zeros(len(idx), device=device))
            offset = None if offsets is None else offsets[name].to(device, module.weight.dtype)
            parametrize.register_parametrization(
                module, "weight", SparseDelta(idx, values[name], offset), unsafe=True
            )
        yield values
    finally:
        for name in masks:
            if parametrize.is_parametrized(modules[name], "weight"):
                parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=False)


@dataclass
class SparseUpdate:
    """A client's stage-1 result: per module the mask and the trained values ``(idx (nnz,), v (nnz,))``."""

    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]
    num_examples: int
    client_id: str = ""

    def nbytes(self) -> int:
        """Values as float32 plus indices as int32: what a client would send."""
        return sum(8 * len(v) for _, v in self.deltas.values())


def run_sparse_job(
    model: nn.Module,
    tokenizer,
    data: ClientData,
    masks: Mapping[str, torch.Tensor],
    offsets: Mapping[str, torch.Tensor] | None,
    cfg: TrainConfig,
    seed: int,
) -> TrainResult:
    """Train one client's masked weight entries for one round, as :func:`flexlora.training.run_train_job`
    trains a LoRA (same batches for the same ``seed``, same loss, clipping, optimizer and schedule).

    Returns:
        ``TrainResult`` whose ``update`` is a :class:`SparseUpdate` (CPU float32 values) and metrics
        ``train_loss``, ``train_loss_last``, ``steps``, ``seconds``, ``trained_params``.
    """
    if not data.train:
        raise ValueError(f"client {data.client_id!r} has no training examples; it cannot train")
    with sparse_deltas(model, masks, offsets) as values:
        metrics = optimise(model, tokenizer, data.train, list(values.values()), cfg, seed)
        deltas = {
            n: (masks[n].cpu(), v.detach().to("cpu", torch.float32, copy=True)) for n, v in values.items()
        }
    metrics["trained_params"] = float(sum(len(m) for m in masks.values()))
    return TrainResult(SparseUpdate(deltas, len(data.train), data.client_id), metrics)  # type: ignore


# ---------------------------------------------------------------------------------------------- server side
def dense_state(offsets: Mapping[str, torch.Tensor], method: str) -> GlobalState:
    """The exact SVD of dense updates ``G (d, k)`` as a state: ``B = U S (d, m)``, ``A = V^T (m, k)``,
    ``m = min(d, k)``."""
    modules = {}
    for name, G in offsets.items():
        U, S, Vh = torch.linalg.svd(G.float(), full_matrices=False)  # (d, m), (m,), (m, k)
        modules[name] = LowRank(U * S, Vh)
    return GlobalState(modules, method)


def truncate_state(state: GlobalState, ranks: Mapping[str, int]) -> tuple[GlobalState, float]:
    """Keep the leading ``ranks[name]`` triplets of each module (the state must hold them in descending
    order, as :func:`dense_state` does).

    Returns:
        ``(state, kept)``: the cut state and the share of the energy ``||G||_F^2`` kept, averaged over modules.
    """
    modules, kept = {}, []
    for name, lr in state.modules.items():
        r = ranks[name]
        S2 = (lr.B.double() ** 2).sum(0)  # (m,): squared column norms of U S = S^2
        total = float(S2.sum())
        kept.append(float(S2[:r].sum()) / total if total > 0 else 1.0)
        B = torch.nn.functional.pad(lr.B[:, :r], (0, max(0, r - lr.B.shape[1])))
        A = lr.A[:r]
        if A.shape[0] < r:  # rank(G) < r: pad with zero directions (payloads complete them)
            A = torch.cat([A, A.new_zeros(r - A.shape[0], A.shape[1])])
        modules[name] = LowRank(B.contiguous(), A.contiguous())
    return GlobalState(modules, state.method), sum(kept) / max(len(kept), 1)


class SparseStage:
    """SLoRA's stage 1: the first stage of a :class:`flexlora.federation.Federation`'s schedule (a
    :class:`flexlora.federation.Stage`), for rounds ``1 ... rounds``.

    Args:
        model: the base model (bare: no LoRA adapter installed while the stage trains).
        tokenizer: its tokenizer.
        source: the client source (``load(client_id)``).
        train_cfg: local training settings (``lr`` replaced by ``lr`` when given).
        client_ranks: per client, its per-module ranks (densities follow them).
        keep_ranks: per module, the rank the state is cut to after the last stage-1 round (the largest rank
            of the pool).
        rounds: stage-1 rounds.
        seed: seeds the masks (with the client and the module).
        density: one mask density for every client and module (``None``: :func:`mask_density`).
        lr: stage-1 learning rate (``None``: ``train_cfg.lr``).

    Example:
        >>> stage = SparseStage(model, tok, source, TrainConfig(), ranks, keep, rounds=2)  # doctest: +SKIP
        >>> schedule = (stage, AggregationStage())  # doctest: +SKIP
        >>> Federation(plan, FedAvg(), engine, evaluate, run_dir, config, schedule=schedule)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        source,
        train_cfg: TrainConfig,
        client_ranks: Mapping[str, Mapping[str, int]],
        keep_ranks: Mapping[str, int],
        rounds: int,
        seed: int = 0,
        density: float | None = None,
        lr: float | None = None,
        progress: bool = True,
    ):
        self.model, self.tokenizer, self.source = model, tokenizer, source
        self.train_cfg = train_cfg if lr is None else dataclasses.replace(train_cfg, lr=lr)
        self.client_ranks, self.keep_ranks = client_ranks, dict(keep_ranks)
        self.rounds, self.seed, self.density, self.progress = rounds, seed, density, progress
        self.shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if n in self.keep_ranks}
        self._sent = self._received = 0

    def hyperparameters(self) -> dict[str, object]:
        return {"rounds": self.rounds, "density": self.density or "r(d+k)/(dk)", "lr": self.train_cfg.lr}

    def masks(self, client_id: str) -> dict[str, torch.Tensor]:
        """The client's fixed masks, one per module."""
        out = {}
        for name, (d, k) in self.shapes.items():
            rho = self.density or mask_density(self.client_ranks[client_id][name], d, k)
            out[name] = sparse_mask(d, k, rho, _module_seed(self.seed, client_id, name))
        return out

    def train(
        self, state: GlobalState, round_: int, clients: Sequence[str]
    ) -> list[TrainResult | TrainFailure]:
        """Each client of the round trains its masked entries on ``W + G``; failures are reported, not raised."""
        offsets = {name: lr.delta() for name, lr in state.modules.items()}  # dense G (d, k), shared
        outcomes: list[TrainResult | TrainFailure] = []
        for cid in tqdm(
            clients, desc="sparse clients", leave=False, disable=not self.progress, unit="client"
        ):
            try:
                seed = derive_seed(self.seed, "train", round_, cid)  # the batches LoRA methods see
                result = run_sparse_job(
                    self.model,
                    self.tokenizer,
                    self.source.load(cid),
                    self.masks(cid),
                    offsets,
                    self.train_cfg,
                    seed,
                )
                bad = [n for n, (_, v) in result.update.deltas.items() if not torch.isfinite(v).all()]
                if bad:
                    raise AggregationError(f"module {bad[0]!r} has NaN or Inf values; the update is refused")
            except Exception as exc:  # one client's failure must not stop the federation
                log.exception("client %s failed in sparse round %d", cid, round_)
                outcomes.append(TrainFailure(cid, f"{type(exc).__name__}: {exc}"))
                continue
            self._received += result.update.nbytes()
            outcomes.append(result)
        self._sent += len(outcomes) * sum(4 * d * k for d, k in self.shapes.values())  # G, densely
        return outcomes

    def aggregate(self, updates: Sequence[SparseUpdate], previous: GlobalState, round_: int) -> GlobalState:
        """``G <- G + sum_i p_i scatter(M_i, v_i)``, as an exact SVD; cut to ``keep_ranks`` after the last
        stage-1 round."""
        if not updates:
            raise AggregationError("no sparse updates to aggregate")
        total = sum(u.num_examples for u in updates)
        offsets = {}
        for name, lr in previous.modules.items():
            G = lr.delta().reshape(-1)  # (d k,), a fresh tensor
            for u in updates:
                idx, v = u.deltas[name]
                G.index_add_(0, idx, v, alpha=u.num_examples / total)
            offsets[name] = G.view(lr.shape)
        state = dense_state(offsets, previous.method)
        if round_ >= self.rounds:
            state, kept = truncate_state(state, self.keep_ranks)
            log.info("SLoRA: stage 1 done; LoRA init keeps %.1f%% of the update's energy", 100 * kept)
        return state

    def bytes_moved(self) -> tuple[int, int]:
        moved = (self._sent, self._received)
        self._sent = self._received = 0
        return moved

    # ------------------------------------------------------------------ the round loop's Stage protocol
    def run_round(
        self, federation: Federation, state: ServerState, round_: int, clients: list[str], tally: RoundTally
    ) -> GlobalState | None:
        """:meth:`train` the clients, then :meth:`aggregate` their sparse deltas if at least
        ``federation.plan.min_clients`` came back (``None`` otherwise); ``tally`` keeps the results with their
        deltas dropped."""
        t = time.perf_counter()
        outcomes = self.train(state.global_state, round_, clients)
        results = [o for o in outcomes if isinstance(o, TrainResult)]
        tally.failures.update({o.client_id: o.reason for o in outcomes if isinstance(o, TrainFailure)})
        tally.results = [
            TrainResult(SparseUpdate({}, r.update.num_examples, r.update.client_id), r.metrics)
            for r in results
        ]
        t1 = time.perf_counter()
        tally.train += t1 - t
        if len(results) < federation.plan.min_clients:
            return None
        new_global = self.aggregate([r.update for r in results], state.global_state, round_)
        tally.aggregate += time.perf_counter() - t1
        return new_global

    def round_metrics(self, federation: Federation, round_: int) -> dict[str, object]:
        """``stage: "slora-sparse"`` and the bytes moved (no privacy: sparse rounds are not DP-accounted)."""
        sent, received = self.bytes_moved()
        return {"stage": STAGE_NAME, "bytes": {"sent": sent, "received": received}}


def build_sparse_stage(cfg, host, tokenizer, source, plan: FederationPlan, progress: bool) -> SparseStage:
    """The sparse stage of a run config (``federation.slora_rounds``, ``slora_density``, ``slora_lr``, the
    ``train`` section): each pool client's mask density follows its ranks, and the state is cut to the pool's
    widest rank per module when the stage ends."""
    fed = cfg.federation
    stage = SparseStage(
        host.model,
        tokenizer,
        source,
        cfg.train,
        {c: plan.ranks(c) for c in plan.pool},
        plan.per_module_ranks(max),
        fed.slora_rounds,
        seed=fed.seed,
        density=fed.slora_density,
        lr=fed.slora_lr,
        progress=progress,
    )
    log.info("SLoRA stage 1: %s", stage.hyperparameters())
    return stage
