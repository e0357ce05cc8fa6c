"""Phases 4-5: the SD3 transformer and both CLIP text encoders trained jointly with the
rectified-flow loss, evaluated on a fixed protocol, and stopped inside the wanted score band.

The loss is SD3's: x_t = (1 - t) x0 + t eps, target eps - x0, t = sigmoid(N(logit_mean,
logit_std^2)), timestep 1000 t, and ``caption_dropout`` of the captions replaced by the empty
prompt (the CFG negative). Prompts go through the pipeline's own ``encode_prompt(...,
max_sequence_length=0)`` with gradients on, so sampling later sees exactly the embeddings
training saw.

Stopping rule, checked at every evaluation: stop once the overall strict score reaches
``stop_at`` inside the band; past the band's top, stop and restore the last in-band weights
(if any); otherwise stop at the step or time budget.

Shapes: B batch, C, h, w latent channels and size, L prompt tokens, D token width, Dp pooled width.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from tempflow_core.pretrain.config import PretrainConfig
from tempflow_core.pretrain.data import LatentSet
from tempflow_core.pretrain.evaluation import evaluate_pipeline
from tempflow_core.pretrain.progress import Clock

TRAINED = ("transformer", "text_encoder", "text_encoder_2")  # the pipeline's modules that train here


def set_trainable(pipe, on: bool) -> None:
    """Gradients and train mode on (or off) for the trained modules."""
    for name in TRAINED:
        getattr(pipe, name).requires_grad_(on)
        getattr(pipe, name).train(on)


# ---------------------------------------------------------------------------- the loss
def encode_text(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own prompt encoding, [B, L, D] and [B, Dp], with gradients when enabled:
    CLIP hidden_states[-2] of both encoders concatenated; pooled = both projections. Each
    distinct prompt is encoded once."""
    uniq = sorted(set(prompts))
    pos = {p: i for i, p in enumerate(uniq)}
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=uniq, prompt_2=None, prompt_3=None, device=torch.device("cpu"),
        do_classifier_free_guidance=False, max_sequence_length=0,
    )
    rows = torch.tensor([pos[p] for p in prompts])
    return embeds[rows], pooled[rows]


def flow_loss(pipe, x0: torch.Tensor, prompts: list[str], t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Rectified-flow MSE: x_t = (1-t) x0 + t eps, target eps - x0, timestep 1000 t.

    x0 and eps are [B, C, h, w], t is [B] in (0, 1).
    """
    embeds, pooled = encode_text(pipe, prompts)
    tt = t.view(-1, 1, 1, 1)
    xt = (1.0 - tt) * x0 + tt * eps
    pred = pipe.transformer(hidden_states=xt, timestep=t * 1000.0, encoder_hidden_states=embeds,
                            pooled_projections=pooled, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred, eps - x0)


class ValSet:
    """A fixed validation loss: held-out latents, stratified t, fixed noise, full captions."""

    def __init__(self, held_out: LatentSet, seed: int):
        n = len(held_out.latents)
        self.x0 = torch.from_numpy(held_out.latents)  # [N, C, h, w]
        self.captions = held_out.captions
        self.t = (torch.arange(n, dtype=torch.float32) + 0.5) / max(n, 1)  # [N]
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


@dataclass(frozen=True)
class Batch:
    """One training batch."""

    x0: torch.Tensor  # [B, C, h, w] normalised latents
    captions: list[str]  # B, dropped ones ""
    t: torch.Tensor  # [B] flow time in (0, 1)
    eps: torch.Tensor  # [B, C, h, w] noise


def batches(train: LatentSet, cfg: PretrainConfig) -> Iterator[Batch]:
    """Endless shuffled epochs of batches (a short tail is dropped), seeded by cfg.seed: a
    numpy Generator draws the order and the caption dropout, a torch Generator t and eps."""
    rng = np.random.default_rng([cfg.seed, 2])
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 2)
    latents = torch.from_numpy(train.latents)
    n = len(latents)
    order, pos = rng.permutation(n), 0
    while True:
        if pos + cfg.batch > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + min(cfg.batch, n)]
        pos += len(idx)
        drop = rng.random(len(idx)) < cfg.caption_dropout
        captions = ["" if d else train.captions[i] for i, d in zip(idx, drop)]
        x0 = latents[torch.from_numpy(idx)]
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(len(idx), generator=gen))
        yield Batch(x0, captions, t, torch.randn(x0.shape, generator=gen))


# ---------------------------------------------------------------------------- evaluation and stopping
class Evaluator:
    """Evaluations during training: scores on the eval split, the validation loss, the curve,
    and the time they took (kept out of the training time)."""

    def __init__(self, pipe, cfg: PretrainConfig, val: ValSet, clock: Clock):
        self.pipe, self.cfg, self.val, self.clock = pipe, cfg, val, clock
        self.curve: list[dict[str, Any]] = []
        self.seconds = 0.0
        self.t_start = time.perf_counter()

    def __call__(self, step: int, losses: list[float]) -> dict[str, Any]:
        """Evaluate at step; returns the curve point (and leaves the trained modules trainable)."""
        cfg, te = self.cfg, time.perf_counter()
        res, _, _ = evaluate_pipeline(self.pipe, cfg.eval_split, cfg.eval_per_prompt, cfg.eval_steps, cfg.eval_shift,
                                      cfg.eval_cfg, cfg.eval_seed)
        vl = self.val.loss(self.pipe)
        set_trainable(self.pipe, True)
        self.seconds += time.perf_counter() - te
        recent = losses[-50:]
        point = {
            "step": step, "images_seen": step * cfg.batch,
            "wall_s": round(self.clock.elapsed(), 1),
            "train_wall_s": round(time.perf_counter() - self.t_start - self.seconds, 1),
            "eval_s": round(time.perf_counter() - te, 1),
            "train_loss": float(np.mean(recent)) if recent else None, "val_loss": vl,
            "overall": res["overall"], "per_category": res["per_category"],
            "partial_overall": res["partial_overall"], "n_images": res["n"],
        }
        self.curve.append(point)
        self.clock.say(f"eval step {step}: overall {res['overall']:.3f} "
                       + " ".join(f"{k[:6]} {v:.2f}" for k, v in res["per_category"].items())
                       + (f" | val loss {vl:.4f}" if vl is not None else "") + f" ({point['eval_s']:.0f}s)")
        self.clock.log(step, {"phase": "eval", **point})
        return point

    def point_at(self, step: int) -> dict[str, Any]:
        return next(p for p in self.curve if p["step"] == step)


def stop_reason(score: float, step: int, cfg: PretrainConfig, over_time: bool) -> str | None:
    """Why training stops after an evaluation scoring ``score`` at ``step``; None: go on."""
    if cfg.stop_at <= score <= cfg.band[1]:
        return f"overall {score:.3f} >= stop_at {cfg.stop_at} at step {step}"
    if score > cfg.band[1]:
        return f"overall {score:.3f} above the band at step {step}"
    if over_time:
        return f"time budget ({cfg.max_minutes} min) at step {step}"
    return None


@dataclass(frozen=True)
class Snapshot:
    """Copies of the trained modules' weights at a step (the last in-band evaluation)."""

    step: int
    state: dict[str, dict[str, torch.Tensor]]

    @classmethod
    def take(cls, pipe, step: int) -> Snapshot:
        return cls(step, {n: copy.deepcopy(getattr(pipe, n).state_dict()) for n in TRAINED})

    def restore(self, pipe) -> None:
        for n, sd in self.state.items():
            getattr(pipe, n).load_state_dict(sd)


# ---------------------------------------------------------------------------- the phase
@dataclass
class Training:
    """What the transformer phase leaves behind."""

    steps: int  # the step whose weights the pipeline holds
    stop_reason: str
    curve: list[dict[str, Any]]  # one point per evaluation
    losses: list[float]  # train loss per step
    last_eval: dict[str, Any]  # the curve point of `steps`


def _update(pipe, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
            sched: torch.optim.lr_scheduler.LRScheduler, batch: Batch, grad_clip: float) -> tuple[float, float]:
    """One optimiser step; returns the loss and the gradient norm before clipping."""
    loss = flow_loss(pipe, batch.x0, batch.captions, batch.t, batch.eps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()
    return float(loss.detach()), float(gnorm)


def train_transformer(pipe, cfg: PretrainConfig, train: LatentSet, val: ValSet, clock: Clock,
                      progress: bool = False) -> Training:
    """Train until the stopping rule (module docstring) or the step budget; see Training."""
    from tqdm.auto import tqdm

    params = [p for n in TRAINED for p in getattr(pipe, n).parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) if cfg.warmup else 1.0)
    evaluate = Evaluator(pipe, cfg, val, clock)
    losses: list[float] = []
    last, snapshot, reason = None, None, "step budget"
    set_trainable(pipe, True)
    if cfg.eval_at_start:
        last = evaluate(0, losses)
    bar = tqdm(total=cfg.steps, desc="transformer", disable=not progress, mininterval=10)
    step = 0
    for batch in itertools.islice(batches(train, cfg), cfg.steps):
        loss, gnorm = _update(pipe, params, opt, sched, batch, cfg.grad_clip)
        step += 1
        losses.append(loss)
        bar.update(1)
        if step % 25 == 0:
            clock.log(step, {"phase": "transformer", "loss": float(np.mean(losses[-25:])), "grad_norm": gnorm,
                             "lr": sched.get_last_lr()[0]})
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
        over_time = clock.over_time()
        if step % cfg.eval_every and step != cfg.steps and not over_time:
            continue
        last = evaluate(step, losses)
        if cfg.band[0] <= last["overall"] <= cfg.band[1]:
            snapshot = Snapshot.take(pipe, step)
        stop = stop_reason(last["overall"], step, cfg, over_time)
        if stop is not None:
            if last["overall"] > cfg.band[1] and snapshot is not None:
                snapshot.restore(pipe)
                stop += f"; restored the in-band weights of step {snapshot.step}"
                step, last = snapshot.step, evaluate.point_at(snapshot.step)
            reason = stop
            break
    bar.close()
    if last is None:  # no evaluation yet (a zero-step budget)
        last = evaluate(step, losses)
    clock.phase_s["transformer"] = time.perf_counter() - evaluate.t_start - evaluate.seconds
    clock.phase_s["eval"] = evaluate.seconds
    set_trainable(pipe, False)
    return Training(step, reason, evaluate.curve, losses, last)
