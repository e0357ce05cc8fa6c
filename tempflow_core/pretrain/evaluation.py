"""The evaluation protocol of pretraining, and the final report's scores.

ODE sampling (``tempflow_core.algorithm.rollout.sample_images``) of every prompt of a shapes split,
``per_prompt`` images each, noise seeded per prompt id, scored with the shapes detector's
strict GenEval rules (``shapes.evaluate``: overall = mean of the six task accuracies).
Evaluation draws its own seeded noise, so it never perturbs training.

Shapes: N = prompts x per_prompt images, H = W pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tempflow_core.pretrain.config import PretrainConfig


def _eval_records(split: str, per_prompt: int) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """Prompts, noise ids and metadata of every prompt of split, each repeated per_prompt times."""
    from tempflow_core.shapes import load_split

    prompts, ids, meta = [], [], []
    for rec in load_split(split):
        for j in range(per_prompt):
            prompts.append(rec["prompt"])
            ids.append(f"{rec['id']}/{j}")
            meta.append(rec)
    return prompts, ids, meta


@torch.no_grad()
def sample_split(pipe, split: str, per_prompt: int, steps: int, shift: float, cfg_scale: float, seed: int,
                 max_batch: int = 128) -> tuple[np.ndarray, list[dict[str, Any]], list[str]]:
    """The evaluation protocol's samples: uint8 [N, H, W, 3], their records and prompts."""
    from tempflow_core.policies.sd3 import SD3Policy
    from tempflow_core.algorithm.rollout import sample_images
    from tempflow_core.algorithm.schedule import make_schedule

    prompts, ids, meta = _eval_records(split, per_prompt)
    policy = SD3Policy(pipe, None, "cpu")
    images = sample_images(policy, prompts, ids, make_schedule(steps, shift=shift), cfg_scale, seed, max_batch=max_batch)
    return images, meta, prompts


def evaluate_pipeline(pipe, split: str = "test", per_prompt: int = 6, steps: int = 20, shift: float = 3.0,
                      cfg_scale: float = 4.0, seed: int = 1234) -> tuple[dict[str, Any], np.ndarray, list[str]]:
    """evaluate() of the shapes detector on sample_split; also returns the images and prompts.
    Pretraining reads its images with the detector's rules before the audit (RULES_V1): the
    committed base models were stopped and selected by them, and rerunning their command makes
    them again."""
    from tempflow_core.shapes import RULES_V1, evaluate

    images, meta, prompts = sample_split(pipe, split, per_prompt, steps, shift, cfg_scale, seed)
    return evaluate(images, meta, RULES_V1), images, prompts


@dataclass
class FinalScores:
    """Phase 6: the scores of the final report."""

    final: dict[str, Any]  # evaluate() on eval_split: overall, per_category, partial_overall, n
    final_train: dict[str, Any] | None  # evaluate() on the train split (None: skipped)
    images: np.ndarray | None  # [N, H, W, 3] uint8 samples of `final` (None: reused the last evaluation)
    prompts: list[str] | None  # N


def final_scores(pipe, cfg: PretrainConfig, last_eval: dict[str, Any]) -> FinalScores:
    """Score the trained pipeline with more images than during training and fresh noise
    (seeds eval_seed + 1 and + 2); with final_per_prompt 0, reuse the last evaluation."""
    if cfg.final_per_prompt:
        final, images, prompts = evaluate_pipeline(pipe, cfg.eval_split, cfg.final_per_prompt, cfg.eval_steps,
                                                   cfg.eval_shift, cfg.eval_cfg, cfg.eval_seed + 1)
    else:
        final = {k: last_eval[k] for k in ("overall", "per_category", "partial_overall")}
        final["n"] = last_eval["n_images"]
        images, prompts = None, None
    final_train = None
    if cfg.final_train_per_prompt:
        final_train, _, _ = evaluate_pipeline(pipe, "train", cfg.final_train_per_prompt, cfg.eval_steps, cfg.eval_shift,
                                              cfg.eval_cfg, cfg.eval_seed + 2)
    return FinalScores(final, final_train, images, prompts)
