"""Reward servers for tests: a real `tempflow reward-server` process on a free port of 127.0.0.1."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from flows import children
from flows.reward_server import reward_server_process

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def reward_server(reward: str, *options: str, timeout: float = 60.0) -> Iterator[str]:
    """A `tempflow reward-server` process serving `reward` on a free port (one torch thread);
    yields its URL and checks on the way out that the process has ended."""
    with reward_server_process(reward, options, threads=1, timeout=timeout) as url:
        yield url


free_port = children.free_port  # a port of 127.0.0.1 that nothing listens on (a down server's address)
