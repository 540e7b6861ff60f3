"""Raw Natural Instructions task files, one task per client, with a seeded train / eval / test split.

A directory of ``taskNNN_name.json`` files (the ``tasks/`` folder of the natural-instructions repository),
each ``{"Definition": [str, ...], "Categories": [str, ...], "Instances": [{"input", "output": [str, ...]},
...], ...}``. A client's id and task are the file's stem, its category the first of ``Categories``, every
example's instruction the definition, and its output the first reference output.

``sample_fraction`` keeps a seeded share of each task's instances (the FlexLoRA paper keeps 10 %); the
kept instances are shuffled with the same seed and cut by ``fractions`` (default 80/10/10). The first
open reads every file once for the index (category and instance count per task) and caches it, keyed by
the directory's task files; ``load`` reads only that task's file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flexlora.core.safe_load import load_json
from flexlora.data.base import DEFAULT_CACHE_SIZE, ClientSource
from flexlora.data.cache import SourceCache
from flexlora.data.checks import require_number
from flexlora.data.examples import ClientData, ClientInfo, Example
from flexlora.data.splits import DEFAULT_FRACTIONS, check_fractions, seeded_rng, split_counts, split_items

__all__ = ["NITasksSource"]


class NITasksSource(ClientSource):
    """One client per raw Natural Instructions task file.

    Args:
        path: the directory of ``task*.json`` files.
        seed: seeds each task's subsample and split.
        fractions: train / eval / test shares of a task's kept instances.
        sample_fraction: share of each task's instances to keep, in (0, 1] (at least one is kept).
        cache_dir: where the index goes (default: see ``flexlora.data.cache``).
        cache_size: loaded clients kept in memory.

    Raises:
        ValueError: no ``task*.json`` file, a bad option, or a task file that does not follow the schema.
    """

    format = "ni-tasks"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        seed: int = 0,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        sample_fraction: float = 1.0,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ):
        require_number("sample_fraction", sample_fraction, 0, 1)
        self.path = Path(path)
        self.seed = seed
        self.fractions = check_fractions(fractions)
        self.sample_fraction = sample_fraction
        files = sorted(self.path.glob("task*.json"))
        if not files:
            raise ValueError(f"{self.path} has no task*.json file")
        cache = SourceCache(self.format, files, cache_dir)
        rows = cache.read_json()
        if rows is None:
            rows = [_index_row(f) for f in files]
            cache.write_json(rows)
        infos = {
            task: ClientInfo(task, task, category, *split_counts(self._kept(n), self.fractions))
            for task, category, n in rows
        }
        super().__init__(f"{self.format}:{self.path.name}", infos, cache_size)

    def _kept(self, num_instances: int) -> int:
        return max(1, math.floor(num_instances * self.sample_fraction + 0.5))

    def _read(self, client_id: str) -> ClientData:
        file = self.path / f"{client_id}.json"
        task = _load_task(file)
        instances = task["Instances"]
        order = seeded_rng(self.seed, self.format, client_id).sample(
            range(len(instances)), self._kept(len(instances))
        )
        info = self.info(client_id)
        definition = "\n".join(task["Definition"])
        examples = [_example(instances[i], i, definition, info.category, file) for i in order]
        train, eval_, test = split_items(examples, self.fractions)
        return ClientData(info, train, eval_, test)


def _load_task(file: Path) -> dict[str, Any]:
    task = load_json(file)
    if not isinstance(task, dict):
        raise ValueError(f"{file}: expected a JSON object with Definition, Categories and Instances")
    checks = {
        "Definition": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "Categories": lambda v: isinstance(v, list),
        "Instances": lambda v: isinstance(v, list) and len(v) > 0,
    }
    bad = [key for key, ok in checks.items() if not ok(task.get(key))]
    if bad:
        raise ValueError(
            f"{file}: {bad} missing or malformed (Definition: list of str, Categories: list, "
            "Instances: non-empty list)"
        )
    return task


def _index_row(file: Path) -> list[Any]:
    """``[task, category, number of instances]`` of one task file."""
    task = _load_task(file)
    return [file.stem, str(task["Categories"][0]) if task["Categories"] else "", len(task["Instances"])]


def _example(instance: Any, i: int, definition: str, category: str, file: Path) -> Example:
    output = instance.get("output") if isinstance(instance, dict) else None
    if isinstance(output, list) and output:
        output = output[0]
    if not isinstance(output, str) or not isinstance(instance.get("input"), str):
        raise ValueError(f"{file}: Instances[{i}] needs a string input and an output list of strings")
    return Example(definition, instance["input"], output, category)
