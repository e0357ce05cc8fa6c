"""Where a run's outputs live on the object store, and which of them are finished: every key of
a run is formatted (and parsed) here, nowhere else.

    {run}/run.json                the run's record (runs.py)
    {run}/lock.json               the writer's lock (runlock.py)
    {run}/prompts/train.jsonl     the prompt set the run trained on
    {run}/best.json               the best evaluation so far (the tracking hooks)
    {run}/init/learner/           the initial adapter (checkpoint -1)
    {run}/iter-000003/{stage}/    rollout, reward, advantages, learner, eval of iteration 3
    {run}/iter-000003/mlflow.json what was logged to MLflow for iteration 3 (mlflow-eval.json: its evaluation)
    {run}/quarantine/iter-000003/{stage}/01/   a damaged output moved aside (healing.py)

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
RUN_FILE = "run.json"
LOCK_FILE = "lock.json"
QUARANTINE = "quarantine"
_ITERATION = re.compile(r"^iter-(\d{6,})$")
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

    @staticmethod
    def iteration_name(iteration: int) -> str:
        """"iter-000003": the folder of iteration 3 (and the name of its MLflow child run)."""
        return f"iter-{int(iteration):06d}"

    @staticmethod
    def iteration_of(key: str) -> int | None:
        """The iteration whose folder holds `key` ("{run}/iter-000003/eval/eval.json" -> 3); None
        for a key outside every iteration (run.json, init/, quarantine/)."""
        parts = key.split("/")
        m = _ITERATION.match(parts[1]) if len(parts) > 1 else None
        return int(m.group(1)) if m else None

    @staticmethod
    def runs(store: ObjectStore) -> list[str]:
        """The run ids of `store`: the top-level folders holding a run record."""
        names = [e.rstrip("/") for e in store.entries("", limit=1_000_000) if e.endswith("/")]
        return [n for n in names if RUN_ID.match(n) and store.exists(join_key(n, RUN_FILE))]

    def iteration_prefix(self, iteration: int) -> str:
        """The folder of iteration i's stages (the reward and advantages scores are written by name under it)."""
        return join_key(self.run_id, self.iteration_name(iteration))

    def prefix(self, iteration: int, stage: str) -> str:
        if stage == "learner" and iteration < 0:
            return join_key(self.init_prefix, "learner")
        return join_key(self.iteration_prefix(iteration), stage)

    @property
    def init_prefix(self) -> str:
        return join_key(self.run_id, "init")

    @property
    def record_key(self) -> str:
        return join_key(self.run_id, RUN_FILE)

    @property
    def lock_key(self) -> str:
        return join_key(self.run_id, LOCK_FILE)

    @property
    def prompts_key(self) -> str:
        return join_key(self.run_id, "prompts", "train.jsonl")

    @property
    def best_key(self) -> str:
        return join_key(self.run_id, "best.json")

    def tracked_key(self, iteration: int, evaluation: bool = False) -> str:
        """The marker of what was logged to MLflow for iteration i (or for its evaluation)."""
        return join_key(self.iteration_prefix(iteration), "mlflow-eval.json" if evaluation else "mlflow.json")

    def quarantine_prefix(self, iteration: int, stage: str) -> str:
        """Where damaged outputs of (iteration, stage) are moved aside, one numbered folder each."""
        rel = self.prefix(iteration, stage)[len(self.run_id) + 1:]  # "iter-000001/rollout" or "init/learner"
        return join_key(self.run_id, QUARANTINE, rel)

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
