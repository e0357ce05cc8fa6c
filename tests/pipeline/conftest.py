"""Pipeline fixtures: one Prefect test server per session, a moto S3 server, run configs."""

from __future__ import annotations

import os
import time
from typing import Iterator

import pytest

from .mlflow_server import mlflow_server  # noqa: F401  (fixture)

from moto_s3 import KEY_ID, SECRET  # noqa: E402,F401  (the session's dummy S3 credentials)


def unfiring_cron() -> tuple[str, str]:
    """A daily cron for a served deployment that cannot fire while a test runs (12 hours from the
    UTC hour now), and how the Prefect UI describes it. `tempflow serve`'s default (02:00 UTC)
    would fire in the middle of a CI run that crosses 02:00 and start a run of its own."""
    hour = (time.gmtime().tm_hour + 12) % 24
    return f"0 {hour} * * *", f"At {(hour % 12) or 12:02d}:00 {'AM' if hour < 12 else 'PM'} every day"


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """Prefect's test harness (a temporary server on 127.0.0.1 with its own database)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def s3_server(moto_s3: str) -> str:
    """The session's moto S3 server with the pipeline tests' bucket."""
    import boto3

    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket="tempflow-test")
    return moto_s3


def tiny_overrides(tmp_path, model_dir, iterations: int = 2) -> list[str]:
    return [
        f"model.path={model_dir}", f"train.iterations={iterations}", "rollout.prompts_per_iter=2",
        "rollout.group_size=3", "lora.rank=4", "lora.alpha=8", "sampling.num_steps=4", "sampling.eval_num_steps=4",
        "train.minibatches=2", "loss.beta=0.01", "eval.max_prompts=4", f"output_dir={tmp_path / 'runs'}",
        f"pipeline.store={tmp_path / 'store'}", "prompts.source=builtin:colors",
    ]


@pytest.fixture
def quiet_env(monkeypatch):
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "WARNING")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return os.environ
