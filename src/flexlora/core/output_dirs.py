"""Output directories that never destroy what flexlora did not create.

A directory that a command writes whole (``flexlora aggregate --out``, a run directory) carries a marker
file naming the command. An existing output directory is replaced only when it carries that marker and the
caller passed ``--overwrite``; an empty directory may be filled; anything else is refused, as is an output
that is one of the command's inputs or contains one (paths compared after resolving symlinks).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["OutputError", "AGGREGATE_MARKER", "RUN_MARKER", "has_marker", "write_marker", "check_output_dir"]

AGGREGATE_MARKER = ".flexlora-aggregate"
RUN_MARKER = ".flexlora-run"


class OutputError(ValueError):
    """An output path would overwrite or delete something flexlora did not write; nothing was touched."""


def has_marker(path: Path, marker: str) -> bool:
    """Whether ``path`` is a directory carrying ``marker`` (a regular file, not a symlink)."""
    m = Path(path) / marker
    return m.is_file() and not m.is_symlink()


def write_marker(path: Path, marker: str, command: str) -> None:
    (Path(path) / marker).write_text(json.dumps({"written_by": command}) + "\n")


def check_output_dir(
    out: str | os.PathLike, marker: str, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()
) -> Path:
    """The resolved output directory, if writing it whole is allowed; else an :class:`OutputError`.

    Allowed: a path that does not exist, an empty directory, or (with ``overwrite``) a directory that
    carries ``marker``. Never an input, a directory containing an input, or the filesystem root.
    """
    target = Path(out).resolve()
    if target == Path(target.anchor):
        raise OutputError(f"{out}: refusing to write over the filesystem root")
    for item in inputs:
        source = Path(item).resolve()
        if source == target or target in source.parents:
            raise OutputError(f"{out}: is the input {item} or contains it; choose another output directory")
    old = target.with_name(f".{target.name}.old")
    if os.path.lexists(old) and not has_marker(old, marker):
        raise OutputError(f"{out}: {old} exists and would be replaced; move it away first")
    if not os.path.lexists(target):
        return target
    if not target.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    if not any(target.iterdir()):
        return target
    if not has_marker(target, marker):
        raise OutputError(
            f"{out}: a non-empty directory that flexlora did not write (no {marker} file); "
            "choose a new output directory"
        )
    if not overwrite:
        raise OutputError(f"{out}: holds an earlier output; pass --overwrite to replace it")
    return target
