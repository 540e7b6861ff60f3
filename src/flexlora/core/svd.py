"""SVD of a factored update ``dW = B @ A`` by three routes with the same result.

* ``dense``: form ``dW (d x k)`` and call ``torch.linalg.svd``. Cost ``O(d k min(d, k))``, memory ``d k``.
  What the paper's code does; kept as the reference.
* ``factored``: never forms ``dW``. Thin QR ``B = Qb Rb`` and ``A^T = Qa Ra``, then the SVD of the small
  core ``Rb Ra^T = U' S V'^T`` gives ``dW = (Qb U') S (Qa V')^T`` exactly. Cost ``O((d + k) R^2 + R^3)``,
  memory ``O((d + k) R)``, ``R`` = inner dimension (sum of client ranks).
* ``auto``: ``factored`` while ``R <= min(d, k) / 2``; otherwise ``dense``. Both are exact to floating-point
  rounding (no randomised solver), so ``auto`` never trades accuracy for speed. The crossover is not at
  ``R = min(d, k)``: the core SVD runs in float64 and costs about as much per row as the dense float32 SVD
  twice over, so on 2 CPU cores at 4096 x 4096 the factored route is 2.3x faster at ``R = 2048``, about
  even at ``R = 2600`` and 2-3x slower at ``R = 3000`` (see ``docs/benchmarks.md``).

The small core SVD runs in float64: it costs ``O(R^3)`` and removes the one place where float32 rounding
of a squared-conditioned product could show up.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

__all__ = ["SVDRoute", "SVDResult", "choose_route", "svd_lowrank_product", "top_svd", "complete_rows"]

SVDRoute = Literal["auto", "dense", "factored"]
SVD_ROUTES: tuple[str, ...] = ("auto", "dense", "factored")
#: ``auto`` takes the factored route while ``inner <= FACTORED_MAX_FRACTION * min(d, k)``.
FACTORED_MAX_FRACTION = 0.5


class SVDResult(NamedTuple):
    """``dW ~= U diag(S) Vh``; ``U (d, q)``, ``S (q,)`` descending, ``Vh (q, k)``."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def choose_route(d: int, k: int, inner: int, route: SVDRoute = "auto") -> str:
    """Resolve ``auto``: the factored route pays only while the inner dimension is at most half of ``min(d, k)``."""
    if route not in SVD_ROUTES:
        raise ValueError(f"svd route must be one of {SVD_ROUTES}, got {route!r}")
    if route != "auto":
        return route
    return "factored" if inner <= FACTORED_MAX_FRACTION * min(d, k) else "dense"


def svd_lowrank_product(
    B: torch.Tensor, A: torch.Tensor, route: SVDRoute = "auto", max_rank: int | None = None
) -> SVDResult:
    """Thin SVD of ``B @ A`` (``B (d, R)``, ``A (R, k)``), keeping at most ``max_rank`` leading triplets.

    Returns ``q = min(R, d, k, max_rank)`` triplets for the factored route and ``min(d, k, max_rank)`` for the
    dense one; triplets beyond ``rank(B @ A)`` carry zero singular values either way.
    """
    d, k = B.shape[0], A.shape[1]
    chosen = choose_route(d, k, B.shape[1], route)
    if chosen == "dense":
        U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)  # (d, m), (m,), (m, k)
    else:
        Qb, Rb = torch.linalg.qr(B)  # (d, m1), (m1, R)
        Qa, Ra = torch.linalg.qr(A.T)  # (k, m2), (m2, R)
        core = Rb.double() @ Ra.double().T  # (m1, m2), small
        Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)
        U = Qb @ Uc.to(B.dtype)  # (d, q)
        Vh = Vhc.to(A.dtype) @ Qa.T  # (q, k)
        S = S.to(B.dtype)
    if max_rank is not None:
        U, S, Vh = U[:, :max_rank], S[:max_rank], Vh[:max_rank]
    return SVDResult(U, S, Vh)


def top_svd(M: torch.Tensor, rank: int, niter: int = 4, seed: int = 0) -> SVDResult:
    """The leading ``rank`` singular triplets of ``M (d, k)`` by randomized subspace iteration (Halko,
    Martinsson and Tropp 2011; ``torch.svd_lowrank``), for when only they are needed.

    A Gaussian sketch of ``q = rank + max(10, rank / 10)`` columns goes through ``niter`` power iterations, so
    the cost is ``O(d k q (2 niter + 2))`` instead of the full SVD's ``O(d k min(d, k))``. Not exact: the
    Frobenius error of the rank-``r`` truncation exceeds the optimal one (Eckart-Young) by a factor that
    falls geometrically with ``niter`` and the spectral gap; ``tests/test_core_svd.py`` bounds it and
    ``docs/benchmarks.md`` measures it. Falls back to the exact SVD where ``q`` reaches ``min(d, k) / 2``.
    The sketch is seeded (``seed``) without touching torch's global random state.
    """
    d, k = M.shape
    q = min(rank + max(10, rank // 10), d, k)
    if 2 * q >= min(d, k):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return SVDResult(U[:, :rank], S[:rank], Vh[:rank])
    devices = [M.device] if M.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(M, q=q, niter=niter)
    return SVDResult(U[:, :rank], S[:rank], V[:, :rank].T)


def complete_rows(A: torch.Tensor, rank: int, seed: int = 0) -> torch.Tensor:
    """Extend ``A (q, k)`` to ``rank`` rows by appending orthonormal rows orthogonal to its row space.

    Used when a client's rank exceeds the rank of the global update: its extra ``A`` rows get fresh
    directions (with zero ``B`` columns) so they still receive gradients, unlike zero rows, which would
    leave both factors of those directions stuck at zero. Deterministic given ``seed``.

    Raises:
        ValueError: ``rank > k``: there are no ``rank`` orthonormal rows in ``k`` dimensions (clip ranks to
            ``min(d, k)`` first, see :func:`flexlora.core.ranks.module_ranks`).
    """
    q, k = A.shape
    if rank <= q:
        return A[:rank]
    if rank > k:
        raise ValueError(f"cannot complete A {(q, k)} to {rank} orthonormal rows: rank exceeds k = {k}")
    gen = torch.Generator().manual_seed(seed)
    extra = torch.randn(k, rank - q, generator=gen, dtype=torch.float64).to(A.device)  # (k, rank - q)
    if q:
        # the last k - q columns of A^T's complete QR span the complement of A's row space: random
        # combinations of them are orthogonal to A however close the draw lies to A's rows
        full, _ = torch.linalg.qr(A.double().T, mode="complete")  # (k, k) orthogonal
        complement = full[:, q:]  # (k, k - q)
        extra = complement @ (complement.T @ extra)
    Q, _ = torch.linalg.qr(extra)  # (k, rank - q)
    return torch.cat([A, Q.T.to(A.dtype)], dim=0)
