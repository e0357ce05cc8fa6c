"""The Ray engine (pipeline.engine=ray), an implementation of engine.Engine: where a stage's
work runs, nothing else. Two placements (pipeline.placement):

    separate   rollout: `rollout.workers` actors, each with its model resident across
               iterations; the stage's slices (rollout_slices.py) are handed out to them, each
               actor loads checkpoint i-1's LoRA from the store and writes its slice's shards
               itself; the stage merges the parts into one manifest, written last.
               learner: Ray Train's TorchTrainer, `train.workers` ranks (gloo on CPU, NCCL on
               GPU), started once per run and resident (its fit() runs in a thread of the
               driver); each learner stage hands every rank the iteration through a Ray queue,
               each rank runs stages.learner_rank on its share of the shards; rank 0 writes the
               checkpoint. A rollout actor also writes the initial adapter and runs the
               evaluations, on the model it holds. The driver builds no model.
    colocated  the learner's ranks are the only model workers (one copy of the model each, the
               default when the workers use GPUs): the rollout's slices go to them (slice j to
               rank j mod W), then the update; rank 0 writes the initial adapter and runs the
               evaluations. The driver builds no model. Switching between sampling and training
               is a LoRA load from the store (the session keeps one transformer).

    reward     `reward.workers` actors in both, the reward loaded once per actor (a GPU only for a
               reward that runs a model: RewardRegistry.needs_gpu); each scores shards r, r+W, ...

Stage prefixes, manifests and resume are those of the local engine (the run's StoredRun calls the
same stages, handing them the runners below as their work). A killed actor is restarted by Ray and its task retried; a learner
group that dies under a job (an update, or in the colocated placement any job) is started anew
and reruns it, which gives the same result. Ray is imported here only: `tempflow train` on the local engine never needs it. The engine
connects to the cluster at `address` (flows/ray_head.py: RAY_ADDRESS, or a local head on
127.0.0.1 that ends with the run's process).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from tempflow_core import failpoints

from tempflow_core.run import stages
from tempflow_core.config import RunConfig
from tempflow_core.engines.engine import Bar, Log, Sampling, Training, no_bar
from tempflow_core.run.layout import RunLayout
from tempflow_core.run.preflight import PreflightError, local_paths
from tempflow_core.rewards import RewardRegistry
from tempflow_core.algorithm.data_parallel import peer_lost
from tempflow_core.algorithm.iteration import IterationPlan
from tempflow_core.algorithm.schedule import Schedule
from tempflow_core.algorithm.session import SessionCache
from tempflow_core.shards import RolloutPart
from tempflow_core.run.stages import DAMAGED_INPUT, ScoredShare, ScoreRunner, learner_rank, score_part, score_share
from tempflow_core.run.rollout_slices import sample_slice

log = logging.getLogger("tempflow.ray")

ACTOR_RESTARTS = 3  # a killed actor comes back this many times; its task is retried as often
UNREACHABLE_S = 180.0  # how long a task waits for its actor to be reachable again (a node's death to be seen)


# Variables of the driver that its actors and ranks see too: the torch thread count of a worker
# and the test failpoints (tempflow_core.failpoints).
FORWARDED_ENV = ("TEMPFLOW_WORKER_THREADS", failpoints.ENV)

def _forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k, "").strip()}


def _enter(home: tuple[str, str], env: dict[str, str] | None = None) -> None:
    """On the driver's node (home: its Ray node id and working folder) work in the driver's folder,
    so that relative paths of the config (model.path, prompt files, a local store) name what they
    name for the driver. Elsewhere stay in the node's own folder: paths must be absolute or remote
    there (flows.ray_head.ray_preflight refuses relative ones when the run joins a cluster)."""
    import ray
    import torch

    os.environ.update(env or {})
    node, cwd = home
    if ray.get_runtime_context().get_node_id() == node and os.path.isdir(cwd):
        os.chdir(cwd)
    torch.set_num_threads(int(os.environ.get("TEMPFLOW_WORKER_THREADS", "").strip() or "1"))


class _RolloutWorker:
    """One rollout actor: a SessionCache (the model stays loaded across iterations)."""

    def __init__(self, home: tuple[str, str]) -> None:
        _enter(home)
        self.sessions = SessionCache()

    def sample(self, cfg: RunConfig, run_id: str, iteration: int, index: int) -> RolloutPart:
        return sample_slice(cfg, RunLayout.open(cfg, run_id), iteration, index, self.sessions)

    def job(self, kind: str, cfg: RunConfig, run_id: str, iteration: int, arg: Any = None) -> Any:
        """A whole stage on this actor's model (separate placement): the initial adapter, an
        evaluation, the base model's evaluation, or the policy's grid (_run_job)."""
        return _run_job(kind, cfg, RunLayout.open(cfg, run_id), iteration, arg, self.sessions, 0, 1)

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        return _node_id()


class _RewardWorker:
    """One reward actor: the reward built once (a reward model loaded once)."""

    def __init__(self, cfg: RunConfig, home: tuple[str, str]) -> None:
        _enter(home)
        self.reward_fn = RewardRegistry.for_config(cfg.reward).build(cfg.reward.name, cfg.reward.weights,
                                                                     cfg.reward.options)

    def score(self, cfg: RunConfig, run_id: str, iteration: int, rank: int, world: int) -> ScoredShare:
        return score_share(cfg, RunLayout.open(cfg, run_id), iteration, rank, world, self.reward_fn)

    def score_part(self, cfg: RunConfig, run_id: str, iteration: int, part: RolloutPart) -> ScoredShare:
        return score_part(cfg, RunLayout.open(cfg, run_id), iteration, part, self.reward_fn)

    def node(self) -> str:
        return _node_id()


def _on_actors(actors: list[Any], calls: list[Callable[[Any], Any]], done: Callable[[int, Any], None]) -> None:
    """Run every call (actor -> ObjectRef) on the actors, each call on the next free actor, and
    give each result to `done` (with the call's index) as it comes. A call whose actor died or became unreachable under
    it (the actor's node died) runs again on the next free actor, which Ray restarts
    (max_restarts) if it was the dead one, up to ACTOR_RESTARTS times per call; any other error is raised."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError

    todo, tries = list(range(len(calls))), [0] * len(calls)
    unreachable_since: dict[int, float] = {}
    free, running = list(actors), {}
    while todo or running:
        while todo and free:
            actor, i = free.pop(0), todo.pop(0)
            running[calls[i](actor)] = (actor, i)
        ready, _ = ray.wait(list(running), num_returns=1)
        actor, i = running.pop(ready[0])
        free.append(actor)
        try:
            result = ray.get(ready[0])
        except ActorUnavailableError:  # restarting, or its node is not yet known dead: wait, bounded
            first = unreachable_since.setdefault(i, time.monotonic())
            if time.monotonic() - first > UNREACHABLE_S:
                raise
            time.sleep(1.0)
            todo.append(i)
            continue
        except RayActorError as e:  # died under the task (ActorDiedError): Ray restarts it
            tries[i] += 1
            if tries[i] > ACTOR_RESTARTS:
                raise
            log.warning("an actor died under its task (%s); running the task again", type(e).__name__)
            todo.append(i)
            continue
        done(i, result)


def check_nodes_see(cfg: RunConfig, home: tuple[str, str], timeout: float = 120.0) -> None:
    """Raise PreflightError naming the first setting of `cfg` (preflight.local_paths: model folder,
    prompt files, reward model folders, a local store) that a node other than the driver's
    (`home`) cannot see from its workers' folder: relative paths there are relative to that
    folder, and absolute ones must be on a folder every node shares."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    paths = local_paths(cfg)
    others = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != home[0]]
    if not paths or not others:
        return

    def missing(paths: list[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]]:
        return os.getcwd(), [(f, p) for f, p in paths if not os.path.exists(os.path.expanduser(p))]

    probe = ray.remote(num_cpus=0, max_retries=0)(missing)
    refs = {n: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(paths)
            for n in others}
    for node, ref in refs.items():
        cwd, gone = ray.get(ref, timeout=timeout)
        if gone:
            field, path = gone[0]
            raise PreflightError(field, f"{path!r} is not there on Ray node {node[:12]} (its workers run in {cwd})",
                                 "give a path every node can read (absolute, on a folder the nodes share) or put it "
                                 "on the store (pipeline.store=s3://...)")


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _learner_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: a resident learner rank. It keeps its model across
    iterations and runs each job it takes from its queue, (kind, job id, cfg, run_id, iteration,
    argument), answering (rank, job id, None or RankError, its node id, the job's result); None ends it."""
    import traceback

    import ray.train

    _enter(config["home"], config.get("env"))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    sessions = SessionCache()
    while (job := config["jobs"][rank].get()) is not None:
        kind, job_id, cfg, run_id, iteration, arg = job
        failpoints.hit(f"learner.job/rank{rank}" if kind == "update" else f"worker.{kind}/rank{rank}")
        try:
            result = _run_job(kind, cfg, RunLayout.open(cfg, run_id), iteration, arg, sessions, rank, world)
            config["done"].put((rank, job_id, None, _node_id(), result))
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which raises it in the stage
            damaged = exc if isinstance(exc, DAMAGED_INPUT) else None
            error = RankError(traceback.format_exc(limit=8), damaged, peer_lost(exc))
            config["done"].put((rank, job_id, error, _node_id(), None))
            raise


def _run_job(kind: str, cfg: RunConfig, layout: RunLayout, iteration: int, arg: Any, sessions: SessionCache,
             rank: int, world: int) -> Any:
    """One job of a learner rank: its share of an update, or (colocated) rollout slices, the
    initial adapter, an evaluation or the base model's evaluation, on the rank's one session."""
    if kind == "update":
        return learner_rank(cfg, layout, iteration, sessions, rank, world)
    if kind == "rollout":  # arg: the slice indices of this rank
        return [sample_slice(cfg, layout, iteration, j, sessions) for j in arg]
    if kind == "init":
        return stages.init_stage(cfg, layout, sessions)
    if kind == "schedule":
        return sessions.get(cfg).schedule
    if kind == "eval":
        return stages.eval_stage(cfg, layout, iteration, sessions)
    if kind == "base_eval":  # arg: the run's input fingerprints
        from tempflow_core.run.baseline import base_evaluation

        return base_evaluation(cfg, layout.store, lambda: sessions.get(cfg), arg)
    raise ValueError(f"unknown learner job {kind!r}")


@dataclass(frozen=True)
class RankError:
    """What a learner rank reports of a failed stage."""

    traceback: str
    damaged: Exception | None  # the exception itself when it is a damaged input (the stage heals those)
    peer_lost: bool  # raised because another rank died under a collective (the group is restarted)


def _uses_gpu(cfg: RunConfig) -> bool:
    import torch

    return cfg.model.device.startswith("cuda") or (cfg.model.device == "auto" and torch.cuda.is_available())


def worker_gpus(cfg: RunConfig) -> float:
    """GPUs a model worker asks Ray for: pipeline.ray_gpus, else 1 when the model runs on CUDA."""
    if cfg.pipeline.ray_gpus is not None:
        return float(cfg.pipeline.ray_gpus)
    return 1.0 if _uses_gpu(cfg) else 0.0


def colocated(cfg: RunConfig) -> bool:
    """Whether the learner's ranks also sample, write the initial adapter and evaluate
    (pipeline.placement; 'auto': when the workers use GPUs and rollout.workers asks for no
    rollout actors of their own, i.e. is 1 or train.workers)."""
    from tempflow_core.run.plan import placement_on_gpus

    on_gpus = placement_on_gpus(cfg) == "colocated"
    return on_gpus if cfg.pipeline.placement != "auto" else on_gpus and worker_gpus(cfg) > 0


class RayEngine:
    """The Ray side of one flow run: the connection, the run's actors and its learner group;
    `close` ends them and disconnects (the cluster itself is the caller's: flows/ray_head.py)."""

    def __init__(self, cfg: RunConfig, address: str | None = None) -> None:
        """Connect to the cluster at `address` (None: the one this process is connected to),
        check that its other nodes see the config's local paths (check_nodes_see: a
        PreflightError before any actor starts), and start the run's actors."""
        import ray

        self.cfg = cfg
        self._connected = not ray.is_initialized()
        if self._connected:
            if address is None:
                raise ValueError("RayEngine needs the address of a Ray cluster (flows.ray_head.ray_cluster)")
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        self.home = (ray.get_runtime_context().get_node_id(), os.getcwd())  # the driver's node and folder
        try:
            check_nodes_see(cfg, self.home)
        except Exception:
            if self._connected:
                ray.shutdown()
            raise
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpus = worker_gpus(cfg)
        registry = RewardRegistry.for_config(cfg.reward)
        reward_gpus = gpus if registry.needs_gpu(cfg.reward.name, cfg.reward.weights) else 0
        self.colocated = colocated(cfg)
        env = _forwarded_env()
        self.rank_nodes: dict[int, str] = {}  # learner rank -> node id of its last finished job
        # each pool of actors in a SPREAD placement group: over as many nodes as have room (Ray moves
        # the bundles of a node that dies, and the actors restart there)
        pools = {"rollout": (0 if self.colocated else cfg.rollout.workers, gpus),
                 "reward": (cfg.reward.workers, reward_gpus)}
        self._groups = {k: placement_group([{"CPU": 1, **({"GPU": g} if g else {})}] * n, strategy="SPREAD")
                        for k, (n, g) in pools.items() if n}

        def placed(cls: type, pool: str, index: int) -> Any:
            where = PlacementGroupSchedulingStrategy(self._groups[pool], placement_group_bundle_index=index)
            opts = dict(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS, num_cpus=1,
                        num_gpus=pools[pool][1])
            return ray.remote(**opts)(cls).options(scheduling_strategy=where, runtime_env={"env_vars": env})

        self.rollout_workers = [placed(_RolloutWorker, "rollout", i).remote(self.home)
                                for i in range(pools["rollout"][0])]
        self.reward_workers = [placed(_RewardWorker, "reward", i).remote(cfg, self.home)
                               for i in range(cfg.reward.workers)]
        self._job_id = 0
        self._storage = tempfile.mkdtemp(prefix="tempflow-raytrain-")
        self._group: dict[str, Any] | None = None  # the resident learner group (_learner_group)
        self._groups_started = 0
        self._last_group_error: str | None = None
        self._streamed: dict[tuple[str, int], list[Any]] = {}  # reward.stream: (run, iteration) -> each slice's scores

    @staticmethod
    def cpus_needed(cfg: RunConfig) -> int:
        """Logical CPUs the run holds at once: one per actor while it lives, plus the learner's ranks."""
        return (0 if colocated(cfg) else cfg.rollout.workers) + cfg.reward.workers + cfg.train.workers

    # -- the Engine interface (engine.py): the same stages, their work on the actors and the group

    def _on_a_model(self, cfg: RunConfig, run_id: str, iteration: int, kind: str, arg: Any = None) -> Any:
        """Job `kind` (_run_job) where a model already is: learner rank 0 when colocated, else a
        rollout actor; the driver builds none."""
        if self.colocated:
            return self._on_group(cfg, run_id, iteration, kind, {0: arg})[0]
        got: dict[int, Any] = {}
        _on_actors(self.rollout_workers, [lambda a: a.job.remote(kind, cfg, run_id, iteration, arg)],
                   got.__setitem__)
        return got[0]

    def init(self, cfg: RunConfig, layout: RunLayout, sessions: SessionCache) -> str:
        """The initial adapter, written where a model is (_on_a_model)."""
        return self._on_a_model(cfg, layout.run_id, -1, "init")

    def schedule(self, cfg: RunConfig, sessions: SessionCache) -> Schedule:
        """The policy's grid, from where a model is (_on_a_model)."""
        return self._on_a_model(cfg, "schedule", -1, "schedule")

    @contextlib.contextmanager
    def sampling(self, cfg: RunConfig, layout: RunLayout, plan: IterationPlan, sessions: SessionCache,
                 bar: Bar = no_bar, log: Log | None = None) -> Iterator[Sampling]:
        """Slices sampled by the rollout actors, or by the learner's ranks when colocated (one tick
        per finished slice; colocated, a rank's slices tick together)."""
        i = plan.iteration
        with bar(cfg.rollout.slices, f"iter {i} rollout slices") as tick:
            yield None, (self.colocated_rollout_runner(cfg, layout.run_id, i, tick) if self.colocated else
                         self.rollout_runner(cfg, layout.run_id, i, tick, log))

    def evaluate(self, cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache) -> str:
        """The evaluation of checkpoint i, where a model is (_on_a_model)."""
        return self._on_a_model(cfg, layout.run_id, iteration, "eval")

    def base_eval(self, cfg: RunConfig, sessions: SessionCache,
                  inputs: dict[str, str] | None = None) -> tuple[dict[str, Any], bool]:
        """The base model's evaluation (stored once per store), where a model is (_on_a_model)."""
        return tuple(self._on_a_model(cfg, "base", -1, "base_eval", inputs))  # type: ignore[return-value]

    def scoring(self, cfg: RunConfig, layout: RunLayout, plan: IterationPlan, sessions: SessionCache) -> ScoreRunner:
        """Shares of the shards scored by the reward actors."""
        return self.reward_runner(cfg, layout.run_id, plan.iteration)

    @contextlib.contextmanager
    def training(self, cfg: RunConfig, layout: RunLayout, plan: IterationPlan, sessions: SessionCache,
                 bar: Bar = no_bar) -> Iterator[Training]:
        """The update, data-parallel on the run's Ray Train group (its ranks log their own progress)."""
        yield None, self.learner_runner(cfg, layout.run_id, plan.iteration)

    # -- the runners the stages call

    def rollout_runner(self, cfg: RunConfig, run_id: str, iteration: int,
                       progress: Callable[[int], None] | None = None,
                       report: Callable[[str], None] | None = None) -> Callable[[list[int]], list[RolloutPart]]:
        """stages.SliceRunner: slices handed to the rollout actors as they free up; `progress`
        ticks once per finished slice and `report` gets a line for it (the Prefect log). A slice
        whose actor died under it (its node too) is handed out again (_on_actors)."""

        def run(indices: list[int]) -> list[RolloutPart]:
            parts, t0 = [], time.perf_counter()
            streamed: list[Any] = []
            if cfg.reward.stream:  # each written slice goes to the next reward actor at once
                self._streamed[(run_id, iteration)] = streamed

            def done(_: int, part: RolloutPart) -> None:
                parts.append(part)
                if cfg.reward.stream:
                    actor = self.reward_workers[len(streamed) % len(self.reward_workers)]
                    streamed.append(actor.score_part.remote(cfg, run_id, iteration, part))
                line = (f"iteration {iteration}: rollout slice {part.index + 1}/{len(indices)} written "
                        f"({part.num_samples} samples, {len(parts)}/{len(indices)} done, "
                        f"{time.perf_counter() - t0:.1f} s)")
                (report or log.info)(line)
                if progress is not None:
                    progress(1)

            _on_actors(self.rollout_workers, [lambda a, j=j: a.sample.remote(cfg, run_id, iteration, j) for j in indices],
                       done)
            return sorted(parts, key=lambda p: p.index)

        return run

    def reward_runner(self, cfg: RunConfig, run_id: str, iteration: int) -> Callable[[], list[ScoredShare]]:
        """stages.ScoreRunner: the reward actors score the W shares of the shards (share r: shards
        r, r+W, ...); a share whose actor died under it is scored again."""

        def run() -> list[ScoredShare]:
            import ray
            from ray.exceptions import ActorUnavailableError, RayActorError

            streamed = self._streamed.pop((run_id, iteration), None)
            if streamed is not None and len(streamed) == cfg.rollout.slices:
                try:
                    return ray.get(streamed)  # the slices scored while the rollout went on
                except (RayActorError, ActorUnavailableError) as e:
                    log.warning("a reward actor died scoring a streamed slice (%s); scoring the stage in shares",
                                type(e).__name__)
            W, shares = len(self.reward_workers), {}
            _on_actors(self.reward_workers, [lambda a, r=r: a.score.remote(cfg, run_id, iteration, r, W)
                                             for r in range(W)], shares.__setitem__)
            return [shares[r] for r in range(W)]

        return run

    def colocated_rollout_runner(self, cfg: RunConfig, run_id: str, iteration: int,
                                 progress: Callable[[int], None] | None = None
                                 ) -> Callable[[list[int]], list[RolloutPart]]:
        """stages.SliceRunner of the colocated placement: slice j to learner rank j mod W, each
        rank sampling its slices one after the other with its one session."""

        def run(indices: list[int]) -> list[RolloutPart]:
            W = cfg.train.workers
            share = {r: [j for j in indices if j % W == r] for r in range(W)}
            parts = [p for ps in self._on_group(cfg, run_id, iteration, "rollout", share).values() for p in ps]
            if progress is not None:
                progress(len(parts))
            return sorted(parts, key=lambda p: p.index)

        return run

    def learner_runner(self, cfg: RunConfig, run_id: str, iteration: int) -> Callable[[], None]:
        """stages.RankRunner: the run's resident Ray Train group (started at the first job) runs
        this stage on every rank; a group that died is started anew and given the stage again."""

        def run() -> None:
            self._on_group(cfg, run_id, iteration, "update", {r: None for r in range(cfg.train.workers)})

        return run

    def _on_group(self, cfg: RunConfig, run_id: str, iteration: int, kind: str, args: dict[int, Any]) -> dict[int, Any]:
        """Job `kind` on the learner ranks of `args` (rank -> the job's argument); their results.
        A rank that dies under it (or whose peer died under a collective) makes a new group run the
        job again, from the store's state (checkpoint i-1); a damaged input is raised for the stage
        to heal; any other error fails it."""
        for attempt in range(ACTOR_RESTARTS + 1):
            group = self._learner_group(cfg)
            self._job_id += 1
            for r, arg in args.items():
                group["jobs"][r].put((kind, self._job_id, cfg, run_id, iteration, arg))
            answers = self._await_ranks(group, self._job_id, set(args))
            errors = [e for e, _ in answers.values() if e is not None]
            damaged = next((e.damaged for e in errors if e.damaged is not None), None)
            if damaged is not None:  # the stage heals its inputs and runs again (a new group)
                self._stop_learner_group()
                raise damaged
            failed = [e for e in errors if not e.peer_lost]
            if failed:  # an error of the job itself (a survivor may have lost it as a peer): fail
                self._stop_learner_group()
                raise RuntimeError(f"learner rank failed in iteration {iteration} ({kind}):\n{failed[0].traceback}")
            if len(answers) < len(args) or errors:
                # a rank died (or lost a peer) under the job: a new group reruns it
                log.warning("iteration %d: a learner rank died during its %s job (attempt %d, %d of %d ranks "
                            "answered); restarting the group", iteration, kind, attempt + 1, len(answers), len(args))
                if errors:
                    self._last_group_error = errors[0].traceback[-2000:]
                self._stop_learner_group()
                continue
            return {r: result for r, (_, result) in answers.items()}
        raise RuntimeError(f"the learner group kept failing in iteration {iteration} ({kind}): "
                           f"{self._last_group_error or 'no rank reported an error'}")

    def _learner_group(self, cfg: RunConfig) -> dict[str, Any]:
        """The resident TorchTrainer of train.workers ranks, its fit() running in a thread."""
        if self._group is not None and self._group["thread"].is_alive():
            return self._group
        from ray.train import FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        gpus, backend = worker_gpus(cfg), "nccl" if _uses_gpu(cfg) else "gloo"
        # the queues live on the driver's node: a node that dies takes its ranks, not the group's mail
        here = {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(self.home[0], soft=True)}
        jobs, done = [Queue(actor_options=here) for _ in range(cfg.train.workers)], Queue(actor_options=here)
        self._groups_started += 1
        trainer = TorchTrainer(
            _learner_loop, train_loop_config={"jobs": jobs, "done": done, "home": self.home, "env": _forwarded_env()},
            torch_config=TorchConfig(backend=backend),
            scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=gpus > 0,
                                         resources_per_worker={"CPU": 1, **({"GPU": gpus} if gpus else {})},
                                         placement_strategy="SPREAD"),
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

    def _await_ranks(self, group: dict[str, Any], job_id: int,
                     ranks: set[int]) -> dict[int, tuple[RankError | None, Any]]:
        """Each rank's answer to job `job_id`, (None or its error, its result), until every rank of
        `ranks` answered or the group ended (then the ranks that died are missing)."""
        from ray.util.queue import Empty

        answers: dict[int, tuple[RankError | None, Any]] = {}
        while len(answers) < len(ranks):
            try:
                rank, job, error, node, result = group["done"].get(timeout=2.0)
            except Empty:
                if not group["thread"].is_alive():  # a rank that died or failed took the group down with it
                    return answers
                continue
            except Exception:  # noqa: BLE001 - the queue's actor died with its node: the group is lost too
                return answers
            if job == job_id and rank in ranks:
                answers[rank] = (error, result)
                self.rank_nodes[rank] = node
        return answers

    def _stop_learner_group(self) -> None:
        group, self._group = self._group, None
        if group is None:
            return
        if "error" in group["outcome"]:
            self._last_group_error = repr(group["outcome"]["error"])[:2000]
        if group["thread"].is_alive():
            for q in group["jobs"]:
                with contextlib.suppress(Exception):  # a queue whose node died
                    q.put(None, timeout=10)
            group["thread"].join(timeout=120)
        for q in group["jobs"] + [group["done"]]:
            with contextlib.suppress(Exception):
                q.shutdown(force=True)

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        self._stop_learner_group()
        for a in self.rollout_workers + self.reward_workers:
            ray.kill(a)
        for g in self._groups.values():
            remove_placement_group(g)
        self.rollout_workers, self.reward_workers, self._groups = [], [], {}
        shutil.rmtree(self._storage, ignore_errors=True)
        if self._connected:
            ray.shutdown()

    def __enter__(self) -> "RayEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
