"""Paired statistics of a comparison: seed-level tests (the primary evidence) and a client-level check.

A seed fixes everything a run draws (held-out split, sampled clients, batches, initial ``A``), so two
methods run at the same seed form one paired replicate; the ``n`` seed-level differences ``d_s`` (each the
mean over held-out clients of one seed) are independent draws of the training randomness. On them:

* **mean and t-based 95% CI**: ``mean(d) +- t_{0.975, n-1} SD(d) / sqrt(n)`` (``scipy.stats.t``).
* **paired t-test** of ``mean(d) = 0`` (``scipy.stats.ttest_1samp`` on the differences, two-sided).
* **exact sign-flip test**: under the null each ``d_s`` is as likely to have either sign; ``p`` is the share
  of all ``2^n`` sign patterns whose ``|mean|`` reaches the observed one. No distributional assumption, but
  its smallest possible value is ``2 / 2^n`` (0.25 at 3 seeds, 0.0625 at 5).
* **Holm correction** (``statsmodels.stats.multitest.multipletests(method="holm")``) over the p-values of
  one table, so that a table's family-wise error rate stays at the nominal level.

The per-(seed, client) sign-flip test treats every held-out client of every seed as an independent unit.
Clients evaluated on the same two trained models share that training's noise, so it overstates: it is a
secondary column only. With more than ``EXACT_MAX`` units it is Monte Carlo, and a p-value that hits no
draw is reported as ``< 1/(draws + 1)``, never as a smaller round number.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "EXACT_MAX",
    "RESAMPLES",
    "SeedTest",
    "SignFlip",
    "holm",
    "mean_sd",
    "seed_test",
    "sign_flip_test",
    "t_interval",
]

EXACT_MAX = 16
RESAMPLES = 20_000


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample SD (``n - 1``); the SD of one value is undefined (``nan``: an empty CSV field, not a
    spread of 0), and both are ``nan`` for none."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan)


@dataclass(frozen=True)
class SignFlip:
    """A sign-flip p-value and how it was obtained.

    ``draws`` is 0 for exact enumeration; for Monte Carlo, ``hits`` draws reached the observed ``|mean|``
    and ``p = (1 + hits) / (1 + draws)``, so ``hits == 0`` means only ``p <= 1 / (1 + draws)``.
    """

    p: float
    n: int
    draws: int = 0
    hits: int = 0

    @property
    def exact(self) -> bool:
        return self.draws == 0

    @property
    def at_floor(self) -> bool:
        """Monte Carlo with no draw reaching the observed statistic: ``p`` is a bound, not an estimate."""
        return not self.exact and self.hits == 0


def sign_flip_test(diffs: Sequence[float], resamples: int = RESAMPLES, seed: int = 0) -> SignFlip:
    """Two-sided paired sign-flip test of ``mean(diffs) = 0``.

    ``p = P(|mean(e * d)| >= |mean(d)|)`` over independent random signs ``e_i = +-1``: exact (all ``2^n``
    patterns) for ``n <= EXACT_MAX``, else Monte Carlo with ``resamples`` seeded patterns and the ``+1``
    correction ``(1 + hits) / (1 + resamples)``. ``p`` is ``nan`` for no differences, 1 when all are 0.
    """
    import numpy as np

    n = len(diffs)
    if n == 0:
        return SignFlip(math.nan, 0)
    d = np.asarray(diffs, dtype=np.float64)
    observed = abs(d.mean()) - 1e-12 * (1 + np.abs(d).max())  # tolerance for ties
    if n <= EXACT_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))  # (2^n, n)
        return SignFlip(float((np.abs(signs @ d) / n >= observed).mean()), n)
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, 5000):
        signs = rng.choice((-1.0, 1.0), size=(min(5000, resamples - start), n))  # (b, n)
        hits += int((np.abs(signs @ d) / n >= observed).sum())
    return SignFlip((1 + hits) / (1 + resamples), n, resamples, hits)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean, ``mean +- t_{(1+level)/2, n-1} SD / sqrt(n)``; ``nan``
    bounds for fewer than 2 values."""
    from scipy import stats

    n = len(values)
    m, sd = mean_sd(values)
    if n < 2:
        return math.nan, math.nan
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return m - half, m + half


@dataclass(frozen=True)
class SeedTest:
    """Seed-level evidence for one paired comparison: ``diffs`` are the per-seed differences (oriented by
    the caller), ``ci`` their t-based 95% CI, ``p_t`` the paired t-test, ``p_sign`` the exact sign-flip
    test over seeds (``nan`` below 2 seeds)."""

    diffs: tuple[float, ...]
    mean: float
    ci: tuple[float, float]
    p_t: float
    p_sign: float


def seed_test(diffs: Sequence[float]) -> SeedTest:
    """The seed-level summary of :class:`SeedTest` for per-seed paired differences ``diffs``.

    The t-test is ``nan`` below 2 seeds; with all differences equal and nonzero it is 0 (no spread), with
    all 0 it is 1.
    """
    from scipy import stats

    d = tuple(float(x) for x in diffs)
    mean = mean_sd(d)[0]
    if len(d) < 2:
        p_t, p_sign = math.nan, math.nan
    elif max(d) == min(d):
        p_t, p_sign = (1.0 if d[0] == 0 else 0.0), sign_flip_test(d).p
    else:
        p_t, p_sign = float(stats.ttest_1samp(d, 0.0).pvalue), sign_flip_test(d).p
    return SeedTest(d, mean, t_interval(d), p_t, p_sign)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values of one family (``statsmodels``' ``multipletests(method="holm")``); ``nan``
    entries are left out of the family and stay ``nan``."""
    from statsmodels.stats.multitest import multipletests

    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    out = [math.nan] * len(pvalues)
    if idx:
        adjusted = multipletests([pvalues[i] for i in idx], method="holm")[1]
        for i, p in zip(idx, adjusted, strict=True):
            out[i] = float(p)
    return out
