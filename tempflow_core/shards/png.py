"""Lossless PNG for the images of a rollout: a direct zlib encoder and a PIL decoder.

Why not PIL for writing: for the small images of a rollout, PIL's per-call overhead is several
times the compression itself, and PNG encoding is most of a shard's writing time. Any PNG reader
(PIL included, see the tests) decodes the result bit-exactly.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np

from .errors import SchemaError

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> gray, gray+alpha, RGB, RGBA


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(image: Any, where: str, level: int) -> bytes:
    """PNG bytes of a uint8 image [H, W] or [H, W, 1-4], at zlib `level` (filter 'None' per row).

    Raises SchemaError naming `where` for any other dtype or shape.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 2, 3, 4)):
        raise SchemaError(f"{where}: image must be uint8 [H, W] or [H, W, 1-4], got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    rows = np.empty((h, 1 + w * channels), dtype=np.uint8)  # [H, 1 + W*C]: filter byte, then the row
    rows[:, 0] = 0  # filter type None
    rows[:, 1:] = arr.reshape(h, w * channels)
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPE[channels], 0, 0, 0)
    return b"".join((_SIGNATURE, _chunk(b"IHDR", header),
                     _chunk(b"IDAT", zlib.compress(rows.tobytes(), level)), _chunk(b"IEND", b"")))


def auto_png_level(image: Any) -> int:
    """zlib level for a batch's PNGs, judged on one of its images: 1 when it compresses by at
    least 10%, else 0 (stored). Why: images of the random or barely trained tiny model are
    noise-like; deflating them saves nothing and costs ~10x the rest of their encoding."""
    raw = np.ascontiguousarray(np.asarray(image, dtype=np.uint8)).tobytes()
    return 1 if len(zlib.compress(raw, 1)) < 0.9 * len(raw) else 0


def decode_png(data: bytes, where: str) -> np.ndarray:
    """uint8 array [H, W] or [H, W, C] of PNG bytes; SchemaError naming `where` for anything else."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG":
                raise SchemaError(f"{where}: image is {im.format}, expected PNG")
            return np.asarray(im).copy()
    except SchemaError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types
        raise SchemaError(f"{where}: undecodable PNG ({exc})") from None
