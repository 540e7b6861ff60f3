"""Run configuration: typed dataclasses loaded from YAML, overridable with ``--set a.b=c``.

Validation happens in one pass before any model is loaded: unknown keys, wrong types and bad values are
all collected and reported together, each naming its key (``federation.rounds: expected int, got 'x'``).
The resolved config is saved with every run and every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexlora.core.aggregators.hetlora_cho import TailPenalty
from flexlora.core.budget import Budget
from flexlora.core.privacy import accountant_available
from flexlora.core.ranks import DISTRIBUTIONS, parse_rank_type
from flexlora.core.robust import ROBUST_RULES
from flexlora.core.safe_load import LoadError, load_yaml, load_yaml_file
from flexlora.core.svd import SVD_ROUTES
from flexlora.evaluation import EvalConfig
from flexlora.methods import METHODS, method_names
from flexlora.tracking import tracking_settings
from flexlora.training import TrainConfig

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "FederationConfig",
    "SecurityConfig",
    "RunConfig",
    "load_config",
    "security_problems",
]

MAX_INT = 2**31 - 1  # any integer field (seeds, counts, steps)
MAX_ROUNDS = 100_000
ALPHA_RANGE = (1e-6, 1e6)  # LoRA scale alpha/r; beyond it the factors B = dW-part / scale over/underflow


class ConfigError(ValueError):
    """One or more config keys are wrong; the message lists every one of them."""


@dataclass
class ModelConfig:
    """Base model and LoRA placement. ``name``: ``smollm2`` (default), ``tiny``, or a local HF directory."""

    name: str = "smollm2"
    dtype: str = "float32"
    device: str = "auto"
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_alpha: float = 16.0
    use_rslora: bool = False


@dataclass
class DataConfig:
    """Where clients' data comes from and which clients are held out (never trained on).

    ``num_heldout``: a count (>= 1) or a fraction (< 1) of the clients; ``heldout_ids`` overrides it.
    ``max_clients``: cap on the training pool (None: every other client). ``num_validation``: clients taken
    out of the training pool as validation clients (never trained on, never test clients); ``eval_on``:
    ``heldout`` (the test clients) or ``validation`` (for tuning, e.g. the learning rate).
    """

    path: str = "synthetic"
    format: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    num_heldout: int | float = 0.1
    heldout_ids: list[str] | None = None
    max_clients: int | None = None
    num_validation: int = 0
    eval_on: str = "heldout"


@dataclass
class FederationConfig:
    """The federation: method, client resources, rounds and evaluation schedule.

    ``distribution``: ``homo``, ``uniform``, ``heavy-tail-light``, ``heavy-tail-strong``, ``normal``, or an
    explicit list of rank types (``[r8, r200, attn30-mlp200]``), or ``budgets``: each client takes the largest
    rank type that fits its entry of ``budgets`` (cycled; ``{memory_gb: 4, seconds_per_round: 60}``, see
    :mod:`flexlora.budget`). ``clients_per_round``: a count (an integer >= 1) or a fraction of the pool (a
    float in (0, 1]: ``1.0`` is every client, ``1`` is one client). ``min_clients``: valid updates needed
    for a round to count.
    ``slora_rounds``: the first rounds of ``slora`` / ``slora+flexlora`` that do sparse fine-tuning (stage 1,
    :mod:`flexlora.slora`); ``slora_density``: mask density of every client (None: as many parameters as the
    client's LoRA, ``r (d + k) / (d k)``); ``slora_lr``: stage-1 learning rate (None: ``train.lr``).
    ``hetlora_gamma``, ``hetlora_lambda``, ``hetlora_threshold``: ``hetlora-cho``'s tail and pruning rule
    (:mod:`flexlora.core.aggregators.hetlora_cho`).
    """

    method: str = "flexlora"
    svd: str = "auto"
    sparsity_weighted: bool = False
    florist_threshold: float = 0.9
    distribution: str | list[str] = "heavy-tail-strong"
    budgets: list[dict[str, Any]] | None = None
    rounds: int = 10
    clients_per_round: int | float = 8
    min_clients: int = 1
    seed: int = 0
    engine: str = "local"
    eval_every: int = 1
    eval_clients: int | None = None
    eval_trained_clients: int = 0
    slora_rounds: int = 2
    slora_density: float | None = None
    slora_lr: float | None = None
    hetlora_gamma: float = 0.99
    hetlora_lambda: float = 1e-3
    hetlora_threshold: float = 0.5


@dataclass
class SecurityConfig:
    """Untrusted clients: update checks, round retries, robust aggregation and differential privacy.

    ``max_examples``: an update claiming more training examples is refused. ``norm_bound``: an update with
    ``||dW||_F`` above it is refused (None: no bound). ``round_retries``: when fewer than
    ``federation.min_clients`` valid updates arrive, the round is retried this many times with a fresh
    sample before the run stops. ``robust``: ``none``, ``clip``, ``trimmed`` or ``median``
    (:mod:`flexlora.core.robust`); ``clip_norm``: the clipping bound ``C`` (None with ``clip``: the round's
    median norm); ``trim_fraction``: cut at each end by ``trimmed``. ``dp_noise_multiplier`` > 0 turns on
    client-level DP (:mod:`flexlora.core.privacy`; needs ``clip_norm``), with epsilon reported at
    ``dp_delta``; ``dp_secure_noise`` draws the noise seed from the OS instead of the run seed.
    """

    max_examples: int = 10_000_000
    norm_bound: float | None = None
    round_retries: int = 0
    robust: str = "none"
    clip_norm: float | None = None
    trim_fraction: float = 0.1
    dp_noise_multiplier: float = 0.0
    dp_delta: float = 1e-5
    dp_secure_noise: bool = False


@dataclass
class RunConfig:
    """Everything a run needs. ``output_dir/name`` is the run directory. ``tracking``: TensorBoard / MLflow
    (:mod:`flexlora.tracking`; none by default)."""

    name: str = "run"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: dict[str, Any] | list[str] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- loading and checking
def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if origin is tuple:
        return isinstance(value, list | tuple)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    return isinstance(value, hint)


def _build(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    if not isinstance(raw, dict):
        errors.append(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            errors.append(f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        hint, value = hints[f.name], raw[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, value, f"{prefix}{f.name}.", errors)
        elif not _type_ok(value, hint):
            errors.append(f"{prefix}{f.name}: expected {_hint_name(hint)}, got {value!r}")
        elif _out_of_range(value):
            errors.append(f"{prefix}{f.name}: {_out_of_range(value)}, got {value!r}")
        else:
            kwargs[f.name] = float(value) if hint is float else value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ checks of a section
        errors.append(f"{prefix.rstrip('.') or 'config'}: {exc}")
        return cls()


def _out_of_range(value: Any) -> str | None:
    """Why a number (or a number in a list) is unusable in any field: NaN, infinite or beyond ``MAX_INT``."""
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, float) and not math.isfinite(v):
            return "must be a finite number"
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
            return f"must lie within +-{MAX_INT}"
    return None


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check(cfg: RunConfig, errors: list[str]) -> None:
    """Every section's values, each wrong one appended to ``errors`` as ``section.key: what is wrong``."""
    _check_federation(cfg, errors)
    _check_security(cfg, errors)
    _check_data(cfg, errors)
    _check_run_dir(cfg, errors)
    _check_model(cfg, errors)
    try:
        tracking_settings(cfg.tracking)
    except ValueError as exc:
        errors.append(str(exc))


def _check_federation(cfg: RunConfig, errors: list[str]) -> None:
    """The ``federation`` section: the method (and its recipe's needs), routes, ranks, counts and SLoRA keys."""
    fed = cfg.federation
    method = METHODS.get(fed.method)
    if method is None:
        errors.append(f"federation.method: {fed.method!r} is not one of {sorted(METHODS)}")
    if fed.svd not in SVD_ROUTES:
        errors.append(f"federation.svd: {fed.svd!r} is not one of {list(SVD_ROUTES)}")
    if fed.engine not in ("local", "flower"):
        errors.append(f"federation.engine: {fed.engine!r} is not one of ['flower', 'local']")
    _check_distribution(cfg, method, errors)
    if not 0 < fed.florist_threshold <= 1:
        errors.append(f"federation.florist_threshold: must lie in (0, 1], got {fed.florist_threshold}")
    _check_counts(fed, errors)
    if method is not None:
        _check_recipe(cfg, method, errors)
    if fed.slora_density is not None and not 0 < fed.slora_density <= 1:
        errors.append(f"federation.slora_density: must be in (0, 1] or null, got {fed.slora_density}")
    if fed.slora_lr is not None and not fed.slora_lr > 0:
        errors.append(f"federation.slora_lr: must be > 0 or null, got {fed.slora_lr}")


def _check_distribution(cfg: RunConfig, method, errors: list[str]) -> None:
    """A known distribution (or rank-type list, or budgets), and one rank for a homogeneous-only method."""
    fed = cfg.federation
    if isinstance(fed.distribution, str) and fed.distribution not in (*DISTRIBUTIONS, "budgets"):
        errors.append(
            f"federation.distribution: {fed.distribution!r} is not one of {sorted([*DISTRIBUTIONS, 'budgets'])}"
        )
    _check_budgets(cfg, errors)
    if isinstance(fed.distribution, str):
        homogeneous = fed.distribution == "homo"
    else:
        try:
            homogeneous = len({parse_rank_type(t).name for t in fed.distribution}) == 1
        except ValueError as exc:
            errors.append(f"federation.distribution: {exc}")
            homogeneous = True
    if method is not None and method.homogeneous_only and not homogeneous:
        errors.append(
            f"federation.distribution: {fed.method} needs one rank for every client (use 'homo' or a one-type "
            f"list), got {fed.distribution!r}"
        )


def _check_counts(fed: FederationConfig, errors: list[str]) -> None:
    """Rounds, seeds, client counts and the per-round sample (a fraction in (0, 1] or a whole count)."""
    for key in ("rounds", "min_clients", "eval_every"):
        if getattr(fed, key) < 1:
            errors.append(f"federation.{key}: must be >= 1, got {getattr(fed, key)}")
    if fed.rounds > MAX_ROUNDS:
        errors.append(f"federation.rounds: must be <= {MAX_ROUNDS}, got {fed.rounds}")
    if fed.seed < 0:
        errors.append(f"federation.seed: must be >= 0, got {fed.seed}")
    for key in ("eval_clients", "eval_trained_clients"):
        if (getattr(fed, key) or 0) < 0:
            errors.append(f"federation.{key}: must be >= 0, got {getattr(fed, key)}")
    k = fed.clients_per_round
    if isinstance(k, bool) or not (0 < k <= 1 if isinstance(k, float) else isinstance(k, int) and k >= 1):
        errors.append(
            f"federation.clients_per_round: a fraction in (0, 1] written with a point (1.0: every client) "
            f"or a whole count (an integer >= 1), got {k!r}"
        )


def _check_data(cfg: RunConfig, errors: list[str]) -> None:
    """The ``data`` section's counts and which clients evaluation runs on."""
    data = cfg.data
    if data.eval_on not in ("heldout", "validation"):
        errors.append(f"data.eval_on: {data.eval_on!r} is not one of ['heldout', 'validation']")
    elif data.eval_on == "validation" and data.num_validation < 1:
        errors.append("data.eval_on: 'validation' needs data.num_validation >= 1")
    if data.num_validation < 0:
        errors.append(f"data.num_validation: must be >= 0, got {data.num_validation}")
    if data.num_heldout < 0:
        errors.append(f"data.num_heldout: must be >= 0, got {data.num_heldout}")
    if data.max_clients is not None and data.max_clients < 1:
        errors.append(f"data.max_clients: must be >= 1 or null, got {data.max_clients}")


def _check_model(cfg: RunConfig, errors: list[str]) -> None:
    """The ``model`` section: the LoRA scale's range, the dtype, at least one target module."""
    model = cfg.model
    if not ALPHA_RANGE[0] <= model.lora_alpha <= ALPHA_RANGE[1]:
        errors.append(
            f"model.lora_alpha: must lie in [{ALPHA_RANGE[0]}, {ALPHA_RANGE[1]:g}], got {model.lora_alpha}"
        )
    if model.dtype not in ("float32", "bfloat16", "float16"):
        errors.append(f"model.dtype: {model.dtype!r} is not one of ['bfloat16', 'float16', 'float32']")
    if not model.target_modules:
        errors.append("model.target_modules: must name at least one module")


def _check_recipe(cfg: RunConfig, method, errors: list[str]) -> None:
    """The registered method's needs (:mod:`flexlora.methods`): its engines, its stages' and its client
    recipe's settings."""
    fed = cfg.federation
    if "slora-sparse" in method.client.stages and not 1 <= fed.slora_rounds < fed.rounds:
        errors.append(
            f"federation.slora_rounds: {fed.method} needs 1 <= slora_rounds < rounds ({fed.rounds}), "
            f"got {fed.slora_rounds}"
        )
    if fed.engine in ("local", "flower") and fed.engine not in method.engines:
        errors.append(
            f"federation.method: {fed.method} runs on the {' or '.join(method.engines)} engine only "
            f"({method.not_carried()}); use federation.engine={method.engines[0]}"
        )
    if method.client.tail_penalty:
        try:
            TailPenalty(fed.hetlora_lambda, fed.hetlora_gamma, fed.hetlora_threshold)
        except ValueError as exc:
            errors.append(f"federation.hetlora_*: {exc}")


def _check_run_dir(cfg: RunConfig, errors: list[str]) -> None:
    """``name`` is one plain path component, so ``output_dir/name`` stays inside ``output_dir``."""
    name = cfg.name
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).is_absolute():
        errors.append(f"name: must be a plain directory name (no '/', '..' or empty), got {name!r}")
    if "\0" in cfg.output_dir:
        errors.append(f"output_dir: must be a path, got {cfg.output_dir!r}")


def _check_budgets(cfg: RunConfig, errors: list[str]) -> None:
    fed = cfg.federation
    if (fed.distribution == "budgets") != (fed.budgets is not None):
        errors.append("federation.budgets: give a list of budgets exactly when distribution is 'budgets'")
        return
    for i, raw in enumerate(fed.budgets or []):
        try:
            budget = Budget.from_dict(raw)
        except ValueError as exc:
            errors.append(f"federation.budgets[{i}]: {exc}")
            continue
        if budget.seconds_per_round is not None and cfg.train.steps is None:
            errors.append(f"federation.budgets[{i}]: a time budget needs train.steps (not epochs)")
    if fed.budgets == []:
        errors.append("federation.budgets: the list is empty")


def _check_security(cfg: RunConfig, errors: list[str]) -> None:
    errors.extend(security_problems(cfg.security, cfg.federation.method))


def security_problems(sec: SecurityConfig, method: str) -> list[str]:
    """What is wrong with a ``security`` section for ``method``, one ``security.key: ...`` line each (the round
    loop's config check and :class:`flexlora.engines.flower.FlexLoRAStrategy` both use it)."""
    errors: list[str] = []
    if sec.max_examples < 1:
        errors.append(f"security.max_examples: must be >= 1, got {sec.max_examples}")
    if sec.round_retries < 0:
        errors.append(f"security.round_retries: must be >= 0, got {sec.round_retries}")
    for key in ("norm_bound", "clip_norm"):
        value = getattr(sec, key)
        if value is not None and not 0 < value < float("inf"):
            errors.append(f"security.{key}: must be a finite number > 0 or null, got {value}")
    if sec.robust not in ROBUST_RULES:
        errors.append(f"security.robust: {sec.robust!r} is not one of {list(ROBUST_RULES)}")
    if not 0 <= sec.trim_fraction < 0.5:
        errors.append(f"security.trim_fraction: must lie in [0, 0.5), got {sec.trim_fraction}")
    if not 0 < sec.dp_delta < 1:
        errors.append(f"security.dp_delta: must lie in (0, 1), got {sec.dp_delta}")
    if sec.dp_noise_multiplier < 0:
        errors.append(f"security.dp_noise_multiplier: must be >= 0, got {sec.dp_noise_multiplier}")
    if sec.dp_noise_multiplier > 0:
        if sec.clip_norm is None:
            errors.append("security.clip_norm: differential privacy needs a fixed clipping bound, got null")
        if sec.robust != "none":
            errors.append(
                f"security.robust: {sec.robust!r} cannot be combined with differential privacy (the noise is "
                "calibrated to a clipped mean); use robust: none"
            )
        if method in METHODS and not METHODS[method].dp:
            errors.append(
                f"security.dp_noise_multiplier: {method} is not supported (its update is not linear in a "
                f"clippable per-client contribution), use one of {method_names(lambda m: m.dp)}"
            )
        if not accountant_available():
            errors.append(
                "security.dp_noise_multiplier: the privacy accountant needs dp-accounting "
                "(pip install 'flwr[dp]==1.42.0')"
            )
    return errors


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a nested dict; raises ConfigError if malformed."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        try:
            node[leaf] = load_yaml(text, f"--set {key}")
        except LoadError as exc:
            raise ConfigError(str(exc)) from None
    return raw


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, raw: dict[str, Any] | None = None
) -> RunConfig:
    """Load a YAML config (or a dict, e.g. one saved with a run, or the defaults), apply overrides, and
    validate everything at once.

    Raises:
        ConfigError: listing every bad key on one line, separated by ``;``.
    """
    raw = dict(raw or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = load_yaml_file(path) or {}
        except LoadError as exc:
            raise ConfigError(str(exc)) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        if "compare" in raw:
            raise ConfigError(f"{path}: this is a study config: run it with `flexlora compare {path}`")
    raw = apply_overrides(raw, overrides or [])
    errors: list[str] = []
    cfg = _build(RunConfig, raw, "", errors)
    _check(cfg, errors)
    if errors:
        raise ConfigError("invalid config: " + "; ".join(" ".join(e.split()) for e in errors))
    return cfg
