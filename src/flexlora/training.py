"""Local training of one client: a :class:`TrainJob` in, a :class:`TrainResult` out.

The client's adapter is installed into the shared base model with :class:`~flexlora.lora_host.LoraHost`,
trained for a fixed number of optimizer steps on seeded batches, read back and removed again. The same job
gives a bit-identical result on CPU (batch order, dropout and the adapter's throw-away initialisation are
all seeded by ``job.seed``, under a forked RNG so the caller's RNG is untouched).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from flexlora.client_regularisers import regularised
from flexlora.contracts import TrainJob, TrainResult
from flexlora.core.lora import LoraUpdate
from flexlora.data.examples import ClientData, Example
from flexlora.lora_host import LoraHost
from flexlora.models import model_device, response_logits
from flexlora.precision import PRECISIONS, autocast, resolve_precision
from flexlora.prompts import DEFAULT_TEMPLATE, IGNORE_INDEX, LOSS_ON, TEMPLATES, collate, encode_example

__all__ = [
    "LENGTH_WINDOW",
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainConfig",
    "batch_order",
    "group_by_length",
    "optimise",
    "run_train_job",
]

SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
# our schedule name -> transformers.get_scheduler name (all with linear warmup from 0)
_HF_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
#: consecutive batches whose examples :func:`group_by_length` regroups by length
LENGTH_WINDOW = 16


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class TrainConfig:
    """How a client trains its adapter in one round.

    Args:
        steps: optimizer steps per round (set exactly one of ``steps`` and ``epochs``; to train by epochs,
            set ``steps=None``).
        epochs: passes over the client's training examples per round (may be fractional); the step count is
            ``ceil(epochs * n / (batch_size * grad_accum))`` for ``n`` examples.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step; the loss is averaged over all response tokens of the
            step, exactly as one batch of ``batch_size * grad_accum`` would be.
        lr: peak learning rate.
        schedule: ``constant``, ``linear`` (decay to 0) or ``cosine`` (to 0), after ``warmup_steps`` of linear
            warmup from 0.
        warmup_steps: linear warmup steps.
        optimizer: ``adamw`` or ``sgd`` (no momentum).
        weight_decay: decoupled for AdamW, L2 for SGD; on the LoRA factors only.
        max_grad_norm: clip the global gradient norm of the trainable factors; ``None`` or 0: no clipping.
        loss_on: ``response`` (loss on response tokens only) or ``all``.
        max_length: token budget per example (truncation policy in :mod:`flexlora.prompts`).
        template: prompt template, one of :data:`flexlora.prompts.TEMPLATES`.
        precision: ``fp32`` (default: bit-identical to the results already committed, and the only fast
            choice on a CPU without bfloat16 units), ``bf16`` (autocast, float32 master factors and
            optimizer) or ``auto`` (``bf16`` where the hardware has it); see :mod:`flexlora.precision`.
        group_by_length: regroup each window of :data:`LENGTH_WINDOW` batches so that examples of similar
            length share a batch (less padding); the same examples in the same window, deterministic per
            seed (see :func:`group_by_length`). Off by default: it changes which examples meet in a batch.

    Raises:
        ValueError: every invalid field at once, each named with its value.
    """

    steps: int | None = 10
    epochs: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    loss_on: str = "response"
    max_length: int = 256
    template: str = DEFAULT_TEMPLATE
    precision: str = "fp32"
    group_by_length: bool = False

    def __post_init__(self) -> None:
        errors = []
        if (self.steps is None) == (self.epochs is None):
            errors.append(
                f"set exactly one of steps and epochs, got steps={self.steps!r}, epochs={self.epochs!r} "
                "(to train by epochs, set steps=None)"
            )
        if self.steps is not None and not (_is_int(self.steps) and self.steps >= 1):
            errors.append(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.epochs is not None and not (_is_number(self.epochs) and self.epochs > 0):
            errors.append(f"epochs must be a number > 0, got {self.epochs!r}")
        for name in ("batch_size", "grad_accum", "max_length"):
            value = getattr(self, name)
            if not (_is_int(value) and value >= (2 if name == "max_length" else 1)):
                errors.append(
                    f"{name} must be an integer >= {2 if name == 'max_length' else 1}, got {value!r}"
                )
        if not (_is_int(self.warmup_steps) and self.warmup_steps >= 0):
            errors.append(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not (_is_number(self.lr) and self.lr > 0):
            errors.append(f"lr must be a number > 0, got {self.lr!r}")
        if not (_is_number(self.weight_decay) and self.weight_decay >= 0):
            errors.append(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not (
            _is_number(self.max_grad_norm) and self.max_grad_norm >= 0
        ):
            errors.append(f"max_grad_norm must be None or a number >= 0, got {self.max_grad_norm!r}")
        for name, allowed in (
            ("schedule", SCHEDULES),
            ("optimizer", OPTIMIZERS),
            ("loss_on", LOSS_ON),
            ("template", TEMPLATES),
            ("precision", PRECISIONS),
        ):
            if getattr(self, name) not in allowed:
                errors.append(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not isinstance(self.group_by_length, bool):
            errors.append(f"group_by_length must be true or false, got {self.group_by_length!r}")
        if errors:
            raise ValueError("invalid TrainConfig: " + "; ".join(errors))

    def num_steps(self, num_examples: int) -> int:
        """Optimizer steps for a client with ``num_examples`` training examples."""
        if self.steps is not None:
            return self.steps
        micro_batches = math.ceil(self.epochs * num_examples / self.batch_size)
        return max(1, math.ceil(micro_batches / self.grad_accum))


def batch_order(
    num_examples: int, batch_size: int, num_batches: int, generator: torch.Generator
) -> list[list[int]]:
    """Example indices of ``num_batches`` full batches drawn from consecutive random permutations.

    The permutations are concatenated into one stream cut into batches, so every batch is full and every
    example is seen once per pass (a batch may straddle two passes, and with ``num_examples < batch_size``
    a batch repeats examples).

    Args:
        num_examples: ``n``.
        batch_size: indices per batch.
        num_batches: batches to return.
        generator: the seeded generator that draws the permutations.

    Returns:
        ``num_batches`` lists of ``batch_size`` indices in ``[0, n)``.
    """
    needed = batch_size * num_batches
    stream: list[int] = []
    while len(stream) < needed:
        stream.extend(torch.randperm(num_examples, generator=generator).tolist())
    return [stream[i * batch_size : (i + 1) * batch_size] for i in range(num_batches)]


def group_by_length(
    batches: Sequence[Sequence[int]],
    lengths: Sequence[int] | Mapping[int, int],
    generator: torch.Generator,
    window: int = LENGTH_WINDOW,
) -> list[list[int]]:
    """Regroup ``batches`` so that examples of similar length share a batch.

    Each window of ``window`` consecutive batches is pooled, sorted by length (ties keep their order),
    cut again into batches of the same sizes, and those batches are put in a random order drawn from
    ``generator``. Every example stays in its window, so the result is a permutation of the same examples
    per window and a function of (batches, lengths, generator state) only: methods that share a seed and the
    data train on the same examples in the same steps.

    Args:
        batches: example indices per batch (e.g. from :func:`batch_order`).
        lengths: token count of every example, indexed by example index.
        generator: seeded generator for the order of the regrouped batches.
        window: batches pooled per window.

    Returns:
        As many batches, of the same sizes, window by window.
    """
    out: list[list[int]] = []
    for start in range(0, len(batches), window):
        group = batches[start : start + window]
        pooled = sorted((i for batch in group for i in batch), key=lambda i: lengths[i])
        cut, begin = [], 0
        for batch in group:
            cut.append(pooled[begin : begin + len(batch)])
            begin += len(batch)
        out.extend(cut[j] for j in torch.randperm(len(cut), generator=generator).tolist())
    return out


def _optimizer(cfg: TrainConfig, params: Sequence[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def optimise(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    params: Sequence[torch.nn.Parameter],
    cfg: TrainConfig,
    seed: int,
) -> dict[str, float]:
    """Train ``params`` of ``model`` on ``examples`` for ``cfg.num_steps(len(examples))`` optimizer steps.

    Batch order and dropout are seeded by ``seed`` under a forked RNG (the caller's RNG is untouched), so
    the same call gives bit-identical results on CPU. Each step takes ``grad_accum`` micro-batches and its
    loss is the sum over the step's loss tokens divided by their count (equal to one big batch). Logits are
    taken at the labelled positions only (:func:`flexlora.models.response_logits`); the forward pass runs at
    ``cfg.precision`` and the loss in float32.

    Returns:
        ``train_loss`` (mean over steps), ``train_loss_last``, ``steps``, ``seconds``, ``tokens``
        (non-padding tokens seen), ``loss_tokens``.
    """
    start = time.perf_counter()
    device = model_device(model)
    example = _LazyEncoding(tokenizer, examples, cfg)
    num_steps = cfg.num_steps(len(examples))
    precision = resolve_precision(cfg.precision, device)
    was_training = model.training
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)  # dropout
            generator = torch.Generator().manual_seed(seed)  # batch order
            batches = _step_batches(len(examples), num_steps, cfg, generator, example)
            optimizer = _optimizer(cfg, params)
            scheduler = _scheduler(cfg, optimizer, num_steps)
            model.train()
            losses, tokens, loss_tokens = [], 0, 0
            for step in range(num_steps):
                micro = [
                    collate([example(i) for i in idx], tokenizer.pad_token_id)
                    for idx in batches[step * cfg.grad_accum : (step + 1) * cfg.grad_accum]
                ]
                step_loss, step_seen, step_tokens = _accumulate(model, micro, precision)
                _step(params, optimizer, scheduler, cfg)
                losses.append(step_loss)
                tokens += step_seen
                loss_tokens += step_tokens
    finally:
        model.train(was_training)
    return {
        "train_loss": sum(losses) / len(losses),
        "train_loss_last": losses[-1],
        "steps": float(num_steps),
        "seconds": time.perf_counter() - start,
        "tokens": float(tokens),
        "loss_tokens": float(loss_tokens),
    }


class _LazyEncoding:
    """``self(i)``: example ``i`` tokenized for training, on first use only (a run tokenizes just the
    examples its batches use)."""

    def __init__(self, tokenizer, examples: Sequence[Example], cfg: TrainConfig) -> None:
        self.tokenizer, self.examples, self.cfg = tokenizer, examples, cfg
        self.encoded: dict[int, dict[str, list[int]]] = {}

    def __call__(self, i: int) -> dict[str, list[int]]:
        if i not in self.encoded:
            cfg = self.cfg
            self.encoded[i] = encode_example(
                self.tokenizer, self.examples[i], cfg.max_length, cfg.loss_on, cfg.template
            )
        return self.encoded[i]


def _step_batches(
    num_examples: int, num_steps: int, cfg: TrainConfig, generator: torch.Generator, example: _LazyEncoding
) -> list[list[int]]:
    """The ``num_steps * grad_accum`` micro-batches of example indices, drawn from ``generator``
    (:func:`batch_order`), regrouped by tokenized length when ``cfg.group_by_length``."""
    batches = batch_order(num_examples, cfg.batch_size, num_steps * cfg.grad_accum, generator)
    if cfg.group_by_length:
        lengths = {i: len(example(i)["input_ids"]) for batch in batches for i in batch}
        batches = group_by_length(batches, lengths, generator)
    return batches


def _scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, num_steps: int):
    """``cfg.schedule`` over ``num_steps`` optimizer steps, after ``cfg.warmup_steps`` of linear warmup."""
    from transformers import get_scheduler

    return get_scheduler(
        _HF_SCHEDULES[cfg.schedule],
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=num_steps,
    )


def _accumulate(model: nn.Module, micro: Sequence[dict], precision: str) -> tuple[float, int, int]:
    """Forward and backward over one step's micro-batches, accumulating gradients of the step's loss
    ``sum over its loss tokens of the cross-entropy / their count`` (equal to one big batch).

    Returns:
        The step's loss, the non-padding tokens seen, and the loss tokens.
    """
    device = model_device(model)
    step_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
    step_loss, tokens = 0.0, 0
    for batch in micro:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(precision, device):
            logits, targets = response_logits(
                model, batch["input_ids"], batch["attention_mask"], batch["labels"]
            )  # (n, vocab) float32, (n,)
        loss = F.cross_entropy(logits, targets, reduction="sum") / max(step_tokens, 1)
        loss.backward()
        step_loss += loss.item()
        tokens += int(batch["attention_mask"].sum())
    return step_loss, tokens, step_tokens


def _step(
    params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler, cfg: TrainConfig
) -> None:
    """One optimizer step on the accumulated gradients (clipped to ``cfg.max_grad_norm`` when set), then
    the schedule's step; gradients are cleared."""
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def run_train_job(
    host: LoraHost, tokenizer, data: ClientData, job: TrainJob, cfg: TrainConfig, keep_adapter: bool = False
) -> TrainResult:
    """Train one client's adapter for one round.

    Installs ``job.init`` (plus ``job.frozen`` and ``job.freeze_A``) into ``host``, trains on ``data.train``
    and unloads the adapter again, always on error, and on success unless ``keep_adapter`` (the next client
    at the same ranks then reuses the injected adapter; the caller unloads when done).

    Args:
        host: holds the base model (on CPU or CUDA; batches follow the model's device).
        tokenizer: the model's tokenizer (with a pad token).
        data: the client's examples; ``data.train`` is used.
        job: which adapter to start from, and the seed of batch order and dropout.
        cfg: the training hyperparameters (``job.optimizer``, the method's, replaces ``cfg.optimizer``).

    Returns:
        ``TrainResult`` with ``update = LoraUpdate(trained factors, num_examples=len(data.train),
        client_id=job.client_id)`` (CPU float32) and metrics ``train_loss`` (mean over steps of the step's
        per-token loss), ``train_loss_last``, ``steps``, ``seconds``, ``tokens`` (non-padding tokens seen)
        and ``loss_tokens`` (tokens the loss was taken on).

    Raises:
        ValueError: ``job.client_id`` is not ``data``'s client, or the client has no training examples.
        flexlora.core.errors.AdapterError: ``job.init`` or ``job.frozen`` does not fit the model.
    """
    if job.client_id != data.client_id:
        raise ValueError(f"job is for client {job.client_id!r} but the data is client {data.client_id!r}")
    if not data.train:
        raise ValueError(f"client {data.client_id!r} has no training examples; it cannot train")
    cfg = cfg if job.optimizer is None else replace(cfg, optimizer=job.optimizer)
    host.load(job.init, job.frozen, job.freeze_A)
    try:
        with regularised(host, job):  # a method's client-side extras (hetlora-cho's tail penalty, pruning)
            metrics = optimise(host.model, tokenizer, data.train, host.trainable_parameters(), cfg, job.seed)
        trained = host.export()
    except BaseException:
        host.unload()
        raise
    if not keep_adapter:
        host.unload()
    update = LoraUpdate(trained, num_examples=len(data.train), client_id=job.client_id)
    return TrainResult(update=update, metrics=metrics)
