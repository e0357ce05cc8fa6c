"""Export a checkpoint's LoRA with the recipe it was trained and evaluated with.

The folder loads with plain diffusers (`load_lora_weights`), and recipe.json + README.md
say how to sample so the exported model reproduces the evaluated images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from tempflow_core.canonical import canonicalize_file
from tempflow_core.algorithm.checkpoint import adapter_bytes, load_checkpoint
from tempflow_core.config import DEFAULT_LORA_TARGETS, RunConfig
from tempflow_core.families import family_defaults, family_spec, lora_targets
from tempflow_core.run.fingerprints import folder_sha256
from tempflow_core.policies.models import absent_components
from tempflow_core.run.layout import RunLayout
from tempflow_core.run.runs import read_run


def effective_max_sequence_length(cfg: RunConfig) -> int:
    """What the policy uses: the configured value, else the family's T5 tokens, where a family
    may be saved without T5 (SD3) 0 without it, and where T5 is required (FLUX) capped by the T5
    tokenizer's model_max_length."""
    if cfg.model.max_sequence_length is not None:
        return cfg.model.max_sequence_length
    spec = family_spec(cfg.family())
    tokens = spec.defaults.text_tokens
    if not spec.long_required:
        has_t5 = bool(cfg.model.path) and (Path(cfg.model.path) / spec.optional_components[0]).is_dir()
        return tokens if has_t5 else 0
    if not cfg.model.path:
        return min(tokens, cfg.model.tiny.max_tokens * spec.tiny_tokens_factor)
    tok = Path(cfg.model.path) / str(spec.long_tokenizer) / "tokenizer_config.json"
    cap = json.loads(tok.read_text()).get("model_max_length", tokens) if tok.is_file() else tokens
    return int(min(tokens, cap))


def native_resolution(cfg: RunConfig) -> int:
    """The pixels the model samples at when model.resolution is unset."""
    if cfg.model.resolution:
        return cfg.model.resolution
    if not cfg.model.path:
        return cfg.model.tiny.resolution
    root = Path(cfg.model.path)
    v = json.loads((root / "vae" / "config.json").read_text())
    if family_spec(cfg.family()).native_side == "vae":  # FLUX's transformer has no sample_size; the VAE's is the default
        return int(v.get("sample_size", 1024))  # Qwen-Image's VAE has none: QwenImagePipeline's default 1024
    t = json.loads((root / "transformer" / "config.json").read_text())
    return int(t["sample_size"]) * 2 ** (len(v["block_out_channels"]) - 1)


def native_frames(cfg: RunConfig) -> int | None:
    """Frames of a clip for a video family (model.num_frames, else the folder's VAE config's
    sample_frames, else 33 as WanPolicy takes them); None for an image family."""
    if not family_spec(cfg.family()).video:
        return None
    if cfg.model.num_frames:
        return cfg.model.num_frames
    if not cfg.model.path:
        from tempflow_core.policies.tiny_wan import TINY_FRAMES

        return TINY_FRAMES
    from tempflow_core.policies.wan import NATIVE

    v = json.loads((Path(cfg.model.path) / "vae" / "config.json").read_text())
    return int(v.get("sample_frames", NATIVE[1]))


def recipe(cfg: RunConfig, run_id: str, iteration: int, resolution: int | None,
           inputs: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The sampling recipe; unset shift / noise level are written as the family's values (FLUX's
    shift is resolution-dependent: "dynamic", which FluxPipeline computes itself).
    `base_model_sha256` is `folder_sha256` of the model folder, reusing the file digests of the
    run's record (`inputs`)."""
    s = cfg.sampling
    family = cfg.family()
    d = family_defaults(family)
    resolution = resolution or native_resolution(cfg)
    shift = s.shift if s.shift is not None else (d.shift if d.shift is not None else "dynamic")
    return {
        "base_model": cfg.model.path or f"tiny random {family.upper()} (seed {cfg.model.tiny.seed})",
        "base_model_sha256": folder_sha256(cfg.model.path, inputs) if cfg.model.path else "tiny-random",
        "num_inference_steps": s.eval_num_steps, "guidance_scale": cfg.eval_guidance_scale(), "shift": shift,
        "sampler": "FlowMatchEulerDiscreteScheduler (ODE)",
        "train_noise_level": s.noise_level if s.noise_level is not None else d.noise_level,
        "train_num_steps": s.num_steps, "resolution": resolution, "max_sequence_length": effective_max_sequence_length(cfg),
        "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "target_modules": _targets(cfg)},
        "weights": "ema" if cfg.train.ema_decay > 0 else "raw",
        "algorithm": cfg.algorithm, "reward": cfg.reward.name, "run": run_id, "iteration": iteration,
        "config_digest": cfg.digest(),
        **({"num_frames": native_frames(cfg)} if family_spec(cfg.family()).video else {}),
    }


def _targets(cfg: RunConfig) -> list[str]:
    return lora_targets(cfg.lora.target_modules, DEFAULT_LORA_TARGETS, cfg.family())


def _lora_meta(cfg: RunConfig) -> dict[str, Any]:
    return {"r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha, "target_modules": _targets(cfg),
            "init_lora_weights": cfg.lora.init if cfg.lora.init == "gaussian" else True}


def export_lora(cfg: RunConfig, layout: RunLayout, iteration: int, out: str | Path,
                resolution: int | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = layout.prefix(iteration, "learner")
    ck = load_checkpoint(layout.store, prefix)
    family = cfg.family()
    if ck.ema is not None:  # the evaluated weights: the EMA, in diffusers' format
        import diffusers

        pipeline = getattr(diffusers, family_spec(family).pipeline_class)
        pipeline.save_lora_weights(str(out), transformer_lora_layers=ck.ema, safe_serialization=True,
                                   transformer_lora_adapter_metadata=_lora_meta(cfg))
        canonicalize_file(out / "pytorch_lora_weights.safetensors")  # same tensors, same bytes
    else:
        (out / "pytorch_lora_weights.safetensors").write_bytes(adapter_bytes(layout.store, prefix))
    record = read_run(layout) or {}
    r = recipe(cfg, layout.run_id, iteration, resolution, record.get("inputs"))
    (out / "recipe.json").write_text(json.dumps(r, indent=2, sort_keys=True))
    none_kwargs = "".join(f", {k}=None" for k in absent_components(cfg.model.path)) if cfg.model.path else ""
    (out / "README.md").write_text(_readme(cfg, layout, iteration, out, r, family, none_kwargs))
    return out


def _readme(cfg: RunConfig, layout: RunLayout, iteration: int, out: Path, r: dict[str, Any], family: str,
            none_kwargs: str) -> str:
    """The exported README: how to sample the LoRA with plain diffusers as it was evaluated."""
    spec = family_spec(family)
    pipeline = spec.pipeline_class
    if spec.defaults.shift is not None:  # a static shift
        note = f"The scheduler must keep shift {r['shift']} (the model folder's scheduler config sets it)."
    elif r["shift"] == "dynamic":
        note = "The scheduler keeps its dynamic, resolution-dependent shift (the model folder's scheduler config sets it)."
    else:
        note = (f"Trained with a fixed shift {r['shift']}: set the scheduler's base_shift and max_shift to "
                f"ln({r['shift']}) to sample on the same grid.")
    note = f"{spec.guidance_note}\n{note}" if spec.guidance_note else note
    guidance = f"{spec.guidance_kwarg}={r['guidance_scale']}"
    if spec.negative_prompt and r["guidance_scale"] > 1:  # a negative the pipeline does not default to
        guidance = f"negative_prompt={spec.negative_prompt!r}, {guidance}"
    imports, scheduler, out_name, frames, take = pipeline, "", "image", "", ".images[0]"
    if spec.video:  # a clip: its frames, and the Euler sampler it was evaluated with (Wan2.1 folders ship UniPC)
        imports = f"FlowMatchEulerDiscreteScheduler, {pipeline}"
        scheduler = f"pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift={r['shift']})\n"
        out_name, frames, take = "video", f" num_frames={r['num_frames']},", ".frames[0]  # [frames, H, W, 3]"
        note = ("The policy samples with the flow-matching Euler step; the snippet sets that scheduler with the "
                "shift it was trained with (Wan2.1 folders ship UniPC, another sampler).")
    return f"""# LoRA from tempflow run `{layout.run_id}`, iteration {iteration}

Trained with `{cfg.algorithm}` on reward `{cfg.reward.name}`; base model `{r['base_model']}`
(fingerprint `{r['base_model_sha256'][:16]}`). Sample it as it was evaluated:

```python
import torch
from diffusers import {imports}

pipe = {pipeline}.from_pretrained("{r['base_model']}"{none_kwargs})
pipe.load_lora_weights("{out.resolve()}")
{scheduler}{out_name} = pipe("a red circle left of a blue square", height={r['resolution']}, width={r['resolution']},{frames}
             num_inference_steps={r['num_inference_steps']},
             {guidance}, max_sequence_length={r['max_sequence_length']},
             generator=torch.Generator().manual_seed(0)){take}
```

{note}
Full recipe: recipe.json.
"""
