"""A SuperNode that picks its own rank type from its budget: ``lora-rank="auto" memory-gb=4``.

The node reads the run's model, LoRA targets and batch shape from its run config, takes the largest rank
type that fits ``memory-gb`` (and ``seconds-per-round``, when given) as :func:`flexlora.budget.pick` does for
``flexlora ranks`` (measured where ``flexlora ranks`` cached a measurement on this machine, else estimated),
and declares it like a fixed ``lora-rank``. The query reply also carries the budget, the cost it was chosen
by and why (one line, :func:`flexlora.core.budget.reason`), which the server records in ``assignment.json``.
A budget that no type fits fails the query with one line (the server logs it and leaves the node out).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord

from flexlora.core.budget import GIB, Budget, reason
from flexlora.engines.flower.records import ReplyError, node_declaration

__all__ = ["BUDGET_KEYS", "MAX_REASON_CHARS", "REASON_KEY", "budget_note", "node_record"]

log = logging.getLogger(__name__)

#: Node config keys of a budget, and the reply keys that carry it to the server.
BUDGET_KEYS = ("memory-gb", "seconds-per-round")
#: Reply key of the one-line reason for the chosen type (:func:`flexlora.core.budget.reason`), and its cap.
REASON_KEY = "budget-reason"
MAX_REASON_CHARS = 500
_NOTE_KEYS = {
    "memory-gb": "memory_gb",
    "seconds-per-round": "seconds_per_round",
    "estimated-gb": "estimated_gb",
}


def _budget(node_config: Mapping[str, Any]) -> Budget:
    if "memory-gb" not in node_config:
        raise ValueError('node config lora-rank="auto" needs memory-gb (e.g. memory-gb=4)')
    seconds = node_config.get("seconds-per-round")
    try:
        return Budget(float(node_config["memory-gb"]), None if seconds is None else float(seconds))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"node config: {exc}") from None


def node_record(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> ConfigRecord:
    """The node's declaration as a query reply; with ``lora-rank="auto"`` its rank type comes from its budget.

    Raises:
        ValueError: a malformed node config, or (``BudgetError``) a budget no rank type fits.
    """
    if str(node_config.get("lora-rank", "")) != "auto":
        return node_declaration(node_config).to_record()
    from flexlora.budget import costs, pick, rank_table
    from flexlora.engines.flower.settings import run_config_from_flower

    budget = _budget(node_config)
    cfg, _ = run_config_from_flower(dict(run_config))
    model, train = cfg.model, cfg.train
    rows = rank_table(
        model.name,
        model.target_modules,
        train.batch_size,
        train.max_length,
        model.dtype,
        model.device,
        "cached",
    )
    row = pick(rows, budget, train.steps)
    log.info("budget %s: rank type %s (%.2f GiB)", budget, row.rank_type.name, row.peak_bytes / GIB)
    rest = {k: v for k, v in node_config.items() if k not in ("lora-rank", *BUDGET_KEYS)}
    record = dataclasses.replace(node_declaration(rest), rank_type=row.rank_type).to_record()
    record["memory-gb"] = budget.memory_gb
    if budget.seconds_per_round is not None:
        record["seconds-per-round"] = budget.seconds_per_round
    record["estimated-gb"] = round(row.peak_bytes / GIB, 3)
    source = "measured" if row.measured_bytes is not None else "estimated"
    record[REASON_KEY] = f"{reason(costs(rows), budget, train.steps)} ({source})"
    return record


def budget_note(record: ConfigRecord, node: int | str = "?") -> dict[str, float | str] | None:
    """What a query reply says about the node's budget (None for a node that declared a fixed rank).

    Raises:
        ReplyError: a budget value that is not a positive number, or a reason that is not one line of at most
            ``MAX_REASON_CHARS`` characters.
    """
    if "memory-gb" not in record:
        return None
    note: dict[str, float | str] = {}
    if REASON_KEY in record:
        text = record[REASON_KEY]
        if not isinstance(text, str) or len(text) > MAX_REASON_CHARS or not text.isprintable():
            raise ReplyError(
                node, f"node[{REASON_KEY}]", f"must be one line of at most {MAX_REASON_CHARS} characters"
            )
        note["reason"] = text
    for key, name in _NOTE_KEYS.items():
        if key in record:
            value = record[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
                raise ReplyError(node, f"node[{key}]", f"must be a positive number, got {value!r}")
            note[name] = float(value)
    return note
