"""Shared checks for hostile-input tests (a plain module: ``from hostile import ...``).

:func:`run_cli` runs ``python -m flexlora.cli ...`` in a child process of the tests' own source tree and
measures that child alone (wall time, and peak RSS through ``os.wait4``). :func:`assert_refused` holds an
outcome to the CLI's error contract: the expected exit code, exactly one stderr line ``flexlora: error:
...`` and no traceback, within time and memory limits. :func:`tree_hashes` and :func:`assert_unchanged`
prove that nothing under a directory was created, changed or removed.

``FLEXLORA_HOSTILE_REPORT=1 pytest -s`` prints every case with its exit code, seconds and peak memory.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_SECONDS = 90.0  # generous: a loaded 2-core machine; a refusal normally takes about 3 s (the imports)
MAX_RSS_MB = 2048.0  # the imports alone (torch, transformers) take about 400 MB
OUTCOMES: list[tuple[str, Outcome]] = []


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mb: float


def run_cli(
    args: list[str],
    cwd: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    timeout: float = MAX_SECONDS,
    driver: str | None = None,
    label: str | None = None,
) -> Outcome:
    """Run the CLI (or ``driver``, Python code that ends by calling it) in a child process; killed after
    ``timeout`` seconds (its exit code is then -9)."""
    code = driver or "import sys; from flexlora.cli import main; sys.exit(main(sys.argv[1:]))"
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(SRC), str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], cwd=cwd, env=child_env, stdout=out, stderr=err
        )
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        out.seek(0), err.seek(0)
        outcome = Outcome(
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            seconds,
            usage.ru_maxrss / 1024,  # KiB on Linux
        )
    OUTCOMES.append((label or " ".join(args)[:80], outcome))
    return outcome


def assert_refused(
    outcome: Outcome,
    code: int,
    needle: str | None = None,
    max_seconds: float = MAX_SECONDS,
    max_rss_mb: float = MAX_RSS_MB,
) -> None:
    """Exit ``code`` with one stderr line ``flexlora: error: ...`` (containing ``needle``), no traceback, in
    bounded time and memory."""
    lines = outcome.stderr.strip().splitlines()
    context = f"exit {outcome.code}, stderr:\n{outcome.stderr[-3000:]}"
    assert "Traceback" not in outcome.stderr, context
    assert outcome.code == code, context
    assert len(lines) == 1 and lines[0].startswith("flexlora: error: "), context
    if needle is not None:
        assert needle in lines[0], context
    assert outcome.seconds < max_seconds, f"took {outcome.seconds:.1f} s"
    assert outcome.peak_rss_mb < max_rss_mb, f"peak RSS {outcome.peak_rss_mb:.0f} MB"


def tree_hashes(root: str | os.PathLike, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """``{relative path: sha256 or 'dir' or 'link -> target'}`` of everything under ``root`` (symlinks not
    followed), leaving out the top-level names in ``skip``."""
    root = Path(root)
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir.parts and rel_dir.parts[0] in skip:
            continue
        for name in dirnames + filenames:
            path, rel = Path(dirpath) / name, str(rel_dir / name)
            if rel_dir == Path(".") and name in skip:
                continue
            if path.is_symlink():
                out[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_unchanged(before: dict[str, str], root: str | os.PathLike, skip: tuple[str, ...] = ()) -> None:
    """Nothing under ``root`` was created, changed or removed since ``before = tree_hashes(root, skip)``."""
    after = tree_hashes(root, skip)
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    assert not changed, f"changed: {changed[:5]}"
    assert not before.keys() - after.keys(), f"removed: {sorted(before.keys() - after.keys())[:5]}"
    assert not after.keys() - before.keys(), f"created: {sorted(after.keys() - before.keys())[:5]}"


def report() -> str:
    """One line per case run so far, then the worst time and memory."""
    if not OUTCOMES:
        return "no hostile cases run"
    lines = [f"{o.code:>4} {o.seconds:6.1f}s {o.peak_rss_mb:7.0f}MB  {label}" for label, o in OUTCOMES]
    worst_t = max(OUTCOMES, key=lambda x: x[1].seconds)
    worst_m = max(OUTCOMES, key=lambda x: x[1].peak_rss_mb)
    lines.append(f"worst time {worst_t[1].seconds:.1f} s ({worst_t[0]})")
    lines.append(f"worst memory {worst_m[1].peak_rss_mb:.0f} MB ({worst_m[0]})")
    return "\n".join(lines)
