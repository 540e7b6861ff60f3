"""Seeded splits (examples into train / eval / test, clients into training and held-out) and the LRU."""

from __future__ import annotations

import pytest

from flexlora.data.splits import check_fractions, seeded_rng, split_clients, split_counts, split_items
from flexlora.data.synthetic import SyntheticSource


@pytest.mark.parametrize(
    ("n", "counts"), [(10, (8, 1, 1)), (64, (52, 6, 6)), (5, (3, 1, 1)), (4, (4, 0, 0)), (1, (1, 0, 0))]
)
def test_split_counts(n: int, counts: tuple[int, int, int]) -> None:
    assert split_counts(n) == counts
    assert [len(part) for part in split_items(list(range(n)))] == list(counts)


def test_split_items_keeps_order_and_every_item() -> None:
    train, eval_, test = split_items(list(range(20)), (0.5, 0.25, 0.25))
    assert train + eval_ + test == list(range(20)) and len(train) == 10


@pytest.mark.parametrize("bad", [(0.8, 0.1), (0.8, 0.3, 0.1), (0.0, 0.5, 0.5), (1.1, -0.1, 0.0), ("a", 0, 0)])
def test_bad_fractions_are_refused(bad: tuple) -> None:
    with pytest.raises(ValueError, match="fractions must"):
        check_fractions(bad)


def test_seeded_rng_depends_on_seed_and_keys_only() -> None:
    assert seeded_rng(3, "a", 1).random() == seeded_rng(3, "a", 1).random()
    assert seeded_rng(3, "a", 1).random() != seeded_rng(4, "a", 1).random()
    assert seeded_rng(3, "a", 1).random() != seeded_rng(3, "a", 2).random()


def test_split_clients_is_deterministic_and_disjoint() -> None:
    source = SyntheticSource(num_clients=40)
    train, heldout = split_clients(source, 8, seed=1)
    assert (train, heldout) == split_clients(source, 8, seed=1)
    assert len(heldout) == 8 and len(train) == 32 and not set(train) & set(heldout)
    assert sorted(train + heldout, key=int) == source.client_ids()
    assert heldout != split_clients(source, 8, seed=2)[1]


def test_split_clients_by_share_and_by_ids() -> None:
    source = SyntheticSource(num_clients=40)
    assert len(split_clients(source, 0.1)[1]) == 4
    assert len(split_clients(source, 0.001)[1]) == 1  # a share holds out at least one client
    assert split_clients(source)[1] == []
    assert split_clients(source, heldout_ids=["7", "3"]) == (
        [c for c in source.client_ids() if c not in ("3", "7")],
        ["3", "7"],
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_heldout": 40}, r"num_heldout must be in \[0, 40\)"),
        ({"num_heldout": -1}, r"num_heldout must be in \[0, 40\)"),
        ({"num_heldout": 1.0}, r"num_heldout as a share must be in \(0, 1\)"),
        ({"num_heldout": True}, "num_heldout must be an int count or a float share"),
        ({"heldout_ids": ["99"]}, r"names clients synthetic\(seed=0\) does not have: \['99'\]"),
        ({"num_heldout": 2, "heldout_ids": ["1"]}, "give num_heldout or heldout_ids, not both"),
        (
            {"heldout_ids": [str(i) for i in range(40)]},
            "holding out 40 of 40 clients leaves none to train on",
        ),
    ],
)
def test_split_clients_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_clients(SyntheticSource(num_clients=40), **kwargs)


def test_lru_cache_is_bounded_and_load_returns_fresh_lists() -> None:
    source = SyntheticSource(num_clients=6, cache_size=2)
    assert source.cached_ids() == []
    first = source.load("0")
    first.train.clear()
    assert len(source.load("0").train) == source.info("0").num_train  # the cached copy is untouched
    source.load("1")
    source.load("0")  # "0" becomes most recent
    source.load("2")  # evicts "1"
    assert source.cached_ids() == ["0", "2"]
    assert SyntheticSource(num_clients=2, cache_size=0).load("1") is not None


def test_bad_cache_size() -> None:
    with pytest.raises(ValueError, match="cache_size must be an integer >= 0, got -1"):
        SyntheticSource(cache_size=-1)


def test_validation_clients_are_neither_training_nor_test_clients():
    from flexlora.data.splits import split_validation

    pool, test = [f"c{i}" for i in range(20)], ["t0", "t1"]
    train, val = split_validation(pool, 5, seed=3)
    assert len(val) == 5 and len(train) == 15
    assert set(train) | set(val) == set(pool) and not set(train) & set(val) and not set(val) & set(test)
    assert train == [c for c in pool if c in set(train)]  # the pool's order
    assert split_validation(pool, 5, seed=3) == (train, val)
    assert split_validation(pool, 5, seed=4)[1] != val
    assert split_validation(pool, 0) == (pool, [])
    for bad in (-1, 20, 2.5, True):
        with pytest.raises(ValueError):
            split_validation(pool, bad)
