"""Shared fixtures (tiny random models), and the plugins: ``pytester`` and the shared-data check."""

from __future__ import annotations

import pytest
import torch

from helpers.models import tiny_llama_model

pytest_plugins = ["pytester", "helpers.data"]


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


@pytest.fixture
def tiny_llama():
    return tiny_llama_model()
