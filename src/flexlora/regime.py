"""The regime curve: how a homogeneous method's gain from a higher rank moves with the training budget.

A sweep (``flexlora compare`` with ``compare.sweep``) writes one comparison directory per point,
``DIR/<key>=<value>[,...]`` (``DIR/steps=8``). At every point each ``X@RANK`` cell (``fedit@r200``,
``fedit@r30``) is paired with ``X`` (every client at r8) at the same seed, as in :mod:`flexlora.report`
(:func:`~flexlora.report.summarize`: same held-out clients, sampled clients and batches). Per point and
contrast, on the seed-level differences ``d_s = m_s(X@RANK) - m_s(X)`` of a metric (held-out ``loss`` at
the last evaluation; Rouge-L when the runs have it):

* the mean of ``d_s`` with its t-based 95% CI and the paired t-test (:func:`flexlora.stats.seed_test`);
* Holm's adjustment (:func:`flexlora.stats.holm`) over every tested row of the metric's table, i.e. over
  the points and contrasts together;
* **not testable** where fewer than 2 seeds are paired (runs still going, or not started): no interval and
  no test, and the row stays out of the Holm family.

Files: ``regime.md`` (one table per metric), ``regime.csv`` (one row per metric, point and contrast, with the
per-seed differences) and ``regime_<metric>.png`` (the gap against the swept value, with CI bars).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flexlora.core.safe_load import load_yaml_file
from flexlora.report import DIGITS, LOWER_IS_BETTER, NAMES, Row, RunRecord, collect_runs, summarize
from flexlora.stats import SeedTest, holm

__all__ = ["Gap", "build_regime", "regime_gaps", "sweep_dirs", "write_regime"]

ALPHA = 0.05


@dataclass
class Gap:
    """One row of the curve: ``label`` (``fedit@r200``) against ``reference`` (``fedit``) at one point.

    ``x``: the point's swept value when it is one number (``steps=8`` -> 8); ``examples``: examples trained
    on per run (rounds x clients per round x steps x batch size x accumulation; ``None`` when unknown);
    ``done``: finished and planned runs of the contrast and of its reference here; ``diffs``: the per-seed
    differences; ``test``: their seed-level test, ``None`` below 2 paired seeds.
    """

    metric: str
    point: str
    x: float | None
    examples: int | None
    label: str
    reference: str
    done: tuple[int, int, int, int]  # (label finished, label planned, reference finished, reference planned)
    diffs: tuple[float, ...]
    test: SeedTest | None
    holm: float = math.nan


def sweep_dirs(sweep: str | Path) -> list[tuple[str, Path]]:
    """The points of a sweep directory: ``(name, path)`` of its ``key=value`` subdirectories, ordered by the
    swept value when every point has one number, else by name.

    Raises:
        ValueError: ``sweep`` is not a directory or holds no ``key=value`` directory.
    """
    if not Path(sweep).is_dir():
        raise ValueError(f"{sweep}: not a directory")
    points = sorted((p.name, p) for p in Path(sweep).iterdir() if p.is_dir() and "=" in p.name)
    if not points:
        raise ValueError(f"{sweep}: no sweep point (a key=value directory, e.g. steps=8) in it")
    if all(_value(n) is not None for n, _ in points):
        points.sort(key=lambda p: _value(p[0]))
    return points


def _value(name: str) -> float | None:
    """The number of a one-axis point name (``steps=8`` -> 8.0); ``None`` otherwise."""
    if "," in name:
        return None
    try:
        return float(name.split("=", 1)[1])
    except ValueError:
        return None


def _examples(point: Path) -> int | None:
    """Examples a run of this point trains on, from the first cell config found (``None`` by epochs)."""
    config = next(iter(sorted(point.glob("cells/*/*/*/config.yaml"))), None)
    if config is None:
        return None
    cfg = load_yaml_file(config)
    fed, train = cfg.get("federation", {}), cfg.get("train", {})
    parts = [fed.get("rounds"), fed.get("clients_per_round"), train.get("steps"), train.get("batch_size")]
    parts.append(train.get("grad_accum", 1))
    return math.prod(parts) if all(isinstance(v, int) for v in parts) else None


@dataclass
class _Point:
    name: str
    path: Path
    records: list[RunRecord]
    planned: list[str]  # the label of every planned cell
    rows: dict[str, Row]

    def done(self, label: str) -> tuple[int, int]:
        return sum(r.label == label for r in self.records), self.planned.count(label)


def _read_point(name: str, path: Path, last: int) -> _Point:
    records, plan = collect_runs([path], last=last)
    planned = [str(c.get("label", "")) for c in plan.get("cells", [])]
    return _Point(name, path, records, planned, {r.label: r for r in summarize(records)})


def regime_gaps(sweep: str | Path, metrics: Sequence[str] | None = None, last: int = 1) -> list[Gap]:
    """Every (metric, point, ``X@RANK`` contrast) of a sweep, with Holm-adjusted p per metric (module doc).

    ``metrics``: default ``loss``, plus ``rougeL`` when some run has it. Contrasts are the ``X@RANK`` labels
    planned (``plan.json``) or finished at any point, so a point where they have not run yet says so.
    """
    points = [_read_point(name, path, last) for name, path in sweep_dirs(sweep)]
    if metrics is None:
        rouge = any(r.scores.get("rougeL") is not None for p in points for r in p.records)
        metrics = ["loss", "rougeL"] if rouge else ["loss"]
    labels = dict.fromkeys(x for p in points for x in [*p.planned, *p.rows] if "@" in x)
    gaps = []
    for metric in metrics:
        table = []
        for p in points:
            for label in labels:
                reference = label.split("@", 1)[0]
                row = p.rows.get(label)
                diffs = tuple(row.diff.get(metric, ())) if row else ()
                test = row.seed_diff[metric] if len(diffs) >= 2 else None
                done = (*p.done(label), *p.done(reference))
                table.append(
                    Gap(
                        metric, p.name, _value(p.name), _examples(p.path), label, reference, done, diffs, test
                    )
                )
        for gap, adjusted in zip(
            table, holm([g.test.p_t if g.test else math.nan for g in table]), strict=True
        ):
            gap.holm = adjusted
        gaps += table
    return gaps


# ---------------------------------------------------------------------------------------------- output
def _verdict(g: Gap) -> str:
    if g.test is None:
        return f"not testable ({len(g.diffs)} paired seed(s), 2 needed)"
    if math.isnan(g.holm) or g.holm >= ALPHA:
        return f"no difference shown (Holm p >= {ALPHA})"
    higher_better = (g.test.mean < 0) == (g.metric in LOWER_IS_BETTER)
    return f"{g.label.split('@', 1)[1] if higher_better else 'r8'} better (Holm p < {ALPHA})"


def _gap(g: Gap) -> str:
    d = DIGITS[g.metric]
    if g.test is None:
        return f"{g.diffs[0]:+.{d}f} (one seed)" if g.diffs else "-"
    low, high = g.test.ci
    return f"{g.test.mean:+.{d}f} [{low:+.{d}f}, {high:+.{d}f}]"


def _p(p: float) -> str:
    return "-" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def markdown(gaps: Sequence[Gap]) -> str:
    """One table per metric: point, examples per run, contrast, runs done, gap with 95% CI, p, Holm p."""
    lines = []
    for metric in dict.fromkeys(g.metric for g in gaps):
        rows = [g for g in gaps if g.metric == metric]
        sense = "< 0" if metric in LOWER_IS_BETTER else "> 0"
        lines += [
            f"**{NAMES[metric]}**: gap = higher rank - r8 at the same seed ({sense}: the higher rank is "
            "better), mean [t-based 95% CI] over the paired seeds; p t: paired t-test over seeds; Holm: "
            f"adjusted over the {sum(g.test is not None for g in rows)} tested row(s) of this table. Runs "
            "done: finished/planned, of the contrast and of its r8 reference.",
            "",
            "| point | examples/run | contrast | runs done | paired seeds | gap [95% CI] | p t | Holm p t "
            "| verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for g in rows:
            a, b, c, d = g.done
            cells = [
                g.point,
                str(g.examples or "-"),
                f"{g.label} - {g.reference}",
                f"{a}/{b}, {c}/{d}",
                str(len(g.diffs)),
                _gap(g),
                _p(g.test.p_t) if g.test else "-",
                _p(g.holm),
                _verdict(g),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_regime(gaps: Sequence[Gap], out: str | Path, plots: bool = True) -> list[Path]:
    """``regime.md``, ``regime.csv`` and, with ``plots``, ``regime_<metric>.png`` in ``out``."""
    from flexlora.plots import plot_gap_by_budget

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = ", ".join(dict.fromkeys(g.point for g in gaps))
    note = f"<!-- points found: {points} (a point not started yet has no directory and is not listed) -->\n"
    (out / "regime.md").write_text(note + markdown(gaps))
    fields = [
        "metric", "point", "x", "examples_per_run", "contrast", "reference", "finished", "planned",
        "reference_finished", "reference_planned", "paired_seeds", "diffs", "gap_mean", "gap_ci_low",
        "gap_ci_high", "p_t", "p_t_holm", "verdict",
    ]  # fmt: skip
    with open(out / "regime.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(fields)
        for g in gaps:
            t = g.test
            stats = (t.mean, *t.ci, t.p_t, g.holm) if t else (math.nan,) * 5
            w.writerow(
                [g.metric, g.point, g.x, g.examples, g.label, g.reference, *g.done, len(g.diffs)]
                + [" ".join(f"{d:.6g}" for d in g.diffs)]
                + ["" if math.isnan(v) else v for v in stats]
                + [_verdict(g)]
            )
    files = [out / "regime.md", out / "regime.csv"]
    if plots:
        for metric in dict.fromkeys(g.metric for g in gaps):
            rows = [g for g in gaps if g.metric == metric]
            files.append(plot_gap_by_budget(rows, NAMES[metric], out / f"regime_{metric}.png"))
    return files


def build_regime(sweep: str | Path, out: str | Path, last: int = 1, plots: bool = True) -> dict:
    """The regime curve of a sweep directory, written to ``out``; returns ``{"gaps", "files"}``."""
    gaps = regime_gaps(sweep, last=last)
    return {"gaps": gaps, "files": write_regime(gaps, out, plots)}
