"""Where a run's stage outputs live on the object store, and which of them are finished.

    {run}/init/learner/           the initial adapter (checkpoint -1)
    {run}/iter-000003/{stage}/    rollout, reward, advantages, learner, eval of iteration 3

A stage is finished when its manifest exists (the manifest is written last); the reward
stage, whose scores sit beside the rollouts, when its scores are complete.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tempflow_core.config import RunConfig
from tempflow_core.shards import read_manifest, scores_complete
from tempflow_core.storage import ObjectStore, join_key, open_store

STAGES = ("rollout", "reward", "learner", "eval")
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")  # one path segment: no '/', never '.' or '..'


def check_run_id(run_id: str) -> str:
    """`run_id` when it is a single safe name; else ValueError in one line naming it and the rule."""
    if not isinstance(run_id, str) or not RUN_ID.match(run_id) or ".." in run_id:
        raise ValueError(f"run id {run_id!r} is not a single safe name; fix: use letters, digits, '.', '_' and '-' "
                         "(starting with a letter or digit, at most 200 characters, no '/' and no '..')")
    return run_id


def open_run_store(cfg: RunConfig) -> ObjectStore:
    """The object store named by cfg.pipeline.store (and its S3 endpoint, when set)."""
    opts = {"endpoint_url": cfg.pipeline.s3_endpoint_url} if cfg.pipeline.s3_endpoint_url else {}
    return open_store(cfg.pipeline.store, **opts)


@dataclass(frozen=True)
class RunLayout:
    """The prefixes of one run's stage outputs on one store."""

    store: ObjectStore
    run_id: str

    def __post_init__(self) -> None:
        check_run_id(self.run_id)  # a run is one folder of the store, never a path out of it

    @classmethod
    def open(cls, cfg: RunConfig, run_id: str) -> RunLayout:
        """The layout of run `run_id` on the store cfg.pipeline names."""
        return cls(open_run_store(cfg), run_id)

    def iteration_prefix(self, iteration: int) -> str:
        return join_key(self.run_id, f"iter-{iteration:06d}")

    def prefix(self, iteration: int, stage: str) -> str:
        if stage == "learner" and iteration < 0:
            return join_key(self.run_id, "init", "learner")
        return join_key(self.iteration_prefix(iteration), stage)

    def uri(self, iteration: int, stage: str) -> str:
        return self.store.uri_for(self.prefix(iteration, stage))

    def complete(self, iteration: int, stage: str) -> bool:
        if stage == "reward":
            return scores_complete(self.store, self.iteration_prefix(iteration), "reward")
        return read_manifest(self.store, self.prefix(iteration, stage)) is not None

    def last_finished(self, iterations: int, stage: str = "learner") -> int | None:
        """The last of iterations 0..iterations-1 whose `stage` is finished (None: none is).
        With the default stage: the last checkpoint to evaluate or export."""
        done = [i for i in range(iterations) if self.complete(i, stage)]
        return done[-1] if done else None
