"""After `kill -9` of `tempflow train`, nothing it started runs on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from .conftest import tiny_overrides

CLI = [sys.executable, "-m", "flows.cli"]


def test_the_temporary_prefect_server_ends_with_a_killed_cli(tiny_model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the CLI starts its own server
    env.update(TEMPFLOW_HOME=str(tmp_path / "home"), PREFECT_LOGGING_LEVEL="WARNING")
    args = ["train", "--run-id", "orphan"] + sum((["--set", o] for o in tiny_overrides(
        tmp_path, tiny_model_dir, iterations=50)), [])
    cli = subprocess.Popen(CLI + args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    servers: list[psutil.Process] = []
    try:
        deadline = time.time() + 300
        while not (tmp_path / "store" / "orphan" / "iter-000000").exists() and cli.poll() is None \
                and time.time() < deadline:
            time.sleep(0.2)
        assert cli.poll() is None, "the run ended before it could be killed"
        servers = [p for p in psutil.Process(cli.pid).children(recursive=True)
                   if "flows.local_api" in " ".join(p.cmdline()) or "uvicorn" in " ".join(p.cmdline())]
        assert len(servers) == 1  # the run's API server, started by the CLI
        os.kill(cli.pid, signal.SIGKILL)  # the CLI alone, as `kill -9 <pid>` does
        cli.wait(timeout=30)
        gone, alive = psutil.wait_procs(servers, timeout=60)  # a bounded wait, not a timing claim
        assert alive == [] and len(gone) == 1
    finally:
        for p in servers:
            if p.is_running():
                p.kill()
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait(timeout=30)
