"""A running sum of low-rank products, ``dW = sum_i B_i A_i``, whose memory does not grow with the number
of terms, so a server can fold client updates one at a time as they arrive.

The sum is held factored, ``[B_1 | ... | B_n] (d, R)`` and ``[A_1; ...; A_n] (R, k)``, while the inner
dimension ``R`` stays where :func:`flexlora.core.svd.choose_route` picks the factored SVD route (``R <=
min(d, k) / 2`` for ``auto``); the term that takes it beyond folds everything into the dense ``dW (d, k)``,
and every later term is added in place (one GEMM, no ``d x k`` temporary). Peak memory is therefore about
``max((d + k) min(d, k) / 2, d k)`` floats plus one term, for 2 or 2,000 terms. Route ``dense`` folds from the
first term; route ``factored`` never folds (its memory grows with ``R``; kept as the exact reference).
"""

from __future__ import annotations

import torch

from flexlora.core.svd import SVDResult, SVDRoute, choose_route, svd_lowrank_product, top_svd

__all__ = ["LowRankSum"]


class LowRankSum:
    """``dW = sum_i B_i A_i`` built one term at a time; :meth:`svd` returns its thin SVD.

    Args:
        route: ``auto``, ``dense`` or ``factored`` (see the module docstring and :mod:`flexlora.core.svd`).
    """

    def __init__(self, route: SVDRoute = "auto"):
        choose_route(1, 1, 0, route)  # validates the name
        self.route = route
        self.inner = 0
        self._Bs: list[torch.Tensor] = []
        self._As: list[torch.Tensor] = []
        self._dense: torch.Tensor | None = None

    @property
    def folded(self) -> bool:
        """Whether the sum is now held as the dense ``dW``."""
        return self._dense is not None

    def add(self, B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> None:
        """Add ``scale * B (d, r) @ A (r, k)`` (folded densely without a scaled copy of ``B``)."""
        self.inner += B.shape[1]
        if self._dense is not None:
            self._dense.addmm_(B, A, alpha=scale)
            return
        self._Bs.append(scale * B)
        self._As.append(A)
        if choose_route(B.shape[0], A.shape[1], self.inner, self.route) == "dense":
            self._dense = self._Bs.pop() @ self._As.pop()
            while self._Bs:  # each term freed as soon as it is folded
                self._dense.addmm_(self._Bs.pop(), self._As.pop())

    def svd(self, top: int | None = None) -> SVDResult:
        """Thin SVD of the sum, at most ``min(R, d, k)`` triplets (``top`` if given).

        Exact to rounding, except that a folded sum with ``top`` set returns the leading ``top`` triplets by
        randomized subspace iteration (:func:`flexlora.core.svd.top_svd`), its error bounded in the tests.
        """
        if not self.inner:
            raise ValueError("an empty sum has no SVD")
        keep = self.inner if top is None else min(top, self.inner)
        if self._dense is None:
            B, A = torch.cat(self._Bs, dim=1), torch.cat(self._As, dim=0)
            return svd_lowrank_product(B, A, route="factored", max_rank=keep)
        if top is not None:
            return top_svd(self._dense, min(keep, *self._dense.shape))
        U, S, Vh = torch.linalg.svd(self._dense, full_matrices=False)
        return SVDResult(U[:, :keep], S[:keep], Vh[:keep])
