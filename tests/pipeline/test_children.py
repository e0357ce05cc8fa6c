"""Processes the CLI and the tests start end with their starter, also under `kill -9`
(flows/children.py): real processes, real signals, real servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from flows import children

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    """True while pid runs (a zombie nobody reaped yet counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _read_pids(path: Path, n: int, proc: subprocess.Popen, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().split()) == n:
            return [int(x) for x in path.read_text().split()]
        assert proc.poll() is None, f"the starter exited early ({proc.returncode})"
        time.sleep(0.1)
    raise AssertionError(f"{path} never listed {n} pids")


# cmd: writes its own pid and that of a worker it forks; both ignore SIGTERM, like a server
# that is still starting, so only the watchdog's SIGKILL ends them
STUBBORN = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    with open(sys.argv[1], "a") as f:
        f.write(f"{os.getpid()} {worker.pid} ")
    time.sleep(600)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_starter_takes_the_whole_group_with_it(tmp_path):
    pids = tmp_path / "pids"
    starter = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from flows import children
        p = children.spawn([sys.executable, "-c", {STUBBORN!r}, {str(pids)!r}], grace=1.0)
        with open({str(pids)!r}, "a") as f:
            f.write(f"{{p.pid}} ")
        time.sleep(600)
    """)])
    try:
        watched = _read_pids(pids, 3, starter)  # watchdog, cmd, cmd's worker
        assert all(_alive(p) for p in watched)
        starter.kill()  # kill -9: no atexit, no finally
        starter.wait()
        assert _wait_gone(watched, timeout=20) == [], "processes outlived their starter"
    finally:
        starter.kill()
        for p in (int(x) for x in (pids.read_text().split() if pids.exists() else [])):
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_stop_ends_the_group_and_an_ended_command_passes_its_code_on(tmp_path):
    assert children.spawn([sys.executable, "-c", "import sys; sys.exit(3)"]).wait(timeout=30) == 3
    pids = tmp_path / "pids"
    proc = children.spawn([sys.executable, "-c", STUBBORN, str(pids)], grace=1.0)
    watched = [proc.pid] + _read_pids(pids, 2, proc)
    assert children.stop(proc, timeout=20) == 128 + signal.SIGKILL  # SIGTERM ignored: killed after the grace
    assert _wait_gone(watched, timeout=10) == []


def _descendants(pid: int) -> list[int]:
    kids = [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]
    return kids + [d for k in kids for d in _descendants(k)]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_tempflow_ui_servers_end_when_the_cli_is_killed(tmp_path):
    prefect_port, mlflow_port = children.free_port(), children.free_port()
    urls = [f"http://127.0.0.1:{prefect_port}/api/health", f"http://127.0.0.1:{mlflow_port}/health"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env["TEMPFLOW_HOME"] = str(tmp_path / "home")
    cli = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--prefect-port", str(prefect_port),
                            "--mlflow-port", str(mlflow_port)], cwd=ROOT, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not all(_answers(u) for u in urls):
            assert cli.poll() is None, f"tempflow ui exited ({cli.returncode})"
            assert time.monotonic() < deadline, "the Prefect and MLflow UIs did not come up"
            time.sleep(0.5)
        servers = _descendants(cli.pid)
        assert len(servers) >= 4  # two watchdogs, the Prefect server, the MLflow server (+ their workers)
        cli.kill()  # the CLI alone, by SIGKILL
        cli.wait()
        assert _wait_gone(servers, timeout=45) == [], "a server outlived `tempflow ui`"
        assert not any(_answers(u) for u in urls)
    finally:
        left = _descendants(cli.pid) if cli.poll() is None else []
        cli.kill()
        cli.wait()
        for pid in left + [p for p in locals().get("servers", []) if _alive(p)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
