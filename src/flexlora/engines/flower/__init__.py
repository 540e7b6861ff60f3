"""Flower integration: a Strategy for your own ServerApp, an engine for our round loop, and the apps.

* :class:`FlexLoRAStrategy`: plug any of our aggregators into a Flower ServerApp (one payload per node, at
  that node's rank).
* :class:`FlowerEngine`: our round loop (:mod:`flexlora.federation`) carried out as Flower messages.
* ``server_app:app`` / ``client_app:app``: what ``flwr run .`` starts (see ``docs/deployment.md``).

Importing this package imports nothing else (the names below load on first use), so a kept node's ClientApp
process, which only forwards messages, never imports torch.
"""

from importlib import import_module

__all__ = ["FlexLoRAStrategy", "FlowerEngine", "NodeDeclaration", "ReplyError", "simulation_engine"]
_WHERE = {
    "FlexLoRAStrategy": "strategy",
    "FlowerEngine": "engine",
    "simulation_engine": "simulation",
    "NodeDeclaration": "records",
    "ReplyError": "records",
}


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
