"""A fault-injecting HTTP reverse proxy for S3 tests (127.0.0.1 only).

It forwards every request to an upstream S3 server (moto) and, for a seeded share of requests,
answers 500/503 instead, drops the connection before answering, or cuts a response body in the
middle. Failures are bounded (`max_consecutive`) so that a client with a few retries always gets
through, which keeps the "transient faults" tests deterministic in outcome; `fail_rate=1.0` with
`max_consecutive=None` simulates a server that is down for good.
"""

from __future__ import annotations

import http.client
import io
import random
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "proxy-connection"}
ALL_MODES = ("500", "503", "drop", "drop_mid")


class FaultProxy:
    """Threaded reverse proxy. Use as a context manager or call start()/stop().

    Args:
        upstream: e.g. "http://127.0.0.1:5555".
        fail_rate: share of requests that fail (0..1).
        modes: which faults to draw from: "500", "503", "drop" (close before answering),
            "drop_mid" (send headers and half the body of a response, then close).
        seed: seeds the fault draws.
        max_consecutive: at most this many failures in a row (None: unbounded).
    """

    def __init__(self, upstream: str, *, fail_rate: float = 0.0, modes: tuple[str, ...] = ALL_MODES,
                 seed: int = 0, max_consecutive: int | None = 2):
        up = urlsplit(upstream)
        self.upstream_host, self.upstream_port = up.hostname or "127.0.0.1", up.port or 80
        self.fail_rate = fail_rate
        self.modes = tuple(modes)
        self.max_consecutive = max_consecutive
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._consecutive = 0
        self._forced: list[str] = []
        self.stats: Counter[str] = Counter()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._sockets: set[socket.socket] = set()

    # -- lifecycle
    def start(self) -> str:
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            socks = list(self._sockets)
        for s in socks:  # idle keep-alive connections: end their handler threads
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> "FaultProxy":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- fault decisions
    def force(self, *modes: str) -> None:
        """Apply these faults, in order, to the next requests they fit ("drop_mid" waits for a
        GET), before any random draw: deterministic coverage of every fault kind."""
        with self._lock:
            self._forced.extend(modes)

    def decide(self, has_body: bool) -> str:
        with self._lock:
            for i, mode in enumerate(self._forced):
                if has_body or mode != "drop_mid":
                    del self._forced[i]
                    self.stats[mode] += 1
                    return mode
            fail = self._rng.random() < self.fail_rate
            if self.max_consecutive is not None and self._consecutive >= self.max_consecutive:
                fail = False
            mode = "ok"
            if fail:
                modes = [m for m in self.modes if has_body or m != "drop_mid"] or ["503"]
                mode = self._rng.choice(modes)
            self._consecutive = self._consecutive + 1 if fail else 0
            self.stats[mode] += 1
            return mode

    @property
    def failures(self) -> int:
        return sum(n for m, n in self.stats.items() if m != "ok")


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._sockets.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.owner._lock:
                self.owner._sockets.discard(self.connection)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.wfile = io.BytesIO()  # the base class flushes after the handler: not into a dead socket

    def _error(self, status: int) -> None:
        code = "InternalError" if status == 500 else "ServiceUnavailable"
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>injected fault</Message></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        body = self._read_body()
        mode = self.owner.decide(has_body=self.command == "GET")
        if mode == "drop":
            return self._drop()
        if mode in ("500", "503"):
            return self._error(int(mode))
        conn = http.client.HTTPConnection(self.owner.upstream_host, self.owner.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            resp_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
            status, reason = resp.status, resp.reason
        finally:
            conn.close()
        self.send_response(status, reason)
        has_length = False
        for k, v in resp_headers:
            if k.lower() == "content-length":
                has_length = True
            self.send_header(k, v)
        if not has_length:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if mode == "drop_mid" and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            return self._drop()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
