"""GenEval's relative-position rule, shared by the renderer (to place objects) and the scorer.

Copied from GenEval's `relative_position` (also used by Flow-GRPO's reward server): the centre
offset of A from B shrinks by POSITION_THRESHOLD * (dimA + dimB) per axis, is divided by the
length of the *unshrunk* offset, and a relation holds when its component passes +-0.5.
Image y grows downwards, so "above" is a negative dy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tempflow_core.shapes.world import POSITION_THRESHOLD

Box = Sequence[float]  # (x1, y1, x2, y2), x2/y2 exclusive pixel edges


def normalized_offset(box_a: Box, box_b: Box, threshold: float = POSITION_THRESHOLD) -> tuple[float, float]:
    """GenEval's revised offset of A relative to B, divided by the raw centre distance.

    Returns (0, 0) when the revised offset vanishes (objects on top of each other)."""
    a = np.asarray(box_a, dtype=np.float64).reshape(2, 2)
    b = np.asarray(box_b, dtype=np.float64).reshape(2, 2)
    center_a, center_b = a.mean(axis=0), b.mean(axis=0)
    dim_a, dim_b = np.abs(a[1] - a[0]), np.abs(b[1] - b[0])
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return 0.0, 0.0
    dx, dy = revised / np.linalg.norm(offset)
    return float(dx), float(dy)


def relative_position(box_a: Box, box_b: Box, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """The set of relations that A has to B ("left of", "right of", "above", "below")."""
    dx, dy = normalized_offset(box_a, box_b, threshold)
    rel: set[str] = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel
