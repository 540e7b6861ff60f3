"""Client resources: the paper's rank types and the distributions that assign them to clients.

Rank types (Bai et al., 2024, Sec. 5): ``r8``, ``r30``, ``attn30-mlp200`` (q, k, v, o at 30; gate, up, down at
200) and ``r200``. Every rank is clipped to ``min(d, k)`` of its module (SmolLM2's 192 x 576 ``v_proj``
takes rank 192 where 200 is asked).

Distributions give the share of clients of each type, in the order above:

==================  =====  =====  ==============  =====
distribution        r8     r30    attn30-mlp200   r200
==================  =====  =====  ==============  =====
homo                100%   0      0               0
uniform             25%    25%    25%             25%
heavy-tail-light    80%    5%     5%              10%
heavy-tail-strong   5%     5%     10%             80%
normal              5.75%  5.75%  44.25%          44.25%
==================  =====  =====  ==============  =====

``normal`` follows the paper's released code (alibaba/FederatedScope, branch ``FlexLoRA``, ``main.py`` and
``heterolora.py``, function ``get_peft``): it draws a type id ``k`` with probability proportional to the
normal pdf at ``k`` (mean 1.5, SD 0.7), over its own type list ``config_types`` in ``main()``:
``Type_0`` r8, ``Type_1`` r200, ``Type_2`` attn30-mlp200, ``Type_3`` r30. The ids it passes,
``positions = [0, 3, 2, 1]``, are only listed in another order; each id keeps its own pdf, so ids 1 and 2
(r200 and attn30-mlp200) take 44.25% each and ids 0 and 3 (r8 and r30) 5.75%. Its ``heavy_tail`` and
``heavy_tail_strong`` use the same type list and give the shares in the table. (Before this version
``normal`` put the Gaussian over the order of this table, making r30 and attn30-mlp200 dominant; no
recorded run used it.) The paper's code draws each client's type at random; here
assignment uses exact quotas (largest remainder) then a seeded shuffle, so a federation of 20 clients
under ``heavy-tail-strong`` has exactly 16 clients at r200.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "RankType",
    "RANK_TYPES",
    "DISTRIBUTIONS",
    "ATTENTION_MODULES",
    "MLP_MODULES",
    "parse_rank_type",
    "assign_rank_types",
    "module_ranks",
]

ATTENTION_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
MLP_MODULES = frozenset({"gate_proj", "up_proj", "down_proj"})


@dataclass(frozen=True)
class RankType:
    """A client's resources: LoRA rank on attention projections and on MLP projections.

    Modules that are neither (by the last component of their name) take the attention rank.
    """

    name: str
    attn: int
    mlp: int

    def rank_for(self, module: str) -> int:
        return self.mlp if module.rsplit(".", 1)[-1] in MLP_MODULES else self.attn

    @property
    def max_rank(self) -> int:
        return max(self.attn, self.mlp)


RANK_TYPES: dict[str, RankType] = {
    t.name: t
    for t in (
        RankType("r8", 8, 8),
        RankType("r30", 30, 30),
        RankType("attn30-mlp200", 30, 200),
        RankType("r200", 200, 200),
    )
}

#: the paper code's type ids of this module's types (r8, r30, attn30-mlp200, r200), see the module doc
PAPER_TYPE_IDS = (0, 3, 2, 1)
_NORMAL = [math.exp(-0.5 * ((k - 1.5) / 0.7) ** 2) for k in PAPER_TYPE_IDS]  # normal pdf up to a constant
DISTRIBUTIONS: dict[str, tuple[float, float, float, float]] = {
    "homo": (1.0, 0.0, 0.0, 0.0),
    "uniform": (0.25, 0.25, 0.25, 0.25),
    "heavy-tail-light": (0.80, 0.05, 0.05, 0.10),
    "heavy-tail-strong": (0.05, 0.05, 0.10, 0.80),
    "normal": tuple(w / sum(_NORMAL) for w in _NORMAL),
}


def parse_rank_type(spec: str | int) -> RankType:
    """A named type (``r30``, ``attn30-mlp200``), a plain rank (``16`` or ``"16"``) or ``attnA-mlpM``."""
    if isinstance(spec, int) or str(spec).isdigit():
        r = int(spec)
        if r <= 0:
            raise ValueError(f"rank must be positive, got {spec!r}")
        return RANK_TYPES.get(f"r{r}", RankType(f"r{r}", r, r))
    spec = str(spec)
    if spec in RANK_TYPES:
        return RANK_TYPES[spec]
    if spec.startswith("r") and spec[1:].isdigit():
        return parse_rank_type(int(spec[1:]))
    parts = spec.split("-")
    if len(parts) == 2 and parts[0].startswith("attn") and parts[1].startswith("mlp"):
        a, m = parts[0][4:], parts[1][3:]
        if a.isdigit() and m.isdigit() and int(a) > 0 and int(m) > 0:
            return RankType(spec, int(a), int(m))
    raise ValueError(
        f"unknown rank type {spec!r}: use one of {sorted(RANK_TYPES)}, a positive integer, or 'attnA-mlpM'"
    )


def assign_rank_types(
    num_clients: int, distribution: str | Sequence[str | int], seed: int = 0
) -> list[RankType]:
    """Assign a rank type to each of ``num_clients`` clients.

    Args:
        distribution: a name from :data:`DISTRIBUTIONS`, or an explicit list of rank types (cycled if shorter
            than the federation).
        seed: seeds the shuffle that places the quotas on clients.
    """
    if not isinstance(distribution, str):
        types = [parse_rank_type(t) for t in distribution]
        if not types:
            raise ValueError("explicit rank list is empty")
        return [types[i % len(types)] for i in range(num_clients)]
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}: use one of {sorted(DISTRIBUTIONS)}")
    shares = DISTRIBUTIONS[distribution]
    exact = [s * num_clients for s in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: num_clients - sum(counts)]:
        counts[i] += 1
    types = list(RANK_TYPES.values())
    assigned = [types[i] for i, c in enumerate(counts) for _ in range(c)]
    random.Random(seed).shuffle(assigned)
    return assigned


def module_ranks(rank_type: RankType | str | int, shapes: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """Per-module ranks for a rank type, each clipped to ``min(d, k)`` of the module's ``(d, k)`` shape."""
    rt = rank_type if isinstance(rank_type, RankType) else parse_rank_type(rank_type)
    return {name: min(rt.rank_for(name), min(d, k)) for name, (d, k) in shapes.items()}
