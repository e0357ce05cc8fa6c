"""The record of a pretraining run: PretrainResult, and the files that keep it next to the
weights (curve.json, curve.png, samples.png). The prose around them, MODEL_CARD.md and
README.md, is written by the flow (flows/model_card.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tempflow_core.pretrain.config import PretrainConfig


@dataclass
class PretrainResult:
    out_dir: Path
    steps: int
    images_seen: int
    wall_s: float
    phase_s: dict[str, float]
    stop_reason: str
    final: dict[str, Any]  # evaluate() of the final report on eval_split
    final_train: dict[str, Any] | None
    curve: list[dict[str, Any]]
    vae: dict[str, float]  # psnr, latent shift / scale
    size_mb: float
    in_band: bool
    losses: list[float] = field(default_factory=list)  # train loss per step


def dir_size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def write_record(res: PretrainResult, cfg: PretrainConfig, images: np.ndarray | None, prompts: list[str] | None
                 ) -> None:
    """curve.json (config, curve, timings, final scores), curve.png and, given the final
    report's samples (uint8 [N, H, W, 3] and N prompts), samples.png: the first image of each
    of the first 24 prompts."""
    from tempflow_core.shapes import image_grid

    out = res.out_dir
    (out / "curve.json").write_text(json.dumps({"config": cfg.model_dump(mode="json"), "curve": res.curve,
                                                "phase_s": res.phase_s, "stop_reason": res.stop_reason,
                                                "vae": res.vae, "final": res.final, "final_train": res.final_train,
                                                "steps": res.steps, "wall_s": res.wall_s}, indent=1))
    plot_curve(res.curve, out / "curve.png", cfg.band)
    if images is not None and prompts is not None:
        pick = [i for i in range(0, len(images), cfg.final_per_prompt)][:24]
        image_grid(images[pick], ncols=8, labels=[prompts[i] for i in pick]).save(out / "samples.png")


def plot_curve(curve: list[dict[str, Any]], path: Path, band: tuple[float, float]) -> None:
    """Strict scores over wall time (the band shaded) and train / validation loss over steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is a test extra; the curve stays in curve.json
        return
    if not curve:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    mins = [p["wall_s"] / 60 for p in curve]
    ax = axes[0]
    ax.plot(mins, [p["overall"] for p in curve], "k-o", lw=2, label="overall")
    for tag in curve[-1]["per_category"]:
        ax.plot(mins, [p["per_category"].get(tag, np.nan) for p in curve], "-", alpha=0.7, label=tag)
    ax.axhspan(*band, color="green", alpha=0.08)
    ax.set_xlabel("wall time (min, all phases)")
    ax.set_ylabel("strict score")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax2 = axes[1]
    steps = [p["step"] for p in curve]
    ax2.plot(steps, [p["train_loss"] if p["train_loss"] is not None else np.nan for p in curve], "-o", label="train loss (last 50)")
    ax2.plot(steps, [p["val_loss"] if p["val_loss"] is not None else np.nan for p in curve], "-o", label="val loss (fixed t, noise)")
    ax2.set_xlabel("transformer step")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
