"""Flower run config -> our RunConfig, and which client a node trains as."""

from __future__ import annotations

import pytest

from flexlora.config import ConfigError
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
