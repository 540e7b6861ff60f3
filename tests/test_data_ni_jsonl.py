"""NI JSONL source: the real 1,455-client file (index built once per module in a temp cache) and tiny files."""

from __future__ import annotations

import gzip
import json
import os
import tracemalloc
from pathlib import Path

import pytest

import flexlora.data.ni_jsonl as ni_jsonl
from flexlora.data.examples import ClientInfo
from flexlora.data.ni_jsonl import NIJsonlSource
from helpers.data import SHARED_DATA, needs_shared_data

NI_FILE = SHARED_DATA / "natural-instructions-1613.jsonl.gz"
needs_ni = needs_shared_data(NI_FILE)


@pytest.fixture(scope="module")
def ni_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding the real file's index and decompressed copy (built once: about 3 s)."""
    cache = tmp_path_factory.mktemp("ni-cache")
    NIJsonlSource(NI_FILE, cache_dir=cache)
    return cache


def _record(client_id: int, n_train: int = 3, category: str = "Sentiment Analysis") -> dict:
    return {
        "client_id": client_id,
        "task": f"{category} {client_id}",
        "task_number": client_id,
        "category": category,
        "definition": f"Definition of task {client_id}.",
        "train": [[f"in {client_id}/{i}", f"out {i}"] for i in range(n_train)],
        "eval": [["e", "f"]],
        "test": [["t", "u"], ["v", "w"]],
    }


def _write(path: Path, records: list[dict]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(text) if path.suffix == ".gz" else text)
    return path


# ---- the real file --------------------------------------------------------------------------------------


@needs_ni
def test_real_file_index(ni_cache: Path) -> None:
    source = NIJsonlSource(NI_FILE, cache_dir=ni_cache)
    infos = [source.info(c) for c in source.client_ids()]
    assert len(source) == 1455
    assert len({i.category for i in infos}) == 76
    assert sum(i.num_train for i in infos) == 363_078
    assert min(i.num_train for i in infos) == 16 and max(i.num_train for i in infos) == 520
    assert source.info("5") == ClientInfo("5", "Program Execution 1001", "Program Execution", 520, 65, 65)


@needs_ni
def test_real_client_load(ni_cache: Path) -> None:
    source = NIJsonlSource(NI_FILE, cache_dir=ni_cache)
    data = source.load("5")
    info = source.info("5")
    assert (len(data.train), len(data.eval), len(data.test)) == (info.num_train, info.num_eval, info.num_test)
    examples = data.train + data.eval + data.test
    assert len({e.instruction for e in examples}) == 1 and examples[0].instruction.strip()
    assert {e.category for e in examples} == {"Program Execution"}
    assert all(e.output for e in examples)


@needs_ni
def test_reopen_reads_the_cached_index(ni_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_rebuild(*args: object) -> None:
        raise AssertionError("the index was rebuilt instead of read from the cache")

    monkeypatch.setattr(ni_jsonl, "_build_index", no_rebuild)
    assert len(NIJsonlSource(NI_FILE, cache_dir=ni_cache)) == 1455


@needs_ni
def test_index_is_small_and_load_reads_one_client(ni_cache: Path) -> None:
    tracemalloc.start()
    try:
        source = NIJsonlSource(NI_FILE, cache_dir=ni_cache)
        index_bytes, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        data = source.load("5")
        _, load_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert index_bytes < 2_000_000  # 1,455 clients' ids, names, sizes and offsets (about 0.75 MB)
    assert load_peak < 20_000_000  # the decompressed file is 211 MB
    assert source.cached_ids() == ["5"] and len(data.train) == source.info("5").num_train


# ---- tiny files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny.jsonl", "tiny.jsonl.gz"])
def test_plain_and_gzip_give_the_same_clients(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path / name, [_record(5), _record(7, n_train=4, category="Translation")])
    source = NIJsonlSource(path, cache_dir=tmp_path / "cache")
    assert source.client_ids() == ["5", "7"]
    assert source.info("7").num_train == 4 and source.info("7").category == "Translation"
    data = source.load("7")
    assert data.train[3].input == "in 7/3" and data.train[3].output == "out 3"
    assert data.test[1].instruction == "Definition of task 7."


def test_changed_file_gets_a_new_index(tmp_path: Path) -> None:
    path = _write(tmp_path / "tiny.jsonl.gz", [_record(1)])
    assert len(NIJsonlSource(path, cache_dir=tmp_path / "cache")) == 1
    _write(path, [_record(1), _record(2)])
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse-clock file systems
    assert NIJsonlSource(path, cache_dir=tmp_path / "cache").client_ids() == ["1", "2"]


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXLORA_CACHE", str(tmp_path / "env-cache"))
    NIJsonlSource(_write(tmp_path / "tiny.jsonl.gz", [_record(1)]))
    assert len(list((tmp_path / "env-cache").glob("*.index.json"))) == 1
    assert len(list((tmp_path / "env-cache").glob("plain-*.jsonl"))) == 1


def test_bad_records_are_refused_with_their_line(tmp_path: Path) -> None:
    bad = _record(2)
    del bad["definition"]
    path = _write(tmp_path / "bad.jsonl", [_record(1), bad])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: NI JSONL record lacks \['definition'\]"):
        NIJsonlSource(path, cache_dir=tmp_path)
    _write(path, [_record(1), _record(1)])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: client_id '1' appears twice"):
        NIJsonlSource(path, cache_dir=tmp_path)


def test_unknown_client(tmp_path: Path) -> None:
    source = NIJsonlSource(_write(tmp_path / "tiny.jsonl", [_record(1)]), cache_dir=tmp_path)
    with pytest.raises(KeyError, match="has no client '9'"):
        source.load("9")
