"""`tempflow reward-server`: serve a registered reward over HTTP (registered on the CLI's app
in flows/cli.py)."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from flows import children
from flows.cli_errors import fail as _fail


def reward_server(
    reward: str = typer.Option(..., "--reward", help="Registered reward to serve (ocr, shapes, pickscore, ...)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. The protocol has no authentication: "
                             "keep it on 127.0.0.1 or a private network."),
    port: int = typer.Option(8701, "--port", help="Port (0: a free one; the URL is printed at start)."),
    option: list[str] = typer.Option([], "--option", "-o", help="Reward option KEY=VALUE (repeatable), e.g. -o threads=4."),
    plugin: list[str] = typer.Option([], "--plugin", help="A module that adds rewards (REWARDS = {name: factory}), "
                                     "as reward.plugins (repeatable)."),
    parent_pid: Optional[int] = typer.Option(None, "--parent-pid", help="Exit when the process with this id ends "
                                             "(for supervisors and tests)."),
) -> None:
    """Serve a registered reward over HTTP (GET /health, POST /score) for reward.name=remote:

        tempflow reward-server --reward ocr --port 8701
        tempflow train --set reward.name=remote --set reward.options.remote.url=http://127.0.0.1:8701
    """
    from tempflow_core.config import ConfigError, apply_overrides
    from tempflow_core.run.preflight import PreflightError, check_reward, reward_registry
    from tempflow_core.rewards.server import RewardServer

    if parent_pid is not None:
        children.end_with_parent(parent_pid)
    try:
        opts = apply_overrides({}, option)
        rewards = reward_registry(plugin)
        check_reward(reward, {}, {reward: opts} if opts else {}, "--reward", rewards=rewards)
    except (ConfigError, PreflightError) as e:
        _fail(str(e).replace(f"reward.options.{reward}.", "--option ").replace("reward.plugins", "--plugin"))
    if reward == "weighted":
        _fail("--reward weighted: serve each part and combine them on the client (reward.name=weighted over "
              "remote:LABEL rewards)")
    try:
        server = RewardServer(reward, opts, host, port, rewards=rewards)
    except OSError as e:
        _fail(f"cannot listen on {host}:{port}: {e}", 1)
    typer.echo(f"serving reward {reward!r} version {server.version} at {server.url} "
               "(GET /health, POST /score; Ctrl-C stops)")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
