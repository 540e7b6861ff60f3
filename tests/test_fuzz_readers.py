"""Fuzzing the readers of untrusted files (safetensors, PEFT adapters, checkpoints, run configs, NI data
files) with hypothesis: malformed headers, truncated and bit-flipped files, wrong dtypes, huge declared
shapes, hostile JSON and YAML, corrupt gzip. Configs and data files may only raise a one-line ValueError.

Each input either loads, with no tensor larger than the file that holds it, or is refused with the one
clear error (:class:`AdapterError`); nothing else may escape, and peak memory stays small
(tests/test_fuzz_memory.py measures it in a process of its own).
``FLEXLORA_FUZZ_REPORT=1 pytest -s`` prints how many inputs of each kind were refused;
``FLEXLORA_FUZZ_RANDOM=1`` draws fresh inputs (the default is a fixed sequence) and
``FLEXLORA_FUZZ_EXAMPLES=N`` sets how many per test.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexlora.checkpoint import ServerState, _digest, load_checkpoint, save_checkpoint
from flexlora.config import load_config  # imported here: the memory check then sees only what inputs cost
from flexlora.core.adapter_io import read_adapter, write_adapter
from flexlora.core.aggregators import GlobalState
from flexlora.core.errors import AdapterError
from flexlora.core.lora import LoraFactors
from flexlora.core.safetensors_io import read_safetensors, write_safetensors
from flexlora.data import open_source

FUZZ = settings(
    max_examples=int(os.environ.get("FLEXLORA_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
    derandomize=not os.environ.get("FLEXLORA_FUZZ_RANDOM"),  # CI sees the same inputs every run
)
REFUSED: Counter = Counter()
TRIED: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if os.environ.get("FLEXLORA_FUZZ_REPORT"):
        print(f"\nfuzz: tried {dict(TRIED)}\nfuzz: refused by kind {dict(REFUSED)}")


def _kind(message: str) -> str:
    for needle, kind in (
        ("sha256", "hash mismatch"),
        ("manifest.json says", "size mismatch"),
        ("beyond the config", "round beyond config"),
        ("does not match the config", "method mismatch"),
        ("truncated", "truncated"),
        ("header length", "header length"),
        ("not valid JSON", "bad JSON"),
        ("header entry is not an object", "bad header entry"),
        ("peft_type", "not LoRA"),
        ("not an adapter directory", "missing file"),
        ("missing", "missing file or field"),
        ("not a JSON object", "bad JSON"),
        ("dtype", "dtype"),
        ("shape", "shape"),
        ("offsets", "offsets"),
        ("bytes, the file holds", "declared size"),
        ("unreadable", "rejected by safetensors"),
        ("NaN or Inf", "non-finite"),
        ("field", "bad field"),
        ("pattern", "config pattern"),
        ("rank", "rank"),
        ("not a LoRA factor", "unknown tensor"),
        ("no lora_", "missing factor"),
    ):
        if needle in message:
            return kind
    return "other"


def expect_refused_or_small(read, path: Path, what: str):
    """Call ``read(path)``; only AdapterError may escape, and loaded tensors fit in the file."""
    TRIED[what] += 1
    try:
        out = read(path)
    except AdapterError as exc:
        REFUSED[f"{what}: {_kind(str(exc))}"] += 1
        return None
    size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
    values = out.values() if isinstance(out, dict) else []
    tensors = [t for v in values for t in ((v.A, v.B) if isinstance(v, LoraFactors) else (v,))]
    assert sum(t.numel() * t.element_size() for t in tensors) <= size
    return out


def _file(data: bytes) -> Path:
    fd, name = tempfile.mkstemp(suffix=".safetensors")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return Path(name)


def _pack(header: object, body: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def _valid_bytes() -> bytes:
    path = Path(tempfile.mkdtemp()) / "v.safetensors"
    write_safetensors(path, {"a.A": torch.randn(2, 3), "a.B": torch.randn(4, 2).double()})
    data = path.read_bytes()
    shutil.rmtree(path.parent)
    return data


VALID = _valid_bytes()
DTYPES = st.sampled_from(
    ["F16", "BF16", "F32", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "C64", "", "f32", None, 3]
)
DIMS = st.one_of(
    st.integers(0, 8),
    st.integers(2**31, 2**64),
    st.integers(-5, -1),
    st.just(2**200),
    st.floats(),
    st.text(max_size=3),
)
SHAPES = st.one_of(st.lists(DIMS, max_size=4), st.integers(), st.none(), st.text(max_size=4))
OFFSETS = st.one_of(
    st.lists(st.one_of(st.integers(-10, 200), st.integers(2**40, 2**64)), min_size=0, max_size=3),
    st.none(),
    st.text(max_size=3),
)
ENTRY = st.one_of(
    st.fixed_dictionaries({"dtype": DTYPES, "shape": SHAPES, "data_offsets": OFFSETS}),
    st.integers(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=3),
)
HEADERS = st.dictionaries(
    st.one_of(st.text(max_size=8), st.just("__metadata__")),
    st.one_of(ENTRY, st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2)),
    max_size=4,
)


# ---------------------------------------------------------------------------------------------- safetensors
@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(data):
    path = _file(data)
    try:
        expect_refused_or_small(read_safetensors, path, "random bytes")
    finally:
        path.unlink()


@FUZZ
@given(HEADERS, st.binary(max_size=96), st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_malformed_headers_wrong_dtypes_and_huge_shapes(header, body, length):
    path = _file(_pack(header, body, length))
    try:
        expect_refused_or_small(read_safetensors, path, "malformed header")
    finally:
        path.unlink()


@FUZZ
@given(st.integers(0, len(VALID) - 1))
def test_truncated_files(cut):
    path = _file(VALID[:cut])
    try:
        assert expect_refused_or_small(read_safetensors, path, "truncated file") is None
    finally:
        path.unlink()


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_bit_flipped_files(flips):
    data = bytearray(VALID)
    for pos, mask in flips:
        data[pos] ^= mask
    path = _file(bytes(data))
    try:
        expect_refused_or_small(read_safetensors, path, "corrupted file")
    finally:
        path.unlink()


@pytest.mark.parametrize(
    ("label", "data"),
    [
        ("deeply nested JSON", _pack(b"[" * 200_000)),
        ("huge declared header", _pack({}, length=2**63)),
        (
            "shape of 2^62 x 2^62 over 16 bytes",
            _pack({"x": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}}, bytes(16)),
        ),
        (
            "shape whose byte count wraps 64 bits",
            _pack({"x": {"dtype": "F32", "shape": [2**62], "data_offsets": [0, 0]}}),
        ),
        ("int64 tensor", _pack({"x": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}, bytes(16))),
        (
            "overlapping tensors",
            _pack(
                {
                    "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "y": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                },
                bytes(8),
            ),
        ),
        (
            "non-string metadata",
            _pack(
                {"__metadata__": {"a": [1]}, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                bytes(4),
            ),
        ),
    ],
)
def test_named_hostile_files(label, data):
    path = _file(data)
    try:
        expect_refused_or_small(read_safetensors, path, label)
    finally:
        path.unlink()


# ---------------------------------------------------------------------------------------------- adapters
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=6)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
CONFIG_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "peft_type": st.one_of(st.just("LORA"), JSON),
        "r": st.one_of(st.integers(-3, 10), JSON),
        "lora_alpha": st.one_of(st.floats(), JSON),
        "rank_pattern": st.one_of(
            st.dictionaries(
                st.sampled_from(["q", "^x", "(", "a[", "*", "layers.0.q"]),
                st.one_of(st.integers(-2, 9), JSON),
                max_size=2,
            ),
            JSON,
        ),
        "alpha_pattern": st.one_of(st.dictionaries(st.text(max_size=4), JSON, max_size=2), JSON),
        "use_rslora": JSON,
        "target_modules": JSON,
    },
)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter") / "a"
    factors = {
        "layers.0.q": LoraFactors(torch.randn(2, 5), torch.randn(6, 2), 16.0),
        "layers.0.v": LoraFactors(torch.randn(3, 5), torch.randn(4, 3), 8.0),
    }
    write_adapter(path, factors)
    return path


@FUZZ
@given(st.one_of(CONFIG_FIELDS, JSON), st.booleans())
def test_hostile_adapter_configs(adapter_dir, config, as_text):
    work = Path(tempfile.mkdtemp()) / "a"
    shutil.copytree(adapter_dir, work)
    try:
        text = json.dumps(config) if not as_text else json.dumps(config)[: len(json.dumps(config)) // 2]
        (work / "adapter_config.json").write_text(text)
        expect_refused_or_small(lambda p: read_adapter(p)[0].modules, work, "adapter config")
    finally:
        shutil.rmtree(work.parent)


@FUZZ
@given(st.integers(0, 10_000), st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=3))
def test_truncated_or_corrupted_adapter_weights(cut, flips):
    tmp = Path(tempfile.mkdtemp())
    try:
        write_adapter(tmp / "a", {"m": LoraFactors(torch.randn(2, 5), torch.randn(6, 2), 16.0)})
        weights = tmp / "a" / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        for pos, mask in flips:
            data[pos % len(data)] ^= mask
        weights.write_bytes(bytes(data[: cut % (len(data) + 1)]))
        expect_refused_or_small(lambda p: read_adapter(p)[0].modules, tmp / "a", "adapter weights")
    finally:
        shutil.rmtree(tmp)


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    state = GlobalState.initial({"q": (6, 5), "v": (4, 5)}, {"q": 2, "v": 3}, "flexlora", seed=1)
    save_checkpoint(run, ServerState(1, state, {"c0": "r8"}, [{"round": 0}]), {"seed": 0})
    return run


SERVER_FIELDS = st.fixed_dictionaries(
    {},
    optional={k: JSON for k in ("round", "method", "assignment", "metrics", "config")},
)


@FUZZ
@given(
    st.one_of(SERVER_FIELDS, JSON),
    st.integers(0, 2000),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 255)), max_size=2),
)
def test_hostile_checkpoints(checkpoint_dir, server, cut, flips):
    tmp = Path(tempfile.mkdtemp())
    try:
        shutil.copytree(checkpoint_dir / "checkpoint", tmp / "checkpoint")
        if isinstance(server, dict) and server:
            good = json.loads((tmp / "checkpoint" / "server.json").read_text())
            (tmp / "checkpoint" / "server.json").write_text(json.dumps({**good, **server}))
        elif server is not None:
            (tmp / "checkpoint" / "server.json").write_text(json.dumps(server))
        weights = tmp / "checkpoint" / "global.safetensors"
        data = bytearray(weights.read_bytes())
        for pos, mask in flips:
            data[pos % len(data)] ^= mask
        weights.write_bytes(bytes(data[: len(data) - cut % (len(data) + 1)] if cut % 3 == 0 else data))
        if cut % 2 == 0:  # a consistent forgery half the time: the manifest then passes, the parsers decide
            files = {n: _digest(tmp / "checkpoint" / n) for n in ("global.safetensors", "server.json")}
            (tmp / "checkpoint" / "manifest.json").write_text(json.dumps({"format": 1, "files": files}))
        expect_refused_or_small(lambda p: load_checkpoint(p)[0].global_state.to_tensors(), tmp, "checkpoint")
    finally:
        shutil.rmtree(tmp)


# ---------------------------------------------------------------------------------------------- run configs
def expect_value_error(call, what: str):
    """Call ``call()``; only ValueError (ConfigError, LoadError, ...) may escape, with a one-line message."""
    TRIED[what] += 1
    try:
        return call()
    except ValueError as exc:
        assert "\n" not in str(exc).strip(), str(exc)
        REFUSED[f"{what}: {type(exc).__name__}"] += 1
        return None


SECTIONS = ("model", "data", "federation", "security", "train", "eval")
CONFIG_VALUES = st.one_of(
    JSON,
    st.floats(),
    st.integers(-(2**80), 2**80),
    st.sampled_from(["tiny", "flexlora", "homo", "", "..", "/", "synthetic", [], {}]),
)
RUN_CONFIGS = st.dictionaries(
    st.sampled_from([*SECTIONS, "name", "output_dir", "junk"]),
    st.one_of(
        st.dictionaries(
            st.sampled_from(
                [
                    "name",
                    "lora_alpha",
                    "rounds",
                    "seed",
                    "method",
                    "path",
                    "options",
                    "lr",
                    "steps",
                    "max_examples",
                ]
            ),
            CONFIG_VALUES,
            max_size=4,
        ),
        CONFIG_VALUES,
    ),
    max_size=5,
)


@FUZZ
@given(RUN_CONFIGS, st.sampled_from(["yaml", "json-in-yaml", "cut"]))
def test_hostile_run_configs(config, form):
    text = yaml_dump(config) if form != "json-in-yaml" else json.dumps(config, default=str)
    if form == "cut":
        text = text[: len(text) // 2]
    path = Path(tempfile.mkdtemp()) / "c.yaml"
    try:
        path.write_text(text)
        cfg = expect_value_error(lambda: load_config(path), "run config")
        if cfg is not None:
            assert cfg.model.lora_alpha > 0 and cfg.federation.rounds >= 1
    finally:
        shutil.rmtree(path.parent)


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_as_run_config(data):
    path = Path(tempfile.mkdtemp()) / "c.yaml"
    try:
        path.write_bytes(data)
        expect_value_error(lambda: load_config(path), "config bytes")
    finally:
        shutil.rmtree(path.parent)


def yaml_dump(value) -> str:
    import yaml

    try:
        return yaml.safe_dump(value)
    except (yaml.YAMLError, ValueError):
        return json.dumps(value, default=str)


# ---------------------------------------------------------------------------------------------- data files
PAIRS = st.one_of(st.lists(st.lists(st.text(max_size=4), min_size=2, max_size=2), max_size=3), JSON)
NI_RECORDS = st.fixed_dictionaries(
    {},
    optional={
        "client_id": st.one_of(st.text(max_size=3), st.integers(0, 5), JSON),
        "task": st.one_of(st.text(max_size=3), JSON),
        "category": st.one_of(st.text(max_size=3), JSON),
        "definition": st.one_of(st.text(max_size=3), JSON),
        "train": PAIRS,
        "eval": PAIRS,
        "test": PAIRS,
    },
)


def _load_all(path: Path, cache: Path):
    source = open_source(path, "ni-jsonl", cache_dir=cache)
    return [source.load(c) for c in source.client_ids()]


@FUZZ
@given(
    st.lists(st.one_of(NI_RECORDS, JSON), min_size=1, max_size=4),
    st.booleans(),
    st.integers(0, 400),
    st.lists(st.tuples(st.integers(0, 400), st.integers(1, 255)), max_size=2),
)
def test_hostile_ni_jsonl_files(records, gz, cut, flips):
    import gzip

    tmp = Path(tempfile.mkdtemp())
    try:
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        if gz:
            data = bytearray(gzip.compress(data, mtime=0))
            for pos, mask in flips:
                data[pos % len(data)] ^= mask
            data = bytes(data[: len(data) - cut % 8 * (cut % 3 == 0)])
        path = tmp / ("d.jsonl.gz" if gz else "d.jsonl")
        path.write_bytes(data)
        expect_value_error(lambda: _load_all(path, tmp / "cache"), "NI data file")
    finally:
        shutil.rmtree(tmp)
