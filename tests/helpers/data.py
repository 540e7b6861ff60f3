"""The shared data beside the clone (``../shared/data``) and the switch that makes its absence an error.

A test that reads it carries :func:`needs_shared_data`; this module is also a pytest plugin (loaded by
``tests/conftest.py``) whose setup hook calls :func:`check_shared_data` before the test and its fixtures run.
Absent data skips the test, unless ``FLEXLORA_REQUIRE_DATA=1`` (set by ``.ci/run``, where the data is always
there): then the test fails, so a moved or renamed file cannot turn into a silent skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
REQUIRE_DATA = "FLEXLORA_REQUIRE_DATA"
MARK = "shared_data"


def needs_shared_data(path: Path) -> pytest.MarkDecorator:
    """Mark a test (or, as ``pytestmark``, a module) as reading ``path`` from the shared data."""
    return getattr(pytest.mark, MARK)(path)


def check_shared_data(path: Path) -> None:
    """Return if ``path`` exists; else skip the calling test, or fail it when ``FLEXLORA_REQUIRE_DATA=1``."""
    if path.exists():
        return
    message = f"shared data {path} is absent"
    if os.environ.get(REQUIRE_DATA) == "1":
        pytest.fail(f"{message} ({REQUIRE_DATA}=1)", pytrace=False)
    pytest.skip(message)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers(MARK):
        check_shared_data(*mark.args)
