"""A fake engine for the round loop (clients that send seeded noise, bad updates or nothing) and a small
federation plan over the modules of :mod:`helpers.updates`."""

from __future__ import annotations

from dataclasses import replace

import torch

from flexlora.contracts import TrainFailure, TrainJob, TrainResult
from flexlora.core.lora import LoraFactors, LoraUpdate
from flexlora.core.ranks import parse_rank_type
from flexlora.federation import Federation, FederationPlan
from flexlora.methods import METHODS, make_aggregator
from helpers.updates import ALPHA, SHAPES, changed, poisoned, without


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
        lambda: changed(update, name, B=poisoned(f.B)),
        lambda: replace(update, num_examples=10**9),
        lambda: changed(
            update, name, A=torch.randn(f.rank + 1, f.A.shape[1]), B=torch.randn(f.B.shape[0], f.rank + 1)
        ),
        lambda: changed(update, name, B=f.B * 1e6),  # caught by a norm bound only
        lambda: without(update, name),
        lambda: changed(update, name, alpha=f.alpha * 100),
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
