"""Tables and statistics of finished runs: the paper's comparison, paired by seed and client.

For each run (a cell of :mod:`flexlora.compare`, or any run directory) the score of a metric is the mean of
its held-out evaluations over the last ``last`` evaluated rounds (``rougeL``: the rounds that have it, by
default only the last one), overall and per held-out client. Rows are (label, distribution); each holds
the seeds that finished.

* **mean and SD over seeds** of each metric.
* **Relative improvement over the paired homogeneous baseline** (the paper's Table 10): for seed ``s``,
  ``rel_s = 100 (m_s - b_s) / b_s`` for Rouge-L and the proxy, ``100 (b_s - m_s) / b_s`` for the loss (so
  positive is better for all), with ``b_s`` the baseline at the same seed (same held-out clients, same
  sampled clients and batches); reported as mean and SD over seeds. Baselines: ``slora+flexlora`` ->
  ``slora``; ``X@RANK`` -> ``X``; every other heterogeneous method -> ``fedit`` (``--baseline``); all at
  ``homo`` (every client at r8). With ``against=METHOD`` every row is paired instead with ``METHOD`` at the
  row's own distribution (e.g. FlexLoRA vs HetLoRA under the same ranks): a head-to-head table.
* **Paired sign-flip test** over the per-(seed, client) differences ``d_sc = m_sc - b_sc``: under the null
  hypothesis of no difference each ``d_sc`` is as likely to have either sign, so ``p`` is the share of the
  ``2^n`` sign patterns whose ``|mean|`` reaches the observed one (exact for ``n <= 16``, else
  ``20,000`` seeded random patterns, ``p = (1 + hits) / (1 + draws)``). It treats clients as the units:
  it measures how surely the difference holds on these seeds' held-out clients, not over training
  randomness. The test over the ``n_seeds`` seed-level differences is reported too; with 3 seeds its
  smallest possible ``p`` is 0.25.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flexlora.progress import advance, finish_phase

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
    "mean_sd",
    "sign_flip_test",
    "summarize",
    "write_tables",
]

METRICS = ("loss", "rougeL", "proxy_rougeL")
LOWER_IS_BETTER = {"loss"}
DEFAULT_BASELINE = "fedit"
EXACT_MAX = 16
RESAMPLES = 20_000
# what a run's record keeps: its config, identity, provenance, rank placement, per-round metrics and summary
# (no checkpoint, adapter or log): enough for ``flexlora report`` to rebuild every table and plot
RECORD_FILES = ("config.yaml", "cell.json", "run.json", "assignment.json", "metrics.jsonl", "summary.json")


# ---------------------------------------------------------------------------------------------- statistics
def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample SD (``n - 1``); the SD of one value is undefined (``nan``: an empty CSV field, not a
    spread of 0), and both are ``nan`` for none."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan)


def sign_flip_test(diffs: Sequence[float], resamples: int = RESAMPLES, seed: int = 0) -> float:
    """Two-sided paired sign-flip permutation test of ``mean(diffs) = 0``.

    ``p = P(|mean(e * d)| >= |mean(d)|)`` over independent random signs ``e_i = +-1``: exact (all ``2^n``
    patterns) for ``n <= 16``, else Monte Carlo with ``resamples`` seeded patterns and the ``+1`` correction
    ``(1 + hits) / (1 + resamples)``. ``nan`` for no differences; 1 when all are 0.
    """
    import torch

    n = len(diffs)
    if n == 0:
        return math.nan
    d = torch.tensor(diffs, dtype=torch.float64)
    observed = abs(float(d.mean())) - 1e-12 * (1 + float(d.abs().max()))  # tolerance for ties
    if n <= EXACT_MAX:
        signs = torch.tensor(list(itertools.product((1.0, -1.0), repeat=n)), dtype=torch.float64)  # (2^n, n)
        return float(((signs @ d).abs() / n >= observed).double().mean())
    gen = torch.Generator().manual_seed(seed)
    hits = 0
    for start in range(0, resamples, 5000):
        b = min(5000, resamples - start)
        signs = torch.randint(0, 2, (b, n), generator=gen, dtype=torch.float64) * 2 - 1  # (b, n)
        hits += int(((signs @ d).abs() / n >= observed).sum())
    return (1 + hits) / (1 + resamples)


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
        c = json.loads(cell.read_text())
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
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    rounds = int(config["federation"]["rounds"])
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    metrics = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
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
            plan = json.loads((p / "plan.json").read_text())
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
    """The homogeneous baseline a row is compared with (``None`` for the baselines themselves)."""
    if "@" in label:
        return label.split("@", 1)[0]
    if label == "slora+flexlora":
        return "slora"
    if label in ("fedavg", "fedit", "slora"):
        return None
    return default


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
    """One (label, distribution) of the table."""

    label: str
    distribution: str
    seeds: list[int]
    baseline: str | None  # the label of the paired reference
    reference_distribution: str | None
    values: dict[str, list[float]]  # metric -> per seed
    rel: dict[str, list[float]] = field(default_factory=dict)  # metric -> per paired seed, %
    diff: dict[str, list[float]] = field(default_factory=dict)  # metric -> m_s - b_s per paired seed
    p_clients: dict[str, float] = field(default_factory=dict)  # metric -> sign-flip p over (seed, client)
    p_seeds: dict[str, float] = field(default_factory=dict)
    n_pairs: dict[str, int] = field(default_factory=dict)  # metric -> (seed, client) pairs
    category_rel: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # metric -> category -> mean rel %
    category_gain: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # metric -> category -> mean gain in metric units, > 0 better


def summarize(
    records: Sequence[RunRecord], baseline: str = DEFAULT_BASELINE, against: str | None = None
) -> list[Row]:
    """Rows of the comparison (ordered by distribution, then label as first seen), each paired with its
    reference (:func:`reference_of`)."""
    by_key: dict[tuple[str, str], dict[int, RunRecord]] = {}
    for r in records:
        by_key.setdefault((r.label, r.distribution), {})[r.seed] = r
    rows = []
    for (label, dist), runs in by_key.items():
        seeds = sorted(runs)
        ref = reference_of(label, dist, baseline, against)
        base = by_key.get(ref, {}) if ref else {}
        base_label, base_dist = ref or (None, None)
        row = Row(label, dist, seeds, base_label, base_dist, {})
        for metric in METRICS:
            row.values[metric] = [runs[s].scores[metric] for s in seeds if runs[s].scores[metric] is not None]
            paired = [
                s for s in seeds if s in base and None not in (runs[s].scores[metric], base[s].scores[metric])
            ]
            if not base_label or not paired:
                continue
            row.rel[metric] = [
                _improvement(metric, runs[s].scores[metric], base[s].scores[metric]) for s in paired
            ]
            row.diff[metric] = [runs[s].scores[metric] - base[s].scores[metric] for s in paired]
            if len(paired) > 1:  # one seed-level difference cannot be tested (its p would always be 1)
                row.p_seeds[metric] = sign_flip_test(row.diff[metric])
            pairs = [
                runs[s].per_client[metric][c] - base[s].per_client[metric][c]
                for s in paired
                for c in sorted(runs[s].per_client[metric])
                if c in base[s].per_client[metric]
            ]
            if pairs:
                row.p_clients[metric] = sign_flip_test(pairs)
                row.n_pairs[metric] = len(pairs)
            cats: dict[str, list[tuple[float, float]]] = {}
            for s in paired:
                for cat, v in runs[s].per_category[metric].items():
                    if cat in base[s].per_category[metric]:
                        b = base[s].per_category[metric][cat]
                        cats.setdefault(cat, []).append((_improvement(metric, v, b), _gain(metric, v, b)))
            row.category_rel[metric] = {c: sum(r for r, _ in v) / len(v) for c, v in sorted(cats.items())}
            row.category_gain[metric] = {c: sum(g for _, g in v) / len(v) for c, v in sorted(cats.items())}
        rows.append(row)
    order = {
        d: i for i, d in enumerate(("homo", "uniform", "heavy-tail-light", "normal", "heavy-tail-strong"))
    }
    return sorted(rows, key=lambda r: (order.get(r.distribution, len(order)), r.distribution))


def _fmt(values: Sequence[float], digits: int) -> str:
    if not values:
        return "-"
    m, sd = mean_sd(values)
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def _p(p: float | None) -> str:
    return "-" if p is None or math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else "<0.001")


DIGITS = {"loss": 4, "rougeL": 2, "proxy_rougeL": 2}
NAMES = {"loss": "loss", "rougeL": "Rouge-L", "proxy_rougeL": "proxy Rouge-L"}


def markdown_table(rows: Sequence[Row], against: str | None = None) -> str:
    """The results: absolute scores (mean ± SD over seeds), then per metric the paired comparison with the
    homogeneous baseline (or with ``against`` at the same distribution): difference ``m - b`` and relative
    improvement (mean ± SD over paired seeds), and the sign-flip p-values over (seed, client) pairs and over
    seeds."""
    head = ["method", "distribution", "seeds", *(NAMES[m] for m in METRICS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.label, r.distribution, str(len(r.seeds))] + [_fmt(r.values[m], DIGITS[m]) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    for m in METRICS:
        paired = [r for r in rows if r.rel.get(m)]
        if not paired:
            continue
        better = "lower" if m in LOWER_IS_BETTER else "higher"
        versus = f"{against} at the same distribution" if against else "the paired homogeneous baseline"
        lines += [
            "",
            f"**{NAMES[m]}** vs {versus} ({better} is better; relative improvement > 0 is better)",
            "",
            "| method | distribution | vs | paired seeds | difference | rel. impr. % | p (seed x client) | p (seeds) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in paired:
            p_clients = _p(r.p_clients.get(m)) + (f" (n={r.n_pairs[m]})" if m in r.n_pairs else "")
            cells = [
                r.label,
                r.distribution,
                f"{r.baseline} ({r.reference_distribution})",
                str(len(r.rel[m])),
                _fmt(r.diff[m], DIGITS[m]),
                _fmt(r.rel[m], 2),
                p_clients,
                _p(r.p_seeds.get(m)),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[Row], out: Path, against: str | None = None) -> list[Path]:
    """``results.md``, ``results.csv`` (one row per (method, distribution)), ``per_category.csv``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown_table(rows, against))
    fields = ["method", "distribution", "seeds", "baseline", "baseline_distribution"]
    for m in METRICS:
        fields += [f"{m}_mean", f"{m}_sd", f"{m}_diff_mean", f"{m}_diff_sd", f"{m}_rel_mean", f"{m}_rel_sd"]
        fields += [f"{m}_p_seed_client", f"{m}_pairs", f"{m}_p_seeds"]
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
                rec[f"{m}_mean"], rec[f"{m}_sd"] = mean_sd(r.values[m])
                rec[f"{m}_diff_mean"], rec[f"{m}_diff_sd"] = mean_sd(r.diff.get(m, []))
                rec[f"{m}_rel_mean"], rec[f"{m}_rel_sd"] = mean_sd(r.rel.get(m, []))
                rec[f"{m}_p_seed_client"] = r.p_clients.get(m, "")
                rec[f"{m}_pairs"] = r.n_pairs.get(m, "")
                rec[f"{m}_p_seeds"] = r.p_seeds.get(m, "")
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
    files = write_tables(rows, out, against)
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
