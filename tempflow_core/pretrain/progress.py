"""How a pretraining run reports on itself: wall time per phase, the time budget, progress
lines on stderr, and a metrics callback (the flow sends it to MLflow)."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, Iterator

LogFn = Callable[[int, dict[str, Any]], None]
"""log(step, metrics): called during training and at every evaluation."""


class Clock:
    """Seconds since the run started, the deadline of ``max_minutes``, and per-phase seconds.

    Wall time is the one thing of a run that is not deterministic: only the stopping step of
    a run with a time budget depends on it.
    """

    def __init__(self, max_minutes: float | None, progress: bool = False, log: LogFn | None = None) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + 60 * max_minutes if max_minutes else None
        self.phase_s: dict[str, float] = {}  # render, vae, encode, transformer, eval, final_eval
        self.progress = progress
        self._log = log

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name``."""
        t0 = time.perf_counter()
        yield
        self.phase_s[name] = time.perf_counter() - t0

    def say(self, msg: str) -> None:
        """A progress line on stderr (only with progress on)."""
        if self.progress:
            print(f"[pretrain {self.elapsed():7.1f}s] {msg}", file=sys.stderr, flush=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Metrics to the run's callback, if any."""
        if self._log is not None:
            self._log(step, metrics)
