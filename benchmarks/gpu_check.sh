#!/usr/bin/env bash
# GPU readiness check (issue 16): a 2-round SmolLM2 federation in bf16 on CUDA (s/step, tokens/s, peak memory),
# then the aggregation benchmark's streaming part on CUDA. Exits 0 with a message where there is no CUDA.
#   benchmarks/gpu_check.sh [OUT_DIR]        (OUT_DIR default: runs/gpu-check; the report goes there too)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check."
  exit 0
fi
OUT=${1:-runs/gpu-check}
mkdir -p "$OUT"
"$PY" -c 'import torch; print("gpu_check:", torch.__version__, torch.cuda.get_device_name())'
"$PY" benchmarks/gpu_check.py --rounds 2 --out "$OUT"
"$PY" benchmarks/bench_aggregation.py --parts stream --device cuda --threads 4 \
  --json "$OUT/aggregation-cuda.json" --out "$OUT/aggregation-cuda.md"
sed -n '/^## Targets/,/^## Reading/p' "$OUT/aggregation-cuda.md"
