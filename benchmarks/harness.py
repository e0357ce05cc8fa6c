"""What the performance scripts share: their common options, timed repeats of interleaved variants
with an untimed warm-up, and medians and ratios read from them.

Variants are timed interleaved (A, B, A, B, ...), so a busy machine biases both sides alike;
report ratios measured in one run on an idle machine, and absolute times only from a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark downloads nothing


def parser(doc: str | None, repeats: int | None = None, threads: int | None = None) -> argparse.ArgumentParser:
    """An argument parser with the options the scripts share: --threads (torch threads; default:
    torch's own count) and, for a script that repeats its timings, --repeats (timed rounds)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if repeats is not None:
        ap.add_argument("--repeats", type=int, default=repeats, help="timed rounds; medians are reported")
    ap.add_argument("--threads", type=int, default=threads, help="torch threads (default: torch's own count)")
    return ap


def set_threads(args: argparse.Namespace) -> int:
    """Apply --threads; returns the torch thread count the script runs at."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.get_num_threads()


@dataclass
class Timings:
    """Seconds of every timed round of each variant, and each variant's last result."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, slow: str, fast: str) -> float:
        """median(slow) / median(fast): how many times faster `fast` is."""
        return self.median(slow) / self.median(fast)

    def line(self, name: str) -> str:
        v = self.seconds[name]
        return f"median {self.median(name):.3f} s (min {min(v):.3f}, max {max(v):.3f}, n {len(v)})"


def interleaved(variants: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 0,
                before: Callable[[str], None] | None = None, after: Callable[[str], Any] | None = None) -> Timings:
    """Run every variant once per round, `warmup` untimed rounds then `repeats` timed ones.
    Untimed around each call: `before(name)` (clearing what the variant writes) and `after(name)`,
    whose value is the variant's result when given (reading what it wrote); else the call's own."""
    t = Timings({name: [] for name in variants})
    for round_ in range(warmup + repeats):
        for name, fn in variants.items():
            if before is not None:
                before(name)
            t0 = time.perf_counter()
            out = fn()
            if round_ >= warmup:
                t.seconds[name].append(time.perf_counter() - t0)
            t.results[name] = after(name) if after is not None else out
    return t


class TimedStages:
    """A training controller context (tempflow_core.algorithm.controller) that times each stage of
    another: `seconds[i]` holds iteration i's rollout, reward and learner seconds and their sum."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.seconds: list[dict[str, float]] = []

    def _timed(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        if stage == "rollout":
            self.seconds.append({})
        row = self.seconds[-1]
        row[stage] = time.perf_counter() - t0
        row["iteration"] = sum(v for k, v in row.items() if k != "iteration")
        return out

    def init(self) -> None:
        self.ctx.init()

    def schedule(self) -> Any:
        return self.ctx.schedule()

    def rollout(self, plan: Any) -> Any:
        return self._timed("rollout", self.ctx.rollout, plan)

    def score(self, plan: Any, rollouts: Any) -> Any:
        return self._timed("reward", self.ctx.score, plan, rollouts)

    def update(self, plan: Any, rollouts: Any, rewards: Any) -> dict[str, float]:
        return self._timed("learner", self.ctx.update, plan, rollouts, rewards)

    def evaluate(self, iteration: int) -> dict[str, Any]:
        return self.ctx.evaluate(iteration)
