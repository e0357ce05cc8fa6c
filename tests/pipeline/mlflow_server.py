"""A real ``mlflow server`` on 127.0.0.1 for the session: sqlite backend, artifacts proxied to a
local folder, job execution off (2 processes instead of 11). Runs under flows.children's
watchdog: stopped (whole process group) at the end of the session, or when pytest is killed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

from flows import children

STARTUP_TIMEOUT_S = 90


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """Yields ``http://127.0.0.1:<port>`` of a running tracking server."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = children.free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = root / "server.log"
    with open(log_path, "wb") as log_file:
        proc = children.spawn(
            [sys.executable, "-m", "mlflow", "server",
             "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
             "--artifacts-destination", str(root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT, grace=15.0,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {STARTUP_TIMEOUT_S}s:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        children.stop(proc)
