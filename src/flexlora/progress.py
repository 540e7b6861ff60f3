"""Progress of long commands on stderr: a tqdm bar on a terminal, else a plain line every ``interval``
seconds (so logs of batch jobs still show that work goes on, and how long is left).

Work is reported in phases (``[("scoring", 628), ("generating", 628)]``), each a bar of its own with its own
ETA; a phase of unknown size (``None``) shows the count and the rate. Code that does the work calls
:func:`advance`, which does nothing unless a command opened a :func:`reporting` block, so library callers
(the round loop's evaluations) are not affected.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import TextIO

from tqdm.auto import tqdm

__all__ = ["Progress", "advance", "finish_phase", "reporting"]

_current: ContextVar[Progress | None] = ContextVar("flexlora_progress", default=None)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class Progress:
    """Phases of work, each ``(description, total or None)``, counted in ``unit``.

    Args:
        enabled: False (``--no-progress``) shows nothing.
        interval: seconds between plain lines when ``stream`` is not a terminal.
    """

    def __init__(
        self,
        phases: Sequence[tuple[str, int | None]],
        unit: str = "example",
        enabled: bool = True,
        interval: float = 30.0,
        stream: TextIO | None = None,
    ):
        self.phases, self.unit, self.interval = list(phases), unit, interval
        self.stream = stream or sys.stderr
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bars, self.lines = enabled and tty, enabled and not tty
        self.index, self.bar = -1, None
        self._next_phase()

    def _next_phase(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.lines and self.index >= 0:
            self._line(final=True)
        self.index += 1
        self.done, self.start = 0, time.monotonic()
        self.last_line = self.start
        self.bar = None
        if self.index < len(self.phases):
            desc, total = self.phases[self.index]
            self.bar = tqdm(total=total, desc=desc, unit=self.unit, file=self.stream, disable=not self.bars)

    def update(self, n: int = 1) -> None:
        """Count ``n`` units done; a phase that is complete hands over to the next one."""
        if self.index >= len(self.phases):
            return
        self.done += n
        self.bar.update(n)
        now = time.monotonic()
        if self.lines and now - self.last_line >= self.interval:
            self._line()
            self.last_line = now
        total = self.phases[self.index][1]
        if total is not None and self.done >= total:
            self._next_phase()

    def _line(self, final: bool = False) -> None:
        desc, total = self.phases[self.index]
        elapsed = time.monotonic() - self.start
        count = f"{self.done}/{total}" if total is not None else f"{self.done}"
        text = f"{desc}: {count} {self.unit}s, {_clock(elapsed)} elapsed"
        if total is not None and self.done and not final:
            text += f", ETA {_clock(elapsed / self.done * (total - self.done))}"
        print(text + (" (done)" if final else ""), file=self.stream, flush=True)

    def finish_phase(self) -> None:
        """End the current phase now (one of unknown size, or one cut short)."""
        if self.index < len(self.phases):
            self._next_phase()

    def close(self) -> None:
        """Finish the current phase (its last line) and drop the rest."""
        if self.index < len(self.phases):
            if self.lines and self.done:
                self._line(final=True)
            self.bar.close()
            self.index = len(self.phases)


def advance(n: int = 1) -> None:
    """Report ``n`` units of work done to the command's :class:`Progress`, if one is open."""
    progress = _current.get()
    if progress is not None:
        progress.update(n)


def finish_phase() -> None:
    """End the current phase of the command's :class:`Progress`, if one is open."""
    progress = _current.get()
    if progress is not None:
        progress.finish_phase()


@contextlib.contextmanager
def reporting(progress: Progress) -> Iterator[Progress]:
    """Make ``progress`` the one :func:`advance` reports to while the block runs; closed at the end."""
    token = _current.set(progress)
    try:
        yield progress
    finally:
        _current.reset(token)
        progress.close()
