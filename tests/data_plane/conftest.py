"""Data-plane fixtures: a moto S3 server on 127.0.0.1 (started once, stopped after the session),
the same store fixture over a local folder and over S3, and a fault-injecting proxy."""

from __future__ import annotations

import os
import sys
from typing import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # dp_helpers, dp_fault_proxy

from dp_fault_proxy import FaultProxy  # noqa: E402

from dp_helpers import new_bucket  # noqa: E402

from tempflow_core.storage import ObjectStore, S3Store, open_store  # noqa: E402


@pytest.fixture(scope="session")
def s3_endpoint(moto_s3: str) -> str:
    return moto_s3


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
