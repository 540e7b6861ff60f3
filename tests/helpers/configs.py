"""Run configs for end-to-end federations on the tiny model and synthetic data."""

from __future__ import annotations

import yaml

from flexlora.config import load_config


def tiny_config(tmp_path, *overrides, name="run"):
    """A 2-round federation of 3 clients per round out of 10 synthetic ones, on the tiny model, writing
    under ``tmp_path``; ``overrides`` are ``key=value`` strings as on the command line."""
    base = [
        f"name={name}",
        f"output_dir={tmp_path}",
        "model.name=tiny",
        "model.target_modules=[q_proj, v_proj, up_proj]",
        "data.path=synthetic",
        "data.options={num_clients: 10, examples_per_client: 12, seed: 0}",
        "data.num_heldout=2",
        "federation.rounds=2",
        "federation.clients_per_round=3",
        "train.steps=2",
        "train.batch_size=2",
        "train.max_length=48",
        "eval.max_examples_per_client=2",
        "eval.max_new_tokens=4",
    ]
    return load_config(None, [*base, *overrides])


def tiny_base(tmp_path):
    """A comparison config (fedit vs flexlora, uniform, 2 seeds) on the tiny model, written to ``tmp_path``."""
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "tiny", "target_modules": ["q_proj", "v_proj"]},
                "data": {
                    "path": "synthetic",
                    "options": {"num_clients": 8, "examples_per_client": 8},
                    "num_heldout": 2,
                },
                "federation": {"rounds": 2, "clients_per_round": 2},
                "train": {"steps": 1, "batch_size": 2, "max_length": 40},
                "eval": {"max_examples_per_client": 2, "max_new_tokens": 3, "generate_final_only": True},
                "compare": {"methods": ["fedit", "flexlora"], "distributions": ["uniform"], "seeds": 2},
            }
        )
    )
    return path
