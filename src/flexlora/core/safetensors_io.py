"""Reading safetensors files that strangers sent, without trusting them.

The header is parsed and checked by hand before anything is allocated: its length must fit in the file,
every tensor needs an allowed float dtype, a shape of non-negative integers and byte offsets that match
``prod(shape) * itemsize`` and lie inside the file. A header that declares an absurd shape therefore fails
the offset check instead of allocating. Only then does ``safetensors`` load the tensors. Nothing is ever
unpickled.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flexlora.core.errors import AdapterError

__all__ = ["read_safetensors", "write_safetensors", "FLOAT_DTYPES"]

#: safetensors dtype tag -> bytes per element; only floating types are accepted for LoRA factors.
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
MAX_HEADER_BYTES = 16 * 2**20  # ours: ~150 bytes per tensor


def _check_header(path: Path) -> dict:
    size = path.stat().st_size
    if size < 8:
        raise AdapterError(f"{path}: truncated safetensors file ({size} bytes)")
    with path.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise AdapterError(
                f"{path}: header length {n} exceeds the file ({size} bytes): truncated or corrupt"
            )
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # (deeply nested JSON)
            raise AdapterError(f"{path}: header is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: header is not a JSON object")
    data_bytes = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise AdapterError(f"{path}: tensor {name!r}: header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in FLOAT_DTYPES:
            raise AdapterError(
                f"{path}: tensor {name!r}: dtype {dtype!r} is not one of {sorted(FLOAT_DTYPES)}"
            )
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise AdapterError(
                f"{path}: tensor {name!r}: shape {shape!r} is not a list of non-negative integers"
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes
        ):
            raise AdapterError(f"{path}: tensor {name!r}: data offsets {offsets!r} lie outside the file")
        if offsets[1] - offsets[0] != math.prod(shape) * FLOAT_DTYPES[dtype]:
            raise AdapterError(
                f"{path}: tensor {name!r}: shape {shape} needs {math.prod(shape) * FLOAT_DTYPES[dtype]} bytes, "
                f"the file holds {offsets[1] - offsets[0]}: corrupt or forged header"
            )
    return header


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file after validating its header; only float tensors are accepted.

    Raises:
        AdapterError: naming the file and tensor, for a missing, truncated, corrupt or forged file.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: file not found")
    _check_header(path)
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise AdapterError(f"{path}: unreadable safetensors file ({exc})") from None


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata=None) -> None:
    """Write contiguous CPU copies of ``tensors`` to ``path`` (caller handles atomic placement)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
