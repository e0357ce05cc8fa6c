"""Held-out evaluation: deterministic ODE samples of a policy, scored with their standard error.

The protocol is fixed per run and shared by every checkpoint and the base model: the same
prompts, the same seeds (image j of prompt p starts from the noise of `{p.id}_s{j}`), ODE
sampling with the run's CFG (FLUX: its guidance value), or `eval.guidance_scale` when set. With `eval.images_per_category = N` every category (the
GenEval `tag` of a record, one category for records without) gets at least N images: a
category of n prompts draws ceil(N / n) seeds per prompt, so a category of three prompts is
scored on as many images as one of thirty. Scores come with their standard errors, so a
difference between two checkpoints can be read against the noise of the protocol.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from tempflow_core.config import RunConfig
from tempflow_core.policies.base import FlowPolicy
from tempflow_core.prompts import PromptRecord, load_prompts
from tempflow_core.rewards import RewardFn, RewardRegistry
from tempflow_core.algorithm.rollout import sample_images
from tempflow_core.seeding import derive_seed
from tempflow_core.shapes.detect import DetectorRules, rules_named
from tempflow_core.shapes.evaluate import standard_error


def detector_rules(cfg: RunConfig) -> DetectorRules:
    """The shapes detector's rules of the run: those its shapes reward is configured with
    (reward.options.<shapes or shapes_strict>.rules, default v2), so evaluation reads images as
    training does."""
    name = cfg.reward.name if cfg.reward.name in ("shapes", "shapes_strict") else "shapes"
    return rules_named(str(cfg.reward.options.get(name, {}).get("rules", "v2")))


def eval_prompts(cfg: RunConfig) -> list[PromptRecord]:
    """The held-out prompts: eval.prompts, else prompts.test_source, else prompts.source."""
    source = cfg.eval.prompts or cfg.prompts.test_source or cfg.prompts.source
    records = load_prompts(source)
    return records[: cfg.eval.max_prompts] if cfg.eval.max_prompts else records


def category(record: PromptRecord) -> str:
    return str(record.metadata.get("tag", "all"))


def images_per_prompt(records: list[PromptRecord], per_prompt: int, per_category: int) -> list[int]:
    """[len(records)] seeds per prompt: `per_prompt`, raised to ceil(per_category / n) for a
    prompt of a category with n prompts (per_category = 0: no floor per category)."""
    sizes: dict[str, int] = {}
    for r in records:
        sizes[category(r)] = sizes.get(category(r), 0) + 1
    return [max(per_prompt, math.ceil(per_category / sizes[category(r)]) if per_category else 0) for r in records]


def eval_samples(records: list[PromptRecord], counts: list[int]) -> list[tuple[PromptRecord, str]]:
    """(record, noise id) of every image, seed-major: the first image of every prompt, then
    the second, ... (so the images of a smaller protocol are the first ones of a larger)."""
    return [(r, f"{r.id}_s{j}") for j in range(max(counts, default=0)) for r, n in zip(records, counts) if j < n]


def evaluate_policy(cfg: RunConfig, policy: FlowPolicy, reward_fn: RewardFn, records: list[PromptRecord]
                    ) -> tuple[dict[str, Any], bytes]:
    """Score `policy` on `records` under the run's protocol.

    Returns:
        (result, grid PNG): result holds the trained reward's mean and standard error
        ("reward", "reward_se"), the number of images, the guidance sampled with, every
        image's prompt, seed and reward, the extra reward when configured, and for shapes
        records the GenEval-style overall score with its standard error, the per-category
        scores, errors and image counts, the detector's rules, and every image's category and
        strict score (so two checkpoints compare image by image: tempflow_core.reports.paired).
    """
    sched = policy.schedule(cfg.sampling.eval_num_steps, cfg.sampling.shift, cfg.sampling.noise_level)
    samples = eval_samples(records, images_per_prompt(records, cfg.eval.images_per_prompt,
                                                      cfg.eval.images_per_category))
    texts, ids = [r.text for r, _ in samples], [i for _, i in samples]
    images = np.concatenate([  # [N, H, W, 3] uint8
        sample_images(policy, texts[i:i + 64], ids[i:i + 64], sched, cfg.eval_guidance_scale(),
                      cfg.eval.seed, cfg.rollout.max_batch)
        for i in range(0, len(texts), 64)])
    meta = [r.metadata for r, _ in samples]
    scores, _ = reward_fn(images, texts, meta)
    # the noise seed of every image: torch.Generator().manual_seed(seed) in plain diffusers
    # draws the same starting latents, so exported LoRAs reproduce these images
    result: dict[str, Any] = {"reward": float(scores.mean()), "reward_se": standard_error(scores), "n": len(texts),
                              "guidance_scale": cfg.eval_guidance_scale(),
                              "samples": [{"prompt": t, "seed": derive_seed(cfg.eval.seed, "init", i),
                                           "reward": float(r)} for t, i, r in zip(texts, ids, scores)]}
    if cfg.eval.extra_reward:
        extra_fn = RewardRegistry.for_config(cfg.reward).build(cfg.eval.extra_reward, options=cfg.reward.options)
        extra, _ = extra_fn(images, texts, meta)
        result[f"extra/{cfg.eval.extra_reward}"] = float(extra.mean())
    # GenEval scores images: a clip family's frame strips get its reward (e.g. `frames` of shapes), not the table
    if all("include" in m for m in meta) and images.shape[1] == images.shape[2]:
        from tempflow_core.shapes import evaluate

        geneval = evaluate(images, [r for r, _ in samples], detector_rules(cfg), per_image=True)
        result["detector_rules"] = detector_rules(cfg).name
        for sample, (r, _), strict in zip(result["samples"], samples, geneval["strict"]):
            sample.update(category=category(r), strict=strict)  # per image: comparisons pair by it
        result["geneval_overall"] = float(geneval["overall"])
        result["geneval_overall_se"] = float(geneval["overall_se"])
        result["geneval"] = {k: float(v) for k, v in geneval["per_category"].items()}
        result["geneval_se"] = geneval["per_category_se"]
        result["geneval_counts"] = geneval["counts"]
    from tempflow_core.shapes import image_grid

    buf = io.BytesIO()
    clips = images.shape[2] > images.shape[1]  # frame strips: one clip a row, fewer of them
    n = min(len(images), 8 if clips else 32)
    image_grid(images[:n], ncols=1 if clips else 8).save(buf, format="PNG")
    return result, buf.getvalue()
