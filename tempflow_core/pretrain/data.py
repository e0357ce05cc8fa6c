"""The data of a pretraining run: rendered scenes, their pixels, the latent cache, and the
split of the latents into training and validation sets.

Shapes: N scenes, H = W the model's resolution, C, h, w the latent channels and size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tempflow_core.pretrain.config import PretrainConfig


def render_scenes(cfg: PretrainConfig) -> tuple[np.ndarray, list[str]]:
    """Phase 1: cfg.images captioned scenes, uint8 [N, H, W, 3] and N captions (split "all")."""
    from tempflow_core.shapes import generate_dataset

    images, captions, _ = generate_dataset(cfg.images, cfg.seed, resolution=cfg.model.resolution, split="all")
    return images, captions


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


@dataclass(frozen=True)
class LatentCache:
    """The trained VAE and the raw latents of a run's scenes, kept in
    ``cache_dir/pretrain-<data digest>/`` so that runs differing only in the transformer
    phase skip phases 2 and 3."""

    folder: Path

    @classmethod
    def of(cls, cfg: PretrainConfig) -> LatentCache | None:
        """The cache of cfg's data settings; None without a cache_dir."""
        return cls(Path(cfg.cache_dir) / f"pretrain-{cfg.data_digest()}") if cfg.cache_dir else None

    def exists(self) -> bool:
        return (self.folder / "latents.npy").is_file() and (self.folder / "vae.pt").is_file()

    def load(self, vae: torch.nn.Module) -> tuple[np.ndarray, list[float]]:
        """Load the VAE weights into vae; returns the raw latents [N, C, h, w] and the VAE's MSE curve."""
        state = torch.load(self.folder / "vae.pt", weights_only=True)
        vae.load_state_dict(state["state_dict"])
        return np.load(self.folder / "latents.npy"), state["mses"]

    def save(self, vae: torch.nn.Module, raw: np.ndarray, mses: list[float]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": vae.state_dict(), "mses": mses}, self.folder / "vae.pt")
        np.save(self.folder / "latents.npy", raw)


@dataclass(frozen=True)
class LatentSet:
    """Normalised latents with their captions."""

    latents: np.ndarray  # [N, C, h, w] float32, (raw - shift_factor) * scaling_factor
    captions: list[str]  # N


def split_train_val(latents: np.ndarray, captions: list[str], val_images: int) -> tuple[LatentSet, LatentSet]:
    """The last min(val_images, N // 4) scenes are held out of transformer training."""
    n_val = min(val_images, len(latents) // 4)
    n_train = len(latents) - n_val
    return (LatentSet(latents[:n_train], captions[:n_train]),
            LatentSet(latents[n_train:], captions[n_train:]))
