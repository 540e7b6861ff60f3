"""JSON Lines I/O by byte offset: scan a file once for an index, then read single records by seeking."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from flexlora.data.cache import is_gzip

__all__ = ["first_record", "scan_jsonl", "read_records"]


def first_record(path: Path) -> dict[str, Any]:
    """The first non-blank record of a plain or gzip'd JSONL file.

    Raises:
        ValueError: the file has no record, or its first line is not a JSON object.
    """
    opener = gzip.open if is_gzip(path) else open
    with opener(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                return _parse(line, path, lineno)
    raise ValueError(f"{path} holds no JSON record")


def scan_jsonl(path: Path) -> Iterator[tuple[int, int, int, dict[str, Any]]]:
    """``(line number, byte offset, byte length, record)`` for every non-blank line of a plain file."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, offset, len(line), _parse(line, path, lineno)
            offset += len(line)


def read_records(path: Path, spans: Iterable[tuple[int, int]]) -> list[dict[str, Any]]:
    """The records at the given ``(byte offset, byte length)`` spans (as found by ``scan_jsonl``), read by
    seeking, without touching the rest of the file."""
    records = []
    with open(path, "rb") as f:
        for offset, length in spans:
            f.seek(offset)
            records.append(_parse(f.read(length), path, None))
    return records


def _parse(line: bytes, path: Path, lineno: int | None) -> dict[str, Any]:
    where = f"{path}:{lineno}" if lineno is not None else str(path)
    try:
        record = json.loads(line)
    except ValueError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record
