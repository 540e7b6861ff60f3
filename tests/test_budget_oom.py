"""A client given a tight memory budget does not run out of memory at the rank type the budget logic picks.

Each client here is a fresh process (:mod:`flexlora.rank_probe`: load the model, install LoRA at the rank type,
two AdamW steps on full-length sequences) started under ``RLIMIT_DATA`` = the budget. What the limit covers:
the process's private writable memory from ``exec`` on (heap, anonymous mappings, the copy-on-write mapping
of the safetensors file), so the interpreter and the torch, transformers and PEFT imports count against the
budget too, as they do in the estimate (:data:`flexlora.core.budget.RUNTIME_BYTES`, 0.40 GiB; a bare
``import flexlora.training`` measured 0.18 GiB of data, 0.22 GiB resident). The code of shared libraries is
not data, so the limit is a little looser than resident memory; the test therefore also checks the peak RSS
the probe reports (its resident high-water mark) against the budget. torch's allocator honours the limit:
an allocation past it raises ``DefaultCPUAllocator: can't allocate memory`` (Linux only).

The model is a random 8-layer Llama (hidden 512, MLP 1536, 21 M parameters, 84 MB in float32) with LoRA on
all seven projections: small enough to train in seconds, with LoRA state large enough (``r8`` 0.55 M LoRA
parameters, ``attn30-mlp200`` 9.9 M) that the rank types' needs differ by far more than the limit's slack.
Measured on the project's 2-core machine (peak RSS, GiB): ``r8`` 0.51, ``r30`` 0.52, ``attn30-mlp200`` 0.69,
``r200`` 0.71; estimates 0.517, 0.545, 0.702, 0.727. With the estimate's earlier four copies of the LoRA
factors (0.663 for ``attn30-mlp200``) that type's client failed under its own estimate.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from flexlora.budget import pick, rank_table
from flexlora.core.budget import GIB, Budget
from flexlora.models import ALL_PROJECTIONS, load_model

pytestmark = [
    pytest.mark.slow,  # three training processes: about 40 s of CPU
    pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_DATA covers mmap on Linux only"),
]

BATCH, SEQ_LEN = 2, 32
OOM = ("can't allocate memory", "Cannot allocate memory", "MemoryError")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A local model directory: the 8-layer random Llama and the tiny model's byte tokenizer."""
    path = tmp_path_factory.mktemp("oom-model")
    config = LlamaConfig(
        vocab_size=259,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=1024,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    load_model("tiny", device="cpu")[1].save_pretrained(path)
    return str(path)


def _train_under_limit(model: str, attn: int, mlp: int, limit: int) -> subprocess.CompletedProcess:
    """A client's training steps in a fresh process whose data segment is capped at ``limit`` bytes."""
    spec = {"model": model, "targets": sorted(ALL_PROJECTIONS), "batch": BATCH, "seq_len": SEQ_LEN}
    spec |= {"dtype": "float32", "device": "cpu", "attn": attn, "mlp": mlp}
    cap = lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))  # noqa: E731
    cmd = [sys.executable, "-m", "flexlora.rank_probe", json.dumps(spec)]
    # one thread, as the estimate assumes: extra OpenMP threads' stacks count against RLIMIT_DATA, and without
    # OMP_NUM_THREADS set (a clean CI shell) the capped child hung past 600 s instead of training
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, preexec_fn=cap, check=False, env=env
    )


def _fits(done: subprocess.CompletedProcess, limit: int) -> None:
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"] <= limit


def test_a_client_at_the_chosen_rank_type_fits_a_tight_budget_and_a_refused_one_does_not(model_dir):
    rows = rank_table(model_dir, ALL_PROJECTIONS, BATCH, SEQ_LEN, "float32", "cpu", "estimate")
    names = [r.rank_type.name for r in rows]
    assert names == ["r8", "r30", "attn30-mlp200", "r200"]

    # a budget of exactly r30's estimate: r30 is chosen and trains within it
    tight = rows[1].estimate.total
    chosen = pick(rows, Budget(tight / GIB), steps_per_round=1)
    assert chosen.rank_type.name == "r30"
    _fits(_train_under_limit(model_dir, 30, 30, tight), tight)

    # control: the next type up, which the budget logic refuses, runs out of memory under the same limit
    assert rows[2].estimate.total > tight
    done = _train_under_limit(model_dir, 30, 200, tight)
    assert done.returncode != 0 and any(s in done.stderr for s in OOM), done.stderr[-300:]

    # the LoRA-heavy type at exactly its own estimate (it failed when the estimate counted 4 LoRA copies)
    tight = rows[2].estimate.total
    assert pick(rows, Budget(tight / GIB), steps_per_round=1).rank_type.name == "attn30-mlp200"
    _fits(_train_under_limit(model_dir, 30, 200, tight), tight)
