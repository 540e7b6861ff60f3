"""``flexlora aggregate``: combine client adapters (PEFT directories) into global adapters.

    flexlora aggregate CLIENT_DIR... --out OUT --rank R [--rank R ...] [--weights N1,N2,...]
                       [--method flexlora] [--svd auto|dense|factored] [--randomized] [--overwrite]

Writes one PEFT adapter directory per requested rank, ``OUT/rank-R/`` (each module's rank clipped to
``min(d, k)``), plus ``OUT/aggregate.json`` describing the run. ``--weights`` are the clients' example counts
(default: equal). Output adapters use the clients' ``lora_alpha`` when they agree, otherwise the largest,
and rsLoRA only if every client uses it. Everything is written to a temporary directory and renamed onto
``OUT`` at the end, so a refused input leaves ``OUT`` untouched. ``OUT`` may be new or an empty directory;
an earlier ``flexlora aggregate`` output (it carries a ``.flexlora-aggregate`` file) is replaced only with
``--overwrite``; any other directory, a client directory or one that contains a client is refused.
Client directories are read one at a time and folded into the aggregate as they are read (FlexLoRA), so
memory does not grow with their number. ``--randomized`` (FlexLoRA): compute only the leading
``max(--rank)`` singular triplets, by randomized subspace iteration where the sum is dense (its error is at
most 1% above the optimal truncation in the tests).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flexlora.core.adapter_io import atomic_directory, read_adapter, write_adapter
from flexlora.core.output_dirs import AGGREGATE_MARKER, check_output_dir, write_marker
from flexlora.core.svd import SVD_ROUTES
from flexlora.methods import get_method, method_names

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("aggregate", help="aggregate client LoRA adapters", description=__doc__)
    p.add_argument("clients", nargs="+", type=Path, metavar="CLIENT_DIR", help="PEFT adapter directories")
    p.add_argument("--out", type=Path, required=True, help="output directory (OUT/rank-R/ per rank)")
    p.add_argument("--rank", type=int, action="append", required=True, help="output rank (repeatable)")
    p.add_argument("--weights", type=_weights, help="comma-separated example counts, one per client")
    # a method whose server rule is its whole story: not one with extra client stages (SLoRA)
    p.add_argument(
        "--method", default="flexlora", choices=sorted(method_names(lambda m: not m.client.stages))
    )
    p.add_argument("--svd", default="auto", choices=SVD_ROUTES, help="SVD route (methods with an svd option)")
    p.add_argument(
        "--randomized",
        action="store_true",
        help="flexlora only: randomized SVD of the leading max(--rank) triplets (faster, not exact)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier flexlora aggregate output")
    p.set_defaults(func=run)


def _weights(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--weights must be comma-separated integers, got {text!r}"
        ) from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--weights must be positive, got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    weights = args.weights or [1] * len(args.clients)
    if len(weights) != len(args.clients):
        raise ValueError(f"--weights has {len(weights)} values for {len(args.clients)} client directories")
    if any(r <= 0 for r in args.rank):
        raise ValueError(f"--rank must be positive, got {args.rank}")
    out = check_output_dir(args.out, AGGREGATE_MARKER, args.overwrite, inputs=args.clients)
    if args.randomized and args.method != "flexlora":
        raise ValueError(f"--randomized applies to flexlora only, not {args.method}")
    method = get_method(args.method)
    kwargs: dict[str, object] = {"svd": args.svd} if "svd" in method.options else {}
    if args.randomized:
        kwargs["top"] = max(args.rank)
    aggregator = method.make_aggregator(**kwargs)
    configs, read_seconds = [], 0.0

    def updates():  # read each client directory only when the aggregator asks for it
        nonlocal read_seconds
        for path, n in zip(args.clients, weights, strict=True):
            t = time.perf_counter()
            update, config = read_adapter(path, num_examples=n)
            configs.append(config)
            read_seconds += time.perf_counter() - t
            yield update
            del update

    t1 = time.perf_counter()
    state = aggregator.aggregate_stream(updates())
    t2 = time.perf_counter()
    alpha = max(c.lora_alpha for c in configs)
    use_rslora = all(c.use_rslora for c in configs)
    with atomic_directory(out) as tmp:
        write_marker(tmp, AGGREGATE_MARKER, "flexlora aggregate")
        for rank in dict.fromkeys(args.rank):
            ranks = {name: min(rank, *lr.shape) for name, lr in state.modules.items()}
            factors = aggregator.payload(state, ranks, alpha, use_rslora)
            write_adapter(tmp / f"rank-{rank}", factors, base_model=configs[0].base_model_name_or_path)
        summary = {
            "method": args.method,
            "aggregator": aggregator.hyperparameters(),
            "clients": [str(p) for p in args.clients],
            "weights": weights,
            "ranks": list(dict.fromkeys(args.rank)),
            "lora_alpha": alpha,
            "use_rslora": use_rslora,
            "modules": len(state.modules),
            "seconds": {
                "read": read_seconds,
                "aggregate": t2 - t1 - read_seconds,
                "write": time.perf_counter() - t2,
            },
        }
        (tmp / "aggregate.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"aggregated {len(configs)} clients x {len(state.modules)} modules with {args.method} "
        f"in {t2 - t1 - read_seconds:.3f}s; wrote {', '.join(f'rank-{r}' for r in summary['ranks'])} to {args.out}"
    )
    return 0
