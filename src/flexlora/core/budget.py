"""A client's budget, and what one training step costs at a rank type: peak memory and FLOPs, by arithmetic.

The estimate follows one optimizer step of :func:`flexlora.training.optimise` on a Llama-like decoder with a
frozen base and LoRA on the targets (AdamW, no dropout, every position a label: the worst case of the batch
shape). With ``T = batch * seq_len`` tokens, ``L`` layers, hidden ``h``, MLP width ``i``, vocabulary ``V``
and ``a`` bytes per activation, the peak is the sum of

* ``weights``: every base parameter, ``P * a``;
* ``lora``: five float32 copies of the factors, ``5 * 4 * sum_m r_m (d_m + k_m)``: the factors, their
  gradients, AdamW's two moments, and one more of the same size alive at the peak (torch's multi-tensor AdamW
  writes ``sqrt(v)`` to a new buffer). Measured: 20.3 bytes per LoRA parameter (the peak-RSS slope from
  ``r8`` to ``attn30-mlp200`` and ``r200`` on the 8-layer model of ``tests/test_budget_oom.py``); with four
  copies that test's tight ``attn30-mlp200`` client ran out of memory. Where activations dominate (SmolLM2)
  the peak is in the backward pass, before that buffer exists, and the fifth copy is slack;
* ``activations``: what autograd keeps for the backward pass, per layer and token: the two RMSNorm inputs
  (``2 h``), attention's query, key, value and output (``4 h``) and the MLP's SiLU input, SiLU output and up
  projection (``3 i``); plus what LoRA adds: each LoRA input once (``h`` for the attention input, ``h`` for
  the MLP input, ``h`` for ``o_proj``, ``i`` for ``down_proj``) and each module's ``A x`` (``r_m``);
* ``logits``: the response logits, their log-softmax and the two gradients alive in the backward pass,
  ``4 * T * V * 4`` (float32);
* ``allowance``: ``ALLOWANCE = 0.4`` of activations and logits, for what the terms above leave out (autograd's
  transient gradients, the allocator's fragmentation): the smallest multiple of 0.1 that made the estimate an
  upper bound of all eight measured SmolLM2 peaks (``docs/ranks.md``) with four LoRA copies; the fifth only
  raised the estimate, so a budget chosen by estimate holds;
* ``runtime``: the interpreter with torch, transformers and PEFT imported (on CPU: the measured peak RSS of
  training the tiny model, whose own tensors take under 5 MB; 0 on CUDA, where only allocations count).

FLOPs per step: the frozen base costs its forward matmuls twice (forward, and the gradient w.r.t. its input;
no weight gradient), ``4 T P_lin`` with ``P_lin`` the decoder's linear parameters, plus the output projection
``4 T h V`` and attention ``8 T seq_len h`` per layer (scores and weighted sum, forward and backward); each
LoRA module costs ``6 T r (d + k)`` (forward, and gradients w.r.t. its input, ``A`` and ``B``).

Checked against measured peak RSS on SmolLM2 in ``docs/ranks.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flexlora.core.ranks import RankType, module_ranks

__all__ = [
    "ALLOWANCE",
    "GIB",
    "LORA_COPIES",
    "RUNTIME_BYTES",
    "Budget",
    "BudgetError",
    "Cost",
    "ModelDims",
    "StepShape",
    "choose",
    "estimate",
    "reason",
]

GIB = 1024**3
#: Resident memory of a CPU process with torch, transformers and PEFT imported (measured, module doc).
RUNTIME_BYTES = int(0.40 * GIB)
#: Share of activations and logits added for transients and fragmentation (calibrated, module doc).
ALLOWANCE = 0.4
#: Float32 copies of the LoRA factors alive at a training step's peak (module doc).
LORA_COPIES = 5
_FP32 = 4
_QKV = frozenset({"q_proj", "k_proj", "v_proj"})
_GATE_UP = frozenset({"gate_proj", "up_proj"})


class BudgetError(ValueError):
    """No rank type fits a client's budget."""


@dataclass(frozen=True)
class Budget:
    """A client's resources: memory in GiB and, optionally, seconds of local training per round.

    Raises:
        ValueError: a budget that is not a positive finite number.
    """

    memory_gb: float
    seconds_per_round: float | None = None

    def __post_init__(self) -> None:
        for key in ("memory_gb", "seconds_per_round"):
            value = getattr(self, key)
            if value is None and key == "seconds_per_round":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
                raise ValueError(f"{key.replace('_', '-')} must be a positive number, got {value!r}")

    @classmethod
    def from_dict(cls, raw: Mapping[str, object]) -> Budget:
        """From ``{"memory_gb": 4, "seconds_per_round": 60}`` (dashes or underscores).

        Raises:
            ValueError: unknown keys, or a missing or bad value.
        """
        if not isinstance(raw, Mapping):
            raise ValueError(f"a budget must be a mapping like {{memory_gb: 4}}, got {raw!r}")
        keys = {str(k).replace("-", "_"): v for k, v in raw.items()}
        unknown = sorted(set(keys) - {"memory_gb", "seconds_per_round"})
        if unknown:
            raise ValueError(f"unknown budget key(s) {unknown}: use memory_gb and seconds_per_round")
        if "memory_gb" not in keys:
            raise ValueError(f"a budget needs memory_gb, got {dict(raw)!r}")
        return cls(keys["memory_gb"], keys.get("seconds_per_round"))


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a Llama-like decoder that the estimate needs (``params``: every base parameter)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    params: int
    linear_params: int


@dataclass(frozen=True)
class StepShape:
    """One optimizer step: ``batch`` sequences of ``seq_len`` tokens, ``dtype_bytes`` per base element."""

    batch: int
    seq_len: int
    dtype_bytes: int = _FP32

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


@dataclass(frozen=True)
class Cost:
    """Peak memory of a training step by part (bytes), and its FLOPs."""

    rank_type: str
    weights: int
    lora: int
    activations: int
    logits: int
    allowance: int
    runtime: int
    flops: float

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.activations + self.logits + self.allowance + self.runtime


def _kind(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def estimate(
    dims: ModelDims,
    shapes: Mapping[str, tuple[int, int]],
    rank_type: RankType,
    step: StepShape,
    runtime: int = RUNTIME_BYTES,
) -> Cost:
    """Estimated peak memory and FLOPs of one training step at ``rank_type`` (module doc for the terms).

    Args:
        dims: the base model's sizes.
        shapes: ``{module: (d, k)}`` of the LoRA targets (ranks are clipped to ``min(d, k)``).
        rank_type: the client's rank type.
        step: batch shape and base dtype.
        runtime: bytes of the process before the model (0 on CUDA).

    Returns:
        The :class:`Cost`; non-decreasing in every module's rank.
    """
    ranks = module_ranks(rank_type, shapes)
    T, a, h, i = step.tokens, step.dtype_bytes, dims.hidden, dims.intermediate
    lora_params = sum(r * sum(shapes[m]) for m, r in ranks.items())
    kinds = {_kind(m) for m in ranks}
    per_layer = 2 * h + 4 * h + 3 * i  # norms, attention, MLP (elements per token)
    per_layer += h * bool(kinds & _QKV) + h * bool(kinds & _GATE_UP)
    per_layer += h * ("o_proj" in kinds) + i * ("down_proj" in kinds)
    lora_acts = sum(ranks.values())  # A x of every module, over all layers (elements per token)
    base_flops = 4 * T * (dims.linear_params + h * dims.vocab) + 8 * T * step.seq_len * h * dims.layers
    activations = T * (dims.layers * per_layer * a + lora_acts * _FP32)
    logits = 4 * T * dims.vocab * _FP32
    return Cost(
        rank_type=rank_type.name,
        weights=dims.params * a,
        lora=LORA_COPIES * _FP32 * lora_params,
        activations=activations,
        logits=logits,
        allowance=int(ALLOWANCE * (activations + logits)),
        runtime=runtime,
        flops=float(base_flops + 6 * T * lora_params),
    )


def _need(peak: int, seconds: float, budget: Budget, steps_per_round: int | None) -> str:
    """``"1.20 GiB"`` (and ``"and 8.1 s per round"`` under a time budget): what a rank type needs."""
    need = f"{peak / GIB:.2f} GiB"
    if budget.seconds_per_round is not None:
        need += f" and {seconds * steps_per_round:.1f} s per round"
    return need


def _have(budget: Budget) -> str:
    seconds = budget.seconds_per_round
    return f"{budget.memory_gb:g} GiB" + (f" and {seconds:g} s per round" if seconds is not None else "")


def _fits(peak: int, seconds: float, budget: Budget, steps_per_round: int | None) -> tuple[bool, bool]:
    """Whether a rank type's memory, and its round time, fit the budget."""
    memory = peak <= budget.memory_gb * GIB
    time = budget.seconds_per_round is None or seconds * steps_per_round <= budget.seconds_per_round
    return memory, time


def choose(
    costs: Sequence[tuple[str, int, float]], budget: Budget, steps_per_round: int | None = None
) -> str:
    """The largest rank type that fits the budget.

    Args:
        costs: ``(rank type, peak bytes, seconds per step)`` from smallest to largest type.
        budget: the client's memory (and time) budget.
        steps_per_round: optimizer steps of a round (needed for a time budget).

    Returns:
        The name of the last rank type in ``costs`` whose memory (and round time) fits.

    Raises:
        BudgetError: nothing fits; one line naming the budget and the smallest type's need.
    """
    if budget.seconds_per_round is not None and not steps_per_round:
        raise BudgetError("a time budget needs a fixed number of steps per round (train.steps)")
    fitting = [name for name, peak, seconds in costs if all(_fits(peak, seconds, budget, steps_per_round))]
    if fitting:
        return fitting[-1]
    name, peak, seconds = costs[0]
    raise BudgetError(
        f"no rank type fits a budget of {_have(budget)}: the smallest, {name}, "
        f"needs {_need(peak, seconds, budget, steps_per_round)}"
    )


def reason(
    costs: Sequence[tuple[str, int, float]], budget: Budget, steps_per_round: int | None = None
) -> str:
    """Why :func:`choose` takes its rank type, in one line: what it needs, and what the next type up would
    need beyond the budget (e.g. ``"r30 needs 0.52 GiB and 8.1 s per round of a budget of 64 GiB and 10 s per
    round; attn30-mlp200 would need 12.3 s per round"``).

    Raises:
        BudgetError: as :func:`choose`.
    """
    name = choose(costs, budget, steps_per_round)
    i = next(i for i, row in enumerate(costs) if row[0] == name)
    line = f"{name} needs {_need(*costs[i][1:], budget, steps_per_round)} of a budget of {_have(budget)}"
    if i == len(costs) - 1:
        return line + "; it is the largest rank type"
    above, peak, seconds = costs[i + 1]
    memory, time = _fits(peak, seconds, budget, steps_per_round)
    over = [] if memory else [f"{peak / GIB:.2f} GiB"]
    if not time:
        over.append(f"{seconds * steps_per_round:.1f} s per round")
    return f"{line}; {above} would need {' and '.join(over)}"
