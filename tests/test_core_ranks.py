"""Rank types and the distributions that assign them to clients (Bai et al., 2024, Sec. 5)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexlora.core.ranks import (
    DISTRIBUTIONS,
    RANK_TYPES,
    RankType,
    assign_rank_types,
    module_ranks,
    parse_rank_type,
)

ORDER = ["r8", "r30", "attn30-mlp200", "r200"]


def counts(types: list[RankType]) -> list[int]:
    c = Counter(t.name for t in types)
    return [c[name] for name in ORDER]


@pytest.mark.parametrize(
    ("distribution", "n", "expected"),
    [
        ("heavy-tail-strong", 20, [1, 1, 2, 16]),
        ("heavy-tail-light", 20, [16, 1, 1, 2]),
        ("heavy-tail-light", 10, [8, 1, 0, 1]),  # ties in the remainder go to the lower type
        ("heavy-tail-strong", 10, [1, 0, 1, 8]),
        ("heavy-tail-strong", 80, [4, 4, 8, 64]),
        ("heavy-tail-light", 80, [64, 4, 4, 8]),
        ("uniform", 8, [2, 2, 2, 2]),
        ("homo", 7, [7, 0, 0, 0]),
        ("normal", 100, [6, 6, 44, 44]),
    ],
)
def test_exact_quotas(distribution, n, expected):
    assert counts(assign_rank_types(n, distribution, seed=3)) == expected


def test_normal_is_the_paper_codes_pdf_over_its_type_ids():
    # alibaba/FederatedScope@FlexLoRA main.py get_peft: Type_k drawn with p ~ norm.pdf(k, 1.5, 0.7), where
    # Type_0 r8, Type_1 r200, Type_2 attn30-mlp200, Type_3 r30 (hand-computed: pdf at distance 0.5 and 1.5)
    near, far = math.exp(-0.5 * (0.5 / 0.7) ** 2), math.exp(-0.5 * (1.5 / 0.7) ** 2)
    total = 2 * (near + far)
    assert DISTRIBUTIONS["normal"] == pytest.approx((far / total, far / total, near / total, near / total))
    assert DISTRIBUTIONS["normal"] == pytest.approx((0.0575, 0.0575, 0.4425, 0.4425), abs=1e-4)
    c = counts(assign_rank_types(50, "normal"))
    assert c[2] + c[3] > 0.8 * 50 and c[0] + c[1] < 0.2 * 50  # r200 and attn30-mlp200 dominate


@settings(max_examples=60, deadline=None, derandomize=True)
@given(n=st.integers(0, 300), distribution=st.sampled_from(sorted(DISTRIBUTIONS)), seed=st.integers(0, 10**6))
def test_quotas_are_largest_remainder_and_seed_free(n, distribution, seed):
    types = assign_rank_types(n, distribution, seed=seed)
    assert len(types) == n
    got = counts(types)
    for count, share in zip(got, DISTRIBUTIONS[distribution], strict=True):
        assert math.floor(share * n + 1e-9) <= count <= math.ceil(share * n - 1e-9)
    assert counts(assign_rank_types(n, distribution, seed=seed + 1)) == got  # the seed only shuffles
    assert all(t is RANK_TYPES[t.name] for t in types)


def test_seeded_determinism():
    a = assign_rank_types(40, "uniform", seed=7)
    assert a == assign_rank_types(40, "uniform", seed=7)
    others = [assign_rank_types(40, "uniform", seed=s) for s in range(8, 12)]
    assert any(o != a for o in others)  # the placement depends on the seed
    assert all(counts(o) == counts(a) for o in others)  # the quotas do not


def test_explicit_lists_cycle():
    types = assign_rank_types(5, ["r8", 30, "attn16-mlp64"])
    assert [(t.attn, t.mlp) for t in types] == [(8, 8), (30, 30), (16, 64), (8, 8), (30, 30)]
    with pytest.raises(ValueError, match="explicit rank list is empty"):
        assign_rank_types(3, [])
    with pytest.raises(ValueError, match="unknown distribution 'heavy'"):
        assign_rank_types(3, "heavy")


# ---------------------------------------------------------------------------------------------------------
# module ranks and clipping

SMOLLM2 = {
    "model.layers.0.self_attn.q_proj": (576, 576),
    "model.layers.0.self_attn.k_proj": (192, 576),
    "model.layers.0.self_attn.v_proj": (192, 576),
    "model.layers.0.self_attn.o_proj": (576, 576),
    "model.layers.0.mlp.gate_proj": (1536, 576),
    "model.layers.0.mlp.up_proj": (1536, 576),
    "model.layers.0.mlp.down_proj": (576, 1536),
}


def test_ranks_are_clipped_to_min_d_k():
    r200 = module_ranks("r200", SMOLLM2)
    assert r200["model.layers.0.self_attn.v_proj"] == 192  # 192 x 576 at 200 -> 192
    assert r200["model.layers.0.self_attn.k_proj"] == 192
    assert r200["model.layers.0.self_attn.q_proj"] == 200
    assert r200["model.layers.0.mlp.down_proj"] == 200
    assert module_ranks(600, {"q": (576, 576)}) == {"q": 576}


def test_attention_and_mlp_ranks():
    mixed = module_ranks("attn30-mlp200", SMOLLM2)
    assert {n.rsplit(".", 1)[1]: r for n, r in mixed.items()} == {
        "q_proj": 30,
        "k_proj": 30,
        "v_proj": 30,
        "o_proj": 30,
        "gate_proj": 200,
        "up_proj": 200,
        "down_proj": 200,
    }
    t = RANK_TYPES["attn30-mlp200"]
    assert t.rank_for("lm_head") == 30  # neither attention nor MLP: the attention rank
    assert t.rank_for("model.layers.3.mlp.up_proj") == 200 and t.max_rank == 200


# ---------------------------------------------------------------------------------------------------------
# parse_rank_type


@pytest.mark.parametrize(
    ("spec", "attn", "mlp"),
    [
        ("r8", 8, 8),
        ("r30", 30, 30),
        ("attn30-mlp200", 30, 200),
        ("r200", 200, 200),
        (16, 16, 16),
        ("16", 16, 16),
        ("r64", 64, 64),
        ("attn8-mlp64", 8, 64),
    ],
)
def test_parse_rank_type_forms(spec, attn, mlp):
    t = parse_rank_type(spec)
    assert (t.attn, t.mlp) == (attn, mlp)


def test_parse_rank_type_reuses_named_types():
    assert parse_rank_type(8) is RANK_TYPES["r8"] and parse_rank_type("200") is RANK_TYPES["r200"]
    assert parse_rank_type(16).name == "r16"


@pytest.mark.parametrize(
    "spec",
    [0, -1, "0", "r0", "-4", "", "r", "rank8", "attn0-mlp8", "attn8-mlp0", "attn-mlp", "mlp8-attn8", "8.5"],
)
def test_parse_rank_type_errors(spec):
    with pytest.raises(ValueError, match=r"rank must be positive|unknown rank type"):
        parse_rank_type(spec)
