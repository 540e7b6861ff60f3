"""Untrusted client updates: every bad kind refused with the client and field named, rounds that go on
without them, retries with a fresh sample, and a stop that leaves the checkpoint untouched."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from flexlora.checkpoint import load_checkpoint
from flexlora.contracts import TrainFailure, TrainJob, TrainResult
from flexlora.core.errors import AggregationError
from flexlora.core.lora import LoraFactors, LoraUpdate
from flexlora.core.ranks import parse_rank_type
from flexlora.core.validation import (
    UpdateLimits,
    UpdateRejected,
    check_update,
    norm_upper_bound,
    update_norm,
)
from flexlora.federation import Federation, FederationPlan
from flexlora.methods import METHODS, make_aggregator

SHAPES = {"layers.0.q_proj": (8, 6), "layers.0.v_proj": (4, 6), "layers.0.up_proj": (10, 6)}
RANKS = {"layers.0.q_proj": 2, "layers.0.v_proj": 2, "layers.0.up_proj": 3}
ALPHA = 16.0


def good_update(client_id="c0", seed=0, ranks=RANKS, num_examples=10) -> LoraUpdate:
    gen = torch.Generator().manual_seed(seed)
    modules = {
        n: LoraFactors(
            torch.randn(r, SHAPES[n][1], generator=gen), torch.randn(SHAPES[n][0], r, generator=gen), ALPHA
        )
        for n, r in ranks.items()
    }
    return LoraUpdate(modules, num_examples, client_id)


def _module(update, name="layers.0.q_proj", **changes) -> LoraUpdate:
    modules = dict(update.modules)
    modules[name] = replace(modules[name], **changes)
    return LoraUpdate(modules, update.num_examples, update.client_id)


def _without(update, name="layers.0.v_proj") -> LoraUpdate:
    return LoraUpdate(
        {n: f for n, f in update.modules.items() if n != name}, update.num_examples, update.client_id
    )


def _extra(update) -> LoraUpdate:
    extra = LoraFactors(torch.zeros(2, 6), torch.zeros(8, 2), ALPHA)
    return LoraUpdate({**update.modules, "layers.0.o_proj": extra}, update.num_examples, update.client_id)


def _nan(t: torch.Tensor, value=float("nan")) -> torch.Tensor:
    t = t.clone()
    t[0, 0] = value
    return t


G = good_update()
Q = G.modules["layers.0.q_proj"]
#: (label, kind of check that must refuse it, bad update); the report counts refusals by kind.
BAD = [
    ("not an update", "update", {"layers.0.q_proj": Q}),
    ("another client's id", "client_id", replace(G, client_id="c9")),
    ("zero examples", "num_examples", replace(G, num_examples=0)),
    ("negative examples", "num_examples", replace(G, num_examples=-5)),
    ("bool examples", "num_examples", replace(G, num_examples=True)),
    ("fractional examples", "num_examples", replace(G, num_examples=2.5)),
    ("huge example count", "num_examples", replace(G, num_examples=10**12)),
    ("missing module", "modules", _without(G)),
    ("extra module", "modules", _extra(G)),
    ("rank above the declared one", "A.shape", _module(G, A=torch.randn(3, 6), B=torch.randn(8, 3))),
    ("rank below the declared one", "A.shape", _module(G, A=torch.randn(1, 6), B=torch.randn(8, 1))),
    ("B for another base shape", "B.shape", _module(G, B=torch.randn(9, 2))),
    ("transposed A", "A.shape", _module(G, A=Q.A.T.contiguous())),
    ("3-D tensor", "A.shape", _module(G, A=Q.A[None])),
    ("integer dtype", "A.dtype", _module(G, A=Q.A.to(torch.int64))),
    ("bool dtype", "B.dtype", _module(G, B=Q.B > 0)),
    ("complex dtype", "A.dtype", _module(G, A=Q.A.to(torch.complex64))),
    ("NaN", "A.values", _module(G, A=_nan(Q.A))),
    ("Inf", "B.values", _module(G, B=_nan(Q.B, float("inf")))),
    ("not a tensor", "A", _module(G, A=Q.A.tolist())),
    ("changed alpha", "alpha", _module(G, alpha=1e6)),
    ("NaN alpha", "alpha", _module(G, alpha=float("nan"))),
    ("rsLoRA switched on", "use_rslora", _module(G, use_rslora=True)),
    ("overflowing values", "B.values", _module(G, B=torch.full((8, 2), 1e300, dtype=torch.float64))),
    ("absurd norm", "norm", _module(G, B=torch.full((8, 2), 1e17))),
]


@pytest.mark.parametrize(("label", "kind", "update"), BAD, ids=[b[0] for b in BAD])
def test_bad_update_refused_naming_client_and_field(label, kind, update):
    with pytest.raises(UpdateRejected) as info:
        check_update(update, client_id="c0", ranks=RANKS, shapes=SHAPES, alpha=ALPHA)
    assert info.value.kind == kind, str(info.value)
    assert "client 'c0'" in str(info.value) and str(info.value).endswith("left out of this round")


def test_good_update_passes_and_norms_are_exact_or_upper_bounds():
    check_update(G, client_id="c0", ranks=RANKS, shapes=SHAPES, alpha=ALPHA)
    dense = sum(float((f.scale * f.B.double() @ f.A.double()).pow(2).sum()) for f in G.modules.values())
    assert update_norm(G.modules) == pytest.approx(dense**0.5, rel=1e-6)
    assert norm_upper_bound(G.modules) >= dense**0.5


def test_norm_bound_and_frozen_A_and_limits():
    norm = update_norm(G.modules)
    with pytest.raises(UpdateRejected, match="norm: .* exceeds the bound"):
        check_update(
            G,
            client_id="c0",
            ranks=RANKS,
            shapes=SHAPES,
            alpha=ALPHA,
            limits=UpdateLimits(norm_bound=norm / 2),
        )
    check_update(
        G, client_id="c0", ranks=RANKS, shapes=SHAPES, alpha=ALPHA, limits=UpdateLimits(norm_bound=norm * 2)
    )
    frozen = {n: f.A.clone() for n, f in G.modules.items()}
    check_update(G, client_id="c0", ranks=RANKS, shapes=SHAPES, alpha=ALPHA, frozen_A=frozen)
    moved = _module(G, A=Q.A + 1e-3)
    with pytest.raises(UpdateRejected, match=r"q_proj\]\.A\.values: changed, but A is frozen"):
        check_update(moved, client_id="c0", ranks=RANKS, shapes=SHAPES, alpha=ALPHA, frozen_A=frozen)
    with pytest.raises(UpdateRejected, match=r"num_examples: must be an integer in \[1, 5\]"):
        check_update(
            G, client_id="c0", ranks=RANKS, shapes=SHAPES, alpha=ALPHA, limits=UpdateLimits(max_examples=5)
        )
    for bad in (dict(max_examples=0), dict(norm_bound=-1.0), dict(norm_bound=float("inf"))):
        with pytest.raises(ValueError):
            UpdateLimits(**bad)


# ---------------------------------------------------------------------------------------------- the round loop
class FakeEngine:
    """Trains nothing: each client returns its payload plus seeded noise. ``hostile`` clients send a bad update
    (one kind per client, cycling through ``hostile_version``), ``dropped`` ones time out; ``by_round`` gives
    ``(hostile, dropped)`` per round instead."""

    name = "fake"

    def __init__(self, hostile=(), dropped=(), by_round=None):
        self.by_round = by_round or {}
        self.hostile, self.dropped = set(hostile), set(dropped)
        self.calls: list[list[str]] = []

    def train(self, jobs: list[TrainJob]) -> list[TrainResult | TrainFailure]:
        self.calls.append([j.client_id for j in jobs])
        out = []
        if jobs and jobs[0].round in self.by_round:
            self.hostile, self.dropped = self.by_round[jobs[0].round]
        for job in jobs:
            if job.client_id in self.dropped:
                out.append(TrainFailure(job.client_id, "no reply within 10s; left out of this round"))
                continue
            gen = torch.Generator().manual_seed(job.seed)
            modules = {
                n: LoraFactors(
                    f.A if job.freeze_A else f.A + 0.1 * torch.randn(f.A.shape, generator=gen),
                    f.B + 0.1 * torch.randn(f.B.shape, generator=gen),
                    f.alpha,
                    f.use_rslora,
                )
                for n, f in job.init.items()
            }
            update = LoraUpdate(modules, 10 + int(job.client_id[1:]), job.client_id)
            if job.client_id in self.hostile:
                update = hostile_version(update, sorted(self.hostile).index(job.client_id))
            out.append(TrainResult(update, {"train_loss": 1.0, "steps": 1.0}))
        return out

    def bytes_moved(self):
        return 0, 0

    def close(self):
        pass


def hostile_version(update: LoraUpdate, i: int) -> LoraUpdate:
    """A malformed or oversized variant of an honest update."""
    name = sorted(update.modules)[0]
    f = update.modules[name]
    attacks = [
        lambda: _module(update, name, B=_nan(f.B)),
        lambda: replace(update, num_examples=10**9),
        lambda: _module(
            update, name, A=torch.randn(f.rank + 1, f.A.shape[1]), B=torch.randn(f.B.shape[0], f.rank + 1)
        ),
        lambda: _module(update, name, B=f.B * 1e6),  # caught by a norm bound only
        lambda: _without(update, name),
        lambda: _module(update, name, alpha=f.alpha * 100),
    ]
    return attacks[i % len(attacks)]()


def make_plan(pool=8, per_round=4, min_clients=2, rounds=2, types=("r2", "r3")) -> FederationPlan:
    ids = [f"c{i}" for i in range(pool)]
    return FederationPlan(
        pool=ids,
        rank_types={c: parse_rank_type(types[i % len(types)]) for i, c in enumerate(ids)},
        shapes=SHAPES,
        rounds=rounds,
        clients_per_round=per_round,
        min_clients=min_clients,
        seed=0,
        alpha=ALPHA,
    )


def make_federation(tmp_path, plan, engine, method="flexlora", **kwargs) -> Federation:
    return Federation(
        plan,
        make_aggregator(method),
        engine,
        lambda f: {"loss": 0.0},
        tmp_path,
        {},
        progress=False,
        recipe=METHODS[method].client,
        **kwargs,
    )


def test_hostile_updates_are_left_out_and_the_round_goes_on(tmp_path, caplog):
    plan = make_plan(min_clients=1)
    hostile = plan.sample(1)[:3]  # 3 of the 4 clients of round 1
    fed = make_federation(
        tmp_path, plan, FakeEngine(hostile), limits=UpdateLimits(max_examples=1000, norm_bound=1e3)
    )
    with caplog.at_level(logging.WARNING, logger="flexlora.federation"):
        state = fed.run()
    first = state.metrics[1]
    assert first["received"] == 1 and set(first["failures"]) == set(hostile)
    assert sum(first["rejected"].values()) == 3 and first["attempts"] == 1
    for cid in hostile:
        assert any(f"client {cid} left out: client '{cid}':" in r.getMessage() for r in caplog.records)
    reasons = " ".join(first["failures"].values())
    assert "values: has NaN" in reasons and "num_examples" in reasons and "shape" in reasons
    assert "validate" in first["seconds"]
    assert load_checkpoint(tmp_path)[0].round == 2


def test_too_few_valid_updates_retries_with_a_fresh_deterministic_sample(tmp_path):
    plan = make_plan(min_clients=3)
    first = plan.sample(1)
    hostile = first[:2]  # round 1, attempt 1: 2 valid of 4 < 3
    runs = []
    for name in ("a", "b"):
        engine = FakeEngine(hostile)
        state = make_federation(tmp_path / name, plan, engine, round_retries=2).run()
        runs.append((engine.calls, state))
    (calls, state), (calls_b, state_b) = runs
    assert calls == calls_b  # the retry's sample is a function of (seed, round, attempt)
    assert calls[0] == first and not set(calls[1]) & set(hostile) and calls[1] != first
    assert state.metrics[1]["attempts"] == 2 and state.metrics[1]["received"] >= 3
    a, b = state.global_state.to_tensors(), state_b.global_state.to_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_retries_exhausted_stop_with_a_clear_message_and_the_checkpoint_untouched(tmp_path):
    plan = make_plan(min_clients=3)
    fed = make_federation(tmp_path, plan, FakeEngine(), round_retries=1)
    fed.run()  # two good rounds
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()}
    plan.rounds = 3
    fed.engine = FakeEngine(dropped=plan.pool[:6])  # 2 of 8 clients ever reply
    state, _ = load_checkpoint(tmp_path)
    with pytest.raises(
        AggregationError, match=r"round 3: \d valid updates, 3 needed, after 2 attempt\(s\).*untouched"
    ):
        fed.run(state)
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()} == before


@pytest.mark.parametrize(("fraction", "completes"), [(0.5, True), (0.75, True), (0.875, False)])
def test_largest_tolerated_fraction_without_retries(tmp_path, fraction, completes):
    """With 8 clients a round and min_clients 2, up to 6 of 8 (75%) may be dropped or refused."""
    plan = make_plan(pool=16, per_round=8, min_clients=2, rounds=3)
    by_round = {}
    for r in range(1, 4):
        bad = plan.sample(r)[: int(fraction * 8)]
        by_round[r] = (set(bad[::2]), set(bad[1::2]))  # half refused, half dropped
    engine = FakeEngine(by_round=by_round)
    if not completes:
        with pytest.raises(AggregationError):
            make_federation(tmp_path, plan, engine, limits=UpdateLimits(norm_bound=1e3)).run()
        return
    state = make_federation(tmp_path, plan, engine, limits=UpdateLimits(norm_bound=1e3)).run()
    assert state.round == 3
    for r in range(1, 4):
        assert state.metrics[r]["received"] == 8 - int(fraction * 8)
        assert set(state.metrics[r]["failures"]) == set().union(*by_round[r])


def test_ffa_client_that_moves_frozen_A_is_refused(tmp_path):
    plan = make_plan(min_clients=1, types=("r2",))

    class MovesA(FakeEngine):
        def train(self, jobs):
            out = super().train(jobs)
            u = out[0].update
            name = sorted(u.modules)[0]
            out[0] = TrainResult(_module(u, name, A=u.modules[name].A + 0.5), {})
            return out

    state = make_federation(tmp_path, plan, MovesA(), method="ffa").run()
    assert all(m["rejected"] == {"A.values": 1} for m in state.metrics[1:])
