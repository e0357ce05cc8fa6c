"""Rewards over clips. A video family's clip reaches a reward as one frame strip: its F square
frames side by side, [H, F H, 3] (`WanPolicy.decode`), so that shards, reward servers and the
MLflow log carry it as an image. A strip's frame count is its width over its height; a plain
image is a clip of one frame.

    frames                the image reward `of` on every frame, averaged over the clip
    temporal_consistency  the shapes detector's agreement across consecutive frames
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np


def split_strips(images: np.ndarray) -> np.ndarray:
    """[S, H, F H, 3] strips of square frames -> [S, F, H, H, 3] frames (F = 1 for square images)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[2] % images.shape[1]:
        raise ValueError(f"clips arrive as strips of square frames [S, H, F H, 3]; got {images.shape}")
    s, h, fw, c = images.shape
    f = fw // h
    return np.moveaxis(images.reshape(s, h, f, h, c), 2, 1)


def frames(of: str = "shapes", options: dict[str, Any] | None = None):
    """The built-in image reward `of` (with its `options`) on each frame of a clip, averaged.

    details: each of the inner reward's details averaged over the frames (NaN-aware), and
    frame_min / frame_std of the per-frame scores (a clip good on average but with a bad frame
    shows in frame_min).
    """
    from tempflow_core.rewards.registry import BUILTIN, RewardRegistry

    if of in ("frames", "temporal_consistency"):
        raise ValueError(f"reward 'frames' scores frames with an image reward, not {of!r}")
    inner = RewardRegistry(BUILTIN).build(of, options={of: dict(options or {})})

    def fn(images, prompts, metadata):
        clips = split_strips(images)  # [S, F, H, W, 3]
        s, f = clips.shape[:2]
        scores, details = inner(clips.reshape(s * f, *clips.shape[2:]), [p for p in prompts for _ in range(f)],
                                [m for m in metadata for _ in range(f)])
        per_frame = np.asarray(scores, dtype=np.float32).reshape(s, f)
        out: dict[str, np.ndarray] = {}
        for k, v in details.items():
            v = np.asarray(v, dtype=np.float32).reshape(s, f)
            seen = ~np.isnan(v).all(1)  # a detail NaN on every frame (another task's) stays NaN
            out[k] = np.full(s, np.nan, np.float32)
            out[k][seen] = np.nanmean(v[seen], 1)
        out.update(frame_min=per_frame.min(1), frame_std=per_frame.std(1))
        return per_frame.mean(1), out

    return fn


def temporal_consistency(rules: str = "v2"):
    """The share of a clip's consecutive frame pairs in which the shapes detector sees the same
    objects (the multiset of colour and shape): 1 for a clip whose content holds still, 0 for one
    whose objects change at every frame; 1 for a one-frame clip. It scores coherence, not the
    prompt: weigh it beside a prompt reward (reward.name=weighted)."""
    from tempflow_core.shapes.detect import detect, rules_named

    chosen = rules_named(rules)

    def fn(images, prompts, metadata):
        clips = split_strips(images)
        s, f = clips.shape[:2]
        found = detect(clips.reshape(s * f, *clips.shape[2:]), rules=chosen)
        seen = [Counter((d.color, d.shape) for d in objects) for objects in found]
        if f == 1:
            return np.ones(s, np.float32), {}
        same = np.array([[seen[i * f + j] == seen[i * f + j + 1] for j in range(f - 1)] for i in range(s)])
        return same.mean(1).astype(np.float32), {}

    return fn
