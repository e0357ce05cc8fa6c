"""The reward server against a careless or hostile client: every request bounded before anything
is decompressed, stalled clients dropped, a bounded queue (503 + Retry-After), and a token
whenever it listens beyond loopback. Servers run in a thread on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pytest

from tempflow_core.rewards import build_reward
from tempflow_core.rewards.protocol import Limits, encode_png
from tempflow_core.rewards.server import RewardServer

from servers import ROOT


@contextmanager
def serving(**kwargs) -> Iterator[RewardServer]:
    server = RewardServer("brightness", host="127.0.0.1", port=0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(10)


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url + "/score", data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"{}")


def _request(images: list[str], n: int | None = None) -> bytes:
    n = len(images) if n is None else n
    return json.dumps({"protocol": 1, "batch_id": "b", "prompts": ["p"] * n, "metadata": [{}] * n,
                       "images": images}).encode()


def _lying_png(width: int, height: int) -> str:
    """A PNG whose header declares width x height RGB pixels, with a 50-byte zlib stream of zeros
    that would inflate to all of them (the 'decompression bomb')."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compressobj(9).compress(b"\0" * 4096)  # a prefix of the stream is enough to declare it
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


def test_an_image_declaring_too_many_pixels_is_refused_from_its_header_and_the_server_goes_on():
    """A PNG declaring 30000 x 30000 pixels (the one that ended in a MemoryError inside zlib) and
    one of 8000 x 8000 (scored for 51 s at 5 GB): 413 from the header, before any decompression."""
    with serving() as server:
        for w, h in ((30000, 30000), (8000, 8000)):
            status, _, body = _post(server.url, _request([_lying_png(w, h)]))
            assert status == 413 and f"declares {w} x {h} pixels" in body["error"], body
        good = encode_png(np.full((8, 8, 3), 200, np.uint8))
        status, _, body = _post(server.url, _request([good]))
        assert status == 200 and len(body["scores"]) == 1


def test_requests_over_the_count_the_pixels_or_the_depth_are_refused_with_one_line():
    img = encode_png(np.zeros((16, 16, 3), np.uint8))
    with serving(limits=Limits(max_images=4, max_request_pixels=3 * 16 * 16)) as server:
        status, _, body = _post(server.url, _request([img] * 5))
        assert status == 413 and "request of 5 images is over 4" in body["error"]
        status, _, body = _post(server.url, _request([img] * 4))
        assert status == 413 and "over 768 pixels" in body["error"]
        status, _, body = _post(server.url, b"[" * 100_000 + b"]" * 100_000)
        assert status == 400 and "nests deeper" in body["error"], body
        status, _, body = _post(server.url, _request([img] * 3))
        assert status == 200


def test_a_token_is_required_beyond_loopback_and_checked_when_set(caplog):
    with pytest.raises(ValueError, match="listening on 0.0.0.0 .* needs a token"):
        RewardServer("brightness", host="0.0.0.0", port=0)  # refused before anything listens
    img = encode_png(np.zeros((8, 8, 3), np.uint8))
    with caplog.at_level(logging.WARNING, logger="tempflow.rewards.service"), serving(token="s3cr3t-token") as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic !!"}):
            status, got, body = _post(server.url, _request([img]), headers)
            assert status == 401 and "Bearer" in got.get("WWW-Authenticate", ""), (headers, status)
        status, _, _ = _post(server.url, _request([img]), {"Authorization": "Bearer s3cr3t-token"})
        assert status == 200
        host = server.url.removeprefix("http://")
        # the client: the token as the URL's bare user (HTTP Basic), or from the environment (Bearer)
        scores, _ = build_reward("remote", options={"remote": {"url": f"http://s3cr3t-token@{host}"}})(
            np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"], [{}, {}])
        assert scores.shape == (2,)
        os.environ["TEMPFLOW_REWARD_TOKEN"] = "s3cr3t-token"
        try:
            assert build_reward("remote", options={"remote": {"url": server.url}})(
                np.zeros((1, 8, 8, 3), np.uint8), ["a"], [{}])[0].shape == (1,)
        finally:
            del os.environ["TEMPFLOW_REWARD_TOKEN"]
    assert "401 to" in caplog.text and "s3cr3t-token" not in caplog.text and "wrong" not in caplog.text.split(
        "401 to")[0]


def test_a_stalled_client_is_dropped_and_a_full_queue_answers_503_with_retry_after():
    """One worker, no queue: a client that declares 1000 bytes and sends 2 holds the worker only
    for the read timeout; meanwhile another client gets 503 with Retry-After at once."""
    with serving(workers=1, queue=0, read_timeout=1.0) as server:
        host, port = server.httpd.server_address[:2]
        stalled = socket.create_connection((host, port))
        stalled.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{}")
        time.sleep(0.3)
        status, headers, body = _post(server.url, _request([]))
        assert status == 503 and headers.get("Retry-After") == "2" and "queue is full" in body["error"]
        stalled.setblocking(False)
        with pytest.raises(BlockingIOError):  # answered while the stalled client still held the worker
            stalled.recv(1)
        stalled.settimeout(10)
        answer = stalled.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
        stalled.close()
        time.sleep(0.2)
        assert _post(server.url, _request([encode_png(np.zeros((8, 8, 3), np.uint8))]))[0] == 200  # free again


def test_the_client_waits_out_a_503s_retry_after():
    """The same full server: with a 10 ms backoff the client's 3 tries would end in 70 ms; it waits
    the 2 s the server asks for, by which time the stalled client has been dropped."""
    with serving(workers=1, queue=0, read_timeout=1.0) as server:
        host, port = server.httpd.server_address[:2]
        stalled = socket.create_connection((host, port))
        stalled.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{}")
        time.sleep(0.3)
        try:
            reward = build_reward("remote", options={"remote": {"url": server.url, "retries": 2, "backoff": 0.01}})
            assert reward(np.zeros((1, 8, 8, 3), np.uint8), ["a"], [{}])[0].shape == (1,)
        finally:
            stalled.close()


def test_the_cli_refuses_to_listen_beyond_loopback_without_a_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TEMPFLOW_REWARD_TOKEN"}
    out = subprocess.run([sys.executable, "-m", "flows.cli", "reward-server", "--reward", "brightness", "--host",
                          "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert out.returncode == 2 and "needs a token" in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr
    (tmp_path / "empty").write_text("")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "reward-server", "--reward", "brightness", "--token-file",
                          str(tmp_path / "empty")], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert out.returncode == 2 and "is empty" in out.stderr


def test_shutting_down_does_not_wait_for_an_idle_client():
    """A connected client that sends nothing holds a worker until its read timeout (60 s here);
    the server's shutdown closes it, so the process ends at once (a 20 s limit, not 60)."""
    code = ("import socket, threading\n"
            "from tempflow_core.rewards.server import RewardServer\n"
            "s = RewardServer('brightness', read_timeout=60)\n"
            "threading.Thread(target=s.serve_forever, daemon=True).start()\n"
            "c = socket.create_connection(s.httpd.server_address[:2])\n"
            "import time; time.sleep(0.5); s.shutdown(); print('down')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20, cwd=ROOT)
    assert out.returncode == 0 and "down" in out.stdout, out.stderr[-1000:]
