"""Natural Instructions clients from JSON Lines, one client per line: the FlexLoRA paper's client split.

Each line is ``{"client_id", "task", "category", "definition", "train", "eval", "test"}``, the splits being
lists of ``[input, output]`` (e.g. ``natural-instructions-1613.jsonl.gz``: 1,455 clients, 65 MB gzip'd).
Every example's ``instruction`` is the client's ``definition``.

The first open scans the file once and caches an index (client id, task, category, split sizes, byte
offset and length of the line) keyed by the file's path, size and mtime; a gzip'd file is also
decompressed once into the cache so that ``load`` can seek to a client's line. Later opens read only the
index (about 100 KB for 1,455 clients).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flexlora.data.base import DEFAULT_CACHE_SIZE, ClientSource
from flexlora.data.cache import SourceCache, plain_copy
from flexlora.data.examples import ClientData, ClientInfo, Example
from flexlora.data.jsonl import read_records, scan_jsonl

__all__ = ["NIJsonlSource"]

SPLITS = ("train", "eval", "test")
REQUIRED_KEYS = ("client_id", "task", "category", "definition", *SPLITS)


class NIJsonlSource(ClientSource):
    """Clients of a Natural Instructions JSONL file (plain or gzip'd), read one line per ``load``.

    Args:
        path: the ``.jsonl`` or ``.jsonl.gz`` file.
        cache_dir: where the index and decompressed copy go (default: see ``flexlora.data.cache``).
        cache_size: loaded clients kept in memory.

    Raises:
        ValueError: a line is not JSON, lacks a key, or repeats a client id (message names the line).
    """

    format = "ni-jsonl"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ):
        self.path = Path(path)
        self._data_path = plain_copy(self.path, cache_dir)
        cache = SourceCache(self.format, [self.path], cache_dir)
        rows = cache.read_json()
        if rows is None:
            rows = _build_index(self._data_path, self.path)
            cache.write_json(rows)
        infos: dict[str, ClientInfo] = {}
        self._spans: dict[str, tuple[int, int]] = {}
        for client_id, task, category, offset, length, n_train, n_eval, n_test in rows:
            infos[client_id] = ClientInfo(client_id, task, category, n_train, n_eval, n_test)
            self._spans[client_id] = (offset, length)
        super().__init__(f"{self.format}:{self.path.name}", infos, cache_size)

    def _read(self, client_id: str) -> ClientData:
        (record,) = read_records(self._data_path, [self._spans[client_id]])
        if str(record.get("client_id")) != client_id:
            raise ValueError(
                f"{self.name}: the cached index points client {client_id!r} at a line of client "
                f"{record.get('client_id')!r}; delete {self._data_path} and its index to rebuild them"
            )
        info = self.info(client_id)
        splits = {s: _examples(record, s, info) for s in SPLITS}
        return ClientData(info, **splits)


def _build_index(data_path: Path, source_path: Path) -> list[list[Any]]:
    """One row ``[client_id, task, category, offset, length, n_train, n_eval, n_test]`` per client."""
    rows: list[list[Any]] = []
    seen: set[str] = set()
    for lineno, offset, length, record in scan_jsonl(data_path):
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            raise ValueError(
                f"{source_path}:{lineno}: NI JSONL record lacks {missing} (has {sorted(record)})"
            )
        bad = [k for k in ("task", "category", "definition") if not isinstance(record[k], str)]
        bad += [k for k in SPLITS if not isinstance(record[k], list)]
        if not isinstance(record["client_id"], str | int) or isinstance(record["client_id"], bool):
            bad.insert(0, "client_id")
        if bad:
            raise ValueError(
                f"{source_path}:{lineno}: field(s) {bad} have the wrong type (client_id: string or integer, "
                "task, category, definition: strings, train, eval, test: lists)"
            )
        client_id = str(record["client_id"])
        if client_id in seen:
            raise ValueError(f"{source_path}:{lineno}: client_id {client_id!r} appears twice")
        seen.add(client_id)
        counts = [len(record[s]) for s in SPLITS]
        rows.append([client_id, str(record["task"]), str(record["category"]), offset, length, *counts])
    return rows


def _examples(record: dict[str, Any], split: str, info: ClientInfo) -> list[Example]:
    examples = []
    for i, pair in enumerate(record[split]):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ValueError(
                f"client {info.client_id!r} {split}[{i}] is not an [input, output] pair of strings"
            )
        examples.append(Example(record["definition"], pair[0], pair[1], info.category))
    return examples
