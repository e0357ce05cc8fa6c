"""Contact sheets of samples for reports and MLflow artifacts."""

from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def image_grid(images: np.ndarray | Sequence[np.ndarray], ncols: int, labels: Sequence[str] | None = None,
               scale: int | None = None, pad: int = 2) -> Image.Image:
    """Tile uint8 images [N, H, W, 3] into a grid, ncols per row, with optional captions.

    Small images are enlarged by an integer nearest-neighbour factor (by default up to at
    least 128 px) so that 32-64 px samples stay readable and crisp; captions are wrapped
    under each image.

    Raises:
        ValueError: on an empty batch, bad ncols or a label count that does not match.
    """
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) == 0:
        raise ValueError(f"image_grid expects uint8 images [N, H, W, 3] with N >= 1; got shape {arr.shape}")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1; got {ncols}")
    if labels is not None and len(labels) != len(arr):
        raise ValueError(f"{len(labels)} labels for {len(arr)} images")
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    n, h, w, _ = arr.shape
    scale = scale or max(1, -(-128 // max(h, w)))
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default(size=11) if labels is not None else None
    chars = max(8, cw // 6)
    wrapped = [textwrap.wrap(str(lb), chars) or [""] for lb in labels] if labels is not None else None
    text_h = (max(len(x) for x in wrapped) * 13 + 2) if wrapped else 0
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    sheet = Image.new("RGB", (ncols * (cw + pad) + pad, nrows * (ch + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        r, c = divmod(i, ncols)
        x, y = pad + c * (cw + pad), pad + r * (ch + text_h + pad)
        tile = Image.fromarray(arr[i])
        sheet.paste(tile.resize((cw, ch), Image.NEAREST) if scale > 1 else tile, (x, y))
        if wrapped:
            for j, line in enumerate(wrapped[i]):
                draw.text((x, y + ch + 1 + 13 * j), line, fill=(0, 0, 0), font=font)
    return sheet
