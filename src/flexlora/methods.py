"""Every federated method, declared once: its server rule, its client recipe and where it may run.

A :class:`Method` is a frozen record; :data:`METHODS` maps each name (``federation.method``) to one. Config
validation, ``flexlora compare``, reports, plots, the DP and robust wrappers' settings, every engine's client
side and the CLI read this table and keep no name lists of their own.

Semantics (as PEFT's tuner registry pairs a config with its layer and model):

- ``aggregator`` is a lazy import path ``"module:Class"`` of an :class:`~flexlora.core.aggregators.Aggregator`,
  imported only when :meth:`Method.make_aggregator` builds it, so this module imports the standard library
  only (it sits with the contracts, below torch). Several methods may share a class (``fedit`` is ``FedAvg``;
  SLoRA's second stage is ``FedAvg`` or ``FlexLoRA``).
- ``options`` maps an aggregator keyword to the ``federation.<key>`` config field it is read from;
  :meth:`Method.aggregator_kwargs` reads them, :meth:`Method.build` does both.
- ``client`` is the :class:`ClientRecipe` every engine applies to each training job (it travels in
  :class:`~flexlora.contracts.TrainJob`): the optimizer the method prescribes, a frozen ``A``, a fresh adapter
  over the frozen global update each round, the tail penalty, and extra stages before the dense rounds.
- ``homogeneous_only``: every client must share one rank. ``dp``: the round update is linear in a clippable
  per-client contribution, so client-level DP applies. ``space``: where robust and DP rules act (``product``:
  on ``s_i B_i A_i``; ``factor``: on the factors). ``engines``: the engines that can run it. ``group``: its
  place in ``compare``'s defaults. ``homo_control``: a heterogeneous method also run under ``homo`` when
  listed. ``baseline``: the row a report compares it with (``None``: it is a baseline; ``"default"``: the
  report's ``--baseline``).

Adding a method is its aggregator file plus one :data:`METHODS` entry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ClientRecipe",
    "Method",
    "METHODS",
    "GROUPS",
    "DEFAULT_BASELINE",
    "get_method",
    "make_aggregator",
    "method_names",
]

#: ``Method.group`` values, in ``compare``'s order: the paper's heterogeneous methods and the homogeneous
#: baselines run by default; the others when listed.
GROUPS = ("paper", "cho", "balance", "rank-collapse", "baseline")
#: the homogeneous method a report compares heterogeneous ones with (``baseline="default"``)
DEFAULT_BASELINE = "fedit"


@dataclass(frozen=True)
class ClientRecipe:
    """What a client does differently for a method, on every engine.

    Args:
        optimizer: the local optimizer the method prescribes (``None``: ``train.optimizer``).
        freeze_A: train ``B`` only (FFA-LoRA).
        fresh_adapter: add the global update to the frozen base and train a fresh adapter each round (FLoRA).
        tail_penalty: train with the rank tail regulariser and self-pruning (HetLoRA, Cho et al.).
        stages: stages that run the first rounds instead of the dense LoRA rounds (``"slora-sparse"``).
    """

    optimizer: str | None = None
    freeze_A: bool = False
    fresh_adapter: bool = False
    tail_penalty: bool = False
    stages: tuple[str, ...] = ()


@dataclass(frozen=True)
class Method:
    """One federated method (field semantics in the module docstring)."""

    name: str
    aggregator: str
    group: str
    options: dict[str, str] = field(default_factory=dict)
    client: ClientRecipe = ClientRecipe()
    homogeneous_only: bool = False
    dp: bool = False
    space: str = "factor"
    engines: tuple[str, ...] = ("local", "flower")
    homo_control: bool = False
    baseline: str | None = "default"

    def aggregator_class(self) -> type:
        """The aggregator class, imported now."""
        module, _, cls = self.aggregator.partition(":")
        return getattr(importlib.import_module(module), cls)

    def not_carried(self) -> str:
        """Why the method cannot leave the local engine: the part of its recipe Flower messages do not carry."""
        if self.client.stages:
            return f"its first stage ({', '.join(self.client.stages)}) is not carried by Flower"
        if self.client.tail_penalty:
            return "its client regulariser is not carried by Flower"
        return "not supported by the other engines"

    def make_aggregator(self, **kwargs: Any):
        """A fresh aggregator with these keyword arguments."""
        return self.aggregator_class()(**kwargs)

    def aggregator_kwargs(self, federation: Any) -> dict[str, Any]:
        """The aggregator's keywords read from a ``federation`` config section (``options``)."""
        return {kw: getattr(federation, key) for kw, key in self.options.items()}

    def build(self, federation: Any):
        """The aggregator of a ``federation`` config section."""
        return self.make_aggregator(**self.aggregator_kwargs(federation))


_CORE = "flexlora.core.aggregators"
_SVD = {"svd": "svd"}
_FEDAVG, _FLEXLORA = f"{_CORE}.fedavg:FedAvg", f"{_CORE}.flexlora:FlexLoRA"
_PRODUCT_DP = {"dp": True, "space": "product"}
_SPARSE = ("slora-sparse",)
_LOCAL = ("local",)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("flexlora", _FLEXLORA, "paper", _SVD, homo_control=True, **_PRODUCT_DP),
        Method("hetlora", f"{_CORE}.hetlora:HetLoRA", "paper", {"sparsity_weighted": "sparsity_weighted"}),
        Method(
            "flora", f"{_CORE}.flora:FLoRA", "paper", client=ClientRecipe(fresh_adapter=True), **_PRODUCT_DP
        ),
        Method("ffa", f"{_CORE}.ffa:FFALoRA", "paper", client=ClientRecipe(freeze_A=True), dp=True),
        Method(
            "slora+flexlora",
            _FLEXLORA,
            "paper",
            _SVD,
            client=ClientRecipe(stages=_SPARSE),
            space="product",
            engines=_LOCAL,
            baseline="slora",
        ),
        Method(
            "hetlora-cho",
            f"{_CORE}.hetlora_cho:HetLoRACho",
            "cho",
            {"gamma": "hetlora_gamma", "lam": "hetlora_lambda", "threshold": "hetlora_threshold"},
            client=ClientRecipe(tail_penalty=True),
            engines=_LOCAL,
        ),
        Method(
            "flexlora-initnorm",
            f"{_CORE}.flexlora_balanced:FlexLoRAInitNorm",
            "balance",
            _SVD,
            homo_control=True,
            **_PRODUCT_DP,
        ),
        Method(
            "flexlora-sqrt",
            f"{_CORE}.flexlora_balanced:FlexLoRASqrt",
            "balance",
            _SVD,
            homo_control=True,
            **_PRODUCT_DP,
        ),
        Method("raflora", f"{_CORE}.raflora:RaFLoRA", "rank-collapse", _SVD, space="product"),
        Method(
            "florist",
            f"{_CORE}.florist:FLoRIST",
            "rank-collapse",
            {"threshold": "florist_threshold"},
            client=ClientRecipe(fresh_adapter=True),
            **_PRODUCT_DP,
        ),
        Method("fedavg", _FEDAVG, "baseline", homogeneous_only=True, baseline=None),
        Method(
            "fedit",
            _FEDAVG,
            "baseline",
            client=ClientRecipe(optimizer="adamw"),
            homogeneous_only=True,
            baseline=None,
        ),
        Method(
            "slora",
            _FEDAVG,
            "baseline",
            client=ClientRecipe(stages=_SPARSE),
            homogeneous_only=True,
            engines=_LOCAL,
            baseline=None,
        ),
    )
}


def get_method(name: str) -> Method:
    """The registered method ``name``.

    Raises:
        ValueError: an unknown name, in one line listing the valid ones.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: use one of {sorted(METHODS)}")
    return METHODS[name]


def make_aggregator(name: str, **kwargs: Any):
    """The aggregator of method ``name`` with these keyword arguments (``fedit``: FedAvg)."""
    return get_method(name).make_aggregator(**kwargs)


def method_names(where: Callable[[Method], bool] = lambda m: True) -> list[str]:
    """Registered names whose method satisfies ``where``, in :data:`GROUPS` order (then registration)."""
    ordered = sorted(METHODS.values(), key=lambda m: GROUPS.index(m.group))
    return [m.name for m in ordered if where(m)]
