"""Render scenes that satisfy a shapes prompt: coloured circles, squares and upward triangles
on black, with random sizes, positions and a little colour jitter.

Rules the detector relies on (so that ground-truth renders score ~100%):
* objects never touch: their pixel bounding boxes are at least `gap` pixels apart, so
  8-connected components never merge;
* every object lies fully inside the image;
* in a position scene, GenEval's relation rule, computed on the objects' pixel boxes exactly as
  the scorer does, gives the named relation *and no other* (with a small margin), so captions
  are unambiguous for pretraining.

Everything is numpy on small per-object patches, and each image draws from its own generator
seeded by (seed, index), so a dataset is reproducible and can be built in any chunking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from tempflow_core.shapes.world import COLOR_JITTER, COLORS, PALETTE, POSITION_THRESHOLD, RADIUS_RANGE, SHAPES, TAGS

_MAX_TRIES = 400
_REL_MARGIN = 0.05  # renderer wants the named relation's component beyond 0.55, the others within 0.45


@dataclass(frozen=True)
class SceneObject:
    """One rendered object: ground truth for tests and for pretraining metadata."""

    shape: str
    color: str
    bbox: tuple[int, int, int, int]  # x1, y1, x2, y2 (x2/y2 exclusive)
    area: int

    @property
    def center(self) -> tuple[float, float]:
        return (self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2

    def as_dict(self) -> dict[str, Any]:
        return {"class": self.shape, "color": self.color, "bbox": list(self.bbox), "area": self.area}


def shape_mask(shape: str, cx: float, cy: float, r: float) -> tuple[int, int, np.ndarray]:
    """Rasterise one shape of 'radius' r centred at (cx, cy), pixel centres at +0.5.

    Returns (x0, y0, mask) with mask trimmed to its tight pixel extent. Squares have half-side
    0.85 r and triangles a 2.1 r base and 1.9 r height, so all three have similar bulk; their
    fill ratios of the bounding box (square 1, circle ~0.79, triangle ~0.5) stay far apart.
    """
    x0, y0 = int(np.floor(cx - 1.2 * r)), int(np.floor(cy - 1.2 * r))
    n = int(np.ceil(2.4 * r)) + 2
    px = np.arange(x0, x0 + n, dtype=np.float32)[None, :] + 0.5 - cx
    py = np.arange(y0, y0 + n, dtype=np.float32)[:, None] + 0.5 - cy
    if shape == "circle":
        m = px * px + py * py <= r * r
    elif shape == "square":
        a = 0.85 * r
        m = (np.abs(px) <= a) & (np.abs(py) <= a)
    elif shape == "triangle":
        h, half_base = 1.9 * r, 1.05 * r
        t = (py + h / 2) / h  # 0 at the apex, 1 at the base
        m = (t >= 0) & (t <= 1) & (np.abs(px) <= t * half_base)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    return x0 + int(cols[0]), y0 + int(rows[0]), m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _objects_to_draw(metadata: dict[str, Any], rng: np.random.Generator) -> list[tuple[str, str, int]]:
    """(shape, colour, include-clause index) per object; unnamed colours are drawn at random."""
    if "include" not in metadata:
        raise ValueError(f"cannot render a scene without GenEval 'include' metadata; got keys {sorted(metadata)}")
    out = []
    for i, req in enumerate(metadata["include"]):
        for _ in range(int(req["count"])):
            color = req.get("color") or COLORS[int(rng.integers(len(COLORS)))]
            if color not in PALETTE:
                raise ValueError(f"unknown colour {color!r}; the shapes world has {', '.join(COLORS)}")
            out.append((req["class"], color, i))
    return out


def _relation_ok(box_a: tuple[int, ...], box_b: tuple[int, ...], rel: str) -> bool:
    """A rel B holds by GenEval's rule with a margin, and no other relation does.

    Plain-float copy of geometry.normalized_offset (called thousands of times per second);
    tests check the two agree."""
    ax, ay = (box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2
    bx, by = (box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2
    ox, oy = ax - bx, ay - by
    norm = math.hypot(ox, oy)
    if norm == 0:
        return False
    mx = POSITION_THRESHOLD * ((box_a[2] - box_a[0]) + (box_b[2] - box_b[0]))
    my = POSITION_THRESHOLD * ((box_a[3] - box_a[1]) + (box_b[3] - box_b[1]))
    dx = math.copysign(max(abs(ox) - mx, 0.0), ox) / norm
    dy = math.copysign(max(abs(oy) - my, 0.0), oy) / norm
    lo, hi = 0.5 + _REL_MARGIN, 0.5 - _REL_MARGIN
    return {"left of": dx < -lo and abs(dy) < hi, "right of": dx > lo and abs(dy) < hi,
            "above": dy < -lo and abs(dx) < hi, "below": dy > lo and abs(dx) < hi}[rel]


def render_scene(metadata: Any, rng: np.random.Generator | int, resolution: int = 64
                 ) -> tuple[np.ndarray, list[SceneObject]]:
    """One scene satisfying a GenEval-style record (a metadata dict or a PromptRecord).

    Returns:
        image uint8 [resolution, resolution, 3] and the objects drawn (ground truth).
    Raises:
        ValueError: for unknown shapes/colours, or when the objects cannot be placed
            (too many for the resolution, or a resolution under 16 px).
    """
    metadata = _metadata_of(metadata)
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    res = int(resolution)
    if res < 16:
        raise ValueError(f"resolution {res} is too small for the shapes world (objects would be 1-2 px); use >= 16")
    wanted = _objects_to_draw(metadata, rng)
    positions = {i: req["position"] for i, req in enumerate(metadata["include"]) if req.get("position")}
    gap = max(1, round(res / 32))
    r_lo, r_hi = RADIUS_RANGE[0] * res, RADIUS_RANGE[1] * res
    for _ in range(_MAX_TRIES):
        placed: list[tuple[int, int, np.ndarray, tuple[int, int, int, int]]] = []
        clause_boxes: dict[int, tuple[int, int, int, int]] = {}
        for shape, _color, clause in wanted:
            # Rasterise once at a random sub-pixel phase, then place by integer translation:
            # the rejection loop below is then plain integer arithmetic.
            r = float(rng.uniform(r_lo, r_hi))
            _, _, m = shape_mask(shape, *(float(v) for v in rng.uniform(0, 1, size=2)), r)
            h, w = m.shape
            if w > res - 2 or h > res - 2:
                break
            xs = rng.integers(1, res - w, size=80)
            ys = rng.integers(1, res - h, size=80)
            for x0, y0 in zip(xs.tolist(), ys.tolist()):
                box = (x0, y0, x0 + w, y0 + h)
                if any(box[0] < b[2] + gap and b[0] < box[2] + gap and box[1] < b[3] + gap and b[1] < box[3] + gap
                       for *_, b in placed):
                    continue
                if clause in positions:
                    rel, target = positions[clause]
                    if target not in clause_boxes or not _relation_ok(box, clause_boxes[target], rel):
                        continue
                break
            else:
                break  # this object did not fit: start the scene again with new sizes
            placed.append((x0, y0, m, box))
            clause_boxes.setdefault(clause, box)
        else:
            image = np.zeros((res, res, 3), dtype=np.uint8)
            objects = []
            for (shape, color, _), (x0, y0, m, box) in zip(wanted, placed):
                rgb = np.clip(np.asarray(PALETTE[color]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255)
                image[y0:box[3], x0:box[2]][m] = rgb.astype(np.uint8)
                objects.append(SceneObject(shape, color, box, int(m.sum())))
            return image, objects
    raise ValueError(f"could not place {len(wanted)} objects for {metadata.get('prompt', metadata)!r} "
                     f"at {res}x{res} after {_MAX_TRIES} tries")


def render_batch(records: Sequence[Any], seed: int, resolution: int = 64) -> np.ndarray:
    """Render one scene per record (PromptRecord or metadata dict); image i uses rng (seed, i)."""
    images = np.zeros((len(records), resolution, resolution, 3), dtype=np.uint8)
    for i, rec in enumerate(records):
        images[i] = render_scene(rec, np.random.default_rng([seed, i]), resolution)[0]
    return images


def _metadata_of(rec: Any) -> dict[str, Any]:
    return rec.metadata if hasattr(rec, "metadata") else rec


def generate_dataset(n: int, seed: int, resolution: int = 64, split: str = "all",
                     tags: Sequence[str] = TAGS) -> tuple[np.ndarray, list[str], list[dict[str, Any]]]:
    """n captioned scenes for pretraining: a tag uniformly at random (so the six categories
    are balanced whatever their prompt counts), then a prompt of that tag, then a scene.

    split picks the prompt pool: "all" (default: the base model plays a pretrained model that
    has seen the whole vocabulary, as SD3.5 has seen GenEval's objects), "train" or "test".
    Image i depends only on (seed, i), so generate_dataset(k, s) is a prefix of (n > k, s).

    Returns:
        images uint8 [n, H, W, 3], captions (the prompts), metadata (the prompts' records;
        images of the same prompt share one dict, so copy before mutating).
    """
    from tempflow_core.shapes.prompts import load_split

    records = load_split(split)
    unknown = set(tags) - set(TAGS)
    if unknown:
        raise ValueError(f"unknown tags {sorted(unknown)}; expected some of {', '.join(TAGS)}")
    pools = [[r for r in records if r["tag"] == t] for t in tags]
    pools = [p for p in pools if p]
    images = np.zeros((n, resolution, resolution, 3), dtype=np.uint8)
    captions, metadata = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        pool = pools[int(rng.integers(len(pools)))]
        rec = pool[int(rng.integers(len(pool)))]
        images[i] = render_scene(rec, rng, resolution)[0]
        captions.append(rec["prompt"])
        metadata.append(rec)
    return images, captions, metadata
