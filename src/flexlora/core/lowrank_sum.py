"""A running sum of low-rank products, ``dW = sum_i B_i A_i``, whose memory does not grow with the number
of terms, so a server can fold client updates one at a time as they arrive.

The sum is held factored, ``[B_1 | ... | B_n] (d, R)`` and ``[A_1; ...; A_n] (R, k)``, while the inner
dimension ``R`` stays where :func:`flexlora.core.svd.choose_route` picks the factored SVD route (``R <=
min(d, k) / 2`` for ``auto``); the term that takes it beyond folds everything into the dense ``dW (d, k)``,
and every later term is added in place (one GEMM, no ``d x k`` temporary). Peak memory is therefore about
``max((d + k) min(d, k) / 2, d k)`` floats plus one term, for 2 or 2,000 terms. Route ``dense`` folds from the
first term; route ``factored`` never folds (its memory grows with ``R``; kept as the exact reference). The SVD
of a folded sum frees ``dW`` as it goes (:meth:`LowRankSum._svd_folded`), so it needs about ``d k + 8 m^2``
floats (``m = min(d, k)``) where one side is at least twice the other, against ``3 d k + 5 m^2`` for
``torch.linalg.svd`` next to a live ``dW``.
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
        self._spent = False

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
        """Thin SVD of the sum, at most ``min(R, d, k)`` triplets (``top`` if given). Consumes the sum: its
        storage is freed as the SVD proceeds, and a second call raises.

        Exact to rounding, except that a folded sum with ``top`` set returns the leading ``top`` triplets by
        randomized subspace iteration (:func:`flexlora.core.svd.top_svd`), its error bounded in the tests.
        """
        if self._spent or not self.inner:
            raise ValueError("an empty or already decomposed sum has no SVD")
        self._spent = True
        keep = self.inner if top is None else min(top, self.inner)
        if self._dense is None:
            B, A = torch.cat(self._Bs, dim=1), torch.cat(self._As, dim=0)
            return svd_lowrank_product(B, A, route="factored", max_rank=keep)
        if top is not None:
            M, self._dense = self._dense, None
            return top_svd(M, min(keep, *M.shape))
        U, S, Vh = self._svd_folded()
        return SVDResult(U[:, :keep], S[:keep], Vh[:keep])

    def _svd_folded(self) -> SVDResult:
        """Thin SVD of the dense sum ``dW (d, k)``, which it frees as soon as it can.

        Where one side is at least twice the other, the long side is reduced by a QR first: for ``k >= 2 d``,
        ``dW^T = Q R`` (``Q (k, d)`` orthonormal, ``R (d, d)``) and ``R^T = U S Vr^T`` give
        ``dW = U S (Q Vr)^T``; for ``d >= 2 k`` the same on ``dW`` itself. LAPACK's ``gesdd`` takes this path
        internally, but on a copy of ``dW`` made while ``dW`` is alive, next to a workspace of about
        ``4 min(d, k)^2`` floats; here ``dW`` is freed once ``Q`` exists, so the peak falls from about
        ``3 d k + 5 m^2`` floats to ``d k + 8 m^2`` (``m = min(d, k)``). Near square, ``torch.linalg.svd``.
        """
        M, self._dense = self._dense, None
        d, k = M.shape
        if max(d, k) < 2 * min(d, k):
            return SVDResult(*torch.linalg.svd(M, full_matrices=False))
        wide = k > d
        Q, R = torch.linalg.qr(M.T if wide else M)  # (max(d, k), m), (m, m)
        del M
        Ur, S, Vhr = torch.linalg.svd(R.T if wide else R, full_matrices=False)  # (m, m), (m,), (m, m)
        del R
        if wide:
            return SVDResult(Ur, S, Vhr @ Q.T)  # (d, d), (d,), (d, k)
        return SVDResult(Q @ Ur, S, Vhr)  # (d, k), (k,), (k, k)
