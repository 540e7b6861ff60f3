"""Federated data: client sources that load one client at a time, and the splits between clients.

``open_source`` opens any supported format, detected from the path or named by ``format=``:

==============  ==========================================================  =================================
format          what                                                        options
==============  ==========================================================  =================================
ni-jsonl        NI JSONL (or .jsonl.gz), one client per line (paper split)  cache_dir, cache_size
paper-layout    dir of ``local_{training,eval,test}_<id>.json``             cache_dir, cache_size
ni-tasks        dir of raw NI ``task*.json``, one task per client           seed, fractions, sample_fraction,
                                                                            cache_dir, cache_size
dolly           Dolly JSONL split by category or Dirichlet mixture          split_by, clients_per_category,
                                                                            num_clients, dirichlet_alpha,
                                                                            seed, fractions, cache_dir,
                                                                            cache_size
synthetic       the built-in procedural tasks (name ``"synthetic"``)        num_clients, examples_per_client,
                                                                            seed, fractions, cache_size
==============  ==========================================================  =================================
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from flexlora.data.base import ClientSource
from flexlora.data.dolly import DollySource
from flexlora.data.examples import ClientData, ClientInfo, Example
from flexlora.data.jsonl import first_record
from flexlora.data.ni_jsonl import NIJsonlSource
from flexlora.data.ni_tasks import NITasksSource
from flexlora.data.paper_layout import PaperLayoutSource
from flexlora.data.splits import split_clients
from flexlora.data.synthetic import SyntheticSource

__all__ = [
    "FORMATS",
    "ClientData",
    "ClientInfo",
    "ClientSource",
    "DollySource",
    "Example",
    "NIJsonlSource",
    "NITasksSource",
    "PaperLayoutSource",
    "SyntheticSource",
    "detect_format",
    "open_source",
    "split_clients",
]

FORMATS: dict[str, type[ClientSource]] = {
    cls.format: cls for cls in (NIJsonlSource, PaperLayoutSource, NITasksSource, DollySource, SyntheticSource)
}
SYNTHETIC = SyntheticSource.format


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of a data path: a directory with ``local_training_*.json`` is ``paper-layout``, one with
    ``task*.json`` is ``ni-tasks``; a ``.jsonl`` / ``.jsonl.gz`` file is ``ni-jsonl`` when its first record has
    ``client_id`` and ``train``, ``dolly`` when it has ``instruction`` and ``response``.

    Raises:
        ValueError: the path does not exist or matches no format; the message names the path and what
            was tried.
    """
    p = Path(path)
    if p.is_dir():
        if next(p.glob("local_training_*.json"), None) is not None:
            return PaperLayoutSource.format
        if next(p.glob("task*.json"), None) is not None:
            return NITasksSource.format
        raise ValueError(
            f"cannot detect the format of directory {p}: it has neither local_training_<id>.json files "
            f"(paper-layout) nor task*.json files (ni-tasks); pass format= one of {sorted(FORMATS)}"
        )
    if not p.is_file():
        raise ValueError(f"data path {p} does not exist (nor is it the name {SYNTHETIC!r})")
    keys = set(first_record(p))
    if {"client_id", "train"} <= keys:
        return NIJsonlSource.format
    if {"instruction", "response"} <= keys:
        return DollySource.format
    raise ValueError(
        f"cannot detect the format of {p}: its first record has keys {sorted(keys)}, neither ni-jsonl "
        f"(client_id, train, ...) nor dolly (instruction, response, ...); pass format= one of {sorted(FORMATS)}"
    )


def open_source(
    path_or_name: str | os.PathLike[str], format: str | None = None, **options: object
) -> ClientSource:
    """Open a federated data source.

    Args:
        path_or_name: a file or directory of one of ``FORMATS``, or ``"synthetic"`` for the built-in set.
        format: the format, when not to detect it (``ni-jsonl``, ``paper-layout``, ``ni-tasks``, ``dolly``,
            ``synthetic``).
        **options: keyword arguments of that format's source (see the table above).

    Returns:
        The source; its index is built (or read from the cache), no client is loaded yet.

    Raises:
        ValueError: an unknown format or option, an undetectable path, or a bad option value; the message
            names it.

    Example:
        >>> source = open_source("synthetic", num_clients=8, seed=1)
        >>> source.format, len(source)
        ('synthetic', 8)
    """
    if format is None:
        format = SYNTHETIC if str(path_or_name) == SYNTHETIC else detect_format(path_or_name)
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; known: {sorted(FORMATS)}")
    cls = FORMATS[format]
    accepted = [name for name, p in inspect.signature(cls).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for data format {format!r}; it accepts {accepted}")
    if format == SYNTHETIC:
        if str(path_or_name) != SYNTHETIC:
            raise ValueError(f"format 'synthetic' is built in and reads no path; got {str(path_or_name)!r}")
        return cls(**options)
    return cls(path_or_name, **options)
