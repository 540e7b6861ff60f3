"""Tables of finished runs: the paper's comparison, paired by seed, with seed-level statistics.

For each run (a cell of :mod:`flexlora.compare`, or any run directory) the score of a metric is the mean of
its held-out evaluations over the last ``last`` evaluated rounds (``rougeL``: the rounds that have it, by
default only the last one), overall and per held-out client. Rows are (label, distribution); each holds
the seeds that finished.

* **mean and SD over seeds** of each metric.
* **Paired difference to a reference** at the same seed (same held-out clients, sampled clients and
  batches): ``d_s = m_s - b_s`` and the paper's relative improvement (Table 10) ``rel_s = 100 (m_s - b_s) /
  b_s`` (``100 (b_s - m_s) / b_s`` for the loss, so positive is better for all). References: ``slora+flexlora``
  -> ``slora``; ``X@RANK`` -> ``X``; every other heterogeneous method -> ``fedit`` (``--baseline``); all at
  ``homo``. With ``against=METHOD`` every row is paired instead with ``METHOD`` at its own distribution.
* **Primary evidence: seed-level tests** (:mod:`flexlora.stats`): the mean of ``d_s`` with its t-based 95%
  CI, the paired t-test and the exact sign-flip test over seeds, each Holm-adjusted over the rows of its
  table (one table per metric).
* **Secondary**: the sign-flip test over the per-(seed, client) differences, which treats held-out clients
  as independent units and so ignores the training noise they share; labelled as such, not adjusted.

Metrics (:data:`METRICS`): ``rougeL`` is the Natural Instructions scorer (:func:`flexlora.rouge.rouge_l`);
``rougeL_unstemmed`` the earlier unstemmed one; ``tf_argmax_rougeL`` the Rouge-L of the teacher-forced
argmax. Records written before these names (``rougeL`` unstemmed, ``proxy_rougeL``) are read with their
metrics renamed (:func:`normalize_eval`); they have no NI-scorer Rouge-L, and the tables say so.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexlora.core.safe_load import load_json, load_yaml_file
from flexlora.methods import DEFAULT_BASELINE, METHODS
from flexlora.progress import advance, finish_phase
from flexlora.stats import SeedTest, SignFlip, holm, mean_sd, seed_test, sign_flip_test

__all__ = [
    "METRICS",
    "Row",
    "RunRecord",
    "baseline_of",
    "reference_of",
    "build_report",
    "collect_runs",
    "keep_records",
    "load_run",
    "normalize_eval",
    "summarize",
    "write_runs",
    "write_tables",
]

METRICS = ("loss", "rougeL", "rougeL_unstemmed", "tf_argmax_rougeL")
LOWER_IS_BETTER = {"loss"}
# what a run's record keeps: its config, identity, provenance, rank placement, per-round metrics and summary
# (no checkpoint, adapter or log): enough for ``flexlora report`` to rebuild every table and plot
RECORD_FILES = ("config.yaml", "cell.json", "run.json", "assignment.json", "metrics.jsonl", "summary.json")


def normalize_eval(ev: dict[str, Any]) -> dict[str, Any]:
    """Rename, in place, the metrics of an evaluation written before the NI scorer (it has no
    ``rougeL_unstemmed`` key): its ``rougeL`` was the unstemmed one and becomes ``rougeL_unstemmed``;
    ``proxy_rougeL`` becomes ``tf_argmax_rougeL``. The same renaming applies to its per-client and
    per-category entries. Newer evaluations pass unchanged."""
    if "rougeL_unstemmed" in ev:
        return ev
    parts = [ev, *(ev.get("per_client") or {}).values(), *(ev.get("per_category") or {}).values()]
    for part in parts:
        if "rougeL" in part:
            part["rougeL_unstemmed"] = part.pop("rougeL")
        if "proxy_rougeL" in part:
            part["tf_argmax_rougeL"] = part.pop("proxy_rougeL")
    return ev


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class RunRecord:
    """One finished run: who it is (label, distribution, seed) and its scores.

    ``scores[metric]``: the metric averaged over the last evaluations (``None`` if never measured);
    ``per_client[metric][client]`` and ``per_category[metric][category]`` likewise.
    """

    run_dir: Path
    label: str
    distribution: str
    seed: int
    rounds: int
    metrics: list[dict[str, Any]]
    scores: dict[str, float | None] = field(default_factory=dict)
    per_client: dict[str, dict[str, float]] = field(default_factory=dict)
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)


def _identity(run_dir: Path, config: Mapping[str, Any]) -> tuple[str, str, int]:
    cell = run_dir / "cell.json"
    if cell.is_file():
        c = load_json(cell)
        return c["label"], c["distribution"], int(c["seed"])
    fed = config["federation"]
    dist = fed["distribution"]
    if isinstance(dist, list):
        names = sorted({str(t) for t in dist})
        dist = names[0] if len(names) == 1 else "+".join(names)
    label = fed["method"]
    if dist not in ("homo", "uniform", "heavy-tail-light", "heavy-tail-strong", "normal") and "+" not in dist:
        label = f"{label}@{dist}"
    return label, dist, int(fed["seed"])


def _average(evals: Sequence[Mapping[str, Any]], metric: str) -> tuple[float | None, dict, dict]:
    rows = [e for e in evals if e.get(metric) is not None]
    if not rows:
        return None, {}, {}
    overall = sum(e[metric] for e in rows) / len(rows)
    out = []
    for part in ("per_client", "per_category"):
        acc: dict[str, list[float]] = {}
        for e in rows:
            for key, s in (e.get(part) or {}).items():
                if s.get(metric) is not None:
                    acc.setdefault(key, []).append(s[metric])
        out.append({k: sum(v) / len(v) for k, v in acc.items() if len(v) == len(rows)})
    return overall, out[0], out[1]


def load_run(run_dir: str | Path, last: int = 1, finished_only: bool = True) -> RunRecord | None:
    """Read a run directory; ``None`` if it has not finished (``finished_only``) or has no evaluation.

    Args:
        last: average each metric over the last ``last`` evaluations that have it.
    """
    run_dir = Path(run_dir)
    config = load_yaml_file(run_dir / "config.yaml")
    rounds = int(config["federation"]["rounds"])
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    metrics = [load_json(x.encode(), str(path)) for x in path.read_text().splitlines() if x.strip()]
    for m in metrics:
        if isinstance(m.get("eval"), dict):
            normalize_eval(m["eval"])
    done = max((m["round"] for m in metrics), default=0)
    if finished_only and done < rounds:
        return None
    label, dist, seed = _identity(run_dir, config)
    record = RunRecord(run_dir, label, dist, seed, done, metrics)
    evaluated = [m["eval"] for m in metrics if m.get("round", 0) > 0 and "eval" in m]
    for metric in METRICS:
        with_metric = [e for e in evaluated if e.get(metric) is not None][-last:]
        score, clients, categories = _average(with_metric, metric)
        record.scores[metric] = score
        record.per_client[metric] = clients
        record.per_category[metric] = categories
    return record


def collect_runs(paths: Sequence[str | Path], last: int = 1) -> tuple[list[RunRecord], dict[str, Any]]:
    """Finished runs under ``paths`` (run directories, or directories holding them, e.g. a comparison's
    ``OUT``), and the comparison plan of the first path that has a ``plan.json`` (``{}`` if none).

    A (label, distribution, seed) found more than once is taken from the first path that has it, like the
    plan, so new runs listed before an archive of records (:func:`keep_records`) replace their archived
    copies and their comparison's plan replaces the archive's.
    """
    records, plan, seen, cells = [], {}, set(), set()
    for p in map(Path, paths):
        if not plan and (p / "plan.json").is_file():
            plan = load_json(p / "plan.json")
        dirs = [p] if (p / "config.yaml").is_file() else sorted(x.parent for x in p.rglob("config.yaml"))
        for d in dirs:
            if d.resolve() in seen or d.name == "checkpoint":
                continue
            seen.add(d.resolve())
            record = load_run(d, last=last)
            advance()  # the command's progress, if any
            if record is None or (key := (record.label, record.distribution, record.seed)) in cells:
                continue
            cells.add(key)
            records.append(record)
    finish_phase()
    return records, plan


def keep_records(records: Sequence[RunRecord], plan: Mapping[str, Any], out: Path) -> Path:
    """Copy each run's small files (``RECORD_FILES``: 100-200 KB a run, no checkpoint or adapter) to
    ``out/records/<label>/<distribution>/seed<s>/``, with the comparison's ``plan.json``, replacing what was
    there: ``flexlora report out/records`` rebuilds the same tables and plots, so the evidence behind
    committed tables outlives the run directories."""
    dest, tmp = out / "records", out / "records.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for r in records:
        cell = tmp / r.label / r.distribution / f"seed{r.seed}"
        cell.mkdir(parents=True)
        for name in RECORD_FILES:
            if (r.run_dir / name).is_file():
                shutil.copy2(r.run_dir / name, cell / name)
    if plan:
        (tmp / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


# ---------------------------------------------------------------------------------------------- the table
def baseline_of(label: str, default: str = DEFAULT_BASELINE) -> str | None:
    """The homogeneous baseline a row is compared with: ``X`` for ``X@RANK``, else the registered method's
    :attr:`~flexlora.methods.Method.baseline` (``None`` for the baselines themselves; ``default`` for the
    other methods and for labelled variants)."""
    if "@" in label:
        return label.split("@", 1)[0]
    base = METHODS[label].baseline if label in METHODS else "default"
    return default if base == "default" else base


def reference_of(
    label: str, distribution: str, baseline: str = DEFAULT_BASELINE, against: str | None = None
) -> tuple[str, str] | None:
    """The ``(label, distribution)`` a row is paired with: its homogeneous baseline at ``homo``, or with
    ``against`` that method at the row's distribution (``None``: the row is a reference itself)."""
    if against is not None:
        return None if label == against else (against, distribution)
    base = baseline_of(label, baseline)
    return (base, "homo") if base else None


def _gain(metric: str, m: float, b: float) -> float:
    """``m - b`` oriented so that > 0 is better (``b - m`` for the loss)."""
    return (b - m) if metric in LOWER_IS_BETTER else (m - b)


def _improvement(metric: str, m: float, b: float) -> float:
    return math.nan if b == 0 else 100 * _gain(metric, m, b) / abs(b)


@dataclass
class Row:
    """One (label, distribution) of the table; per metric, over the seeds paired with the reference."""

    label: str
    distribution: str
    seeds: list[int]
    baseline: str | None  # the label of the paired reference
    reference_distribution: str | None
    values: dict[str, list[float]]  # metric -> per seed
    rel: dict[str, list[float]] = field(default_factory=dict)  # metric -> per paired seed, %
    diff: dict[str, list[float]] = field(default_factory=dict)  # metric -> m_s - b_s per paired seed
    better: dict[str, int] = field(default_factory=dict)  # metric -> paired seeds where the row is better
    seed_diff: dict[str, SeedTest] = field(default_factory=dict)  # metric -> seed-level test of diff
    rel_ci: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> t 95% CI of rel
    holm_t: dict[str, float] = field(default_factory=dict)  # metric -> Holm-adjusted seed t-test p
    holm_sign: dict[str, float] = field(default_factory=dict)  # metric -> Holm-adjusted seed sign-flip p
    clients: dict[str, SignFlip] = field(default_factory=dict)  # metric -> secondary (seed, client) test
    category_rel: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # metric -> category -> mean rel %
    category_gain: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # metric -> category -> mean gain in metric units, > 0 better


def _pair(row: Row, metric: str, runs: Mapping[int, RunRecord], base: Mapping[int, RunRecord]) -> None:
    """Fill ``row``'s paired statistics of ``metric`` from the seeds both ``runs`` and ``base`` scored."""
    paired = [
        s for s in row.seeds if s in base and None not in (runs[s].scores[metric], base[s].scores[metric])
    ]
    if not paired:
        return
    m = {s: runs[s].scores[metric] for s in paired}
    b = {s: base[s].scores[metric] for s in paired}
    row.rel[metric] = [_improvement(metric, m[s], b[s]) for s in paired]
    row.diff[metric] = [m[s] - b[s] for s in paired]
    row.better[metric] = sum(_gain(metric, m[s], b[s]) > 0 for s in paired)
    row.seed_diff[metric] = seed_test(row.diff[metric])
    row.rel_ci[metric] = seed_test(row.rel[metric]).ci
    pairs = [
        runs[s].per_client[metric][c] - base[s].per_client[metric][c]
        for s in paired
        for c in sorted(runs[s].per_client[metric])
        if c in base[s].per_client[metric]
    ]
    if pairs:
        row.clients[metric] = sign_flip_test(pairs)
    cats: dict[str, list[tuple[float, float]]] = {}
    for s in paired:
        for cat, v in runs[s].per_category[metric].items():
            if cat in base[s].per_category[metric]:
                bc = base[s].per_category[metric][cat]
                cats.setdefault(cat, []).append((_improvement(metric, v, bc), _gain(metric, v, bc)))
    row.category_rel[metric] = {c: sum(r for r, _ in v) / len(v) for c, v in sorted(cats.items())}
    row.category_gain[metric] = {c: sum(g for _, g in v) / len(v) for c, v in sorted(cats.items())}


def _adjust(rows: Sequence[Row]) -> None:
    """Holm-adjust, per metric (one table each), the seed-level t-test and sign-flip p-values of the rows."""
    for metric in METRICS:
        tested = [r for r in rows if metric in r.seed_diff]
        for attr, key in (("holm_t", "p_t"), ("holm_sign", "p_sign")):
            adjusted = holm([getattr(r.seed_diff[metric], key) for r in tested])
            for r, p in zip(tested, adjusted, strict=True):
                getattr(r, attr)[metric] = p


def summarize(
    records: Sequence[RunRecord], baseline: str = DEFAULT_BASELINE, against: str | None = None
) -> list[Row]:
    """Rows of the comparison (ordered by distribution, then label as first seen), each paired with its
    reference (:func:`reference_of`), with Holm-adjusted seed-level p-values per metric."""
    by_key: dict[tuple[str, str], dict[int, RunRecord]] = {}
    for r in records:
        by_key.setdefault((r.label, r.distribution), {})[r.seed] = r
    rows = []
    for (label, dist), runs in by_key.items():
        seeds = sorted(runs)
        ref = reference_of(label, dist, baseline, against)
        base_label, base_dist = ref or (None, None)
        row = Row(label, dist, seeds, base_label, base_dist, {})
        for metric in METRICS:
            row.values[metric] = [runs[s].scores[metric] for s in seeds if runs[s].scores[metric] is not None]
            if ref:
                _pair(row, metric, runs, by_key.get(ref, {}))
        rows.append(row)
    order = {
        d: i for i, d in enumerate(("homo", "uniform", "heavy-tail-light", "normal", "heavy-tail-strong"))
    }
    rows = sorted(rows, key=lambda r: (order.get(r.distribution, len(order)), r.distribution))
    _adjust(rows)
    return rows


DIGITS = {"loss": 4, "rougeL": 2, "rougeL_unstemmed": 2, "tf_argmax_rougeL": 2}
NAMES = {
    "loss": "loss",
    "rougeL": "Rouge-L (NI scorer)",
    "rougeL_unstemmed": "Rouge-L (unstemmed)",
    "tf_argmax_rougeL": "teacher-forced argmax Rouge-L",
}
LEGEND = (
    "Seed-level (primary): difference and relative improvement are mean [t-based 95% CI] over the paired "
    "seeds; *better*: seeds where the method beats its reference; *p t*: paired t-test over seeds; *p sign*: "
    "exact sign-flip test over seeds (smallest possible value 2/2^seeds); *Holm*: adjusted over the rows of "
    "each metric's table. Secondary, not adjusted: *p clients* is the sign-flip test over (seed, held-out client) "
    "pairs, which treats clients as independent units and ignores the training noise they share (n pairs; "
    "MC: Monte Carlo, with its number of draws)."
)
METRIC_NOTES = {
    "rougeL": "*Rouge-L (NI scorer)*: the Natural Instructions scorer (rouge-score, Porter stemmer for "
    "English, cross-lingual tokenisation otherwise); records written before it was added lack it.",
    "rougeL_unstemmed": "*Rouge-L (unstemmed)*: rouge-score with an all-script tokenizer and no stemming, the "
    "only Rouge-L of records written before the NI scorer; not comparable with published NI scores.",
    "tf_argmax_rougeL": "*teacher-forced argmax Rouge-L*: unstemmed Rouge-L of the argmax of the teacher-forced logits at "
    "the response positions on the held-out clients (called 'proxy Rouge-L' in older records); a cheap "
    "diagnostic, not the paper code's proxy.",
}


def _fmt(values: Sequence[float], digits: int) -> str:
    if not values:
        return "-"
    m, sd = mean_sd(values)
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def _ci(mean: float, ci: tuple[float, float], digits: int) -> str:
    if math.isnan(ci[0]):
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def _p(p: float | None) -> str:
    """An exact or parametric p-value: 3 decimals, or 2 significant digits below 0.001."""
    if p is None or math.isnan(p):
        return "-"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _p_clients(test: SignFlip | None) -> str:
    if test is None or math.isnan(test.p):
        return "-"
    if test.exact:
        return f"{_p(test.p)} (n={test.n}, exact)"
    if test.at_floor:
        return f"≤ 1/{test.draws + 1} (n={test.n}, MC {test.draws} draws, none as extreme)"
    return f"{_p(test.p)} (n={test.n}, MC {test.draws} draws)"


def _metric_notes(rows: Sequence[Row]) -> list[str]:
    """What each Rouge-L metric is, and in how many runs it is when some lack it (e.g. records older than
    the NI scorer)."""
    runs = sum(len(r.seeds) for r in rows)
    notes = []
    for m, note in METRIC_NOTES.items():
        have = sum(len(r.values[m]) for r in rows)
        notes.append(note + ("" if have == runs else f" In {have} of {runs} runs here."))
    return notes


def markdown_table(rows: Sequence[Row], against: str | None = None) -> str:
    """The results: absolute scores (mean ± SD over seeds), then per metric the paired comparison with the
    reference, seed-level first (difference and relative improvement with 95% CI, seeds better, t-test and
    exact sign-flip p with their Holm adjustment), then the secondary client-level p."""
    shown = [m for m in METRICS if any(r.values[m] for r in rows)]
    head = ["method", "distribution", "seeds", *(NAMES[m] for m in shown)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.label, r.distribution, str(len(r.seeds))] + [_fmt(r.values[m], DIGITS[m]) for m in shown]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"* {n}" for n in _metric_notes(rows)]
    if any(r.rel for r in rows):
        lines += ["", LEGEND]
    for m in shown:
        paired = [r for r in rows if r.rel.get(m)]
        if not paired:
            continue
        better = "lower" if m in LOWER_IS_BETTER else "higher"
        versus = f"{against} at the same distribution" if against else "the paired homogeneous baseline"
        lines += [
            "",
            f"**{NAMES[m]}** vs {versus} ({better} is better; relative improvement > 0 is better)",
            "",
            "| method | distribution | vs | seeds | difference [95% CI] | rel. impr. % [95% CI] | better "
            "| p t | Holm p t | p sign | Holm p sign | secondary: p clients |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in paired:
            t = r.seed_diff[m]
            rel_mean = mean_sd(r.rel[m])[0]
            cells = [
                r.label,
                r.distribution,
                f"{r.baseline} ({r.reference_distribution})",
                str(len(r.rel[m])),
                _ci(t.mean, t.ci, DIGITS[m]),
                _ci(rel_mean, r.rel_ci[m], 2),
                f"{r.better[m]}/{len(r.rel[m])}",
                _p(t.p_t),
                _p(r.holm_t.get(m)),
                _p(t.p_sign),
                _p(r.holm_sign.get(m)),
                _p_clients(r.clients.get(m)),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_fields(m: str) -> list[str]:
    return [
        f"{m}_{k}"
        for k in (
            "mean", "sd", "diff_mean", "diff_sd", "diff_ci_low", "diff_ci_high", "rel_mean", "rel_sd",
            "rel_ci_low", "rel_ci_high", "seeds_better", "p_t_seeds", "p_t_seeds_holm", "p_sign_seeds",
            "p_sign_seeds_holm", "p_clients", "p_clients_pairs", "p_clients_draws", "p_clients_hits",
        )
    ]  # fmt: skip


def _csv_row(r: Row, m: str) -> dict[str, Any]:
    t, c = r.seed_diff.get(m), r.clients.get(m)
    nan2 = (math.nan, math.nan)
    values = [
        *mean_sd(r.values[m]),
        *mean_sd(r.diff.get(m, [])),
        *(t.ci if t else nan2),
        *mean_sd(r.rel.get(m, [])),
        *r.rel_ci.get(m, nan2),
        r.better.get(m, ""),
        t.p_t if t else "",
        r.holm_t.get(m, ""),
        t.p_sign if t else "",
        r.holm_sign.get(m, ""),
        c.p if c else "",
        c.n if c else "",
        c.draws if c else "",
        c.hits if c else "",
    ]
    return dict(zip(_csv_fields(m), values, strict=True))


def write_tables(rows: Sequence[Row], out: Path, against: str | None = None) -> list[Path]:
    """``results.md``, ``results.csv`` (one row per (method, distribution)), ``per_category.csv``; the
    per-run numbers go to ``runs.csv`` (:func:`write_runs`)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown_table(rows, against))
    fields = ["method", "distribution", "seeds", "baseline", "baseline_distribution"]
    fields += [f for m in METRICS for f in _csv_fields(m)]
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            rec: dict[str, Any] = {
                "method": r.label,
                "distribution": r.distribution,
                "seeds": " ".join(map(str, r.seeds)),
                "baseline": r.baseline or "",
                "baseline_distribution": r.reference_distribution or "",
            }
            for m in METRICS:
                rec.update(_csv_row(r, m))
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()})
    with open(out / "per_category.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["method", "distribution", "baseline", "metric", "category", "rel_improvement_pct", "gain"]
        )
        for r in rows:
            for m, cats in r.category_rel.items():
                for cat, v in cats.items():
                    w.writerow(
                        [
                            r.label,
                            r.distribution,
                            r.baseline,
                            m,
                            cat,
                            f"{v:.4f}",
                            f"{r.category_gain[m][cat]:.4f}",
                        ]
                    )
    return [out / "results.md", out / "results.csv", out / "per_category.csv"]


def _spectrum_columns(record: RunRecord) -> dict[str, float]:
    """The last recorded spectrum of a run's aggregate update: per module kind, its leading singular value
    and the norm of its top 16 (means over layers), and the share of energy beyond the smallest client rank
    (mean over all target modules, every kind together)."""
    last = next((m["spectrum"] for m in reversed(record.metrics) if "spectrum" in m), None)
    if last is None:
        return {}
    out = {}
    for kind, values in sorted(last.get("top_singular_values", {}).items()):
        out[f"{kind}_top_sv"] = values[0] if values else math.nan
        out[f"{kind}_norm_top16"] = math.sqrt(sum(v * v for v in values[:16]))
    out["energy_beyond_min_rank_all_modules"] = last.get("energy_beyond_min_rank", math.nan)
    return out


def write_runs(
    records: Sequence[RunRecord], out: Path, baseline: str = DEFAULT_BASELINE, against: str | None = None
) -> Path:
    """``runs.csv``: one row per run (the per-seed numbers behind the tables): its scores, per metric the
    difference to its reference at the same seed, how many held-out clients it beats the reference on
    (``k/n``), the relative improvement over it (%, > 0 better), and the spectrum of its final aggregate
    (:func:`_spectrum_columns`)."""
    by_cell = {(r.label, r.distribution, r.seed): r for r in records}
    rows = []
    for r in sorted(records, key=lambda r: (r.label, r.distribution, r.seed)):
        ref = reference_of(r.label, r.distribution, baseline, against)
        b = by_cell.get((*ref, r.seed)) if ref else None
        row: dict[str, Any] = {"method": r.label, "distribution": r.distribution, "seed": r.seed}
        row["reference"] = f"{ref[0]} ({ref[1]})" if b else ""
        for m in METRICS:
            row[m] = r.scores[m]
            paired = b is not None and None not in (r.scores[m], b.scores[m])
            row[f"{m}_diff"] = r.scores[m] - b.scores[m] if paired else None
            row[f"{m}_rel_pct"] = _improvement(m, r.scores[m], b.scores[m]) if paired else None
            common = [c for c in r.per_client[m] if b is not None and c in b.per_client[m]]
            wins = sum(_gain(m, r.per_client[m][c], b.per_client[m][c]) > 0 for c in common) if b else 0
            row[f"{m}_clients_better"] = f"{wins}/{len(common)}" if paired and common else ""
        rows.append({**row, **_spectrum_columns(r)})
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "runs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow(
                {
                    k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                    for k, v in row.items()
                }
            )
    return out / "runs.csv"


def build_report(
    paths: Sequence[str | Path],
    out: str | Path,
    baseline: str = DEFAULT_BASELINE,
    last: int = 1,
    plots: bool = True,
    against: str | None = None,
    records_too: bool = False,
) -> dict[str, Any]:
    """Tables and plots of the finished runs under ``paths``, written to ``out``; ``against``: pair every
    row with that method at the same distribution instead of with the homogeneous baseline;
    ``records_too``: also keep the runs' records in ``out/records`` (:func:`keep_records`).

    Returns:
        ``{"rows", "files", "runs", "planned"}``: the table rows, the written files, how many finished runs
        went in and how many cells the comparison planned (0 without ``plan.json``).
    """
    from flexlora import plots as P

    out = Path(out)
    records, plan = collect_runs(paths, last=last)
    if not records:
        raise ValueError(f"no finished run under {', '.join(map(str, paths))}")
    rows = summarize(records, baseline, against)
    files = write_tables(rows, out, against) + [write_runs(records, out, baseline, against)]
    planned = len(plan.get("cells", []))
    status = f"{len(records)} finished runs" + (f" of {planned} planned cells" if planned else "")
    (out / "results.md").write_text(
        f"<!-- {status}; scores: mean of the last {last} evaluation(s) -->\n"
        + (out / "results.md").read_text()
    )
    if plots:
        files += P.comparison_plots(records, rows, out)
    if records_too:
        files.append(keep_records(records, plan, out))
    return {"rows": rows, "files": files, "runs": len(records), "planned": planned}
