"""The aggregators: one module per method's server rule. Which name builds which class, and with which
options, is the method registry's (:mod:`flexlora.methods`); nothing here is looked up by name."""

from __future__ import annotations

from flexlora.core.aggregators.base import Aggregator, GlobalState

__all__ = ["Aggregator", "GlobalState"]
