"""MODEL_CARD.md and README.md of a pretrained base model: how it was made (command line,
machine, timings), data, model, objective, evaluation protocol, final scores and the curve.

Written by the pretrain flow next to the weights and the run's record (curve.json, curve.png,
samples.png, which ``tempflow_core.pretrain.pretrain`` writes).
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from tempflow_core.pretrain import PretrainConfig, PretrainResult
from tempflow_core.pretrain.record import dir_size_mb


def write_model_card(res: PretrainResult, cfg: PretrainConfig) -> None:
    """Write MODEL_CARD.md and README.md into res.out_dir."""
    from tempflow_core.shapes import format_table

    rows = {f"{cfg.eval_split} ({res.final['n']} images)": res.final}
    if res.final_train is not None:
        rows[f"train ({res.final_train['n']} images)"] = res.final_train
    table = format_table(rows)
    card = "\n".join([_summary(cfg, res.out_dir.name), _how_it_was_made(res, cfg), _method(res, cfg), _scores(res, cfg, table), _curve(res)])
    (res.out_dir / "MODEL_CARD.md").write_text(card)
    (res.out_dir / "README.md").write_text(
        f"# {res.out_dir.name}\n\nTiny StableDiffusion3Pipeline pretrained on the shapes world by `tempflow pretrain` "
        f"(`tempflow_core/pretrain/`; seed {cfg.seed}, {res.steps} transformer steps, {res.wall_s / 60:.1f} min on CPU). "
        f"Strict GenEval-like overall {res.final['overall']:.2f} on the {cfg.eval_split} split.\n\n"
        f"```\n{command_line()}\n```\n\nSee MODEL_CARD.md for data, objective, evaluation protocol, scores and the curve.\n\n{table}")


def command_line() -> str:
    """The command line of this process, shell-quoted."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv
    return " ".join(shlex.quote(a) for a in argv)


def _param_counts(folder: Path) -> dict[str, int]:
    """Parameters per module of the saved pipeline ({} when it does not load)."""
    try:
        from tempflow_core.policies.models import load_pipeline

        pipe = load_pipeline(folder)
        return {k: sum(p.numel() for p in getattr(pipe, k).parameters())
                for k in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    except Exception:  # noqa: BLE001 - the card is still written without parameter counts
        return {}


def _summary(cfg: PretrainConfig, name: str) -> str:
    m = cfg.model
    return f"""# {name}: a tiny StableDiffusion3Pipeline pretrained on the shapes world

A real diffusers `StableDiffusion3Pipeline` (SD3 transformer, AutoencoderKL, two tiny CLIP text
encoders with projection, no T5) trained from scratch on rendered {m.resolution}x{m.resolution}
shape scenes (4 colours x circle/square/triangle, captions in GenEval's six tasks). It is the
base model of TempFlow-GRPO runs: its GenEval-like strict score is kept inside the band
{cfg.band[0]:.2f}-{cfg.band[1]:.2f} on purpose, so RL has headroom (position and counting are weakest).

Load it offline with `tempflow_core.policies.models.load_pipeline("models/{name}")`; sample with
`max_sequence_length=0`, {m.resolution} px, CFG ~4 (`pipe("a red circle", height={m.resolution}, width={m.resolution},
max_sequence_length=0, guidance_scale=4.0, num_inference_steps=20)`).
"""


def _how_it_was_made(res: PretrainResult, cfg: PretrainConfig) -> str:
    ph = res.phase_s
    params_txt = ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in _param_counts(res.out_dir).items())
    return f"""## How it was made

```
{command_line()}
```

- code: `tempflow_core/pretrain/` (`pretrain(PretrainConfig(...), out_dir)`), run by `flows/pretrain.py`, seed {cfg.seed}
- machine: {platform.machine()} {platform.processor() or ''} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores visible (shared with other work), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; fp32
- wall time: **{res.wall_s / 60:.1f} min** in all (render {ph.get('render', 0):.0f} s, VAE {ph.get('vae', 0):.0f} s,
  encode {ph.get('encode', 0):.0f} s, transformer {ph.get('transformer', 0):.0f} s, evaluations {ph.get('eval', 0):.0f} s,
  final report {ph.get('final_eval', 0):.0f} s)
- transformer steps: **{res.steps}** at batch {cfg.batch} ({res.images_seen:,} images seen); stopped: {res.stop_reason}
- parameters: {params_txt}; folder size {dir_size_mb(res.out_dir):.1f} MB (safetensors, fp32)
"""


def _method(res: PretrainResult, cfg: PretrainConfig) -> str:
    m = cfg.model
    side = m.resolution // 2 ** (len(m.vae_channels) - 1)
    return f"""### Data
{cfg.images:,} scenes from `tempflow_core.shapes.generate_dataset(n, seed={cfg.seed}, resolution={m.resolution}, split="all")`
(tag uniform over the six GenEval tasks, then a prompt of the whole vocabulary, so test prompts are seen
too, as SD3.5 has seen GenEval's objects); the last {min(cfg.val_images, cfg.images // 4)} are held out of transformer training
for a validation loss with fixed t and noise.

### Model
- AutoencoderKL: channels {list(m.vae_channels)}, 1 layer per block, {m.latent_channels} latent channels
  ({m.resolution} px -> {m.latent_channels}x{side}x{side}).
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
ODE sampling (`tempflow_core.algorithm.rollout.sample_images`), {cfg.eval_steps} Euler steps on the shift-{cfg.eval_shift:g} grid of
`make_schedule` (the pipeline scheduler's shift, and the RL default), CFG {cfg.eval_cfg:g}, noise seeded per prompt id;
scored with the shapes detector's strict GenEval rules under its rules v1 (`shapes.evaluate` with `RULES_V1`, as pretraining selects; overall = mean of the six task accuracies).
During training: the {cfg.eval_split} split, {cfg.eval_per_prompt} images per prompt, every {cfg.eval_every} steps, the same
noise every time (seed {cfg.eval_seed}). Final report: {cfg.final_per_prompt} images per {cfg.eval_split} prompt
(seed {cfg.eval_seed + 1}){f" and {cfg.final_train_per_prompt} per train prompt" if cfg.final_train_per_prompt else ""}.
"""


def _scores(res: PretrainResult, cfg: PretrainConfig, table: str) -> str:
    return f"""## Final strict scores

{table}
Partial (Flow-GRPO reward) overall: {res.final['partial_overall']:.3f} on {cfg.eval_split}.

![samples](samples.png)
"""


def _curve(res: PretrainResult) -> str:
    tags = list(res.final["per_category"])

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = ["| step | images seen | wall (min) | train loss | val loss | overall | " + " | ".join(tags) + " |",
             "|" + "---:|" * (6 + len(tags))]
    for p in res.curve:
        lines.append(f"| {p['step']} | {p['images_seen']} | {p['wall_s'] / 60:.1f} | {fmt(p['train_loss'])} | "
                     f"{fmt(p['val_loss'])} | {p['overall']:.3f} | "
                     + " | ".join(f"{p['per_category'].get(t, float('nan')):.2f}" for t in tags) + " |")
    return f"""## Curve

![curve](curve.png)

{chr(10).join(lines)}

Determinism: same seed, settings, torch build, thread count and CPU give bit-identical weights
(seeded numpy/torch generators throughout; evaluation uses its own generators). Other thread counts
or CPUs may change float summation order; a `--minutes` budget makes the stopping step machine-dependent.
"""
