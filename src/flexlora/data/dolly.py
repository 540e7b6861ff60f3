"""Dolly-style instruction data split into federated clients, by category or by a Dirichlet mixture.

A JSONL file of ``{"instruction", "context", "response", "category"}`` (databricks-dolly-15k: 15,011
records, 8 categories). An example's ``input`` is the context and its ``output`` the response.

Clients (every record goes to exactly one client):

- ``split_by="category"``: one client per category (id = the category), or ``clients_per_category`` of
  them (ids ``<category>-<j>``), each taking a seeded, near-equal share of the category's records.
- ``split_by="dirichlet"``: ``num_clients`` clients (ids ``"0"``, ``"1"``, ...); for each category, shares
  ``p ~ Dirichlet(dirichlet_alpha, ..., dirichlet_alpha)`` over the clients deal out its records (Hsu et
  al., 2019). Small alpha gives clients dominated by one or two categories, large alpha near-IID ones.
  Draws repeat until every client has at least ``MIN_CLIENT_EXAMPLES`` records.

Each client's records are then shuffled with the seed and cut by ``fractions`` into train / eval / test.
A client's ``category`` is its most common category; its ``task`` is that category under
``split_by="category"`` and ``"mixture"`` under ``"dirichlet"``. The open scans the file once (about
0.3 s for Dolly) and keeps only byte offsets; ``load`` seeks to the client's records.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flexlora.data.base import DEFAULT_CACHE_SIZE, ClientSource
from flexlora.data.cache import plain_copy
from flexlora.data.checks import require_int, require_number
from flexlora.data.examples import ClientData, ClientInfo, Example
from flexlora.data.jsonl import read_records, scan_jsonl
from flexlora.data.splits import DEFAULT_FRACTIONS, check_fractions, seeded_rng, split_items

__all__ = ["DollySource", "SPLIT_BY", "MIN_CLIENT_EXAMPLES"]

SPLIT_BY = ("category", "dirichlet")
MIN_CLIENT_EXAMPLES = 10  # a Dirichlet partition is redrawn until every client has this many records
MAX_DIRICHLET_DRAWS = 100
REQUIRED_KEYS = ("instruction", "context", "response", "category")


class DollySource(ClientSource):
    """Clients made from a Dolly-style JSONL file.

    Args:
        path: the ``.jsonl`` file (a gzip'd one is decompressed once into the cache).
        split_by: ``"category"`` or ``"dirichlet"`` (see the module docstring).
        clients_per_category: clients per category under ``split_by="category"``.
        num_clients: number of clients under ``split_by="dirichlet"`` (required there).
        dirichlet_alpha: concentration of the per-category Dirichlet, > 0.
        seed: seeds the partition and each client's train / eval / test split.
        fractions: train / eval / test shares of each client's records.
        cache_dir: where a decompressed copy of a gzip'd file goes (default: see ``flexlora.data.cache``).
        cache_size: loaded clients kept in memory.

    Raises:
        ValueError: a bad option (the message names it), or a record lacking a key (names the line).
    """

    format = "dolly"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        split_by: str = "category",
        clients_per_category: int = 1,
        num_clients: int | None = None,
        dirichlet_alpha: float = 0.5,
        seed: int = 0,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ):
        if split_by not in SPLIT_BY:
            raise ValueError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")
        if split_by == "category":
            require_int("clients_per_category", clients_per_category, 1)
            if num_clients is not None:
                raise ValueError("num_clients applies to split_by='dirichlet'; use clients_per_category")
        else:
            if num_clients is None:
                raise ValueError("split_by='dirichlet' needs num_clients")
            require_int("num_clients", num_clients, 1)
            require_number("dirichlet_alpha", dirichlet_alpha, 0)
        self.path = Path(path)
        self.fractions = check_fractions(fractions)
        self._data_path = plain_copy(self.path, cache_dir)

        self._spans, categories = _scan(self._data_path, self.path)
        by_category: dict[str, list[int]] = {}
        for i, category in enumerate(categories):
            by_category.setdefault(category, []).append(i)
        if split_by == "category":
            parts = _split_by_category(by_category, clients_per_category, seed)
        else:
            parts = _split_dirichlet(by_category, num_clients, dirichlet_alpha, seed)

        self._records: dict[str, tuple[list[int], list[int], list[int]]] = {}
        infos: dict[str, ClientInfo] = {}
        for client_id, records in parts.items():
            seeded_rng(seed, self.format, "split", client_id).shuffle(records)
            splits = split_items(records, self.fractions)
            self._records[client_id] = splits
            category = Counter(categories[i] for i in records).most_common(1)[0][0]
            task = category if split_by == "category" else "mixture"
            infos[client_id] = ClientInfo(client_id, task, category, *(len(s) for s in splits))
        super().__init__(f"{self.format}:{self.path.name}", infos, cache_size)

    def _read(self, client_id: str) -> ClientData:
        splits = [
            [_example(r) for r in read_records(self._data_path, [self._spans[i] for i in indices])]
            for indices in self._records[client_id]
        ]
        return ClientData(self.info(client_id), *splits)


def _scan(data_path: Path, source_path: Path) -> tuple[list[tuple[int, int]], list[str]]:
    """Each record's ``(byte offset, byte length)`` and category, checking the schema on the way."""
    spans: list[tuple[int, int]] = []
    categories: list[str] = []
    for lineno, offset, length, record in scan_jsonl(data_path):
        missing = [k for k in REQUIRED_KEYS if not isinstance(record.get(k), str)]
        if missing:
            raise ValueError(f"{source_path}:{lineno}: Dolly record lacks string field(s) {missing}")
        spans.append((offset, length))
        categories.append(record["category"])
    if not spans:
        raise ValueError(f"{source_path} holds no record")
    return spans, categories


def _example(record: dict[str, Any]) -> Example:
    return Example(record["instruction"], record["context"], record["response"], record["category"])


def _split_by_category(
    by_category: dict[str, list[int]], per_category: int, seed: int
) -> dict[str, list[int]]:
    """``per_category`` near-equal seeded shares of each category's records (ids in sorted category order)."""
    parts: dict[str, list[int]] = {}
    for category in sorted(by_category):
        records = list(by_category[category])
        if len(records) < per_category:
            raise ValueError(
                f"clients_per_category={per_category} exceeds the {len(records)} records of {category!r}"
            )
        if per_category == 1:
            parts[category] = records
            continue
        seeded_rng(seed, "dolly", "deal", category).shuffle(records)
        for j in range(per_category):
            parts[f"{category}-{j}"] = records[
                j * len(records) // per_category : (j + 1) * len(records) // per_category
            ]
    return parts


def _split_dirichlet(
    by_category: dict[str, list[int]], num_clients: int, alpha: float, seed: int
) -> dict[str, list[int]]:
    """Deal each category's records to clients in Dirichlet(alpha) shares; redraw until no client is tiny."""
    total = sum(len(r) for r in by_category.values())
    if num_clients * MIN_CLIENT_EXAMPLES > total:
        raise ValueError(
            f"num_clients={num_clients} leaves fewer than {MIN_CLIENT_EXAMPLES} of {total} records each"
        )
    rng = seeded_rng(seed, "dolly", "dirichlet")
    shuffled = {c: rng.sample(by_category[c], len(by_category[c])) for c in sorted(by_category)}
    for _ in range(MAX_DIRICHLET_DRAWS):
        bounds = {
            c: [0, *_dirichlet_cuts(rng, alpha, num_clients, len(r)), len(r)] for c, r in shuffled.items()
        }
        sizes = [sum(b[i + 1] - b[i] for b in bounds.values()) for i in range(num_clients)]
        if min(sizes) >= MIN_CLIENT_EXAMPLES:
            return {
                str(i): [r for c, b in bounds.items() for r in shuffled[c][b[i] : b[i + 1]]]
                for i in range(num_clients)
            }
    raise ValueError(
        f"dirichlet_alpha={alpha} with num_clients={num_clients} left some client with fewer than "
        f"{MIN_CLIENT_EXAMPLES} records in {MAX_DIRICHLET_DRAWS} draws; raise dirichlet_alpha or lower num_clients"
    )


def _dirichlet_cuts(rng: random.Random, alpha: float, k: int, n: int) -> list[int]:
    """The ``k - 1`` cut points that deal ``n`` records in Dirichlet(alpha)-distributed shares."""
    gammas = [rng.gammavariate(alpha, 1.0) for _ in range(k)]
    total, acc, cuts = sum(gammas), 0.0, []
    if total == 0:  # a tiny alpha underflowed every draw: take the alpha -> 0 limit, all to one client
        winner = rng.randrange(k)
        return [0] * winner + [n] * (k - 1 - winner)
    for g in gammas[:-1]:
        acc += g
        cuts.append(int(acc / total * n))
    return cuts
