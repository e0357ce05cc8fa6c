"""The settings of a pretraining run: everything that, with the seed, determines the weights."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field

from tempflow_core.config import TinyModelConfig

SHIPPED_MODEL = TinyModelConfig(
    resolution=64, vae_channels=[32, 64, 64], latent_channels=4, layers=6, heads=4, head_dim=32,
    patch_size=2, text_width=64, text_layers=2, max_tokens=16, seed=0,
)
"""Sizes of the shipped 64 px base model (the measured configuration of the project notes)."""


class PretrainConfig(BaseModel):
    """Everything that determines a pretraining run (with the seed, the weights)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, description="Seeds data rendering, initialisation, batches, t and noise.")
    model: TinyModelConfig = Field(SHIPPED_MODEL, description="Pipeline sizes (model.seed is replaced by seed).")
    # data
    images: int = Field(50_000, ge=8, description="Rendered scenes (all tags, split 'all').")
    val_images: int = Field(512, ge=0, description="Scenes held out of transformer training for a fixed-noise validation loss.")
    # VAE
    vae_steps: int = Field(600, ge=0)
    vae_batch: int = Field(32, ge=1)
    vae_lr: float = Field(1e-3, gt=0)
    vae_kl_weight: float = Field(1e-4, ge=0, description="Weight of the per-element mean KL next to the per-element pixel MSE (pixels in [-1, 1]).")
    vae_crop: int = Field(32, ge=8, description="Crop side for the first vae_crop_fraction of the VAE steps (multiple of the VAE downsampling).")
    vae_crop_fraction: float = Field(0.7, ge=0, le=1)
    encode_batch: int = Field(256, ge=1)
    # transformer + text encoders
    steps: int = Field(6000, ge=0, description="Max transformer steps (step budget).")
    batch: int = Field(64, ge=1)
    lr: float = Field(8e-4, gt=0)
    warmup: int = Field(100, ge=0, description="Linear warm-up steps, then constant lr.")
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    caption_dropout: float = Field(0.1, ge=0, le=1, description="Share of captions replaced by the empty prompt (for CFG).")
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0, description="t = sigmoid(N(logit_mean, logit_std^2)): SD3's logit-normal sampling.")
    max_minutes: float | None = Field(None, gt=0, description="Wall-clock budget of the whole run (all phases); training stops at the first step past it.")
    # evaluation protocol
    eval_every: int = Field(300, ge=1, description="Transformer steps between evaluations.")
    eval_at_start: bool = Field(False, description="Also evaluate the untrained transformer (step 0).")
    eval_split: str = Field("test", description="Shapes prompt split sampled at each evaluation.")
    eval_per_prompt: int = Field(6, ge=1, description="Images per prompt at each evaluation (39 test prompts x 6 = 234 images).")
    eval_steps: int = Field(20, ge=1, description="Euler ODE steps.")
    eval_shift: float = Field(3.0, gt=0, description="Flow shift of the evaluation grid (3.0 = the pipeline's scheduler and the RL default).")
    eval_cfg: float = Field(4.0, ge=1.0)
    eval_seed: int = Field(1234, description="Seed of the evaluation noise (the same at every evaluation).")
    final_per_prompt: int = Field(16, ge=0, description="Images per prompt of the final report on eval_split (0: reuse the last evaluation).")
    final_train_per_prompt: int = Field(4, ge=0, description="Images per train-split prompt in the final report (0: skip).")
    band: tuple[float, float] = Field((0.25, 0.65), description="Wanted overall strict score of the base model.")
    stop_at: float = Field(0.40, description="Stop at the first evaluation with overall >= stop_at (inside band).")
    cache_dir: str | None = Field(None, description="Reuse/keep the trained VAE and latent cache here (keyed by a digest of the settings that produce them).")

    @classmethod
    def with_overrides(cls, overrides: list[str], **fields: object) -> "PretrainConfig":
        """The default config with `section.field=value` overrides, then `fields` (None: kept).
        Overrides apply on top of the defaults' values, so `model.resolution=32` keeps the
        shipped model's other sizes (validating {"model": {"resolution": 32}} alone would
        reset them to TinyModelConfig's class defaults)."""
        from tempflow_core.config import apply_overrides

        data = apply_overrides(cls().model_dump(mode="json"), overrides)
        data.update({k: v for k, v in fields.items() if v is not None})
        return cls.model_validate(data)

    def data_digest(self) -> str:
        """Digest of the settings that determine the VAE and the latent cache."""
        keys = ("seed", "images", "vae_steps", "vae_batch", "vae_lr", "vae_kl_weight", "vae_crop", "vae_crop_fraction")
        d = {k: getattr(self, k) for k in keys}
        d["model"] = self.model.model_dump(mode="json")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
