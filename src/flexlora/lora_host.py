"""The LoRA host: one base model per process, with PEFT LoRA adapters swapped in and out of it in place, so
that every client of a round trains on the same model object at its own per-module ranks.

For a target module with base weight ``W (d, k)`` and input ``x``, the installed adapters compute

    y = W x + s B A x               the trainable adapter: A (r, k), B (d, r), s = alpha / r
        + s_f B_f A_f x             FLoRA only: the frozen stack (``frozen=`` in :meth:`LoraHost.load`)

with rank and alpha per module (``s = alpha / sqrt(r)`` with ``use_rslora``; ``s_f`` likewise from the
frozen factors' own rank and alpha). Only ``A`` and ``B`` of the trainable adapter receive gradients; with
``freeze_A`` (FFA-LoRA) only ``B`` does and ``A`` keeps its initial value. ``W`` is never written to:
unloading restores the bit-identical base model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from flexlora.core.errors import AdapterError
from flexlora.core.lora import LoraFactors
from flexlora.models import DEFAULT_TARGET_MODULES, target_module_shapes

__all__ = ["LoraHost"]


def _layout(factors: Mapping[str, LoraFactors]) -> tuple:
    """What an injected adapter's structure depends on: modules, ranks, alphas and ``use_rslora``."""
    return tuple(sorted((n, f.rank, f.alpha, f.use_rslora) for n, f in factors.items()))


class LoraHost:
    """One base model, with PEFT LoRA adapters swapped in and out of it in place.

    ``load`` injects a trainable adapter (named ``"trainable"``) whose rank and alpha may differ per module, and
    optionally a frozen second adapter (``"frozen"``, FLoRA) active at the same time; ``export`` reads the
    trainable factors back; ``unload`` removes every LoRA layer, so the base model is exactly what it was.
    The model object never changes identity: ``host.model`` is what to train, evaluate or generate with,
    with or without an adapter.

    Args:
        model: a base model as returned by :func:`~flexlora.models.load_model` (its Linear targets not yet
            wrapped).
        target_modules: last name components that may carry LoRA (see
            :func:`~flexlora.models.target_module_shapes`).
        dropout: LoRA dropout on the trainable adapter's input (0 = off).

    Attributes:
        model: the base model (LoRA layers inside it while an adapter is loaded).
        shapes: ``{module path: (d, k)}`` of every target (see
            :func:`~flexlora.models.target_module_shapes`).

    Raises:
        ValueError: the model has no target module, or already carries PEFT layers.

    Example:
        >>> model, tok = flexlora.models.load_model("tiny")
        >>> host = LoraHost(model)
        >>> init = {n: LoraFactors(torch.randn(2, k), torch.zeros(d, 2), alpha=4.0)
        ...         for n, (d, k) in host.shapes.items()}
        >>> host.load(init)
        >>> trained = host.export()
        >>> host.unload()
    """

    TRAIN = "trainable"
    FROZEN = "frozen"

    def __init__(
        self, model: nn.Module, target_modules: Iterable[str] = DEFAULT_TARGET_MODULES, dropout: float = 0.0
    ) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise ValueError("the model already carries PEFT layers; give LoraHost a bare base model")
        self.model = model
        self.target_modules = tuple(target_modules)
        self.shapes = target_module_shapes(model, self.target_modules)
        if not self.shapes:
            raise ValueError(f"no nn.Linear module named like {self.target_modules} in the model")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = dropout
        self._tuner = None
        self._layout: tuple | None = (
            None  # (trainable, frozen) modules, ranks and alphas of the adapter in place
        )
        self._init: dict[str, LoraFactors] = {}
        self._requires_grad: dict[str, bool] = {}

    @property
    def loaded(self) -> bool:
        """Whether an adapter is installed."""
        return self._tuner is not None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train (LoRA A and B of the trainable adapter, or B only with ``freeze_A``)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------------------

    def _config(self, factors: Mapping[str, LoraFactors], dropout: float, what: str):
        """A ``LoraConfig`` that reproduces ``factors``' per-module ranks and alphas exactly."""
        from peft import LoraConfig

        if not factors:
            raise AdapterError(f"{what} adapter has no modules; nothing to train")
        rslora = {f.use_rslora for f in factors.values()}
        if len(rslora) > 1:
            raise AdapterError(f"{what} adapter mixes use_rslora True and False across modules; PEFT cannot")
        for name, f in factors.items():
            if name not in self.shapes:
                raise AdapterError(
                    f"{what} adapter module {name!r} is not a target of this model "
                    f"(targets: {self.target_modules}); it is refused"
                )
            if f.A.ndim != 2 or f.B.ndim != 2 or f.B.shape[1] != f.rank or f.shape != self.shapes[name]:
                raise AdapterError(
                    f"{what} adapter module {name!r}: A {tuple(f.A.shape)}, B {tuple(f.B.shape)} do not fit "
                    f"a base weight {self.shapes[name]}; it is refused"
                )
            if f.rank < 1:
                raise AdapterError(f"{what} adapter module {name!r} has rank 0; leave the module out instead")
        first = next(iter(factors.values()))
        # `^`-anchored, escaped, fully-qualified keys: PEFT matches `(.*\.)?(key)$`, so a bare name would
        # also match e.g. `model.layers.10...` for `layers.0...` patterns; `^` forces the whole path.
        keys = {name: "^" + re.escape(name) for name in factors}
        return LoraConfig(
            r=first.rank,
            lora_alpha=first.alpha,
            target_modules=list(factors),
            rank_pattern={keys[n]: f.rank for n, f in factors.items()},
            alpha_pattern={keys[n]: f.alpha for n, f in factors.items()},
            use_rslora=first.use_rslora,
            lora_dropout=dropout,
            bias="none",
        )

    @torch.no_grad()
    def _copy_in(self, adapter: str, factors: Mapping[str, LoraFactors]) -> None:
        modules = dict(self.model.named_modules())
        for name, f in factors.items():
            layer = modules[name]
            A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight  # (r, k), (d, r)
            A.copy_(f.A.to(device=A.device, dtype=A.dtype))
            B.copy_(f.B.to(device=B.device, dtype=B.dtype))

    def load(
        self,
        init: Mapping[str, LoraFactors],
        frozen: Mapping[str, LoraFactors] | None = None,
        freeze_A: bool = False,
    ) -> None:
        """Install a trainable adapter starting from ``init`` (replacing any adapter already installed; one
        with the same modules, ranks and alphas is kept and only its factors are overwritten).

        Args:
            init: factors per module; their ranks, alphas and ``use_rslora`` become the adapter's.
            frozen: FLoRA: a second adapter, active in the forward pass but never trained (e.g. the merged
                global update the client trains a fresh LoRA on top of). May cover other modules than
                ``init``.
            freeze_A: FFA-LoRA: only ``lora_B`` trains; ``lora_A`` keeps its initial value.

        Raises:
            AdapterError: a module that is not a target, a factor shape that does not fit its module, rank
                0, or ``use_rslora`` mixed within one adapter. Nothing is changed on error.
        """
        from peft import LoraModel
        from peft.functional import cast_adapter_dtype

        train_config = self._config(init, self.dropout, "trainable")
        frozen_config = self._config(frozen, 0.0, "frozen") if frozen else None
        layout = (_layout(init), _layout(frozen) if frozen else None)
        if self._tuner is not None and layout == self._layout:
            # same modules, ranks and alphas as the adapter in place: overwrite its factors instead of
            # re-injecting (PEFT's injection costs ~2 s at r200 on SmolLM2's 210 projections)
            self._install(init, frozen, freeze_A)
            return
        self.unload()
        self._requires_grad = {n: p.requires_grad for n, p in self.model.named_parameters()}
        # Injection is in place: the LoRA layers replace the targets inside `self.model`; their random
        # initialisation is overwritten right away, under a forked RNG so it does not consume the caller's.
        with torch.random.fork_rng(devices=[]):
            self._tuner = LoraModel(self.model, train_config, self.TRAIN)
            adapters = [self.TRAIN]
            if frozen_config is not None:
                self._tuner.peft_config[self.FROZEN] = frozen_config
                self._tuner.inject_adapter(self.model, self.FROZEN)
                adapters.append(self.FROZEN)
        for adapter in adapters:  # float32 factors on a bf16/fp16 base: the optimizer sees full precision
            cast_adapter_dtype(self.model, adapter)
        self._tuner.set_adapter(adapters)  # both active in the forward pass ...
        self._layout = layout
        self._install(init, frozen, freeze_A)

    def _install(
        self, init: Mapping[str, LoraFactors], frozen: Mapping[str, LoraFactors] | None, freeze_A: bool
    ) -> None:
        self._copy_in(self.TRAIN, init)
        if frozen:
            self._copy_in(self.FROZEN, frozen)
        for name, p in self.model.named_parameters():  # ... but only the trainable one gets gradients
            p.requires_grad_(
                f"lora_B.{self.TRAIN}." in name or (not freeze_A and f"lora_A.{self.TRAIN}." in name)
            )
        self._init = dict(init)

    def export(self) -> dict[str, LoraFactors]:
        """The trainable adapter's current factors.

        Returns:
            ``{module: LoraFactors}`` for the modules of the last ``init``, with detached CPU float32 copies of
            ``A (r, k)`` and ``B (d, r)`` and the same alpha and ``use_rslora``.

        Raises:
            RuntimeError: no adapter is installed.
        """
        if self._tuner is None:
            raise RuntimeError("no adapter is installed; call load() first")
        modules = dict(self.model.named_modules())
        out = {}
        for name, f in self._init.items():
            layer = modules[name]
            A = layer.lora_A[self.TRAIN].weight.detach().to("cpu", torch.float32, copy=True)
            B = layer.lora_B[self.TRAIN].weight.detach().to("cpu", torch.float32, copy=True)
            out[name] = LoraFactors(A=A, B=B, alpha=f.alpha, use_rslora=f.use_rslora)
        return out

    def trainable_pairs(self) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        """``{module: (lora_A weight, lora_B weight)}`` of the trainable adapter, the live parameters."""
        modules = dict(self.model.named_modules())
        return {
            n: (modules[n].lora_A[self.TRAIN].weight, modules[n].lora_B[self.TRAIN].weight)
            for n in self._init
        }

    def unload(self) -> None:
        """Remove every adapter: the targets become the original ``nn.Linear`` modules again (never merged,
        so the base weights are bit-identical) and the LoRA tensors are freed. A no-op without adapter."""
        if self._tuner is None:
            return
        self._tuner.unload()
        self._tuner = None
        self._layout = None
        self._init = {}
        if hasattr(self.model, "peft_config"):  # set by the PEFT tuner on the wrapped model
            del self.model.peft_config
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, False))
