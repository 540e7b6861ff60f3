"""PEFT adapter directories in and out: ``adapter_config.json`` + ``adapter_model.safetensors``.

Reading honours ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora`` and
``target_modules``, and checks every tensor (see :mod:`flexlora.core.safetensors_io`). The config is
untrusted: at most :data:`MAX_CONFIG_BYTES`, ranks >= 1, alphas finite and in
:data:`~flexlora.core.lora.ALPHA_RANGE`, and pattern keys matched without backtracking
(:mod:`flexlora.core.patterns`, keys outside its syntax are refused). Writing puts each
module's rank and alpha into ``rank_pattern`` / ``alpha_pattern`` with ``^``-anchored, escaped,
fully-qualified keys (PEFT matches a pattern key ``K`` against a module name with
``re.match(rf"(.*\\.)?({K})$", name)`` and takes the first match), and lists every module by its full name
in ``target_modules``, so ``PeftModel.from_pretrained`` rebuilds exactly these shapes.

Module names are paths in the base model (``model.layers.0.self_attn.q_proj``); in the file they appear as
``base_model.model.<name>.lora_A.weight`` ``(r, k)`` and ``...lora_B.weight`` ``(d, r)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flexlora.core.errors import AdapterError
from flexlora.core.lora import LoraFactors, LoraUpdate, alpha_problem
from flexlora.core.patterns import MatchBudget, PatternError, compile_key, key_matches
from flexlora.core.safetensors_io import read_safetensors, write_safetensors

__all__ = ["AdapterConfig", "read_adapter", "write_adapter", "pattern_value", "atomic_directory"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin")
_PREFIX = "base_model.model."
#: adapter_config.json larger than this is refused before parsing (ours: ~200 bytes per module).
MAX_CONFIG_BYTES = 8 * 2**20
#: total automaton states of the pattern keys of one config that need the NFA (repeats, alternation).
MAX_PATTERN_STATES = 20_000
#: matching work for all pattern lookups of one adapter (see MatchBudget): 2-8 s for the worst NFA keys on a
#: loaded core; an adapter we write for 560 modules with 3 ranks and 5 alphas (821 keys) spends 2.9e5.
MAX_MATCH_WORK = 600_000
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass
class AdapterConfig:
    """The fields of ``adapter_config.json`` that define LoRA shapes and scales."""

    r: int
    lora_alpha: float
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    target_modules: list[str] | str | None = None
    base_model_name_or_path: str | None = None
    budget: MatchBudget | None = field(default=None, repr=False, compare=False)  # for untrusted configs

    def rank_for(self, module: str) -> int:
        return int(pattern_value(self.rank_pattern, module, self.r, self.budget))

    def alpha_for(self, module: str) -> float:
        return float(pattern_value(self.alpha_pattern, module, self.lora_alpha, self.budget))


def pattern_value(
    pattern: Mapping[str, float], module: str, default: float, budget: MatchBudget | None = None
) -> float:
    """PEFT's lookup: the first key ``K`` with ``re.match(rf"(.*\\.)?({K})$", module)``, else ``default``
    (matched in linear time by :func:`flexlora.core.patterns.key_matches`)."""
    for key, value in pattern.items():
        if key_matches(key, module, budget):
            return value
    return default


def _read_config(path: Path) -> AdapterConfig:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterError(f"{path}: missing {CONFIG_NAME}")
    if (size := cfg_path.stat().st_size) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{cfg_path}: {size} bytes, more than the {MAX_CONFIG_BYTES} accepted")
    try:
        raw = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AdapterError(f"{cfg_path}: not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{cfg_path}: not a JSON object")
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {raw.get('peft_type')!r} is not LORA")
    r, alpha = raw.get("r", 8), raw.get("lora_alpha", 8)
    if not _positive_int(r):
        raise AdapterError(f"{cfg_path}: field 'r' must be a positive integer, got {r!r}")
    if problem := alpha_problem(alpha):
        raise AdapterError(f"{cfg_path}: field 'lora_alpha' {problem}")
    patterns = {name: _read_pattern(cfg_path, raw, name) for name in ("rank_pattern", "alpha_pattern")}
    states = sum(compile_key(k).states for p in patterns.values() for k in p)
    if states > MAX_PATTERN_STATES:
        raise AdapterError(
            f"{cfg_path}: pattern keys need {states} automaton states, more than {MAX_PATTERN_STATES}"
        )
    return AdapterConfig(
        r=r,
        lora_alpha=float(alpha),
        rank_pattern=patterns["rank_pattern"],
        alpha_pattern=patterns["alpha_pattern"],
        use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=raw.get("target_modules"),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
        budget=MatchBudget(MAX_MATCH_WORK),
    )


def _read_pattern(cfg_path: Path, raw: dict, name: str) -> dict:
    """``rank_pattern`` (values ranks >= 1) or ``alpha_pattern`` (values usable alphas), keys checked."""
    pattern = raw.get(name) or {}
    if not isinstance(pattern, dict):
        raise AdapterError(f"{cfg_path}: field {name!r} must be an object")
    for key, value in pattern.items():
        if name == "rank_pattern" and not _positive_int(value):
            raise AdapterError(f"{cfg_path}: {name}[{key!r}] must be a positive integer, got {value!r}")
        if name == "alpha_pattern" and (problem := alpha_problem(value)):
            raise AdapterError(f"{cfg_path}: {name}[{key!r}] {problem}")
        try:
            compile_key(key)
        except PatternError as exc:
            raise AdapterError(f"{cfg_path}: {name} key {key[:80]!r} is refused: {exc}") from None
    return dict(pattern)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def read_adapter(path: str | os.PathLike, num_examples: int = 1) -> tuple[LoraUpdate, AdapterConfig]:
    """Read a PEFT LoRA adapter directory into per-module factors.

    Raises:
        AdapterError: naming the directory and tensor: missing or malformed config, a pickle file
            instead of safetensors, a corrupt file, unknown tensors, a module with only A or B, ranks that
            disagree with each other or with the config, NaN or Inf values.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: not an adapter directory")
    config = _read_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [n for n in PICKLE_NAMES if (path / n).exists()]
        if pickled:
            raise AdapterError(
                f"{path}: found {pickled[0]} (a pickle) but no {WEIGHTS_NAME}; pickles are never loaded, "
                "re-save the adapter with safetensors"
            )
        raise AdapterError(f"{path}: missing {WEIGHTS_NAME}")
    tensors = read_safetensors(weights)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(
                f"{path}: tensor {key!r} is not a LoRA factor (expected {_PREFIX}<module>.lora_A.weight)"
            )
        if tensor.ndim != 2:
            raise AdapterError(f"{path}: tensor {key!r} has {tensor.ndim} dimensions, expected 2")
        if 0 in tensor.shape:
            raise AdapterError(f"{path}: tensor {key!r} has an empty shape {tuple(tensor.shape)}")
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{path}: tensor {key!r} has NaN or Inf values")
        parts.setdefault(m["module"], {})[m["part"]] = tensor
    if not parts:
        raise AdapterError(f"{path}: {WEIGHTS_NAME} holds no LoRA tensors")
    try:
        modules = _modules(path, parts, config)
    except PatternError as exc:
        raise AdapterError(f"{path}: {CONFIG_NAME}: {exc}") from None
    return LoraUpdate(modules, num_examples=num_examples, client_id=str(path)), config


def _modules(path: Path, parts: dict[str, dict[str, torch.Tensor]], config: AdapterConfig) -> dict:
    """Pair each module's A and B and check their rank against the config."""
    modules = {}
    for name in sorted(parts):
        if set(parts[name]) != {"A", "B"}:
            missing = ({"A", "B"} - set(parts[name])).pop()
            raise AdapterError(f"{path}: module {name!r} has no lora_{missing} tensor")
        A, B = parts[name]["A"], parts[name]["B"]
        if A.shape[0] != B.shape[1]:
            raise AdapterError(
                f"{path}: module {name!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} disagree on the rank"
            )
        if config.rank_for(name) != A.shape[0]:
            raise AdapterError(
                f"{path}: module {name!r}: config declares rank {config.rank_for(name)}, tensors have rank {A.shape[0]}"
            )
        modules[name] = LoraFactors(A, B, config.alpha_for(name), config.use_rslora)
    return modules


def _most_common(values: list) -> object:
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def write_adapter(
    path: str | os.PathLike, factors: Mapping[str, LoraFactors], base_model: str | None = None
) -> Path:
    """Write ``factors`` as a PEFT LoRA adapter directory that ``PeftModel.from_pretrained`` loads.

    The most common rank and alpha become ``r`` / ``lora_alpha``; every other module is listed in
    ``rank_pattern`` / ``alpha_pattern``. A module of rank 0 (an exactly zero update) is written as rank 1
    with zero factors, the same update in a form PEFT and :func:`read_adapter` accept. Written to a
    temporary directory and renamed into place.

    Raises:
        AdapterError: if ``factors`` is empty, mixes rsLoRA and plain scaling, or a module has an unusable
            alpha, an empty base dimension, or NaN/Inf values (nothing is written).
    """
    if not factors:
        raise AdapterError(f"{path}: no modules to write")
    factors = {name: _writable(path, name, f) for name, f in factors.items()}
    rslora = {f.use_rslora for f in factors.values()}
    if len(rslora) > 1:
        raise AdapterError(f"{path}: modules mix use_rslora True and False; PEFT has one flag per adapter")
    r = int(_most_common([f.rank for f in factors.values()]))
    alpha = float(_most_common([float(f.alpha) for f in factors.values()]))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {_anchored(n): f.rank for n, f in factors.items() if f.rank != r},
        "alpha_pattern": {
            _anchored(n): float(f.alpha) for n, f in factors.items() if float(f.alpha) != alpha
        },
        "use_rslora": rslora.pop(),
        "target_modules": sorted(factors),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    tensors = {}
    for name, f in factors.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = f.A
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = f.B
    with atomic_directory(path) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        write_safetensors(tmp / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    return Path(path)


def _writable(path: str | os.PathLike, name: str, f: LoraFactors) -> LoraFactors:
    """``f`` checked for writing; rank 0 becomes rank 1 with zero factors (the same, zero, update)."""
    if problem := alpha_problem(f.alpha):
        raise AdapterError(f"{path}: module {name!r}: lora_alpha {problem}")
    (d, _), (_, k) = f.B.shape, f.A.shape
    if d == 0 or k == 0:
        raise AdapterError(f"{path}: module {name!r}: empty base shape ({d}, {k})")
    if not (torch.isfinite(f.A).all() and torch.isfinite(f.B).all()):
        raise AdapterError(f"{path}: module {name!r}: factors have NaN or Inf values")
    if f.rank == 0:
        return LoraFactors(f.A.new_zeros(1, k), f.B.new_zeros(d, 1), f.alpha, f.use_rslora)
    return f


def _anchored(module: str) -> str:
    return "^" + re.escape(module)


class atomic_directory:
    """Context manager: yields a temporary sibling directory, renamed onto ``path`` on success
    (replacing it) and removed on failure, so readers never see a half-written directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        self.tmp.chmod(0o755)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for f in [*self.tmp.rglob("*"), self.tmp]:
            _fsync(f)
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            self.path.rename(old)
        self.tmp.rename(self.path)
        _fsync(self.path.parent)  # the renames themselves survive a power loss
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
