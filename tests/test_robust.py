"""Robust aggregation: clipping bounds, coordinate-wise median / trimmed mean in the right space, order
invariance, exactness on agreeing clients, and resistance to a hostile minority, for every aggregator."""

from __future__ import annotations

import pytest
import torch

from flexlora.core.lora import LoraFactors, LoraUpdate
from flexlora.core.robust import (
    RobustAggregator,
    clip_updates,
    factor_consensus,
    product_consensus,
    robust_mean,
)
from flexlora.core.validation import update_norm
from flexlora.methods import METHODS, make_aggregator

AGGREGATORS = {cls.name: cls for cls in (m.aggregator_class() for m in METHODS.values())}

SHAPES = {"q": (12, 10), "v": (6, 10)}


def dense(state, name):
    return state.modules[name].delta().double()


def client(seed, ranks, alpha=16.0, scale=1.0, A=None) -> LoraUpdate:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (d, k) in SHAPES.items():
        r = ranks[name] if isinstance(ranks, dict) else ranks
        a = A[name][:r].clone() if A is not None else torch.randn(r, k, generator=gen) / k**0.5
        modules[name] = LoraFactors(a, scale * torch.randn(d, r, generator=gen), alpha)
    return LoraUpdate(modules, 10 + seed, f"c{seed}")


def test_robust_mean_median_and_trimmed_by_hand():
    x = torch.tensor([[1.0, -3.0], [2.0, 100.0], [3.0, 0.0], [1000.0, 1.0]])
    torch.testing.assert_close(robust_mean(x, "median"), torch.tensor([2.5, 0.5]))
    torch.testing.assert_close(robust_mean(x[:3], "median"), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(robust_mean(x, "trimmed", 0.25), torch.tensor([2.5, 0.5]))
    torch.testing.assert_close(robust_mean(x, "trimmed", 0.0), x.mean(0))
    with pytest.raises(ValueError, match="unknown robust rule"):
        robust_mean(x, "mode")


def test_clipping_bounds_every_norm_and_keeps_small_ones():
    ups = [client(i, 2, scale=s) for i, s in enumerate((0.01, 1.0, 50.0))]
    bound = 2 * update_norm(ups[0].modules)
    clipped, info = clip_updates(ups, clip_norm=bound)
    norms = [update_norm(u.modules) for u in clipped]
    assert max(norms) <= bound * (1 + 1e-6) and info["clipped"] == 2
    assert norms[0] == pytest.approx(update_norm(ups[0].modules))
    big = ups[2]
    for name in SHAPES:  # direction kept: a clipped client is its own update scaled down
        ratio = clipped[2].modules[name].delta() / big.modules[name].delta()
        assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-4)
    _, adaptive = clip_updates(ups, clip_norm=None)
    assert adaptive["clip_norm"] == pytest.approx(update_norm(ups[1].modules))


def test_product_consensus_is_exact_on_agreeing_clients_and_order_invariant():
    same = client(0, {"q": 3, "v": 2})
    f = same.modules["q"]
    # the same update written with different factorisations (B G, G^-1 A) and scales
    G = torch.randn(3, 3, generator=torch.Generator().manual_seed(5)) + 3 * torch.eye(3)
    other = LoraFactors(torch.linalg.solve(G, f.A), (f.B @ G) * 2.0, f.alpha / 2.0)
    for rule in ("median", "trimmed"):
        c = product_consensus([f, other, f], rule)
        torch.testing.assert_close(c.delta().double(), f.delta().double(), rtol=1e-5, atol=1e-5)
    ups = [client(i, {"q": r, "v": 2}).modules["q"] for i, r in enumerate((1, 2, 4, 3, 2))]
    a = product_consensus(ups, "median").delta()
    b = product_consensus(ups[::-1], "median").delta()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_product_median_ignores_a_hostile_minority():
    base = client(0, 4)
    honest = [
        LoraUpdate(
            {n: LoraFactors(f.A, f.B + 0.01 * i, f.alpha) for n, f in base.modules.items()}, 10, f"h{i}"
        )
        for i in range(4)
    ]
    hostile = [client(100 + i, 4, scale=1000.0) for i in range(3)]
    plain = make_aggregator("flexlora").aggregate(honest + hostile)
    robust = RobustAggregator(make_aggregator("flexlora"), "median", space="product").aggregate(
        honest + hostile
    )
    target = make_aggregator("flexlora").aggregate(honest)
    for name in SHAPES:
        err_plain = (dense(plain, name) - dense(target, name)).norm()
        err_robust = (dense(robust, name) - dense(target, name)).norm()
        assert err_robust < 0.05 * dense(target, name).norm() < err_plain


def test_factor_consensus_keeps_a_shared_A_and_uses_present_columns_only():
    A = {n: torch.randn(4, k) for n, (d, k) in SHAPES.items()}
    ups = [client(i, r, A=A) for i, r in enumerate((2, 4, 4, 2, 4))]
    c = factor_consensus([u.modules["q"] for u in ups], "median")
    torch.testing.assert_close(c.A, A["q"])
    cols = torch.stack(
        [u.modules["q"].scale * u.modules["q"].B[:, 2:4] for u in ups if u.modules["q"].rank == 4]
    )
    torch.testing.assert_close(c.B[:, 2:4], cols.median(0).values)


@pytest.mark.parametrize("method", sorted(AGGREGATORS))
@pytest.mark.parametrize("rule", ["clip", "trimmed", "median"])
def test_every_aggregator_takes_every_rule(method, rule):
    homogeneous = method in ("fedavg",)
    A = {n: torch.randn(4, k) / k**0.5 for n, (d, k) in SHAPES.items()}
    ranks = [4] * 5 if homogeneous else [2, 4, 3, 4, 2]
    ups = [client(i, r, A=A if method == "ffa" else None) for i, r in enumerate(ranks)]
    ups.append(client(99, 4, scale=1e4, A=A if method == "ffa" else None))  # one hostile client
    inner = make_aggregator(method)
    space = METHODS[method].space
    agg = RobustAggregator(inner, rule, clip_norm=5.0 if rule == "clip" else None, trim=0.4, space=space)
    state = agg.aggregate(ups)
    assert state.method == method and agg.name == method and repr(agg).startswith("RobustAggregator(")
    plain = inner.aggregate(ups)
    for name in SHAPES:
        assert torch.isfinite(state.modules[name].B).all()
        assert dense(state, name).norm() < 0.1 * dense(plain, name).norm()  # the hostile client is contained
    payload = agg.payload(state, {n: 2 if not homogeneous else 4 for n in SHAPES}, 16.0)
    assert set(payload) == set(SHAPES)


def test_constructor_refuses_bad_parameters():
    inner = make_aggregator("flexlora")
    bad = (
        dict(rule="mode"),
        dict(trim=0.5),
        dict(clip_norm=0.0),
        dict(clip_norm=float("nan")),
        dict(space="x"),
    )
    for kwargs in bad:
        with pytest.raises(ValueError):
            RobustAggregator(inner, **{"space": "product", **kwargs})


def test_tiny_federation_with_hostile_clients_robust_median_and_retries(tmp_path, monkeypatch):
    """End to end on the tiny model and the local engine: two clients send poisoned (NaN, huge) updates;
    the NaN one is refused, the finite one passes validation and the median contains it."""
    import flexlora.run as run_module
    from flexlora.run import run_federation
    from helpers.configs import tiny_config

    real_engine = run_module._engine

    class Poisoned:
        def __init__(self, inner):
            self.inner, self.name = inner, "poisoned"

        def train(self, jobs):
            out = self.inner.train(jobs)
            for i, o in enumerate(out[:2]):  # the first two clients of every round
                if hasattr(o, "update"):
                    u = o.update
                    scale = float("nan") if i == 0 else 1e4
                    out[i].update = LoraUpdate(
                        {
                            n: LoraFactors(f.A, f.B * scale, f.alpha, f.use_rslora)
                            for n, f in u.modules.items()
                        },
                        u.num_examples,
                        u.client_id,
                    )
            return out

        def bytes_moved(self):
            return self.inner.bytes_moved()

        def close(self):
            self.inner.close()

    monkeypatch.setattr(run_module, "_engine", lambda *a, **k: Poisoned(real_engine(*a, **k)))
    cfg = tiny_config(
        tmp_path,
        "federation.rounds=1",
        "federation.clients_per_round=4",
        "federation.min_clients=2",
        "security.robust=median",
        "security.round_retries=1",
        "eval.generate=false",
    )
    result = run_federation(cfg, progress=False)
    for m in result.metrics[1:]:
        assert m["received"] == 3 and m["rejected"] == {"B.values": 1}
        assert torch.isfinite(torch.tensor(m["eval"]["loss"]))
    spectrum = result.final["spectrum"]["top_singular_values"]
    assert max(max(v) for v in spectrum.values()) < 10  # the 1e4-scaled client did not take over
