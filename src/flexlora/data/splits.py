"""Seeded splits: a client's examples into train / eval / test, and clients into training and held-out.

Every random choice draws from ``seeded_rng(seed, *keys)``, a ``random.Random`` seeded with a string, so
results depend only on the seed and the keys (never on ``PYTHONHASHSEED`` or the order of calls).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from flexlora.data.base import ClientSource

__all__ = [
    "DEFAULT_FRACTIONS",
    "seeded_rng",
    "check_fractions",
    "split_counts",
    "split_items",
    "split_clients",
    "split_validation",
]

T = TypeVar("T")

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)  # train, eval, test, as in the FlexLoRA paper's NI split


def seeded_rng(seed: int, *keys: object) -> random.Random:
    """A generator determined by ``seed`` and ``keys`` alone (Python seeds strings through SHA-512)."""
    return random.Random(":".join(str(k) for k in (seed, *keys)))


def check_fractions(fractions: Sequence[float], name: str = "fractions") -> tuple[float, float, float]:
    """Validate train / eval / test fractions: three numbers >= 0 summing to 1, train > 0."""
    values = tuple(fractions)
    if len(values) != 3 or not all(isinstance(f, int | float) and not isinstance(f, bool) for f in values):
        raise ValueError(f"{name} must be three numbers (train, eval, test), got {fractions!r}")
    if min(values) < 0 or values[0] <= 0 or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise ValueError(f"{name} must be >= 0 with train > 0 and sum to 1, got {fractions!r}")
    return values[0], values[1], values[2]


def split_counts(n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> tuple[int, int, int]:
    """Sizes of the train / eval / test parts of ``n`` examples: eval and test are rounded half up, train
    takes the rest (so 10 -> 8/1/1, 64 -> 52/6/6, 4 -> 4/0/0)."""
    _, f_eval, f_test = check_fractions(fractions)
    n_eval = math.floor(n * f_eval + 0.5)
    n_test = min(math.floor(n * f_test + 0.5), n - n_eval)
    return n - n_eval - n_test, n_eval, n_test


def split_items(items: Sequence[T], fractions: Sequence[float] = DEFAULT_FRACTIONS) -> tuple[list[T], ...]:
    """Cut ``items`` (already in random order) into consecutive train / eval / test parts."""
    n_train, n_eval, _ = split_counts(len(items), fractions)
    return list(items[:n_train]), list(items[n_train : n_train + n_eval]), list(items[n_train + n_eval :])


def split_clients(
    source: ClientSource,
    num_heldout: int | float = 0,
    seed: int = 0,
    heldout_ids: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Choose the held-out (unseen) clients and the training clients, deterministically.

    Args:
        source: the clients to split.
        num_heldout: how many clients to hold out: an int count, or a float in (0, 1) for that share of
            the clients (rounded half up, at least one).
        seed: seeds the choice; the same seed and source give the same split.
        heldout_ids: hold out exactly these clients instead of drawing (then leave ``num_heldout`` at 0).

    Returns:
        ``(train_ids, heldout_ids)``, each in the source's client order.

    Raises:
        ValueError: a bad count or share, unknown ids, both ways given, or no client left to train on.
    """
    ids = source.client_ids()
    if heldout_ids is not None:
        if num_heldout:
            raise ValueError(f"give num_heldout or heldout_ids, not both (num_heldout={num_heldout!r})")
        known = set(ids)
        unknown = [c for c in heldout_ids if c not in known]
        if unknown:
            raise ValueError(f"heldout_ids names clients {source.name} does not have: {unknown[:5]}")
        chosen = set(heldout_ids)
    else:
        count = _heldout_count(num_heldout, len(ids))
        chosen = set(seeded_rng(seed, "heldout").sample(ids, count))
    if len(chosen) >= len(ids):
        raise ValueError(f"holding out {len(chosen)} of {len(ids)} clients leaves none to train on")
    return [c for c in ids if c not in chosen], [c for c in ids if c in chosen]


def _heldout_count(num_heldout: int | float, num_clients: int) -> int:
    if isinstance(num_heldout, bool) or not isinstance(num_heldout, int | float):
        raise ValueError(f"num_heldout must be an int count or a float share, got {num_heldout!r}")
    if isinstance(num_heldout, float):
        if not 0 < num_heldout < 1:
            raise ValueError(f"num_heldout as a share must be in (0, 1), got {num_heldout!r}")
        return max(1, math.floor(num_heldout * num_clients + 0.5))
    if not 0 <= num_heldout < num_clients:
        raise ValueError(
            f"num_heldout must be in [0, {num_clients}) to leave a client to train on, got {num_heldout}"
        )
    return num_heldout


def split_validation(
    train_ids: Sequence[str], num_validation: int, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Take ``num_validation`` validation clients out of the training pool (after the held-out test clients
    are chosen, so they are neither training nor test clients): for tuning hyperparameters without ever
    looking at the test clients. The same seed and pool give the same choice.

    Returns:
        ``(train_ids, validation_ids)``, each in the pool's order.

    Raises:
        ValueError: ``num_validation`` is negative, not an int, or leaves no client to train on.
    """
    if isinstance(num_validation, bool) or not isinstance(num_validation, int) or num_validation < 0:
        raise ValueError(f"num_validation must be an int >= 0, got {num_validation!r}")
    if num_validation >= len(train_ids):
        raise ValueError(
            f"num_validation {num_validation} leaves none of the {len(train_ids)} training clients to train on"
        )
    chosen = set(seeded_rng(seed, "validation").sample(list(train_ids), num_validation))
    return [c for c in train_ids if c not in chosen], [c for c in train_ids if c in chosen]
