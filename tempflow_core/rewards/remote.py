"""Reward `remote`: scores from a reward server (server.py) over HTTP.

    tempflow reward-server --reward shapes --port 8701 &
    tempflow train --set reward.name=remote --set reward.options.remote.url=http://127.0.0.1:8701

Options (reward.options.remote): url (required), timeout (seconds per request), retries (extra
tries after a transient failure), backoff (seconds before the first retry; doubled per retry,
capped at 10 s, jittered), batch_size (images per request), in_flight (requests sent at once:
with 2 the client encodes the next batch while the server decodes and scores one; the scores
come back in order whatever order the answers arrive in), health_timeout (seconds).

The client checks the server's health when it is built, before the first stage uses it, and
records the server's reward name and version; `reward_servers` hands them to the manifest.
Only transient failures are retried (connection refused or reset, timeouts, HTTP 5xx and 429);
a malformed answer, a wrong number of scores or a 4xx fails at once with RemoteRewardError.
When the tries run out, RemoteRewardUnavailable (a ConnectionError, which the pipeline's
stage retry treats as transient) is raised; the batches of that call already scored are kept
and not sent again when the same images are scored next (a retried reward stage).
Error messages name the server by its URL with any credentials masked. A 503 or 429 is retried
after its Retry-After (at most 30 s) when that is longer than the backoff. A server that needs a
token gets it from the URL's credentials or, kept out of the URL (and so out of every record),
from the TEMPFLOW_REWARD_TOKEN variable, sent as Authorization: Bearer.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from tempflow_core.redaction import redact_text, redact_uri, split_credentials
from tempflow_core.storage.retry import RetryPolicy
from tempflow_core.rewards.registry import RewardError
from tempflow_core.rewards.protocol import PROTOCOL, ProtocolError, ScoreRequest, ScoreResponse, decode_health, decode_response, encode_request


TOKEN_ENV = "TEMPFLOW_REWARD_TOKEN"  # the server's token, sent as Authorization: Bearer


class RemoteRewardError(RewardError):
    """The reward server answered something unusable or refused the request (not retried)."""


class RemoteRewardUnavailable(ConnectionError):
    """The reward server could not be reached or kept failing transiently after every retry."""


def is_transient(exc: BaseException) -> bool:
    """Whether another try may succeed: refused or reset connections, timeouts, HTTP 5xx and 429."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code == 429
    if isinstance(exc, urllib.error.URLError):
        return isinstance(exc.reason, (ConnectionError, TimeoutError))
    # RemoteDisconnected is a ConnectionResetError; IncompleteRead: the connection dropped mid-body
    return isinstance(exc, (ConnectionError, TimeoutError, http.client.IncompleteRead))


def _retry_after(exc: BaseException, cap: float = 30.0) -> float:
    """Seconds a 503 or 429 asks the client to wait (its Retry-After, at most `cap`); 0 otherwise."""
    if isinstance(exc, urllib.error.HTTPError) and exc.code in (429, 503):
        try:
            return min(cap, max(0.0, float(exc.headers.get("Retry-After", "0"))))
        except (TypeError, ValueError):  # an HTTP date: wait the policy's delay
            return 0.0
    return 0.0


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        try:
            body = exc.read(2000).decode("utf-8", "replace")
        except OSError:
            body = ""
        return f"HTTP {exc.code} {exc.reason}" + (f": {body.strip()}" if body.strip() else "")
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


class RemoteReward:
    """A RewardFn whose scores come from a reward server; see the module docstring."""

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                 batch_size: int = 64, health_timeout: float = 10.0, in_flight: int = 2):
        if not url:
            raise ValueError("reward 'remote' needs the server's address: reward.options.remote.url=http://HOST:PORT "
                             "(start one with `tempflow reward-server --reward NAME --port PORT`)")
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"reward 'remote': url {redact_uri(url)!r} must start with http:// or https://")
        if batch_size < 1 or in_flight < 1 or retries < 0 or timeout <= 0 or health_timeout <= 0:
            raise ValueError(f"reward 'remote': batch_size ({batch_size}) and in_flight ({in_flight}) must be >= 1, "
                             f"retries ({retries}) >= 0, timeout ({timeout}) and health_timeout ({health_timeout}) > 0")
        plain, user, password = split_credentials(url.rstrip("/"))
        self.url, self.shown = plain, redact_uri(url.rstrip("/"))
        self._secrets = [password] if password else [user] if user else []  # a bare user may be a token
        self._auth = None
        if user is not None:
            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode("ascii")
            self._auth = f"Basic {token}"
        elif os.environ.get(TOKEN_ENV, "").strip():  # the server's token, kept out of the URL (and of every record)
            self._auth = f"Bearer {os.environ[TOKEN_ENV].strip()}"
            self._secrets.append(os.environ[TOKEN_ENV].strip())
        self.timeout, self.health_timeout, self.batch_size = float(timeout), float(health_timeout), int(batch_size)
        self.in_flight = int(in_flight)
        self.policy = RetryPolicy(retries=int(retries) + 1, backoff=float(backoff))
        self._calls = itertools.count(1)
        self._done: dict[str, ScoreResponse] = {}  # batches of a failed call, by request digest
        self.reward, self.version = self._health()

    # -- what scored ------------------------------------------------------------------------

    def provenance(self) -> dict[str, Any]:
        return {"url": self.shown, "reward": self.reward, "version": self.version, "protocol": PROTOCOL}

    # -- HTTP -------------------------------------------------------------------------------

    def _fail(self, cls: type[Exception], msg: str) -> Exception:
        return cls(redact_text(f"reward server {self.shown}: {msg}", self._secrets))

    def _request(self, path: str, body: bytes | None, timeout: float, what: str) -> bytes:
        """One request with retries on transient failures; the answer's body."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self._auth:
            headers["Authorization"] = self._auth
        t0 = time.monotonic()
        for attempt in range(1, self.policy.retries + 1):
            req = urllib.request.Request(self.url + path, data=body, headers=headers,
                                         method="POST" if body is not None else "GET")
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    data: bytes = resp.read()
                    return data
            except Exception as e:  # noqa: BLE001 - classified below
                if not is_transient(e):
                    if isinstance(e, (urllib.error.URLError, http.client.HTTPException, OSError, ValueError)):
                        raise self._fail(RemoteRewardError, f"{what} failed: {_reason(e)}") from None
                    raise
                if attempt == self.policy.retries:
                    raise self._fail(RemoteRewardUnavailable,
                                     f"{what} failed {attempt} time(s) over {time.monotonic() - t0:.1f} s, last: "
                                     f"{_reason(e)} (timeout {timeout:g} s); is the server running? start it with "
                                     "`tempflow reward-server --reward NAME --port PORT`") from None
                time.sleep(max(self.policy.delay(attempt), _retry_after(e)))
        raise AssertionError("unreachable")

    def _health(self) -> tuple[str, str]:
        body = self._request("/health", None, self.health_timeout, "health check GET /health")
        try:
            return decode_health(body)
        except ProtocolError as e:
            raise self._fail(RemoteRewardError, f"GET /health answered something else than a reward server: {e}") from None

    def _score_batch(self, req: ScoreRequest) -> ScoreResponse:
        try:
            body = encode_request(req)
        except ValueError as e:  # ProtocolError (metadata not JSON) or SchemaError (an image's dtype or shape)
            raise self._fail(RemoteRewardError, f"batch {req.batch_id}: {e}") from None
        digest = hashlib.sha256(body[body.index(b'"prompts"'):]).hexdigest()  # the batch id aside
        if digest in self._done:
            return self._done[digest]
        answer = self._request("/score", body, self.timeout, f"POST /score (batch {req.batch_id}, {len(req.images)} images)")
        try:
            resp = decode_response(answer, len(req.images))
        except ProtocolError as e:
            raise self._fail(RemoteRewardError, f"batch {req.batch_id}: bad answer: {e}") from None
        if resp.batch_id != req.batch_id:
            raise self._fail(RemoteRewardError, f"answered batch {resp.batch_id!r} to batch {req.batch_id!r}")
        if (resp.reward, resp.version) != (self.reward, self.version):
            raise self._fail(RemoteRewardError, f"reward changed from {self.reward} {self.version} (health check) to "
                                                f"{resp.reward} {resp.version}; rebuild the client to accept the new one")
        self._done[digest] = resp
        return resp

    # -- RewardFn -------------------------------------------------------------------------------

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        images = np.asarray(images, dtype=np.uint8)
        n = len(images)
        metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
        if not len(prompts) == len(metadata) == n:
            raise ValueError(f"reward 'remote': {n} images, {len(prompts)} prompts, {len(metadata)} metadata records")
        call = next(self._calls)
        reqs = [ScoreRequest(f"c{call}-b{k}", list(prompts[i:i + self.batch_size]), metadata[i:i + self.batch_size],
                             images[i:i + self.batch_size]) for k, i in enumerate(range(0, n, self.batch_size))]
        if self.in_flight == 1 or len(reqs) < 2:
            parts = [self._score_batch(r) for r in reqs]
        else:  # a failing batch raises here once the others in flight are back (and kept for a retry)
            with ThreadPoolExecutor(min(self.in_flight, len(reqs)), thread_name_prefix="remote-reward") as pool:
                parts = list(pool.map(self._score_batch, reqs))
        self._done.clear()  # every batch of this call is back: nothing to keep for a retry
        scores = np.concatenate([p.scores for p in parts]) if parts else np.zeros(0, np.float32)
        keys = sorted({k for p in parts for k in p.details})
        details = {k: np.concatenate([p.details.get(k, np.full(len(p.scores), np.nan, np.float32)) for p in parts])
                   for k in keys}
        return scores, details


def remote(url: str | None = None, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
           batch_size: int = 64, health_timeout: float = 10.0, in_flight: int = 2) -> RemoteReward:
    """A reward served by `tempflow reward-server` at `url` (checked when built: GET /health)."""
    return RemoteReward(url or "", timeout, retries, backoff, batch_size, health_timeout, in_flight)
