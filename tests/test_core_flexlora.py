"""FlexLoRA: a rank-r client's payload is the rank-r SVD truncation of ``dW = sum p_i s_i B_i A_i``.

Property tests (Eckart-Young, exactness at rank >= R, invariance to the scale of example counts) run in
float64 against a dense reference built directly from each client's ``s_i B_i A_i``; the hand-computed case
pins the numbers for 2 clients at ranks 2 and 4.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexlora.core.aggregators.flexlora import FlexLoRA
from flexlora.core.errors import AggregationError
from flexlora.core.lora import LoraFactors, LoraUpdate, lora_scale

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
F64 = torch.float64
GAP = 1e-3  # relative singular-value gap below which a rank-r truncation is not unique


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.double().norm().item()
    diff = (x.double() - ref.double()).norm().item()
    return diff if scale == 0 else diff / scale


def dense_sum(updates: list[LoraUpdate], name: str = "m") -> torch.Tensor:
    """``sum_i p_i s_i B_i A_i`` formed densely in float64 from each client's own ``delta()``."""
    total = sum(u.num_examples for u in updates)
    return sum((u.num_examples / total) * u.modules[name].delta().double() for u in updates)


def make_update(
    gen: torch.Generator,
    shapes: dict[str, tuple[int, int]],
    ranks: dict[str, int],
    alpha=16.0,
    rslora=False,
    n=1,
    cid="",
) -> LoraUpdate:
    modules = {
        name: LoraFactors(
            torch.randn(ranks[name], k, generator=gen, dtype=F64),
            torch.randn(d, ranks[name], generator=gen, dtype=F64),
            alpha,
            rslora,
        )
        for name, (d, k) in shapes.items()
    }
    return LoraUpdate(modules, num_examples=n, client_id=cid)


@st.composite
def federations(draw, max_dim: int = 32, max_clients: int = 4, max_rank: int = 10):
    d = draw(st.integers(2, max_dim))
    k = draw(st.integers(2, max_dim))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    updates = [
        make_update(
            gen,
            {"m": (d, k)},
            {"m": draw(st.integers(1, max_rank))},
            alpha=draw(st.sampled_from([1.0, 8.0, 16.0, 64.0])),
            rslora=draw(st.booleans()),
            n=draw(st.integers(1, 500)),
            cid=f"c{i}",
        )
        for i in range(draw(st.integers(1, max_clients)))
    ]
    return updates


# ---------------------------------------------------------------------------------------------------------
# Eckart-Young


@SETTINGS
@given(updates=federations(), data=st.data())
def test_payload_is_the_rank_r_truncation(updates, data):
    dW = dense_sum(updates)
    d, k = dW.shape
    r = data.draw(st.integers(1, min(d, k)), label="r")
    alpha = data.draw(st.sampled_from([4.0, 16.0, 48.0]), label="alpha")
    rslora = data.draw(st.booleans(), label="rslora")
    agg = FlexLoRA(svd=data.draw(st.sampled_from(["auto", "dense", "factored"]), label="svd"), dtype=F64)
    f = agg.payload(agg.aggregate(updates), {"m": r}, alpha, rslora)["m"]

    assert f.A.shape == (r, k) and f.B.shape == (d, r)
    assert f.alpha == alpha and f.use_rslora == rslora and f.scale == lora_scale(alpha, r, rslora)
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    # Eckart-Young: the error of the best rank-r approximation is the norm of the tail singular values
    tail = S[r:].norm().item()
    assert abs((dW - f.delta()).norm().item() - tail) <= 1e-9 * S[0].item()
    # ... and, where the truncation is unique, it is that truncation
    if r >= len(S) or S[r - 1] - S[r] > GAP * S[0] or S[r - 1] < 1e-12 * S[0]:
        assert rel(f.delta(), (U[:, :r] * S[:r]) @ Vh[:r]) < 1e-8
    # all singular values sit in B: A's rows are orthonormal
    assert torch.allclose(f.A @ f.A.T, torch.eye(r, dtype=F64), atol=1e-10)


@SETTINGS
@given(updates=federations(max_rank=5), data=st.data())
def test_rank_at_least_R_reproduces_dW(updates, data):
    dW = dense_sum(updates)
    R = sum(u.modules["m"].rank for u in updates)
    # ranks are clipped to min(d, k); where R is larger, min(d, k) >= rank(dW) is still enough
    r = data.draw(st.integers(min(R, min(dW.shape)), min(dW.shape)), label="r")
    state = FlexLoRA(dtype=F64).aggregate(updates)
    assert state.modules["m"].rank <= R
    assert rel(state.modules["m"].delta(), dW) < 1e-10
    f = FlexLoRA().payload(state, {"m": r}, alpha=16.0)["m"]
    assert rel(f.delta(), dW) < 1e-10


@SETTINGS
@given(updates=federations(), c=st.integers(2, 1000))
def test_scaling_all_example_counts_changes_nothing(updates, c):
    scaled = [LoraUpdate(u.modules, u.num_examples * c, u.client_id) for u in updates]
    agg = FlexLoRA(dtype=F64)
    a, b = agg.aggregate(updates).modules["m"], agg.aggregate(scaled).modules["m"]
    assert rel(b.delta(), a.delta()) < 1e-12
    assert torch.allclose(b.B, a.B, atol=1e-12 * a.B.abs().max().item())


# ---------------------------------------------------------------------------------------------------------
# ranks, alphas and rsLoRA


def test_per_module_ranks_are_honoured():
    gen = torch.Generator().manual_seed(1)
    shapes = {"layers.0.q_proj": (24, 20), "layers.0.v_proj": (8, 20), "layers.0.up_proj": (30, 20)}
    updates = [make_update(gen, shapes, {n: r for n in shapes}, n=5, cid=f"c{r}") for r in (2, 6)]
    agg = FlexLoRA(dtype=F64)
    state = agg.aggregate(updates)
    ranks = {"layers.0.q_proj": 3, "layers.0.v_proj": 8, "layers.0.up_proj": 1}
    payload = agg.payload(state, ranks, alpha=16.0)
    for name, r in ranks.items():
        d, k = shapes[name]
        f = payload[name]
        assert f.rank == r and f.A.shape == (r, k) and f.B.shape == (d, r)
        S = torch.linalg.svdvals(dense_sum(updates, name))
        assert math.isclose(
            (dense_sum(updates, name) - f.delta()).norm().item(), S[r:].norm().item(), abs_tol=1e-9
        )


@pytest.mark.parametrize("rslora", [False, True])
def test_per_client_alphas_and_rslora_are_honoured(rslora):
    gen = torch.Generator().manual_seed(2)
    shapes = {"m": (12, 10)}
    a = make_update(gen, shapes, {"m": 2}, alpha=8.0, rslora=rslora, n=1, cid="a")
    b = make_update(gen, shapes, {"m": 4}, alpha=64.0, rslora=not rslora, n=3, cid="b")
    fa, fb = a.modules["m"], b.modules["m"]
    sa = 8.0 / (math.sqrt(2) if rslora else 2)
    sb = 64.0 / (4 if rslora else math.sqrt(4))
    expected = 0.25 * sa * fa.B @ fa.A + 0.75 * sb * fb.B @ fb.A
    state = FlexLoRA(dtype=F64).aggregate([a, b])
    assert rel(state.modules["m"].delta(), expected) < 1e-12
    # the receiving client's own alpha and rsLoRA decide how B is scaled, not the senders'
    for alpha, rs in [(16.0, False), (16.0, True), (2.0, False)]:
        f = FlexLoRA().payload(state, {"m": 6}, alpha, rs)["m"]
        assert f.scale == (alpha / math.sqrt(6) if rs else alpha / 6)
        assert rel(f.delta(), expected) < 1e-12  # rank 6 = R: exact
        assert rel(f.B * f.scale, state.modules["m"].B) < 1e-12


def test_payload_above_the_state_rank_adds_orthonormal_rows_with_zero_B():
    gen = torch.Generator().manual_seed(3)
    updates = [make_update(gen, {"m": (20, 16)}, {"m": r}, n=n) for r, n in ((1, 2), (2, 5))]
    agg = FlexLoRA(dtype=F64)
    state = agg.aggregate(updates)
    q = state.modules["m"].rank
    assert q == 3
    f = agg.payload(state, {"m": 9}, alpha=16.0)["m"]
    assert f.A.shape == (9, 16) and f.B.shape == (20, 9)
    assert torch.equal(f.A[:q], state.modules["m"].A)
    assert torch.allclose(f.A @ f.A.T, torch.eye(9, dtype=F64), atol=1e-10)  # new rows orthogonal to the rest
    assert torch.count_nonzero(f.B[:, q:]) == 0
    assert rel(f.delta(), dense_sum(updates)) < 1e-12
    # the same rows every time: paired clients start alike
    assert torch.equal(agg.payload(state, {"m": 9}, alpha=16.0)["m"].A, f.A)


def test_payload_refuses_a_rank_above_min_d_k():
    gen = torch.Generator().manual_seed(4)
    state = FlexLoRA().aggregate([make_update(gen, {"v_proj": (6, 10)}, {"v_proj": 2})])
    with pytest.raises(AggregationError, match=r"'v_proj'.*rank 7"):
        FlexLoRA().payload(state, {"v_proj": 7}, alpha=16.0)


def test_dtype_is_the_arithmetic_dtype():
    gen = torch.Generator().manual_seed(5)
    u = make_update(gen, {"m": (10, 8)}, {"m": 3})
    half = LoraUpdate({"m": LoraFactors(u.modules["m"].A.bfloat16(), u.modules["m"].B.bfloat16(), 16.0)})
    for dtype in (torch.float32, torch.float64):
        lr = FlexLoRA(dtype=dtype).aggregate([half]).modules["m"]
        assert lr.B.dtype == dtype and lr.A.dtype == dtype
    assert FlexLoRA(dtype=F64).hyperparameters() == {"svd": "auto", "dtype": "float64"}


def test_singular_values_of_the_state():
    gen = torch.Generator().manual_seed(6)
    updates = [make_update(gen, {"m": (30, 25)}, {"m": r}, n=r) for r in (2, 3, 5)]
    state = FlexLoRA(dtype=F64).aggregate(updates)
    S = torch.linalg.svdvals(dense_sum(updates))
    assert torch.allclose(state.singular_values("m"), S[:10], atol=1e-10)
    assert torch.allclose(state.singular_values("m", top=4), S[:4], atol=1e-10)
    # read off B's column norms in SVD form; the same factors without the flag take an SVD: same values
    assert state.svd_form
    plain = dataclasses.replace(state, svd_form=False)
    assert torch.allclose(plain.singular_values("m"), state.singular_values("m"), atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# a hand-computed case: 2 clients at ranks 2 and 4 against a dense sum worked out on paper


def test_hand_computed_two_clients_ranks_2_and_4():
    # client a: rank 2, alpha 2 (s = 1), 1 example: B_a A_a puts ones at (0, 0) and (1, 1)
    B_a = torch.tensor([[1.0, 0], [0, 1], [0, 0], [0, 0]], dtype=F64)
    A_a = torch.tensor([[1.0, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=F64)
    # client b: rank 4, alpha 8 (s = 2), 3 examples: B_b = I, A_b is an anti-diagonal selection
    B_b = torch.eye(4, dtype=F64)
    A_b = torch.tensor([[0.0, 0, 0, 0, 1], [0, 0, 0, 1, 0], [0, 0, 1, 0, 0], [0, 1, 0, 0, 0]], dtype=F64)
    a = LoraUpdate({"m": LoraFactors(A_a, B_a, alpha=2.0)}, num_examples=1, client_id="a")
    b = LoraUpdate({"m": LoraFactors(A_b, B_b, alpha=8.0)}, num_examples=3, client_id="b")

    # p = (1/4, 3/4); dW = 1/4 * 1 * B_a A_a + 3/4 * 2 * B_b A_b
    dW = torch.tensor(
        [
            [0.25, 0.0, 0.0, 0.0, 1.5],
            [0.0, 0.25, 0.0, 1.5, 0.0],
            [0.0, 0.0, 1.5, 0.0, 0.0],
            [0.0, 1.5, 0.0, 0.0, 0.0],
        ],
        dtype=F64,
    )
    # blocks: rows {1, 3} x cols {1, 3} = [[1/4, 3/2], [3/2, 0]] -> |eigenvalues| (sqrt(9.0625) +- 1/4) / 2;
    # row 0 x cols {0, 4} -> sqrt(1/16 + 9/4); row 2 x col 2 -> 3/2
    root = math.sqrt(9.0625)
    S = [(root + 0.25) / 2, math.sqrt(2.3125), 1.5, (root - 0.25) / 2]  # 1.630, 1.521, 1.5, 1.380

    for svd in ("dense", "factored", "auto"):
        agg = FlexLoRA(svd=svd, dtype=F64)
        state = agg.aggregate([a, b])
        assert torch.allclose(state.modules["m"].delta(), dW, atol=1e-12), svd
        assert torch.allclose(state.singular_values("m"), torch.tensor(S, dtype=F64), atol=1e-12), svd

        pa = agg.payload(state, {"m": 2}, alpha=2.0)["m"]  # client a at rank 2, s = 1
        # best rank 2: the leading eigenpair of the symmetric 2 x 2 block (sigma 1.630, eigenvector
        # v = (3/2, lambda - 1/4)) + row 0 whole (1.521); row 2 (1.5) and the block's other pair (1.380) go
        lam = S[0]
        v = torch.tensor([1.5, lam - 0.25], dtype=F64)
        best2 = torch.zeros(4, 5, dtype=F64)
        best2[0, 0], best2[0, 4] = 0.25, 1.5
        best2[[[1], [3]], [1, 3]] = lam * torch.outer(v, v) / (v @ v)
        assert torch.allclose(pa.delta(), best2, atol=1e-12), svd
        assert math.isclose((dW - pa.delta()).norm().item(), math.hypot(S[2], S[3]), rel_tol=1e-12)
        # with B = U S / s: B's column norms are the singular values (s = 1 here)
        assert torch.allclose(pa.B.norm(dim=0), torch.tensor(S[:2], dtype=F64), atol=1e-12)

        pb = agg.payload(state, {"m": 4}, alpha=8.0)["m"]  # client b at rank 4 = rank(dW): exact
        assert torch.allclose(pb.delta(), dW, atol=1e-12), svd
        assert torch.allclose(2.0 * pb.B.norm(dim=0), torch.tensor(S, dtype=F64), atol=1e-12)
