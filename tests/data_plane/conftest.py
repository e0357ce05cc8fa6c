"""Data-plane fixtures: a moto S3 server on 127.0.0.1 (started once, stopped after the session),
the same store fixture over a local folder and over S3, and a fault-injecting proxy."""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # dp_helpers, dp_fault_proxy

from dp_fault_proxy import FaultProxy  # noqa: E402

from dp_helpers import TEST_KEY_ID, TEST_SECRET, new_bucket  # noqa: E402

from tempflow_core.storage import ObjectStore, S3Store, open_store  # noqa: E402


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server in this process, bound to 127.0.0.1 on a free port; dummy credentials
    in the environment for the whole session (moto needs some; none are real)."""
    from moto.server import ThreadedMotoServer

    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", TEST_KEY_ID)
    mp.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET)
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(var, raising=False)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        mp.undo()


@pytest.fixture
def s3_store(s3_endpoint: str) -> S3Store:
    store = open_store(f"s3://{new_bucket()}/root", endpoint_url=s3_endpoint, create_bucket=True, backoff=0.01)
    assert isinstance(store, S3Store)
    return store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path) -> ObjectStore:
    """The same tests over both implementations."""
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return request.getfixturevalue("s3_store")


@pytest.fixture
def fast_botocore_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore sleeps up to 1, 2, 4 s between retries; the fault tests scale that by 1/100."""
    from botocore.retries.standard import ExponentialBackoff

    original = ExponentialBackoff.delay_amount
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, ctx: 0.01 * original(self, ctx))


@pytest.fixture
def fault_proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    """A proxy in front of moto; tests set fail_rate / modes on it. Stopped after the test."""
    proxy = FaultProxy(s3_endpoint, fail_rate=0.0, seed=1234, max_consecutive=2)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
