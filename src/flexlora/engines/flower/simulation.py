"""Flower's simulation runtime driven by our round loop, in this process.

``flexlora run --set federation.engine=flower`` keeps the round loop in the caller's thread. The simulation
runtime (Ray actors running our ClientApp) runs in a background thread with a bridge ``ServerApp`` whose
``main`` hands its ``Grid`` over and waits; the :class:`~.engine.FlowerEngine` on that grid carries out the
jobs, and closing the engine lets ``main`` return, which stops the runtime.

Ray is kept small (2 CPU cores are the norm here): ``actors`` ClientApp actors, ``num_supernodes`` virtual
nodes (any of them runs any client's job; the job carries the client id and its factors).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flexlora.engines.flower.engine import FlowerEngine, Placement
from flexlora.engines.flower.settings import client_settings

__all__ = ["flower_engine", "serving", "simulation_engine", "start_simulation"]

log = logging.getLogger(__name__)


_SERVING: dict[str, Any] = {}  # the grid of the ServerApp now running in this process, if any


@contextmanager
def serving(
    grid: Grid, placement: Placement = "simulation", **engine_options: Any
) -> Iterator[list[FlowerEngine]]:
    """Inside a ServerApp's ``main``: make :func:`simulation_engine` return engines on ``grid``, so the
    ``flexlora run`` recipe runs unchanged on the ServerApp's nodes.

    Yields:
        The list of engines built meanwhile (for their per-round records).
    """
    engines: list[FlowerEngine] = []
    _SERVING.update(grid=grid, placement=placement, options=engine_options, engines=engines)
    try:
        yield engines
    finally:
        _SERVING.clear()


def simulation_engine(cfg: Any, **options: Any) -> FlowerEngine:
    """The Flower engine for ``cfg`` (a :class:`flexlora.config.RunConfig`, ``federation.engine: flower``).

    Inside a ServerApp (see :func:`serving`): an engine on the ServerApp's grid. Elsewhere: Flower's
    simulation runtime started in this process (see :func:`start_simulation`, which takes
    ``options``); ``engine.close()`` stops it.
    """
    if _SERVING:
        engine = FlowerEngine(
            _SERVING["grid"],
            _SERVING["placement"],
            settings=client_settings(cfg),
            max_examples=cfg.security.max_examples,
            **_SERVING["options"],
        )
        _SERVING["engines"].append(engine)
        return engine
    return start_simulation(cfg, **options)


def flower_engine(cfg: Any, host: Any, tokenizer: Any, source: Any, progress: bool) -> FlowerEngine:
    """``federation.engine: flower``: :func:`simulation_engine` for ``cfg``. The round loop's own model and
    data source go unused: the nodes load their own from the settings each job carries."""
    return simulation_engine(cfg)


def start_simulation(
    cfg: Any,
    *,
    num_supernodes: int | None = None,
    actors: int = 1,
    cpus_per_actor: int = 1,
    round_timeout: float = 3600.0,
    start_timeout: float = 300.0,
) -> FlowerEngine:
    """Start Flower's simulation runtime in a background thread and return an engine on its grid.

    Args:
        cfg: the run's :class:`flexlora.config.RunConfig` (its model, data and train sections go with every
            job).
        num_supernodes: virtual nodes (default: the clients per round, at least 1, at most 8).
        actors: ClientApp actors running at once (each holds its own copy of the base model).
        cpus_per_actor: Ray CPUs per actor.
        round_timeout: seconds to wait for a round's replies.
        start_timeout: seconds to wait for the runtime to come up.

    Returns:
        The engine; ``engine.close()`` stops the runtime.

    Raises:
        RuntimeError: the runtime did not start (the cause is chained).
    """
    n = num_supernodes or _default_supernodes(cfg.federation.clients_per_round)
    runtime = _Runtime(n, actors, cpus_per_actor)
    grid = runtime.start(start_timeout)
    log.info("Flower simulation runtime: %d virtual nodes, %d actor(s)", n, actors)
    return FlowerEngine(
        grid,
        "simulation",
        settings=client_settings(cfg),
        round_timeout=round_timeout,
        min_nodes=n,
        max_examples=cfg.security.max_examples,
        on_close=runtime.stop,
    )


def _default_supernodes(per_round: int | float) -> int:
    """Virtual nodes for ``federation.clients_per_round``: the count itself (2 for a fraction), in [1, 8]."""
    return max(1, min(8, per_round if isinstance(per_round, int) else 2))


class _Runtime:
    """Flower's simulation runtime in a background thread, with a bridge ``ServerApp`` whose ``main`` hands
    its ``Grid`` over and then waits until :meth:`stop`, which lets the runtime end.

    Args:
        num_supernodes: virtual nodes.
        actors: ClientApp actors running at once.
        cpus_per_actor: Ray CPUs per actor.
    """

    def __init__(self, num_supernodes: int, actors: int, cpus_per_actor: int) -> None:
        from flwr.simulation import run_simulation

        from flexlora.engines.flower.client_app import app as client_app

        self.num_supernodes = num_supernodes
        self.backend_config = {
            "client_resources": {"num_cpus": cpus_per_actor, "num_gpus": 0.0},
            "init_args": {"num_cpus": actors * cpus_per_actor, "include_dashboard": False},
        }
        self._handoff: queue.Queue[Grid | None] = queue.Queue()
        self._release = threading.Event()
        self._failure: list[BaseException] = []
        args = (run_simulation, self._bridge(), client_app)
        self._thread = threading.Thread(target=self._run, args=args, name="flower-simulation", daemon=True)

    def _bridge(self) -> ServerApp:
        """A ServerApp whose ``main`` puts its grid in the hand-off queue and blocks until released."""
        bridge = ServerApp()

        @bridge.main()
        def main(grid: Grid, context: Context) -> None:
            self._handoff.put(grid)
            self._release.wait()

        return bridge

    def _run(self, run_simulation: Any, server_app: ServerApp, client_app: Any) -> None:
        """The thread's body: run the simulation; keep any failure; always unblock :meth:`start`."""
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=self.num_supernodes,
                backend_config=self.backend_config,
            )
        except BaseException as exc:  # noqa: BLE001 - reported to the caller by start()
            self._failure.append(exc)
        finally:
            self._handoff.put(None)  # unblocks a caller still waiting

    def start(self, timeout: float) -> Grid:
        """Start the runtime and return the bridge's grid.

        Raises:
            RuntimeError: no grid within ``timeout`` seconds, or the runtime ended first (cause chained).
        """
        self._thread.start()
        try:
            grid = self._handoff.get(timeout=timeout)
        except queue.Empty:
            grid = None
        if grid is None:
            self._release.set()
            cause = self._failure[0] if self._failure else None
            raise RuntimeError(f"Flower's simulation runtime did not start within {timeout:.0f}s") from cause
        return grid

    def stop(self) -> None:
        """Release the bridge, wait for the runtime to end, and reap the Ray processes it leaves."""
        ray_processes = _ray_descendants(os.getpid())  # before Ray's own shutdown orphans its workers
        self._release.set()
        self._thread.join(timeout=120)
        if self._thread.is_alive():
            log.warning("Flower's simulation runtime did not stop within 120s")
        _reap(ray_processes, timeout=30.0)


def _ray_descendants(root: int) -> set[int]:
    """Ray's processes started under ``root`` (raylet, GCS, actors); empty where ``/proc`` is missing."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(text.rsplit(")", 1)[1].split()[1])
        names[pid] = cmdline
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return {pid for pid in found if "ray" in names.get(pid, "")}


def _reap(pids: set[int], timeout: float) -> None:
    """Wait for ``pids`` (processes this runtime started) to exit; SIGKILL those still there after
    ``timeout`` seconds (Ray's actors outlive ``ray.shutdown`` by a few seconds)."""
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if _running(pid)}
        time.sleep(0.5)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if alive:
        log.warning("stopped %d Ray process(es) left after the simulation: %s", len(alive), sorted(alive))


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
