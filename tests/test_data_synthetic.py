"""The built-in synthetic multi-task source: deterministic, one task per client, short outputs."""

from __future__ import annotations

import pytest

from flexlora.data.synthetic import KINDS, SyntheticSource, make_task


def test_counts_and_distinct_tasks() -> None:
    source = SyntheticSource(num_clients=len(KINDS), examples_per_client=50)
    infos = [source.info(c) for c in source.client_ids()]
    assert source.client_ids() == [str(i) for i in range(len(KINDS))]
    assert all((i.num_train, i.num_eval, i.num_test) == (40, 5, 5) for i in infos)
    assert len({i.task for i in infos}) == len(KINDS)
    assert len({source.load(c).train[0].instruction for c in source.client_ids()}) == len(KINDS)
    assert len({i.category for i in infos}) >= 8


def test_same_seed_same_data_other_seed_other_data() -> None:
    a, b, c = (SyntheticSource(num_clients=30, seed=s) for s in (1, 1, 2))
    assert [a.info(i) for i in a.client_ids()] == [b.info(i) for i in b.client_ids()]
    assert all(a.load(i) == b.load(i) for i in a.client_ids())
    assert any(a.load(i).train != c.load(i).train for i in a.client_ids())


def test_clients_are_generated_independently() -> None:
    # a client's examples do not depend on which clients were loaded before it
    x, y = SyntheticSource(num_clients=20), SyntheticSource(num_clients=20)
    x.load("3")
    assert x.load("17") == y.load("17")


def test_later_clients_get_new_parameters() -> None:
    kind = next(i for i in range(len(KINDS)) if make_task(i).task.startswith("add_constant"))
    tasks = {make_task(kind + cycle * len(KINDS)).task for cycle in range(10)}
    assert len(tasks) > 1 and all(t.startswith("add_constant") for t in tasks)


def test_outputs_are_short_and_correct_where_checkable() -> None:
    source = SyntheticSource(num_clients=len(KINDS), examples_per_client=40)
    for client_id in source.client_ids():
        data = source.load(client_id)
        for example in data.train + data.eval + data.test:
            assert example.instruction and example.input and example.output
            assert len(example.output.split()) <= 5, (source.info(client_id).task, example)
    reverse = source.load("0").train[0]
    assert reverse.output.split() == reverse.input.split()[::-1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0}, "num_clients must be an integer >= 1, got 0"),
        ({"examples_per_client": 2.5}, "examples_per_client must be an integer >= 1, got 2.5"),
        ({"fractions": (0.5, 0.5)}, "fractions must be three numbers"),
    ],
)
def test_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticSource(**kwargs)
