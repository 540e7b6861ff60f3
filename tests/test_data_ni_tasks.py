"""Raw Natural Instructions task files (synthetic ones in tmp_path, in the exact upstream schema)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexlora.data.ni_tasks import NITasksSource


def _write_task(root: Path, name: str, n: int, category: str = "Sentiment Analysis") -> None:
    task = {
        "Contributors": ["someone"],
        "Source": ["synthetic"],
        "Categories": [category],
        "Definition": [f"Definition of {name}.", "Answer briefly."],
        "Positive Examples": [{"input": "a", "output": "b", "explanation": "c"}],
        "Negative Examples": [],
        "Instances": [
            {"id": f"{name}-{i}", "input": f"{name} input {i}", "output": [f"out {i}", "alt"]}
            for i in range(n)
        ],
    }
    (root / f"{name}.json").write_text(json.dumps(task))


@pytest.fixture
def tasks_dir(tmp_path: Path) -> Path:
    root = tmp_path / "tasks"
    root.mkdir()
    _write_task(root, "task001_quoref_question_generation", 100, "Question Generation")
    _write_task(root, "task002_sentiment", 30)
    (root / "README.md").write_text("not a task")
    return root


def test_one_client_per_task_with_80_10_10_split(tasks_dir: Path, tmp_path: Path) -> None:
    source = NITasksSource(tasks_dir, cache_dir=tmp_path / "cache")
    assert source.client_ids() == ["task001_quoref_question_generation", "task002_sentiment"]
    info = source.info("task001_quoref_question_generation")
    assert (info.category, info.num_train, info.num_eval, info.num_test) == (
        "Question Generation",
        80,
        10,
        10,
    )
    data = source.load("task001_quoref_question_generation")
    examples = data.train + data.eval + data.test
    assert sorted(e.input for e in examples) == sorted(
        f"task001_quoref_question_generation input {i}" for i in range(100)
    )
    assert all(e.output == f"out {e.input.rsplit(' ', 1)[1]}" for e in examples)  # first reference output
    assert examples[0].instruction == "Definition of task001_quoref_question_generation.\nAnswer briefly."


def test_split_is_seeded(tasks_dir: Path, tmp_path: Path) -> None:
    def train_inputs(seed: int) -> list[str]:
        source = NITasksSource(tasks_dir, seed=seed, cache_dir=tmp_path / "cache")
        return [e.input for e in source.load("task002_sentiment").train]

    assert train_inputs(0) == train_inputs(0)
    assert train_inputs(0) != train_inputs(1)


def test_sample_fraction_and_fractions(tasks_dir: Path, tmp_path: Path) -> None:
    source = NITasksSource(
        tasks_dir, sample_fraction=0.1, fractions=(0.6, 0.2, 0.2), cache_dir=tmp_path / "c"
    )
    info = source.info("task001_quoref_question_generation")
    assert (info.num_train, info.num_eval, info.num_test) == (6, 2, 2)
    assert len(source.load("task002_sentiment").train) == source.info("task002_sentiment").num_train == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample_fraction": 0}, r"sample_fraction must be a number in \(0, 1\], got 0"),
        ({"sample_fraction": 1.5}, r"sample_fraction must be a number in \(0, 1\], got 1.5"),
        ({"fractions": (0.9, 0.2, 0.1)}, "fractions must be >= 0 with train > 0 and sum to 1"),
    ],
)
def test_bad_options(tasks_dir: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NITasksSource(tasks_dir, **kwargs)


def test_malformed_task_file(tmp_path: Path) -> None:
    (tmp_path / "task009_bad.json").write_text(json.dumps({"Definition": "not a list", "Instances": []}))
    with pytest.raises(
        ValueError, match=r"task009_bad.json: \['Definition', 'Categories', 'Instances'\] missing"
    ):
        NITasksSource(tmp_path, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="has no task\\*.json file"):
        NITasksSource(tmp_path / "cache")
