"""Nothing is ever unpickled: payloads and checkpoints are safetensors / JSON only.

Statically, no module of the package imports a pickle-based loader or calls ``torch.load``, ``np.load``
with ``allow_pickle=True`` or ``pandas.read_pickle``. At run time, a federation that checkpoints, resumes
and reads its adapters back runs with every unpickling entry point replaced by one that fails the test.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch

import flexlora

PACKAGE = Path(flexlora.__file__).parent
PICKLE_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
    "jsonpickle",
}
BANNED_CALLS = {"torch.load", "torch.serialization.load", "read_pickle", "np.load", "numpy.load"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def pickle_uses(source: str, filename: str = "<src>") -> list[str]:
    """Lines of ``source`` that import a pickle-based module or call an unpickling loader."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any((n or "").split(".")[0] in PICKLE_MODULES for n in names):
                found.append(f"{filename}:{node.lineno}: imports {names}")
            if (
                isinstance(node, ast.ImportFrom)
                and node.module == "torch"
                and any(a.name == "load" for a in node.names)
            ):
                found.append(f"{filename}:{node.lineno}: imports torch.load")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in BANNED_CALLS or name.endswith(".read_pickle"):
                pickled = name in ("np.load", "numpy.load") and not any(
                    k.arg == "allow_pickle" and isinstance(k.value, ast.Constant) and k.value.value is False
                    for k in node.keywords
                )
                if name not in ("np.load", "numpy.load") or pickled:
                    found.append(f"{filename}:{node.lineno}: calls {name}")
    return found


def test_the_scanner_catches_what_it_must():
    bad = (
        "import pickle\nfrom cloudpickle import loads\nimport torch\ntorch.load('x')\n"
        "import numpy as np\nnp.load('x', allow_pickle=True)\nnp.load('y')\nimport pandas as pd\npd.read_pickle('z')\n"
    )
    assert len(pickle_uses(bad)) == 6
    assert pickle_uses("import numpy as np\nnp.load(f, allow_pickle=False)\n") == []


def test_no_module_of_the_package_unpickles():
    found = [
        hit for path in sorted(PACKAGE.rglob("*.py")) for hit in pickle_uses(path.read_text(), str(path))
    ]
    assert not found, "pickle-based loading in the package:\n" + "\n".join(found)


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    class Refused(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            refuse()

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, Refused if name == "Unpickler" else refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)


def test_checkpoint_resume_and_adapters_never_unpickle(tmp_path, no_unpickling):
    from flexlora.checkpoint import load_checkpoint
    from flexlora.core.adapter_io import read_adapter, write_adapter
    from flexlora.core.aggregators.base import exact_factors
    from helpers.round_loop import FakeEngine, make_federation, make_plan

    plan = make_plan(rounds=2)
    fed = make_federation(tmp_path, plan, FakeEngine())
    fed.run()
    plan.rounds = 3
    state, _ = load_checkpoint(tmp_path)
    state = fed.run(state)
    write_adapter(tmp_path / "adapter", exact_factors(state.global_state, plan.alpha))
    update, _ = read_adapter(tmp_path / "adapter")
    assert set(update.modules) == set(plan.shapes) and load_checkpoint(tmp_path)[0].round == 3
