"""Deployment placement trains the same federation as the in-process engine, for every method Flower runs.

Each method runs one tiny federation twice: with ``flexlora run`` on the local engine, and with
:func:`~flexlora.engines.flower.deployment.run_deployment` over fake SuperNodes, one per client of the local
pool, each declaring the rank type the local run gave its client and training with the real node-side
function (:func:`~flexlora.engines.flower.worker.train_reply`) on its own data. Same pool, same seed: the
same clients are sampled each round, every round's metrics but wall-clock times are equal (losses, tokens,
bytes, spectra, held-out loss), and the final global states are bit-for-bit equal (the wire carries float32
tensors, the dtype they are trained in, so the round trip is exact). Methods Flower cannot run are refused.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Message, MessageType
from safetensors.torch import load_file

from flexlora.methods import METHODS
from helpers.configs import tiny_config
from helpers.flower_fakes import FakeGrid, trainer

ON_FLOWER = sorted(name for name, m in METHODS.items() if "flower" in m.engines)
LOCAL_ONLY = sorted(set(METHODS) - set(ON_FLOWER))
HELDOUT = ["4", "5"]  # of 6 synthetic clients: the pool is "0".."3" on both engines


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """One intra-op thread (see ``tests/conftest.py``): 20 federations on a shared 2-core machine."""


def _config(tmp_path, method: str, engine: str, *extra: str):
    """Two rounds of 3 of the clients "0".."3", at two rank types unless the method needs one."""
    distribution = "homo" if METHODS[method].homogeneous_only else "[r8, r30]"
    return tiny_config(
        tmp_path,
        f"federation.method={method}",
        f"federation.distribution={distribution}",
        "federation.clients_per_round=3",
        "data.options={num_clients: 6, examples_per_client: 8, seed: 0}",
        "data.num_heldout=0",
        f"data.heldout_ids={json.dumps(HELDOUT)}",
        "eval.generate=false",
        "eval.max_examples_per_client=1",
        "federation.eval_clients=1",
        f"federation.engine={engine}",
        *extra,
        name=f"{method}-{engine}",
    )


def _node(node_config: dict, node_id: int):
    """A SuperNode: declares ``node_config`` and trains with the real node-side function."""
    from flexlora.engines.flower.worker import train_reply

    declare = trainer(node_config)
    context = SimpleNamespace(node_config=node_config, run_config={}, node_id=node_id)

    def handle(msg: Message) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return declare(msg)
        return Message(train_reply(msg.content, context), reply_to=msg)

    return handle


def _timeless(value):
    """``value`` without its ``seconds`` entries (wall-clock times), at any depth."""
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items() if k != "seconds"}
    return value


def _rounds(run_dir) -> list[dict]:
    """Each line of ``metrics.jsonl``, timings left out."""
    return [_timeless(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ON_FLOWER)
def test_deployment_equals_the_in_process_engine(tmp_path, method):
    from flexlora.engines.flower.deployment import run_deployment
    from flexlora.engines.flower.engine import FlowerEngine
    from flexlora.engines.flower.settings import client_settings
    from flexlora.run import run_federation

    local = run_federation(_config(tmp_path, method, "local"), progress=False).run_dir
    ranks = json.loads((local / "assignment.json").read_text())
    assert sorted(ranks) == ["0", "1", "2", "3"]
    assert len(set(ranks.values())) == (1 if METHODS[method].homogeneous_only else 2)
    cfg = _config(tmp_path, method, "flower")
    nodes = {
        10 + i: _node({"client-id": cid, "lora-rank": rank}, 10 + i)
        for i, (cid, rank) in enumerate(sorted(ranks.items()))
    }
    engine = FlowerEngine(
        FakeGrid(nodes), "deployment", settings=client_settings(cfg), poll_interval=0.001, query_timeout=5
    )
    deployed = run_deployment(cfg, engine)

    assert json.loads((deployed / "assignment.json").read_text()) == ranks
    rounds = _rounds(local)
    assert [r.get("clients") and r["received"] for r in rounds] == [None, 3, 3]
    # the same clients sampled, trained to the same losses, the same spectra and held-out loss, every round
    assert _rounds(deployed) == rounds
    ours, theirs = (load_file(d / "checkpoint" / "global.safetensors") for d in (local, deployed))
    assert ours.keys() == theirs.keys()
    unequal = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not unequal, unequal


@pytest.mark.parametrize("method", LOCAL_ONLY)
def test_deployment_refuses_a_local_only_method_in_one_line(tmp_path, method):
    """What Flower cannot carry (SLoRA's sparse stage, HetLoRA-Cho's regulariser) is refused, not dropped."""
    from flexlora.config import ConfigError
    from flexlora.engines.flower.deployment import run_deployment

    cfg = _config(tmp_path, method, "local", "federation.slora_rounds=1")
    with pytest.raises(ConfigError, match=f"federation.method: {re.escape(method)} runs on the local") as exc:
        run_deployment(cfg, engine=None)  # type: ignore[arg-type]
    assert "\n" not in str(exc.value)
    assert not cfg.run_dir.exists()
