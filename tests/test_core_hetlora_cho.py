"""HetLoRA as Cho et al. define it: the tail regulariser, rank self-pruning and sparsity-weighted aggregation
(``hetlora-cho``), by hand and end to end on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from flexlora.contracts import TrainJob
from flexlora.core.aggregators.hetlora_cho import TailPenalty
from flexlora.core.lora import LoraFactors, LoraUpdate
from flexlora.data.examples import ClientData, ClientInfo, Example
from flexlora.lora_host import LoraHost
from flexlora.methods import make_aggregator
from flexlora.models import ALL_PROJECTIONS
from flexlora.training import TrainConfig, run_train_job


def test_tail_is_the_last_components_from_floor_gamma_r():
    t = TailPenalty(gamma=0.99)
    assert [t.tail_start(r) for r in (1, 8, 30, 200)] == [0, 7, 29, 198]
    assert TailPenalty(gamma=0.5).tail_start(4) == 2
    for bad in ({"gamma": 1.0}, {"gamma": 0.0}, {"lam": -1.0}, {"threshold": math.nan}):
        with pytest.raises(ValueError):
            TailPenalty(**bad)


def hand_factors() -> tuple[torch.Tensor, torch.Tensor]:
    # r = 4, gamma = 0.5: the tail is components 2 and 3; ||A_tail|| = 5, ||B_tail|| = 2
    A = torch.zeros(4, 3)
    A[0, 0], A[1, 1], A[2, 0], A[3, 1] = 1.0, 1.0, 3.0, 4.0
    B = torch.zeros(2, 4)
    B[0, 0], B[1, 1], B[0, 2], B[1, 3] = 6.0, 8.0, 2.0, 0.0
    return A, B


def test_penalty_value_and_gradient_by_hand_and_by_autograd():
    pen = TailPenalty(lam=0.1, gamma=0.5)
    A, B = hand_factors()
    assert pen.value(A, B).item() == pytest.approx(10.0)
    A1, B1 = A.clone().requires_grad_(), B.clone().requires_grad_()
    (pen.lam * pen.value(A1, B1)).backward()
    A2, B2 = A.clone().requires_grad_(), B.clone().requires_grad_()
    pen.add_gradients([(A2, B2)])
    assert torch.allclose(A2.grad, A1.grad) and torch.allclose(B2.grad, B1.grad)
    # by hand: d/dA_tail = lam ||B_t|| A_t / ||A_t|| = 0.1 * 2 / 5 * A_t; the head gets nothing
    assert torch.allclose(A2.grad[2:], 0.04 * A[2:]) and torch.all(A2.grad[:2] == 0)
    assert torch.allclose(B2.grad[:, 2:], 0.25 * B[:, 2:])  # 0.1 * 5 / 2


def test_penalty_joins_each_optimizer_step_once_and_only_inside_the_block():
    pen = TailPenalty(lam=0.1, gamma=0.5)
    A0, B0 = hand_factors()
    A, B = torch.nn.Parameter(A0.clone()), torch.nn.Parameter(B0.clone())
    opt = torch.optim.SGD([A, B], lr=1.0)
    with pen.during_training([(A, B)]):
        (0 * (A.sum() + B.sum())).backward()  # a loss with zero gradient: only the penalty moves
        opt.step()
    assert torch.allclose(A.detach()[2:], 0.96 * A0[2:]) and torch.equal(A.detach()[:2], A0[:2])
    assert torch.allclose(B.detach()[:, 2:], 0.75 * B0[:, 2:])
    opt.zero_grad()
    (0 * A.sum() + 0 * B.sum()).backward()
    before = A.detach().clone()
    opt.step()  # outside the block: the hook is gone
    assert torch.equal(A.detach(), before)


def test_self_pruning_zeroes_a_weak_tail_only():
    A, B = hand_factors()
    f = LoraFactors(A, B, alpha=8.0)
    # tail ||B_t|| ||A_t|| = 10; whole ||B|| ||A|| = sqrt(104) * sqrt(27) = 52.99; even share 2/4
    assert TailPenalty(gamma=0.5, threshold=0.37).should_prune(f) is False  # 10 >= 0.37 * 0.5 * 52.99
    assert TailPenalty(gamma=0.5, threshold=0.38).should_prune(f) is True  # 10 < 0.38 * 0.5 * 52.99
    pruned = TailPenalty(gamma=0.5, threshold=1.0).prune({"m": f})["m"]
    assert torch.all(pruned.A[2:] == 0) and torch.all(pruned.B[:, 2:] == 0)
    assert torch.equal(pruned.A[:2], A[:2]) and torch.equal(pruned.B[:, :2], B[:, :2])
    assert TailPenalty(gamma=0.5, threshold=0.0).prune({"m": f})["m"] is f
    one = LoraFactors(torch.ones(1, 3), torch.zeros(2, 1), alpha=1.0)
    assert not TailPenalty(threshold=10.0).should_prune(one)  # rank 1 is never pruned to 0


def test_aggregation_weights_by_update_norm_not_data_size():
    # client 0: s B A = 2 * e1 e1^T (norm 2); client 1: rank 2, s B A norm 6; weights 0.25 / 0.75
    A0, B0 = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[1.0], [0.0]])
    A1, B1 = torch.eye(3)[:2], torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    u0 = LoraUpdate({"m": LoraFactors(A0, B0, alpha=2.0)}, num_examples=100)  # s = 2
    u1 = LoraUpdate({"m": LoraFactors(A1, B1, alpha=4.0)}, num_examples=1)  # s = 2
    agg = make_aggregator("hetlora-cho")
    state = agg.aggregate([u0, u1])
    lr = state.modules["m"]
    assert torch.allclose(lr.B, torch.tensor([[0.25 * 2.0, 0.0], [0.0, 0.75 * 6.0]]))
    assert torch.allclose(lr.A, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.75, 0.0]]))
    assert agg.hyperparameters()["sparsity_weighted"] is True
    assert make_aggregator("hetlora").hyperparameters() == {"sparsity_weighted": False}  # the old variant


@pytest.fixture(scope="module")
def host(tiny):
    return LoraHost(tiny[0], ALL_PROJECTIONS)


DATA = ClientData(
    ClientInfo("c1", "echo", "repeat", 4),
    train=[Example("Repeat.", w, f"{w} {w}", "repeat") for w in ["apple", "pear", "plum", "fig"]],
)


@pytest.mark.usefixtures("one_thread")
def test_a_client_job_trains_with_the_penalty_and_sends_a_pruned_update(tiny, host):
    _, tok = tiny
    g = torch.Generator().manual_seed(0)
    init = {
        n: LoraFactors(torch.randn(4, k, generator=g) / k**0.5, torch.randn(d, 4, generator=g) * 0.01, 8.0)
        for n, (d, k) in host.shapes.items()
    }
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-3, max_length=48)
    plain = run_train_job(host, tok, DATA, TrainJob("c1", 1, 0, init), cfg).update
    keep = TailPenalty(lam=0.0, gamma=0.75, threshold=0.0)  # no penalty, no pruning: the plain update
    same = run_train_job(host, tok, DATA, TrainJob("c1", 1, 0, init, tail_penalty=keep), cfg).update
    for n in init:
        assert torch.equal(same.modules[n].A, plain.modules[n].A)
    prune = TailPenalty(lam=1.0, gamma=0.75, threshold=100.0)  # always prune: the last component zeroed
    pruned = run_train_job(host, tok, DATA, TrainJob("c1", 1, 0, init, tail_penalty=prune), cfg).update
    for n, f in pruned.modules.items():
        assert f.rank == 4 and torch.all(f.A[3:] == 0) and torch.all(f.B[:, 3:] == 0)
        assert not torch.equal(f.A[:3], init[n].A[:3])
    assert not host.loaded
