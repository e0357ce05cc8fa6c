"""The Ray cluster a run with pipeline.engine=ray drives: RAY_ADDRESS, or a local head.

Without RAY_ADDRESS, `ray_cluster()` starts `ray start --head --block` for the block, as a
child that ends with this process (flows.children.spawn: its own process group, ended when
this process dies, also by SIGKILL; Ray's agents would otherwise outlive a killed driver).
Every server of that head listens on 127.0.0.1 only: Ray binds its servers to the node IP,
and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes the node IP the loopback address (Ray's own
single-machine mode of macOS and Windows). This process gets the same setting before it
imports Ray, so its driver binds there too. The head requires Ray's token authentication
(RAY_AUTH_MODE=token; the token lives in ~/.ray/auth_token), so other local users cannot
submit work to it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from flows.children import free_port, spawn, stop

LOCAL_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}



def _wait_listening(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the local Ray head on 127.0.0.1:{port} did not start (exit code {proc.poll()}); "
                               "set RAY_ADDRESS to use a running cluster")
        time.sleep(0.2)


@contextlib.contextmanager
def ray_cluster(num_cpus: int | None = None) -> Iterator[str]:
    """The address of the Ray cluster to drive: RAY_ADDRESS when set (nothing started), else a
    local head on 127.0.0.1 with `num_cpus` logical CPUs, stopped when the block ends."""
    if os.environ.get("RAY_ADDRESS"):
        yield os.environ["RAY_ADDRESS"]
        return
    if "ray" not in sys.modules:  # the driver's own servers: 127.0.0.1 too (read when Ray is imported)
        for k, v in LOCAL_ONLY.items():
            os.environ.setdefault(k, v)
    port = free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    cmd = [str(ray_cli) if ray_cli.exists() else "ray", "start", "--head", f"--port={port}",
           "--include-dashboard=false", "--disable-usage-stats", "--block"]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    proc = spawn(cmd, grace=5.0, env={**os.environ, **LOCAL_ONLY}, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc, timeout=15)
