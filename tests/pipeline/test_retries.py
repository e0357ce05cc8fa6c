"""Stage tasks retry transient faults only: a non-transient error fails the task on its first
attempt, a transient one is tried again. Attempts are counted from outside the task: lines a
probe task appends to a file, and the task run's run_count on the Prefect server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prefect import flow, task

from tasks.stages import STAGE_TASK_OPTIONS, reward_task
from tempflow_core.run.layout import RunLayout, open_run_store
from tempflow_core.algorithm.iteration import plan_iteration
from tempflow_core.algorithm.schedule import make_schedule
from tempflow_core.engines.engine import LocalEngine
from tempflow_core.engines.stored_run import StoredRun
from tempflow_core.config import load_config
from tempflow_core.algorithm.session import SessionCache
from tempflow_core.shards.errors import SchemaError, ShardIntegrityError, StageExists
from tempflow_core.storage import InvalidKey, ObjectNotFound
from tempflow_core.storage.errors import StoreUnavailable

from .conftest import tiny_overrides

FAST = {**STAGE_TASK_OPTIONS, "retry_delay_seconds": 0}  # the stages' retry policy, no waiting


def _attempts(kind: str, log: Path) -> int:
    errors = {
        "invalid-key": lambda: InvalidKey("key 'a b/..' has an empty, '.' or '..' path component"),
        "schema": lambda: SchemaError("BranchPoint.group_id 'a b_k00' is not a valid sample key"),
        "integrity": lambda: ShardIntegrityError("sha256 of shard-000000.tar differs from the manifest"),
        "stage-exists": lambda: StageExists("run/iter-000000/rollout is complete"),
        "not-found": lambda: ObjectNotFound("object not found: run/iter-000000/rollout/manifest.json"),
        "file-not-found": lambda: FileNotFoundError(2, "No such file or directory", "/nope/model_index.json"),
        "connection-reset": lambda: ConnectionResetError(104, "Connection reset by peer"),
        "timeout": lambda: TimeoutError("read timed out"),
        "store-unavailable": lambda: StoreUnavailable("get s3://b/k failed after 4 attempts: 503"),
    }

    @task(name=f"probe-{kind}", **FAST)
    def probe() -> None:
        with log.open("a") as f:
            f.write("attempt\n")
        raise errors[kind]()

    @flow(name=f"retry-probe-{kind}")
    def probe_flow() -> None:
        probe()

    with pytest.raises(BaseException):
        probe_flow()
    return len(log.read_text().splitlines())


@pytest.mark.parametrize("kind", ["invalid-key", "schema", "integrity", "stage-exists", "not-found",
                                  "file-not-found"])
def test_a_non_transient_error_fails_on_the_first_attempt(prefect_api, tmp_path, kind):
    assert _attempts(kind, tmp_path / "attempts.txt") == 1


@pytest.mark.parametrize("kind", ["connection-reset", "timeout", "store-unavailable"])
def test_a_transient_error_is_retried(prefect_api, tmp_path, kind):
    assert _attempts(kind, tmp_path / "attempts.txt") == 3  # 1 + retries=2


def test_a_stage_task_with_an_invalid_key_runs_once(prefect_api, tiny_model_dir, tmp_path, quiet_env):
    """The real reward task on a layout whose run id is no valid store key, so the store refuses
    the stage's first read (InvalidKey, a StoreError): one attempt on the Prefect server (it used
    to be tried three times). RunLayout refuses such an id when it is built; the layout here is
    made past that check, so that the store's own refusal is what the task meets."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    cfg = load_config(None, tiny_overrides(tmp_path, tiny_model_dir) + ["reward.name=brightness"])
    escape = object.__new__(RunLayout)
    object.__setattr__(escape, "store", open_run_store(cfg))
    object.__setattr__(escape, "run_id", "runs/../escape")
    plan = plan_iteration(cfg, make_schedule(cfg.sampling.num_steps, 3.0, 0.7), 0)

    @flow(name="retry-probe-reward")
    def one_reward() -> str:
        from prefect.runtime import flow_run

        try:
            reward_task(StoredRun(cfg, escape, SessionCache(), LocalEngine()), plan, "unread")
        except Exception:  # noqa: BLE001 - the flow's own id is what the test needs
            pass
        return flow_run.get_id()

    flow_run_id = one_reward()

    async def run_counts() -> list[tuple[str, int, str]]:
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return [(r.name, r.run_count, r.state.type.value) for r in runs]

    assert asyncio.run(run_counts()) == [("reward-iter-0", 1, "FAILED")]
