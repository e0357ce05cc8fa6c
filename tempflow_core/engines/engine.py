"""Where a run's stage work runs: one `Engine` interface, two implementations.

    LocalEngine   here, one stage after the other (pipeline.engine=local, the default)
    RayEngine     rollout and reward actors and a Ray Train group (ray_engine.py; engine=ray)

The flow builds the engine once (flows/train.py) and the stage tasks call `rollout`, `score`
and `update` on whichever they hold. Both run the same stages (stages.py): the prefixes,
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
from typing import Callable, ContextManager, Iterator, Protocol

from tempflow_core.run import stages
from tempflow_core.config import RunConfig
from tempflow_core.run.layout import RunLayout
from tempflow_core.algorithm.session import SessionCache
from tempflow_core.algorithm.steps import select_steps, step_pool
from tempflow_core.run.rollout_slices import sample_slice
from tempflow_core.shards import RolloutPart

Tick = Callable[[int], None]
Bar = Callable[[int, str], ContextManager[Tick]]
Log = Callable[[str], None]


@contextlib.contextmanager
def no_bar(total: int, description: str) -> Iterator[Tick]:
    yield lambda n: None


class Engine(Protocol):
    """The work of a run's stages; each call returns the URI of what the stage wrote."""

    def rollout(self, cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache,
                bar: Bar = no_bar, log: Log | None = None) -> str: ...

    def score(self, cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache) -> str: ...

    def update(self, cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache,
               bar: Bar = no_bar) -> str: ...

    def close(self) -> None: ...


def update_units(cfg: RunConfig, iteration: int) -> int:
    """Training units of iteration i's update: one per branch point (branching), else one per
    trained step of each trajectory; times the inner epochs."""
    T, B = cfg.sampling.num_steps, cfg.rollout.prompts_per_iter
    if cfg.branching:
        draw, spec = cfg.rollout.branch_draw, cfg.rollout.branch_steps
        # a weighted draw needs the model's schedule: count its m draws, at most that many distinct steps
        units = B * (int(spec) if draw == "weighted" else len(select_steps(spec, T, cfg.train.seed, iteration, draw)))
    else:
        units = B * cfg.rollout.group_size * len(step_pool(cfg.train.train_steps, T))
    return units * cfg.train.inner_epochs


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
        with self.hold(), bar(update_units(cfg, iteration), f"iter {iteration} learner") as tick:
            return stages.learner_stage(cfg, layout, iteration, sessions, progress=tick)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._streamed.clear()
