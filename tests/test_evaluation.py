"""Rouge-L tokenisation, EvalConfig, and evaluate_clients on the tiny model against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from rouge_score.rouge_scorer import RougeScorer

from flexlora.data.examples import ClientData, ClientInfo, Example
from flexlora.evaluation import EvalConfig, evaluate_clients, evaluate_examples
from flexlora.prompts import encode_example, encode_prompt
from flexlora.rouge import RougeTokenizer, is_default_track, rouge_l, rouge_l_unstemmed, rouge_tokenize

pytestmark = pytest.mark.usefixtures("one_thread")


def client(cid, category, outputs, split="test"):
    examples = [Example(f"Task {cid}.", f"item {i}", out) for i, out in enumerate(outputs)]
    return ClientData(ClientInfo(cid, cid, category, 0), **{split: examples})


CLIENTS = [
    client("a", "math", ["4", "seven", "a longer reference answer"]),
    client("b", "translation", ["سلام دنیا", "नमस्ते"]),
    client("c", "math", ["ok"]),
]
CFG = EvalConfig(batch_size=2, max_new_tokens=6, max_length=96)


# ----------------------------------------------------------------------------------------------------------
# Rouge


def test_rouge_tokenize_keeps_every_script():
    assert rouge_tokenize("Hello, World! 42") == ["hello", "world", "42"]
    assert rouge_tokenize("سلام دنیا، چطوری؟") == ["سلام", "دنیا", "چطوری"]
    assert rouge_tokenize("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # vowel signs stay in their words
    assert rouge_tokenize("Привет мир") == ["привет", "мир"]
    assert rouge_tokenize("我爱北京 ok") == ["我", "爱", "北", "京", "ok"]
    assert rouge_tokenize("ＡＢＣ") == ["abc"]  # NFKC
    assert rouge_tokenize(" ... ") == []


def test_rouge_l_unstemmed_values():
    assert rouge_l_unstemmed("a b c d", "a b c d") == 100.0
    assert rouge_l_unstemmed("x y", "a b") == 0.0
    assert rouge_l_unstemmed("a c d e", "a b c d") == pytest.approx(75.0)  # LCS 3 of 4 and 4
    assert rouge_l_unstemmed("", "a") == 0.0
    # rouge_score's own tokenizer drops non-Latin text entirely; ours scores it
    assert RougeScorer(["rougeL"]).score("سلام دنیا", "سلام دنیا")["rougeL"].fmeasure == 0.0
    assert rouge_l_unstemmed("سلام دنیا", "سلام دنیا") == 100.0
    assert rouge_l_unstemmed("सलाम दुनिया", "नमस्ते दुनिया") == pytest.approx(50.0)
    scorer = RougeScorer(["rougeL"], tokenizer=RougeTokenizer())
    assert (
        100 * scorer.score("我爱北京", "我爱上海")["rougeL"].fmeasure
        == rouge_l_unstemmed("我爱上海", "我爱北京")
        == 50.0
    )


def test_rouge_l_is_the_natural_instructions_scorer():
    # English (default track): rouge-score's tokenizer with the Porter stemmer, so "running dogs" matches
    # "run dog" (stems run, dog) where the unstemmed score sees nothing in common
    assert rouge_l("running dogs", "run dog") == 100.0 and rouge_l_unstemmed("running dogs", "run dog") == 0.0
    stemmed = RougeScorer(["rougeL"], use_stemmer=True).score("The cats sat.", "cat sitting")["rougeL"]
    assert rouge_l("cat sitting", "The cats sat.") == pytest.approx(100 * stemmed.fmeasure)
    # punctuation is a separator for both: "don't" is two tokens, "don" and "t"
    assert rouge_l("don't", "don t") == 100.0
    # a reference with a non-ASCII letter is scored on the cross-lingual track, unstemmed, every script kept
    assert is_default_track("Yes, 42.") and not is_default_track("سلام") and not is_default_track("café")
    assert rouge_l("سلام دنیا", "سلام دنیا") == 100.0
    assert rouge_l("我爱上海", "我爱北京") == rouge_l_unstemmed("我爱上海", "我爱北京") == 50.0


def test_eval_config_validation():
    EvalConfig()
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        EvalConfig(batch_size=0)
    with pytest.raises(ValueError, match="max_length=8, max_new_tokens=48"):
        EvalConfig(max_length=8)
    EvalConfig(max_length=8, generate=False)
    with pytest.raises(ValueError) as err:
        EvalConfig(max_examples_per_client=0, template="x")
    assert "max_examples_per_client" in str(err.value) and "template" in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# evaluate


def greedy(model, ids, steps, eos):
    """Unbatched, unpadded greedy decoding, one full forward per token."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


def test_scores_match_hand_computation(tiny):
    model, tok = tiny
    examples = [ex for c in CLIENTS for ex in c.test]
    rows = evaluate_examples(model, tok, examples, CFG)
    for ex, row in zip(examples, rows, strict=True):
        enc = encode_example(tok, ex, CFG.max_length)
        ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor([enc["labels"]])
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels)
        assert row["loss"] == pytest.approx(out.loss.item(), rel=1e-4)
        keep = labels[0, 1:] != -100
        argmax = out.logits[0, :-1][keep].argmax(-1).tolist()
        argmax_text = tok.decode(argmax, skip_special_tokens=True).strip()
        assert row["tf_argmax_rougeL"] == rouge_l_unstemmed(argmax_text, ex.output)
        prompt = encode_prompt(tok, ex, CFG.max_length - CFG.max_new_tokens)
        text = tok.decode(
            greedy(model, prompt, CFG.max_new_tokens, tok.eos_token_id), skip_special_tokens=True
        )
        assert row["prediction"] == text.strip()  # batched with left padding == alone
        assert row["rougeL"] == rouge_l(row["prediction"], ex.output)
        assert row["rougeL_unstemmed"] == rouge_l_unstemmed(row["prediction"], ex.output)


def hf_generate(model, tok, prompt, cfg):
    """One prompt through ``model.generate`` (greedy, KV cache), cut at its eos: the reference."""
    out = model.generate(
        input_ids=torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=cfg.max_new_tokens,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )[0, len(prompt) :].tolist()
    return tok.decode(
        out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out, skip_special_tokens=True
    )


def test_batched_generation_equals_one_by_one_whether_or_not_it_reuses_the_teacher_forced_pass(tiny):
    """Short prompts continue from the teacher-forced pass's cache, trimmed ones are prefilled alone; both
    give, batched and right-padded, the tokens ``model.generate`` gives for each prompt alone."""
    model, tok = tiny
    cfg = EvalConfig(batch_size=4, max_new_tokens=8, max_length=260)  # the prompt alone is 212 + n tokens
    examples = [Example("Say it.", "x" * n, "y" * (n % 5 + 1)) for n in (1, 3, 9, 17, 30, 44, 2, 60, 90)]
    shared = []
    for ex in examples:
        enc = encode_example(tok, ex, cfg.max_length)
        n_prompt = enc["labels"].count(-100)
        shared.append(
            enc["input_ids"][:n_prompt] == encode_prompt(tok, ex, cfg.max_length - cfg.max_new_tokens)
        )
    assert any(shared) and not all(shared)
    rows = evaluate_examples(model, tok, examples, cfg)
    alone = evaluate_examples(model, tok, examples, EvalConfig(**{**vars(cfg), "batch_size": 1}))
    for ex, row, one in zip(examples, rows, alone, strict=True):
        prompt = encode_prompt(tok, ex, cfg.max_length - cfg.max_new_tokens)
        assert row["prediction"] == one["prediction"] == hf_generate(model, tok, prompt, cfg).strip()
        assert row["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_tokens_count_what_went_through_the_model_and_bf16_scores_close(tiny):
    model, tok = tiny
    examples = [ex for c in CLIENTS for ex in c.test]
    cfg = EvalConfig(**{**vars(CFG), "generate": False})
    rows = evaluate_examples(model, tok, examples, cfg)
    assert [r["tokens"] for r in rows] == [
        len(encode_example(tok, ex, CFG.max_length)["input_ids"]) for ex in examples
    ]
    out = evaluate_clients(model, tok, CLIENTS, cfg=CFG)
    generated = evaluate_examples(model, tok, examples, CFG)
    assert out["tokens"] == sum(r["tokens"] for r in generated) > sum(r["tokens"] for r in rows)
    bf16 = evaluate_clients(model, tok, CLIENTS, cfg=EvalConfig(**{**vars(CFG), "precision": "bf16"}))
    assert bf16["loss"] == pytest.approx(out["loss"], rel=0.05)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, auto"):
        EvalConfig(precision="half")


def test_summary_weights_examples_and_groups_categories(tiny):
    model, tok = tiny
    out = evaluate_clients(model, tok, CLIENTS, cfg=EvalConfig(**{**CFG.__dict__, "per_example": True}))
    assert out["num_examples"] == 6 and out["num_clients"] == 3
    assert set(out["per_category"]) == {"math", "translation"}
    assert out["per_category"]["math"]["num_examples"] == 4
    rows = out["per_example"]
    assert [r["client_id"] for r in rows] == ["a", "a", "a", "b", "b", "c"]
    for key in ("loss", "rougeL", "rougeL_unstemmed", "tf_argmax_rougeL"):
        assert out[key] == pytest.approx(sum(r[key] for r in rows) / 6)
        by_cat = sum(v[key] * v["num_examples"] for v in out["per_category"].values()) / 6
        assert out[key] == pytest.approx(by_cat)
    assert 0 <= out["rougeL"] <= 100 and out["loss"] > 0


def test_limits_splits_and_no_generation(tiny):
    model, tok = tiny
    model.train()
    cfg = EvalConfig(max_examples_per_client=1, generate=False, max_length=96)
    out = evaluate_clients(model, tok, CLIENTS, cfg=cfg)
    assert model.training  # the mode is restored
    model.eval()
    assert out["num_examples"] == 3 and out["rougeL"] is None and out["rougeL_unstemmed"] is None
    assert "per_example" not in out
    assert out["per_category"]["math"]["rougeL"] is None
    train_only = [client("d", "x", ["y"], split="train")]
    assert evaluate_clients(model, tok, train_only, "train", cfg)["num_examples"] == 1
    with pytest.raises(ValueError, match="no 'test' examples"):
        evaluate_clients(model, tok, train_only, "test", cfg)
    with pytest.raises(ValueError, match="split"):
        evaluate_clients(model, tok, CLIENTS, "dev", cfg)


def test_a_trained_adapter_scores_better_and_unloading_restores_the_base(tiny):
    from flexlora.contracts import TrainJob
    from flexlora.core.lora import LoraFactors
    from flexlora.lora_host import LoraHost
    from flexlora.training import TrainConfig, run_train_job

    model, tok = tiny
    data = client("e", "echo", ["red red", "blue blue", "green green", "pink pink"], split="train")
    data.test = data.train
    cfg = EvalConfig(max_new_tokens=12, max_length=96)
    base = evaluate_clients(model, tok, [data], cfg=cfg)
    host = LoraHost(model)
    init = {
        n: LoraFactors(torch.randn(8, k) / k**0.5, torch.zeros(d, 8), 16.0)
        for n, (d, k) in host.shapes.items()
    }
    job = TrainJob("e", 1, 0, init)
    trained = run_train_job(host, tok, data, job, TrainConfig(steps=40, lr=1e-2, max_length=96))
    host.load(trained.update.modules)
    try:
        tuned = evaluate_clients(model, tok, [data], cfg=cfg)
    finally:
        host.unload()
    assert tuned["loss"] < 0.5 * base["loss"]
    assert tuned["tf_argmax_rougeL"] > base["tf_argmax_rougeL"]
    again = evaluate_clients(model, tok, [data], cfg=cfg)
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in base.items() if k != "seconds"
    }
