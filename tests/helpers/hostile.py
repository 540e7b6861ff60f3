"""Shared checks for hostile-input tests (``from helpers.hostile import ...``).

:func:`run_cli` runs the ``flexlora`` CLI of the tests' own source tree in its own child process (forked
from a server that paid the imports once, or a fresh interpreter) and measures that child alone (wall
time, and peak RSS through ``os.wait4``). :func:`assert_refused` holds an
outcome to the CLI's error contract: the expected exit code, exactly one stderr line ``flexlora: error:
...`` and no traceback, within time and memory limits. :func:`tree_hashes` and :func:`assert_unchanged`
prove that nothing under a directory was created, changed or removed.

``FLEXLORA_HOSTILE_REPORT=1 pytest -s`` prints every case with its exit code, seconds and peak memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
SRC = TESTS.parent / "src"
MAX_SECONDS = 240.0  # generous: measured up to 82 s for a case that loads the tiny model on a loaded machine
MAX_RSS_MB = 2048.0  # the imports alone (torch, transformers) take about 400 MB
OUTCOMES: list[tuple[str, Outcome]] = []


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mb: float


CLI = "import sys; from flexlora.cli import main; sys.exit(main(sys.argv[1:]))"
SERVER = r"""
import json, os, sys, threading, time, traceback
import flexlora.cli  # the imports (torch, transformers) are paid once; each case forks from here
protocol = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush(), sys.stderr.flush()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(req["cwd"])
            os.environ.update(req["env"])
            for fd, name in ((1, "out"), (2, "err")):
                os.dup2(os.open(req[name], os.O_WRONLY | os.O_TRUNC), fd)
            sys.argv = ["-c", *req["args"]]
            try:
                exec(compile(req["code"], "<driver>", "exec"), {"__name__": "__main__"})
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    timer = threading.Timer(req["timeout"], os.kill, (pid, 9))
    timer.start()
    _, status, usage = os.wait4(pid, 0)
    timer.cancel()
    reply = {"code": os.waitstatus_to_exitcode(status), "kib": usage.ru_maxrss, "s": time.perf_counter() - start}
    protocol.write(json.dumps(reply) + "\n")
    protocol.flush()
"""
#: runs ``argv[4:]`` as a child and reports its exit code and peak RSS. A child forked straight from the test
#: session would not do: Linux hands the forking process's RSS high-water mark to the child's ``ru_maxrss``
#: (a 2.5 GB session read as a 2.5 GB child), so the child is forked from this small launcher instead.
LAUNCHER = r"""
import json, os, subprocess, sys, threading
timeout, out, err, cmd = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
with open(out, "w") as o, open(err, "w") as e:
    proc = subprocess.Popen(cmd, stdout=o, stderr=e)
timer = threading.Timer(timeout, proc.kill)
timer.start()
_, status, usage = os.wait4(proc.pid, 0)
timer.cancel()
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "kib": usage.ru_maxrss}))
"""
_server: subprocess.Popen | None = None


def _child_env(env: dict[str, str] | None) -> dict[str, str]:
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(SRC), str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return child_env


def _fork_server() -> subprocess.Popen:
    """A process that has imported the CLI once and forks one child per case (started on first use)."""
    global _server
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            env=_child_env(None),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
    return _server


def run_cli(
    args: list[str],
    cwd: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    timeout: float = MAX_SECONDS,
    driver: str | None = None,
    label: str | None = None,
    fresh: bool = False,
) -> Outcome:
    """Run the CLI (or ``driver``, Python code that ends by calling it) in its own child process, killed
    after ``timeout`` seconds (exit code -9). By default the child is forked from a server that imported
    the CLI once (about 0.1 s instead of 3-15 s of imports per case); ``fresh`` starts a new interpreter."""
    code = driver or CLI
    cwd = str(cwd or os.getcwd())
    with tempfile.NamedTemporaryFile() as out, tempfile.NamedTemporaryFile() as err:
        if fresh:
            start = time.perf_counter()
            launcher = [sys.executable, "-c", LAUNCHER, str(timeout), out.name, err.name]
            done = subprocess.run(
                [*launcher, sys.executable, "-c", code, *args],
                cwd=cwd,
                env=_child_env(env),
                capture_output=True,
                text=True,
                check=True,
            )
            reply = json.loads(done.stdout)
            exit_code, kib = reply["code"], reply["kib"]
            seconds = time.perf_counter() - start
        else:
            server = _fork_server()
            request = {"args": args, "cwd": cwd, "env": env or {}, "code": code, "timeout": timeout}
            request |= {"out": out.name, "err": err.name}
            server.stdin.write(json.dumps(request) + "\n")
            server.stdin.flush()
            reply = json.loads(server.stdout.readline())
            exit_code, seconds, kib = reply["code"], reply["s"], reply["kib"]
        outcome = Outcome(
            exit_code,
            Path(out.name).read_text(errors="replace"),
            Path(err.name).read_text(errors="replace"),
            seconds,
            kib / 1024,  # ru_maxrss is in KiB on Linux
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
