"""The reward service's protocol: any registered reward served over HTTP (server.py) and scored
from another process (remote.py), in the project's own format.

    tempflow reward-server --reward shapes --port 8701
    tempflow train --set reward.name=remote --set reward.options.remote.url=http://127.0.0.1:8701

Protocol version 1. Bodies are UTF-8 JSON (no pickle anywhere); images travel as base64 PNG.

    GET  /health -> {"protocol": 1, "reward": "shapes", "version": "0.1.0+3f2a9c1d0b7e"}
    POST /score  <- {"protocol": 1, "batch_id": "c1-b0", "prompts": [N str], "metadata": [N objects],
                     "images": [N base64 PNG, RGB, all of one size]}
                 -> {"protocol": 1, "batch_id": "c1-b0", "reward": ..., "version": ...,
                     "scores": [N finite numbers], "details": {name: [N numbers, null = NaN]}, "seconds": s}
    an error     -> {"error": "message"} with 400 (malformed request), 401 (no or a wrong token), 404,
                    408 (the body did not arrive in time), 413 (over a limit: body, images, pixels),
                    422 (the reward rejected its input: retrying cannot help), 500 (the reward failed)
                    or 503 with Retry-After (the server's queue is full).

A server beyond loopback requires a token: `Authorization: Bearer TOKEN` (or HTTP Basic with the
token as the password or a bare user name, as a URL's credentials send it).

`version` is the package version plus a digest of the reward factory's source file and its
options, so the manifest of a reward stage scored remotely says which code scored it.
The client is `remote.py` (reward `remote`), the server `server.py`.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from tempflow_core.shards.png import decode_png as decode_png_bytes
from tempflow_core.shards.png import encode_png as encode_png_bytes

PROTOCOL = 1
MAX_BODY_BYTES = 512 * 1024 * 1024  # a client refuses an answer larger than this


class ProtocolError(ValueError):
    """A request or response that does not follow the protocol; the message says what is wrong."""


class TooLarge(ProtocolError):
    """A request over one of the server's limits (HTTP 413): smaller batches or images pass."""


@dataclass(frozen=True)
class Limits:
    """What one /score request may hold, checked before anything is decompressed."""

    max_body_bytes: int = 128 * 1024 * 1024  # the request's bytes (base64 PNG: ~1.05 MB a stored 512 px image)
    max_images: int = 1024  # images per request
    max_image_pixels: int = 4096 * 4096  # one image's width x height, from its PNG header
    max_request_pixels: int = 256 * 1024 * 1024  # all images' pixels together (~0.75 GiB decoded)


def png_size(raw: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header (IHDR, the first chunk), without decompressing anything."""
    if len(raw) < 24 or raw[:8] != b"\x89PNG\r\n\x1a\n" or raw[12:16] != b"IHDR":
        raise ProtocolError("an image is not base64 PNG (no PNG signature and header)")
    return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")


# ----------------------------------------------------------------------------- wire format


def encode_png(image: np.ndarray) -> str:
    """uint8 [H, W, 3] -> base64 PNG, stored without compression (level 0), by the shards' direct
    zlib encoder: encoding is the client's largest cost (for 80 noisy 64 px images, measured:
    2.6 ms this way, 47 ms through PIL, whose per-row adaptive filtering cannot be turned off,
    and 75 ms through PIL at level 1), and the bytes (a 64 px image is 12.4 kB, a 512 px one
    0.8 MB) cross a local or data-centre link."""
    return _png_base64(image).decode("ascii")


def _png_base64(image: np.ndarray) -> bytes:
    return base64.b64encode(encode_png_bytes(image, "reward request image", 0))


def _decode_png_raw(raw: bytes) -> np.ndarray:
    """PNG bytes -> uint8 [H, W, 3]; ProtocolError when they are not one. RGB PNGs stored the way
    `encode_png` writes them skip PIL (the shards' fast path); any other PNG is converted by PIL."""
    try:
        arr = decode_png_bytes(raw, "image")
        if arr.ndim == 3 and arr.shape[2] == 3:
            return arr
        with Image.open(io.BytesIO(raw), formats=("PNG",)) as img:  # gray or with alpha: PIL's conversion
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError, TypeError) as e:  # SchemaError is a ValueError
        raise ProtocolError(f"an image is not base64 PNG ({e})") from None


@dataclass(frozen=True)
class ScoreRequest:
    batch_id: str
    prompts: list[str]
    metadata: list[dict[str, Any]]
    images: np.ndarray  # uint8 [N, H, W, 3]


@dataclass(frozen=True)
class ScoreResponse:
    batch_id: str
    reward: str
    version: str
    scores: np.ndarray  # float32 [N]
    details: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float32 [N], NaN allowed
    seconds: float = 0.0


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode("utf-8")


def _load(body: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"{what} is not JSON ({e}): {body[:80]!r}") from None
    except RecursionError:
        raise ProtocolError(f"{what} nests deeper than JSON may here") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} is JSON {type(obj).__name__}, not an object")
    if obj.get("protocol") != PROTOCOL:
        raise ProtocolError(f"{what} speaks protocol {obj.get('protocol')!r}, this side {PROTOCOL}")
    return obj


def encode_request(req: ScoreRequest) -> bytes:
    """The request's JSON. The images' base64 strings are spliced in rather than passed through
    json.dumps, which would scan a megabyte of characters that never need escaping (the base64
    alphabet has no quote or backslash): 5 ms of a 80-image request's 10, measured."""
    images = [_png_base64(im) for im in req.images]  # SchemaError (a ValueError) names a bad image
    try:
        head = _json({"protocol": PROTOCOL, "batch_id": req.batch_id, "prompts": list(req.prompts),
                      "metadata": list(req.metadata), "images": []})
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"the prompts' metadata cannot be sent as JSON ({e})") from None
    if not images:
        return head
    return b"".join((head[:-2], b'"', b'","'.join(images), b'"]}'))  # head ends with '[]}'


def decode_request(body: bytes, limits: Limits = Limits()) -> ScoreRequest:
    """The request in `body`; ProtocolError when malformed, TooLarge over `limits` (checked on
    the images' count and on every PNG header before any image is decompressed)."""
    if len(body) > limits.max_body_bytes:
        raise TooLarge(f"request of {len(body):,} bytes is over {limits.max_body_bytes:,}: send smaller batches")
    obj = _load(body, "request")
    prompts, metadata, images = obj.get("prompts"), obj.get("metadata"), obj.get("images")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ProtocolError("request.prompts must be a list of strings")
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise ProtocolError("request.metadata must be a list of objects")
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ProtocolError("request.images must be a list of base64 PNG strings")
    if not len(prompts) == len(metadata) == len(images):
        raise ProtocolError(f"request has {len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata")
    if len(images) > limits.max_images:
        raise TooLarge(f"request of {len(images)} images is over {limits.max_images}: send smaller batches")
    sizes, total = [], 0
    for k, data in enumerate(images):  # headers only: every limit is checked before any pixel is decoded
        w, h = png_size(_b64_head(data, k))
        total += w * h
        if w * h > limits.max_image_pixels:
            raise TooLarge(f"image {k} declares {w} x {h} pixels, over {limits.max_image_pixels:,}: send smaller images")
        if total > limits.max_request_pixels:
            raise TooLarge(f"the request's images declare over {limits.max_request_pixels:,} pixels: send smaller "
                           "batches")
        sizes.append((h, w))
    if len(set(sizes)) > 1:
        raise ProtocolError(f"images of one request must share a size, got {sorted(set(sizes))} (height, width)")
    h, w = sizes[0] if sizes else (1, 1)
    stacked = np.empty((len(images), h, w, 3), np.uint8)  # decoded in place: one copy of the pixels
    for k in range(len(images)):
        try:
            raw = base64.b64decode(images[k], validate=True)
        except ValueError as e:
            raise ProtocolError(f"image {k} is not base64 ({e})") from None
        images[k] = ""  # the request's text of this image is no longer needed
        arr = _decode_png_raw(raw)
        if arr.shape != (h, w, 3):
            raise ProtocolError(f"image {k} decodes to {arr.shape[1]} x {arr.shape[0]}, not the {w} x {h} its header "
                                "declares")
        stacked[k] = arr
    return ScoreRequest(str(obj.get("batch_id", "")), prompts, metadata, stacked)


def _b64_head(data: str, k: int) -> bytes:
    """The first 24 bytes of base64 `data` (a PNG's signature and IHDR size)."""
    try:
        return base64.b64decode(data[:32], validate=True)
    except ValueError as e:
        raise ProtocolError(f"image {k} is not base64 ({e})") from None


def _numbers(values: Any, n: int, what: str, nan_ok: bool) -> np.ndarray:
    if not isinstance(values, list) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
        raise ProtocolError(f"{what}: expected a list of {n} numbers, got {got}")
    out = np.empty(n, dtype=np.float32)
    for i, v in enumerate(values):
        if v is None and nan_ok:
            out[i] = np.nan
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[i] = v
        else:
            raise ProtocolError(f"{what}[{i}] is {v!r}, not a finite number")
    return out


def encode_response(resp: ScoreResponse) -> bytes:
    def nums(a: np.ndarray) -> list[float | None]:
        return [float(x) if math.isfinite(x) else None for x in np.asarray(a, dtype=np.float32).tolist()]

    return _json({"protocol": PROTOCOL, "batch_id": resp.batch_id, "reward": resp.reward, "version": resp.version,
                  "scores": nums(resp.scores), "details": {k: nums(v) for k, v in resp.details.items()},
                  "seconds": resp.seconds})


def decode_response(body: bytes, n: int) -> ScoreResponse:
    """A /score answer for `n` images; ProtocolError when it is malformed or has another count."""
    obj = _load(body, "response")
    details = obj.get("details", {})
    if not isinstance(details, dict):
        raise ProtocolError("response.details must be an object")
    for key in ("reward", "version", "batch_id"):
        if not isinstance(obj.get(key), str):
            raise ProtocolError(f"response.{key} must be a string")
    return ScoreResponse(obj["batch_id"], obj["reward"], obj["version"], _numbers(obj.get("scores"), n, "scores", False),
                         {str(k): _numbers(v, n, f"details.{k}", True) for k, v in details.items()},
                         float(obj.get("seconds", 0.0)))


def decode_health(body: bytes) -> tuple[str, str]:
    """(reward name, version) of a /health answer."""
    obj = _load(body, "health answer")
    if not isinstance(obj.get("reward"), str) or not isinstance(obj.get("version"), str):
        raise ProtocolError("health answer lacks the reward's name and version")
    return obj["reward"], obj["version"]
