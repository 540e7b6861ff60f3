"""Prompt templates, tokenisation with a truncation policy that keeps the response, and padding.

Templates (a closed set, :data:`TEMPLATES`):

* ``"alpaca"`` (default): the Alpaca instruction format used by the FlexLoRA paper's code::

      Below is an instruction that describes a task[, paired with an input ...]. Write a response ...

      ### Instruction:
      {instruction}

      ### Input:            (only when the example has an input)
      {input}

      ### Response:
      {output}<eos>

* ``"chat"``: one user turn (instruction, a blank line, input) rendered with the tokenizer's chat template
  and its generation prompt; the response is ``{output}<eos>``.

Truncation policy (:func:`encode_example`), for a budget of ``max_length`` tokens:

1. The response (output tokens + eos) is kept whole when it fits next to the whole prompt or is at most
   ``response_cap`` tokens (default ``max_length // 2``). Otherwise its first
   ``max(response_cap, max_length - len(prompt))`` tokens are kept (and its eos is lost).
2. The prompt gets what is left and, when too long, is cut in the middle: its first half (the template
   head and the start of the instruction) and its last half (the end of the input and the
   ``### Response:`` marker the model answers after) are kept, the middle is dropped.

So a long task definition never pushes the response out of the window, and the model always sees the
marker right before the response.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexlora.data.examples import Example

__all__ = [
    "DEFAULT_TEMPLATE",
    "IGNORE_INDEX",
    "LOSS_ON",
    "TEMPLATES",
    "collate",
    "collate_prompts",
    "encode_example",
    "encode_prompt",
    "format_prompt",
    "trim_middle",
]

TEMPLATES: tuple[str, ...] = ("alpaca", "chat")
DEFAULT_TEMPLATE = "alpaca"
LOSS_ON: tuple[str, ...] = ("response", "all")
IGNORE_INDEX = -100

_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")


def format_prompt(tokenizer, example: Example, template: str = DEFAULT_TEMPLATE) -> str:
    """The prompt text of ``example`` (everything before the response).

    Args:
        tokenizer: needed for ``"chat"`` (its chat template).
        example: the example; its ``output`` is not used.
        template: one of :data:`TEMPLATES`.

    Returns:
        The prompt string; the response follows it directly.

    Raises:
        ValueError: unknown template, or ``"chat"`` with a tokenizer that has no chat template.
    """
    _check_template(template)
    if template == "alpaca":
        fmt = _ALPACA_WITH_INPUT if example.input.strip() else _ALPACA_NO_INPUT
        return fmt.format(instruction=example.instruction.strip(), input=example.input.strip())
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'chat' needs a tokenizer with a chat template; this one has none")
    content = example.instruction.strip()
    if example.input.strip():
        content += "\n\n" + example.input.strip()
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def _prompt_ids(tokenizer, example: Example, template: str) -> list[int]:
    text = format_prompt(tokenizer, example, template)
    # A chat template writes its own special tokens; the plain template gets the tokenizer's usual ones
    # (e.g. a Llama BOS; none for SmolLM2).
    return tokenizer(text, add_special_tokens=template != "chat")["input_ids"]


def trim_middle(ids: Sequence[int], budget: int) -> list[int]:
    """Keep the first ``ceil(budget / 2)`` and the last ``floor(budget / 2)`` of ``ids`` when longer than
    ``budget``; unchanged otherwise."""
    ids = list(ids)
    if len(ids) <= budget:
        return ids
    if budget <= 0:
        return []
    head = (budget + 1) // 2
    tail = budget - head
    return ids[:head] + (ids[len(ids) - tail :] if tail else [])


def encode_example(
    tokenizer,
    example: Example,
    max_length: int,
    loss_on: str = "response",
    template: str = DEFAULT_TEMPLATE,
    response_cap: int | None = None,
) -> dict[str, list[int]]:
    """Tokenise prompt + response for teacher forcing, within ``max_length`` (policy in the module doc).

    Args:
        tokenizer: a Hugging Face tokenizer with an eos token.
        example: the example.
        max_length: most tokens in the result (at least 2).
        loss_on: ``"response"``: labels are ``-100`` on the prompt; ``"all"``: every token is a label.
        template: one of :data:`TEMPLATES`.
        response_cap: the response is cut to at most this when the prompt leaves it less room
            (default ``max_length // 2``; at most ``max_length - 1``).

    Returns:
        ``{"input_ids": [t], "labels": [t]}`` as Python lists, ``t <= max_length``; ``labels[i]`` is the
        target at position ``i`` (models shift by one).

    Raises:
        ValueError: bad ``loss_on``, ``template`` or ``max_length``.
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    cap = max_length // 2 if response_cap is None else response_cap
    cap = max(1, min(cap, max_length - 1))
    prompt = _prompt_ids(tokenizer, example, template)
    response = tokenizer(example.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt) + len(response) > max_length:
        response = response[: max(cap, max_length - len(prompt))]
        prompt = trim_middle(prompt, max_length - len(response))
    input_ids = prompt + response
    if loss_on == "response":
        labels = [IGNORE_INDEX] * len(prompt) + response
    else:
        labels = list(input_ids)
    return {"input_ids": input_ids, "labels": labels}


def encode_prompt(
    tokenizer, example: Example, max_length: int, template: str = DEFAULT_TEMPLATE
) -> list[int]:
    """Tokenise the prompt alone, for generation; trimmed in the middle to ``max_length`` tokens.

    Args:
        tokenizer: a Hugging Face tokenizer.
        example: the example (its ``output`` is not used).
        max_length: most prompt tokens (leave room for the new tokens).
        template: one of :data:`TEMPLATES`.

    Returns:
        The prompt's token ids.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    return trim_middle(_prompt_ids(tokenizer, example, template), max_length)


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into a batch.

    Args:
        batch: outputs of :func:`encode_example`.
        pad_id: the tokenizer's pad token id.

    Returns:
        ``input_ids (b, t)`` (padded with ``pad_id``), ``labels (b, t)`` (padded with ``-100``) and
        ``attention_mask (b, t)`` (1 on tokens, 0 on padding), all ``long``; ``t`` = longest example.
    """
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(item["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation (every prompt then ends at the last column).

    Args:
        prompts: token id lists, e.g. from :func:`encode_prompt`.
        pad_id: the tokenizer's pad token id.

    Returns:
        ``input_ids (b, t)`` and ``attention_mask (b, t)``, ``long``.
    """
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
