"""A real Flower deployment on loopback: one SuperLink, two SuperNodes at ranks 4 and 8, ``flwr run .``.

Everything listens on 127.0.0.1 only, on free ports; ``FLWR_HOME`` is a temporary directory (Flower's config,
installed bundles); every process the test starts runs in its own session and is stopped, with its children,
in the fixture's teardown. Waits are bounded.

The one federation covers both requirements: in round 1 each node trains at its own declared rank; then
node B is killed (SIGKILL, as a crash) and round 2 goes on without it, with the reason recorded.

A second federation runs the secured recipe of docs/deployment.md: TLS with a CA and a server certificate made
by the test (:mod:`flower_pki`), SuperNode authentication with the two nodes' public keys registered by
``flwr supernode register``, and an intruder whose key is not registered and who claims node A's client id:
the SuperLink refuses it, and node A's client trains on node A's registered node id.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from flexlora.budget import rank_table
from flexlora.core.adapter_io import read_adapter
from flexlora.core.budget import GIB
from flexlora.models import DEFAULT_TARGET_MODULES
from helpers.flower_pki import make_node_key, make_tls

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what} within {timeout:.0f}s")


class Cluster:
    """Processes started by this test, each in its own session (so its children are stopped with it)."""

    def __init__(self, home: Path):
        self.home = home
        self.env = {
            **os.environ,
            "FLWR_HOME": str(home),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "OMP_NUM_THREADS": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",  # SuperExec looks for new tasks every 0.2 s, not 1 s
        }
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.home / f"{name}.log").open("w")
        proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            env=self.env,
            cwd=self.home,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the process's whole group, then make sure nothing of the group is left (bounded)."""
        proc = self.procs[name]
        _signal_group(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc.pid, signal.SIGKILL)  # stragglers (superexec, clientapp) of a stopped node
        proc.wait(timeout=10)
        wait_for(lambda: not _group_members(proc.pid), 15, f"processes of {name} still running")

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)

    def logs(self) -> str:
        return "\n".join(f"---- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.home.glob("*.log")))


def _config_toml(home: Path, link: int, security: str) -> None:
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link}"\n{security}\n'
    )


NODES = (("node-a", 'lora-rank=4 client-id="0"'), ("node-b", 'lora-rank=8 client-id="1"'))


@contextmanager
def loopback(home: Path, extra_node_config: str = "", env: dict[str, str] | None = None, nodes=NODES):
    """A SuperLink and two SuperNodes (``NODES`` unless given) on free loopback ports, stopped on exit."""
    home.mkdir(parents=True)
    link = free_port()
    _config_toml(home, link, "insecure = true")
    c = Cluster(home)
    c.env.update(env or {})
    try:
        c.start(
            "superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
            "--disable-runtime-dependency-installation",
        )  # fmt: skip
        wait_for(lambda: _accepts(link), 60, "the SuperLink did not listen")
        for name, node_config in nodes:
            c.start(
                name, "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", f"{node_config} {extra_node_config}".strip(),
            )  # fmt: skip
        yield c
    finally:
        c.stop_all()


@pytest.fixture
def cluster(tmp_path):
    with loopback(tmp_path / "flwr-home") as c:
        yield c


@pytest.fixture
def secure_cluster(tmp_path):
    """TLS + SuperNode authentication: nodes A and B registered, an intruder not (it claims client 0)."""
    home, pki = tmp_path / "flwr-home", tmp_path / "pki"
    home.mkdir()
    tls = make_tls(pki)
    link = free_port()
    _config_toml(home, link, f'root-certificates = "{tls["ca"]}"')
    c = Cluster(home)
    c.node_ids = {}
    try:
        c.start(
            "superlink", "flower-superlink", "--host", "127.0.0.1", "--port", str(link),
            "--disable-runtime-dependency-installation", "--ssl-ca-certfile", str(tls["ca"]),
            "--ssl-certfile", str(tls["cert"]), "--ssl-keyfile", str(tls["key"]), "--enable-supernode-auth",
        )  # fmt: skip
        wait_for(lambda: _accepts(link), 60, "the SuperLink did not listen")
        for name, _ in NODES:
            public = make_node_key(pki / name)
            done = subprocess.run(
                [str(BIN / "flwr"), "supernode", "register", str(public), "loopback", "--format", "json"],
                env=c.env, cwd=home, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
            c.node_ids[name] = int(json.loads(done.stdout)["node-id"])
        make_node_key(pki / "intruder")  # never registered
        for name, node_config in (*NODES, ("intruder", 'lora-rank=8 client-id="0"')):
            c.start(
                name, "flower-supernode", "--superlink", f"127.0.0.1:{link}", "--root-certificates",
                str(tls["ca"]), "--auth-supernode-private-key", str(pki / name),
                "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", node_config,
            )  # fmt: skip
        yield c
    finally:
        c.stop_all()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _rounds_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return max(
        (json.loads(line)["round"] for line in path.read_text().splitlines() if line.strip()), default=0
    )


def test_deployment_on_loopback_with_a_node_killed_mid_run(cluster, tmp_path):
    run_dir = _start(cluster, tmp_path, rounds=2)
    try:
        wait_for(lambda: _rounds_done(run_dir) >= 1, 300, "round 1 did not finish")
        cluster.kill("node-b")  # a crash: no goodbye to the SuperLink
        wait_for(lambda: (run_dir / "summary.json").exists(), 300, "the federation did not finish")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{cluster.logs()}") from None

    flower = json.loads((run_dir / "flower.json").read_text())
    assert flower["placement"] == "deployment"
    first = {job["client"]: job for job in flower["rounds"][0]["jobs"]}
    # each node trained at its own declared rank, and the server checked the reply against it
    assert first["0"]["ranks"] == first["0"]["trained_ranks"] == [4]
    assert first["1"]["ranks"] == first["1"]["trained_ranks"] == [8]
    assert first["0"]["node"] != first["1"]["node"]
    assert first["1"]["bytes_sent"] == 2 * first["0"]["bytes_sent"]
    # after the crash node B's client is left out with the reason, node A goes on
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert metrics[1]["received"] == 2 and metrics[1]["failures"] == {}
    for m in metrics[2:]:
        assert m["received"] == 1
        assert set(m["failures"]) == {"1"}
        assert any(word in m["failures"]["1"].lower() for word in ("offline", "not connected", "unavailable"))
    # the global adapter was written (a PEFT adapter at the exact rank of the aggregate)
    update, adapter_config = read_adapter(run_dir / "adapters" / "full")
    assert update.modules and all(f.rank <= 4 + 8 for f in update.modules.values())
    assert {p.name for p in (run_dir / "adapters").iterdir()} == {"full", "r4", "r8"}
    assert json.loads((run_dir / "assignment.json").read_text()) == {"0": "r4", "1": "r8"}


@pytest.mark.slow  # one round on loopback, ~3.5 minutes on a loaded 2-core box
def test_deployment_with_an_auto_rank_node_records_its_choice_and_reason(tmp_path):
    """Node A declares ``lora-rank="auto"`` with exactly ``r8``'s estimated memory for this run (tiny, default
    targets, batch 4 x 48 tokens; an empty measurement cache, so the node goes by the estimate): it trains at
    r8, and the server's ``assignment.json`` records its type, budget and why."""
    rows = rank_table("tiny", DEFAULT_TARGET_MODULES, 4, 48, "float32", "cpu", "estimate")
    memory = math.ceil(rows[0].estimate.total / GIB * 1e6) / 1e6  # r8's need; r30 needs more
    assert rows[1].estimate.total > memory * GIB
    nodes = (
        ("node-a", f'lora-rank="auto" memory-gb={memory} client-id="0"'),
        ("node-b", 'lora-rank=4 client-id="1"'),
    )
    env = {"FLEXLORA_CACHE": str(tmp_path / "cache")}
    with loopback(tmp_path / "flwr-home", env=env, nodes=nodes) as cluster:
        run_dir = _run(cluster, tmp_path, rounds=1)
    record = json.loads((run_dir / "assignment.json").read_text())
    assert record["1"] == "r4"
    auto = record["0"]
    assert auto["rank_type"] == "r8" and auto["memory_gb"] == memory
    assert auto["estimated_gb"] == round(rows[0].estimate.total / GIB, 3)
    assert auto["reason"].startswith(
        f"r8 needs {rows[0].estimate.total / GIB:.2f} GiB of a budget of {memory:g} GiB"
    )
    assert auto["reason"].endswith(f"r30 would need {rows[1].estimate.total / GIB:.2f} GiB (estimated)")
    jobs = {
        job["client"]: job for job in json.loads((run_dir / "flower.json").read_text())["rounds"][0]["jobs"]
    }
    assert jobs["0"]["trained_ranks"] == [8] and jobs["1"]["trained_ranks"] == [4]


@pytest.mark.slow  # ~4 minutes on a loaded 2-core box (still part of `make test`)
def test_deployment_with_tls_and_supernode_auth_refuses_an_unregistered_node(secure_cluster, tmp_path):
    cluster = secure_cluster
    # the intruder is refused at activation and its SuperNode exits; nothing else is needed from it
    try:
        code = cluster.procs["intruder"].wait(timeout=180)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the unregistered SuperNode was not refused\n{cluster.logs()}") from None
    assert code != 0
    assert "No SuperNode found with the given public key" in (cluster.home / "superlink.log").read_text()

    run_dir = _run(cluster, tmp_path, rounds=1)
    # only the registered nodes took part, each as the client it declared, on its registered node id
    assert json.loads((run_dir / "assignment.json").read_text()) == {"0": "r4", "1": "r8"}
    jobs = {
        job["client"]: job for job in json.loads((run_dir / "flower.json").read_text())["rounds"][0]["jobs"]
    }
    assert jobs["0"]["node"] == cluster.node_ids["node-a"] and jobs["0"]["trained_ranks"] == [4]
    assert jobs["1"]["node"] == cluster.node_ids["node-b"] and jobs["1"]["trained_ranks"] == [8]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["round"] == 1 and metrics[-1]["received"] == 2 and metrics[-1]["failures"] == {}


def _start(cluster: Cluster, tmp_path: Path, rounds: int) -> Path:
    """``flwr run`` the tiny federation over both nodes; returns its run directory (not yet finished)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "data: {path: synthetic, options: {num_clients: 6, examples_per_client: 12, seed: 0}, num_heldout: 2}\n"
        "train: {batch_size: 4, max_length: 48}\n"
        "eval: {generate: false, max_examples_per_client: 2}\n"
    )
    run_config = (
        f'num-server-rounds={rounds} model="tiny" method="flexlora" placement="deployment" clients-per-round=2 '
        f'local-steps=1 config-file="{config}" output-dir="{tmp_path / "runs"}" run-name="loop" min-nodes=2 '
        "round-timeout=150.0 wait-timeout=120.0"
    )
    started = subprocess.run(
        [str(BIN / "flwr"), "run", str(REPO), "loopback", "--run-config", run_config],
        env=cluster.env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    return tmp_path / "runs" / "loop"


def _run(cluster: Cluster, tmp_path: Path, rounds: int) -> Path:
    """:func:`_start`, then wait for the federation's summary."""
    run_dir = _start(cluster, tmp_path, rounds)
    try:
        wait_for(lambda: (run_dir / "summary.json").exists(), 900, "the federation did not finish")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{cluster.logs()}") from None
    return run_dir


@pytest.mark.timeout(2400)  # two federations of two rounds on loopback: minutes on a loaded machine
def test_kept_worker_gives_the_same_result_and_loads_the_model_once_per_node(tmp_path):
    """``keep-model=true``: each node's model is loaded once for all rounds (by its node service), and the
    federation's global adapter (2 rounds) is the one the per-message ClientApps produce."""
    import tempfile

    from safetensors.torch import load_file

    runs = {}
    for keep in (False, True):
        home = tmp_path / f"keep-{keep}"
        sockets = Path(tempfile.mkdtemp(prefix="fl", dir="/tmp"))  # short: a socket path has <= 107 bytes
        extra = "keep-model=true" if keep else ""
        try:
            with loopback(home / "flwr-home", extra, {"TMPDIR": str(sockets)}) as c:
                runs[keep] = _run(c, home, rounds=2)
                if keep:
                    logs = sorted(sockets.glob("flexlora-*/node-*.log"))
                    assert len(logs) == 2, c.logs()  # one service per node
                    for log in logs:
                        assert log.read_text().count("loaded model") == 1, log.read_text()
        finally:
            shutil.rmtree(sockets, ignore_errors=True)
    plain, kept = (
        load_file(runs[k] / "adapters" / "full" / "adapter_model.safetensors") for k in (False, True)
    )
    assert plain.keys() == kept.keys()
    for name in plain:
        torch.testing.assert_close(kept[name], plain[name])
    seconds = {k: [json.loads(x)["seconds"]["total"] for x in (runs[k] / "metrics.jsonl").read_text().splitlines()[1:]]
               for k in runs}  # fmt: skip
    print(f"round seconds, per-message ClientApps: {seconds[False]}, kept worker: {seconds[True]}")
