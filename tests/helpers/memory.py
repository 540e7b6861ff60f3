"""How much memory one test module's inputs cost, measured in a process of its own.

Measured inside the test session, the growth of peak RSS (``ru_maxrss``, the process's all-time high) says
little: whatever earlier modules allocated (models, data caches, allocator pools) can hide a spike, and
their leftovers can be charged to the module. :func:`module_peak_growth_mb` runs the module's tests under
pytest in a fresh interpreter with this module as a plugin (``-p helpers.memory``): the plugin notes the
child's peak RSS (``VmHWM``) once collection is done (imports and module constants paid) and again when the session
ends, and writes the difference to the file named by ``FLEXLORA_MEMORY_OUT``.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

OUT = "FLEXLORA_MEMORY_OUT"
TESTS = Path(__file__).resolve().parents[1]
TIMEOUT_S = 800  # under pytest-timeout's 900 s for the calling test; a loaded 2-core box needs minutes
_baseline_kib: list[int] = []


def _peak_kib() -> int:
    """This process's peak RSS in KiB: ``VmHWM`` of its own address space on Linux. Not ``ru_maxrss``: Linux
    carries the parent's high-water mark across fork and exec into it, so a child of a large test session
    starts with the session's peak (measured: a 100 MB spike read as 0 growth in the full suite)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def pytest_collection_finish(session: pytest.Session) -> None:
    _baseline_kib.append(_peak_kib())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _baseline_kib:
        Path(os.environ[OUT]).write_text(str((_peak_kib() - _baseline_kib[0]) / 1024))


def module_peak_growth_mb(module: Path, *pytest_args: str, workdir: Path) -> float:
    """Run the tests of ``module`` (filtered by ``pytest_args``) alone in a new interpreter; return how many
    MB its peak RSS grew while they ran. Fails the caller if any of them fails."""
    out = workdir / "peak-growth-mb"
    env = {**os.environ, OUT: str(out)}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    args = ["-q", "-p", "no:cacheprovider", "-p", "helpers.memory", f"--basetemp={workdir / 'tmp'}"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(module), *args, *pytest_args],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{module.name} failed in its own process:\n{proc.stdout[-3000:]}"
    return float(out.read_text())
