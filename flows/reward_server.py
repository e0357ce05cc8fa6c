"""A `tempflow reward-server` child process on a free port of 127.0.0.1, for benchmarks and tests.

    with reward_server_process("shapes") as url:
        build_reward("remote", options={"remote": {"url": url}})

The server is started with `--parent-pid` (it exits when this process ends, also by SIGKILL)
and stopped, and its end checked, when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from flows.children import stop

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def reward_server_process(reward: str, options: Sequence[str] = (), threads: int = 1,
                          timeout: float = 60.0, plugins: Sequence[str] = ()) -> Iterator[str]:
    """Serve `reward` (with `--option` KEY=VALUE `options`, `--plugin` modules, `threads` torch
    threads) on a free port; yields its URL.

    Raises:
        RuntimeError: the server did not print its URL within `timeout` s (its last line is named).
    """
    cmd = [sys.executable, "-m", "flows.cli", "reward-server", "--reward", reward, "--port", "0",
           "--parent-pid", str(os.getpid())] + [a for o in options for a in ("--option", o)] + \
        [a for m in plugins for a in ("--plugin", m)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line, deadline = "", time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while "serving reward" not in line:
                if proc.poll() is not None or time.monotonic() > deadline or not sel.select(deadline - time.monotonic()):
                    raise RuntimeError(f"reward server {reward!r} did not start (exit {proc.poll()}): {line.strip()}")
                line = proc.stdout.readline()
        yield line.split(" at ")[1].split()[0]
    finally:
        stop(proc, timeout=10)
        proc.stdout.close()
    if proc.returncode is None:
        raise RuntimeError(f"reward server {reward!r} (pid {proc.pid}) did not end")
