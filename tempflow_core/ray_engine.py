"""The Ray engine (pipeline.engine=ray): where a stage's work runs, nothing else.

    rollout   `rollout.workers` actors, each with its model resident across iterations; the
              stage's slices (rollout_slices.py) are handed out to them, each actor loads
              checkpoint i-1's LoRA from the store and writes its slice's shards itself; the
              stage merges the parts into one manifest, written last.
    reward    `reward.workers` actors, the reward loaded once per actor (GPU rewards ask Ray
              for a GPU); each scores shards r, r+W, ... of the stage.
    learner   Ray Train's TorchTrainer, `train.workers` ranks (gloo on CPU, NCCL on GPU), started
              once per run and resident (its fit() runs in a thread of the driver); each
              learner stage hands every rank the iteration through a Ray queue, each rank runs
              stages.learner_rank on its share of the shards; rank 0 writes the checkpoint.

Stage prefixes, manifests and resume are those of the local engine (stages.py takes the
runners below as hooks). A killed actor is restarted by Ray and its task retried; a learner
group that dies under a stage is started anew and reruns the stage's update from checkpoint
i-1, which gives the same result. Ray is imported here only: `tempflow train` on the local engine never needs it. The engine
connects to the cluster at `address` (flows/ray_head.py: RAY_ADDRESS, or a local head on
127.0.0.1 that ends with the run's process).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import failpoints
from .config import RunConfig
from .layout import RunLayout
from .session import SessionCache
from .shards import RolloutPart
from .stages import DAMAGED_INPUT, ScoredShare, learner_rank, score_share
from .rollout_slices import sample_slice

log = logging.getLogger("tempflow.ray")

ACTOR_RESTARTS = 3  # a killed actor comes back this many times; its task is retried as often


# Variables of the driver that its actors and ranks see too: the torch thread count of a worker
# and the test failpoints (tempflow_core.failpoints).
FORWARDED_ENV = ("TEMPFLOW_WORKER_THREADS", failpoints.ENV)

# What a surviving rank raises when a peer died under a collective: gloo and NCCL errors
# (torch.distributed's DistError family, or their text where a backend raises RuntimeError) and
# Ray's own actor-death errors. Such a failure restarts the group; any other error fails the stage.
PEER_LOST = ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError", "Connection closed by peer",
             "Connection reset by peer", "Broken pipe", "Socket Timeout", "Timed out", "NCCL", "ActorDiedError",
             "RayActorError", "ActorUnavailableError")


def _forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k, "").strip()}


def _enter(cwd: str, env: dict[str, str] | None = None) -> None:
    """Work in the driver's folder when this node has it, so that relative paths of the config
    (model.path, prompt files, a local store) name what they name for the driver. On another
    machine they must be absolute or remote (s3://)."""
    import torch

    os.environ.update(env or {})
    if os.path.isdir(cwd):
        os.chdir(cwd)
    torch.set_num_threads(int(os.environ.get("TEMPFLOW_WORKER_THREADS", "").strip() or "1"))


def peer_lost(exc: BaseException) -> bool:
    """Whether `exc` (or an exception in its chain) is what a rank raises when a peer died."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = f"{type(e).__name__}: {e}"
        if any(p in text for p in PEER_LOST):
            return True
        e = e.__cause__ or e.__context__
    return False


class _RolloutWorker:
    """One rollout actor: a SessionCache (the model stays loaded across iterations)."""

    def __init__(self, cwd: str) -> None:
        _enter(cwd)
        self.sessions = SessionCache()

    def sample(self, cfg: RunConfig, run_id: str, iteration: int, index: int) -> RolloutPart:
        return sample_slice(cfg, RunLayout.open(cfg, run_id), iteration, index, self.sessions)

    def pid(self) -> int:
        return os.getpid()


class _RewardWorker:
    """One reward actor: the reward built once (a reward model loaded once)."""

    def __init__(self, cfg: RunConfig, cwd: str) -> None:
        from .rewards import build_reward

        _enter(cwd)
        self.reward_fn = build_reward(cfg.reward.name, cfg.reward.weights, cfg.reward.options)

    def score(self, cfg: RunConfig, run_id: str, iteration: int, rank: int, world: int) -> ScoredShare:
        return score_share(cfg, RunLayout.open(cfg, run_id), iteration, rank, world, self.reward_fn)


def _learner_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: a resident learner rank. It keeps its model across
    iterations and runs one learner stage per job it takes from its queue, (cfg, run_id,
    iteration), answering (rank, iteration, None) or (rank, iteration, RankError); None ends it."""
    import traceback

    import ray.train

    _enter(config["cwd"], config.get("env"))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    sessions = SessionCache()
    while (job := config["jobs"][rank].get()) is not None:
        cfg, run_id, iteration = job
        failpoints.hit(f"learner.job/rank{rank}")
        try:
            learner_rank(cfg, RunLayout.open(cfg, run_id), iteration, sessions, rank, world)
            config["done"].put((rank, iteration, None))
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which raises it in the stage
            damaged = exc if isinstance(exc, DAMAGED_INPUT) else None
            config["done"].put((rank, iteration, RankError(traceback.format_exc(limit=8), damaged, peer_lost(exc))))
            raise


@dataclass(frozen=True)
class RankError:
    """What a learner rank reports of a failed stage."""

    traceback: str
    damaged: Exception | None  # the exception itself when it is a damaged input (the stage heals those)
    peer_lost: bool  # raised because another rank died under a collective (the group is restarted)


def _uses_gpu(cfg: RunConfig) -> bool:
    import torch

    return cfg.model.device.startswith("cuda") or (cfg.model.device == "auto" and torch.cuda.is_available())


class RayEngine:
    """The Ray side of one flow run: the connection, the run's actors and its learner group;
    `close` ends them and disconnects (the cluster itself is the caller's: flows/ray_head.py)."""

    def __init__(self, cfg: RunConfig, address: str | None = None) -> None:
        """Connect to the cluster at `address` (None: the one this process is connected to)
        and start the run's actors."""
        import ray

        self.cfg = cfg
        self._connected = not ray.is_initialized()
        if self._connected:
            if address is None:
                raise ValueError("RayEngine needs the address of a Ray cluster (flows.ray_head.ray_cluster)")
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        gpu = 1 if _uses_gpu(cfg) else 0
        opts = dict(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS, num_cpus=1, num_gpus=gpu)
        env = {"runtime_env": {"env_vars": _forwarded_env()}}
        self.cwd = os.getcwd()
        self.rollout_workers = [ray.remote(**opts)(_RolloutWorker).options(**env).remote(self.cwd)
                                for _ in range(cfg.rollout.workers)]
        self.reward_workers = [ray.remote(**opts)(_RewardWorker).options(**env).remote(cfg, self.cwd)
                               for _ in range(cfg.reward.workers)]
        self._storage = tempfile.mkdtemp(prefix="tempflow-raytrain-")
        self._group: dict[str, Any] | None = None  # the resident learner group (_learner_group)
        self._groups_started = 0
        self._last_group_error: str | None = None

    @staticmethod
    def cpus_needed(cfg: RunConfig) -> int:
        """Logical CPUs the run holds at once: one per actor while it lives, plus the learner's ranks."""
        return cfg.rollout.workers + cfg.reward.workers + cfg.train.workers

    def rollout_runner(self, cfg: RunConfig, run_id: str, iteration: int,
                       progress: Callable[[int], None] | None = None,
                       report: Callable[[str], None] | None = None) -> Callable[[list[int]], list[RolloutPart]]:
        """stages.SliceRunner: slices handed to the rollout actors as they free up; `progress`
        ticks once per finished slice and `report` gets a line for it (the Prefect log)."""
        from ray.util import ActorPool

        def run(indices: list[int]) -> list[RolloutPart]:
            pool = ActorPool(self.rollout_workers)
            parts, t0 = [], time.perf_counter()
            for part in pool.map_unordered(lambda a, j: a.sample.remote(cfg, run_id, iteration, j), indices):
                parts.append(part)
                line = (f"iteration {iteration}: rollout slice {part.index + 1}/{len(indices)} written "
                        f"({part.num_samples} samples, {len(parts)}/{len(indices)} done, "
                        f"{time.perf_counter() - t0:.1f} s)")
                (report or log.info)(line)
                if progress is not None:
                    progress(1)
            return sorted(parts, key=lambda p: p.index)

        return run

    def reward_runner(self, cfg: RunConfig, run_id: str, iteration: int) -> Callable[[], list[ScoredShare]]:
        """stages.ScoreRunner: every reward actor scores its share of the shards."""
        import ray

        def run() -> list[ScoredShare]:
            W = len(self.reward_workers)
            return ray.get([w.score.remote(cfg, run_id, iteration, r, W) for r, w in enumerate(self.reward_workers)])

        return run

    def learner_runner(self, cfg: RunConfig, run_id: str, iteration: int) -> Callable[[], None]:
        """stages.RankRunner: the run's resident Ray Train group (started at the first learner
        stage) runs this stage; a group that died is started anew and given the stage again."""

        def run() -> None:
            for attempt in range(ACTOR_RESTARTS + 1):
                group = self._learner_group(cfg)
                for q in group["jobs"]:
                    q.put((cfg, run_id, iteration))
                answers = self._await_ranks(group, iteration)
                errors = [e for e in answers.values() if e is not None]
                damaged = next((e.damaged for e in errors if e.damaged is not None), None)
                if damaged is not None:  # learner_stage heals its inputs and runs the stage again (a new group)
                    self._stop_learner_group()
                    raise damaged
                if len(answers) < len(group["jobs"]) or any(e.peer_lost for e in errors):
                    # a rank died (or lost a peer) under the stage: a new group reruns it from checkpoint i-1
                    log.warning("iteration %d: a learner rank died during the stage (attempt %d, %d of %d ranks "
                                "answered); restarting the group", iteration, attempt + 1, len(answers),
                                len(group["jobs"]))
                    if errors:
                        self._last_group_error = errors[0].traceback[-2000:]
                    self._stop_learner_group()
                    continue
                if errors:
                    raise RuntimeError(f"learner rank failed in iteration {iteration}:\n{errors[0].traceback}")
                return
            raise RuntimeError(f"the learner group kept failing in iteration {iteration}: "
                               f"{self._last_group_error or 'no rank reported an error'}")

        return run

    def _learner_group(self, cfg: RunConfig) -> dict[str, Any]:
        """The resident TorchTrainer of train.workers ranks, its fit() running in a thread."""
        if self._group is not None and self._group["thread"].is_alive():
            return self._group
        from ray.train import FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
        from ray.util.queue import Queue

        gpu = _uses_gpu(cfg)
        jobs, done = [Queue() for _ in range(cfg.train.workers)], Queue()
        self._groups_started += 1
        trainer = TorchTrainer(
            _learner_loop, train_loop_config={"jobs": jobs, "done": done, "cwd": self.cwd, "env": _forwarded_env()},
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=gpu, resources_per_worker={"CPU": 1}),
            run_config=TrainRunConfig(name=f"learner-{os.getpid()}-{self._groups_started}", storage_path=self._storage,
                                      failure_config=FailureConfig(max_failures=0)),
        )
        outcome: dict[str, Any] = {}

        def fit() -> None:
            try:
                trainer.fit()
            except Exception as exc:  # noqa: BLE001 - the waiting stage sees the thread end
                outcome["error"] = exc

        thread = threading.Thread(target=fit, name="ray-train-learner", daemon=True)
        thread.start()
        self._group = {"jobs": jobs, "done": done, "thread": thread, "outcome": outcome}
        return self._group

    def _await_ranks(self, group: dict[str, Any], iteration: int) -> dict[int, RankError | None]:
        """Each rank's answer for `iteration` (None: it finished), until every rank answered or
        the group ended (then the ranks that died are missing)."""
        from ray.util.queue import Empty

        answers: dict[int, RankError | None] = {}
        while len(answers) < len(group["jobs"]):
            try:
                rank, it, error = group["done"].get(timeout=2.0)
            except Empty:
                if not group["thread"].is_alive():  # a rank that died or failed took the group down with it
                    return answers
                continue
            except Exception:  # noqa: BLE001 - the queue's actor died with its node: the group is lost too
                return answers
            if it == iteration:
                answers[rank] = error
        return answers

    def _stop_learner_group(self) -> None:
        group, self._group = self._group, None
        if group is None:
            return
        if "error" in group["outcome"]:
            self._last_group_error = repr(group["outcome"]["error"])[:2000]
        if group["thread"].is_alive():
            for q in group["jobs"]:
                q.put(None)
            group["thread"].join(timeout=120)
        for q in group["jobs"] + [group["done"]]:
            q.shutdown(force=True)

    def close(self) -> None:
        import ray

        self._stop_learner_group()
        for a in self.rollout_workers + self.reward_workers:
            ray.kill(a)
        self.rollout_workers, self.reward_workers = [], []
        shutil.rmtree(self._storage, ignore_errors=True)
        if self._connected:
            ray.shutdown()

    def __enter__(self) -> "RayEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
