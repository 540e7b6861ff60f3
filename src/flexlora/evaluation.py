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
from flexlora.precision import PRECISIONS, autocast, resolve_precision
from flexlora.progress import advance
from flexlora.prompts import (
    DEFAULT_TEMPLATE,
    IGNORE_INDEX,
    TEMPLATES,
    collate,
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
        precision: ``fp32`` (default; the scores of every committed result), ``bf16`` (autocast) or
            ``auto``, as ``train.precision`` (:mod:`flexlora.precision`).

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
    precision: str = "fp32"

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
        if self.precision not in PRECISIONS:
            errors.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if errors:
            raise ValueError("invalid EvalConfig: " + "; ".join(errors))


def _batches(order: Sequence[int], size: int) -> Iterable[list[int]]:
    for i in range(0, len(order), size):
        yield list(order[i : i + size])
        advance(len(order[i : i + size]))  # the command's progress bar, if any


def _prompt_length(encoded: dict[str, list[int]]) -> int:
    """Leading unlabelled tokens of an encoded example: its prompt."""
    return next((j for j, label in enumerate(encoded["labels"]) if label != IGNORE_INDEX), 0)


@torch.inference_mode()
def _greedy(
    model, cache, lengths: torch.Tensor, first: torch.Tensor, cfg: EvalConfig, eos: int, precision: str
):
    """Greedy continuation of ``b`` right-padded prompts whose keys and values fill ``cache``.

    Row ``i``'s prompt occupies columns ``[0, lengths[i])`` of the cache (columns up to the cache's width
    beyond it are masked out); ``first[i]`` is its first new token (the argmax at position ``lengths[i] - 1``).
    New token ``s`` of row ``i`` sits at position ``lengths[i] + s``. A row leaves the batch (and the cache)
    at its eos, so finished rows cost nothing.

    Returns:
        Per row its new tokens (through its eos, at most ``cfg.max_new_tokens``); all but the last went
        through the model.
    """
    width = cache.get_seq_length()
    device = first.device
    out: list[list[int]] = [[] for _ in range(len(first))]
    alive = torch.arange(len(first), device=device)
    mask = (torch.arange(width, device=device)[None] < lengths[:, None]).long()  # (b, width)
    token = first
    for step in range(cfg.max_new_tokens):
        for row, t in zip(alive.tolist(), token.tolist(), strict=True):
            out[row].append(t)
        keep = token != eos
        if step == cfg.max_new_tokens - 1 or not keep.any():
            break
        if not keep.all():
            alive, token, lengths, mask = alive[keep], token[keep], lengths[keep], mask[keep]
            cache.batch_select_indices(keep.nonzero().squeeze(1))
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        with autocast(precision, device):
            logits = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=(lengths + step)[:, None],
                cache=cache,
                use_cache=True,
            ).logits[:, -1]
        token = logits.argmax(dim=-1)
    return out


@torch.inference_mode()
def _prefill(model, prompts: Sequence[Sequence[int]], pad_id: int, precision: str):
    """Run right-padded ``prompts`` into a new cache; return ``(cache, lengths, first new tokens)``."""
    from transformers import DynamicCache

    device = model_device(model)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
    ids = ids.to(device)
    mask = (torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]).long()
    cache = DynamicCache(config=model.config)
    with autocast(precision, device):
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        last = hidden.last_hidden_state[torch.arange(len(prompts), device=device), lengths - 1]
        first = model.get_output_embeddings()(last).argmax(dim=-1)
    return cache, lengths, first


@torch.inference_mode()
def _score(model, tokenizer, examples: Sequence[Example], cfg: EvalConfig) -> list[dict]:
    """Per example: mean response-token loss, decoded argmax of the teacher-forced logits at the response
    positions, the greedy generation (``None`` without ``cfg.generate``) and the tokens it cost.

    Batches are sorted by length (less padding). When an example's generation prompt is exactly the prompt
    of its teacher-forced sequence (neither was trimmed), generation continues from the teacher-forced
    pass's keys and values instead of running the prompt again, and its first token is the argmax already
    computed there; the other examples' prompts are run on their own, in batches of their own.
    """
    scorer = _Scorer(model, tokenizer, cfg)
    encoded = [encode_example(tokenizer, ex, cfg.max_length, "response", cfg.template) for ex in examples]
    prompts = [
        encode_prompt(tokenizer, ex, cfg.max_length - cfg.max_new_tokens, cfg.template)
        if cfg.generate
        else None
        for ex in examples
    ]
    shared = [
        bool(p) and e["input_ids"][: _prompt_length(e)] == p for e, p in zip(encoded, prompts, strict=True)
    ]
    rows = [{"loss": float("nan"), "argmax": "", "new": None, "tokens": 0} for _ in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    for idx in _batches(order, cfg.batch_size):
        scorer.teacher_forced(idx, encoded, shared, rows)
    alone = sorted(
        (i for i in range(len(examples)) if cfg.generate and not shared[i]), key=lambda i: len(prompts[i])
    )
    for idx in _batches(alone, cfg.batch_size):
        scorer.generate(idx, prompts, rows)
    for row in rows:
        ids = row.pop("new")
        if ids is not None and scorer.eos in ids:
            ids = ids[: ids.index(scorer.eos)]
        row["prediction"] = None if ids is None else tokenizer.decode(ids, skip_special_tokens=True).strip()
    return rows


class _Scorer:
    """The steps of :func:`_score` on one batch; each fills the batch's rows of ``rows`` (``loss``,
    ``argmax``, ``new``: generated token ids, ``tokens``: tokens fed through the model)."""

    def __init__(self, model, tokenizer, cfg: EvalConfig) -> None:
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.device = model_device(model)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def teacher_forced(
        self, idx: list[int], encoded: Sequence[dict], shared: Sequence[bool], rows: list[dict]
    ) -> None:
        """One teacher-forced pass over examples ``idx``: per example the mean response-token loss, the
        decoded argmax and the sequence's tokens; then the greedy generation of the examples whose prompt
        is ``shared`` with this pass, from its keys and values."""
        from transformers import DynamicCache

        batch = {k: v.to(self.device) for k, v in collate([encoded[i] for i in idx], self.pad).items()}
        reuse = [j for j, i in enumerate(idx) if shared[i]]
        cache = DynamicCache(config=self.model.config) if reuse else None
        with autocast(self.precision, self.device):
            logits, targets = response_logits(
                self.model, batch["input_ids"], batch["attention_mask"], batch["labels"], cache
            )
        logits = logits.float()
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()  # rows are contiguous in logits
        token_loss = F.cross_entropy(logits, targets, reduction="none").split(counts)
        argmax = logits.argmax(dim=-1).split(counts)
        for i, loss, pred, n in zip(
            idx, token_loss, argmax, batch["attention_mask"].sum(1).tolist(), strict=True
        ):
            rows[i]["loss"] = loss.mean().item() if len(loss) else float("nan")
            rows[i]["argmax"] = self.tokenizer.decode(pred.tolist(), skip_special_tokens=True).strip()
            rows[i]["tokens"] = n
        if reuse:
            self._continue([idx[j] for j in reuse], reuse, cache, encoded, argmax, rows)

    def _continue(
        self,
        examples: list[int],
        reuse: list[int],
        cache,
        encoded: Sequence[dict],
        argmax: Sequence[torch.Tensor],
        rows: list[dict],
    ) -> None:
        """Greedy generation of ``examples`` (at batch positions ``reuse``) from the teacher-forced pass's
        ``cache``, cut back to their prompt columns; the first new token is that pass's argmax there."""
        lengths = torch.tensor([_prompt_length(encoded[i]) for i in examples], device=self.device)
        cache.crop(int(lengths.max()) - cache.get_seq_length())  # keep the prompt columns
        cache.batch_select_indices(torch.tensor(reuse, device=self.device))
        first = torch.stack([argmax[j][0] for j in reuse])
        new = _greedy(self.model, cache, lengths, first, self.cfg, self.eos, self.precision)
        for i, ids in zip(examples, new, strict=True):
            rows[i]["new"] = ids
            rows[i]["tokens"] += len(ids) - 1

    def generate(self, idx: list[int], prompts: Sequence[list[int] | None], rows: list[dict]) -> None:
        """Greedy generation of examples ``idx`` whose prompts run on their own (prefill, then decode)."""
        cache, lengths, first = _prefill(self.model, [prompts[i] for i in idx], self.pad, self.precision)
        new = _greedy(self.model, cache, lengths, first, self.cfg, self.eos, self.precision)
        for i, ids in zip(idx, new, strict=True):
            rows[i]["new"] = ids
            rows[i]["tokens"] += len(prompts[i]) + len(ids) - 1


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
        generation), ``tf_argmax_rougeL``, ``prediction`` (the generation, or ``None``), ``tokens`` (tokens
        it fed through the model: its teacher-forced sequence, its prompt when generation could not reuse
        that pass, and all but the last of its new tokens).
    """
    cfg = cfg or EvalConfig()
    was_training = model.training
    model.eval()
    try:
        scored = _score(model, tokenizer, examples, cfg)
    finally:
        model.train(was_training)
    results = []
    for ex, row in zip(examples, scored, strict=True):
        text = row["prediction"]
        results.append(
            {
                "loss": row["loss"],
                **rouge_scores(text, row["argmax"], ex.output),
                "prediction": text,
                "tokens": row["tokens"],
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
        "per_category", "per_client", "seconds", "tokens"}``: means over examples (the generated Rouge-L
        metrics are ``None`` when ``cfg.generate`` is off);
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
    result["tokens"] = sum(row["tokens"] for row in rows)  # fed through the model
    if cfg.per_example:
        result["per_example"] = rows
    return result
