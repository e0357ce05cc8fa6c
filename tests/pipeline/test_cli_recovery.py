"""After `kill -9` of `tempflow train`, nothing it started runs on; after a Ctrl-C it ends at once
and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from .conftest import tiny_overrides

CLI = [sys.executable, "-m", "flows.cli"]


def _healthy(servers: list[psutil.Process]) -> bool:
    """Whether the one server found answers its health probe (its port is in its command line)."""
    import urllib.request

    if len(servers) != 1:
        return False
    cmd = servers[0].cmdline()
    try:
        port = cmd[cmd.index("--port") + 1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
            return r.status == 200
    except (ValueError, OSError, psutil.Error):
        return False


def _kill_left(cli: subprocess.Popen, servers: list[psutil.Process]) -> None:
    """Whatever a failed test left running: the servers found, the CLI's group."""
    for p in servers:
        if p.is_running():
            p.kill()
    if cli.poll() is None:
        os.killpg(cli.pid, signal.SIGKILL)
        cli.wait(timeout=30)


def test_the_temporary_prefect_server_ends_with_a_killed_cli(tiny_model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the CLI starts its own server
    env.update(TEMPFLOW_HOME=str(tmp_path / "home"), PREFECT_LOGGING_LEVEL="WARNING")
    args = ["train", "--run-id", "orphan"] + sum((["--set", o] for o in tiny_overrides(
        tmp_path, tiny_model_dir, iterations=50)), [])  # killed long before its end
    cli = subprocess.Popen(CLI + args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    servers: list[psutil.Process] = []
    try:
        deadline = time.time() + 300
        while not _healthy(servers) and cli.poll() is None and time.time() < deadline:
            time.sleep(0.2)
            servers = [p for p in psutil.Process(cli.pid).children(recursive=True)
                       if "flows.local_api" in " ".join(p.cmdline()) or "uvicorn" in " ".join(p.cmdline())]
        assert cli.poll() is None, "the run ended before it could be killed"
        assert len(servers) == 1 and _healthy(servers)  # the run's API server, started by the CLI, serving
        os.kill(cli.pid, signal.SIGKILL)  # the CLI alone, as `kill -9 <pid>` does
        cli.wait(timeout=30)
        gone, alive = psutil.wait_procs(servers, timeout=60)  # a bounded wait, not a timing claim
        assert alive == [] and len(gone) == 1
    finally:
        _kill_left(cli, servers)


def test_ctrl_c_ends_the_run_and_its_prefect_server_at_once_and_the_run_resumes(tiny_model_dir, tmp_path):
    """SIGINT to the terminal's process group in the middle of a stage. Before the temporary
    Prefect server ran in a session of its own, it died with the run's first Ctrl-C and the run
    hung (measured: still running 150 s later) reporting its end to a dead API."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the CLI starts its own server
    # PYTHONFAULTHANDLER: should the CLI hang after the Ctrl-C, a SIGABRT prints every thread's stack
    env.update(TEMPFLOW_HOME=str(tmp_path / "home"), PREFECT_LOGGING_LEVEL="WARNING", PYTHONFAULTHANDLER="1")
    args = ["train", "--run-id", "c"] + sum((["--set", o] for o in tiny_overrides(tmp_path, tiny_model_dir,
                                                                                   iterations=1)), [])
    err = tmp_path / "cli.stderr"
    with open(err, "wb") as err_file:
        cli = subprocess.Popen(CLI + args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err_file,
                               start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    servers: list[psutil.Process] = []
    try:
        deadline = time.time() + 300
        while not (tmp_path / "store" / "c" / "iter-000000" / "rollout").exists() and cli.poll() is None:
            assert time.time() < deadline
            time.sleep(0.05)
        servers = [p for p in psutil.Process(cli.pid).children(recursive=True)
                   if "flows.local_api" in " ".join(p.cmdline())]
        assert cli.poll() is None and len(servers) == 1, "the run ended before its first stage"
        os.killpg(cli.pid, signal.SIGINT)  # Ctrl-C: the CLI's whole process group
        try:
            cli.wait(timeout=60)  # measured 3 s on 2 busy cores
        except subprocess.TimeoutExpired:
            os.kill(cli.pid, signal.SIGABRT)  # the fault handler writes where each thread waits
            cli.wait(timeout=30)
            # the whole fault-handler dump: every thread's stack
            pytest.fail("the CLI still ran 60 s after Ctrl-C; its stderr ends:\n" + err.read_text()[-40000:])
        assert cli.returncode == 130, err.read_text()[-3000:]
        gone, alive = psutil.wait_procs(servers, timeout=30)
        assert alive == []
    finally:
        _kill_left(cli, servers)
    out = subprocess.run(CLI + ["train", "--resume", "c", "--set", f"pipeline.store={tmp_path / 'store'}"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "store" / "c" / "iter-000000" / "eval").exists()


_REFERENCE: dict[str, bytes] = {}  # config digest -> final adapter bytes of the in-process run


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["reward", "learner", "eval"])  # rollout: test_cli.py, in the default run
def test_sigkill_in_each_stage_then_resume_gives_the_uninterrupted_adapter_bytes(prefect_api, tiny_model_dir,
                                                                                 tmp_path, stage):
    from tempflow_core.config import RunConfig
    from tempflow_core.algorithm.train import train_in_process

    env = {**os.environ, "TEMPFLOW_HOME": str(tmp_path / "home"), "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_API_URL": prefect_api}
    args = ["train", "--run-id", "k"] + sum((["--set", o] for o in tiny_overrides(tmp_path, tiny_model_dir)), [])
    proc = subprocess.Popen(CLI + args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    target = tmp_path / "store" / "k" / "iter-000001" / stage
    try:
        deadline = time.time() + 400
        while not target.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # inside iteration 1's `stage`
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    out = subprocess.run(CLI + ["train", "--resume", "k", "--set", f"pipeline.store={tmp_path / 'store'}"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = RunConfig.model_validate(json.loads((tmp_path / "store" / "k" / "run.json").read_text())["config"])
    if cfg.digest() not in _REFERENCE:
        _REFERENCE[cfg.digest()] = train_in_process(cfg, tmp_path / "reference").lora_path.read_bytes()
    final = tmp_path / "store" / "k" / "iter-000001" / "learner" / "adapter" / "pytorch_lora_weights.safetensors"
    assert final.read_bytes() == _REFERENCE[cfg.digest()]
