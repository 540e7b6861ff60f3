"""open_source: format detection, explicit formats, options, and the errors users see."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexlora.data import (
    FORMATS,
    DollySource,
    NIJsonlSource,
    NITasksSource,
    PaperLayoutSource,
    SyntheticSource,
    detect_format,
    open_source,
)
from helpers.data import SHARED_DATA as DATA
from helpers.data import needs_shared_data

needs_data = needs_shared_data(DATA)


def test_formats_registry() -> None:
    assert sorted(FORMATS) == ["dolly", "ni-jsonl", "ni-tasks", "paper-layout", "synthetic"]


@needs_data
@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("natural-instructions-1613.jsonl.gz", "ni-jsonl"),
        ("databricks-dolly-15k.jsonl", "dolly"),
        ("flexlora-ni-layout-sample", "paper-layout"),
    ],
)
def test_detects_the_real_files(name: str, fmt: str) -> None:
    assert detect_format(DATA / name) == fmt


@needs_data
def test_opens_real_files_with_options(tmp_path: Path) -> None:
    dolly = open_source(DATA / "databricks-dolly-15k.jsonl", split_by="dirichlet", num_clients=5, seed=1)
    assert isinstance(dolly, DollySource) and len(dolly) == 5
    layout = open_source(str(DATA / "flexlora-ni-layout-sample"), cache_dir=tmp_path)
    assert isinstance(layout, PaperLayoutSource) and len(layout) == 24


def test_synthetic_by_name_and_by_format() -> None:
    source = open_source("synthetic", num_clients=5, examples_per_client=20, seed=2)
    assert isinstance(source, SyntheticSource) and len(source) == 5 and source.info("0").num_train == 16
    assert open_source("synthetic", format="synthetic").client_ids() == SyntheticSource().client_ids()
    with pytest.raises(ValueError, match="format 'synthetic' is built in and reads no path"):
        open_source("data/x.jsonl", format="synthetic")


def test_detects_small_files(tmp_path: Path) -> None:
    ni = tmp_path / "ni.jsonl"
    record = {"client_id": 1, "task": "T 1", "category": "T", "definition": "d", "train": [["a", "b"]]}
    ni.write_text(json.dumps({**record, "eval": [], "test": []}) + "\n")
    assert isinstance(open_source(ni, cache_dir=tmp_path / "cache"), NIJsonlSource)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    instances = [{"input": f"x{i}", "output": ["y"]} for i in range(10)]
    (tasks / "task001_x.json").write_text(
        json.dumps({"Definition": ["d"], "Categories": ["c"], "Instances": instances})
    )
    source = open_source(tasks, cache_dir=tmp_path / "cache", sample_fraction=0.5)
    assert isinstance(source, NITasksSource) and source.info("task001_x").num_train == 3  # 5 kept: 3/1/1


def test_explicit_format_skips_detection(tmp_path: Path) -> None:
    path = tmp_path / "records.txt"  # no telling extension
    path.write_text(json.dumps({"instruction": "i", "context": "", "response": "r", "category": "c"}) + "\n")
    with pytest.raises(ValueError, match="clients_per_category must be"):
        open_source(path, format="dolly", clients_per_category=0)


def test_unknown_format_and_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown data format 'csv'; known: \['dolly', 'ni-jsonl'"):
        open_source(tmp_path, format="csv")
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) \['split_by'\] for data format 'synthetic'; it accepts"
    ):
        open_source("synthetic", split_by="category")


def test_undetectable_inputs_name_the_path_and_formats(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"data path {tmp_path / 'nope'} does not exist"):
        open_source(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"directory .* neither local_training_<id>.json .* nor task\*.json"):
        open_source(tmp_path)
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(
        ValueError, match=r"odd.jsonl: its first record has keys \['answer', 'question'\], neither ni-jsonl"
    ):
        open_source(odd)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl holds no JSON record"):
        open_source(tmp_path / "empty.jsonl")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"list.jsonl:1: expected a JSON object, got list"):
        open_source(tmp_path / "list.jsonl")
