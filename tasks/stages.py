"""Prefect tasks for the pipeline stages: each a thin wrapper over one method of the run's
`StoredRun` (tempflow_core/engines/stored_run.py), and `FlowStages`, the training controller's
context that calls them.

The StoredRun holds the run config, the run's layout on its store (opened once by the flow), the
flow's `SessionCache` (the flow owns the model; tasks of one flow run share it) and the run's
engine (here, or Ray's actors and Ray Train group). A stage whose output is finished and intact
returns at once, so retries (Prefect's own or `tempflow train --resume`) never redo finished work;
the stages retry with a delay on transient faults only. The local engine holds a slot of the GPU
concurrency limit (`gpu_slot`) around rollout, learner and evaluation.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable, Iterator, TypeVar

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from tempflow_core.algorithm.iteration import IterationPlan
from tempflow_core.algorithm.schedule import Schedule
from tempflow_core.algorithm.session import SessionCache
from tempflow_core.config import RunConfig
from tempflow_core.engines.engine import Engine, LocalEngine
from tempflow_core.engines.stored_run import StoredRun
from tempflow_core.run.layout import RunLayout
from tempflow_core.storage.retry import is_retryable_failure

T = TypeVar("T")


@contextlib.contextmanager
def gpu_slot(config: RunConfig) -> Iterator[None]:
    """Hold a slot of the global concurrency limit named for the GPU, when one is configured
    (infra/prefect.yaml creates `tempflow-gpu`); the embedded default runs without one."""
    if not config.pipeline.gpu_limit:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(config.pipeline.gpu_limit, occupy=1, strict=True):
        yield


@contextlib.contextmanager
def progress_bar(total: int, desc: str) -> Iterator[Callable[[int], Any]]:
    """A tqdm bar on an interactive terminal (no bar in logs or CI)."""
    import sys

    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, leave=False, disable=not sys.stderr.isatty()) as bar:
        yield bar.update


class _ToTaskRun(logging.Handler):
    """Sends log records to the Prefect API as lines of one task run, whichever thread logs them."""

    def __init__(self, run_ids: dict[str, Any]) -> None:
        from prefect.logging.handlers import APILogHandler

        super().__init__()
        self.run_ids, self.api = run_ids, APILogHandler()

    def emit(self, record: logging.LogRecord) -> None:
        record.flow_run_id, record.task_run_id = self.run_ids.get("flow_run_id"), self.run_ids.get("task_run_id")
        self.api.emit(record)


def core_log(fn: Callable[..., T]) -> Callable[..., T]:
    """The task's calls into tempflow_core log (logger "tempflow": a finished stage reused, an input
    healed, shards written) as lines of the task run, where the Prefect UI shows them."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        logger = logging.getLogger("tempflow")
        handler, level = _ToTaskRun(dict(get_run_logger().extra)), logger.level
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        try:
            return fn(*args, **kwargs)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)

    return wrapper


def retry_transient(task, task_run, state) -> bool:
    """Retry only what can succeed on a second try (tempflow_core.storage.retry.is_retryable_failure:
    the store gave up on a transient fault, 5xx, throttling, timeouts, dropped connections);
    a bad key, a schema or integrity error, a missing object or a config error fails at once."""
    try:
        state.result()
    except Exception as e:  # noqa: BLE001 - classified
        return is_retryable_failure(e)
    return False


STAGE_TASK_OPTIONS = dict(cache_policy=NONE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)
_common = STAGE_TASK_OPTIONS


def local_engine(config: RunConfig) -> LocalEngine:
    """The stages in this process, holding a slot of the GPU concurrency limit around GPU work."""
    return LocalEngine(hold=functools.partial(gpu_slot, config))


def stored_run(config: RunConfig, lay: RunLayout, sessions: SessionCache, engine: Engine | None = None) -> StoredRun:
    """The run's StoredRun with a progress bar on a terminal and progress lines in the current task's log."""
    return StoredRun(config, lay, sessions, engine or local_engine(config), bar=progress_bar,
                     log=lambda line: get_run_logger().info(line))


@task(name="init", task_run_name="init", **_common)
@core_log
def init_task(run: StoredRun) -> None:
    run.init()


@task(name="rollout", task_run_name="rollout-iter-{plan.iteration}", **_common)
@core_log
def rollout_task(run: StoredRun, plan: IterationPlan) -> str:
    if not run.layout.complete(plan.iteration, "rollout"):
        get_run_logger().info("iteration %d: sampling %d prompts x %d", plan.iteration, plan.prompts, plan.group_size)
    return run.rollout(plan)


@task(name="reward", task_run_name="reward-iter-{plan.iteration}", **_common)
@core_log
def reward_task(run: StoredRun, plan: IterationPlan, rollouts: str) -> str:
    return run.score(plan, rollouts)


@task(name="learner", task_run_name="learner-iter-{plan.iteration}", **_common)
@core_log
def learner_task(run: StoredRun, plan: IterationPlan, rollouts: str, rewards: str) -> dict[str, float]:
    return run.update(plan, rollouts, rewards)


@task(name="eval", task_run_name="eval-iter-{iteration}", **_common)
@core_log
def eval_task(run: StoredRun, iteration: int) -> dict[str, Any]:
    return run.evaluate(iteration)


class FlowStages:
    """controller.Context of a flow run: the run's StoredRun with each stage a Prefect task (the
    URIs a stage returns are the next task's inputs, so the UI draws the iteration's graph)."""

    def __init__(self, run: StoredRun) -> None:
        self.run = run

    def init(self) -> None:
        init_task(self.run)

    def schedule(self) -> Schedule:
        return self.run.schedule()

    def rollout(self, plan: IterationPlan) -> str:
        return rollout_task(self.run, plan)

    def score(self, plan: IterationPlan, rollouts: str) -> str:
        return reward_task(self.run, plan, rollouts)

    def update(self, plan: IterationPlan, rollouts: str, rewards: str) -> dict[str, float]:
        return learner_task(self.run, plan, rollouts, rewards)

    def evaluate(self, iteration: int) -> dict[str, Any]:
        return eval_task(self.run, iteration)


@task(name="base-eval", task_run_name="base-eval", **_common)
@core_log
def base_eval_task(config: RunConfig, sessions: SessionCache, inputs: dict[str, str] | None = None,
                   engine: Engine | None = None) -> dict[str, Any]:
    """The base model's evaluation: read from the store's `_baselines/`, else computed once and kept there."""
    result, cached = (engine or local_engine(config)).base_eval(config, sessions, inputs)
    get_run_logger().info("base model evaluation %s", "read from the store" if cached else "computed and stored")
    return result
