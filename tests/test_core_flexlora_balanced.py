"""FlexLoRA's factor-balance controls: the same product ``s B A`` as FlexLoRA, another split of it."""

from __future__ import annotations

import math

import pytest
import torch

from flexlora.core.aggregators.base import GlobalState
from flexlora.core.aggregators.flexlora_balanced import FEDIT_A_ROW_NORM, sqrt_split
from flexlora.core.lora import LoraFactors, LoraUpdate
from flexlora.methods import make_aggregator

SHAPES = {"q_proj": (12, 10), "down_proj": (10, 16)}


def updates(seed: int = 0) -> list[LoraUpdate]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate([2, 4, 3]):
        mods = {
            n: LoraFactors(torch.randn(r, k, generator=gen), torch.randn(d, r, generator=gen), 16.0)
            for n, (d, k) in SHAPES.items()
        }
        out.append(LoraUpdate(mods, num_examples=i + 1, client_id=f"c{i}"))
    return out


@pytest.mark.parametrize("method", ["flexlora-initnorm", "flexlora-sqrt"])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("rank", [1, 3, 9])  # 9 exceeds the global update's rank (2 + 4 + 3 = 9 at most)
def test_product_is_flexloras(method, rslora, rank):
    ref_agg, agg = make_aggregator("flexlora", dtype=torch.float64), make_aggregator(method)
    state = ref_agg.aggregate(updates())
    ranks = dict.fromkeys(SHAPES, rank)
    ref = ref_agg.payload(state, ranks, alpha=16.0, use_rslora=rslora)
    got = agg.payload(state, ranks, alpha=16.0, use_rslora=rslora)
    for n in SHAPES:
        assert torch.allclose(got[n].delta(), ref[n].delta(), atol=1e-9)
        assert got[n].scale == ref[n].scale


def test_initnorm_puts_a_rows_at_fedits_init_norm():
    state = make_aggregator("flexlora").aggregate(updates())
    got = make_aggregator("flexlora-initnorm").payload(state, {"q_proj": 3, "down_proj": 3}, alpha=16.0)
    for f in got.values():
        assert torch.allclose(f.A.norm(dim=1), torch.full((3,), 1 / math.sqrt(3)), atol=1e-6)
    # FedIT's init: U(-1/sqrt(k), 1/sqrt(k)) rows have mean square norm k * 1/(3k) = 1/3
    init = GlobalState.initial({"m": (4, 4096)}, {"m": 64}, "fedavg", seed=1).modules["m"].A
    assert init.norm(dim=1).pow(2).mean().item() == pytest.approx(FEDIT_A_ROW_NORM**2, rel=0.02)


def test_sqrt_split_by_hand():
    # s B = U S with U = I[:, :2], S = (4, 1); A = V^T = I[:2]; s = 16 / 2 = 8
    U, S = torch.eye(3)[:, :2], torch.tensor([4.0, 1.0])
    f = LoraFactors(torch.eye(3)[:2], U * S / 8.0, alpha=16.0)
    g = sqrt_split(f)
    assert torch.allclose(g.A.norm(dim=1), torch.tensor([2.0, 1.0]))  # sqrt(S)
    assert torch.allclose(8.0 * g.B.norm(dim=0), torch.tensor([2.0, 1.0]))  # s ||B_j|| = sqrt(S)
    assert torch.allclose(g.delta(), f.delta())


def test_sqrt_split_keeps_dead_directions_trainable():
    f = LoraFactors(torch.eye(3)[:2], torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]), alpha=2.0)
    g = sqrt_split(f)
    assert torch.equal(g.A[1], f.A[1])  # a zero singular value: FlexLoRA's A row kept, so it still trains
    assert torch.all(g.B[:, 1] == 0) and torch.allclose(g.delta(), f.delta())


@pytest.mark.parametrize("method", ["flexlora-initnorm", "flexlora-sqrt"])
def test_round_zero_state_is_handed_out_unchanged(method):
    state = GlobalState.initial(SHAPES, dict.fromkeys(SHAPES, 4), method, seed=0)
    got = make_aggregator(method).payload(state, dict.fromkeys(SHAPES, 4), alpha=16.0)
    for n, lr in state.modules.items():
        assert torch.equal(got[n].A, lr.A) and torch.all(got[n].B == 0)


@pytest.mark.parametrize("method", ["flexlora-initnorm", "flexlora-sqrt"])
def test_a_state_read_back_from_tensors_is_split_the_same(method):
    agg = make_aggregator(method)
    state = agg.aggregate(updates())
    back = GlobalState.from_tensors(state.to_tensors(), method)  # loses the svd_form flag
    ranks = dict.fromkeys(SHAPES, 3)
    a, b = agg.payload(state, ranks, alpha=16.0), agg.payload(back, ranks, alpha=16.0)
    for n in SHAPES:
        assert torch.allclose(a[n].A, b[n].A) and torch.allclose(a[n].B, b[n].B)
