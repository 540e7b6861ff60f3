"""The method registry (:mod:`flexlora.methods`): every method builds and validates, every consumer derives its
names from it (a registered method appears everywhere), and the client recipe is what each engine actually
trains with (FedIT's AdamW on the local engine and on the Flower node path, whatever ``train.optimizer`` says)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Message, MessageType

import flexlora.methods as registry
from flexlora.cli import build_parser
from flexlora.compare import default_methods, plan_cells
from flexlora.config import ConfigError, load_config
from flexlora.contracts import TrainJob, TrainResult
from flexlora.core.aggregators.base import Aggregator
from flexlora.core.lora import LoraFactors
from flexlora.core.ranks import parse_rank_type
from flexlora.engines.flower import FlowerEngine
from flexlora.engines.flower.records import job_from_content, job_to_content
from flexlora.methods import METHODS, ClientRecipe, Method, get_method
from flexlora.report import baseline_of
from helpers.flower_fakes import FakeGrid, trainer


def tiny(tmp_path, method: str, *overrides: str):
    homogeneous = METHODS[method].homogeneous_only if method in METHODS else True
    return load_config(
        raw={
            "name": method.replace("+", "-"),
            "output_dir": str(tmp_path),
            "model": {"name": "tiny", "device": "cpu", "target_modules": ["q_proj"]},
            "data": {
                "path": "synthetic",
                "options": {"num_clients": 6, "examples_per_client": 8},
                "num_heldout": 1,
            },
            "federation": {
                "method": method,
                "distribution": "homo" if homogeneous else "heavy-tail-strong",
                "rounds": 2,
                "clients_per_round": 1,
                "slora_rounds": 1,
                "eval_clients": 1,
            },
            "train": {"steps": 1, "batch_size": 2, "max_length": 32},
            "eval": {"generate": False, "max_examples_per_client": 1, "max_length": 32},
        },
        overrides=list(overrides),
    )


# ---------------------------------------------------------------------------------------------- the table
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_validates_and_builds_its_aggregator(tmp_path, name):
    from flexlora.run import build_aggregator

    cfg = tiny(tmp_path, name)
    method = get_method(name)
    agg = build_aggregator(cfg, plan=None)
    assert isinstance(agg, Aggregator) and agg.name == method.aggregator_class().name
    assert set(method.aggregator_kwargs(cfg.federation)) == set(method.options)
    assert method.space in ("product", "factor") and method.group in registry.GROUPS
    assert set(method.engines) <= {"local", "flower"} and method.engines


def test_unknown_method_is_one_line_listing_the_valid_ones():
    with pytest.raises(ValueError) as info:
        get_method("fedprox")
    assert "\n" not in str(info.value) and str(sorted(METHODS)) in str(info.value)


def test_the_registry_imports_no_torch():
    code = "import sys, flexlora.methods; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_registry_declares_what_the_old_name_lists_said():
    """Pinned against the lists it replaced (config, compare, privacy, robust, report, run)."""

    def names(where):
        return set(registry.method_names(where))

    assert names(lambda m: m.homogeneous_only) == {"fedavg", "fedit", "slora"}
    assert names(lambda m: m.dp) == {
        "flexlora",
        "flora",
        "florist",
        "ffa",
        "flexlora-initnorm",
        "flexlora-sqrt",
    }
    product = {
        "flexlora",
        "flora",
        "raflora",
        "florist",
        "flexlora-initnorm",
        "flexlora-sqrt",
        "slora+flexlora",
    }
    assert names(lambda m: m.space == "product") == product
    assert names(lambda m: m.engines == ("local",)) == {"slora", "slora+flexlora", "hetlora-cho"}
    assert names(lambda m: m.client.stages == ("slora-sparse",)) == {"slora", "slora+flexlora"}
    assert names(lambda m: m.client.fresh_adapter) == {"flora", "florist"}
    assert names(lambda m: m.client.freeze_A) == {"ffa"} and names(lambda m: m.client.tail_penalty) == {
        "hetlora-cho"
    }
    assert {n: m.client.optimizer for n, m in METHODS.items() if m.client.optimizer} == {"fedit": "adamw"}
    assert default_methods() == [
        *("flexlora", "hetlora", "flora", "ffa", "slora+flexlora", "fedavg", "fedit", "slora"),
        *("fedavg@max", "fedit@max", "slora@max"),
    ]
    assert [baseline_of(m) for m in ("flexlora", "slora+flexlora", "fedit", "slora", "fedit@r200")] == [
        "fedit",
        "slora",
        None,
        None,
        "fedit",
    ]


# ------------------------------------------------------------------------ a new method appears everywhere
@pytest.fixture
def fake_method(monkeypatch):
    """An FFA variant registered with one entry, as a new method would be."""
    fake = Method(
        "ffa-fast",
        "flexlora.core.aggregators.ffa:FFALoRA",
        "paper",
        client=ClientRecipe(freeze_A=True, optimizer="sgd"),
        dp=False,
        space="factor",
    )
    monkeypatch.setitem(METHODS, fake.name, fake)
    return fake


def test_a_registered_method_is_planned_chosen_validated_and_hardened(tmp_path, fake_method):
    from flexlora.run import _harden

    assert "ffa-fast" in default_methods()  # group "paper": a default of compare
    cells = plan_cells(["ffa-fast"], ["homo", "uniform"], [0])
    assert [(c.method, c.distribution) for c in cells] == [("ffa-fast", "uniform")]  # not a homo control
    args = build_parser().parse_args(["aggregate", "c1", "--out", "o", "--rank", "4", "--method", "ffa-fast"])
    assert args.method == "ffa-fast"
    assert baseline_of("ffa-fast") == "fedit"
    cfg = tiny(tmp_path, "ffa-fast", "security.robust=median")
    robust = _harden(fake_method.build(cfg.federation), cfg, None)
    assert robust.space == "factor"
    with pytest.raises(ConfigError, match="ffa-fast is not supported"):
        tiny(tmp_path, "ffa-fast", "security.dp_noise_multiplier=1.0", "security.clip_norm=1.0")


def test_cli_aggregate_offers_the_methods_without_client_stages():
    for name, method in METHODS.items():
        argv = ["aggregate", "c1", "--out", "o", "--rank", "4", "--method", name]
        if method.client.stages:  # SLoRA's sparse stage is no server rule
            with pytest.raises(SystemExit):
                build_parser().parse_args(argv)
        else:
            assert build_parser().parse_args(argv).method == name


# ------------------------------------------------------------------ the optimizer each engine trained with
@pytest.fixture
def optimizers(monkeypatch):
    """The optimizer classes constructed while training, in order."""
    built: list[str] = []

    def spy(real):
        class Spy(real):
            def __init__(self, *args, **kwargs):
                built.append(real.__name__)
                super().__init__(*args, **kwargs)

        return Spy

    for name in ("AdamW", "SGD"):
        monkeypatch.setattr(torch.optim, name, spy(getattr(torch.optim, name)))
    return built


@pytest.mark.parametrize(("method", "expected"), [("fedit", "AdamW"), ("fedavg", "SGD")])
def test_local_engine_trains_with_the_methods_optimizer(tmp_path, optimizers, method, expected):
    from flexlora.run import run_federation

    run_federation(tiny(tmp_path, method, "train.optimizer=sgd", "federation.rounds=1"), progress=False)
    assert optimizers and set(optimizers) == {expected}


def test_the_recipe_travels_in_flower_records():
    init = {"q": LoraFactors(torch.randn(2, 3), torch.zeros(4, 2), 8.0)}
    for optimizer in ("adamw", None):
        job = TrainJob("c", 1, 0, init, freeze_A=True, optimizer=optimizer)
        back = job_from_content(job_to_content(job))
        assert (back.optimizer, back.freeze_A) == (optimizer, True)


@pytest.mark.parametrize(("method", "expected"), [("fedit", "AdamW"), ("fedavg", "SGD")])
def test_flower_nodes_train_with_the_methods_optimizer(tmp_path, optimizers, method, expected):
    """The round loop's jobs, through the Flower engine's messages, to the node's own training function."""
    from flexlora.engines.flower.settings import client_settings
    from flexlora.engines.flower.worker import train_reply
    from flexlora.federation import Federation
    from flexlora.models import config_module_shapes
    from flexlora.run import build_aggregator, client_side, make_plan

    cfg = tiny(tmp_path, method, "train.optimizer=sgd", "federation.engine=flower")
    shapes = config_module_shapes(cfg.model.name, cfg.model.target_modules)
    plan = make_plan(cfg, {"0": parse_rank_type("r8")}, shapes)
    fed = Federation(
        plan, build_aggregator(cfg, plan), None, None, tmp_path, {}, progress=False, **client_side(cfg)
    )
    jobs = fed.jobs(fed.initial_state(), 1, ["0"])
    context = SimpleNamespace(node_config={}, run_config={}, node_id=5)
    answer = trainer({})

    def node(msg: Message) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return answer(msg)
        return Message(train_reply(msg.content, context), reply_to=msg)

    engine = FlowerEngine(
        FakeGrid({5: node}), "simulation", settings=client_settings(cfg), poll_interval=0.01
    )
    (outcome,) = engine.train(jobs)
    assert isinstance(outcome, TrainResult), outcome
    assert optimizers == [expected]


@pytest.mark.parametrize(("method", "expected"), [("fedit", "AdamW"), ("fedavg", "SGD")])
def test_flexlora_strategy_nodes_train_with_the_methods_optimizer(tmp_path, optimizers, method, expected):
    """The public Flower strategy's messages, to the node's own training function (its settings as a
    deployment's nodes get them)."""
    from flwr.app import ArrayRecord, ConfigRecord

    from flexlora.engines.flower import FlexLoRAStrategy
    from flexlora.engines.flower.records import SETTINGS_RECORD
    from flexlora.engines.flower.settings import client_settings
    from flexlora.engines.flower.worker import train_reply
    from flexlora.models import config_module_shapes

    cfg = tiny(tmp_path, method, "train.optimizer=sgd", "federation.engine=flower")
    shapes = config_module_shapes(cfg.model.name, cfg.model.target_modules)
    context = SimpleNamespace(node_config={}, run_config={}, node_id=5)
    answer, settings = trainer({"client-id": "0", "lora-rank": 8}), json.dumps(client_settings(cfg))

    def node(msg: Message) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return answer(msg)
        msg.content[SETTINGS_RECORD] = ConfigRecord({"json": settings})
        return Message(train_reply(msg.content, context), reply_to=msg)

    grid = FakeGrid({5: node})
    strategy = FlexLoRAStrategy(
        method, shapes=shapes, alpha=cfg.model.lora_alpha, min_train_nodes=1, min_available_nodes=1
    )
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    arrays, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages))
    assert arrays is not None and metrics["num-results"] == 1
    assert optimizers == [expected]


# --------------------------------------------------------------------------------------------- checkpoints
def test_a_fedit_checkpoint_records_the_method_and_an_old_one_still_resumes(tmp_path):
    """Checkpoints name the method (``fedit``) and the aggregator state it holds (``fedavg``); one written
    before that (``method: fedavg``, no ``state``) still resumes."""
    import hashlib

    from flexlora.run import resume_federation, run_federation

    run_dir = run_federation(tiny(tmp_path, "fedit"), progress=False).run_dir
    ckpt = run_dir / "checkpoint"
    server = json.loads((ckpt / "server.json").read_text())
    assert (server["method"], server["state"]) == ("fedit", "fedavg")
    # as written before the registry: the aggregator's name as the method, no state; one round back
    del server["state"]
    server.update(method="fedavg", round=1, metrics=server["metrics"][:2])
    (ckpt / "server.json").write_text(json.dumps(server))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / "server.json").read_bytes()
    manifest["files"]["server.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    (run_dir / "summary.json").unlink()
    result = resume_federation(run_dir, progress=False)
    assert [m["round"] for m in result.metrics] == [0, 1, 2]
    server = json.loads((ckpt / "server.json").read_text())
    assert (server["round"], server["method"], server["state"]) == (2, "fedit", "fedavg")
