"""Per-round metrics to the experiment trackers people already use: TensorBoard and MLflow (both offline).

Selected by the config's ``tracking:`` section, off by default::

    tracking: [tensorboard, mlflow]                 # or
    tracking: {tensorboard: true, mlflow: true}     # mlflow may also be a tracking URI
    tracking: {mlflow: "sqlite:///runs/mlflow.db", experiment: dolly, run_name: flexlora-seed0}

Every round's ``metrics.jsonl`` line is flattened into scalars with ``/`` between levels, under the same
names: ``train_loss``, ``eval/loss``, ``eval/rougeL``, ``eval/per_category/<category>/rougeL``,
``seconds/train``, ``bytes/sent``, ``spectrum/energy_beyond_min_rank``,
``spectrum/top_singular_values/q_proj/0`` ... (list items by index), ``aggregation/...``, ``privacy/...``;
the step is the round (round 0: the base model's evaluation). Per-client scores (``eval/per_client``) and
non-numbers (client lists, failure reasons) stay in ``metrics.jsonl`` only.

* TensorBoard: event files in the run directory itself, so ``tensorboard --logdir runs`` lists each run by
  its directory; the resolved config is logged as text.
* MLflow: a local file store, ``<output_dir>/mlruns`` by default (``mlflow ui --backend-store-uri
  runs/mlruns``), experiment ``flexlora``, one MLflow run per flexlora run named after it, with the config
  flattened into params. The MLflow run id is kept in ``<run_dir>/mlflow_run.json`` so a resumed run logs
  into the same MLflow run. ``flexlora compare`` puts every cell into ``OUT/mlruns``, experiment ``OUT``'s
  name, one run per cell named ``label/distribution/seed<s>``.

Trackers are imported only when selected. A tracker that fails is switched off with a warning: it never
stops a run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "TRACKERS",
    "TrackingSettings",
    "Tracker",
    "flatten_metrics",
    "for_comparison",
    "open_tracker",
    "tracked",
    "tracking_settings",
]

log = logging.getLogger("flexlora")

TRACKERS = ("tensorboard", "mlflow")
MLFLOW_RUN_FILE = "mlflow_run.json"


@dataclass(frozen=True)
class TrackingSettings:
    """What to log to: TensorBoard, MLflow (``mlflow_uri``: None for the default local store)."""

    tensorboard: bool = False
    mlflow: bool = False
    mlflow_uri: str | None = None
    experiment: str | None = None
    run_name: str | None = None

    @property
    def enabled(self) -> bool:
        return self.tensorboard or self.mlflow


def tracking_settings(raw: Any) -> TrackingSettings:
    """Read the ``tracking:`` section: a list of tracker names or a mapping.

    Raises:
        ValueError: naming the key (``tracking.mlflow: ...``).
    """
    if raw is None:
        return TrackingSettings()
    if isinstance(raw, list):
        unknown = [t for t in raw if t not in TRACKERS]
        if unknown:
            raise ValueError(f"tracking: {unknown[0]!r} is not one of {list(TRACKERS)}")
        return TrackingSettings(tensorboard="tensorboard" in raw, mlflow="mlflow" in raw)
    if not isinstance(raw, Mapping):
        raise ValueError(f"tracking: expected a list of {list(TRACKERS)} or a mapping, got {raw!r}")
    known = ("tensorboard", "mlflow", "experiment", "run_name")
    for key, value in raw.items():
        if key not in known:
            raise ValueError(f"tracking.{key}: unknown key (known: {', '.join(known)})")
        ok = isinstance(value, bool) if key == "tensorboard" else value is None or isinstance(value, str)
        if key == "mlflow":
            ok = isinstance(value, bool | str)
        if not ok or value == "":
            raise ValueError(f"tracking.{key}: unexpected value {value!r}")
    mlflow = raw.get("mlflow", False)
    return TrackingSettings(
        tensorboard=raw.get("tensorboard", False),
        mlflow=bool(mlflow),
        mlflow_uri=mlflow if isinstance(mlflow, str) else None,
        experiment=raw.get("experiment"),
        run_name=raw.get("run_name"),
    )


def for_comparison(raw: Any, out: Path, cell_key: str) -> Any:
    """A cell's ``tracking:`` section: MLflow runs of every cell in one store ``OUT/mlruns``, experiment
    ``OUT``'s name, run name the cell's key (keys the user set are kept)."""
    settings = tracking_settings(raw)
    if not settings.enabled:
        return raw
    return {
        "tensorboard": settings.tensorboard,
        "mlflow": settings.mlflow_uri or (_file_uri(out / "mlruns") if settings.mlflow else False),
        "experiment": settings.experiment or Path(out).resolve().name,
        "run_name": settings.run_name or cell_key,
    }


def _file_uri(path: Path) -> str:
    return Path(path).resolve().as_uri()


_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numeric leaves of one ``metrics.jsonl`` line, keyed ``a/b/c`` (list items by index; characters
    MLflow refuses become ``_``); booleans, strings, ``round`` and ``per_client`` are left out."""
    out: dict[str, float] = {}
    items = metrics.items() if isinstance(metrics, Mapping) else enumerate(metrics)
    for key, value in items:
        if (not prefix and key == "round") or key == "per_client":  # the step; hundreds of series
            continue
        name = prefix + _BAD.sub("_", str(key))
        if isinstance(value, Mapping | list | tuple):
            out.update(flatten_metrics(value, name + "/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path, config: Mapping[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, settings: TrackingSettings, run_dir: Path, config: Mapping[str, Any]):
        uri = settings.mlflow_uri or _file_uri(Path(config.get("output_dir", "runs")) / "mlruns")
        if uri.startswith("file:"):
            # MLflow 3 keeps the plain-file store in maintenance mode behind this switch; it is the offline
            # store that needs no database (pass a sqlite:/// URI to use one instead)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        marker = run_dir / MLFLOW_RUN_FILE
        saved = json.loads(marker.read_text()) if marker.is_file() else {}
        if saved.get("uri") == uri:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = settings.experiment or "flexlora"
        experiment = self.client.get_experiment_by_name(name)
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(
            exp_id,
            run_name=settings.run_name or str(config.get("name", run_dir.name)),
            tags={"flexlora.run_dir": str(run_dir.resolve())},
        )
        self.run_id = run.info.run_id
        marker.write_text(json.dumps({"uri": uri, "run_id": self.run_id}) + "\n")
        self._log_params(config)

    def _log_params(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flat_config(config)
        params = [Param(k, str(v)[:500]) for k, v in flat.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _flat_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Tracker:
    """The selected trackers of one run; :meth:`log_round` takes one ``metrics.jsonl`` line."""

    def __init__(self, writers: list[Any]):
        self.writers = writers

    def log_round(self, metrics: Mapping[str, Any]) -> None:
        scalars = flatten_metrics(metrics)
        for writer in list(self.writers):
            try:
                writer.log(int(metrics.get("round", 0)), scalars)
            except Exception as exc:  # a tracker never stops a run
                log.warning("tracking: %s failed (%s); it is switched off", type(writer).__name__, exc)
                self.writers.remove(writer)

    def close(self, failed: bool = False) -> None:
        for writer in self.writers:
            try:
                writer.close(failed)
            except Exception as exc:
                log.warning("tracking: closing %s failed (%s)", type(writer).__name__, exc)
        self.writers = []


def open_tracker(raw: Any, run_dir: str | Path, config: Mapping[str, Any]) -> Tracker | None:
    """The trackers a ``tracking:`` section selects for ``run_dir`` (None when none is selected)."""
    settings = tracking_settings(raw)
    if not settings.enabled:
        return None
    run_dir = Path(run_dir)
    writers: list[Any] = []
    if settings.tensorboard:
        writers.append(_TensorBoard(run_dir, config))
    if settings.mlflow:
        writers.append(_MLflow(settings, run_dir, config))
    return Tracker(writers)


@contextlib.contextmanager
def tracked(federation: Any, raw: Any, run_dir: str | Path, config: Mapping[str, Any]) -> Iterator[None]:
    """Log ``federation``'s rounds to the trackers ``raw`` selects while the block runs; the tracked run is
    closed as finished, or as failed when the block raises."""
    tracker = open_tracker(raw, run_dir, config)
    if tracker is None:
        yield
        return
    federation.on_round = tracker.log_round
    try:
        yield
    except BaseException:
        tracker.close(failed=True)
        raise
    tracker.close()
