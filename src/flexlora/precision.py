"""Numeric precision of local training and evaluation: ``fp32``, ``bf16`` or ``auto``.

* ``fp32``: every operation in the model's own dtype, exactly as without this module.
* ``bf16``: the forward pass under ``torch.autocast(dtype=bfloat16)``: matrix products and attention in
  bfloat16, reductions (norms, softmax, the loss) in float32. Parameters stay in their dtype, so the LoRA
  factors and the optimizer state remain float32 master copies; gradients reach them in float32.
* ``auto``: ``bf16`` where the hardware computes bfloat16 products natively (a CUDA device that supports
  them; a CPU with AVX-512 BF16 or AMX), else ``fp32``. On a CPU without them (AVX2 only) oneDNN emulates
  bfloat16 and a product runs several times slower than in float32 (measured 6.5x on an AVX2 EPYC).

Autocast casts a frozen float32 weight to bfloat16 at every use; with ``model.dtype: bfloat16`` the base
weights are bfloat16 already and that copy disappears (the LoRA factors stay float32 either way).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

__all__ = ["PRECISIONS", "autocast", "bf16_native", "resolve_precision"]

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "auto")
_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is none, e.g. not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (CUDA with bf16 support; a CPU with
    AVX-512 BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(_cpu_flags() & _BF16_CPU_FLAGS)
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``fp32`` or ``bf16``: ``precision`` itself, or for ``auto`` what :func:`bf16_native` allows on
    ``device`` (``"auto"``: CUDA when available, else the CPU, as :func:`flexlora.models.load_model`).

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return "bf16" if bf16_native(torch.device(device)) else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context to run a forward pass in at a resolved ``precision`` (``fp32``: none)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
