"""Pretrain the tiny StableDiffusion3Pipeline on rendered shape scenes: the shipped base model.

The latent route of the project notes, deterministic given a seed:

1. render ``images`` captioned scenes (``shapes.generate_dataset``, all six GenEval tags);
2. train the AutoencoderKL (MSE + small KL; the first ``vae_crop_fraction`` of the steps on
   random ``vae_crop`` crops, which is cheaper and teaches the same local statistics), then
   store the latent mean / 1/std as ``shift_factor`` / ``scaling_factor`` in its config;
3. encode every scene once (posterior mean) and cache the normalised latents;
4. train the SD3 transformer and both tiny CLIP text encoders jointly with the rectified-flow
   loss (x_t = (1-t) x0 + t eps, target eps - x0, logit-normal t, timestep 1000 t, 10%
   caption dropout to the empty prompt). Prompts go through the pipeline's own
   ``encode_prompt(..., max_sequence_length=0)`` with gradients on, so sampling later sees
   exactly the embeddings training saw;
5. every ``eval_every`` steps sample the test prompts with the fixed protocol (ODE,
   ``tempflow_core.rollout.sample_images``) and score them with the shapes detector; stop once
   the overall strict score reaches ``stop_at`` (inside ``band``), or at the step/time budget;
6. save with ``save_pipeline`` (safetensors) plus MODEL_CARD.md, README.md, curve.json/png
   and a sample grid.

Determinism: every random draw comes from a generator seeded by ``seed`` (numpy Generators
for data order, crops and caption dropout; torch Generators for init, KL sampling, t and
noise), and evaluation draws its own seeded noise, so it does not perturb training. Two runs
with the same config, torch build, thread count and CPU give bit-identical weights. Caveats:
different ``torch.set_num_threads`` values or CPUs (SIMD paths) can change float reduction
order; the wall-clock budget ``max_minutes`` (and hence the stopping step) depends on the
machine's speed; ``stop_at`` stopping is deterministic because evaluation is.

CLI: ``python -m tempflow_core.pretrain --out models/tiny-shapes-sd3 [--seed 0] [--minutes N] [--images N]``.
On shared cores run it with ``OMP_WAIT_POLICY=PASSIVE`` (set before torch starts): with the
default spinning OpenMP threads, a second busy process on the same 2 cores slowed training
5-10x in our measurements (benchmarks/pretrain_throughput.py).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .config import TinyModelConfig

LogFn = Callable[[int, dict[str, Any]], None]

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

    def data_digest(self) -> str:
        """Digest of the settings that determine the VAE and the latent cache."""
        keys = ("seed", "images", "vae_steps", "vae_batch", "vae_lr", "vae_kl_weight", "vae_crop", "vae_crop_fraction")
        d = {k: getattr(self, k) for k in keys}
        d["model"] = self.model.model_dump(mode="json")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


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


# ---------------------------------------------------------------------------- helpers
def _to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def _psnr(mse: float) -> float:
    # pixels in [-1, 1]: peak-to-peak 2
    return float(10 * math.log10(4.0 / max(mse, 1e-12)))


def _dir_size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def _eval_records(split: str, per_prompt: int) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    from .shapes import load_split

    prompts, ids, meta = [], [], []
    for rec in load_split(split):
        for j in range(per_prompt):
            prompts.append(rec["prompt"])
            ids.append(f"{rec['id']}/{j}")
            meta.append(rec)
    return prompts, ids, meta


def _set_trainable(pipe, on: bool) -> None:
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(on)
        m.train(on)


@torch.no_grad()
def sample_split(pipe, split: str, per_prompt: int, steps: int, shift: float, cfg_scale: float, seed: int,
                 max_batch: int = 128) -> tuple[np.ndarray, list[dict[str, Any]], list[str]]:
    """The evaluation protocol: ODE samples of every prompt of a split, per_prompt each."""
    from .policy import Policy
    from .rollout import sample_images
    from .schedule import make_schedule

    prompts, ids, meta = _eval_records(split, per_prompt)
    policy = Policy(pipe, None, "cpu")
    images = sample_images(policy, prompts, ids, make_schedule(steps, shift=shift), cfg_scale, seed, max_batch=max_batch)
    return images, meta, prompts


def evaluate_pipeline(pipe, split: str = "test", per_prompt: int = 6, steps: int = 20, shift: float = 3.0,
                      cfg_scale: float = 4.0, seed: int = 1234) -> tuple[dict[str, Any], np.ndarray, list[str]]:
    """evaluate() of the shapes detector on sample_split; also returns the images and prompts."""
    from .shapes import evaluate

    images, meta, prompts = sample_split(pipe, split, per_prompt, steps, shift, cfg_scale, seed)
    return evaluate(images, meta), images, prompts


# ---------------------------------------------------------------------------- phases
def render_scenes(cfg: PretrainConfig) -> tuple[np.ndarray, list[str]]:
    from .shapes import generate_dataset

    images, captions, _ = generate_dataset(cfg.images, cfg.seed, resolution=cfg.model.resolution, split="all")
    return images, captions


def train_vae(vae, images: np.ndarray, cfg: PretrainConfig, log: LogFn | None = None, progress: bool = False
              ) -> list[float]:
    """Train the AutoencoderKL in place; returns the per-step reconstruction MSE."""
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
        batch = images[idx]
        if step < crop_steps:
            c = cfg.vae_crop
            ys, xs = rng.integers(0, res - c + 1, size=(2, len(idx)))
            batch = np.stack([b[y:y + c, x:x + c] for b, y, x in zip(batch, ys, xs)])
        x = _to_pixels(batch)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        loss = mse + cfg.vae_kl_weight * _kl(post.mean, post.logvar)
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
        out.append(vae.encode(_to_pixels(images[i:i + batch])).latent_dist.mean.numpy())
    return np.concatenate(out, 0).astype(np.float32)


def encode_text(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own prompt encoding (CLIP hidden_states[-2] of both encoders
    concatenated; pooled = both projections), with gradients when enabled. Each distinct
    prompt is encoded once."""
    uniq = sorted(set(prompts))
    pos = {p: i for i, p in enumerate(uniq)}
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=uniq, prompt_2=None, prompt_3=None, device=torch.device("cpu"),
        do_classifier_free_guidance=False, max_sequence_length=0,
    )
    rows = torch.tensor([pos[p] for p in prompts])
    return embeds[rows], pooled[rows]


def flow_loss(pipe, x0: torch.Tensor, prompts: list[str], t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Rectified-flow MSE: x_t = (1-t) x0 + t eps, target eps - x0, timestep 1000 t."""
    embeds, pooled = encode_text(pipe, prompts)
    tt = t.view(-1, 1, 1, 1)
    xt = (1.0 - tt) * x0 + tt * eps
    pred = pipe.transformer(hidden_states=xt, timestep=t * 1000.0, encoder_hidden_states=embeds,
                            pooled_projections=pooled, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred, eps - x0)


class _ValSet:
    """A fixed validation loss: held-out latents, stratified t, fixed noise, full captions."""

    def __init__(self, latents: np.ndarray, captions: list[str], seed: int):
        n = len(latents)
        self.x0 = torch.from_numpy(latents)
        self.captions = captions
        self.t = (torch.arange(n, dtype=torch.float32) + 0.5) / max(n, 1)
        self.eps = torch.randn(self.x0.shape, generator=torch.Generator().manual_seed(seed * 1000 + 7))

    @torch.no_grad()
    def loss(self, pipe, batch: int = 256) -> float | None:
        if len(self.x0) == 0:
            return None
        tot = 0.0
        for i in range(0, len(self.x0), batch):
            sl = slice(i, i + batch)
            tot += float(flow_loss(pipe, self.x0[sl], self.captions[sl], self.t[sl], self.eps[sl])) * len(self.x0[sl])
        return tot / len(self.x0)


# ---------------------------------------------------------------------------- main entry
def pretrain(cfg: PretrainConfig, out_dir: str | Path, progress: bool = True, log: LogFn | None = None) -> PretrainResult:
    """Pretrain the tiny SD3 pipeline and save it to out_dir (see the module docstring).

    Args:
        cfg: the run's settings.
        out_dir: the model folder to write (created; an existing pipeline there is replaced).
        progress: tqdm bars and phase lines on stderr.
        log: called as log(step, metrics) during training and at every evaluation.
    Returns:
        PretrainResult with the curve, final scores, timings and the folder's size.
    """
    from .models import build_tiny_pipeline, save_pipeline

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    deadline = t_start + 60 * cfg.max_minutes if cfg.max_minutes else None
    phase_s: dict[str, float] = {}

    def say(msg: str) -> None:
        if progress:
            print(f"[pretrain {time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def emit(step: int, metrics: dict[str, Any]) -> None:
        if log is not None:
            log(step, metrics)

    torch.manual_seed(cfg.seed)
    mcfg = cfg.model.model_copy(update={"seed": cfg.seed})
    import tempfile

    tok_dir = tempfile.mkdtemp(prefix="tempflow-pretrain-tok-")
    pipe = build_tiny_pipeline(mcfg, workdir=tok_dir)
    pipe.set_progress_bar_config(disable=True)

    # ---- 1-3: scenes, VAE, latents (cached when cache_dir is set)
    t0 = time.perf_counter()
    images, captions = render_scenes(cfg)
    phase_s["render"] = time.perf_counter() - t0
    say(f"rendered {len(images)} scenes at {images.shape[1]} px in {phase_s['render']:.1f}s")

    cache = Path(cfg.cache_dir) / f"pretrain-{cfg.data_digest()}" if cfg.cache_dir else None
    if cache is not None and (cache / "latents.npy").is_file() and (cache / "vae.pt").is_file():
        state = torch.load(cache / "vae.pt", weights_only=True)
        pipe.vae.load_state_dict(state["state_dict"])
        vae_mses = state["mses"]
        raw = np.load(cache / "latents.npy")
        phase_s["vae"], phase_s["encode"] = 0.0, 0.0
        say(f"reused the VAE and {len(raw)} latents from {cache}")
    else:
        t0 = time.perf_counter()
        vae_mses = train_vae(pipe.vae, images, cfg, log, progress)
        phase_s["vae"] = time.perf_counter() - t0
        say(f"VAE: {cfg.vae_steps} steps in {phase_s['vae']:.1f}s, last MSE {np.mean(vae_mses[-20:]) if vae_mses else float('nan'):.5f}")
        t0 = time.perf_counter()
        raw = encode_latents(pipe.vae, images, cfg.encode_batch, progress)
        phase_s["encode"] = time.perf_counter() - t0
        say(f"encoded {len(raw)} latents in {phase_s['encode']:.1f}s")
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": pipe.vae.state_dict(), "mses": vae_mses}, cache / "vae.pt")
            np.save(cache / "latents.npy", raw)
    pipe.vae.requires_grad_(False)
    pipe.vae.eval()

    shift = float(raw.mean())
    scale = float(1.0 / max(float(raw.std()), 1e-6))
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = ((raw - shift) * scale).astype(np.float32)
    del raw
    with torch.no_grad():  # full-res reconstruction quality on a fixed slice, through the pipeline's convention
        k = min(256, len(images))
        x = _to_pixels(images[:k])
        rec = pipe.vae.decode(torch.from_numpy(latents[:k]) / scale + shift).sample
        vae_psnr = _psnr(float(torch.nn.functional.mse_loss(rec.clamp(-1, 1), x)))
    vae_info = {"psnr_db": vae_psnr, "shift_factor": shift, "scaling_factor": scale,
                "final_mse": float(np.mean(vae_mses[-20:])) if vae_mses else float("nan")}
    say(f"latent shift {shift:.4f} scale {scale:.4f}; reconstruction PSNR {vae_psnr:.1f} dB")
    emit(0, {"phase": "latents", **vae_info})

    n_val = min(cfg.val_images, len(latents) // 4)
    n_train = len(latents) - n_val
    val = _ValSet(latents[n_train:], captions[n_train:], cfg.seed)
    train_lat = torch.from_numpy(latents[:n_train])
    train_caps = captions[:n_train]
    del images

    # ---- 4-5: transformer + text encoders
    params = [p for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) if cfg.warmup else 1.0)
    rng = np.random.default_rng([cfg.seed, 2])
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 2)
    curve: list[dict[str, Any]] = []
    losses: list[float] = []
    t_train0 = time.perf_counter()
    eval_s = 0.0
    last_eval: dict[str, Any] | None = None
    snapshot: dict[str, Any] | None = None  # last in-band weights (restored on overshoot)
    stop_reason = "step budget"

    def run_eval(step: int) -> dict[str, Any]:
        nonlocal eval_s
        te = time.perf_counter()
        res, _, _ = evaluate_pipeline(pipe, cfg.eval_split, cfg.eval_per_prompt, cfg.eval_steps, cfg.eval_shift,
                                      cfg.eval_cfg, cfg.eval_seed)
        vl = val.loss(pipe)
        _set_trainable(pipe, True)
        eval_s += time.perf_counter() - te
        recent = losses[-50:]
        point = {
            "step": step, "images_seen": step * cfg.batch,
            "wall_s": round(time.perf_counter() - t_start, 1),
            "train_wall_s": round(time.perf_counter() - t_train0 - eval_s, 1),
            "eval_s": round(time.perf_counter() - te, 1),
            "train_loss": float(np.mean(recent)) if recent else None, "val_loss": vl,
            "overall": res["overall"], "per_category": res["per_category"],
            "partial_overall": res["partial_overall"], "n_images": res["n"],
        }
        curve.append(point)
        say(f"eval step {step}: overall {res['overall']:.3f} " + " ".join(f"{k[:6]} {v:.2f}" for k, v in res["per_category"].items())
            + (f" | val loss {vl:.4f}" if vl is not None else "") + f" ({point['eval_s']:.0f}s)")
        emit(step, {"phase": "eval", **point})
        return point

    _set_trainable(pipe, True)
    if cfg.eval_at_start:
        last_eval = run_eval(0)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, desc="transformer", disable=not progress, mininterval=10)
    step = 0
    order = rng.permutation(n_train)
    pos = 0
    while step < cfg.steps:
        if pos + cfg.batch > n_train:
            order, pos = rng.permutation(n_train), 0
        idx = order[pos:pos + min(cfg.batch, n_train)]
        pos += len(idx)
        caps = [train_caps[i] for i in idx]
        drop = rng.random(len(idx)) < cfg.caption_dropout
        caps = ["" if d else c for c, d in zip(caps, drop)]
        x0 = train_lat[torch.from_numpy(idx)]
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(len(idx), generator=gen))
        eps = torch.randn(x0.shape, generator=gen)
        loss = flow_loss(pipe, x0, caps, t, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        if step % 25 == 0:
            emit(step, {"phase": "transformer", "loss": float(np.mean(losses[-25:])), "grad_norm": float(gnorm),
                        "lr": sched.get_last_lr()[0]})
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
        over_time = deadline is not None and time.perf_counter() > deadline
        if step % cfg.eval_every == 0 or step == cfg.steps or over_time:
            last_eval = run_eval(step)
            score = last_eval["overall"]
            if cfg.band[0] <= score <= cfg.band[1]:
                snapshot = {"step": step, "state": {n: copy.deepcopy(m.state_dict()) for n, m in
                                                    (("transformer", pipe.transformer), ("text_encoder", pipe.text_encoder),
                                                     ("text_encoder_2", pipe.text_encoder_2))}}
            if score >= cfg.stop_at and score <= cfg.band[1]:
                stop_reason = f"overall {score:.3f} >= stop_at {cfg.stop_at} at step {step}"
                break
            if score > cfg.band[1]:
                stop_reason = f"overall {score:.3f} above the band at step {step}"
                if snapshot is not None:
                    for n, sd in snapshot["state"].items():
                        getattr(pipe, n).load_state_dict(sd)
                    stop_reason += f"; restored the in-band weights of step {snapshot['step']}"
                    step = snapshot["step"]
                    last_eval = next(p for p in curve if p["step"] == step)
                break
            if over_time:
                stop_reason = f"time budget ({cfg.max_minutes} min) at step {step}"
                break
    bar.close()
    phase_s["transformer"] = time.perf_counter() - t_train0 - eval_s
    phase_s["eval"] = eval_s
    _set_trainable(pipe, False)
    if last_eval is None:
        last_eval = run_eval(step)
    say(f"stopped: {stop_reason}")

    # ---- final report and save
    t0 = time.perf_counter()
    if cfg.final_per_prompt:
        final, final_images, final_prompts = evaluate_pipeline(pipe, cfg.eval_split, cfg.final_per_prompt, cfg.eval_steps,
                                                               cfg.eval_shift, cfg.eval_cfg, cfg.eval_seed + 1)
    else:
        final = {k: last_eval[k] for k in ("overall", "per_category", "partial_overall")}
        final["n"] = last_eval["n_images"]
        final_images, final_prompts = None, None
    final_train = None
    if cfg.final_train_per_prompt:
        final_train, _, _ = evaluate_pipeline(pipe, "train", cfg.final_train_per_prompt, cfg.eval_steps, cfg.eval_shift,
                                              cfg.eval_cfg, cfg.eval_seed + 2)
    phase_s["final_eval"] = time.perf_counter() - t0
    wall = time.perf_counter() - t_start
    pipe.transformer.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_pipeline(pipe, out_dir)
    result = PretrainResult(
        out_dir=out_dir, steps=step, images_seen=step * cfg.batch, wall_s=wall, phase_s=phase_s,
        stop_reason=stop_reason, final=final, final_train=final_train, curve=curve, vae=vae_info, size_mb=0.0,
        in_band=cfg.band[0] <= final["overall"] <= cfg.band[1], losses=losses,
    )
    write_report(result, cfg, final_images, final_prompts)
    result.size_mb = _dir_size_mb(out_dir)
    say(f"saved {out_dir} ({result.size_mb:.1f} MB) after {wall / 60:.1f} min; final overall {final['overall']:.3f}")
    return result


# ---------------------------------------------------------------------------- report
def _plot_curve(curve: list[dict[str, Any]], path: Path, band: tuple[float, float]) -> None:
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


def _command_line() -> str:
    argv = getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv
    return " ".join(shlex.quote(a) for a in argv)


def write_report(res: PretrainResult, cfg: PretrainConfig, images: np.ndarray | None, prompts: list[str] | None) -> None:
    from .shapes import format_table, image_grid

    out = res.out_dir
    (out / "curve.json").write_text(json.dumps({"config": cfg.model_dump(mode="json"), "curve": res.curve,
                                                "phase_s": res.phase_s, "stop_reason": res.stop_reason,
                                                "vae": res.vae, "final": res.final, "final_train": res.final_train,
                                                "steps": res.steps, "wall_s": res.wall_s}, indent=1))
    _plot_curve(res.curve, out / "curve.png", cfg.band)
    if images is not None and prompts is not None:
        per = cfg.final_per_prompt
        pick = [i for i in range(0, len(images), per)][:24]
        image_grid(images[pick], ncols=8, labels=[prompts[i] for i in pick]).save(out / "samples.png")
    rows = {f"{cfg.eval_split} ({res.final['n']} images)": res.final}
    if res.final_train is not None:
        rows[f"train ({res.final_train['n']} images)"] = res.final_train
    table = format_table(rows)
    curve_lines = ["| step | images seen | wall (min) | train loss | val loss | overall | " +
                   " | ".join(res.final["per_category"]) + " |",
                   "|" + "---:|" * (6 + len(res.final["per_category"]))]
    for p in res.curve:
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        curve_lines.append(f"| {p['step']} | {p['images_seen']} | {p['wall_s'] / 60:.1f} | {fmt(p['train_loss'])} | "
                           f"{fmt(p['val_loss'])} | {p['overall']:.3f} | " +
                           " | ".join(f"{p['per_category'].get(t, float('nan')):.2f}" for t in res.final["per_category"]) + " |")
    m = cfg.model
    n_params = {}
    try:
        from .models import load_pipeline

        pipe = load_pipeline(out)
        n_params = {k: sum(p.numel() for p in getattr(pipe, k).parameters())
                    for k in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    except Exception:  # the card is still written without parameter counts
        pass
    params_txt = ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in n_params.items())
    threads = torch.get_num_threads()
    card = f"""# tiny-shapes-sd3: a tiny StableDiffusion3Pipeline pretrained on the shapes world

A real diffusers `StableDiffusion3Pipeline` (SD3 transformer, AutoencoderKL, two tiny CLIP text
encoders with projection, no T5) trained from scratch on rendered {m.resolution}x{m.resolution}
shape scenes (4 colours x circle/square/triangle, captions in GenEval's six tasks). It is the
base model of TempFlow-GRPO runs: its GenEval-like strict score is kept inside the band
{cfg.band[0]:.2f}-{cfg.band[1]:.2f} on purpose, so RL has headroom (position and counting are weakest).

Load it offline with `tempflow_core.models.load_pipeline("models/tiny-shapes-sd3")`; sample with
`max_sequence_length=0`, {m.resolution} px, CFG ~4 (`pipe("a red circle", height={m.resolution}, width={m.resolution},
max_sequence_length=0, guidance_scale=4.0, num_inference_steps=20)`).

## How it was made

```
{_command_line()}
```

- code: `tempflow_core/pretrain.py` (`pretrain(PretrainConfig(...), out_dir)`), seed {cfg.seed}
- machine: {platform.machine()} {platform.processor() or ''} CPU, torch {torch.__version__}, {threads} threads, {os.cpu_count()} cores visible (shared with other work), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; fp32
- wall time: **{res.wall_s / 60:.1f} min** in all (render {res.phase_s.get('render', 0):.0f} s, VAE {res.phase_s.get('vae', 0):.0f} s,
  encode {res.phase_s.get('encode', 0):.0f} s, transformer {res.phase_s.get('transformer', 0):.0f} s, evaluations {res.phase_s.get('eval', 0):.0f} s,
  final report {res.phase_s.get('final_eval', 0):.0f} s)
- transformer steps: **{res.steps}** at batch {cfg.batch} ({res.images_seen:,} images seen); stopped: {res.stop_reason}
- parameters: {params_txt}; folder size {_dir_size_mb(out):.1f} MB (safetensors, fp32)

### Data
{cfg.images:,} scenes from `tempflow_core.shapes.generate_dataset(n, seed={cfg.seed}, resolution={m.resolution}, split="all")`
(tag uniform over the six GenEval tasks, then a prompt of the whole vocabulary, so test prompts are seen
too, as SD3.5 has seen GenEval's objects); the last {min(cfg.val_images, cfg.images // 4)} are held out of transformer training
for a validation loss with fixed t and noise.

### Model
- AutoencoderKL: channels {list(m.vae_channels)}, 1 layer per block, {m.latent_channels} latent channels
  ({m.resolution} px -> {m.latent_channels}x{m.resolution // 2 ** (len(m.vae_channels) - 1)}x{m.resolution // 2 ** (len(m.vae_channels) - 1)}).
  Trained {cfg.vae_steps} steps, AdamW lr {cfg.vae_lr}, batch {cfg.vae_batch}, MSE + {cfg.vae_kl_weight} x KL (per-element means),
  first {cfg.vae_crop_fraction:.0%} of the steps on random {cfg.vae_crop}x{cfg.vae_crop} crops. Reconstruction PSNR
  {res.vae['psnr_db']:.1f} dB (256 scenes, pixels in [-1, 1]). `shift_factor` {res.vae['shift_factor']:.4f} and
  `scaling_factor` {res.vae['scaling_factor']:.4f} are the mean and 1/std of the posterior-mean latents of all scenes.
- SD3Transformer2DModel: {m.layers} layers, {m.heads} heads x {m.head_dim}, patch {m.patch_size}, joint/pooled dim {2 * m.text_width}.
- Text encoders: two CLIPTextModelWithProjection (width {m.text_width}, {m.text_layers} layers, {m.max_tokens} tokens) over a word-level
  CLIP BPE vocabulary written by `write_clip_tokenizer_files`; trained jointly with the transformer.

### Objective
Rectified flow as in SD3: x_t = (1-t) x0 + t eps, target eps - x0, t = sigmoid(N({cfg.logit_mean}, {cfg.logit_std}^2)), timestep 1000 t.
{cfg.caption_dropout:.0%} of captions replaced by "" (the CFG negative). Prompts are encoded by the pipeline's own
`encode_prompt(..., max_sequence_length=0)` with gradients (CLIP hidden_states[-2] of both encoders concatenated;
pooled = both projections concatenated), so inference sees exactly what training saw.
AdamW lr {cfg.lr} ({cfg.warmup} warm-up steps, then constant), betas {cfg.betas}, weight decay {cfg.weight_decay}, batch {cfg.batch},
grad-norm clip {cfg.grad_clip}, fp32, no EMA.

### Evaluation protocol
ODE sampling (`tempflow_core.rollout.sample_images`), {cfg.eval_steps} Euler steps on the shift-{cfg.eval_shift:g} grid of
`make_schedule` (the pipeline scheduler's shift, and the RL default), CFG {cfg.eval_cfg:g}, noise seeded per prompt id;
scored with the shapes detector's strict GenEval rules (`shapes.evaluate`; overall = mean of the six task accuracies).
During training: the {cfg.eval_split} split, {cfg.eval_per_prompt} images per prompt, every {cfg.eval_every} steps, the same
noise every time (seed {cfg.eval_seed}). Final report: {cfg.final_per_prompt} images per {cfg.eval_split} prompt
(seed {cfg.eval_seed + 1}){f" and {cfg.final_train_per_prompt} per train prompt" if cfg.final_train_per_prompt else ""}.

## Final strict scores

{table}
Partial (Flow-GRPO reward) overall: {res.final['partial_overall']:.3f} on {cfg.eval_split}.

![samples](samples.png)

## Curve

![curve](curve.png)

{chr(10).join(curve_lines)}

Determinism: same seed, settings, torch build, thread count and CPU give bit-identical weights
(seeded numpy/torch generators throughout; evaluation uses its own generators). Other thread counts
or CPUs may change float summation order; a `--minutes` budget makes the stopping step machine-dependent.
"""
    (out / "MODEL_CARD.md").write_text(card)
    (out / "README.md").write_text(
        f"# tiny-shapes-sd3\n\nTiny StableDiffusion3Pipeline pretrained on the shapes world by `tempflow_core/pretrain.py` "
        f"(seed {cfg.seed}, {res.steps} transformer steps, {res.wall_s / 60:.1f} min on CPU). "
        f"Strict GenEval-like overall {res.final['overall']:.2f} on the {cfg.eval_split} split.\n\n"
        f"```\n{_command_line()}\n```\n\nSee MODEL_CARD.md for data, objective, evaluation protocol, scores and the curve.\n\n{table}")


# ---------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> PretrainResult:
    ap = argparse.ArgumentParser(prog="python -m tempflow_core.pretrain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="model folder to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock budget of the whole run")
    ap.add_argument("--images", type=int, default=None, help="rendered scenes (default 50000)")
    ap.add_argument("--steps", type=int, default=None, help="max transformer steps (default 6000)")
    ap.add_argument("--eval-every", type=int, default=None, help="transformer steps between evaluations (default 300)")
    ap.add_argument("--cache-dir", default=None, help="keep/reuse the VAE and latents here")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (determinism needs the same count)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    over: dict[str, Any] = {"seed": a.seed, "max_minutes": a.minutes, "cache_dir": a.cache_dir}
    if a.images is not None:
        over["images"] = a.images
    if a.steps is not None:
        over["steps"] = a.steps
    if a.eval_every is not None:
        over["eval_every"] = a.eval_every
    cfg = PretrainConfig(**over)
    res = pretrain(cfg, a.out, progress=not a.quiet)
    print(json.dumps({"out": str(res.out_dir), "steps": res.steps, "wall_min": round(res.wall_s / 60, 2),
                      "overall": res.final["overall"], "per_category": res.final["per_category"],
                      "size_mb": round(res.size_mb, 2), "in_band": res.in_band, "stop_reason": res.stop_reason}))
    return res


if __name__ == "__main__":
    main()
