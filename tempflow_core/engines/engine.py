"""Where a run's stage work runs: one `Engine` interface, two implementations.

    LocalEngine   here, one stage after the other (pipeline.engine=local, the default)
    RayEngine     rollout and reward actors and a Ray Train group (ray_engine.py; engine=ray)

The flow builds the engine once (flows/train.py); the run's `StoredRun` (stored_run.py) calls
`init`, `schedule`, `rollout`, `score`, `update` and `evaluate` on whichever it holds. Both run the same stages (stages.py): the prefixes,
manifests, healing and resume are the same, and so are the outputs (tests/pipeline/
test_ray_engine.py compares them).

`bar(total, description)` is the caller's progress bar (a context manager yielding a tick
function; tasks/stages.py opens a tqdm bar on a terminal); each engine says how many ticks
its stage makes (local: denoising steps and training units; Ray: finished slices). `log`
gets the engine's progress lines (a Prefect run logger).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, ContextManager, Iterator, Protocol

from tempflow_core.run import stages
from tempflow_core.config import RunConfig
from tempflow_core.run.layout import RunLayout
from tempflow_core.algorithm.session import SessionCache
from tempflow_core.algorithm.iteration import plan_iteration
from tempflow_core.algorithm.schedule import Schedule
from tempflow_core.run.rollout_slices import sample_slice
from tempflow_core.shards import RolloutPart

Tick = Callable[[int], None]
Bar = Callable[[int, str], ContextManager[Tick]]
Log = Callable[[str], None]


@contextlib.contextmanager
def no_bar(total: int, description: str) -> Iterator[Tick]:
    yield lambda n: None


class Engine(Protocol):
    """The work of a run's stages; each stage call returns the URI of what the stage wrote."""

    def init(self, cfg: RunConfig, layout: RunLayout, sessions: SessionCache) -> str: ...

    def schedule(self, cfg: RunConfig, sessions: SessionCache) -> Schedule: ...  # the policy's grid, where it is loaded

    def rollout(self, cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache,
                bar: Bar = no_bar, log: Log | None = None) -> str: ...

    def score(self, cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache) -> str: ...

    def update(self, cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache,
               bar: Bar = no_bar) -> str: ...

    def evaluate(self, cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache) -> str: ...

    def base_eval(self, cfg: RunConfig, sessions: SessionCache,
                  inputs: dict[str, str] | None = None) -> tuple[dict[str, Any], bool]: ...

    def close(self) -> None: ...


class LocalEngine:
    """The stages in this process. `hold()` is held around the GPU-bound work (rollout and
    update): the flow passes a slot of Prefect's global concurrency limit for the GPU when one
    is configured (pipeline.gpu_limit). With reward.stream, each rollout slice is scored on a
    thread of its own as soon as it is written, while the next slice is sampled; the reward
    stage then waits for the last slice's scores and writes what it would have computed."""

    def __init__(self, hold: Callable[[], ContextManager[object]] = contextlib.nullcontext) -> None:
        self.hold = hold
        self._pool: ThreadPoolExecutor | None = None
        self._streamed: dict[tuple[str, int], list[Future]] = {}  # (run, iteration) -> each slice's scores

    def init(self, cfg: RunConfig, layout: RunLayout, sessions: SessionCache) -> str:
        return stages.init_stage(cfg, layout, sessions)

    def schedule(self, cfg: RunConfig, sessions: SessionCache) -> Schedule:
        return sessions.get(cfg).schedule

    def rollout(self, cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache,
                bar: Bar = no_bar, log: Log | None = None) -> str:
        total = cfg.sampling.num_steps * cfg.rollout.slices
        with self.hold(), bar(total, f"iter {iteration} rollout") as tick:
            runner = self._streaming(cfg, layout, iteration, sessions, tick) if cfg.reward.stream else None
            return stages.rollout_stage(cfg, layout, iteration, sessions, progress=tick, run_slices=runner)

    def _streaming(self, cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache,
                   tick: Tick) -> stages.SliceRunner:
        """Sample the slices one after the other here, handing each written slice to the scoring thread."""

        def run(indices: list[int]) -> list[RolloutPart]:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tempflow-reward")
            futures: list[Future] = []
            self._streamed[(layout.run_id, iteration)] = futures
            parts = []
            for j in indices:
                parts.append(sample_slice(cfg, layout, iteration, j, sessions, tick))
                futures.append(self._pool.submit(stages.score_part, cfg, layout, iteration, parts[-1],
                                                 sessions.get(cfg).reward_fn))
            return parts

        return run

    def score(self, cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache) -> str:
        futures = self._streamed.pop((layout.run_id, iteration), None)
        run_scoring = (lambda: [f.result() for f in futures]) if futures else None
        return stages.reward_stage(cfg, layout, iteration, sessions, run_scoring=run_scoring)

    def update(self, cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache,
               bar: Bar = no_bar) -> str:
        # the session the stage loads anyway; a finished stage (reused) loads nothing and counts nothing
        units = 0 if layout.complete(iteration, "learner") else \
            plan_iteration(cfg, sessions.get(cfg).schedule, iteration).learner_units
        with self.hold(), bar(units, f"iter {iteration} learner") as tick:
            return stages.learner_stage(cfg, layout, iteration, sessions, progress=tick)

    def evaluate(self, cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache) -> str:
        with self.hold():
            return stages.eval_stage(cfg, layout, iteration, sessions)

    def base_eval(self, cfg: RunConfig, sessions: SessionCache,
                  inputs: dict[str, str] | None = None) -> tuple[dict[str, Any], bool]:
        """The base model's evaluation: read from the store's `_baselines/`, else computed once (the
        model is loaded only then) and kept there."""
        from tempflow_core.run.baseline import base_evaluation
        from tempflow_core.run.layout import open_run_store

        with self.hold():
            return base_evaluation(cfg, open_run_store(cfg), lambda: sessions.get(cfg), inputs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._streamed.clear()
