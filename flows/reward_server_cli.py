"""`tempflow reward-server`: serve a registered reward over HTTP (registered on the CLI's app
in flows/cli.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from flows import children
from flows.cli_errors import fail as _fail


def reward_server(
    reward: str = typer.Option(..., "--reward", help="Registered reward to serve (ocr, shapes, pickscore, ...)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; beyond loopback a token is required "
                             "(TEMPFLOW_REWARD_TOKEN or --token-file). TLS: put a reverse proxy in front (docs: Rewards)."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="A file holding the token clients must send "
                                              "(Authorization: Bearer); default: the TEMPFLOW_REWARD_TOKEN variable. "
                                              "Never on the command line."),
    workers: int = typer.Option(4, "--workers", help="Threads that read and decode requests (the reward itself runs "
                                "one batch at a time)."),
    queue: int = typer.Option(16, "--queue", help="Connections that may wait for a worker; beyond, 503 with "
                              "Retry-After."),
    read_timeout: float = typer.Option(30.0, "--read-timeout", help="Seconds a client has for each read of its "
                                       "request; a stalled client is dropped."),
    max_body_mb: int = typer.Option(128, "--max-body-mb", help="Largest request body (413 beyond)."),
    max_images: int = typer.Option(1024, "--max-images", help="Most images in one request (413 beyond)."),
    max_image_side: int = typer.Option(4096, "--max-image-side", help="Largest width x height of an image, as a side "
                                       "(read from its PNG header before decoding; 413 beyond)."),
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
    from tempflow_core.rewards.protocol import Limits
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
    token = os.environ.get("TEMPFLOW_REWARD_TOKEN", "").strip() or None
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError) as e:
            _fail(f"--token-file {str(token_file)!r} cannot be read ({type(e).__name__}); fix: a text file holding "
                  "the token")
        if token is None:
            _fail(f"--token-file {str(token_file)!r} is empty; fix: write the token into it")
    limits = Limits(max_body_bytes=max_body_mb * 1024 * 1024, max_images=max_images,
                    max_image_pixels=max_image_side * max_image_side)
    try:
        server = RewardServer(reward, opts, host, port, rewards=rewards, token=token, limits=limits, workers=workers,
                              queue=queue, read_timeout=read_timeout)
    except ValueError as e:
        _fail(f"--host {host}: {e}" if "token" in str(e) else str(e))
    except OSError as e:
        _fail(f"cannot listen on {host}:{port}: {e}", 1)
    typer.echo(f"serving reward {reward!r} version {server.version} at {server.url} "
               f"(GET /health, POST /score; {'a token required' if token else 'no token'}; Ctrl-C stops)")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
