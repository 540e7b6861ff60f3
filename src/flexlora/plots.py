"""Plots of finished runs (matplotlib, headless). Each function writes one PNG and returns its path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_metric_by_round", "eval_series"]


def eval_series(metrics: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(rounds, values)`` of an evaluation metric (``rougeL``, ``loss``, ...) over a run's rounds."""
    points = [(m["round"], m["eval"][key]) for m in metrics if key in m.get("eval", {})]
    return [r for r, _ in points], [v for _, v in points]


def plot_metric_by_round(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], key: str, path: str | Path, title: str = ""
) -> Path:
    """One line per run (label -> its ``metrics.jsonl`` records) of ``eval[key]`` against the round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, metrics in runs.items():
        rounds, values = eval_series(metrics, key)
        ax.plot(rounds, values, marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(key)
    ax.set_title(title or f"{key} on held-out clients by round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
