"""raFLoRA and FLoRIST: hand-computed cases and the identities their papers state."""

from __future__ import annotations

import pytest
import torch

from flexlora.core.aggregators.flexlora import FlexLoRA
from flexlora.core.aggregators.flora import FLoRA
from flexlora.core.aggregators.florist import FLoRIST, energy_rank
from flexlora.core.aggregators.raflora import RaFLoRA, partition_weights
from flexlora.core.lora import LoraFactors, LoraUpdate
from flexlora.methods import METHODS, make_aggregator

D, K = 12, 10


def client(rank: int, n: int, seed: int, alpha: float = 16.0) -> LoraUpdate:
    gen = torch.Generator().manual_seed(seed)
    f = LoraFactors(torch.randn(rank, K, generator=gen), torch.randn(D, rank, generator=gen), alpha)
    return LoraUpdate({"m": f}, num_examples=n, client_id=f"c{seed}")


def delta(state) -> torch.Tensor:
    return state.modules["m"].delta().double()


def test_partition_weights_by_hand():
    # p = (1/4, 3/4), ranks (1, 2): column 0 is shared (weights p), column 1 is client 2's alone (weight 1)
    w = partition_weights([1, 2], [0.25, 0.75])
    assert torch.allclose(w[0], torch.tensor([0.25], dtype=torch.float64))
    assert torch.allclose(w[1], torch.tensor([0.75, 1.0], dtype=torch.float64))


def test_raflora_hand_computed_two_clients():
    a, b = client(1, 1, 0), client(2, 3, 1)
    fa, fb = a.modules["m"], b.modules["m"]
    col = lambda f, j: f.scale * torch.outer(f.B[:, j], f.A[j]).double()  # noqa: E731
    expected = 0.25 * col(fa, 0) + 0.75 * col(fb, 0) + 1.0 * col(fb, 1)
    got = delta(RaFLoRA(dtype=torch.float64).aggregate([a, b]))
    assert torch.allclose(got, expected, atol=1e-10)


def test_raflora_streamed_is_raflora_not_flexlora():
    # the round loop and `flexlora aggregate` call aggregate_stream: it must keep the partition weights
    updates = [client(1, 1, 0), client(2, 3, 1)]
    agg = RaFLoRA(dtype=torch.float64)
    streamed = delta(agg.aggregate_stream(iter(updates)))
    assert torch.allclose(streamed, delta(agg.aggregate(updates)), atol=1e-10)
    assert not torch.allclose(streamed, delta(FlexLoRA(dtype=torch.float64).aggregate(updates)), atol=1e-6)


def test_raflora_with_equal_ranks_is_flexlora():
    updates = [client(3, n, s, alpha) for s, (n, alpha) in enumerate([(5, 8.0), (9, 16.0), (2, 32.0)])]
    ra = RaFLoRA(dtype=torch.float64).aggregate(updates)
    flex = FlexLoRA(dtype=torch.float64).aggregate(updates)
    assert torch.allclose(ra.modules["m"].B, flex.modules["m"].B, atol=1e-10)
    assert torch.allclose(ra.modules["m"].A, flex.modules["m"].A, atol=1e-10)


def test_raflora_undoes_the_collapse_flexlora_shows_on_a_shared_basis():
    # three rank-2 clients and one rank-8 client holding the same 8 orthonormal directions (as after an SVD
    # redistribution), scale 1, equal data: FlexLoRA weighs directions 2..7 by P_j = 1/4, raFLoRA by 1
    Q, _ = torch.linalg.qr(torch.randn(D, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(K, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    updates = [
        LoraUpdate({"m": LoraFactors(V[:, :r].T.clone(), Q[:, :r].clone(), float(r))}, 10, f"c{i}")
        for i, r in enumerate([2, 2, 2, 8])
    ]

    def beyond(agg) -> float:
        S = agg.aggregate(updates).singular_values("m").double()
        return float((S[2:] ** 2).sum() / (S**2).sum())

    assert beyond(FlexLoRA(dtype=torch.float64)) == pytest.approx((6 / 16) / (2 + 6 / 16))
    assert beyond(RaFLoRA(dtype=torch.float64)) == pytest.approx(6 / 8)


def test_energy_rank_keeps_the_stated_fraction():
    S = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert energy_rank(S, 16 / 22) == 1
    assert energy_rank(S, 0.75) == 2  # 20/22 = 0.909
    assert energy_rank(S, 0.95) == 3  # 21/22 = 0.955
    assert energy_rank(S, 1.0) == 4
    assert energy_rank(torch.zeros(3), 0.9) == 1
    for tau in (0.5, 0.8, 0.9, 0.99):
        k = energy_rank(S, tau)
        share = (S[:k] ** 2).sum() / (S**2).sum()
        below = (S[: k - 1] ** 2).sum() / (S**2).sum()
        assert share >= tau and below < tau  # the smallest rank that keeps the fraction


@pytest.mark.parametrize("tau", [0.5, 0.8, 0.95])
def test_florist_round_update_is_the_thresholded_svd_of_the_exact_sum(tau):
    updates = [client(r, n, s) for s, (r, n) in enumerate([(2, 3), (4, 1), (3, 2)])]
    total = sum(u.num_examples for u in updates)
    exact = sum((u.num_examples / total) * u.modules["m"].delta().double() for u in updates)
    state = FLoRIST(threshold=tau).aggregate(updates)
    S = torch.linalg.svdvals(exact)
    k = energy_rank(S, tau)
    assert state.modules["m"].rank == k
    assert float((delta(state) ** 2).sum() / (exact**2).sum()) >= tau - 1e-5
    U, S_, Vh = torch.linalg.svd(exact)
    assert torch.allclose(delta(state), (U[:, :k] * S_[:k]) @ Vh[:k], atol=1e-4)


def test_florist_with_threshold_one_is_flora_and_is_cumulative():
    first = [client(2, 3, 0), client(4, 1, 1)]
    second = [client(3, 2, 2), client(2, 2, 3)]
    florist, flora = FLoRIST(threshold=1.0), FLoRA()
    s1, f1 = florist.aggregate(first), flora.aggregate(first)
    assert torch.allclose(delta(s1), delta(f1), atol=1e-4)
    s2, f2 = florist.aggregate(second, previous=s1), flora.aggregate(second, previous=f1)
    assert torch.allclose(delta(s2), delta(f2), atol=1e-4)
    payload = florist.payload(s2, {"m": 1}, alpha=16.0)["m"]  # the whole state, whatever the rank asked
    assert payload.rank == s2.modules["m"].rank
    assert torch.allclose(payload.delta().double(), delta(s2), atol=1e-4)


def test_florist_refuses_a_threshold_outside_zero_one():
    for tau in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match="threshold"):
            make_aggregator("florist", threshold=tau)


def test_florist_under_dp_thresholds_the_noised_mean_as_post_processing():
    from flexlora.core.privacy import PrivateAggregator

    updates = [client(r, n, s) for s, (r, n) in enumerate([(2, 3), (4, 1), (3, 2)])]

    def private(inner):
        agg = PrivateAggregator(
            inner, clip_norm=1.0, noise_multiplier=0.5, expected_clients=3, population=10, space="product"
        )
        agg.start_round(1)
        return agg.aggregate(updates)

    assert torch.allclose(delta(private(FLoRIST(threshold=1.0))), delta(private(FLoRA())), atol=1e-4)
    assert private(FLoRIST(threshold=0.5)).modules["m"].rank < private(FLoRA()).modules["m"].rank


@pytest.mark.parametrize("method", ["raflora", "florist"])
def test_robust_median_takes_the_product_space_consensus(method):
    from flexlora.core.robust import RobustAggregator

    updates = [client(r, n, s) for s, (r, n) in enumerate([(2, 3), (4, 1), (3, 2)])]
    agg = RobustAggregator(make_aggregator(method), "median", space=METHODS[method].space)
    assert agg.space == "product"
    assert torch.isfinite(delta(agg.aggregate(updates))).all()
