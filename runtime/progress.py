"""One progress bar for the command-line tools: plain text on stderr, standard library only.

with progress_bar(total, "samples", enabled=sys.stderr.isatty()) as bar:
    bar.update(1)      # or bar.set(done); bar.total may grow or shrink on the way
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


class ProgressBar:
    """`done` of `total` units and the rate, redrawn in place; silent when not enabled."""

    def __init__(self, total: int, unit: str, enabled: bool, width: int = 30):
        self.total, self.unit, self.enabled, self.width = total, unit, enabled, width
        self.done = 0
        self._start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.set(self.done + n)

    def set(self, done: int) -> None:
        self.done = done
        if not self.enabled:
            return
        total = max(self.total, 1)
        fill = min(self.width, int(self.width * done / total))
        rate = done / max(time.perf_counter() - self._start, 1e-9)
        sys.stderr.write(
            f"\r[{'#' * fill}{'.' * (self.width - fill)}] {done}/{self.total} {self.unit}, "
            f"{rate:.2f}/s"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            sys.stderr.write("\n")
            sys.stderr.flush()


@contextmanager
def progress_bar(total: int, unit: str, *, enabled: bool | None = None) -> Iterator[ProgressBar]:
    """A bar over `total` units; `enabled` None = when stderr is a terminal."""
    bar = ProgressBar(total, unit, sys.stderr.isatty() if enabled is None else enabled)
    try:
        yield bar
    finally:
        bar.close()
