"""A temporary Prefect API server that ends with the process that started it.

Without PREFECT_API_URL, Prefect starts its own temporary server (`SubprocessASGIServer`) and
stops it from an atexit hook; a `kill -9` of the CLI skips the hook and the server runs on
as an orphan. `local_api()` starts the same server (uvicorn over Prefect's app factory,
UI off, on 127.0.0.1) itself, through this module run as the child's main:

    python -m flows.local_api PARENT_PID [uvicorn args...]

The child ends with its parent (`flows.children.end_with_parent`: the kernel's
PR_SET_PDEATHSIG on Linux and a watch of the parent pid everywhere).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from typing import Iterator

from flows.children import end_with_parent, free_port, stop



def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the temporary Prefect server on {url} did not start "
                               f"(exit code {proc.poll()}); set PREFECT_API_URL to use a running one")
        time.sleep(0.2)


@contextlib.contextmanager
def local_api() -> Iterator[str | None]:
    """Run the block against a temporary Prefect server bound to this process's life; yields
    its API URL (None, and nothing started, when PREFECT_API_URL names a server already)."""
    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    cmd = [sys.executable, "-m", "flows.local_api", str(os.getpid()), "--factory",
           "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "error", "--lifespan", "on"]
    # a session of its own: a Ctrl-C reaches the run, which reports its end to a server still up
    proc = subprocess.Popen(cmd, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            start_new_session=True)
    try:
        _wait_healthy(url, proc, float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")))
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _drain_workers()
    finally:
        stop(proc, timeout=10)


def _drain_workers() -> None:
    """Send the logs and events Prefect still buffers while the server is up."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler

    with contextlib.suppress(Exception):
        APILogHandler.flush()
    with contextlib.suppress(Exception):
        EventsWorker.drain_all()



if __name__ == "__main__":
    end_with_parent(int(sys.argv[1]))
    import uvicorn.main

    sys.argv = ["uvicorn"] + sys.argv[2:]
    uvicorn.main.main()
