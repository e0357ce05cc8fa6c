"""Shapes: a procedural GenEval-like compositional benchmark for tiny text-to-image models.

Prompts in GenEval's six tasks over 3 shapes x 4 colours (prompts), a scene renderer used for
pretraining data and round-trip tests (render), a deterministic colour-segmentation detector
(detect), GenEval's strict rules plus Flow-GRPO's partial reward (score), and evaluation and
report helpers (evaluate, grid). Pure numpy/scipy/PIL: no torch, no model weights.
"""

from __future__ import annotations

from tempflow_core.shapes.detect import RULES, RULES_V1, Detection, DetectorRules, detect, rules_named
from tempflow_core.shapes.evaluate import evaluate, format_table
from tempflow_core.shapes.geometry import relative_position
from tempflow_core.shapes.grid import image_grid
from tempflow_core.shapes.prompts import BUILTIN_SPLITS, generate_records, load_split, record_for_prompt, split_records, write_prompt_files
from tempflow_core.shapes.render import SceneObject, generate_dataset, render_batch, render_scene
from tempflow_core.shapes.score import ImageScore, score_images, score_objects
from tempflow_core.shapes.world import COLORS, RELATIONS, SHAPES, TAGS

__all__ = [
    "COLORS", "RELATIONS", "RULES", "RULES_V1", "SHAPES", "TAGS", "Detection", "DetectorRules", "ImageScore",
    "SceneObject", "BUILTIN_SPLITS", "rules_named",
    "detect", "evaluate", "format_table", "generate_dataset", "generate_records", "image_grid", "load_split",
    "record_for_prompt", "relative_position", "render_batch", "render_scene", "score_images", "score_objects",
    "split_records", "write_prompt_files",
]
