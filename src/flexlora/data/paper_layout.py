"""Clients in the layout the FlexLoRA paper's released code reads: three JSON files per client.

A directory holds ``local_training_<id>.json``, ``local_eval_<id>.json`` and ``local_test_<id>.json``, each
a JSON array of ``{"instruction", "input", "output", "category"}``. ``category`` names the NI task file,
e.g. ``"Sentiment Analysis 1153.json"``: the client's task is ``"Sentiment Analysis 1153"`` and its
category ``"Sentiment Analysis"`` (the same names the NI JSONL file uses). A client without an eval or
test file has an empty eval or test split.

The first open reads every file once for the index (task, category, split sizes) and caches it, keyed by
the directory's files (names, sizes, mtimes); ``load`` reads only that client's three files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from flexlora.core.safe_load import load_json
from flexlora.data.base import DEFAULT_CACHE_SIZE, ClientSource
from flexlora.data.cache import SourceCache
from flexlora.data.examples import ClientData, ClientInfo, Example

__all__ = ["PaperLayoutSource", "parse_task_name"]

FILE_PREFIXES = {"train": "local_training_", "eval": "local_eval_", "test": "local_test_"}
_TRAIN_FILE = re.compile(r"^local_training_(.+)\.json$")


def parse_task_name(name: str) -> tuple[str, str]:
    """``(task, category)`` from a paper-layout category: ``"Sentiment 1227.json"`` -> ``("Sentiment 1227",
    "Sentiment")``; a name without a task number is both."""
    task = name.strip().removesuffix(".json").strip()
    head, _, number = task.rpartition(" ")
    return task, (head.strip() if head and number.isdigit() else task)


class PaperLayoutSource(ClientSource):
    """Clients of a paper-layout directory, read three files per ``load``.

    Args:
        path: the directory of ``local_{training,eval,test}_<id>.json`` files.
        cache_dir: where the index goes (default: see ``flexlora.data.cache``).
        cache_size: loaded clients kept in memory.

    Raises:
        ValueError: no ``local_training_*.json`` file, or a file that is not a JSON array of examples.
    """

    format = "paper-layout"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ):
        self.path = Path(path)
        files = sorted(self.path.glob("local_*.json"))
        ids = sorted((m[1] for f in files if (m := _TRAIN_FILE.match(f.name))), key=_id_order)
        if not ids:
            raise ValueError(f"{self.path} has no local_training_<id>.json file")
        cache = SourceCache(self.format, files, cache_dir)
        rows = cache.read_json()
        if rows is None:
            rows = [self._index_row(client_id) for client_id in ids]
            cache.write_json(rows)
        infos = {row[0]: ClientInfo(*row) for row in rows}
        super().__init__(f"{self.format}:{self.path.name}", infos, cache_size)

    def _file(self, split: str, client_id: str) -> Path:
        return self.path / f"{FILE_PREFIXES[split]}{client_id}.json"

    def _records(self, split: str, client_id: str) -> list[dict[str, Any]]:
        file = self._file(split, client_id)
        if split != "train" and not file.exists():
            return []
        records = load_json(file)
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{file}: expected a JSON array of {{instruction, input, output, category}}")
        return records

    def _index_row(self, client_id: str) -> list[Any]:
        splits = {s: self._records(s, client_id) for s in FILE_PREFIXES}
        first = next((r for s in FILE_PREFIXES for r in splits[s]), {})
        task, category = parse_task_name(str(first.get("category", "")))
        return [client_id, task or client_id, category, *(len(splits[s]) for s in FILE_PREFIXES)]

    def _read(self, client_id: str) -> ClientData:
        info = self.info(client_id)
        splits = {
            s: [_example(r, self._file(s, client_id), info) for r in self._records(s, client_id)]
            for s in FILE_PREFIXES
        }
        return ClientData(info, **splits)


def _example(record: dict[str, Any], file: Path, info: ClientInfo) -> Example:
    record = {"input": "", **record}  # an example without input has an empty one
    missing = [k for k in ("instruction", "input", "output") if not isinstance(record.get(k), str)]
    if missing:
        raise ValueError(f"{file}: an example lacks string field(s) {missing} (has {sorted(record)})")
    return Example(record["instruction"], record["input"], record["output"], info.category)


def _id_order(client_id: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order, then the others alphabetically."""
    return (0, int(client_id), "") if client_id.isdigit() else (1, 0, client_id)
