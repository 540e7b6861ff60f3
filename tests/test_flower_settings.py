"""Flower run config -> our RunConfig, and which client a node trains as."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from flexlora.config import ConfigError, load_config
from flexlora.engines.flower.settings import (
    FLOWER_DEFAULTS,
    client_settings,
    parse_client_settings,
    run_config_from_flower,
)
from flexlora.engines.flower.worker import own_client


def test_defaults_and_named_keys_map_onto_our_config(tmp_path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("train: {lr: 0.01, batch_size: 2}\nfederation: {rounds: 99}\n")
    cfg, options = run_config_from_flower(
        {
            "num-server-rounds": 4,
            "method": "hetlora",
            "distribution": "r8, r30",
            "config-file": str(yaml),
            "set": "eval.generate=false 'data.options={num_clients: 3}'",
            "placement": "deployment",
            "round-timeout": 12.5,
        }
    )
    assert cfg.federation.rounds == 4  # the named key wins over the file
    assert cfg.federation.method == "hetlora" and cfg.federation.distribution == ["r8", "r30"]
    assert (
        cfg.train.lr == 0.01
        and cfg.train.batch_size == 2
        and cfg.train.steps == FLOWER_DEFAULTS["local-steps"]
    )
    assert cfg.eval.generate is False and cfg.data.options == {"num_clients": 3}
    assert cfg.model.name == "tiny" and cfg.federation.engine == "flower"
    assert (options.placement, options.round_timeout) == ("deployment", 12.5)


def test_bad_keys_are_refused_by_name():
    with pytest.raises(ConfigError, match="unknown run-config key"):
        run_config_from_flower({"num-rounds": 3})
    with pytest.raises(ConfigError, match="federation.method"):
        run_config_from_flower({"method": "fedprox"})
    with pytest.raises(ConfigError, match="placement"):
        run_config_from_flower({"placement": "cloud"})


def test_client_settings_round_trip():
    cfg, _ = run_config_from_flower({"local-steps": 5, "seed": 3})
    model, data, train, seed = parse_client_settings(client_settings(cfg))
    assert (model.name, data.path, train.steps, seed) == ("tiny", "synthetic", 5, 3)
    with pytest.raises(ValueError, match="malformed client settings"):
        parse_client_settings({"model": {"nope": 1}})


class _Source:
    def client_ids(self):
        return ["a", "b", "c"]


def test_a_node_trains_as_its_declared_client_or_its_partition():
    assert own_client(_Source(), {"client-id": "b"}) == "b"
    assert own_client(_Source(), {"partition-id": 4, "num-partitions": 5}) == "b"
    with pytest.raises(ValueError, match="not a client"):
        own_client(_Source(), {"client-id": "z"})
    with pytest.raises(ValueError, match="set client-id"):
        own_client(_Source(), {})


# ---------------------------------------------------------------------------------------------- local engine only
LOCAL_ONLY = "federation.method: {} runs on the local engine only .*use federation.engine=local"


@pytest.mark.parametrize("placement", ["simulation", "deployment"])
@pytest.mark.parametrize("method", ["slora", "slora+flexlora"])
def test_slora_is_refused_on_flower_at_either_placement_naming_the_key(placement, method):
    """Validated once the engine and placement are known: Flower does not carry SLoRA's sparse stage, and a
    ``set`` that claims the local engine does not change where the ServerApp runs."""
    for extra in ({}, {"set": "federation.engine=local"}):
        with pytest.raises(ConfigError, match=LOCAL_ONLY.format(re.escape(method))):
            run_config_from_flower({"method": method, "placement": placement, **extra})
    with pytest.raises(ConfigError, match="hetlora-cho runs on the local engine only .its client regulariser"):
        run_config_from_flower({"method": "hetlora-cho", "distribution": "uniform", "placement": placement})


@pytest.mark.parametrize("placement", ["simulation", "deployment"])
def test_the_server_app_refuses_slora_before_touching_the_grid(placement):
    from flexlora.engines.flower.server_app import main

    context = SimpleNamespace(run_config={"method": "slora", "placement": placement})
    with pytest.raises(ConfigError, match=LOCAL_ONLY.format("slora")):
        main(object(), context)  # the grid is never used


def test_deployment_refuses_slora_before_writing_anything(tmp_path):
    """A config built for the local engine, handed to the deployment recipe: refused before the run
    directory, the roster or the model are touched."""
    from flexlora.engines.flower.deployment import run_deployment

    cfg = load_config(None, ["federation.method=slora+flexlora", f"output_dir={tmp_path}", "name=d"])
    with pytest.raises(ConfigError, match=LOCAL_ONLY.format(re.escape("slora+flexlora"))):
        run_deployment(cfg, engine=None)  # type: ignore[arg-type]
    assert not (tmp_path / "d").exists()


def test_cli_refuses_slora_on_the_flower_engine_in_one_line(tmp_path, capsys):
    from flexlora.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{name: tiny}}\nfederation: {{method: slora}}\noutput_dir: {tmp_path}\n")
    assert main(["run", str(path), "--engine", "flower"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(LOCAL_ONLY.format("slora"), err) and "\n" not in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [path]  # nothing written
