"""The round loop names its engines by module path (engines import the round loop, never the reverse):
every engine the config accepts resolves to a factory, and each factory builds its engine."""

from __future__ import annotations

import importlib

import pytest

from flexlora.config import ConfigError, load_config
from flexlora.engines.local import LocalEngine
from flexlora.run import _ENGINE_FACTORIES, _engine


def test_every_engine_the_config_accepts_has_a_factory_that_imports():
    for name in ("local", "flower"):
        load_config(None, [f"federation.engine={name}"])  # accepted by the config
        module, factory = _ENGINE_FACTORIES[name].split(":")
        assert callable(getattr(importlib.import_module(module), factory))
    with pytest.raises(ConfigError):
        load_config(None, ["federation.engine=ray"])
    assert set(_ENGINE_FACTORIES) == {"local", "flower"}


def test_the_local_factory_builds_the_in_process_engine():
    cfg = load_config(None, ["federation.engine=local"])
    engine = _engine(cfg, "host", "tokenizer", "source", progress=False)
    assert isinstance(engine, LocalEngine)
    assert (engine.host, engine.tokenizer, engine.source, engine.train_cfg) == (
        "host",
        "tokenizer",
        "source",
        cfg.train,
    )
