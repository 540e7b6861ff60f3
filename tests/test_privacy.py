"""Client-level DP: clipping and fixed-denominator mean, noise of the promised scale, post-processing to
the state, the budget from Flower's RDP accountant, reproducible noise, and a federation that reports it."""

from __future__ import annotations

import math

import pytest
import torch

from flexlora.config import ConfigError, load_config
from flexlora.core.lora import LoraFactors, LoraUpdate
from flexlora.core.privacy import PrivateAggregator, accountant_available, privacy_spent
from flexlora.core.validation import update_norm
from flexlora.methods import METHODS, make_aggregator
from helpers.round_loop import FakeEngine, make_federation, make_plan

needs_accountant = pytest.mark.skipif(not accountant_available(), reason="dp-accounting not installed")
SHAPES = {"q": (40, 30), "v": (20, 30)}


def client(seed, r=2, scale=1.0, A=None) -> LoraUpdate:
    gen = torch.Generator().manual_seed(seed)
    modules = {
        n: LoraFactors(
            A[n][:r].clone() if A is not None else torch.randn(r, k, generator=gen),
            scale * torch.randn(d, r, generator=gen),
            16.0,
        )
        for n, (d, k) in SHAPES.items()
    }
    return LoraUpdate(modules, 7, f"c{seed}")


def dp(method="flexlora", sigma=1.0, clip=1.0, m=4, **kw) -> PrivateAggregator:
    inner, space = make_aggregator(method), kw.pop("space", METHODS[method].space)
    return PrivateAggregator(inner, clip, sigma, expected_clients=m, population=20, space=space, **kw)


def test_without_noise_it_is_the_clipped_fixed_denominator_mean():
    ups = [client(i, scale=s) for i, s in enumerate((1e-3, 1.0, 100.0))]
    agg = dp(sigma=1e-12, clip=0.5, m=4)  # noise negligible
    agg.start_round(1)
    state = agg.aggregate(ups)
    expected = {n: torch.zeros(SHAPES[n], dtype=torch.float64) for n in SHAPES}
    for u in ups:
        c = min(1.0, 0.5 / update_norm(u.modules))
        for n, f in u.modules.items():
            expected[n] += c / 4 * f.scale * (f.B.double() @ f.A.double())
    for n in SHAPES:
        torch.testing.assert_close(state.modules[n].delta().double(), expected[n], rtol=1e-4, atol=1e-7)
    assert state.info["clipped"] == 2 and state.info["noise_std"] == pytest.approx(1e-12 * 0.5 / 4)


def test_noise_has_std_sigma_C_over_m_and_is_reproducible_per_round():
    zero = [
        LoraUpdate(
            {n: LoraFactors(torch.zeros(2, k), torch.zeros(d, 2), 16.0) for n, (d, k) in SHAPES.items()},
            1,
            "z",
        )
    ]
    agg = dp(sigma=2.0, clip=3.0, m=6)  # std 1.0
    agg.start_round(1)
    q = agg.aggregate(zero).modules["q"].delta()
    # the state is the rank-2 truncation of the noise matrix (post-processing): its energy is the top 2
    # singular values of a 40 x 30 Gaussian matrix of std 1
    noise = torch.randn(40, 30, generator=torch.Generator().manual_seed(1)) * agg.noise_std
    top = torch.linalg.svdvals(noise)[:2].pow(2).sum().sqrt()
    assert 0.7 * top < q.norm() < 1.3 * top
    agg.start_round(1)
    assert torch.equal(agg.aggregate(zero).modules["q"].delta(), q)
    agg.start_round(2)
    assert not torch.equal(agg.aggregate(zero).modules["q"].delta(), q)
    secure = dp(sigma=2.0, clip=3.0, m=6, secure_noise=True)
    secure.start_round(1)
    assert not torch.equal(secure.aggregate(zero).modules["q"].delta(), q)


def test_dense_noise_std_on_ffa_B():
    A = {n: torch.randn(8, k) for n, (d, k) in SHAPES.items()}
    zero = [
        LoraUpdate({n: LoraFactors(A[n][:8], torch.zeros(d, 8), 8.0) for n, (d, k) in SHAPES.items()}, 1, "z")
    ]
    agg = dp("ffa", sigma=1.0, clip=2.0, m=2)  # std 1.0 on every entry of B
    agg.start_round(3)
    state = agg.aggregate(zero)
    B = state.modules["q"].B
    assert B.shape == (40, 8) and abs(float(B.std()) - 1.0) < 0.1 and abs(float(B.mean())) < 0.1
    torch.testing.assert_close(state.modules["q"].A, A["q"])  # A stays the shared, frozen one


@needs_accountant
def test_epsilon_grows_with_rounds_shrinks_with_noise_and_respects_the_classic_bound():
    eps = [privacy_spent(1.0, t, 100, 10, 1e-5) for t in (0, 1, 5, 20)]
    assert eps[0] == 0.0 and eps[1] < eps[2] < eps[3]
    assert privacy_spent(4.0, 20, 100, 10, 1e-5) < eps[3]
    # RDP of the Gaussian mechanism: T a / (2 s^2); classic conversion eps <= RDP + log(1/delta) / (a - 1)
    classic = min(20 * a / 2 + math.log(1e5) / (a - 1) for a in (1.5, 2, 3, 4, 5, 6, 8, 10, 16, 32))
    assert eps[3] <= classic + 1e-9
    report = dp(sigma=1.0).privacy_spent(5)
    assert report["epsilon"] == pytest.approx(privacy_spent(1.0, 5, 20, 4, 1e-5))
    assert report["delta"] == 1e-5 and report["releases"] == 5


def test_refuses_parameters_it_cannot_make_private():
    # which methods are refused is the registry's (Method.dp), checked by config validation
    for kwargs in (dict(clip=0.0), dict(sigma=-1.0), dict(m=0), dict(m=21), dict(delta=1.0), dict(space="x")):
        with pytest.raises(ValueError):
            dp(**kwargs)


@needs_accountant
def test_federation_reports_the_budget_every_round(tmp_path):
    plan = make_plan(pool=8, per_round=4, min_clients=1, rounds=3)
    agg = PrivateAggregator(
        make_aggregator("flexlora"), 5.0, 1.0, expected_clients=4, population=8, space="product"
    )
    fed = make_federation(tmp_path, plan, FakeEngine(), method="flexlora")
    fed.aggregator = agg
    state = fed.run()
    eps = [m["privacy"]["epsilon"] for m in state.metrics[1:]]
    assert eps == sorted(eps) and eps[0] > 0 and len(eps) == 3
    assert all(m["aggregation"]["noise_std"] == pytest.approx(1.25) for m in state.metrics[1:])


def test_config_checks_dp_settings(tmp_path):
    base = ["model.name=tiny", "federation.distribution=homo"]
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            [*base, "security.dp_noise_multiplier=1.0", "federation.method=fedavg", "security.robust=median"],
        )
    text = str(info.value)
    assert "security.clip_norm: differential privacy needs" in text
    assert "security.robust: 'median' cannot be combined" in text
    assert "fedavg is not supported" in text
    with pytest.raises(ConfigError, match="security.robust: 'mode' is not one of"):
        load_config(None, [*base, "security.robust=mode"])
    with pytest.raises(ConfigError, match="security.trim_fraction"):
        load_config(None, [*base, "security.trim_fraction=0.5"])
    cfg = load_config(None, [*base, "security.dp_noise_multiplier=1.0", "security.clip_norm=2.0"])
    assert cfg.security.dp_noise_multiplier == 1.0 or not accountant_available()
