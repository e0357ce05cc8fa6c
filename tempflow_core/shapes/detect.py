"""A deterministic detector for the shapes world, standing in for GenEval's Mask2Former.

Pipeline per batch: each pixel takes its nearest palette colour (black included) if within
COLOR_CUTOFF, else none; 8-connected components per colour (scipy.ndimage.label over the
whole batch with a structure that never links images); components smaller than a
resolution-scaled minimum area or with an extreme aspect ratio are dropped as noise; the rest
are classified by the best-matching template (circle, square, upward triangle) fitted to their
bounding box, after filling holes; that template's IoU is the detection's confidence, and
components below the rules' minimum confidence are not objects; nor are components that make
up less than the rules' minimum colour share of the coloured pixels of the non-black blob they
lie in (a part of a multicoloured blob, or an object merged with another).

The rules (`DetectorRules`) were tightened after an audit of trained images: `RULES_V1`, the
rules before it, passed parts of multicoloured blobs and shapeless blobs (template IoU 0.5-0.7),
which the base model and trained models both make; `RULES` is the default, `RULES_V1` stays
selectable (`reward.options.shapes.rules: v1`) so that results scored with it can be recomputed.

Colour is part of segmentation rather than a separate classifier (GenEval uses CLIP on the
masked crop): on flat synthetic colours this is exact. Under v1 two touching objects of
different colours come out as two objects; under v2 they are one blob and neither counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
from scipy import ndimage

from tempflow_core.shapes.world import COLOR_CUTOFF, COLORS, palette_array

MIN_AREA_FRACTION = 0.01
"""Minimum component area as a fraction of H*W (41 px at 64x64, 10 px at 32x32): under half
the smallest rendered triangle, above what uniform noise clumps into (at 32x32, 6 px let 1%
of noise images pass as strictly correct)."""
ASPECT_RANGE = (0.4, 2.5)
MIN_CONFIDENCE = 0.5
"""The rules before the audit: a component is an object only if its best template IoU (its
confidence) reaches this, the analogue of GenEval's detector threshold. 90% of the clumps
uniform noise forms at 32x32 score <= 0.5."""


@dataclass(frozen=True)
class DetectorRules:
    """What makes a connected component of one colour an object."""

    min_confidence: float = MIN_CONFIDENCE  # best template IoU
    min_color_share: float = 0.0
    """Minimum share of the coloured pixels of the component's blob (its 8-connected region of
    non-black pixels, unlabelled fringe included) that are the component's own: 1 for an object
    that stands alone, about 0.5 for either colour of a two-coloured blob or of two objects that
    touch. Rendered scenes never touch, so every rendered object has 1."""

    @property
    def name(self) -> str:
        return next((k for k, v in RULE_SETS.items() if v == self), "custom")


RULES_V1 = DetectorRules()
RULES = DetectorRules(min_confidence=0.7, min_color_share=0.8)
"""The default: a template IoU of at least 0.7 (rendered shapes score >= 0.88 at 64x64 and
>= 0.71 at 32x32) and at least 80% of its blob's coloured pixels. Chosen from rendered scenes
and the base model's images; docs/experiments/detector-audit.md shows what each threshold does
to a trained run's gain."""
RULE_SETS: Mapping[str, DetectorRules] = MappingProxyType({"v1": RULES_V1, "v2": RULES})


def rules_named(name: str) -> DetectorRules:
    """The rule set called `name` (v1, v2).

    Raises:
        ValueError: for another name, naming the known ones.
    """
    if name not in RULE_SETS:
        raise ValueError(f"unknown detector rules {name!r}; expected one of {', '.join(RULE_SETS)}")
    return RULE_SETS[name]


@dataclass(frozen=True)
class Detection:
    """A detected object. bbox is (x1, y1, x2, y2) with exclusive x2/y2, like SceneObject."""

    shape: str
    color: str
    bbox: tuple[int, int, int, int]
    area: int
    fill: float
    confidence: float  # IoU with the best-matching shape template
    color_share: float = 1.0  # of the coloured pixels of its non-black blob

    @property
    def center(self) -> tuple[float, float]:
        return (self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2

    @property
    def size(self) -> tuple[int, int]:
        return self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1]

    def as_dict(self) -> dict[str, Any]:
        return {"class": self.shape, "color": self.color, "bbox": list(self.bbox), "area": self.area,
                "fill": round(self.fill, 4),
                "confidence": round(self.confidence, 4), "color_share": round(self.color_share, 4)}


def color_labels(images: np.ndarray, cutoff: float = COLOR_CUTOFF) -> np.ndarray:
    """[N, H, W] int8: -1 unlabelled, 0 background, 1..len(COLORS) the colour in COLORS order."""
    pal = palette_array(with_background=True).astype(np.float32)  # [K, 3]
    x = images.reshape(-1, 3).astype(np.float32)
    # |x - p|^2 = |x|^2 - 2 x.p + |p|^2 as one matmul (exact in float32 for 8-bit values).
    d2 = (x * x).sum(axis=1, keepdims=True) - 2 * x @ pal.T + (pal * pal).sum(axis=1)
    best = d2.argmin(axis=1)
    lab = best.astype(np.int8)
    lab[d2[np.arange(len(best)), best] > cutoff * cutoff] = -1
    lab = lab.reshape(images.shape[:-1])
    return lab


@lru_cache(maxsize=4096)
def _templates(h: int, w: int) -> tuple[tuple[str, np.ndarray], ...]:
    """Ideal shapes over an h x w box, sampled at pixel centres: ellipses a little wider than
    the box (a rasterised circle of radius r has a box of 2r-1 to 2r+1 pixels, so small ones
    only miss their corner pixels), the full box, and an upward triangle."""
    x = np.arange(w)[None, :] + 0.5 - w / 2
    y = np.arange(h)[:, None] + 0.5 - h / 2
    out = []
    for e in (0.0, 0.3, 0.6):
        ellipse = (x / (w / 2 + e)) ** 2 + (y / (h / 2 + e)) ** 2 <= 1
        ellipse[[0, 0, -1, -1], [0, -1, 0, -1]] = False  # a disc never fills its box's corners
        out.append(("circle", ellipse))
    out.append(("square", np.ones((h, w), dtype=bool)))
    v = (y + h / 2) / h  # 0 at the top edge, 1 at the bottom
    out.append(("triangle", np.abs(x) <= v * w / 2 + 0.5))  # half a pixel of slack at the slopes
    return tuple(out)


def classify_shape(mask: np.ndarray) -> tuple[str, float, float]:
    """Shape of one component from its tight boolean mask; returns (shape, fill ratio, IoU).

    The shape is the template (inscribed ellipse, full box, upward triangle, all fitted to
    the component's box) with the highest IoU. Fill-ratio thresholds alone fail on small
    circles, which pixelate into near-squares at 32x32; the IoU compares where the pixels are.
    """
    filled = ndimage.binary_fill_holes(mask)
    h, w = filled.shape
    fill = float(filled.sum()) / (h * w)
    best, best_iou = "circle", -1.0
    for name, t in _templates(h, w):
        iou = float((filled & t).sum()) / float((filled | t).sum())
        if iou > best_iou:
            best, best_iou = name, iou
    return best, fill, best_iou


def detect(images: np.ndarray, cutoff: float = COLOR_CUTOFF, rules: DetectorRules = RULES) -> list[list[Detection]]:
    """Detections per image for uint8 images [N, H, W, 3] (or one [H, W, 3] image, then a list
    with one entry) under `rules`, most confident first as in GenEval."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        # a float image in [0, 1] would silently read as all black: refuse it instead
        raise ValueError(f"detect expects uint8 images [N, H, W, 3]; got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    min_area = max(4, round(MIN_AREA_FRACTION * h * w))
    labels = color_labels(images, cutoff)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connected within an image, never across the batch axis
    blobs, _ = ndimage.label(labels != 0, structure=structure)  # [N, H, W] non-black regions
    coloured = np.bincount(blobs[labels > 0], minlength=blobs.max() + 1)  # coloured pixels per blob
    out: list[list[Detection]] = [[] for _ in range(n)]
    for ci, color in enumerate(COLORS, start=1):
        comp, count = ndimage.label(labels == ci, structure=structure)
        if count == 0:
            continue
        areas = np.bincount(comp.ravel(), minlength=count + 1)
        for k, sl in enumerate(ndimage.find_objects(comp), start=1):
            if sl is None or areas[k] < min_area:
                continue
            mask = comp[sl][0] == k
            hh, ww = mask.shape
            if not ASPECT_RANGE[0] <= ww / hh <= ASPECT_RANGE[1]:
                continue
            shape, fill, iou = classify_shape(mask)
            if iou < rules.min_confidence:
                continue
            share = float(areas[k]) / coloured[blobs[sl][0][mask][0]]  # the component lies in one blob
            if share < rules.min_color_share:
                continue
            bbox = (sl[2].start, sl[1].start, sl[2].stop, sl[1].stop)
            out[sl[0].start].append(Detection(shape, color, bbox, int(areas[k]), fill, iou, share))
    for dets in out:
        dets.sort(key=lambda d: (-d.confidence, -d.area, d.bbox))
    return out
