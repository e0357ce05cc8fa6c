"""Reward servers for tests: a real `tempflow reward-server` process on a free port of 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from flows import children
from flows.children import stop

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def reward_server(reward: str, *options: str, timeout: float = 60.0) -> Iterator[str]:
    """A `tempflow reward-server` process serving `reward` on a free port; yields its URL and
    checks on the way out that the process has ended."""
    cmd = [sys.executable, "-m", "flows.cli", "reward-server", "--reward", reward, "--port", "0",
           "--parent-pid", str(os.getpid())] + [a for o in options for a in ("--option", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line, deadline = "", time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while "serving reward" not in line:
                if proc.poll() is not None or time.monotonic() > deadline or not sel.select(deadline - time.monotonic()):
                    pytest.fail(f"reward server {reward!r} did not start (exit {proc.poll()}): {line}")
                line = proc.stdout.readline()
        yield line.split(" at ")[1].split()[0]
    finally:
        stop(proc, timeout=10)
        proc.stdout.close()
    assert proc.returncode is not None


free_port = children.free_port  # a port of 127.0.0.1 that nothing listens on (a down server's address)
