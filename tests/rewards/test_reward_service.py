"""Rewards as services: `tempflow reward-server` processes on 127.0.0.1 and the `remote` reward.

Real servers are started through the CLI (`python -m flows.cli reward-server --port 0`) with
--parent-pid, so they end with this process even when pytest is killed; the failure modes
(down, slow, garbage, wrong count, transient 5xx) come from a tiny stdlib server in a thread.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import numpy as np
import pytest
import torch

from tempflow_core.config import RunConfig
from tempflow_core.run.layout import RunLayout
from tempflow_core.batches import PromptEmbeds
from tempflow_core.run.preflight import PreflightError, check_reward
from tempflow_core.prompts import load_prompts
from tempflow_core.rewards import build_reward, reward_servers
from tempflow_core.rewards.remote import RemoteRewardError, RemoteRewardUnavailable
from tempflow_core.rewards.protocol import ScoreResponse, decode_request, encode_png, encode_response
from tempflow_core.batches import RolloutBatch, Trajectory
from tempflow_core.shapes import render_batch
from tempflow_core.shards import read_manifest, read_scores, write_rollouts
from tempflow_core.storage import open_store

from servers import ROOT, free_port, reward_server

@pytest.fixture(scope="module")
def shapes_url() -> Iterator[str]:
    with reward_server("shapes") as url:
        yield url


@pytest.fixture(scope="module")
def shapes_batch():
    records = load_prompts("builtin:shapes_test")[:16]
    return render_batch(records, seed=9), [r.text for r in records], [r.metadata for r in records]


# ----------------------------------------------------------------------------- a real server


def test_remote_scores_equal_the_in_process_reward(shapes_url, shapes_batch):
    images, prompts, meta = shapes_batch
    remote = build_reward("remote", options={"remote": {"url": shapes_url, "batch_size": 5}})  # 4 requests
    scores, details = remote(images, prompts, meta)
    local, local_details = build_reward("shapes")(images, prompts, meta)
    assert scores.dtype == np.float32 and np.array_equal(scores, local)
    assert set(details) == set(local_details)
    for k, v in local_details.items():  # strict_<tag> is NaN for other tasks' images: NaN travels as null
        assert np.array_equal(details[k], v, equal_nan=True), k
    with urllib.request.urlopen(f"{shapes_url}/health", timeout=5) as r:
        health = json.loads(r.read())
    assert health["reward"] == "shapes" and health["version"].startswith("0.1.0+")
    assert reward_servers(remote) == {"remote": {"url": shapes_url, "reward": "shapes", "version": health["version"],
                                                 "protocol": 1}}
    assert reward_servers(build_reward("shapes")) == {}


def test_several_servers_combine_through_weighted(shapes_url, shapes_batch):
    images, prompts, meta = shapes_batch
    with reward_server("brightness") as bright_url:
        w = build_reward("weighted", weights={"remote:shapes": 1.0, "remote:bright": 0.5},
                         options={"remote:shapes": {"url": shapes_url}, "remote:bright": {"url": bright_url}})
        total, details = w(images, prompts, meta)
        check_reward("weighted", {"remote:shapes": 1.0, "remote:bright": 0.5},
                     {"remote:shapes": {"url": shapes_url}, "remote:bright": {"url": bright_url}}, "reward.name")
    s, _ = build_reward("shapes")(images, prompts, meta)
    b, _ = build_reward("brightness")(images, prompts, meta)
    np.testing.assert_allclose(total, s + np.float32(0.5) * b, rtol=1e-6)
    assert {"remote:shapes", "remote:bright", "remote:shapes/strict"} <= set(details)
    servers = reward_servers(w)
    assert {k: v["reward"] for k, v in servers.items()} == {"remote:shapes": "shapes", "remote:bright": "brightness"}
    assert servers["remote:bright"]["url"] == bright_url


def test_the_server_refuses_malformed_requests(shapes_url):
    def post(path: str, body: bytes) -> tuple[int, str]:
        req = urllib.request.Request(shapes_url + path, data=body, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())["error"]

    assert post("/score", b"not json") == (400, "request is not JSON (Expecting value: line 1 column 1 (char 0)): "
                                                "b'not json'")
    status, error = post("/score", json.dumps({"protocol": 2}).encode())
    assert status == 400 and "protocol 2" in error
    status, error = post("/score", json.dumps({"protocol": 1, "prompts": ["a"], "metadata": [{}],
                                               "images": ["bm90IGEgcG5n"]}).encode())
    assert status == 400 and "not base64 PNG" in error
    status, error = post("/score", json.dumps({"protocol": 1, "prompts": ["a purple star"], "metadata": [{}],
                                               "images": [encode_png(np.zeros((8, 8, 3), np.uint8))]}).encode())
    assert status == 422 and "reward 'shapes': KeyError" in error  # no such shapes prompt: not retried
    assert post("/nope", b"{}")[0] == 404


class _Stub:  # the SessionCache of reward_stage: only the reward is used
    def __init__(self, reward_fn):
        self.reward_fn = reward_fn

    def get(self, cfg):
        return self


def test_reward_stage_manifest_names_the_server(shapes_url, shapes_batch, tmp_path):
    from tempflow_core.run.stages import reward_stage

    images, prompts, meta = shapes_batch
    n, steps = 4, 2
    g = torch.Generator().manual_seed(0)
    embeds = PromptEmbeds(torch.randn(n, 5, 8, generator=g), torch.randn(n, 6, generator=g),
                          torch.randn(1, 5, 8, generator=g), torch.randn(1, 6, generator=g))
    trajs = [Trajectory(i, f"p{i}", 0, i, torch.randn(steps + 1, 4, 8, 8, generator=g), torch.randn(steps, generator=g),
                        images[i]) for i in range(n)]
    batch = RolloutBatch("plain", prompts[:n], [f"p{i}" for i in range(n)], embeds,
                         torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), trajectories=trajs)
    cfg = RunConfig.model_validate({"reward": {"name": "remote", "options": {"remote": {"url": shapes_url}}},
                                    "pipeline": {"store": str(tmp_path / "store")}})
    layout = RunLayout(open_store(str(tmp_path / "store")), "run")
    records = [{"id": f"p{i}", "text": prompts[i], "metadata": meta[i]} for i in range(n)]
    write_rollouts(batch, layout.store, layout.prefix(1, "rollout"), extra={"records": records})
    reward_stage(cfg, layout, 1, _Stub(build_reward("remote", options=cfg.reward.options)))
    m = read_manifest(layout.store, layout.prefix(1, "reward"))
    server = m.extra["meta"]["servers"]["remote"]
    assert server["url"] == shapes_url and server["reward"] == "shapes" and server["version"].startswith("0.1.0+")
    scores = read_scores(layout.store, layout.iteration_prefix(1), "reward")
    expected, _ = build_reward("shapes")(images[:n], prompts[:n], meta[:n])
    assert np.array_equal(scores.aligned(batch.sample_keys(), "reward"), expected)


def test_server_ends_with_its_parent():
    """kill -9 of the process that started a server: the server goes too (PR_SET_PDEATHSIG / watchdog)."""
    parent_code = ("import os, subprocess, sys, time\n"
                   "p = subprocess.Popen([sys.executable, '-m', 'flows.cli', 'reward-server', '--reward', 'brightness',"
                   " '--port', '0', '--parent-pid', str(os.getpid())], stdout=subprocess.PIPE, text=True)\n"
                   "print(p.stdout.readline().split(' at ')[1].split()[0], flush=True)\n"
                   "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = parent.stdout.readline().strip()
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            assert r.status == 200
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1).close()
        except OSError:
            break  # refused: the server is gone
        assert time.monotonic() < deadline, f"reward server at {url} outlived its parent"
        time.sleep(0.2)


# ----------------------------------------------------------------------------- failures


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a slow answer to a client that left: expected
        pass


class FakeServer:
    """A stdlib server in a thread: GET /health answers `health`; each POST /score follows the
    next action of `script` (the last one repeats): ok (brightness scores), 503, reset (close
    without answering), slow (1 s, then ok), garbage (200, not JSON), short (one score too few),
    422 (the reward rejects the input)."""

    def __init__(self, script: list[str], health: str = "ok"):
        self.script, self.health, self.requests = script, health, 0
        self.active = self.max_active = 0  # requests being answered at once
        lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes) -> None:
                self._answered()  # before the client can read the answer and send its next request
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                ok = json.dumps({"protocol": 1, "reward": "fake", "version": "1"}).encode()
                self._send(200, ok if fake.health == "ok" else b"<html>hello</html>")

            def do_POST(self):
                with lock:
                    fake.active += 1
                    fake.max_active = max(fake.max_active, fake.active)
                self.answering = True
                try:
                    self._post()
                finally:
                    self._answered()

            def _answered(self) -> None:
                """This request no longer counts as being answered (once per request)."""
                if getattr(self, "answering", False):
                    self.answering = False
                    with lock:
                        fake.active -= 1

            def _post(self):
                req = decode_request(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    action = fake.script[min(fake.requests, len(fake.script) - 1)]
                    fake.requests += 1
                n = len(req.images)
                scores = req.images.reshape(n, -1).mean(axis=1).astype(np.float32) / 255
                if action == "reset":
                    self._answered()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if action == "slow":
                    time.sleep(1.0)
                body = {"503": b'{"error": "busy"}', "garbage": b"<html>oops</html>",
                        "422": b'{"error": "no quoted text in prompt"}'}.get(action)
                if body is None:
                    scores = scores[:-1] if action == "short" else scores
                    body = encode_response(ScoreResponse(req.batch_id, "fake", "1", scores))
                self._send({"503": 503, "422": 422}.get(action, 200), body)

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


IMAGES = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
PROMPTS, META = ["a"] * 4, [{}] * 4
BRIGHT = IMAGES.reshape(4, -1).mean(axis=1).astype(np.float32) / 255


def remote(url: str, **opts):
    return build_reward("remote", options={"remote": {"url": url, "backoff": 0.01, **opts}})


def test_transient_failures_are_retried():
    with FakeServer(["503", "reset", "ok"]) as srv:
        scores, _ = remote(srv.url, retries=2)(IMAGES, PROMPTS, META)
    assert np.array_equal(scores, BRIGHT) and srv.requests == 3


def test_scored_batches_are_not_sent_again_after_a_failure():
    # batch 0 scores, batch 1 fails twice (retries=1): the call fails; the next call sends batch 1 only
    with FakeServer(["ok", "503", "503", "ok"]) as srv:
        fn = remote(srv.url, retries=1, batch_size=2)
        with pytest.raises(RemoteRewardUnavailable, match="HTTP 503"):
            fn(IMAGES, PROMPTS, META)
        assert srv.requests == 3
        scores, _ = fn(IMAGES, PROMPTS, META)
    assert np.array_equal(scores, BRIGHT) and srv.requests == 4


@pytest.mark.parametrize("in_flight", [1, 2])
def test_requests_in_flight_keep_the_scores_in_order(in_flight):
    # the first request to arrive answers 1 s late: with 2 in flight the second batch's answer
    # comes back first, and the scores must still be in image order
    with FakeServer(["slow", "ok"]) as srv:
        scores, _ = remote(srv.url, batch_size=2, in_flight=in_flight, timeout=5)(IMAGES, PROMPTS, META)
    assert np.array_equal(scores, BRIGHT) and srv.requests == 2 and srv.max_active == in_flight


def test_the_stage_retry_takes_only_transient_failures():
    from tempflow_core.storage.retry import is_retryable_failure  # the reward task's retry_condition_fn

    assert is_retryable_failure(RemoteRewardUnavailable("reward server http://h:1: refused"))
    assert not is_retryable_failure(RemoteRewardError("reward server http://h:1: bad answer"))


def test_a_slow_server_times_out_naming_it():
    with FakeServer(["slow"]) as srv:
        fn = remote(srv.url, timeout=0.3, retries=1)
        # the message says the client's own timeout fired (not the server's late answer), twice
        with pytest.raises(RemoteRewardUnavailable, match=rf"reward server {srv.url}: .*2 time\(s\).*timed out"):
            fn(IMAGES, PROMPTS, META)
    assert srv.requests == 2


@pytest.mark.parametrize("action, match", [
    ("garbage", "bad answer: response is not JSON"),
    ("short", "expected a list of 4 numbers, got 3 values"),
    ("422", "HTTP 422.*no quoted text in prompt"),
])
def test_unusable_answers_fail_at_once_naming_the_server(action, match):
    with FakeServer([action]) as srv:
        with pytest.raises(RemoteRewardError, match=rf"reward server {srv.url}: .*{match}"):
            remote(srv.url, retries=3)(IMAGES, PROMPTS, META)
    assert srv.requests == 1  # not retried


def test_health_check_before_first_use():
    with FakeServer(["ok"], health="garbage") as srv:
        with pytest.raises(RemoteRewardError, match=rf"reward server {srv.url}: GET /health answered"):
            remote(srv.url)
        assert srv.requests == 0


def test_a_down_server_names_the_url_without_credentials():
    port = free_port()
    with pytest.raises(RemoteRewardUnavailable) as e:
        remote(f"http://alice:hunter2pw@127.0.0.1:{port}", retries=1)
    msg = str(e.value)
    assert f"reward server http://alice:***@127.0.0.1:{port}: health check" in msg and "hunter2pw" not in msg
    assert "2 time(s)" in msg and "ConnectionRefusedError" in msg and "tempflow reward-server" in msg
    with pytest.raises(PreflightError, match=rf"reward.options.remote.url: .*127.0.0.1:{port}"):
        check_reward("remote", {}, {"remote": {"url": f"http://127.0.0.1:{port}", "retries": 0}}, "reward.name")
    with pytest.raises(PreflightError, match="reward.options.remote.url: .*needs the reward server's address"):
        check_reward("remote", {}, {}, "reward.name")
