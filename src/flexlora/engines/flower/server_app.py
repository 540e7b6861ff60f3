"""The flexlora ``ServerApp``: ``flwr run .`` runs our round loop on Flower's nodes.

Reads the run config (``[tool.flwr.app.config]`` plus ``--run-config`` overrides; see
:mod:`.settings`), then:

* ``placement="simulation"``: the ``flexlora run`` recipe, with the Flower engine on this ServerApp's grid
  (the pool and rank assignment come from the data source and the distribution, as in-process);
* ``placement="deployment"``: :func:`.deployment.run_deployment`, one client per SuperNode with the rank it
  declared.

Either way the run directory (``output-dir``/``run-name``, best given as an absolute path) receives the
usual outputs plus ``flower.json``: per round, each job's node, ranks sent and trained, and bytes.
"""

from __future__ import annotations

import json
import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flexlora.engines.flower.engine import FlowerEngine
from flexlora.engines.flower.settings import client_settings, run_config_from_flower
from flexlora.engines.flower.simulation import serving

__all__ = ["app"]

log = logging.getLogger("flexlora")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation configured by ``context.run_config`` on ``grid``'s nodes."""
    cfg, options = run_config_from_flower(dict(context.run_config))
    engine_options = {
        "round_timeout": options.round_timeout,
        "min_nodes": options.min_nodes,
        "wait_timeout": options.wait_timeout,
    }
    engines: list[FlowerEngine] = []
    if options.placement == "deployment":
        from flexlora.engines.flower.deployment import run_deployment

        engine = FlowerEngine(
            grid,
            "deployment",
            settings=client_settings(cfg),
            max_examples=cfg.security.max_examples,
            **engine_options,
        )
        engines.append(engine)
        run_deployment(cfg, engine)
    else:
        from flexlora.run import run_federation

        with serving(grid, "simulation", **engine_options) as built:
            try:
                run_federation(cfg, progress=False)
            finally:
                engines.extend(built)
    if engines:
        record = {"placement": options.placement, "rounds": engines[0].rounds}
        (cfg.run_dir / "flower.json").write_text(json.dumps(record, indent=1) + "\n")
    log.info("flexlora ServerApp: run written to %s", cfg.run_dir)
