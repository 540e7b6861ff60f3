"""Shared fixtures: tiny random models and paths to the shared data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: on a 2-core machine shared with other work, 2 threads
    spin-wait at every barrier while one is descheduled (measured 20-25x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    """``(model, tokenizer)`` of the tiny random Llama, one per test module (tests may wrap it in a host)."""
    from flexlora.models import load_model

    return load_model("tiny", device="cpu")


def tiny_llama_model(seed: int = 0):
    """A 2-layer random Llama (hidden 32, 2 KV heads: k/v_proj are 16 x 32, MLP 64) for adapter tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama():
    return tiny_llama_model()
