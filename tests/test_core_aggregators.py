"""Every aggregator in the registry, and each method's own math.

The registry suite is parametrized over ``AGGREGATORS``, the distinct aggregators of the method registry
(:mod:`flexlora.methods`): a new aggregator joins it by being registered. Its
inputs are client updates whose ``A`` factors are prefixes of one shared ``A`` (so FFA-LoRA accepts them) and
whose ranks differ (one shared rank for the methods in ``HOMOGENEOUS``).
"""

from __future__ import annotations

import math

import pytest
import torch

from flexlora.core.aggregators import GlobalState
from flexlora.core.aggregators.base import client_weights
from flexlora.core.aggregators.fedavg import FedAvg
from flexlora.core.aggregators.ffa import FFALoRA
from flexlora.core.aggregators.flora import FLoRA
from flexlora.core.aggregators.hetlora import HetLoRA, product_norm
from flexlora.core.errors import AggregationError
from flexlora.core.lora import LoraFactors, LoraUpdate
from flexlora.methods import METHODS, make_aggregator

AGGREGATORS = {cls.name: cls for cls in (m.aggregator_class() for m in METHODS.values())}
HOMOGENEOUS = {"fedavg"}  # methods that refuse mixed ranks by design
SHAPES = {"model.layers.0.self_attn.q_proj": (12, 10), "model.layers.0.mlp.down_proj": (10, 16)}
Q, DOWN = SHAPES
RANKS = [2, 4, 3]
ALPHAS = [8.0, 16.0, 32.0]


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def make_updates(method: str, seed: int = 0, shapes=SHAPES) -> list[LoraUpdate]:
    """Three clients with different ranks, alphas and example counts; ``A_i`` = leading rows of a shared A."""
    gen = torch.Generator().manual_seed(seed)
    ranks = [3, 3, 3] if method in HOMOGENEOUS else RANKS
    shared = {name: torch.randn(max(ranks), k, generator=gen) for name, (d, k) in shapes.items()}
    updates = []
    for i, (r, alpha) in enumerate(zip(ranks, ALPHAS, strict=True)):
        modules = {
            name: LoraFactors(shared[name][:r].clone(), torch.randn(d, r, generator=gen), alpha)
            for name, (d, k) in shapes.items()
        }
        updates.append(LoraUpdate(modules, num_examples=10 * (i + 1), client_id=f"c{i}"))
    return updates


def dense_sum(updates: list[LoraUpdate], name: str) -> torch.Tensor:
    total = sum(u.num_examples for u in updates)
    return sum((u.num_examples / total) * u.modules[name].delta().double() for u in updates)


def replace(u: LoraUpdate, name: str, **changes) -> LoraUpdate:
    f = u.modules[name]
    fields = {"A": f.A, "B": f.B, "alpha": f.alpha, "use_rslora": f.use_rslora} | changes
    return LoraUpdate({**u.modules, name: LoraFactors(**fields)}, u.num_examples, u.client_id)


# ---------------------------------------------------------------------------------------------------------
# the registry suite

registry = pytest.mark.parametrize("method", sorted(AGGREGATORS))


def test_registry_names_and_fedit_alias():
    assert set(AGGREGATORS) >= {"flexlora", "fedavg", "hetlora", "flora", "ffa"}
    for name, cls in AGGREGATORS.items():
        assert cls.name == name
        assert isinstance(make_aggregator(name), cls)
    assert isinstance(make_aggregator("fedit"), FedAvg)
    with pytest.raises(ValueError, match="unknown method 'fedprox'"):
        make_aggregator("fedprox")


@registry
def test_aggregate_then_payload_round_trips_shapes(method):
    agg = make_aggregator(method)
    updates = make_updates(method)
    state = agg.aggregate(updates)
    assert isinstance(state, GlobalState) and state.method == method
    assert set(state.modules) == set(SHAPES)
    for name, shape in SHAPES.items():
        lr = state.modules[name]
        assert lr.shape == shape and lr.B.shape[1] == lr.A.shape[0]
        assert torch.isfinite(lr.delta()).all()

    for u in updates:
        ranks = u.ranks()
        payload = agg.payload(state, ranks, alpha=u.modules[Q].alpha)
        assert set(payload) == set(ranks)
        for name, f in payload.items():
            assert f.shape == SHAPES[name]
            fresh = METHODS[method].client.fresh_adapter
            want = state.modules[name].rank if fresh else ranks[name]
            assert f.A.shape[0] == f.B.shape[1] == want
            if fresh:  # the whole state travels: exact
                assert rel(f.delta(), state.modules[name].delta()) < 1e-6

    # payloads are valid client updates for the next round
    nxt = [
        LoraUpdate(agg.payload(state, u.ranks(), alpha=16.0), u.num_examples, u.client_id) for u in updates
    ]
    state2 = agg.aggregate(nxt, previous=state)
    assert {n: lr.shape for n, lr in state2.modules.items()} == SHAPES

    # and the state survives its flat tensor form
    back = GlobalState.from_tensors(state.to_tensors(), method)
    for name in SHAPES:
        assert torch.equal(back.modules[name].B, state.modules[name].B)
        assert torch.equal(back.modules[name].A, state.modules[name].A)


@registry
def test_identical_inputs_in_any_order_give_the_same_state(method):
    agg = make_aggregator(method)
    updates = make_updates(method)
    ref = agg.aggregate(updates)
    again = agg.aggregate(make_updates(method))
    orders = [list(reversed(updates)), [updates[1], updates[2], updates[0]]]
    for name in SHAPES:
        assert torch.equal(again.modules[name].B, ref.modules[name].B)  # deterministic
        assert torch.equal(again.modules[name].A, ref.modules[name].A)
    for order in orders:
        state = agg.aggregate(order)
        for name in SHAPES:
            assert rel(state.modules[name].delta(), ref.modules[name].delta()) < 1e-5, name
            for r in {u.modules[name].rank for u in updates}:
                got = agg.payload(state, {name: r}, alpha=16.0)[name].delta()
                want = agg.payload(ref, {name: r}, alpha=16.0)[name].delta()
                assert rel(got, want) < 1e-4, (name, r)


@registry
def test_scaling_all_example_counts_changes_nothing(method):
    agg = make_aggregator(method)
    updates = make_updates(method)
    scaled = [LoraUpdate(u.modules, u.num_examples * 7, u.client_id) for u in updates]
    a, b = agg.aggregate(updates), agg.aggregate(scaled)
    for name in SHAPES:
        assert rel(b.modules[name].delta(), a.modules[name].delta()) < 1e-6


def _nan(us):
    return [
        us[0],
        replace(us[1], DOWN, B=us[1].modules[DOWN].B.index_fill(0, torch.tensor([0]), math.nan)),
        us[2],
    ]


def _inf(us):
    return [
        us[0],
        replace(us[1], DOWN, A=us[1].modules[DOWN].A.index_fill(1, torch.tensor([2]), math.inf)),
        us[2],
    ]


def _rank_mismatch(us):
    return [us[0], replace(us[1], DOWN, A=us[1].modules[DOWN].A[:-1]), us[2]]


def _shape_mismatch(us):
    B = us[1].modules[DOWN].B
    return [us[0], replace(us[1], DOWN, B=torch.cat([B, B[:1]])), us[2]]


def _missing_module(us):
    return [us[0], LoraUpdate({Q: us[1].modules[Q]}, us[1].num_examples, "c1"), us[2]]


def _extra_module(us):
    extra = {**us[1].modules, "model.layers.0.self_attn.v_proj": us[1].modules[Q]}
    return [us[0], LoraUpdate(extra, us[1].num_examples, "c1"), us[2]]


def _zero_examples(us):
    return [us[0], LoraUpdate(us[1].modules, 0, "c1"), us[2]]


def _negative_examples(us):
    return [us[0], LoraUpdate(us[1].modules, -5, "c1"), us[2]]


def _integer_dtype(us):
    return [us[0], replace(us[1], DOWN, A=us[1].modules[DOWN].A.round().long()), us[2]]


def _nan_alpha(us):
    return [us[0], replace(us[1], DOWN, alpha=math.nan), us[2]]


BAD = {
    "nan": (_nan, DOWN),
    "inf": (_inf, DOWN),
    "rank-mismatch": (_rank_mismatch, DOWN),
    "shape-mismatch": (_shape_mismatch, DOWN),
    "missing-module": (_missing_module, DOWN),
    "extra-module": (_extra_module, "model.layers.0.self_attn.v_proj"),
    "zero-examples": (_zero_examples, None),
    "negative-examples": (_negative_examples, None),
    "integer-dtype": (_integer_dtype, DOWN),
    "nan-alpha": (_nan_alpha, DOWN),
}


@registry
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_naming_client_and_module(method, case):
    mutate, module = BAD[case]
    with pytest.raises(AggregationError) as err:
        make_aggregator(method).aggregate(mutate(make_updates(method)))
    assert "'c1'" in str(err.value)
    if module is not None:
        assert repr(module) in str(err.value)


@registry
def test_no_updates_is_refused(method):
    with pytest.raises(AggregationError, match="no client updates"):
        make_aggregator(method).aggregate([])


@registry
def test_unnamed_clients_are_named_by_position(method):
    us = [LoraUpdate(u.modules, u.num_examples) for u in make_updates(method)]
    with pytest.raises(AggregationError, match="client #1"):
        make_aggregator(method).aggregate(_nan(us))


def test_client_weights():
    us = make_updates("flexlora")
    assert client_weights(us) == pytest.approx([1 / 6, 2 / 6, 3 / 6])


# ---------------------------------------------------------------------------------------------------------
# FedAvg


def test_fedavg_refuses_mixed_ranks_naming_the_module():
    with pytest.raises(AggregationError, match=r"fedavg needs one rank per module.*ranks \[2, 3, 4\]"):
        FedAvg().aggregate(make_updates("flexlora"))


def test_fedavg_averages_A_and_scaled_B_separately():
    us = make_updates("fedavg")
    state = FedAvg().aggregate(us)
    p = client_weights(us)
    for name in SHAPES:
        B = sum(pi * u.modules[name].scale * u.modules[name].B for pi, u in zip(p, us, strict=True))
        A = sum(pi * u.modules[name].A for pi, u in zip(p, us, strict=True))
        assert torch.allclose(state.modules[name].B, B, atol=1e-6)
        assert torch.allclose(state.modules[name].A, A, atol=1e-6)
    f = FedAvg().payload(state, {Q: 3}, alpha=12.0)[Q]
    assert torch.allclose(f.B * 4.0, state.modules[Q].B, atol=1e-6)  # s = 12 / 3
    with pytest.raises(AggregationError, match="cannot change ranks"):
        FedAvg().payload(state, {Q: 2}, alpha=16.0)


# ---------------------------------------------------------------------------------------------------------
# HetLoRA


def _hetlora_clients():
    # client a: rank 1, alpha 1 (s = 1), 1 example; client b: rank 2, alpha 4 (s = 2), 3 examples
    a = LoraFactors(torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([[1.0], [2.0]]), alpha=1.0)
    b = LoraFactors(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), torch.eye(2), alpha=4.0)
    return [LoraUpdate({"m": a}, 1, "a"), LoraUpdate({"m": b}, 3, "b")]


def test_hetlora_zero_pads_and_averages():
    state = HetLoRA().aggregate(_hetlora_clients())
    # B_g = 1/4 [s_a B_a | 0] + 3/4 s_b B_b = 1/4 [[1, 0], [2, 0]] + 3/2 I
    assert torch.allclose(state.modules["m"].B, torch.tensor([[1.75, 0.0], [0.5, 1.5]]))
    # A_g = 1/4 [A_a; 0] + 3/4 A_b
    assert torch.allclose(state.modules["m"].A, torch.tensor([[0.25, 0.75, 0.25], [0.75, 0.0, 0.0]]))
    # a rank-1 client with alpha 2 (s = 2) takes the leading column / row
    f = HetLoRA().payload(state, {"m": 1}, alpha=2.0)["m"]
    assert torch.allclose(f.B, torch.tensor([[0.875], [0.25]])) and torch.allclose(
        f.A, state.modules["m"].A[:1]
    )


def test_hetlora_sparsity_weighted():
    us = _hetlora_clients()
    # ||s_a B_a A_a||_F = ||[[1, 0, 1], [2, 0, 2]]|| = sqrt(10); ||2 B_b A_b||_F = 2 sqrt(2)
    assert product_norm(us[0].modules["m"]) == pytest.approx(math.sqrt(10))
    assert product_norm(us[1].modules["m"]) == pytest.approx(2 * math.sqrt(2))
    raw = [0.25 * math.sqrt(10), 0.75 * 2 * math.sqrt(2)]
    wa, wb = (x / sum(raw) for x in raw)
    agg = HetLoRA(sparsity_weighted=True)
    assert agg.hyperparameters() == {"sparsity_weighted": True}
    state = agg.aggregate(us)
    B = torch.tensor([[wa + 2 * wb, 0.0], [2 * wa, 2 * wb]])
    A = torch.tensor([[wa, wb, wa], [wb, 0.0, 0.0]])
    assert torch.allclose(state.modules["m"].B, B) and torch.allclose(state.modules["m"].A, A)
    # weights are per module and sum to 1
    assert sum(agg.module_weights([u.modules["m"] for u in us], client_weights(us))) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------
# FLoRA


def test_flora_stack_is_the_exact_sum_and_cumulative():
    us1, us2 = make_updates("flora", seed=1), make_updates("flora", seed=2)
    s1 = FLoRA().aggregate(us1)
    for name in SHAPES:
        assert s1.modules[name].rank == sum(RANKS)
        assert rel(s1.modules[name].delta(), dense_sum(us1, name)) < 1e-6
    s2 = FLoRA().aggregate(us2, previous=s1)
    for name, (d, k) in SHAPES.items():
        assert s2.modules[name].rank <= min(d, k)
        assert rel(s2.modules[name].delta(), dense_sum(us1, name) + dense_sum(us2, name)) < 1e-5


def test_flora_recompresses_exactly_when_wider_than_min_d_k():
    shapes = {"m": (7, 6)}
    us = make_updates("flora", seed=3, shapes=shapes)  # R = 9 > min(7, 6)
    state = FLoRA().aggregate(us)
    assert state.modules["m"].rank == 6
    assert rel(state.modules["m"].delta(), dense_sum(us, "m")) < 1e-5
    f = FLoRA().payload(state, {"m": 2}, alpha=16.0)["m"]  # requested ranks are ignored: the whole stack
    assert f.rank == 6 and rel(f.delta(), dense_sum(us, "m")) < 1e-5


def test_flora_ignores_the_all_zero_initial_state():
    us = make_updates("flora")
    init = GlobalState.initial(SHAPES, {n: 4 for n in SHAPES}, "flora")
    state = FLoRA().aggregate(us, previous=init)
    for name in SHAPES:
        assert state.modules[name].rank == sum(RANKS)
        assert rel(state.modules[name].delta(), dense_sum(us, name)) < 1e-6


# ---------------------------------------------------------------------------------------------------------
# FFA-LoRA


def test_ffa_averages_B_over_the_shared_A_exactly():
    us = make_updates("ffa")
    state = FFALoRA().aggregate(us)
    for name in SHAPES:
        assert torch.equal(state.modules[name].A, us[1].modules[name].A)  # the rank-4 client holds all rows
        assert rel(state.modules[name].delta(), dense_sum(us, name)) < 1e-6
    # with a previous state, its A is the shared one
    init = GlobalState.initial(SHAPES, {n: 4 for n in SHAPES}, "ffa", seed=5)
    payloads = [FFALoRA().payload(init, u.ranks(), alpha=16.0) for u in us]
    gen = torch.Generator().manual_seed(9)
    trained = [
        LoraUpdate(
            {n: LoraFactors(f.A, torch.randn(f.B.shape, generator=gen), f.alpha) for n, f in p.items()}, 5
        )
        for p in payloads
    ]
    state = FFALoRA().aggregate(trained, previous=init)
    for name in SHAPES:
        assert torch.equal(state.modules[name].A, init.modules[name].A)
        assert rel(state.modules[name].delta(), dense_sum(trained, name)) < 1e-6


def test_ffa_refuses_a_drifted_A_naming_the_client():
    us = make_updates("ffa")
    A = us[2].modules[Q].A
    drifted = [us[0], us[1], replace(us[2], Q, A=A + 1e-3 * torch.ones_like(A))]
    with pytest.raises(AggregationError, match=r"client 'c2': module '.*q_proj': A differs"):
        FFALoRA().aggregate(drifted)
    # within atol it is accepted, with the first of the largest-rank clients' A as the shared one
    state = FFALoRA(atol=1e-2).aggregate(drifted)
    assert torch.equal(state.modules[Q].A, us[1].modules[Q].A)
