"""Where a run's stage work runs: one `Engine` interface, two implementations.

    LocalEngine   here, one stage after the other (pipeline.engine=local, the default)
    RayEngine     rollout and reward actors and a Ray Train group (ray_engine.py; engine=ray)

An engine is placement only. The run's `StoredRun` (stored_run.py) calls each stage (run/stages.py:
reuse, healing, manifests) and hands it the engine's work: `sampling` gives the rollout stage its
progress tick and slice runner, `scoring` the reward stage its share runner, `training` the learner
stage its tick and rank runner (None: the stage does that work here, in this process). `init`,
`evaluate` and `base_eval` are whole stages run where the engine keeps its model (the Ray engine's
colocated placement: learner rank 0). Both engines write the same outputs
(tests/pipeline/test_ray_engine.py compares them).

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
from tempflow_core.algorithm.iteration import IterationPlan
from tempflow_core.algorithm.schedule import Schedule
from tempflow_core.run.rollout_slices import sample_slice
from tempflow_core.shards import RolloutPart

Tick = Callable[[int], None]
Bar = Callable[[int, str], ContextManager[Tick]]
Log = Callable[[str], None]


@contextlib.contextmanager
def no_bar(total: int, description: str) -> Iterator[Tick]:
    yield lambda n: None


Sampling = tuple[Tick | None, stages.SliceRunner | None]  # the rollout stage's progress and slice runner
Training = tuple[Tick | None, stages.RankRunner | None]  # the learner stage's progress and rank runner


class Engine(Protocol):
    """Where a run's stage work runs; whole stages return the URI of what they wrote."""

    def init(self, cfg: RunConfig, layout: RunLayout, sessions: SessionCache) -> str: ...

    def schedule(self, cfg: RunConfig, sessions: SessionCache) -> Schedule: ...  # the policy's grid, where it is loaded

    def sampling(self, cfg: RunConfig, layout: RunLayout, plan: IterationPlan, sessions: SessionCache,
                 bar: Bar = no_bar, log: Log | None = None) -> ContextManager[Sampling]: ...

    def scoring(self, cfg: RunConfig, layout: RunLayout, plan: IterationPlan,
                sessions: SessionCache) -> stages.ScoreRunner | None: ...

    def training(self, cfg: RunConfig, layout: RunLayout, plan: IterationPlan, sessions: SessionCache,
                 bar: Bar = no_bar) -> ContextManager[Training]: ...

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

    @contextlib.contextmanager
    def sampling(self, cfg: RunConfig, layout: RunLayout, plan: IterationPlan, sessions: SessionCache,
                 bar: Bar = no_bar, log: Log | None = None) -> Iterator[Sampling]:
        """One tick per denoising step of each slice; with reward.stream, the slices sampled here
        one after the other, each scored on a thread as soon as it is written."""
        total = cfg.sampling.num_steps * cfg.rollout.slices
        with self.hold(), bar(total, f"iter {plan.iteration} rollout") as tick:
            yield tick, (self._streaming(cfg, layout, plan.iteration, sessions, tick) if cfg.reward.stream else None)

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

    def scoring(self, cfg: RunConfig, layout: RunLayout, plan: IterationPlan,
                sessions: SessionCache) -> stages.ScoreRunner | None:
        """The streamed slices' scores when the rollout streamed them; else the stage scores here."""
        futures = self._streamed.pop((layout.run_id, plan.iteration), None)
        return (lambda: [f.result() for f in futures]) if futures else None

    @contextlib.contextmanager
    def training(self, cfg: RunConfig, layout: RunLayout, plan: IterationPlan, sessions: SessionCache,
                 bar: Bar = no_bar) -> Iterator[Training]:
        """One tick per training unit (a finished stage, reused, counts none); the update runs here."""
        units = 0 if layout.complete(plan.iteration, "learner") else plan.learner_units
        with self.hold(), bar(units, f"iter {plan.iteration} learner") as tick:
            yield tick, None

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
