"""Local training and evaluation throughput on SmolLM2-135M-Instruct and Natural Instructions.

Training, side by side in one process on the SAME batches (one client's examples, 4 x 192 tokens, the
batches our seeded ``batch_order`` draws): the anchor is the textbook transformers + PEFT loop
(``get_peft_model``, LoRA r8 on q_proj/v_proj, ``model(**batch, labels=...)``, AdamW), in fp32 and under
bf16 autocast; against it flexlora's ``optimise`` (logits at the labelled positions only), in fp32, with
``group_by_length`` (the same examples regrouped by length), and in bf16. Each configuration takes one
untimed warm-up step, then ``--steps`` timed steps; tokens/s counts non-padding tokens. Time is the
process's CPU time (``time.process_time``): at one thread it is the work done, whatever else shares the
cores (wall time is reported too, and equals it on an idle machine).

Evaluation: ``evaluate_examples`` on held-out NI clients x 2 test examples with generation (the study's
settings: batch 8, 192 tokens, 32 new tokens) against the evaluation as it was before (the same
teacher-forced pass, then ``model.generate`` on left-padded prompts); predictions are compared.

    python benchmarks/bench_training.py --threads 1 --steps 3 \\
        --out docs/benchmarks-training.md
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NI = ROOT.parent / "shared" / "data" / "natural-instructions-1613.jsonl.gz"
BATCH, LENGTH, RANK, ALPHA, LR = 4, 192, 8, 16.0, 1e-3


def _data(seed: int, eval_clients: int):
    from flexlora.data import open_source
    from flexlora.data.splits import split_clients

    source = open_source(NI)
    train_ids, heldout = split_clients(source, seed=seed, num_heldout=100)
    client = next(c for c in map(source.load, train_ids) if len(c.train) >= 64)  # the first such client
    held = [ex for c in map(source.load, heldout[:eval_clients]) for ex in c.split("test")[:2]]
    return client.train, held


def _batches(tokenizer, examples, steps: int, seed: int, group: bool):
    from flexlora.prompts import collate, encode_example
    from flexlora.training import batch_order, group_by_length

    generator = torch.Generator().manual_seed(seed)
    order = batch_order(len(examples), BATCH, steps, generator)
    encoded = [encode_example(tokenizer, ex, LENGTH) for ex in examples]
    if group:
        order = group_by_length(order, [len(e["input_ids"]) for e in encoded], generator)
    return [collate([encoded[i] for i in idx], tokenizer.pad_token_id) for idx in order]


def _clock() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) since ``start``."""
    cpu, wall = _clock()
    return cpu - start[0], wall - start[1]


def plain_peft(model, batches, bf16: bool) -> tuple[float, float]:
    """The anchor: transformers + PEFT, full logits and the model's own loss; (CPU, wall) seconds of the
    timed steps."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
    for step, batch in enumerate([batches[0], *batches]):
        if step == 1:  # after the warm-up
            start = _clock()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = _since(start)
    peft_model.unload()
    if hasattr(model, "peft_config"):
        del model.peft_config
    return seconds


def ours(model, tokenizer, examples, steps: int, seed: int, **options) -> tuple[float, float]:
    """flexlora's ``optimise`` on the same batches (``batch_order`` at ``seed``); (CPU, wall) seconds."""
    from flexlora.core.lora import LoraFactors
    from flexlora.lora_host import LoraHost
    from flexlora.training import TrainConfig, optimise

    host = LoraHost(model, ("q_proj", "v_proj"))
    init = {
        n: LoraFactors(torch.randn(RANK, k) / k**0.5, torch.zeros(d, RANK), ALPHA)
        for n, (d, k) in host.shapes.items()
    }
    host.load(init)
    try:
        params = host.trainable_parameters()
        common = {"batch_size": BATCH, "max_length": LENGTH, "lr": LR, **options}
        optimise(model, tokenizer, examples, params, TrainConfig(steps=1, **common), seed)  # warm-up
        start = _clock()
        optimise(model, tokenizer, examples, params, TrainConfig(steps=steps, **common), seed)
        return _since(start)
    finally:
        host.unload()


def profile(model, tokenizer, examples, seed: int, top: int = 12) -> list[dict]:
    """Where one step of ``optimise`` (fp32) spends its CPU time: the ``top`` operators by self time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ours(model, tokenizer, examples, 1, seed)  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        ours(model, tokenizer, examples, 1, seed)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in events[:top]]


def old_evaluate(model, tokenizer, examples, cfg) -> list[str]:
    """Generation as before this benchmark's commit: ``model.generate`` on left-padded prompts (the
    teacher-forced pass, unchanged, is timed with it through ``evaluate_examples(generate=False)``)."""
    from transformers import GenerationConfig

    from flexlora.prompts import collate_prompts, encode_prompt

    eos = tokenizer.eos_token_id
    gen = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    prompts = [encode_prompt(tokenizer, ex, cfg.max_length - cfg.max_new_tokens) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts = [""] * len(prompts)
    with torch.inference_mode():
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            batch = collate_prompts([prompts[i] for i in idx], tokenizer.pad_token_id)
            new = model.generate(**batch, generation_config=gen)[:, batch["input_ids"].shape[1] :].tolist()
            for i, ids in zip(idx, new, strict=True):
                texts[i] = tokenizer.decode(
                    ids[: ids.index(eos)] if eos in ids else ids, skip_special_tokens=True
                ).strip()
    return texts


def evaluation(model, tokenizer, examples, precisions: list[str]) -> dict:
    from flexlora.evaluation import EvalConfig, evaluate_examples

    cfg = EvalConfig(batch_size=8, max_new_tokens=32, max_length=192)
    evaluate_examples(model, tokenizer, examples[:1], cfg)  # warm-up of both paths
    old_evaluate(model, tokenizer, examples[:1], cfg)
    start = _clock()
    forced = evaluate_examples(model, tokenizer, examples, EvalConfig(**{**vars(cfg), "generate": False}))
    before_texts = old_evaluate(model, tokenizer, examples, cfg)
    out = {"before_cpu_wall_s": _since(start), "examples": len(examples)}
    for precision in precisions:
        start = _clock()
        rows = evaluate_examples(
            model, tokenizer, examples, EvalConfig(**{**vars(cfg), "precision": precision})
        )
        out[f"after_{precision}_cpu_wall_s"] = _since(start)
        out[f"after_{precision}_tokens"] = sum(r["tokens"] for r in rows)
        out[f"{precision}_same_predictions"] = sum(
            r["prediction"] == t for r, t in zip(rows, before_texts, strict=True)
        )
        out[f"{precision}_max_loss_diff"] = max(
            abs(r["loss"] - f["loss"]) for r, f in zip(rows, forced, strict=True)
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per fp32 configuration")
    p.add_argument("--bf16-steps", type=int, default=2, help="timed steps per bf16 configuration (0: none)")
    p.add_argument("--eval-clients", type=int, default=12, help="held-out clients x 2 examples (0: none)")
    p.add_argument("--eval-bf16", action="store_true", help="also evaluate in bf16")
    p.add_argument("--profile", action="store_true", help="profile one step of our fp32 path")
    p.add_argument("--model", default="smollm2", help="smollm2, or tiny for a smoke test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="append the result as one JSON line")
    args = p.parse_args()

    from flexlora.models import load_model
    from flexlora.precision import bf16_native

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, device="cpu")
    examples, held = _data(args.seed, args.eval_clients)
    rows = []

    def row(name: str, seconds: tuple[float, float], steps: int, group: bool = False):
        tokens = sum(
            int(b["attention_mask"].sum()) for b in _batches(tokenizer, examples, steps, args.seed, group)
        )
        slots = sum(
            b["attention_mask"].numel() for b in _batches(tokenizer, examples, steps, args.seed, group)
        )
        rows.append(
            {
                "config": name,
                "cpu_s_per_step": seconds[0] / steps,
                "wall_s_per_step": seconds[1] / steps,
                "tokens_per_cpu_s": tokens / seconds[0],
                "padding": 1 - tokens / slots,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    plain = _batches(tokenizer, examples, args.steps, args.seed, group=False)
    row("plain PEFT fp32", plain_peft(model, plain, bf16=False), args.steps)
    row("flexlora fp32", ours(model, tokenizer, examples, args.steps, args.seed), args.steps)
    row(
        "flexlora fp32 + group_by_length",
        ours(model, tokenizer, examples, args.steps, args.seed, group_by_length=True),
        args.steps,
        True,
    )
    result = {
        "threads": args.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": bf16_native(torch.device("cpu")),
        "machine": platform.processor() or platform.machine(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "training": rows,
    }
    if args.profile:
        result["profile"] = profile(model, tokenizer, examples, args.seed)
        print(json.dumps(result["profile"]), flush=True)
    if args.eval_clients:
        result["evaluation"] = evaluation(
            model, tokenizer, held, ["fp32"] + (["bf16"] if args.eval_bf16 else [])
        )
        print(json.dumps(result["evaluation"]), flush=True)
    if args.bf16_steps:  # last: on a CPU without bf16 units these are the slow ones
        n = args.bf16_steps
        plain = _batches(tokenizer, examples, n, args.seed, group=False)
        row("plain PEFT bf16 autocast", plain_peft(model, plain, bf16=True), n)
        row(
            "flexlora bf16 + group_by_length",
            ours(model, tokenizer, examples, n, args.seed, precision="bf16", group_by_length=True),
            n,
            True,
        )
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
