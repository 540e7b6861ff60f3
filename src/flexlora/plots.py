"""Plots of finished runs (matplotlib, headless). Each function writes one PNG and returns its path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flexlora.methods import METHODS
from flexlora.stats import mean_sd

__all__ = [
    "comparison_plots",
    "eval_series",
    "plot_energy_beyond_min_rank",
    "plot_gap_by_budget",
    "plot_improvement_by_category",
    "plot_metric_by_round",
    "plot_metric_by_round_grid",
    "plot_spectrum_by_round",
]


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
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
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


# ---------------------------------------------------------------------------------------------- comparisons
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


_FEW_LINES = 6  # up to this many lines per panel: SD bands and a legend on the panel itself


def _by_distribution(records: Sequence[Any]) -> tuple[list[str], dict[str, list[Any]]]:
    """Heterogeneous distributions (each subplot), and the homogeneous runs shown in every subplot."""
    dists = sorted({r.distribution for r in records if r.distribution != "homo" and "@" not in r.label})
    groups: dict[str, list[Any]] = {d: [] for d in dists or ["homo"]}
    for r in records:
        targets = [r.distribution] if r.distribution in groups else list(groups)
        for d in targets:
            groups[d].append(r)
    return list(groups), groups


def _mean_by_round(runs: Sequence[Any], value) -> tuple[list[int], list[float], list[float]]:
    per_round: dict[int, list[float]] = {}
    for run in runs:
        for m in run.metrics:
            v = value(m)
            if v is not None:
                per_round.setdefault(m["round"], []).append(v)
    rounds = sorted(r for r, v in per_round.items() if len(v) == len(runs))
    stats = [mean_sd(per_round[r]) for r in rounds]
    return rounds, [m for m, _ in stats], [sd for _, sd in stats]


def _grid(n: int, width: float = 5.0, height: float = 3.8):
    plt = _pyplot()
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), dpi=110, squeeze=False)
    return fig, list(axes[0])


def _color_key(r: Any) -> tuple[str, str]:
    """Heterogeneous runs share a color across subplots; homogeneous ones keep their own."""
    return (r.label, r.distribution if r.distribution == "homo" or "@" in r.label else "*")


def _palette(records: Sequence[Any]) -> dict[tuple[str, str], Any]:
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab20").colors
    return {k: colors[i % len(colors)] for i, k in enumerate(sorted({_color_key(r) for r in records}))}


def _lines_by_label(
    ax, runs: Sequence[Any], value, ylabel: str, dist: str | None = None, palette: dict | None = None
) -> None:
    """One line per (method, distribution), mean over seeds; a run from another distribution than the
    subplot's (a homogeneous baseline, a reference, a homo control) is dashed and, where its label does not
    say it, named with its distribution. SD bands only while few lines share the axes; the legend is left
    to :func:`_legends`."""
    groups: dict[tuple[str, str], list[Any]] = {}
    for r in runs:
        groups.setdefault((r.label, r.distribution), []).append(r)
    palette = palette or _palette(runs)
    for (label, run_dist), group in sorted(groups.items()):
        rounds, means, sds = _mean_by_round(group, value)
        if not rounds:
            continue
        other = dist is not None and run_dist != dist
        homogeneous = label in METHODS and METHODS[label].homogeneous_only  # a baseline: always at homo
        name = f"{label} [{run_dist}]" if other and "@" not in label and not homogeneous else label
        (line,) = ax.plot(
            rounds,
            means,
            marker=".",
            ls="--" if other else "-",
            color=palette[_color_key(group[0])],
            label=f"{name} (n={len(group)})",
        )
        if len(group) > 1 and len(groups) <= _FEW_LINES:
            lo = [m - s for m, s in zip(means, sds, strict=True)]
            hi = [m + s for m, s in zip(means, sds, strict=True)]
            ax.fill_between(rounds, lo, hi, color=line.get_color(), alpha=0.12)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _legends(fig, axes) -> None:
    """Per-axes legends while few lines share the axes; otherwise one legend for the whole figure, under
    the subplots, so that it does not hide the curves (a method keeps its color across subplots)."""
    if max(len(ax.get_lines()) for ax in axes) <= _FEW_LINES:
        for ax in axes:
            ax.legend(fontsize=7)
        return
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    fig.legend(
        entries.values(), entries.keys(), loc="upper center", bbox_to_anchor=(0.5, 0), ncol=4, fontsize=7
    )


def plot_metric_by_round_grid(records: Sequence[Any], key: str, path: str | Path) -> Path:
    """Held-out ``eval[key]`` by round: one subplot per distribution, one line per method (mean over seeds,
    band = SD); homogeneous baselines (dashed) appear in every subplot."""
    dists, groups = _by_distribution(records)
    fig, axes = _grid(len(dists))
    for ax, dist in zip(axes, dists, strict=True):
        _lines_by_label(ax, groups[dist], lambda m: m.get("eval", {}).get(key), key, dist, _palette(records))
        ax.set_title(f"{key}, held-out clients: {dist}", fontsize=9)
    _legends(fig, axes)
    return _save(fig, Path(path))


def plot_energy_beyond_min_rank(records: Sequence[Any], path: str | Path) -> Path:
    """Share of the aggregate's energy beyond the smallest client rank, by round (mean over modules and
    seeds): what a rank-r_min client loses, the 'rank collapse' measure."""
    dists, groups = _by_distribution(records)
    fig, axes = _grid(len(dists))
    for ax, dist in zip(axes, dists, strict=True):
        _lines_by_label(
            ax,
            groups[dist],
            lambda m: m.get("spectrum", {}).get("energy_beyond_min_rank"),
            "energy share",
            dist,
            _palette(records),
        )
        ax.set_title(f"energy beyond the smallest rank: {dist}", fontsize=9)
    _legends(fig, axes)
    return _save(fig, Path(path))


def _spaced(items: Sequence[Any], n: int) -> list[Any]:
    """At most ``n`` items, evenly spaced, always the first and the last."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in sorted({round(j * (len(items) - 1) / (n - 1)) for j in range(n)})]


def plot_spectrum_by_round(
    records: Sequence[Any], path: str | Path, kind: str | None = None, max_curves: int = 10
) -> Path:
    """Leading singular values of the aggregate ``dW`` (mean over layers) of module ``kind``, one subplot per
    (method, distribution) at its lowest seed, one line per round, colored by the round the same way in
    every subplot (dark: early, light: late; the first subplot's legend names them). Long runs show at most
    ``max_curves`` evenly spaced rounds (first and last included), so 30 rounds stay readable."""
    plt = _pyplot()
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    chosen: dict[tuple[str, str], Any] = {}
    for r in sorted(records, key=lambda r: r.seed):
        chosen.setdefault((r.label, r.distribution), r)
    keys = sorted(chosen)
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), dpi=110, squeeze=False)
    rounds = [m["round"] for r in chosen.values() for m in r.metrics if "spectrum" in m] or [0]
    norm, cmap = Normalize(min(rounds), max(max(rounds), min(rounds) + 1)), plt.get_cmap("viridis")
    legend = True
    for ax, key in zip(axes.flat, keys, strict=False):
        run = chosen[key]
        spectra = [(m["round"], m["spectrum"]["top_singular_values"]) for m in run.metrics if "spectrum" in m]
        if not spectra:
            ax.set_visible(False)
            continue
        k = kind if kind in spectra[-1][1] else sorted(spectra[-1][1])[0]
        for rnd, sv in _spaced(spectra, max_curves):
            values = sv[k]
            ax.plot(range(1, len(values) + 1), values, color=cmap(norm(rnd)), lw=1, label=f"round {rnd}")
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_title(f"{key[0]} / {key[1]} (seed {run.seed}), {k}", fontsize=8)
        ax.set_xlabel("singular value index")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if legend:
            ax.legend(fontsize=6, ncol=2)
            legend = False
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    return _save(fig, Path(path))


def plot_improvement_by_category(rows: Sequence[Any], metric: str, path: str | Path) -> Path:
    """Improvement over the paired reference per task category, in the metric's own units (``m - b``, or
    ``b - m`` for the loss: > 0 is better; mean over seeds of the held-out clients of that category): one
    subplot per distribution, one bar per method. Absolute, not relative: a category whose baseline scores
    near 0 would dominate a relative plot with a few examples."""
    plt = _pyplot()
    rows = [r for r in rows if r.category_gain.get(metric)]
    dists = sorted({r.distribution for r in rows}) or ["-"]
    cats = sorted({c for r in rows for c in r.category_gain[metric]}, reverse=True)
    height = max(3.5, 0.22 * len(cats) * max(1, len({r.label for r in rows})) ** 0.5 + 1.5)
    fig, axes = plt.subplots(
        1, len(dists), figsize=(5.5 * len(dists), height), dpi=110, squeeze=False, sharey=True
    )
    for ax, dist in zip(axes[0], dists, strict=True):
        group = [r for r in rows if r.distribution == dist]
        width = 0.8 / max(1, len(group))
        for j, r in enumerate(group):
            ys = [i + j * width for i in range(len(cats))]
            ax.barh(ys, [r.category_gain[metric].get(c, 0.0) for c in cats], height=width, label=r.label)
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(cats))])
        ax.set_yticklabels([c[:40] for c in cats], fontsize=6)
        ax.axvline(0, color="k", lw=0.6)
        ax.set_xlabel(f"improvement in {metric} over the reference (> 0 better)")
        ax.set_title(f"by category: {dist}", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=7)
    return _save(fig, Path(path))


def comparison_plots(records: Sequence[Any], rows: Sequence[Any], out: str | Path) -> list[Path]:
    """Every plot of a comparison report (see :mod:`flexlora.report`), written under ``out``."""
    out = Path(out)
    paths = []
    for key in ("loss", "tf_argmax_rougeL", "rougeL", "rougeL_unstemmed"):
        if any(m.get("eval", {}).get(key) is not None for r in records for m in r.metrics if m.get("round")):
            paths.append(plot_metric_by_round_grid(records, key, out / f"{key}_by_round.png"))
    for metric in ("loss", "rougeL", "rougeL_unstemmed"):
        if any(r.category_gain.get(metric) for r in rows):
            paths.append(
                plot_improvement_by_category(rows, metric, out / f"improvement_by_category_{metric}.png")
            )
    if any("spectrum" in m for r in records for m in r.metrics):
        paths.append(plot_spectrum_by_round(records, out / "spectrum_by_round.png"))
        paths.append(plot_energy_beyond_min_rank(records, out / "energy_beyond_min_rank.png"))
    return paths


def plot_gap_by_budget(gaps: Sequence[Any], metric_name: str, path: str | Path) -> Path:
    """The regime curve (:mod:`flexlora.regime`): per contrast, the seed-level gap against the swept value
    (its number, else the point's name), with t-based 95% CI bars; a point with one paired seed is a hollow
    marker without a bar, one with none is left out."""
    plt = _pyplot()
    points = list(dict.fromkeys(g.point for g in gaps))
    numeric = all(g.x is not None for g in gaps)
    where = {p: (next(g.x for g in gaps if g.point == p) if numeric else i) for i, p in enumerate(points)}
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.axhline(0.0, color="0.5", lw=0.8)
    for n, label in enumerate(dict.fromkeys(g.label for g in gaps)):
        rows = [g for g in gaps if g.label == label]
        tested = [g for g in rows if g.test is not None]
        shift = 1 + 0.03 * (n - 0.5)  # keep the bars of two contrasts apart

        def x(g, shift=shift, n=n):
            return where[g.point] * shift if numeric else where[g.point] + 0.1 * n

        xs = [x(g) for g in tested]
        means = [g.test.mean for g in tested]
        bars = [[g.test.mean - g.test.ci[0] for g in tested], [g.test.ci[1] - g.test.mean for g in tested]]
        name, color = f"{label} - {rows[0].reference}", f"C{n}"
        if tested:
            ax.errorbar(xs, means, yerr=bars, marker="o", capsize=3, color=color, label=name)
        one = [g for g in rows if g.test is None and g.diffs]
        if one:
            xs = [x(g) for g in one]
            ax.scatter(
                xs, [g.diffs[0] for g in one], facecolors="none", edgecolors=color, label=f"{name}, one seed"
            )
    if numeric:
        values = [v for v in where.values() if v > 0]
        if len(values) == len(where) and max(values) >= 4 * min(values):
            ax.set_xscale("log", base=2)
        ax.set_xticks(list(where.values()), [f"{v:g}" for v in where.values()])
        ax.set_xlabel(points[0].split("=", 1)[0] + " (swept)")
    else:
        ax.set_xticks(range(len(points)), points)
        ax.set_xlabel("sweep point")
    ax.set_ylabel(f"gap in {metric_name} (higher rank - r8)")
    ax.set_title(f"{metric_name}: rank gap against budget (95% CI over seeds)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:  # a sweep just started
        ax.text(0.5, 0.5, "no paired seed yet", transform=ax.transAxes, ha="center", color="0.4")
    return _save(fig, Path(path))
