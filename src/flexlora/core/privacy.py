"""Client-level differential privacy on the aggregate (DP-FedAvg with fixed clipping: McMahan et al.,
"Learning Differentially Private Recurrent Language Models", ICLR 2018), wrapped around an aggregator.

Each round, for the ``n`` valid updates of the ``m`` clients sampled (``m`` fixed by the config):

1. clip each client's contribution ``x_i`` to ``||x_i|| <= C``: ``x_i <- min(1, C / ||x_i||) x_i``;
2. average with the fixed denominator ``m`` and equal weights (example counts are private and unbounded):
   ``xbar = (1/m) sum_i x_i``, so adding or removing one client moves ``xbar`` by at most ``C / m``;
3. add ``N(0, sigma^2 C^2 / m^2)`` to every coordinate of ``xbar`` (``sigma``: ``noise_multiplier``), the
   same standard deviation as Flower's ``DifferentialPrivacyServerSideFixedClipping``.

Everything the server does afterwards (SVD, truncation, payloads) is post-processing. The contribution
``x_i`` lives where the wrapped aggregator works:

* ``flexlora``, ``flora``, ``florist``: the effective update ``x_i = {s_m B_m A_m}_m``; ``xbar`` is formed per module as
  the dense ``dW (d, k)``, noised densely (noise restricted to the clients' span would leak that span),
  then cut to its leading ``min(sum_i r_i, d, k)`` singular triplets (Eckart-Young) for the state.
* ``ffa``: ``A`` is frozen and public, so ``x_i = {s_m B_m}_m`` (zero-padded to the shared width) and the noise
  goes on the averaged ``B``; ``B A`` stays exactly linear in it.

Factor-averaging methods that train ``A`` (``fedavg``, ``hetlora``) have no such linear contribution: the
method registry (:attr:`flexlora.methods.Method.dp`) says which methods qualify and in which ``space``, and
config validation refuses the others (this wrapper takes the space it is given). The privacy spent after ``t`` rounds (releases) is reported by Flower's RDP accountant
(``flwr.supercore.privacy_accounting``, backed by Google's ``dp-accounting``) for the Gaussian mechanism of
noise multiplier ``sigma`` composed ``t`` times, with add-or-remove-one neighbours and, like Flower's
fixed-clipping wrapper, no credit for client subsampling (conservative).

The noise comes from a generator seeded by ``(seed, round, module)``, so runs are reproducible and a
resumed run replays the same noise; the guarantee then holds only against parties who do not know the
seed. With ``secure_noise`` the generator is seeded from the OS's entropy (a resumed run then differs from
an uninterrupted one in the rounds it replays).
"""

from __future__ import annotations

import math
import secrets
import zlib
from collections.abc import Mapping, Sequence

import torch

from flexlora.core.aggregators.base import Aggregator, GlobalState, pad_columns, validate_updates
from flexlora.core.lora import LoraFactors, LoraUpdate
from flexlora.core.validation import update_norm

__all__ = ["PrivateAggregator", "privacy_spent", "accountant_available"]

_ORDERS = (
    1.25,
    1.5,
    1.75,
    2.0,
    2.5,
    3.0,
    4.0,
    5.0,
    6.0,
    8.0,
    10.0,
    12.0,
    16.0,
    20.0,
    24.0,
    32.0,
    48.0,
    64.0,
    128.0,
    256.0,
)


def accountant_available() -> bool:
    """Whether Flower's RDP accountant can run (it needs ``dp-accounting``: ``pip install 'flwr[dp]'``)."""
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        return False
    return True


def privacy_spent(
    noise_multiplier: float, releases: int, population: int, sample_size: int, delta: float
) -> float:
    """``epsilon`` at ``delta`` after ``releases`` Gaussian releases of noise multiplier ``sigma`` (RDP accountant).

    Raises:
        ImportError: ``dp-accounting`` is not installed.
    """
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    config = PrivacyConfig(
        target_delta=delta,
        population_size=population,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    )
    accountant = RdpAccountant(config, orders=_ORDERS)
    if releases > 0:
        accountant.compose(GaussianPrivacyEvent(noise_multiplier, sample_size, population), count=releases)
    return accountant.get_epsilon(delta) if releases > 0 else 0.0


def _contribution_norm(u: LoraUpdate, space: str) -> float:
    if space == "product":
        return update_norm(u.modules)
    return math.sqrt(sum(float((f.scale * f.B.double()).pow(2).sum()) for f in u.modules.values()))


class PrivateAggregator(Aggregator):
    """Clipping, fixed-denominator averaging and Gaussian noise around ``inner`` (module docstring).

    Args:
        inner: a method whose update is linear in a clippable per-client contribution (``flexlora``, ``flora``,
            ``florist``, ``ffa``, ...: :attr:`flexlora.methods.Method.dp`).
        clip_norm: ``C``.
        noise_multiplier: ``sigma`` (noise std ``sigma C / m``).
        expected_clients: ``m``, the clients sampled per round.
        population: clients that may be sampled (for the accountant).
        delta: the ``delta`` epsilon is reported at.
        seed: noise seed (see the module docstring); ``secure_noise`` draws it from the OS instead.
        space: where the contribution lives: ``product`` (``s B A``) or ``factor`` (``s B`` over a frozen
            ``A``: ``ffa``); :attr:`flexlora.methods.Method.space`.

    Raises:
        ValueError: an unknown space or a non-positive parameter.

    Example:
        >>> agg = PrivateAggregator(FlexLoRA(), clip_norm=1.0, noise_multiplier=1.0,
        ...                         expected_clients=8, population=100, space="product")  # doctest: +SKIP
        >>> agg.start_round(1); state = agg.aggregate(updates)            # doctest: +SKIP
        >>> agg.privacy_spent(1)["epsilon"]                               # doctest: +SKIP
    """

    def __init__(
        self,
        inner: Aggregator,
        clip_norm: float,
        noise_multiplier: float,
        expected_clients: int,
        population: int,
        delta: float = 1e-5,
        seed: int = 0,
        secure_noise: bool = False,
        *,
        space: str,
    ):
        if space not in ("product", "factor"):
            raise ValueError(f"space must be 'product' or 'factor', got {space!r}")
        for key, value in (("clip_norm", clip_norm), ("noise_multiplier", noise_multiplier)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
        if not 1 <= expected_clients <= population:
            raise ValueError(
                f"expected_clients must lie in [1, population={population}], got {expected_clients}"
            )
        if not 0 < delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
        self.inner, self.clip_norm, self.noise_multiplier = inner, clip_norm, noise_multiplier
        self.expected_clients, self.population, self.delta = expected_clients, population, delta
        self.seed, self.secure_noise = seed, secure_noise
        self.name, self.space = inner.name, space
        self.round = 0

    @property
    def noise_std(self) -> float:
        """``sigma C / m``."""
        return self.noise_multiplier * self.clip_norm / self.expected_clients

    def hyperparameters(self) -> dict[str, object]:
        return {
            "inner": self.inner,
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "expected_clients": self.expected_clients,
            "population": self.population,
            "delta": self.delta,
            "secure_noise": self.secure_noise,
        }

    def start_round(self, round_: int) -> None:
        """Set the round whose aggregate comes next (it seeds the noise)."""
        self.round = round_

    def privacy_spent(self, releases: int) -> dict[str, float]:
        """``{epsilon, delta, noise_multiplier, releases}`` after ``releases`` private rounds."""
        eps = privacy_spent(
            self.noise_multiplier, releases, self.population, self.expected_clients, self.delta
        )
        return {
            "epsilon": eps,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "releases": releases,
        }

    def _generator(self, module: str) -> torch.Generator:
        seed = secrets.randbits(63) if self.secure_noise else self.seed * 1_000_003 + self.round * 7919
        return torch.Generator().manual_seed((seed + zlib.crc32(module.encode())) % 2**63)

    def aggregate(self, updates: Sequence[LoraUpdate], previous: GlobalState | None = None) -> GlobalState:
        validate_updates(updates)
        m, C, std = self.expected_clients, self.clip_norm, self.noise_std
        norms = [_contribution_norm(u, self.space) for u in updates]
        coef = [(1.0 if x <= C else C / x) / m for x in norms]  # clip factor / m, per client
        consensus = {}
        for name in updates[0].modules:
            factors = [u.modules[name] for u in updates]
            gen = self._generator(name)
            if self.space == "product":
                d, k = factors[0].shape
                dW = sum(
                    c * f.scale * (f.B.double() @ f.A.double()) for f, c in zip(factors, coef, strict=True)
                )
                dW = dW + std * torch.randn(d, k, generator=gen, dtype=torch.float64)  # (d, k)
                q = min(sum(f.rank for f in factors), d, k)
                U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
                A, B = Vh[:q].float(), (U[:, :q] * S[:q]).float()  # (q, k), (d, q)
            else:
                width = max(f.rank for f in factors)
                A = max(factors, key=lambda f: f.rank).A.float()  # the shared, frozen A (r_max, k)
                B = sum(
                    c * pad_columns(f.scale * f.B.double(), width) for f, c in zip(factors, coef, strict=True)
                )
                B = (B + std * torch.randn(B.shape, generator=gen, dtype=torch.float64)).float()  # (d, width)
            consensus[name] = LoraFactors(A.contiguous(), B.contiguous(), alpha=float(A.shape[0]))
        state = self.inner.aggregate([LoraUpdate(consensus, 1, "dp-aggregate")], previous=previous)
        state.info.update(
            {
                "clip_norm": C,
                "clipped": float(sum(x > C for x in norms)),
                "median_norm": float(sorted(norms)[len(norms) // 2]),
                "noise_std": std,
            }
        )
        return state

    def payload(
        self, state: GlobalState, ranks: Mapping[str, int], alpha: float, use_rslora: bool = False
    ) -> dict[str, LoraFactors]:
        return self.inner.payload(state, ranks, alpha, use_rslora)
