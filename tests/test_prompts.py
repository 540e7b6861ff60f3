"""Templates, response-only labels, the truncation policy and padding, with the tiny byte-level tokenizer
(one token per UTF-8 byte, so lengths are easy to reason about)."""

from __future__ import annotations

import pytest

from flexlora.data.examples import Example
from flexlora.models import load_model
from flexlora.prompts import (
    IGNORE_INDEX,
    collate,
    collate_prompts,
    encode_example,
    encode_prompt,
    format_prompt,
    trim_middle,
)


@pytest.fixture(scope="module")
def tok():
    return load_model("tiny", device="cpu")[1]


EX = Example("Add the numbers.", "2 3", "5", "math")
EX_HI = Example("Hi.", "", "")


def test_alpaca_template_with_and_without_input(tok):
    with_input = format_prompt(tok, EX)
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nAdd the numbers.\n\n### Input:\n2 3\n\n### Response:\n")
    without = format_prompt(tok, Example("Say hi.", "  ", "hi"))
    assert "### Input" not in without
    assert without.endswith("### Instruction:\nSay hi.\n\n### Response:\n")


def test_chat_template_uses_the_tokenizers_template(tok):
    text = format_prompt(tok, EX, "chat")
    assert text == "<|bos|>user\nAdd the numbers.\n\n2 3<|eos|>\n<|bos|>assistant\n"
    enc = encode_example(tok, EX, 256, template="chat")
    assert enc["input_ids"][0] == tok.bos_token_id  # the template's own special token, not a doubled one
    assert tok.decode(enc["input_ids"]) == text + "5<|eos|>"


def test_unknown_template_and_missing_chat_template(tok):
    with pytest.raises(ValueError, match="template must be one of"):
        format_prompt(tok, EX, "vicuna")

    class NoChat:
        chat_template = None

    with pytest.raises(ValueError, match="chat template"):
        format_prompt(NoChat(), EX, "chat")


def test_labels_cover_the_response_and_eos_only(tok):
    enc = encode_example(tok, EX, 256)
    prompt = tok(format_prompt(tok, EX))["input_ids"]
    assert enc["input_ids"] == prompt + tok("5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt) + enc["input_ids"][len(prompt) :]
    everything = encode_example(tok, EX, 256, loss_on="all")
    assert everything["labels"] == everything["input_ids"]
    with pytest.raises(ValueError, match="loss_on"):
        encode_example(tok, EX, 256, loss_on="prompt")
    with pytest.raises(ValueError, match="max_length"):
        encode_example(tok, EX, 1)


def test_trim_middle():
    assert trim_middle([1, 2, 3], 5) == [1, 2, 3]
    assert trim_middle(list(range(10)), 5) == [0, 1, 2, 8, 9]
    assert trim_middle(list(range(10)), 4) == [0, 1, 8, 9]
    assert trim_middle(list(range(10)), 1) == [0]
    assert trim_middle(list(range(10)), 0) == []


def test_long_prompt_is_cut_in_the_middle_and_the_response_kept(tok):
    ex = Example("Start of the task. " + "filler " * 200 + "End of the task.", "the input", "the answer")
    enc = encode_example(tok, ex, 128)
    text = tok.decode(enc["input_ids"])
    assert len(enc["input_ids"]) == 128
    assert text.startswith("Below is an instruction")  # the head is kept ...
    assert text.endswith("### Input:\nthe input\n\n### Response:\nthe answer<|eos|>")  # ... and the tail
    assert "Start of the task" not in text and text.count("filler") < 10  # the middle went
    response = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert tok.decode(response) == "the answer<|eos|>"


def test_long_response_is_capped_only_when_the_prompt_needs_the_room(tok):
    long_answer = "x" * 300
    # a short prompt (143 tokens with this template) leaves the response everything else (369 > 256)
    short = encode_example(tok, Example("Hi.", "", "x" * 400), 512)
    prompt_len = len(tok(format_prompt(tok, Example("Hi.", "", "")))["input_ids"])
    assert len(short["input_ids"]) == 512 and short["input_ids"][:prompt_len] == encode_prompt(
        tok, EX_HI, 512
    )
    assert sum(t != IGNORE_INDEX for t in short["labels"]) == 512 - prompt_len
    # a long prompt: the response gets its cap (half the budget), the prompt the rest
    long = encode_example(tok, Example("y" * 500, "", long_answer), 256)
    assert sum(t != IGNORE_INDEX for t in long["labels"]) == 128
    assert len(long["input_ids"]) == 256
    capped = encode_example(tok, Example("y" * 500, "", long_answer), 256, response_cap=64)
    assert sum(t != IGNORE_INDEX for t in capped["labels"]) == 64
    # a response under the cap is never cut, however long the prompt
    kept = encode_example(tok, Example("y" * 500, "", "z" * 100), 256)
    assert tok.decode([t for t in kept["labels"] if t != IGNORE_INDEX]) == "z" * 100 + "<|eos|>"


def test_encode_prompt_is_the_prompt_of_encode_example(tok):
    enc = encode_example(tok, EX, 256)
    prompt = encode_prompt(tok, EX, 256)
    assert enc["input_ids"][: len(prompt)] == prompt
    assert enc["labels"][len(prompt)] != IGNORE_INDEX
    assert len(encode_prompt(tok, Example("w" * 400, "", ""), 100)) == 100


def test_collate_right_pads(tok):
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collate_prompts_left_pads():
    batch = collate_prompts([[5, 6, 7], [8]], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
