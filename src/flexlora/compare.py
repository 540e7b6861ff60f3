"""The paper's comparison: a grid of methods x client-resource distributions x seeds, run cell by cell.

Cells (:func:`plan_cells`):

* heterogeneous methods (``flexlora``, ``hetlora``, ``flora``, ``ffa``, ``slora+flexlora``; on request ``raflora``
  and ``florist``) run under every
  listed distribution other than ``homo``; ``flexlora`` also runs under ``homo`` when it is listed (all
  clients at r8 with the SVD rule: the control that separates the aggregation rule from the ranks);
* homogeneous methods (``fedavg``, ``fedit``, ``slora``) run at ``homo`` (every client at r8): the paper's
  "Homo Rank" baselines, whatever the distributions;
* ``METHOD@RANK`` runs a homogeneous method with every client at that rank type (``fedit@r200``; ``@max`` is
  the largest of the paper's types, r200): the upper reference.

Every cell is an ordinary run directory, ``OUT/cells/<label>/<distribution>/seed<s>``, made from one base
config plus the cell's keys (``federation.method``, ``federation.distribution``, ``federation.seed``) and any
per-method overrides (e.g. ``fedavg: [train.optimizer=sgd, train.lr=0.05]``). At the same seed every cell
shares the held-out split, the rank assignment's placement, the sampled clients, the batches and the initial
``A`` (paired schedules). Re-running the comparison reuses finished cells, resumes interrupted ones from
their checkpoint and starts the rest; a cell whose saved config differs from the planned one is refused
rather than mixed in. ``OUT/plan.json`` lists the cells planned there so far, ``OUT/progress.md`` shows
where each one stands.

A base config may carry a top-level ``compare:`` section (``methods``, ``distributions``, ``seeds``,
``method_overrides``, ``variants``, ``sweep``, ``out``, ``order``) that :func:`load_comparisons` separates
from the run config; command-line options override it. ``variants`` are labelled variants of a method
(``flexlora-rslora``: FlexLoRA with ``model.use_rslora=true``); ``sweep`` crosses config keys
(``train.steps: [4, 8, 16]``) into one comparison directory per point (``OUT/steps=8``). ``archive: DIR``
(default: none) keeps every finished cell's final global update at rank <= 64 in ``DIR/<cell>``
(``DIR/<point>/<cell>`` for a sweep; :mod:`flexlora.archive`), also for cells finished before it was set.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flexlora.config import ConfigError, RunConfig, load_config
from flexlora.core.ranks import DISTRIBUTIONS, RANK_TYPES, parse_rank_type
from flexlora.core.safe_load import load_yaml_file
from flexlora.methods import METHODS, method_names
from flexlora.tracking import for_comparison

__all__ = [
    "Cell",
    "Comparison",
    "DEFAULT_DISTRIBUTIONS",
    "default_methods",
    "cell_state",
    "load_comparison",
    "load_comparisons",
    "plan_cells",
    "progress_table",
    "run_comparison",
    "sweep_points",
]

log = logging.getLogger("flexlora")

DEFAULT_DISTRIBUTIONS = ("homo", "uniform", "heavy-tail-strong")
LARGEST = max(RANK_TYPES.values(), key=lambda t: (t.attn + t.mlp, t.name)).name  # r200


def default_methods() -> list[str]:
    """The grid's methods by default (:mod:`flexlora.methods`): the paper's heterogeneous methods, the
    homogeneous baselines, and the baselines again at the largest rank (``fedit@max``); the other groups
    (Cho's HetLoRA, the factor-balance controls, the rank-collapse answers) run when listed."""
    baselines = method_names(lambda m: m.homogeneous_only)
    return [*method_names(lambda m: m.group == "paper"), *baselines, *(f"{m}@max" for m in baselines)]


@dataclass(frozen=True)
class Cell:
    """One run of the grid: ``label`` (a method, or ``METHOD@RANK``), its distribution and seed."""

    label: str
    method: str
    distribution: str
    seed: int
    overrides: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """``label/distribution/seed<s>``: the cell's path under ``OUT/cells``."""
        return f"{self.label}/{self.distribution}/seed{self.seed}"

    def run_config(self, base: Mapping[str, Any], out: Path, extra: Sequence[str] = ()) -> RunConfig:
        """The cell's config: ``base`` plus ``extra`` (global overrides), the cell's keys and its overrides."""
        dist = self.distribution if self.distribution in DISTRIBUTIONS else f"[{self.distribution}]"
        keys = [
            f"output_dir={out / 'cells' / self.label / self.distribution}",
            f"name=seed{self.seed}",
            f"federation.method={self.method}",
            f"federation.distribution={dist}",
            f"federation.seed={self.seed}",
        ]
        try:
            cfg = load_config(raw=copy.deepcopy(dict(base)), overrides=[*extra, *keys, *self.overrides])
        except ConfigError as exc:
            raise ConfigError(f"cell {self.key}: {exc}") from None
        cfg.tracking = for_comparison(cfg.tracking, out, self.key)  # every cell its own tracked run
        return cfg


def _parse_method(spec: str) -> tuple[str, str | None]:
    method, _, rank = spec.partition("@")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} in {spec!r}: use one of {method_names()}")
    if not rank:
        return method, None
    if not METHODS[method].homogeneous_only:
        homogeneous = method_names(lambda m: m.homogeneous_only)
        raise ValueError(f"{spec!r}: only homogeneous methods {homogeneous} take @RANK")
    return method, parse_rank_type(LARGEST if rank == "max" else rank).name


def _check_variants(variants: Mapping[str, Any]) -> dict[str, tuple[str, str | None, tuple[str, ...]]]:
    """``{label: (method, rank, overrides)}`` from ``{label: {method: METHOD[@RANK], set: [key=value, ...]}}``."""
    out = {}
    for label, spec in variants.items():
        if not isinstance(spec, Mapping) or "method" not in spec or set(spec) - {"method", "set"}:
            raise ValueError(f"variant {label!r}: expected {{method: METHOD[@RANK], set: [key=value, ...]}}")
        if not isinstance(label, str) or not label or any(c in label for c in "@/ ") or label in METHODS:
            raise ValueError(
                f"variant {label!r}: a label needs no '@', '/' or space and must not be a method"
            )
        sets = spec.get("set") or []
        if not isinstance(sets, list) or not all(isinstance(s, str) and "=" in s for s in sets):
            raise ValueError(f"variant {label!r}: set must be a list of key=value strings")
        out[label] = (*_parse_method(str(spec["method"])), tuple(sets))
    return out


def plan_cells(
    methods: Sequence[str] | None = None,
    distributions: Sequence[str] = DEFAULT_DISTRIBUTIONS,
    seeds: Sequence[int] = (0, 1, 2),
    method_overrides: Mapping[str, Sequence[str]] | None = None,
    order: str = "method",
    variants: Mapping[str, Any] | None = None,
) -> list[Cell]:
    """The grid's cells (rules in the module doc; ``methods``: :func:`default_methods` if ``None``), method-major (``order="method"``: all seeds of the first
    method first, so an interrupted grid still holds complete methods) or seed-major (``"seed"``).

    ``method_overrides`` maps a label (``fedit@r200``) or a method (``fedavg``, which also covers
    ``fedavg@r200``) to ``--set``-style overrides for its cells; the label's come after the method's.
    ``variants`` names labelled variants of a method (``flexlora-rslora: {method: flexlora, set:
    [model.use_rslora=true]}``): listed in ``methods`` by their label, they run where their method runs,
    with the method's overrides, then theirs, then the label's.

    Raises:
        ValueError: an unknown method, distribution or order, or no cell at all.
    """
    overrides = {k: tuple(v) for k, v in (method_overrides or {}).items()}
    for dist in distributions:
        if dist not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {dist!r}: use one of {sorted(DISTRIBUTIONS)}")
    if order not in ("method", "seed"):
        raise ValueError(f"order must be 'method' or 'seed', got {order!r}")
    named = _check_variants(variants or {})
    unknown = [k for k in overrides if k not in named and _parse_method(k)[0] not in METHODS]
    if unknown:
        raise ValueError(f"method_overrides: unknown method {unknown[0]!r}")
    groups: list[list[Cell]] = []
    seen = set()
    for spec in default_methods() if methods is None else methods:
        method, rank, own = named[spec] if spec in named else (*_parse_method(spec), ())
        label = spec if spec in named else f"{method}@{rank}" if rank else method
        if label in seen:
            continue
        seen.add(label)
        if rank:
            dists = [rank]
        elif METHODS[method].homogeneous_only:
            dists = ["homo"]
        else:
            dists = [d for d in distributions if d != "homo" or METHODS[method].homo_control]
        extra = overrides.get(method, ()) + own + (overrides.get(label, ()) if label != method else ())
        for dist in dists:
            groups.append([Cell(label, method, dist, s, extra) for s in seeds])
    cells = (
        [c for g in groups for c in g]
        if order == "method"
        else [g[i] for i in range(len(seeds)) for g in groups]
    )
    if not cells:
        raise ValueError("the comparison has no cell: give at least one method and one seed")
    return cells


# ---------------------------------------------------------------------------------------------- state
def cell_state(run_dir: Path, rounds: int) -> str:
    """``done`` (``summary.json`` after the last round), ``partial`` (a checkpoint to resume), ``started``
    (a directory without checkpoint: restart) or ``todo``."""
    if (run_dir / "summary.json").is_file():
        try:
            if json.loads((run_dir / "summary.json").read_text()).get("rounds") == rounds:
                return "done"
        except json.JSONDecodeError:
            pass
    if (run_dir / "checkpoint" / "server.json").is_file():
        return "partial"
    return "started" if run_dir.exists() else "todo"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and k != "options":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: Mapping[str, Any], planned: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two config dicts (``a.b: saved -> planned``). A key the saved config
    lacks counts only if its planned value is not the default (a run saved before the key existed ran as
    its default does); ``tracking`` is not part of the experiment and is ignored."""
    a, b = _flatten(saved), _flatten(planned)
    defaults = _flatten(RunConfig().to_dict())
    keys = [k for k in sorted(set(a) | set(b)) if k.split(".")[0] != "tracking"]
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in keys
        if a.get(k) != b.get(k) and not (k not in a and k in defaults and b.get(k) == defaults[k])
    ]


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_table(cells: Sequence[Cell], out: Path, rounds: Mapping[Cell, int]) -> str:
    """A Markdown table of every cell: state, rounds done, last held-out loss, seconds per round, and at the
    end the cells done and an estimate of the time left for one worker (the mean seconds per round so far)."""
    lines = [
        "| # | cell | state | rounds | last eval loss | s/round |",
        "|---|---|---|---|---|---|",
    ]
    done = 0
    spent, rounds_done, rounds_left = 0.0, 0, 0
    for i, cell in enumerate(cells, 1):
        run_dir = out / "cells" / cell.key
        state = cell_state(run_dir, rounds[cell])
        records = _records(run_dir)
        n = max((m["round"] for m in records), default=0)
        # a resumed run's checkpointed rounds lack "total" (it is measured after the checkpoint is written)
        secs = [
            m["seconds"].get("total", sum(m["seconds"].get(k, 0.0) for k in ("train", "aggregate", "eval")))
            for m in records
            if "seconds" in m
        ]
        evals = [m["eval"]["loss"] for m in records if m.get("eval", {}).get("loss") is not None]
        done += state == "done"
        spent += sum(secs)
        rounds_done += len(secs)
        rounds_left += rounds[cell] - n
        per = f"{sum(secs) / len(secs):.0f}" if secs else ""
        last = f"{evals[-1]:.4f}" if evals else ""
        lines.append(f"| {i} | {cell.key} | {state} | {n}/{rounds[cell]} | {last} | {per} |")
    eta = spent / rounds_done * rounds_left / 3600 if rounds_done else float("nan")
    lines.append("")
    lines.append(
        f"{done}/{len(cells)} cells done; {rounds_left} rounds left, about {eta:.1f} h of one worker "
        "at the mean pace so far (divide by the number of workers)."
    )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- running
@dataclass
class Comparison:
    """A planned comparison: the base config (a dict), the cells, where they go, global overrides."""

    base: dict[str, Any]
    cells: list[Cell]
    out: Path
    overrides: list[str] = field(default_factory=list)
    archive: Path | None = None  # where finished cells' rank-64 adapters go (flexlora.archive)

    def configs(self) -> dict[Cell, RunConfig]:
        """Every cell's config, all validated before anything runs (errors listed together)."""
        out, errors = {}, []
        for cell in self.cells:
            try:
                out[cell] = cell.run_config(self.base, self.out, self.overrides)
            except ConfigError as exc:
                errors.append(str(exc))
        if errors:
            raise ConfigError("; ".join(errors))
        return out

    def progress(self) -> str:
        return progress_table(
            self.cells, self.out, {c: cfg.federation.rounds for c, cfg in self.configs().items()}
        )

    def write_plan(self) -> None:
        """``OUT/plan.json``: every cell planned on ``OUT`` so far (a run of a subset, ``--methods fedit``,
        adds its cells to the earlier ones instead of hiding them), with this run's base config."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "plan.json"
        earlier = json.loads(path.read_text()).get("cells", []) if path.is_file() else []
        now = {c.key: asdict(c) | {"key": c.key} for c in self.cells}
        seen = {c.get("key") for c in earlier}
        plan = {
            "cells": [now.get(c.get("key"), c) for c in earlier]
            + [c for k, c in now.items() if k not in seen],
            "overrides": self.overrides,
            "base": self.base,
        }
        _write_atomic(path, json.dumps(plan, indent=1) + "\n")


#: keys of a config's ``compare:`` section
SECTION_KEYS = (
    "methods",
    "distributions",
    "seeds",
    "method_overrides",
    "out",
    "order",
    "variants",
    "sweep",
    "archive",
)


def _read_base(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(run config, compare section)`` of a base config file; the section's keys are checked."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = load_yaml_file(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    section = raw.pop("compare", None) or {}
    if not isinstance(section, dict) or set(section) - set(SECTION_KEYS):
        bad = sorted(set(section) - set(SECTION_KEYS)) if isinstance(section, dict) else section
        raise ConfigError(f"compare: unknown key(s) {bad} (known: {sorted(SECTION_KEYS)})")
    return raw, section


def _archive_dir(archive: Any) -> Path | None:
    """``compare.archive`` as a path (``~`` expanded), ``None`` when not set."""
    if archive is not None and not (isinstance(archive, str) and archive):
        raise ConfigError(f"compare.archive: expected a directory, got {archive!r}")
    return Path(archive).expanduser() if archive else None


def load_comparisons(
    path: str | Path,
    methods: Sequence[str] | None = None,
    distributions: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    order: str | None = None,
) -> list[Comparison]:
    """Read a base config with an optional ``compare:`` section; arguments given here take precedence.

    The section's ``sweep`` (``{train.steps: [4, 8, 16]}``, keys crossed with each other) makes one
    comparison per point, each an ordinary comparison directory ``OUT/<name>=<value>[,...]`` (``name`` the
    key's last part: ``OUT/steps=8``) with the point's keys as global overrides; without it, one at ``OUT``.

    Raises:
        ConfigError: a bad ``compare`` section, or any cell's config is invalid (all listed at once).
    """
    path = Path(path)
    raw, section = _read_base(path)
    seeds = seeds if seeds is not None else section.get("seeds", 3)
    if isinstance(seeds, int):
        seeds = list(range(seeds))
    try:
        cells = plan_cells(
            methods or section.get("methods"),
            distributions or section.get("distributions", DEFAULT_DISTRIBUTIONS),
            list(seeds),
            section.get("method_overrides"),
            order or section.get("order", "method"),
            section.get("variants"),
        )
        points = sweep_points(section.get("sweep") or {})
    except ValueError as exc:
        raise ConfigError(f"compare: {exc}") from None
    out = Path(out or section.get("out") or Path(raw.get("output_dir", "runs")) / f"compare-{path.stem}")
    archive = _archive_dir(section.get("archive"))
    comparisons = [
        Comparison(raw, cells, out / name if name else out, [*overrides, *point], archive and archive / name)
        for name, point in points
    ]
    for comparison in comparisons:
        comparison.configs()  # validate every cell now
    return comparisons


def load_comparison(path: str | Path, *args: Any, **kwargs: Any) -> Comparison:
    """:func:`load_comparisons` for a config without ``sweep`` (one comparison).

    Raises:
        ConfigError: as :func:`load_comparisons`, or the config sweeps more than one point.
    """
    comparisons = load_comparisons(path, *args, **kwargs)
    if len(comparisons) != 1:
        raise ConfigError(f"{path}: compare.sweep makes {len(comparisons)} comparisons; load them all")
    return comparisons[0]


def sweep_points(sweep: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    """``[(directory name, [key=value, ...])]`` for every point of the cross product of ``sweep``'s axes,
    first key slowest; ``[("", [])]`` without axes.

    Raises:
        ValueError: an axis is not a non-empty list of numbers or plain strings, or two keys end alike.
    """
    if not isinstance(sweep, Mapping):
        raise ValueError(f"sweep must map keys to lists of values, got {sweep!r}")
    names = [str(k).rsplit(".", 1)[-1] for k in sweep]
    if len(set(names)) != len(names):
        raise ValueError(
            f"sweep: keys must end in different names (they name directories), got {list(sweep)}"
        )
    points: list[tuple[str, list[str]]] = [("", [])]
    for key, values in sweep.items():
        ok = isinstance(values, list) and values
        if not ok or not all(_plain(v) for v in values) or len(set(map(str, values))) != len(values):
            raise ValueError(
                f"sweep.{key}: expected a list of distinct numbers or plain strings, got {values!r}"
            )
        name = str(key).rsplit(".", 1)[-1]
        points = [
            (f"{d},{name}={v}" if d else f"{name}={v}", [*sets, f"{key}={v}"])
            for d, sets in points
            for v in values
        ]
    return points


def _plain(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return math.isfinite(value)
    return isinstance(value, str) and value.replace("-", "").replace("_", "").replace(".", "").isalnum()


def run_comparison(
    comparison: Comparison, progress: bool = True, stop_on_error: bool = False
) -> dict[str, str]:
    """Run every cell that is not done, in order; returns ``{cell key: final state}``.

    A cell that raises is logged and marked ``failed`` (the others still run) unless ``stop_on_error``;
    ``KeyboardInterrupt`` stops the grid (rerun to resume). ``OUT/progress.md`` is rewritten after each cell.
    Several processes may work on one grid (workers: start the same command again, on this machine or on
    another that shares ``OUT``): a process claims a cell with an ``flock`` on ``OUT/locks/<cell>.lock``
    while it runs it, and the others skip that cell (state ``elsewhere``) instead of running it twice.

    Raises:
        ConfigError: a cell's run directory holds a run with a different config (names the keys).
    """
    comparison.out.mkdir(parents=True, exist_ok=True)
    return _run_cells(comparison, progress, stop_on_error)


@contextlib.contextmanager
def claim(out: Path, cell: Cell) -> Iterator[bool]:
    """Hold ``OUT/locks/<cell>.lock`` (``flock``, released when the process ends, even killed); yields
    False without waiting when another process holds it."""
    locks = out / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / (cell.key.replace("/", "__") + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` in one step, so a worker never reads another's half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _run_cells(comparison: Comparison, progress: bool, stop_on_error: bool) -> dict[str, str]:
    from tqdm.auto import tqdm

    from flexlora.archive import archive_cell

    configs = comparison.configs()
    comparison.write_plan()
    rounds = {c: cfg.federation.rounds for c, cfg in configs.items()}
    # refuse mismatched cells before running anything
    for cell, cfg in configs.items():
        saved = cfg.run_dir / "config.yaml"
        if cell_state(cfg.run_dir, rounds[cell]) in ("done", "partial") and saved.is_file():
            diff = config_differences(yaml.safe_load(saved.read_text()), cfg.to_dict())
            if diff:
                raise ConfigError(
                    f"cell {cell.key}: {cfg.run_dir} holds a run with another config ({'; '.join(diff[:5])}); "
                    "use another --out, or delete that run directory"
                )
    states: dict[str, str] = {}
    bar = tqdm(total=len(configs), desc="cells", unit="cell", disable=not progress)
    for i, (cell, cfg) in enumerate(configs.items(), 1):
        with claim(comparison.out, cell) as mine:
            state = cell_state(cfg.run_dir, rounds[cell]) if mine else "elsewhere"
            tag = f"[cell {i}/{len(configs)}] {cell.key}"
            tqdm.write(f"{tag}: {state}")
            states[cell.key] = _run_cell(cell, cfg, state, progress, stop_on_error, tag) if mine else state
            if mine and comparison.archive and states[cell.key] == "done":
                tqdm.write(f"{tag}: {archive_cell(cfg.run_dir, comparison.archive / cell.key)}")
        _write_atomic(
            comparison.out / "progress.md", progress_table(comparison.cells, comparison.out, rounds)
        )
        bar.update(1)
    bar.close()
    return states


def _run_cell(cell: Cell, cfg: RunConfig, state: str, progress: bool, stop_on_error: bool, tag: str) -> str:
    """Run, resume or reuse one claimed cell; returns ``done`` or ``failed`` and says which under ``tag``."""
    from tqdm.auto import tqdm

    from flexlora.run import resume_federation, run_federation

    if state == "done":
        return state
    start = time.perf_counter()
    try:
        if state == "partial":
            resume_federation(cfg.run_dir, progress=progress)
        else:
            run_federation(cfg, overwrite=state == "started", progress=progress)
        (cfg.run_dir / "cell.json").write_text(json.dumps(asdict(cell) | {"key": cell.key}) + "\n")
    except Exception as exc:
        if stop_on_error:
            raise
        log.exception("cell %s failed", cell.key)
        tqdm.write(f"{tag}: FAILED ({type(exc).__name__}: {exc})")
        return "failed"
    tqdm.write(f"{tag}: done in {time.perf_counter() - start:.0f} s")
    return "done"
