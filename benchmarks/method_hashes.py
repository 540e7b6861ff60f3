"""Pin behaviour across refactors: a short tiny-model run of every method, and the SHA-256 of what it wrote.

For each method, a 3-round run on the tiny random Llama and the procedural data (heterogeneous methods under
``heavy-tail-strong``, homogeneous ones under ``homo``), then the hashes of the tensors a run leaves behind:
``checkpoint/global.safetensors`` and every ``adapters/*/adapter_model.safetensors``. Run it before and after a
change that must not change behaviour and compare:

    python benchmarks/method_hashes.py --out /tmp/before.json
    python benchmarks/method_hashes.py --out /tmp/after.json --check /tmp/before.json

``--check`` prints one line per method (same / differs, and which files) and exits 1 when any differs.
Hashes are of float arithmetic on this CPU: compare runs made on the same machine and package versions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
from pathlib import Path

HOMOGENEOUS = ("fedavg", "fedit", "slora")


def all_methods() -> list[str]:
    """Every method the installed flexlora knows (the registry when there is one)."""
    try:
        from flexlora.methods import METHODS  # type: ignore[attr-defined]
    except ImportError:
        from flexlora.config import METHODS
    return sorted(METHODS)


def run_hashes(method: str, root: Path) -> dict[str, str]:
    """SHA-256 of every tensor file a 3-round tiny run of ``method`` writes."""
    from flexlora.config import load_config
    from flexlora.run import run_federation

    dist = "homo" if method in HOMOGENEOUS else "heavy-tail-strong"
    cfg = load_config(
        raw={
            "name": method.replace("+", "-"),
            "output_dir": str(root),
            "model": {"name": "tiny", "device": "cpu", "target_modules": ["q_proj", "v_proj"]},
            "data": {
                "path": "synthetic",
                "options": {"num_clients": 12, "examples_per_client": 8},
                "num_heldout": 2,
            },
            "federation": {
                "method": method,
                "distribution": dist,
                "rounds": 3,
                "clients_per_round": 3,
                "seed": 0,
                "eval_every": 3,
                "eval_clients": 1,
                "slora_rounds": 1,
            },
            "train": {"steps": 2, "batch_size": 2, "max_length": 48},
            "eval": {"generate": False, "max_examples_per_client": 2, "max_length": 48},
        }
    )
    run_dir = run_federation(cfg, progress=False).run_dir
    files = [run_dir / "checkpoint" / "global.safetensors", *sorted(run_dir.glob("adapters/*/*.safetensors"))]
    return {str(f.relative_to(run_dir)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def compare(now: dict[str, dict[str, str]], before: dict[str, dict[str, str]]) -> bool:
    same = True
    for method in sorted(set(now) | set(before)):
        a, b = now.get(method), before.get(method)
        if a is None or b is None:
            print(f"{method}: only in {'before' if a is None else 'now'}")
            same = False
            continue
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        print(f"{method}: {'same' if not differ else 'differs: ' + ', '.join(differ)}")
        same &= not differ
    return same


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where to write {method: {file: sha256}}")
    p.add_argument("--check", type=Path, help="an earlier --out to compare with")
    p.add_argument("--methods", help="comma-separated (default: every method)")
    args = p.parse_args()
    logging.disable(logging.WARNING)
    methods = args.methods.split(",") if args.methods else all_methods()
    with tempfile.TemporaryDirectory() as tmp:
        hashes = {m: run_hashes(m, Path(tmp)) for m in methods}
    args.out.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    if args.check:
        return 0 if compare(hashes, json.loads(args.check.read_text())) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
