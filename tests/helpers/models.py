"""Tiny random models built in memory, for tests that need a real ``transformers`` module tree."""

from __future__ import annotations

import torch


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
