"""`StoredRun`: the training controller's context (algorithm/controller.py) for a run on a store.

It is the one place where a stage's caching, healing and placement meet:

    what is kept     each stage's output at its prefix of the run's layout (run/layout.py)
    reuse, healing   a finished stage is reused, a damaged or stale one recomputed (run/stages.py)
    placement        the run's engine: here (LocalEngine) or Ray actors and a Ray Train group (RayEngine),
                     which hands each stage its work (a slice, share or rank runner; None: here)

`rollout` and `score` hand on the URI of what their stage wrote; `update` returns the metrics
the learner recorded in checkpoint i, `evaluate` the stored evaluation. The Prefect flow wraps
each method in a task (flows/train.py); tests and tools call them directly.
"""

from __future__ import annotations

from typing import Any

from tempflow_core.algorithm.iteration import IterationPlan
from tempflow_core.algorithm.schedule import Schedule
from tempflow_core.algorithm.session import SessionCache
from tempflow_core.config import RunConfig
from tempflow_core.engines.engine import Bar, Engine, Log, no_bar
from tempflow_core.run import stages
from tempflow_core.run.layout import RunLayout


class StoredRun:
    """controller.Context of one run: `layout` its store and keys, `sessions` the model of this
    process (its owner drops it), `engine` where the work runs; `bar` and `log` the caller's
    progress bars and progress lines."""

    def __init__(self, cfg: RunConfig, layout: RunLayout, sessions: SessionCache, engine: Engine,
                 bar: Bar = no_bar, log: Log | None = None) -> None:
        self.cfg, self.layout, self.sessions, self.engine = cfg, layout, sessions, engine
        self.bar, self.log = bar, log

    def init(self) -> None:
        self.engine.init(self.cfg, self.layout, self.sessions)

    def schedule(self) -> Schedule:
        return self.engine.schedule(self.cfg, self.sessions)

    def rollout(self, plan: IterationPlan) -> str:
        cfg, lay, s = self.cfg, self.layout, self.sessions
        with self.engine.sampling(cfg, lay, plan, s, self.bar, self.log) as (tick, slices):
            return stages.rollout_stage(cfg, lay, plan.iteration, s, progress=tick, run_slices=slices)

    def score(self, plan: IterationPlan, rollouts: str) -> str:
        cfg, lay, s = self.cfg, self.layout, self.sessions
        return stages.reward_stage(cfg, lay, plan.iteration, s, run_scoring=self.engine.scoring(cfg, lay, plan, s))

    def update(self, plan: IterationPlan, rollouts: str, rewards: str) -> dict[str, float]:
        cfg, lay, s = self.cfg, self.layout, self.sessions
        with self.engine.training(cfg, lay, plan, s, self.bar) as (tick, ranks):
            stages.learner_stage(cfg, lay, plan.iteration, s, progress=tick, run_ranks=ranks)
        return stages.checkpoint_metrics(lay, plan.iteration)

    def evaluate(self, iteration: int) -> dict[str, Any]:
        self.engine.evaluate(self.cfg, self.layout, iteration, self.sessions)
        return stages.read_eval(self.layout, iteration)

    def base_eval(self, inputs: dict[str, str] | None = None) -> tuple[dict[str, Any], bool]:
        """The base model's evaluation, from the store's `_baselines/` or computed once and kept there."""
        return self.engine.base_eval(self.cfg, self.sessions, inputs)
