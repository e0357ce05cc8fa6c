"""One moto S3 server for the whole test session (data plane and pipeline tests share it):
bound to 127.0.0.1 on a free port, dummy credentials in the environment while it runs."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import pytest

KEY_ID = "AKIDTEMPFLOWENV0001"  # dummy credentials (moto needs some; none are real)
SECRET = "env-secret-tempflow-do-not-log-1234"  # tests assert it never reaches logs or MLflow


@contextmanager
def moto_server() -> Iterator[str]:
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
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        mp.undo()
