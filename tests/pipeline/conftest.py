"""Pipeline fixtures: one Prefect test server per session, a moto S3 server, run configs."""

from __future__ import annotations

import logging
import os
from typing import Iterator

import pytest

from .mlflow_server import mlflow_server  # noqa: F401  (fixture)

KEY_ID, SECRET = "AKIATEMPFLOWPIPELINE", "pipeline-secret-never-logged"


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """Prefect's test harness (a temporary server on 127.0.0.1 with its own database)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server bound to 127.0.0.1; dummy credentials in the environment."""
    from moto.server import ThreadedMotoServer

    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(var, raising=False)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        import boto3

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="tempflow-test")
        yield url
    finally:
        server.stop()
        mp.undo()


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
