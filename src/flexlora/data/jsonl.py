"""JSON Lines I/O by byte offset: scan a file once for an index, then read single records by seeking.

Every line is read with a length cap (``MAX_LINE_BYTES``) and parsed with a nesting cap
(:func:`flexlora.core.safe_load.load_json`), so a line without an end or a deeply nested record is
refused with a ``ValueError`` naming the file and line, never read whole or recursed into.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from flexlora.core.safe_load import load_json
from flexlora.data.cache import gzip_errors, is_gzip, open_gzip

__all__ = ["first_record", "scan_jsonl", "read_records", "MAX_LINE_BYTES"]

MAX_LINE_BYTES = 64 * 2**20


def first_record(path: Path) -> dict[str, Any]:
    """The first non-blank record of a plain or gzip'd JSONL file.

    Raises:
        ValueError: the file has no record, or its first line is not a JSON object.
    """
    with gzip_errors(path), open_gzip(path) if is_gzip(path) else open(path, "rb") as f:
        for lineno, line in _lines(f, path):
            if line.strip():
                return _parse(line, path, lineno)
    raise ValueError(f"{path} holds no JSON record")


def _lines(f: IO[bytes], path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` of a binary file, refusing a line longer than ``MAX_LINE_BYTES``."""
    lineno = 0
    while line := f.readline(MAX_LINE_BYTES + 1):
        lineno += 1
        if len(line) > MAX_LINE_BYTES:
            raise ValueError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES} bytes")
        yield lineno, line


def scan_jsonl(path: Path) -> Iterator[tuple[int, int, int, dict[str, Any]]]:
    """``(line number, byte offset, byte length, record)`` for every non-blank line of a plain file."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in _lines(f, path):
            if line.strip():
                yield lineno, offset, len(line), _parse(line, path, lineno)
            offset += len(line)


def read_records(path: Path, spans: Iterable[tuple[int, int]]) -> list[dict[str, Any]]:
    """The records at the given ``(byte offset, byte length)`` spans (as found by ``scan_jsonl``), read by
    seeking, without touching the rest of the file."""
    records = []
    with open(path, "rb") as f:
        for offset, length in spans:
            if not 0 < length <= MAX_LINE_BYTES:
                raise ValueError(f"{path}: record span of {length} bytes is out of range")
            f.seek(offset)
            records.append(_parse(f.read(length), path, None))
    return records


def _parse(line: bytes, path: Path, lineno: int | None) -> dict[str, Any]:
    where = f"{path}:{lineno}" if lineno is not None else str(path)
    record = load_json(line, where, max_bytes=MAX_LINE_BYTES)
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record
