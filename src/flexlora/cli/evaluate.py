"""``flexlora evaluate``: score the base model, or the base model with an adapter, on every client of a
data source.

    flexlora evaluate --data PATH [--adapter DIR] [--model M] [--split test]
                      [--max-examples-per-client K] [--json] [--no-progress]

Prints the overall and per-category metrics: greedy-generation Rouge-L (0-100; the Natural Instructions
scorer, stemmed, and our unstemmed one), the teacher-forced loss on response tokens, and the Rouge-L of
the teacher-forced argmax, averaged over examples (:mod:`flexlora.rouge`). With ``--json`` the last line
is one JSON object (``rougeL``, ``rougeL_unstemmed``, ``loss``, ``tf_argmax_rougeL``, ``num_examples``,
``per_category``, ...). Progress (examples scored, then generated, with an ETA) goes to stderr: a bar on a
terminal, a line every 30 s otherwise; ``--no-progress`` turns it off.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a model or adapter on a data source", description=__doc__)
    p.add_argument("--data", required=True, help="data path, or 'synthetic'")
    p.add_argument("--data-format", help="the data format, when not to detect it")
    p.add_argument("--adapter", type=Path, help="PEFT LoRA adapter directory (default: the base model)")
    p.add_argument("--model", default="smollm2", help="smollm2 (default), tiny, or a local HF directory")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--split", default="test", choices=("train", "eval", "test"))
    p.add_argument("--clients", type=int, help="only the first N clients of the source")
    p.add_argument("--max-examples-per-client", type=int, help="first K examples of each client")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--no-generate", action="store_true", help="skip generation (no rougeL; much faster)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the metrics")
    p.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flexlora.core.adapter_io import read_adapter
    from flexlora.data import open_source
    from flexlora.evaluation import EvalConfig, evaluate_clients
    from flexlora.lora_host import LoraHost
    from flexlora.models import load_model
    from flexlora.progress import Progress, reporting

    cfg = EvalConfig(
        max_examples_per_client=args.max_examples_per_client,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        generate=not args.no_generate,
    )
    source = open_source(args.data, args.data_format)
    ids = source.client_ids()[: args.clients]
    factors = (
        read_adapter(args.adapter)[0].modules if args.adapter else None
    )  # refused before loading a model
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    host = None
    if factors:
        host = LoraHost(model, sorted({name.rsplit(".", 1)[-1] for name in factors}))
        host.load(factors)
        model = host.model
    clients = [source.load(i) for i in ids]
    n = sum(len(c.split(args.split)[: cfg.max_examples_per_client]) for c in clients)
    phases = [("scoring (loss)", n)] + ([("generating", n)] if cfg.generate else [])
    with reporting(Progress(phases, enabled=not args.no_progress)):
        metrics = evaluate_clients(model, tokenizer, clients, args.split, cfg)
    if host is not None:
        host.unload()
    what = f"adapter {args.adapter}" if args.adapter else f"base model {args.model}"
    rouge, unstemmed = (
        "n/a" if metrics[k] is None else f"{metrics[k]:.2f}" for k in ("rougeL", "rougeL_unstemmed")
    )
    print(
        f"{what} on {len(ids)} clients ({metrics['num_examples']} {args.split} examples): "
        f"Rouge-L {rouge} (unstemmed {unstemmed}), loss {metrics['loss']:.4f}, "
        f"teacher-forced argmax Rouge-L {metrics['tf_argmax_rougeL']:.2f}"
    )
    for category, m in sorted(metrics["per_category"].items()):
        r = "n/a" if m["rougeL"] is None else f"{m['rougeL']:.2f}"
        print(f"  {category:40s} n={m['num_examples']:<5d} Rouge-L {r:>6s}  loss {m['loss']:.4f}")
    if args.json:
        print(
            json.dumps(
                {**metrics, "model": args.model, "adapter": str(args.adapter) if args.adapter else None}
            )
        )
    return 0
