"""Fuzzing what Flower nodes send back (with hypothesis): ``.npy`` bytes with flipped bits, cut short or with
headers written at random, and whole train replies with random metrics and example counts.

Each input either decodes to exactly the expected finite float matrix, or is refused with a
:class:`ReplyError` in one line; nothing else may escape, and peak memory stays small whatever shape a header
declares (tests/test_fuzz_memory.py measures it in a process of its own). ``FLEXLORA_FUZZ_EXAMPLES=N`` sets
how many inputs per test, ``FLEXLORA_FUZZ_RANDOM=1`` draws fresh ones (the default is a fixed sequence).
"""

from __future__ import annotations

import io
import math
import os
import struct

import numpy as np
import torch
from flwr.app import Array, MetricRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexlora.engines.flower.records import ReplyError, decode_array, update_from_reply
from helpers.flower_records import factors, reply_with

FUZZ = settings(
    max_examples=int(os.environ.get("FLEXLORA_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
    derandomize=not os.environ.get("FLEXLORA_FUZZ_RANDOM"),
)
SHAPE = (3, 6)
GOOD = np.arange(18, dtype=np.float32).reshape(SHAPE) / 7


def _npy(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, values, allow_pickle=False)
    return buf.getvalue()


def _decode_or_refuse(data: bytes) -> torch.Tensor | None:
    """Decode ``data`` as the reply's ``A``; a result must be the expected finite float matrix."""
    try:
        tensor = decode_array(5, "update[m.A]", Array("float32", SHAPE, "numpy.ndarray", data), SHAPE)
    except ReplyError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("node 5: update[m.A]: ")
        return None
    assert tuple(tensor.shape) == SHAPE and tensor.dtype in (torch.float16, torch.float32, torch.float64)
    assert torch.isfinite(tensor).all()
    return tensor


VALID = {dtype: _npy(GOOD.astype(dtype)) for dtype in ("<f2", "<f4", "<f8", ">f4", "<i4")}


@FUZZ
@given(
    base=st.sampled_from(sorted(VALID)),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=6),
    cut=st.none() | st.integers(0, 300),
)
def test_flipped_or_truncated_npy_is_decoded_exactly_or_refused(base, flips, cut):
    data = bytearray(VALID[base])
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _decode_or_refuse(bytes(data))


DESCRS = ["'<f4'", "'<f8'", "'<f2'", "'>f4'", "'|O'", "'<i8'", "'<c8'", "'|b1'", "'<U3'", "'|V8'", "'<f16'"]
DIMS = st.integers(-3, 8) | st.integers(2**31, 2**64) | st.sampled_from([0, 10**12])


@FUZZ
@given(
    descr=st.sampled_from(DESCRS) | st.text(max_size=12).map(repr),
    shape=st.lists(DIMS, max_size=4).map(tuple),
    fortran=st.booleans(),
    version=st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x00\x01"]),
    payload=st.binary(max_size=200) | st.sampled_from([GOOD.tobytes(), GOOD.astype("<f8").tobytes()]),
)
def test_any_npy_header_is_decoded_exactly_or_refused_before_allocating(
    descr, shape, fortran, version, payload
):
    header = f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape!r}, }}".encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    size = struct.pack("<H" if version == b"\x01\x00" else "<I", len(header))
    tensor = _decode_or_refuse(b"\x93NUMPY" + version + size + header + payload)
    if tensor is not None:  # only a header that tells the truth about the payload decodes
        assert shape == SHAPE and len(payload) == math.prod(SHAPE) * tensor.element_size()


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes_are_refused(data):
    assert _decode_or_refuse(data) is None or data.startswith(b"\x93NUMPY")


METRIC = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**63), 2**63 - 1)


@FUZZ
@given(
    n=st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=True, allow_infinity=True),
    metrics=st.dictionaries(st.text(min_size=1, max_size=8), METRIC, max_size=40),
)
def test_reply_metrics_and_counts_are_bounded_and_finite(n, metrics):
    content = reply_with()
    content["metrics"] = MetricRecord({**metrics, "num-examples": n})
    try:
        update, kept, _ = update_from_reply(content, factors(3), "c1", node=2, max_examples=1000)
    except ReplyError as exc:
        assert "num-examples" in str(exc) and "\n" not in str(exc)
        return
    assert 1 <= update.num_examples <= 1000
    assert len(kept) <= 32 and all(math.isfinite(v) for v in kept.values())
