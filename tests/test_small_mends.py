"""Small mends of issue 15: seeded fresh A rows, FLoRA's first adapter, clients_per_round, study configs."""

from __future__ import annotations

import pytest
import torch

from flexlora.cli import main
from flexlora.config import ConfigError, load_config
from flexlora.core.aggregators import GlobalState
from flexlora.core.aggregators.base import leading_factors
from flexlora.core.ranks import parse_rank_type
from flexlora.federation import Federation, FederationPlan
from flexlora.methods import METHODS, make_aggregator

SHAPES = {"layers.0.q_proj": (8, 6), "layers.0.v_proj": (8, 6)}


def _plan(types=("r2", "r4"), per_round=2, seed=7) -> FederationPlan:
    ids = ["c0", "c1"]
    return FederationPlan(
        pool=ids,
        rank_types={c: parse_rank_type(t) for c, t in zip(ids, types, strict=True)},
        shapes=SHAPES,
        rounds=3,
        clients_per_round=per_round,
        min_clients=1,
        seed=seed,
        alpha=8.0,
    )


def _federation(tmp_path, plan, method) -> Federation:
    recipe = METHODS[method].client
    return Federation(
        plan, make_aggregator(method), None, lambda f: {}, tmp_path, {}, progress=False, recipe=recipe
    )


def _rank1_state(seed: int) -> GlobalState:
    one_row = torch.eye(1, 6)
    modules = GlobalState.initial(SHAPES, {n: 1 for n in SHAPES}, "flexlora").modules
    for lr in modules.values():
        lr.A = one_row.clone()
    return GlobalState(modules, "flexlora", seed=seed)


def test_fresh_rows_differ_per_module_and_seed_and_stay_orthonormal():
    ranks = {n: 4 for n in SHAPES}
    a = leading_factors(_rank1_state(1), ranks, 8.0)
    again = leading_factors(_rank1_state(1), ranks, 8.0)
    other = leading_factors(_rank1_state(2), ranks, 8.0)
    q, v = (a[n].A for n in SHAPES)
    assert not torch.allclose(q[1:], v[1:])  # each module its own directions
    assert not torch.allclose(q[1:], other["layers.0.q_proj"].A[1:])  # each seed its own
    assert torch.equal(q, again["layers.0.q_proj"].A)  # deterministic
    assert torch.allclose(q @ q.T, torch.eye(4), atol=1e-5)  # row 0 kept, fresh rows orthonormal to it


def test_the_round_loop_seeds_fresh_rows_by_run_and_round(tmp_path):
    plan = _plan(types=("r4", "r4"))
    fed = _federation(tmp_path, plan, "flexlora")
    state = fed.initial_state()
    state.global_state = _rank1_state(0)
    rows = {r: fed.jobs(state, r, ["c0"])[0].init["layers.0.q_proj"].A[1:] for r in (2, 3)}
    assert not torch.allclose(rows[2], rows[3])
    other_run = _federation(tmp_path, _plan(types=("r4", "r4"), seed=8), "flexlora")
    assert not torch.allclose(rows[2], other_run.jobs(state, 2, ["c0"])[0].init["layers.0.q_proj"].A[1:])


def test_flora_first_round_adapter_is_the_shared_initial_A(tmp_path):
    plan = _plan()
    flora, flexlora = _federation(tmp_path, plan, "flora"), _federation(tmp_path, plan, "flexlora")
    state = flora.initial_state()
    for cid in plan.pool:
        (job,) = flora.jobs(state, 1, [cid])
        (ref,) = flexlora.jobs(flexlora.initial_state(), 1, [cid])
        for name in SHAPES:
            assert torch.equal(job.init[name].A, ref.init[name].A)
    later = flora.jobs(state, 2, ["c0"])[0].init["layers.0.q_proj"].A
    assert not torch.equal(later, flora.jobs(state, 1, ["c0"])[0].init["layers.0.q_proj"].A)


@pytest.mark.parametrize(("value", "expected"), [(1.0, 2), (1, 1), (0.5, 1), (2, 2)])
def test_clients_per_round_float_is_a_fraction_int_a_count(value, expected):
    assert len(_plan(per_round=value).sample(1)) == expected


@pytest.mark.parametrize("value", ["8.0", "2.5", "0", "-1", "1.5"])
def test_ambiguous_clients_per_round_is_refused_in_one_line(value):
    with pytest.raises(ConfigError, match=r"federation.clients_per_round: a fraction in \(0, 1\]"):
        load_config(None, [f"federation.clients_per_round={value}"])


def test_fraction_one_and_count_one_both_load():
    assert load_config(None, ["federation.clients_per_round=1.0"]).federation.clients_per_round == 1.0
    assert load_config(None, ["federation.clients_per_round=1"]).federation.clients_per_round == 1


def test_run_on_a_study_config_names_the_compare_command(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("federation: {rounds: 2}\ncompare: {methods: [flexlora, fedavg]}\n")
    with pytest.raises(ConfigError) as err:
        load_config(study)
    assert str(err.value) == f"{study}: this is a study config: run it with `flexlora compare {study}`"


def test_flexlora_run_on_a_study_config_says_which_command_to_use(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text("compare: {methods: [flexlora, fedavg]}\n")
    assert main(["run", str(study)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"flexlora: error: {study}: this is a study config: run it with `flexlora compare {study}`"
