"""Model families: which diffusers pipeline a model folder holds and the settings that follow.

Two families run behind one policy interface (`policy_base.FlowPolicy`):

    sd3   StableDiffusion3Pipeline (SD3.5-M, the tiny SD3 models): CFG pairs, static shift 3.0,
          noise level a = 0.7, T5 256 tokens
    flux  FluxPipeline (FLUX.1-dev, the tiny FLUX model): guidance-distilled (the guidance value
          is a transformer input, one call per step), resolution-dependent shift, a = 0.9, T5 512 tokens

This module reads JSON only (no torch), so the config can resolve a family's defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ModelFamily = Literal["sd3", "flux"]

PIPELINE_CLASSES: tuple[tuple[str, ModelFamily], ...] = (
    ("StableDiffusion3Pipeline", "sd3"),
    ("FluxPipeline", "flux"),
)


@dataclass(frozen=True)
class FamilyDefaults:
    """What a family uses when the config leaves the setting unset."""

    guidance_scale: float  # SD3: CFG scale (paper: 4.5); FLUX.1-dev: its guidance input (3.5)
    noise_level: float  # a of s_t = a sqrt(t / (1 - t)) (paper: 0.7 SD3.5-M, 0.9 FLUX)
    shift: float | None  # static flow shift; None: FLUX's resolution-dependent shift (calculate_shift)
    t5_tokens: int  # T5 sequence length when model.max_sequence_length is unset and the model has T5
    pipeline_class: str  # the diffusers class in model_index.json


def family_defaults(family: ModelFamily) -> FamilyDefaults:
    """The defaults of `family` (a new object each call: nothing module-level to mutate)."""
    if family == "flux":
        return FamilyDefaults(guidance_scale=3.5, noise_level=0.9, shift=None, t5_tokens=512, pipeline_class="FluxPipeline")
    if family == "sd3":
        return FamilyDefaults(guidance_scale=4.5, noise_level=0.7, shift=3.0, t5_tokens=256, pipeline_class="StableDiffusion3Pipeline")
    raise ValueError(f"unknown model family {family!r}; expected one of {[f for _, f in PIPELINE_CLASSES]}")


def detect_family(path: str | Path) -> ModelFamily:
    """The family of a saved diffusers pipeline folder, from model_index.json `_class_name`.

    Raises:
        FileNotFoundError: the folder has no model_index.json.
        ValueError: one line naming the file, its class and the supported classes.
    """
    index_path = Path(path) / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"model folder {str(Path(path))!r} has no model_index.json (not a saved diffusers pipeline)")
    name = json.loads(index_path.read_text(encoding="utf-8")).get("_class_name")
    for cls, family in PIPELINE_CLASSES:
        if name == cls:
            return family
    supported = ", ".join(cls for cls, _ in PIPELINE_CLASSES)
    raise ValueError(f"{str(index_path)!r}: _class_name {name!r} is not supported; supported pipelines: {supported}")


def pipeline_family(pipe: object) -> ModelFamily:
    """The family of a loaded pipeline object, by its class name."""
    name = type(pipe).__name__
    for cls, family in PIPELINE_CLASSES:
        if name == cls:
            return family
    supported = ", ".join(cls for cls, _ in PIPELINE_CLASSES)
    raise ValueError(f"pipeline class {name!r} is not supported; supported pipelines: {supported}")
