"""Paper-layout source: the real 24-client sample and small directories written in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexlora.data.paper_layout import PaperLayoutSource, parse_task_name
from helpers.data import SHARED_DATA, needs_shared_data

SAMPLE = SHARED_DATA / "flexlora-ni-layout-sample"
needs_sample = needs_shared_data(SAMPLE)


@pytest.mark.parametrize(
    ("name", "task", "category"),
    [
        ("Sentiment 1227.json", "Sentiment 1227", "Sentiment"),
        (
            "Word Relation Classification 551.json",
            "Word Relation Classification 551",
            "Word Relation Classification",
        ),
        ("Translation", "Translation", "Translation"),
        ("", "", ""),
    ],
)
def test_parse_task_name(name: str, task: str, category: str) -> None:
    assert parse_task_name(name) == (task, category)


@needs_sample
def test_real_sample(tmp_path: Path) -> None:
    source = PaperLayoutSource(SAMPLE, cache_dir=tmp_path)
    ids = source.client_ids()
    assert len(source) == 24 and ids[:3] == ["173", "415", "435"]  # numeric order
    info = source.info("1071")
    assert (info.task, info.category) == ("Coreference Resolution 510", "Coreference Resolution")
    assert (info.num_train, info.num_eval, info.num_test) == (51, 6, 7)
    data = source.load("1071")
    assert [len(data.train), len(data.eval), len(data.test)] == [51, 6, 7]
    assert {e.category for e in data.train} == {"Coreference Resolution"}
    assert data.train[0].output == "True" and "pronoun" in data.train[0].instruction
    assert source.cached_ids() == ["1071"]
    assert len(list(tmp_path.glob("paper-layout-*.index.json"))) == 1


def _write_client(root: Path, client_id: str, splits: dict[str, int]) -> None:
    for prefix, n in splits.items():
        row = {"instruction": "Say hi.", "output": "hi", "category": "Greeting 7.json"}
        rows = [{**row, "input": f"x{i}"} for i in range(n)]
        (root / f"local_{prefix}_{client_id}.json").write_text(json.dumps(rows))


def test_missing_eval_and_test_files_give_empty_splits(tmp_path: Path) -> None:
    _write_client(tmp_path, "a", {"training": 3})
    _write_client(tmp_path, "10", {"training": 2, "eval": 1, "test": 1})
    _write_client(tmp_path, "9", {"training": 2, "eval": 1, "test": 1})
    source = PaperLayoutSource(tmp_path, cache_dir=tmp_path / "cache")
    assert source.client_ids() == ["9", "10", "a"]
    assert source.info("a").num_eval == 0 and source.load("a").test == []
    assert source.info("10").task == "Greeting 7" and source.load("10").eval[0].input == "x0"


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no local_training_<id>.json file"):
        PaperLayoutSource(tmp_path)
    (tmp_path / "local_training_1.json").write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match=r"local_training_1.json: expected a JSON array"):
        PaperLayoutSource(tmp_path, cache_dir=tmp_path / "cache")
    (tmp_path / "local_training_1.json").write_text('[{"instruction": "x"}]')
    source = PaperLayoutSource(tmp_path, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"lacks string field\(s\) \['output'\]"):
        source.load("1")


def test_input_is_optional_but_must_be_a_string(tmp_path: Path) -> None:
    (tmp_path / "local_training_1.json").write_text('[{"instruction": "x", "output": "y"}]')
    (tmp_path / "local_training_2.json").write_text('[{"instruction": "x", "input": null, "output": "y"}]')
    source = PaperLayoutSource(tmp_path, cache_dir=tmp_path / "cache")
    assert source.load("1").train[0].input == ""
    with pytest.raises(
        ValueError, match=r"local_training_2.json: an example lacks string field\(s\) \['input'\]"
    ):
        source.load("2")
