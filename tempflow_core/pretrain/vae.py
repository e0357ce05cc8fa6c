"""Phases 2-3: train the AutoencoderKL, encode every scene once, normalise the latents.

The VAE trains on MSE + a small KL (both per-element means, pixels in [-1, 1]); the first
``vae_crop_fraction`` of its steps see random ``vae_crop`` crops, which is cheaper and teaches
the same local statistics. The latent mean and 1/std over all scenes become the VAE config's
``shift_factor`` / ``scaling_factor``, the convention the SD3 pipeline decodes with.

Shapes: B batch, H = W pixels (or the crop side), C, h, w the latent channels and size.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tempflow_core.pretrain.config import PretrainConfig
from tempflow_core.pretrain.data import to_pixels
from tempflow_core.pretrain.progress import LogFn


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over all elements."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def psnr(mse: float) -> float:
    """PSNR in dB of pixels in [-1, 1] (peak-to-peak 2)."""
    return float(10 * math.log10(4.0 / max(mse, 1e-12)))


def train_vae(vae, images: np.ndarray, cfg: PretrainConfig, log: LogFn | None = None, progress: bool = False
              ) -> list[float]:
    """Train the AutoencoderKL in place; returns the per-step reconstruction MSE.

    Seeded by cfg.seed: a numpy Generator draws batches and crops, a torch Generator the
    posterior samples.
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng([cfg.seed, 1])
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    vae.train()
    res = images.shape[1]
    crop_steps = int(round(cfg.vae_crop_fraction * cfg.vae_steps)) if cfg.vae_crop < res else 0
    mses = []
    for step in tqdm(range(cfg.vae_steps), desc="vae", disable=not progress, mininterval=5):
        idx = rng.integers(0, len(images), cfg.vae_batch)
        batch = images[idx]  # [B, H, W, 3] uint8
        if step < crop_steps:
            c = cfg.vae_crop
            ys, xs = rng.integers(0, res - c + 1, size=(2, len(idx)))
            batch = np.stack([b[y:y + c, x:x + c] for b, y, x in zip(batch, ys, xs)])  # [B, c, c, 3]
        x = to_pixels(batch)  # [B, 3, H, W]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)  # [B, C, h, w]
        rec = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        loss = mse + cfg.vae_kl_weight * kl_loss(post.mean, post.logvar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mses.append(float(mse.detach()))
        if log is not None and (step % 50 == 0 or step == cfg.vae_steps - 1):
            log(step, {"phase": "vae", "vae_mse": float(mse.detach()), "vae_loss": float(loss.detach())})
    vae.eval()
    return mses


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 256, progress: bool = False) -> np.ndarray:
    """Posterior means of the raw (un-normalised) VAE latents, float32 [N, C, h, w]."""
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(0, len(images), batch), desc="encode", disable=not progress, mininterval=5):
        out.append(vae.encode(to_pixels(images[i:i + batch])).latent_dist.mean.numpy())
    return np.concatenate(out, 0).astype(np.float32)


def normalise_latents(vae, raw: np.ndarray) -> np.ndarray:
    """Freeze vae, store the latents' mean and 1/std in its config as shift_factor and
    scaling_factor, and return (raw - shift) * scale, float32 [N, C, h, w]."""
    vae.requires_grad_(False)
    vae.eval()
    shift = float(raw.mean())
    scale = float(1.0 / max(float(raw.std()), 1e-6))
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return ((raw - shift) * scale).astype(np.float32)


@torch.no_grad()
def reconstruction_psnr(vae, images: np.ndarray, latents: np.ndarray, k: int = 256) -> float:
    """Full-resolution reconstruction PSNR of the first k scenes, decoded from their
    normalised latents through the pipeline's convention (z / scaling_factor + shift_factor)."""
    k = min(k, len(images))
    x = to_pixels(images[:k])
    z = torch.from_numpy(latents[:k]) / vae.config.scaling_factor + vae.config.shift_factor
    rec = vae.decode(z).sample
    return psnr(float(torch.nn.functional.mse_loss(rec.clamp(-1, 1), x)))
