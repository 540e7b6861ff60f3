"""Flower integration: a Strategy for your own ServerApp, an engine for our round loop, and the apps.

* :class:`FlexLoRAStrategy`: plug any of our aggregators into a Flower ServerApp (one payload per node, at
  that node's rank).
* :class:`FlowerEngine`: our round loop (:mod:`flexlora.federation`) carried out as Flower messages.
* ``server_app:app`` / ``client_app:app``: what ``flwr run .`` starts (see ``docs/deployment.md``).

Importing this package does not import the apps (they load models on first use only).
"""

from flexlora.engines.flower.engine import FlowerEngine
from flexlora.engines.flower.records import NodeDeclaration, ReplyError
from flexlora.engines.flower.simulation import simulation_engine
from flexlora.engines.flower.strategy import FlexLoRAStrategy

__all__ = ["FlexLoRAStrategy", "FlowerEngine", "NodeDeclaration", "ReplyError", "simulation_engine"]
