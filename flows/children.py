"""Child processes that end with the process that started them.

`spawn(cmd)` runs cmd under a small watchdog, this file run as a script:

    python flows/children.py PARENT_PID GRACE_S -- cmd...

The watchdog starts cmd in a process group of its own and ends that whole group (SIGTERM,
then SIGKILL after GRACE_S) when its parent dies (the kernel's PR_SET_PDEATHSIG on Linux,
and a watch of its parent pid everywhere) or when it is asked to stop (SIGTERM, SIGINT);
when cmd ends by itself, the watchdog exits with cmd's code. So servers that fork workers
(`mlflow ui`, `prefect server start`) or ignore SIGTERM while they start go down with it: a
`kill -9` of the CLI or of pytest leaves nothing running.

`stop(proc)` ends any child: SIGTERM, a grace period, SIGKILL. `end_with_parent(pid)` is the
same guarantee for a process that is itself the server (`tempflow reward-server
--parent-pid`, the temporary Prefect API of flows/local_api.py).

Only the standard library is imported here: the watchdog must start fast and anywhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from tempflow_core.executables import executable  # noqa: F401  (flows' commands use children.executable)

_PR_SET_PDEATHSIG = 1


def _ask_for_sigterm_when_parent_dies() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def end_with_parent(parent: int) -> None:
    """Exit this process when `parent` ends: SIGTERM from the kernel (Linux) and a watchdog
    thread everywhere."""
    _ask_for_sigterm_when_parent_dies()
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a child server to listen on)."""
    import contextlib
    import socket

    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port` (a server started there would not bind, and
    its health check would answer from the other one)."""
    import contextlib
    import socket

    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def spawn(cmd: list[str], grace: float = 10.0, **popen_kwargs: Any) -> subprocess.Popen:
    """Popen(cmd) bound to this process's life (see the module docstring). The returned
    process is the watchdog: its exit code is cmd's, and `stop()` on it ends cmd's group.

    The watchdog runs in a session of its own, so a Ctrl-C in the terminal reaches only this
    process: it decides when its servers end (after a Prefect runner has said goodbye to its
    API, not while it still talks to it). Its death still takes them down (see above)."""
    watchdog = [sys.executable, os.path.abspath(__file__), str(os.getpid()), str(grace), "--", *cmd]
    popen_kwargs.setdefault("start_new_session", True)
    return subprocess.Popen(watchdog, **popen_kwargs)


def prefect_server(port: int, **popen_kwargs: Any) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:`port` under spawn(); its UI's pages call the API
    they are served with (Prefect's default would be port 4200 whatever the port)."""
    env = {**popen_kwargs.pop("env", os.environ), "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    cmd = [executable("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return spawn(cmd, env=env, **popen_kwargs)


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM, wait up to `timeout` s, then SIGKILL; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _end_group(child: subprocess.Popen, grace: float) -> None:
    """SIGTERM to cmd's group, SIGKILL to whatever of it is left after `grace` s."""
    try:
        os.killpg(child.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:  # also the workers the leader left behind
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def _watch(parent: int, grace: float, cmd: list[str]) -> int:
    asked = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: asked.set())
    _ask_for_sigterm_when_parent_dies()
    if os.getppid() != parent:
        return 0
    child = subprocess.Popen(cmd, start_new_session=True)
    while child.poll() is None and not asked.is_set() and os.getppid() == parent:
        asked.wait(0.5)
    code = child.poll()
    _end_group(child, grace if code is None else 0.0)
    code = child.returncode if code is None else code
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[3] != "--":
        sys.exit("usage: children.py PARENT_PID GRACE_S -- cmd...")
    sys.exit(_watch(int(sys.argv[1]), float(sys.argv[2]), sys.argv[4:]))
