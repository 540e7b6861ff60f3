"""JSON and YAML from untrusted files with bounded work: a size cap, a nesting cap and, for YAML, a cap on
the document as expanded through its aliases.

A 1 KB YAML "billion laughs" (nine levels of anchors, each aliased ten times) names ``10^9`` nodes; it is
refused after composing its ~100 distinct nodes, before anything is constructed. JSON has no aliases, so its
parse is linear in its size; deep nesting ends in the decoder's recursion guard or the depth cap.
Every refusal is a :class:`LoadError` (a ``ValueError``) whose one-line message names the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "LoadError",
    "MAX_JSON_BYTES",
    "MAX_YAML_BYTES",
    "MAX_DEPTH",
    "read_capped",
    "load_json",
    "load_yaml",
    "load_yaml_file",
]

MAX_JSON_BYTES = 256 * 2**20
MAX_YAML_BYTES = 2**20
MAX_DEPTH = 64
MAX_YAML_NODES = 200_000


class LoadError(ValueError):
    """A file is too large, too deeply nested, or not valid JSON/YAML; the message names it."""


def read_capped(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of ``path``, refusing (before reading) a file larger than ``max_bytes``."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise LoadError(f"{path}: {size} bytes, more than the {max_bytes} allowed")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while we read it
        raise LoadError(f"{path}: more than the {max_bytes} bytes allowed")
    return data


def load_json(
    source: str | os.PathLike | bytes,
    where: str | None = None,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Parse JSON from a file path or bytes, with ``len <= max_bytes`` and nesting ``<= max_depth``."""
    if isinstance(source, bytes | bytearray):
        where = where or "JSON"
        if len(source) > max_bytes:
            raise LoadError(f"{where}: {len(source)} bytes, more than the {max_bytes} allowed")
        data = bytes(source)
    else:
        where = where or str(source)
        data = read_capped(source, max_bytes)
    try:
        value = json.loads(data)
    except RecursionError:
        raise LoadError(f"{where}: JSON nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise LoadError(f"{where}: not valid JSON ({_first_line(exc)})") from None
    _check_depth(value, where, max_depth, "JSON")
    return value


def _check_depth(value: Any, where: str, max_depth: int, kind: str) -> None:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > max_depth:
                raise LoadError(f"{where}: {kind} nested deeper than {max_depth} levels")
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a document whose alias expansion exceeds ``MAX_YAML_NODES``."""

    def fetch_flow_collection_start(self, token_class):
        """Refuse deep ``[[[...`` while scanning: PyYAML's scanner would otherwise spend seconds on it."""
        if self.flow_level >= MAX_DEPTH:
            raise LoadError(f"{self.name}: YAML nested deeper than {MAX_DEPTH} levels")
        super().fetch_flow_collection_start(token_class)

    def add_indent(self, column):
        if len(self.indents) >= MAX_DEPTH:
            raise LoadError(f"{self.name}: YAML nested deeper than {MAX_DEPTH} levels")
        return super().add_indent(column)

    def compose_document(self):
        node = super().compose_document()
        _expanded_size(node, self.name)
        return node


def _expanded_size(root: yaml.Node, where: str) -> int:
    """Nodes in the tree that ``root`` stands for once every alias is expanded (memoised, so linear in the
    distinct nodes); refuses recursive aliases, nesting beyond ``MAX_DEPTH`` and more than MAX_YAML_NODES."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise LoadError(f"{where}: a YAML alias refers to a node that contains it")
        if depth > MAX_DEPTH:
            raise LoadError(f"{where}: YAML nested deeper than {MAX_DEPTH} levels")
        active.add(key)
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(v, depth + 1) for v in node.value)
        else:
            total = 1
        active.discard(key)
        if total > MAX_YAML_NODES:
            raise LoadError(
                f"{where}: YAML expands (through its aliases) to more than {MAX_YAML_NODES} nodes"
            )
        sizes[key] = total
        return total

    return size(root, 1)


def load_yaml(text: str | bytes, where: str, max_bytes: int = MAX_YAML_BYTES) -> Any:
    """Parse one YAML document safely: plain data only, size, nesting and alias expansion capped."""
    data = text.encode() if isinstance(text, str) else bytes(text)
    if len(data) > max_bytes:
        raise LoadError(f"{where}: {len(data)} bytes, more than the {max_bytes} allowed")
    loader = None
    try:
        loader = _BoundedLoader(data)  # decodes the first bytes already
        loader.name = where
        return loader.get_single_data()
    except RecursionError:
        raise LoadError(f"{where}: YAML nested deeper than {MAX_DEPTH} levels") from None
    except yaml.YAMLError as exc:
        raise LoadError(f"{where}: not valid YAML ({_first_line(exc)})") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml_file(path: str | os.PathLike, max_bytes: int = MAX_YAML_BYTES) -> Any:
    """:func:`load_yaml` of a file, refused unread when larger than ``max_bytes``."""
    return load_yaml(read_capped(path, max_bytes), str(path), max_bytes)


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
