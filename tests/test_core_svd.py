"""The three SVD routes agree: ``factored`` (QR + small core SVD) == ``dense`` (SVD of the formed ``dW``).

Checked directly on :func:`svd_lowrank_product` and through :class:`FlexLoRA` (its ``svd=`` and ``dtype=``),
on random shapes, client ranks, alphas and example counts. Relative errors are norm-wise: singular values
against ``S[0]``, rank-``r`` products against the reference product's Frobenius norm.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexlora.core.aggregators.base import GlobalState
from flexlora.core.aggregators.flexlora import FlexLoRA
from flexlora.core.lora import LoraFactors, LoraUpdate
from flexlora.core.svd import (
    FACTORED_MAX_FRACTION,
    choose_route,
    complete_rows,
    svd_lowrank_product,
)

TOL = {torch.float64: 1e-5, torch.float32: 1e-4}
#: rank-r truncations are compared only where they are unique: a relative gap ``(S[r-1] - S[r]) / S[0]``
#: above GAP (float32 subspace error ~ eps / gap), or ``S[r-1]`` already at noise level (nothing is cut).
GAP = 1e-2
NOISE = 1e-9

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref||_F / ||ref||_F`` in float64 (0 when both are zero)."""
    x, ref = x.double(), ref.double()
    scale = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff if scale == 0 else diff / scale


def amax(t: torch.Tensor) -> float:
    """Largest absolute entry (0 for an empty tensor)."""
    return t.double().abs().max().item() if t.numel() else 0.0


def truncation_is_unique(S: torch.Tensor, r: int) -> bool:
    S = S.double()
    if r >= len(S) or S[0] == 0:
        return True
    s0 = S[0].item()
    return (S[r - 1] - S[r]).item() > GAP * s0 or S[r - 1].item() < NOISE * s0


def rank_r(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int) -> torch.Tensor:
    return (U[:, :r].double() * S[:r].double()) @ Vh[:r].double()


@st.composite
def factored_problems(draw, max_dim: int = 40):
    """``(B (d, R), A (R, k))``, R from 1 to past ``min(d, k)`` (the factored route must stay exact there)."""
    d = draw(st.integers(1, max_dim))
    k = draw(st.integers(1, max_dim))
    R = draw(st.integers(1, max_dim + 8))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(d, R, generator=gen, dtype=torch.float64)
    A = torch.randn(R, k, generator=gen, dtype=torch.float64)
    return B, A


@st.composite
def federations(draw, max_dim: int = 40, max_clients: int = 4):
    """Random client updates on one module: ranks, alphas, rsLoRA and example counts all vary."""
    d = draw(st.integers(2, max_dim))
    k = draw(st.integers(2, max_dim))
    n = draw(st.integers(1, max_clients))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    updates = []
    for i in range(n):
        r = draw(st.integers(1, 12))
        alpha = draw(st.sampled_from([1.0, 8.0, 16.0, 32.0]))
        rslora = draw(st.booleans())
        f = LoraFactors(
            torch.randn(r, k, generator=gen, dtype=torch.float64),
            torch.randn(d, r, generator=gen, dtype=torch.float64),
            alpha,
            rslora,
        )
        updates.append(LoraUpdate({"m": f}, num_examples=draw(st.integers(1, 1000)), client_id=f"c{i}"))
    return updates


def dense_sum(updates: list[LoraUpdate], name: str = "m") -> torch.Tensor:
    """``sum_i p_i s_i B_i A_i`` formed densely in float64, independently of the aggregators' stacking."""
    total = sum(u.num_examples for u in updates)
    return sum((u.num_examples / total) * u.modules[name].delta().double() for u in updates)


# ---------------------------------------------------------------------------------------------------------
# svd_lowrank_product


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@SETTINGS
@given(problem=factored_problems())
def test_factored_matches_dense_route(problem, dtype):
    B, A = (t.to(dtype) for t in problem)
    dense = svd_lowrank_product(B, A, route="dense")
    fact = svd_lowrank_product(B, A, route="factored")
    q = min(B.shape[1], B.shape[0], A.shape[1])
    assert fact.U.shape == (B.shape[0], q) and fact.S.shape == (q,) and fact.Vh.shape == (q, A.shape[1])
    assert fact.S.dtype == dtype and fact.U.dtype == dtype and fact.Vh.dtype == dtype

    # singular values: the factored route holds exactly the first q of the dense ones (the rest are 0)
    s0 = dense.S[0].double().item()
    assert (fact.S[:q].double() - dense.S[:q].double()).abs().max().item() <= TOL[dtype] * s0
    assert amax(dense.S[q:]) <= TOL[dtype] * s0
    assert torch.all(fact.S[:-1] >= fact.S[1:])

    # the whole product, and every rank-r truncation that is unique
    ref = problem[0] @ problem[1]
    assert rel(rank_r(*fact, q), ref) < TOL[dtype]
    for r in range(1, q + 1):
        if truncation_is_unique(dense.S, r):
            assert rel(rank_r(*fact, r), rank_r(*dense, r)) < TOL[dtype], r


@SETTINGS
@given(problem=factored_problems(), max_rank=st.integers(0, 50))
def test_max_rank_keeps_the_leading_triplets(problem, max_rank):
    B, A = problem
    full = svd_lowrank_product(B, A, route="factored")
    cut = svd_lowrank_product(B, A, route="factored", max_rank=max_rank)
    assert len(cut.S) == min(len(full.S), max_rank)
    assert torch.equal(cut.S, full.S[:max_rank])
    assert torch.equal(cut.U, full.U[:, :max_rank]) and torch.equal(cut.Vh, full.Vh[:max_rank])


def test_factored_singular_vectors_are_orthonormal():
    gen = torch.Generator().manual_seed(0)
    B, A = torch.randn(300, 20, generator=gen), torch.randn(20, 200, generator=gen)
    U, _, Vh = svd_lowrank_product(B, A, route="factored")
    eye = torch.eye(20)
    assert torch.allclose(U.T @ U, eye, atol=1e-5) and torch.allclose(Vh @ Vh.T, eye, atol=1e-5)


def test_choose_route():
    assert choose_route(4096, 4096, 300) == "factored"
    assert choose_route(4096, 4096, int(FACTORED_MAX_FRACTION * 4096)) == "factored"
    assert choose_route(4096, 4096, int(FACTORED_MAX_FRACTION * 4096) + 1) == "dense"
    assert choose_route(192, 576, 200) == "dense"  # min(d, k) = 192 decides, not d * k
    assert choose_route(576, 192, 64) == "factored"
    assert choose_route(10, 10, 100, "factored") == "factored"
    assert choose_route(4096, 4096, 8, "dense") == "dense"
    with pytest.raises(ValueError, match="svd route must be one of"):
        choose_route(10, 10, 1, "randomized")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="svd route"):
        FlexLoRA(svd="qr")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# complete_rows


@SETTINGS
@given(k=st.integers(1, 30), q_frac=st.floats(0, 1), r_frac=st.floats(0, 1), seed=st.integers(0, 1000))
def test_complete_rows_adds_orthonormal_rows_orthogonal_to_the_rest(k, q_frac, r_frac, seed):
    q = int(q_frac * k)
    rank = q + int(r_frac * (k - q))
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(q, k, generator=gen, dtype=torch.float64)  # not orthonormal: only orthogonality is owed
    out = complete_rows(A, rank, seed=seed)
    assert out.shape == (rank, k)
    if rank <= q:
        assert torch.equal(out, A[:rank])
        return
    assert torch.equal(out[:q], A)
    extra = out[q:]
    assert torch.allclose(extra @ extra.T, torch.eye(rank - q, dtype=torch.float64), atol=1e-10)
    assert amax(A @ extra.T) <= 1e-10 * max(1.0, A.norm().item())
    assert torch.equal(out, complete_rows(A, rank, seed=seed))  # deterministic


def test_complete_rows_stays_orthogonal_when_the_fresh_draw_lies_in_the_row_space():
    """With ``A`` drawn from the same seed, the one fresh direction is exactly ``A``'s first row: projecting it
    off ``A``'s row space leaves rounding noise, and normalising noise gave rows far from orthogonal to ``A``
    (|A e| up to 4.3). The complement basis of a complete QR cannot degenerate so."""
    for seed in range(20):
        A = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        extra = complete_rows(A, 9, seed=seed)[8:]
        assert amax(A @ extra.T) <= 1e-12 * A.norm().item()
        assert torch.allclose(extra @ extra.T, torch.ones(1, 1, dtype=torch.float64), atol=1e-12)


def test_complete_rows_keeps_dtype_and_refuses_more_rows_than_k():
    A = torch.linalg.qr(torch.randn(6, 3))[0].T  # (3, 6) float32
    assert complete_rows(A, 6).dtype == torch.float32
    with pytest.raises(ValueError, match="rank exceeds k = 6"):
        complete_rows(A, 7)


# ---------------------------------------------------------------------------------------------------------
# the same through FlexLoRA, at both dtypes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@SETTINGS
@given(updates=federations())
def test_flexlora_routes_agree(updates, dtype):
    ref = dense_sum(updates)
    states = {
        route: FlexLoRA(svd=route, dtype=dtype).aggregate(updates).modules["m"]
        for route in ("dense", "factored", "auto")
    }
    for route, lr in states.items():
        assert lr.B.dtype == dtype and lr.A.dtype == dtype, route
        assert rel(lr.delta(), ref) < TOL[dtype], route
    S_ref = torch.linalg.svdvals(ref)
    d, k = ref.shape
    for route, lr in states.items():
        U, S, Vh = svd_lowrank_product(lr.B.double(), lr.A.double(), route="dense")
        q = min(len(S), len(S_ref))
        assert (S[:q] - S_ref[:q]).abs().max().item() <= TOL[dtype] * S_ref[0].item(), route
        for r in {u.modules["m"].rank for u in updates}:
            r = min(r, d, k)
            if truncation_is_unique(S_ref, r):
                # the payload of a rank-r client is the rank-r truncation, whichever route made the state
                f = FlexLoRA(svd=route, dtype=dtype).payload(
                    GlobalState({"m": lr}, "flexlora"), {"m": r}, alpha=16.0
                )["m"]
                assert rel(f.delta(), rank_r(*torch.linalg.svd(ref, full_matrices=False), r)) < TOL[dtype]
