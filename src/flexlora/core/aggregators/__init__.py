"""A closed registry of aggregators, by name. Configs name them; nothing is imported dynamically."""

from __future__ import annotations

from flexlora.core.aggregators.base import Aggregator, GlobalState
from flexlora.core.aggregators.fedavg import FedAvg
from flexlora.core.aggregators.ffa import FFALoRA
from flexlora.core.aggregators.flexlora import FlexLoRA
from flexlora.core.aggregators.flexlora_balanced import FlexLoRAInitNorm, FlexLoRASqrt
from flexlora.core.aggregators.flora import FLoRA
from flexlora.core.aggregators.florist import FLoRIST
from flexlora.core.aggregators.hetlora import HetLoRA
from flexlora.core.aggregators.hetlora_cho import HetLoRACho
from flexlora.core.aggregators.raflora import RaFLoRA

__all__ = ["AGGREGATORS", "Aggregator", "GlobalState", "make_aggregator"]

AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls
    for cls in (
        FlexLoRA,
        FedAvg,
        HetLoRA,
        FLoRA,
        FFALoRA,
        FlexLoRAInitNorm,
        FlexLoRASqrt,
        HetLoRACho,
        RaFLoRA,
        FLoRIST,
    )
}


def make_aggregator(name: str, **kwargs: object) -> Aggregator:
    """Build an aggregator by name; ``fedit`` is FedAvg (it differs only in the local optimiser)."""
    key = "fedavg" if name == "fedit" else name
    if key not in AGGREGATORS:
        raise ValueError(f"unknown method {name!r}: use one of {sorted([*AGGREGATORS, 'fedit'])}")
    return AGGREGATORS[key](**kwargs)
