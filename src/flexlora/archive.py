"""The study's adapter archive: each finished run's final global update, cut to rank 64, kept apart from it.

A run directory holds the exact global update (``checkpoint/``, ``adapters/full``), at any rank up to the
sum of its clients' ranks. The archive keeps, per finished cell, the best rank-``q`` approximation of it,
``q = min(64, rank dW)`` per module, as a PEFT adapter: small enough to keep when the run directories are
cleared, and enough to re-evaluate a finished study on other data without retraining.

Math, per module: ``dW = B A`` (the checkpoint's factors, scales folded in) has the thin SVD
``U diag(S) V^T`` (:func:`~flexlora.core.svd.svd_lowrank_product`, exact, never forming ``dW`` while its
inner dimension is small). Its numerical rank counts ``s_i > max(d, k) eps s_1`` (NumPy's ``matrix_rank``
tolerance). ``dW_q = U_q diag(S_q) V_q^T`` is the best rank-``q`` approximation in Frobenius and spectral
norm (Eckart-Young), with ``||dW - dW_q||_F = sqrt(sum_{i > q} s_i^2)``, recorded per module as ``tail``
next to ``norm = ||dW||_F``. The adapter's factors are ``A = V_q^T`` and ``B = U_q diag(S_q) / s``,
``s = lora_alpha / q`` (``/ sqrt(q)`` under rsLoRA), so PEFT's ``s B A`` is ``dW_q``.

Layout, one entry per cell (``ARCHIVE/<label>/<distribution>/seed<s>/``): ``adapter/`` (the PEFT adapter),
``archive.json`` (source run, round, the sha256 of the checkpoint's ``global.safetensors``, ``q``, ``norm``
and ``tail`` per module) and the run's ``config.yaml`` and ``cell.json``. An entry is written whole
(temporary directory, renamed into place). An entry whose ``archive.json`` names the same checkpoint
digest and rank (or whose run has lost its checkpoint since) is kept untouched, one from another checkpoint
(the cell was run again) is replaced; a directory there without ``archive.json`` is refused, never replaced.

Size: at rank 64 a SmolLM2-135M adapter on all seven projections holds 64 (d + k) floats per module, 19.5 M
float32 values over its 210 modules, about 78 MB (computed from the shapes; r8 cells keep rank 8, ~10 MB).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from flexlora.checkpoint import CHECKPOINT_DIR, load_checkpoint
from flexlora.core.adapter_io import atomic_directory, write_adapter
from flexlora.core.aggregators.base import GlobalState, exact_factors
from flexlora.core.errors import AdapterError
from flexlora.core.lora import LowRank
from flexlora.core.output_dirs import OutputError
from flexlora.core.safe_load import LoadError, load_json
from flexlora.core.svd import svd_lowrank_product

__all__ = ["ARCHIVE_RANK", "INFO", "archive_cell", "archive_run", "truncate_state"]

ARCHIVE_RANK = 64
INFO = "archive.json"
COPIED = ("config.yaml", "cell.json")


def truncate_state(state: GlobalState, rank: int = ARCHIVE_RANK) -> tuple[GlobalState, dict[str, dict]]:
    """The best rank-``min(rank, rank dW)`` approximation of every module of ``state`` (module doc), in SVD
    form, and per module ``{"rank": q, "norm": ||dW||_F, "tail": ||dW - dW_q||_F}``."""
    modules, stats = {}, {}
    for name, lr in state.modules.items():
        U, S, Vh = svd_lowrank_product(lr.B, lr.A, route="auto")  # (d, m), (m,), (m, k)
        s = S.double()  # norms in float64
        tol = max(lr.shape) * torch.finfo(S.dtype).eps * (float(s[0]) if len(s) else 0.0)
        q = min(rank, int((s > tol).sum()))
        modules[name] = LowRank(U[:, :q] * S[:q], Vh[:q])  # (d, q), (q, k)
        stats[name] = {"rank": q, "norm": float(s.norm()), "tail": float(s[q:].norm())}
    return GlobalState(modules, state.method, svd_form=True), stats


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def archive_run(run_dir: str | Path, dest: str | Path, rank: int = ARCHIVE_RANK) -> str:
    """Archive the final global update of the finished run ``run_dir`` at ``dest`` (module doc); returns
    what happened, in words (``kept``: already archived from the same checkpoint).

    Raises:
        AdapterError: the checkpoint is missing, malformed or not of the run's last round.
        OutputError: ``dest`` exists but is not an archive entry (nothing is replaced).
    """
    run_dir, dest = Path(run_dir), Path(dest)
    source = run_dir / CHECKPOINT_DIR / "global.safetensors"
    digest = _sha256(source) if source.is_file() else None
    if (dest / INFO).is_file():
        old = load_json(dest / INFO)
        if isinstance(old, dict) and old.get("max_rank") == rank and digest in (None, old.get("sha256")):
            return f"archive kept ({dest})"
    elif dest.exists():
        raise OutputError(f"{dest}: exists and is not an archive entry (no {INFO}); move it away first")
    server, config = load_checkpoint(run_dir)
    rounds = config.get("federation", {}).get("rounds")
    if server.round != rounds:
        raise AdapterError(f"{source}: round {server.round} of {rounds}: the run has not finished")
    truncated, stats = truncate_state(server.global_state, rank)
    model = config.get("model", {})
    factors = exact_factors(truncated, model.get("lora_alpha", 16), bool(model.get("use_rslora", False)))
    info: dict[str, Any] = {
        "source": str(run_dir.resolve()),
        "round": server.round,
        "sha256": digest,
        "max_rank": rank,
        "modules": stats,
    }
    with atomic_directory(dest) as tmp:
        write_adapter(tmp / "adapter", factors, model.get("name"))
        for name in COPIED:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
        (tmp / INFO).write_text(json.dumps(info, indent=1) + "\n")
    worst = max((s["tail"] / s["norm"] for s in stats.values() if s["norm"] > 0), default=0.0)
    return f"archived at rank <= {rank} ({dest}; largest relative tail {worst:.2e})"


def archive_cell(run_dir: str | Path, dest: str | Path) -> str:
    """:func:`archive_run` for a comparison's cell: a failure is returned as one line, not raised, so that
    the grid goes on (the cell's run is finished and kept; a later ``flexlora compare`` archives it)."""
    try:
        return archive_run(run_dir, dest)
    except (AdapterError, LoadError, OutputError, OSError) as exc:
        return f"archive FAILED ({exc})"
