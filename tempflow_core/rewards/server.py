"""The reward server: a registered reward behind /health and /score (protocol.py).

    tempflow reward-server --reward shapes --port 8701
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tempflow_core import __version__
from tempflow_core.rewards.protocol import (
    MAX_BODY_BYTES, PROTOCOL, ProtocolError, ScoreRequest, ScoreResponse, _error, _json, decode_request,
    encode_response,
)
from tempflow_core.rewards.registry import RewardError, RewardRegistry

log = logging.getLogger("tempflow.rewards.service")


def reward_version(name: str, options: dict[str, Any], rewards: RewardRegistry) -> str:
    """'<package version>+<12 hex>': the digest covers the factory's source file and its options."""
    h = hashlib.sha256(name.encode())
    src = inspect.getsourcefile(rewards.factory(name))
    if src:
        h.update(Path(src).read_bytes())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    return f"{__version__}+{h.hexdigest()[:12]}"


class RewardServer:
    """A registered reward (of `rewards`, default the built-in ones) behind /health and /score on
    a ThreadingHTTPServer.

    Requests are decoded in parallel; the reward itself runs one batch at a time (a model on
    one GPU is not reentrant), so concurrent clients queue.
    """

    def __init__(self, reward: str, options: dict[str, Any] | None = None, host: str = "127.0.0.1", port: int = 0,
                 rewards: RewardRegistry | None = None):
        if reward == "weighted":
            raise ValueError("serve the parts of a weighted reward and combine them on the client (reward 'weighted' "
                             "over remote rewards)")
        self.name = reward
        self.options = dict(options or {})
        rewards = rewards or RewardRegistry.builtin()
        self.fn = rewards.build(reward, options={reward: self.options})
        self.version = reward_version(reward, self.options, rewards)
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host.decode() if isinstance(host, bytes) else host}:{port}"

    def health(self) -> dict[str, Any]:
        return {"protocol": PROTOCOL, "reward": self.name, "version": self.version}

    def score(self, req: ScoreRequest) -> ScoreResponse:
        t0 = time.perf_counter()
        with self._lock:
            scores, details = self.fn(req.images, req.prompts, req.metadata)
        return ScoreResponse(req.batch_id, self.name, self.version, scores, details, time.perf_counter() - t0)

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # headers and body leave in two writes: without NODELAY, Nagle's algorithm holds the
                # body until the client's delayed ACK (~40 ms a request)
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                log.debug("%s " + format, self.address_string(), *args)

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                ok = self.path.rstrip("/") == "/health"
                self._send(200 if ok else 404, _json(server.health()) if ok else _error(f"no such path {self.path!r}"))

            def do_POST(self) -> None:  # noqa: N802
                self._send(*self._score())

            def _score(self) -> tuple[int, bytes]:
                if self.path.rstrip("/") != "/score":
                    return 404, _error(f"no such path {self.path!r}: GET /health, POST /score")
                length = self.headers.get("Content-Length", "")
                if not length.isdigit():
                    self.close_connection = True  # where the body ends is unknown
                    return 400, _error("POST /score needs a Content-Length header")
                if int(length) > MAX_BODY_BYTES:
                    self.close_connection = True  # the body was not read
                    return 413, _error(f"request of {length} bytes is over {MAX_BODY_BYTES}: send smaller batches")
                try:
                    req = decode_request(self.rfile.read(int(length)))
                except ProtocolError as e:
                    return 400, _error(str(e))
                try:
                    return 200, encode_response(server.score(req))
                except (RewardError, ValueError, KeyError) as e:  # the input is unusable: the same every time
                    return 422, _error(f"reward {server.name!r}: {type(e).__name__}: {e}")
                except Exception as e:  # noqa: BLE001 - reported to the client, logged here
                    log.exception("reward %r failed on batch %s", server.name, req.batch_id)
                    return 500, _error(f"reward {server.name!r} failed: {type(e).__name__}: {e}")

        return Handler
