"""pretrain(): the phases of the package docstring, composed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tempflow_core.pretrain.config import PretrainConfig
from tempflow_core.pretrain.data import LatentCache, render_scenes, split_train_val
from tempflow_core.pretrain.evaluation import FinalScores, final_scores
from tempflow_core.pretrain.progress import Clock, LogFn
from tempflow_core.pretrain.record import PretrainResult, dir_size_mb, write_record
from tempflow_core.pretrain.transformer import Training, ValSet, train_transformer
from tempflow_core.pretrain.vae import encode_latents, normalise_latents, reconstruction_psnr, train_vae


def pretrain(cfg: PretrainConfig, out_dir: str | Path, progress: bool = True, log: LogFn | None = None) -> PretrainResult:
    """Pretrain the tiny SD3 pipeline and save it to out_dir (see the package docstring).

    Args:
        cfg: the run's settings.
        out_dir: the model folder to write (created; an existing pipeline there is replaced).
        progress: tqdm bars and phase lines on stderr.
        log: called as log(step, metrics) during training and at every evaluation.
    Returns:
        PretrainResult with the curve, final scores, timings and the folder's size.
    """
    clock = Clock(cfg.max_minutes, progress, log)
    pipe = _build_pipeline(cfg)
    # 1. scenes
    with clock.phase("render"):
        images, captions = render_scenes(cfg)
    clock.say(f"rendered {len(images)} scenes at {images.shape[1]} px in {clock.phase_s['render']:.1f}s")
    # 2-3. VAE and latents (cached when cache_dir is set)
    raw, vae_mses = _vae_and_latents(pipe.vae, images, cfg, clock)
    latents = normalise_latents(pipe.vae, raw)
    del raw
    vae_info = _vae_info(pipe.vae, images, latents, vae_mses)
    clock.say(f"latent shift {vae_info['shift_factor']:.4f} scale {vae_info['scaling_factor']:.4f}; "
              f"reconstruction PSNR {vae_info['psnr_db']:.1f} dB")
    clock.log(0, {"phase": "latents", **vae_info})
    # 4-5. transformer + text encoders, evaluated until the stopping rule
    train, held_out = split_train_val(latents, captions, cfg.val_images)
    val = ValSet(held_out, cfg.seed)
    del images
    training = train_transformer(pipe, cfg, train, val, clock, progress)
    clock.say(f"stopped: {training.stop_reason}")
    # 6. final report and save
    with clock.phase("final_eval"):
        scores = final_scores(pipe, cfg, training.last_eval)
    result = _save(pipe, cfg, Path(out_dir), training, scores, vae_info, clock)
    clock.say(f"saved {result.out_dir} ({result.size_mb:.1f} MB) after {result.wall_s / 60:.1f} min; "
              f"final overall {result.final['overall']:.3f}")
    return result


def _build_pipeline(cfg: PretrainConfig):
    """The randomly initialised tiny pipeline, seeded by cfg.seed."""
    from tempflow_core.policies.models import build_tiny_pipeline

    torch.manual_seed(cfg.seed)
    pipe = build_tiny_pipeline(cfg.model.model_copy(update={"seed": cfg.seed}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _vae_and_latents(vae, images: np.ndarray, cfg: PretrainConfig, clock: Clock) -> tuple[np.ndarray, list[float]]:
    """Phases 2-3, or both from the cache: raw latents [N, C, h, w] and the VAE's MSE per step."""
    cache = LatentCache.of(cfg)
    if cache is not None and cache.exists():
        raw, mses = cache.load(vae)
        clock.phase_s["vae"], clock.phase_s["encode"] = 0.0, 0.0
        clock.say(f"reused the VAE and {len(raw)} latents from {cache.folder}")
        return raw, mses
    with clock.phase("vae"):
        mses = train_vae(vae, images, cfg, clock.log, clock.progress)
    clock.say(f"VAE: {cfg.vae_steps} steps in {clock.phase_s['vae']:.1f}s, "
              f"last MSE {np.mean(mses[-20:]) if mses else float('nan'):.5f}")
    with clock.phase("encode"):
        raw = encode_latents(vae, images, cfg.encode_batch, clock.progress)
    clock.say(f"encoded {len(raw)} latents in {clock.phase_s['encode']:.1f}s")
    if cache is not None:
        cache.save(vae, raw, mses)
    return raw, mses


def _vae_info(vae, images: np.ndarray, latents: np.ndarray, mses: list[float]) -> dict[str, float]:
    return {"psnr_db": reconstruction_psnr(vae, images, latents), "shift_factor": vae.config.shift_factor,
            "scaling_factor": vae.config.scaling_factor,
            "final_mse": float(np.mean(mses[-20:])) if mses else float("nan")}


def _save(pipe, cfg: PretrainConfig, out_dir: Path, training: Training, scores: FinalScores,
          vae_info: dict[str, float], clock: Clock) -> PretrainResult:
    """Save the pipeline (safetensors) and the run's record; returns the result."""
    from tempflow_core.policies.models import save_pipeline

    wall = clock.elapsed()
    pipe.transformer.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_pipeline(pipe, out_dir)
    result = PretrainResult(
        out_dir=out_dir, steps=training.steps, images_seen=training.steps * cfg.batch, wall_s=wall,
        phase_s=clock.phase_s, stop_reason=training.stop_reason, final=scores.final, final_train=scores.final_train,
        curve=training.curve, vae=vae_info, size_mb=0.0,
        in_band=cfg.band[0] <= scores.final["overall"] <= cfg.band[1], losses=training.losses,
    )
    write_record(result, cfg, scores.images, scores.prompts)
    result.size_mb = dir_size_mb(out_dir)
    return result
