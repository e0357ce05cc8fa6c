"""The shapes world's vocabulary and constants, shared by prompts, renderer, detector and scorer.

Kept in one small module so that the renderer and the detector cannot drift apart: the
detector classifies pixels against the same palette the renderer paints with, and both use
the same size scale (sizes are fractions of the resolution, so 32 and 64 px scenes match).
"""

from __future__ import annotations

import numpy as np

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
"""GenEval's six task tags, in the order of its Table 1."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
COUNTS: tuple[int, ...] = (2, 3, 4)
"""Counts used by counting prompts (GenEval uses 2-4; a count of one is the colors task)."""

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
}
"""Base RGB of each colour. Pairwise distances are >= 175, so +-15 jitter per channel (at most
26 in RGB distance) stays far inside the detector's cut-off."""

BACKGROUND: tuple[int, int, int] = (0, 0, 0)

COLOR_JITTER = 15
"""Per-object uniform jitter per channel, as in the measured pretraining data."""

RADIUS_RANGE: tuple[float, float] = (7 / 64, 10 / 64)
"""Object 'radius' as a fraction of the resolution: 7-10 px at 64x64 (the measured setup)."""

COLOR_CUTOFF = 100.0
"""A pixel takes its nearest palette colour (black included) only within this RGB distance;
farther pixels (blurred edges, mixed colours) are left unlabelled rather than guessed."""

POSITION_THRESHOLD = 0.1
"""GenEval's margin: centre offsets shrink by 0.1 * (dimA + dimB) per axis before normalising."""


def palette_array(with_background: bool = True) -> np.ndarray:
    """[K, 3] int32 palette in the order (background?, *COLORS)."""
    rows = ([BACKGROUND] if with_background else []) + [PALETTE[c] for c in COLORS]
    return np.asarray(rows, dtype=np.int32)


def plural(shape: str) -> str:
    return shape + "s"
