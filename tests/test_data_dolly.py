"""Dolly source on the real databricks-dolly-15k file: category and Dirichlet splits, seeds, errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from flexlora.data.dolly import MIN_CLIENT_EXAMPLES, DollySource
from helpers.data import SHARED_DATA, needs_shared_data

DOLLY = SHARED_DATA / "databricks-dolly-15k.jsonl"
pytestmark = needs_shared_data(DOLLY)

CATEGORY_SIZES = {
    "open_qa": 3742,
    "general_qa": 2191,
    "classification": 2136,
    "closed_qa": 1773,
    "brainstorming": 1766,
    "information_extraction": 1506,
    "summarization": 1188,
    "creative_writing": 709,
}


def _sizes(source: DollySource) -> dict[str, int]:
    return {c: (i := source.info(c)).num_train + i.num_eval + i.num_test for c in source.client_ids()}


def test_one_client_per_category() -> None:
    source = DollySource(DOLLY)
    assert _sizes(source) == CATEGORY_SIZES and source.client_ids() == sorted(CATEGORY_SIZES)
    info = source.info("creative_writing")
    assert (info.task, info.category, info.num_train, info.num_eval, info.num_test) == (
        "creative_writing",
        "creative_writing",
        567,
        71,
        71,
    )
    data = source.load("creative_writing")
    assert {e.category for e in data.train + data.eval + data.test} == {"creative_writing"}
    assert len(data.test) == 71 and all(e.instruction and e.output for e in data.test)


def test_several_clients_per_category() -> None:
    source = DollySource(DOLLY, clients_per_category=3)
    sizes = _sizes(source)
    assert len(source) == 24 and sum(sizes.values()) == 15_011
    assert [sizes[f"summarization-{j}"] for j in range(3)] == [396, 396, 396]
    assert len({e.input for e in source.load("closed_qa-0").train}) > 1  # closed_qa has contexts


def test_dirichlet_mixture_is_seeded_and_covers_every_record() -> None:
    a = DollySource(DOLLY, split_by="dirichlet", num_clients=20, dirichlet_alpha=0.5, seed=3)
    b = DollySource(DOLLY, split_by="dirichlet", num_clients=20, dirichlet_alpha=0.5, seed=3)
    c = DollySource(DOLLY, split_by="dirichlet", num_clients=20, dirichlet_alpha=0.5, seed=4)
    assert a.client_ids() == [str(i) for i in range(20)]
    assert sum(_sizes(a).values()) == 15_011 and min(_sizes(a).values()) >= MIN_CLIENT_EXAMPLES
    assert _sizes(a) == _sizes(b) and _sizes(a) != _sizes(c)
    assert a.load("7") == b.load("7")
    data = a.load("7")
    counts = Counter(e.category for e in data.train + data.eval + data.test)
    assert a.info("7").task == "mixture" and a.info("7").category == counts.most_common(1)[0][0]


def test_small_alpha_skews_clients_more_than_large_alpha() -> None:
    def top_share(alpha: float) -> float:
        source = DollySource(DOLLY, split_by="dirichlet", num_clients=10, dirichlet_alpha=alpha)
        shares = []
        for c in source.client_ids():
            data = source.load(c)
            counts = Counter(e.category for e in data.train + data.eval + data.test)
            shares.append(counts.most_common(1)[0][1] / sum(counts.values()))
        return sum(shares) / len(shares)

    assert top_share(0.1) > top_share(100.0) + 0.3  # one category dominates vs. near-IID clients


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split_by": "task"}, r"split_by must be one of \('category', 'dirichlet'\), got 'task'"),
        ({"split_by": "dirichlet"}, "split_by='dirichlet' needs num_clients"),
        (
            {"split_by": "dirichlet", "num_clients": 4, "dirichlet_alpha": 0},
            "dirichlet_alpha must be a number > 0",
        ),
        (
            {"split_by": "dirichlet", "num_clients": 2000},
            "num_clients=2000 leaves fewer than 10 of 15011 records",
        ),
        ({"split_by": "dirichlet", "num_clients": 1000, "dirichlet_alpha": 0.001}, "raise dirichlet_alpha"),
        ({"num_clients": 4}, "num_clients applies to split_by='dirichlet'"),
        ({"clients_per_category": 0}, "clients_per_category must be an integer >= 1, got 0"),
        (
            {"clients_per_category": 800},
            "clients_per_category=800 exceeds the 709 records of 'creative_writing'",
        ),
    ],
)
def test_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DollySource(DOLLY, **kwargs)


def test_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"instruction": "a", "context": "", "response": "b", "category": "x"}\n{"instruction": "a"}\n'
    )
    with pytest.raises(
        ValueError, match=r"d.jsonl:2: Dolly record lacks string field\(s\) \['context', 'response'"
    ):
        DollySource(path)
