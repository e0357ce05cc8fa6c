"""The reward server: a registered reward behind /health and /score (protocol.py).

    tempflow reward-server --reward shapes --port 8701
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import inspect
import ipaddress
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from queue import Full, Queue
from typing import Any

from tempflow_core import __version__
from tempflow_core.rewards.protocol import (
    PROTOCOL, Limits, ProtocolError, ScoreRequest, ScoreResponse, TooLarge, _error, _json, decode_request,
    encode_response,
)
from tempflow_core.rewards.registry import RewardError, RewardRegistry

RETRY_AFTER_S = 2  # what a client is told to wait when the queue is full


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is only reachable from this machine."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _BoundedServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer whose connections run on `workers` threads with at most `queue`
    more waiting; past that a connection is answered 503 with Retry-After and closed, by one
    thread of its own (which first reads what the client sends, at most 0.5 s, so that closing
    does not reset the connection under the answer; at most 64 such connections wait for it,
    any beyond are closed at once)."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog (the default 5 reset clients under a burst)

    def __init__(self, address: tuple[str, int], handler: type, workers: int, queue: int):
        super().__init__(address, handler)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="reward-server")
        self._slots = threading.BoundedSemaphore(workers + queue)
        self._rejected: Queue[Any] = Queue(maxsize=64)
        self._active: set[Any] = set()  # connections a worker holds (closed on shutdown: no read outlives it)
        self._active_lock = threading.Lock()
        threading.Thread(target=self._reject_loop, name="reward-server-503", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                self._rejected.put_nowait(request)
            except Full:
                self.shutdown_request(request)
            return

        def run() -> None:
            with self._active_lock:
                self._active.add(request)
            try:
                self.process_request_thread(request, client_address)
            finally:
                with self._active_lock:
                    self._active.discard(request)
                self._slots.release()

        self._pool.submit(run)

    def _reject_loop(self) -> None:
        body = _error(f"the server's queue is full; retry in {RETRY_AFTER_S} s")
        answer = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: %d\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (RETRY_AFTER_S, len(body), body))
        while True:
            request = self._rejected.get()
            if request is None:
                return
            try:
                request.settimeout(0.1)
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline and request.recv(65536):
                    pass
            except OSError:  # the client stopped sending (a timeout) or went away
                pass
            try:
                request.settimeout(1.0)
                request.sendall(answer)
            except OSError:
                pass
            self.shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        with self._active_lock:
            for request in list(self._active):  # a worker blocked reading an idle client returns now
                try:
                    request.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            self._rejected.put_nowait(None)
        except Full:
            pass


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
    """A registered reward (of `rewards`, default the built-in ones) behind /health and /score.

    Built to be exposed: requests are bounded (`limits`: body, images, every image's declared
    pixels, read before anything is decompressed), a client has `read_timeout` seconds to send
    each request, `workers` threads decode requests with at most `queue` connections waiting
    (503 + Retry-After beyond), and a `token` is required whenever `host` is not loopback
    (optional on loopback). The reward itself runs one batch at a time (a model on one GPU is
    not reentrant), so concurrent clients queue.
    """

    def __init__(self, reward: str, options: dict[str, Any] | None = None, host: str = "127.0.0.1", port: int = 0,
                 rewards: RewardRegistry | None = None, token: str | None = None, limits: Limits = Limits(),
                 workers: int = 4, queue: int = 16, read_timeout: float = 30.0):
        if reward == "weighted":
            raise ValueError("serve the parts of a weighted reward and combine them on the client (reward 'weighted' "
                             "over remote rewards)")
        if not token and not is_loopback(host):
            raise ValueError(f"listening on {host} (beyond this machine) needs a token: set TEMPFLOW_REWARD_TOKEN or "
                             "pass --token-file (clients send it as Authorization: Bearer)")
        if workers < 1 or queue < 0 or read_timeout <= 0:
            raise ValueError(f"workers ({workers}) must be >= 1, queue ({queue}) >= 0, read_timeout ({read_timeout}) > 0")
        self.token, self.limits, self.read_timeout = token or None, limits, float(read_timeout)
        self.name = reward
        self.options = dict(options or {})
        rewards = rewards or RewardRegistry.builtin()
        self.fn = rewards.build(reward, options={reward: self.options})
        self.version = reward_version(reward, self.options, rewards)
        self._lock = threading.Lock()
        self.httpd = _BoundedServer((host, port), self._handler(), workers, queue)

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

    def authorized(self, header: str | None) -> bool:
        """Whether an Authorization header carries the token (Bearer, or Basic with the token as
        the password or as a bare user name); always when the server has none."""
        if self.token is None:
            return True
        scheme, _, value = (header or "").partition(" ")
        offered = [value.strip()] if scheme.lower() == "bearer" else []
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return False
            offered = [password] if password else [user]
        return any(hmac.compare_digest(o.encode(), self.token.encode()) for o in offered)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = server.read_timeout  # every read of a request: a stalled client is dropped

            def setup(self) -> None:
                super().setup()
                # headers and body leave in two writes: without NODELAY, Nagle's algorithm holds the
                # body until the client's delayed ACK (~40 ms a request)
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                log.debug("%s " + format, self.address_string(), *args)

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Bearer realm="tempflow reward server"')
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _denied(self) -> bool:
                if server.authorized(self.headers.get("Authorization")):
                    return False
                log.warning("401 to %s: %s token", self.address_string(),
                            "a wrong" if self.headers.get("Authorization") else "no")  # never the token itself
                self.close_connection = True  # a body, if any, is not read
                self._send(401, _error("this reward server needs its token: Authorization: Bearer TOKEN"))
                return True

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self._denied():
                    return
                ok = self.path.rstrip("/") == "/health"
                self._send(200 if ok else 404, _json(server.health()) if ok else _error(f"no such path {self.path!r}"))

            def do_POST(self) -> None:  # noqa: N802
                if not self._denied():
                    self._send(*self._score())

            def _score(self) -> tuple[int, bytes]:
                if self.path.rstrip("/") != "/score":
                    return 404, _error(f"no such path {self.path!r}: GET /health, POST /score")
                length = self.headers.get("Content-Length", "")
                if not length.isdigit():
                    self.close_connection = True  # where the body ends is unknown
                    return 400, _error("POST /score needs a Content-Length header")
                if int(length) > server.limits.max_body_bytes:
                    self.close_connection = True  # the body was not read
                    return 413, _error(f"request of {length} bytes is over {server.limits.max_body_bytes}: send "
                                       "smaller batches")
                try:
                    body = self.rfile.read(int(length))
                except TimeoutError:
                    self.close_connection = True
                    return 408, _error(f"the request's body did not arrive within {server.read_timeout:g} s")
                if len(body) < int(length):
                    self.close_connection = True
                    return 400, _error(f"the body ended after {len(body)} of its {length} bytes")
                try:
                    req = decode_request(body, server.limits)
                    del body  # only the decoded pixels stay while the reward runs
                except TooLarge as e:
                    return 413, _error(str(e))
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
