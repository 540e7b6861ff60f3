"""Evaluation of a model (with whatever adapter is installed) on clients' held-out examples.

Metrics per example, averaged over examples (each example weighs the same, whichever client):

* ``rougeL``: the Natural Instructions Rouge-L (stemmed, :func:`flexlora.rouge.rouge_l`) between the greedy
  generation and the reference, as in the paper; ``rougeL_unstemmed``: the same pair with our unstemmed
  all-script tokenizer (the Rouge-L of older records).
* ``loss``: teacher-forced mean cross-entropy over the response tokens (and its eos).
* ``tf_argmax_rougeL``: unstemmed Rouge-L between the argmax of the teacher-forced logits at the response
  positions and the reference (a cheap diagnostic; not the paper code's proxy: :mod:`flexlora.rouge`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flexlora.data.examples import ClientData, Example
from flexlora.models import model_device, response_logits
from flexlora.progress import advance
from flexlora.prompts import (
    DEFAULT_TEMPLATE,
    IGNORE_INDEX,
    TEMPLATES,
    collate,
    collate_prompts,
    encode_example,
    encode_prompt,
)
from flexlora.rouge import rouge_scores

__all__ = ["EvalConfig", "evaluate_clients", "evaluate_examples"]


@dataclass
class EvalConfig:
    """How to evaluate.

    Args:
        max_examples_per_client: the first this many examples of each client's split (``None``: all).
        batch_size: examples per forward pass / generation batch.
        max_new_tokens: greedy generation length limit.
        generate: compute ``rougeL`` by generation (the slow part); otherwise it is ``None``.
        template: prompt template, as in training.
        max_length: token budget of prompt + response (teacher forcing) and of prompt + new tokens
            (generation: prompts are trimmed to ``max_length - max_new_tokens``).
        per_example: also return every example's scores (for paired comparisons).
        generate_final_only: with ``generate``, a federation generates (``rougeL``) at its last round only;
            earlier evaluations take the loss and ``tf_argmax_rougeL`` (generation is the slow part).

    Raises:
        ValueError: every invalid field at once, each named with its value.
    """

    max_examples_per_client: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 48
    generate: bool = True
    template: str = DEFAULT_TEMPLATE
    max_length: int = 256
    per_example: bool = False
    generate_final_only: bool = False

    def __post_init__(self) -> None:
        errors = []
        m = self.max_examples_per_client
        if m is not None and not (isinstance(m, int) and not isinstance(m, bool) and m >= 1):
            errors.append(f"max_examples_per_client must be None or an integer >= 1, got {m!r}")
        for name in ("batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                errors.append(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.max_length, int) and self.max_length >= 2):
            errors.append(f"max_length must be an integer >= 2, got {self.max_length!r}")
        elif (
            self.generate and isinstance(self.max_new_tokens, int) and self.max_length <= self.max_new_tokens
        ):
            errors.append(
                f"max_length must exceed max_new_tokens when generating, got max_length={self.max_length}, "
                f"max_new_tokens={self.max_new_tokens}"
            )
        if self.template not in TEMPLATES:
            errors.append(f"template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")
        if errors:
            raise ValueError("invalid EvalConfig: " + "; ".join(errors))


def _batches(order: Sequence[int], size: int) -> Iterable[list[int]]:
    for i in range(0, len(order), size):
        yield list(order[i : i + size])
        advance(len(order[i : i + size]))  # the command's progress bar, if any


@torch.inference_mode()
def _teacher_forced(
    model, tokenizer, examples: Sequence[Example], cfg: EvalConfig
) -> list[tuple[float, str]]:
    """Per example: (mean response-token loss, decoded argmax of the logits at the response positions)."""
    device = model_device(model)
    encoded = [encode_example(tokenizer, ex, cfg.max_length, "response", cfg.template) for ex in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))  # less padding
    out: list[tuple[float, str]] = [(0.0, "")] * len(encoded)
    for idx in _batches(order, cfg.batch_size):
        batch = {
            k: v.to(device) for k, v in collate([encoded[i] for i in idx], tokenizer.pad_token_id).items()
        }
        logits, targets = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()  # rows are contiguous in logits
        token_loss = F.cross_entropy(logits, targets, reduction="none").split(counts)
        argmax = logits.argmax(dim=-1).split(counts)
        for i, loss, pred in zip(idx, token_loss, argmax, strict=True):
            text = tokenizer.decode(pred.tolist(), skip_special_tokens=True).strip()
            out[i] = (loss.mean().item() if len(loss) else float("nan"), text)
    return out


@torch.inference_mode()
def _generate(model, tokenizer, examples: Sequence[Example], cfg: EvalConfig) -> list[str]:
    """Greedy generations, batched with left padding, each cut at its first eos."""
    from transformers import GenerationConfig

    device = model_device(model)
    eos = tokenizer.eos_token_id
    gen_config = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    prompts = [
        encode_prompt(tokenizer, ex, cfg.max_length - cfg.max_new_tokens, cfg.template) for ex in examples
    ]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts = [""] * len(prompts)
    for idx in _batches(order, cfg.batch_size):
        batch = {
            k: v.to(device)
            for k, v in collate_prompts([prompts[i] for i in idx], tokenizer.pad_token_id).items()
        }
        output = model.generate(**batch, generation_config=gen_config)
        new = output[:, batch["input_ids"].shape[1] :].tolist()  # (b, <= max_new_tokens)
        for i, ids in zip(idx, new, strict=True):
            if eos in ids:
                ids = ids[: ids.index(eos)]
            texts[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return texts


def evaluate_examples(
    model, tokenizer, examples: Sequence[Example], cfg: EvalConfig | None = None
) -> list[dict]:
    """Score each example.

    Args:
        model: a causal LM in any mode (evaluated in eval mode, restored after), with its adapter installed.
        tokenizer: its tokenizer (with a pad token).
        examples: the examples.
        cfg: evaluation settings (default :class:`EvalConfig`).

    Returns:
        One dict per example, in order: ``loss``, ``rougeL``, ``rougeL_unstemmed`` (both ``None`` without
        generation), ``tf_argmax_rougeL``, ``prediction`` (the generation, or ``None``).
    """
    cfg = cfg or EvalConfig()
    was_training = model.training
    model.eval()
    try:
        forced = _teacher_forced(model, tokenizer, examples, cfg)
        generated = _generate(model, tokenizer, examples, cfg) if cfg.generate else [None] * len(examples)
    finally:
        model.train(was_training)
    results = []
    for ex, (loss, argmax_text), text in zip(examples, forced, generated, strict=True):
        results.append(
            {
                "loss": loss,
                **rouge_scores(text, argmax_text, ex.output),
                "prediction": text,
            }
        )
    return results


def _summary(rows: Sequence[dict]) -> dict:
    n = len(rows)
    out = {key: sum(r[key] for r in rows) / n for key in ("loss", "tf_argmax_rougeL")}
    for key in ("rougeL", "rougeL_unstemmed"):  # None without generation
        out[key] = None if rows[0][key] is None else sum(r[key] for r in rows) / n
    return {**out, "num_examples": n}


def evaluate_clients(
    model, tokenizer, clients: Iterable[ClientData], split: str = "test", cfg: EvalConfig | None = None
) -> dict:
    """Evaluate ``model`` as given on the clients' ``split`` examples.

    Args:
        model: the base model with the adapter to evaluate installed (e.g. ``LoraHost.model`` after
            ``LoraHost.load``), on any device.
        tokenizer: its tokenizer.
        clients: clients whose examples to use; the first ``cfg.max_examples_per_client`` of each.
        split: ``"train"``, ``"eval"`` or ``"test"``.
        cfg: evaluation settings (default :class:`EvalConfig`).

    Returns:
        ``{"rougeL", "rougeL_unstemmed", "loss", "tf_argmax_rougeL", "num_examples", "num_clients",
        "per_category", "per_client", "seconds"}``: means over examples (the generated Rouge-L metrics are
        ``None`` when ``cfg.generate`` is off);
        ``per_category`` maps each category (the example's, else its client's) and ``per_client`` each client id
        to the same means and ``num_examples`` (paired tests over clients need the latter). With
        ``cfg.per_example``, also ``"per_example"``: one dict per example with ``client_id``, ``category``,
        its scores and the ``prediction``.

    Raises:
        ValueError: bad split, or no example to evaluate.
    """
    cfg = cfg or EvalConfig()
    start = time.perf_counter()
    examples: list[Example] = []
    owners: list[tuple[str, str]] = []  # (client_id, category) per example
    num_clients = 0
    for client in clients:
        chosen = client.split(split)[: cfg.max_examples_per_client]
        num_clients += bool(chosen)
        examples.extend(chosen)
        owners.extend((client.client_id, ex.category or client.info.category) for ex in chosen)
    if not examples:
        raise ValueError(f"no {split!r} examples to evaluate in the given clients")
    rows = evaluate_examples(model, tokenizer, examples, cfg)
    for row, (client_id, category) in zip(rows, owners, strict=True):
        row["client_id"], row["category"] = client_id, category
    by_category: dict[str, list[dict]] = {}
    by_client: dict[str, list[dict]] = {}
    for row in rows:
        by_category.setdefault(row["category"], []).append(row)
        by_client.setdefault(row["client_id"], []).append(row)
    result = _summary(rows)
    result["num_clients"] = num_clients
    result["per_category"] = {cat: _summary(group) for cat, group in sorted(by_category.items())}
    result["per_client"] = {cid: _summary(group) for cid, group in by_client.items()}
    result["seconds"] = time.perf_counter() - start
    if cfg.per_example:
        result["per_example"] = rows
    return result
