"""The learner: one GRPO update over a rollout batch.

A training unit is one state x at one step with the K' next states that left it: a branch
point (K' = K children sharing x_k) or one step of one plain trajectory (K' = 1). All K'
log-probs under the current policy come from ONE velocity prediction at x, so a branch point
costs one forward and backward (two with CFG, in one call), not one per child. The loss is
the mean over (unit, child) terms, so the shared evaluation gives the same loss and
gradients as evaluating every child on its own (tests/algorithm/test_learner.py checks this).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from tempflow_core.config import LossConfig, TrainConfig
from tempflow_core.algorithm.data_parallel import DataParallel
from tempflow_core.algorithm.objective import grpo_terms
from tempflow_core.algorithm.sharding import full, pad_call
from tempflow_core.batches import PromptEmbeds
from tempflow_core.policies.base import FlowPolicy
from tempflow_core.batches import RolloutBatch
from tempflow_core.algorithm.schedule import Schedule
from tempflow_core.algorithm.sde import gaussian_kl, gaussian_log_prob, sde_mean_std
from tempflow_core.algorithm.steps import StepSpec, step_pool


@dataclass
class TrainUnits:
    x: torch.Tensor  # [N, C, H, W] state the action leaves from
    x_next: torch.Tensor  # [N, K', C, H, W] next states taken
    old_log_prob: torch.Tensor  # [N, K']
    advantages: torch.Tensor  # [N, K']
    step: torch.Tensor  # [N] long, schedule index
    prompt_index: torch.Tensor  # [N] long, row in PromptEmbeds
    weight: torch.Tensor  # [N] float32 policy weight: noise-aware step weight x the draw's importance
    kl_weight: torch.Tensor  # [N] float32 the draw's importance I_k (1 unless branch_draw is weighted)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def children(self) -> int:
        return int(self.x_next.shape[1])

    def subset(self, idx: torch.Tensor) -> "TrainUnits":
        return TrainUnits(*(getattr(self, f)[idx] for f in
                            _FIELDS))

    def to(self, device: torch.device) -> "TrainUnits":
        return TrainUnits(*(getattr(self, f).to(device) for f in
                            _FIELDS))


_FIELDS = ("x", "x_next", "old_log_prob", "advantages", "step", "prompt_index", "weight", "kl_weight")


def trained_steps(batch: RolloutBatch, train_steps: StepSpec) -> list[int]:
    """The schedule steps this batch trains: its branch steps, or the configured plain steps
    ('all' = 0..T-2, see steps.py)."""
    if batch.kind == "branch":
        return sorted({bp.step for bp in batch.branch_points})
    return step_pool(train_steps, batch.sigmas.numel() - 1)


def build_units(
    batch: RolloutBatch,
    advantages: np.ndarray,  # [S] in batch.sample_keys() order
    step_weight: dict[int, float],
    train_steps: list[int] | None = None,
    importance: dict[int, float] | None = None,
) -> TrainUnits:
    """Turn a rollout batch and its advantages into training units; `importance` (per step,
    default 1) scales both the policy and the KL terms of a step (steps.importance)."""
    adv = torch.as_tensor(np.asarray(advantages, dtype=np.float32))
    imp = importance or {}
    if batch.kind == "branch":
        bps = batch.branch_points
        K = bps[0].x_next.shape[0]
        return TrainUnits(
            x=torch.stack([bp.x_k for bp in bps]).float(),
            x_next=torch.stack([bp.x_next for bp in bps]).float(),
            old_log_prob=torch.stack([bp.log_prob for bp in bps]).float(),
            advantages=adv.view(len(bps), K),
            step=torch.tensor([bp.step for bp in bps]),
            prompt_index=torch.tensor([bp.prompt_index for bp in bps]),
            weight=torch.tensor([step_weight[bp.step] * imp.get(bp.step, 1.0) for bp in bps], dtype=torch.float32),
            kl_weight=torch.tensor([imp.get(bp.step, 1.0) for bp in bps], dtype=torch.float32),
        )
    steps = train_steps if train_steps is not None else step_pool("all", batch.sigmas.numel() - 1)
    trajs = batch.trajectories
    s = torch.tensor(steps)
    states = torch.stack([tr.states for tr in trajs]).float()  # [S, T+1, C, H, W]
    logps = torch.stack([tr.log_probs for tr in trajs]).float()  # [S, T]
    n_s = len(steps)
    return TrainUnits(
        x=states[:, s].flatten(0, 1),
        x_next=states[:, s + 1].flatten(0, 1).unsqueeze(1),
        old_log_prob=logps[:, s].reshape(-1, 1),
        advantages=adv.repeat_interleave(n_s).view(-1, 1),
        step=s.repeat(len(trajs)),
        prompt_index=torch.tensor([tr.prompt_index for tr in trajs]).repeat_interleave(n_s),
        weight=torch.tensor([step_weight[int(k)] * imp.get(int(k), 1.0) for k in steps],
                            dtype=torch.float32).repeat(len(trajs)),
        kl_weight=torch.tensor([imp.get(int(k), 1.0) for k in steps], dtype=torch.float32).repeat(len(trajs)),
    )


def _policy_step(policy: FlowPolicy, u: TrainUnits, emb: PromptEmbeds, schedule: Schedule, guidance_scale: float,
                 shared: bool):
    """The policy's SDE transition at each unit's state: (x, t, t_next, s, prompt rows, mean, std),
    one row per unit (shared) or per child; `u` is on the policy's device."""
    dev = policy.device
    K = u.children  # N = len(u) units
    sig = schedule.sigmas.to(dev, torch.float32)
    sde_sigma = schedule.sde_sigma().to(dev, torch.float32)
    t, t_next, s = sig[u.step], sig[u.step + 1], sde_sigma[u.step]
    rows = u.prompt_index
    if shared:
        x, tt, tn, ss, r = u.x, t, t_next, s, rows
    else:  # one row per child
        rep = lambda z: z.repeat_interleave(K, 0)  # noqa: E731
        x, tt, tn, ss, r = rep(u.x), rep(t), rep(t_next), rep(s), rep(rows)
    v = policy.velocity(x, tt, emb.select(r), guidance_scale)
    mean, std = sde_mean_std(x, v, tt, tn, ss, schedule.sde_type)  # [N or N*K, C, H, W], [., 1, 1, 1]
    return x, tt, tn, ss, r, mean, std


def _children_log_prob(u: TrainUnits, mean: torch.Tensor, std: torch.Tensor, shared: bool) -> torch.Tensor:
    """[N*K'] log-probs of the children taken, under the transition (mean, std)."""
    if shared:
        # x_next [N, K, C, H, W] against mean [N, 1, C, H, W], std [N, 1, 1, 1, 1]: the one mean
        # broadcasts over the K children
        return gaussian_log_prob(u.x_next, mean[:, None], std[:, None], batch_dims=2).reshape(-1)
    return gaussian_log_prob(u.x_next.flatten(0, 1), mean, std)


def evaluate_units(
    policy: FlowPolicy,
    units: TrainUnits,
    emb: PromptEmbeds,
    schedule: Schedule,
    guidance_scale: float,
    loss_cfg: LossConfig,
    shared: bool = True,
):
    """Objective terms [N*K'] for a micro-batch of units (with grad through the LoRA).

    shared=True predicts one velocity per unit; shared=False repeats x per child (the
    per-child evaluation of the paper's public learner), for tests and benchmarks.
    """
    u = units.to(policy.device)
    K = u.children
    x, tt, tn, ss, r, mean, std = _policy_step(policy, u, emb, schedule, guidance_scale, shared)
    if loss_cfg.beta > 0:
        with torch.no_grad(), policy.reference():
            v_ref = policy.velocity(x, tt, emb.select(r), guidance_scale)
        mean_ref, _ = sde_mean_std(x, v_ref, tt, tn, ss, schedule.sde_type)
        kl = gaussian_kl(mean, mean_ref, std)  # [N or N*K]
        if loss_cfg.kl_form == "flow_grpo" and schedule.sde_type == "flow_grpo":
            # Flow-GRPO's code divides by 2 s_t^2, not 2 s_t^2 |dt| (under CPS it divides by the step's own std)
            kl = kl * (tt - tn).abs()
    else:
        kl = torch.zeros(mean.shape[0], device=policy.device)
    log_prob = _children_log_prob(u, mean, std, shared)  # [N*K]
    if shared:
        kl = kl.repeat_interleave(K)
    return grpo_terms(
        log_prob=log_prob, old_log_prob=u.old_log_prob.reshape(-1), advantages=u.advantages.reshape(-1),
        weights=u.weight.repeat_interleave(K), kl=kl, clip_range=loss_cfg.clip_range, beta=loss_cfg.beta,
        kl_weights=u.kl_weight.repeat_interleave(K),
    )


@torch.no_grad()
def learner_log_probs(policy: FlowPolicy, units: TrainUnits, emb: PromptEmbeds, schedule: Schedule,
                      guidance_scale: float, micro_batches: list[torch.Tensor], shared: bool = True,
                      pads: int = 0) -> TrainUnits:
    """`units` with old log-probs recomputed by the learner at its current (unchanged) weights,
    micro-batch by micro-batch in the shapes its first pass will use: the ratio of that pass is
    then 1 whatever the rollout's batch shapes and kernels were (train.recompute_old_log_probs).
    `pads` calls follow that keep a sharded transformer's ranks in step (sharding.py)."""
    old = units.old_log_prob.clone()  # [N, K']
    for micro in micro_batches:
        u = units.subset(micro).to(policy.device)
        *_, mean, std = _policy_step(policy, u, emb, schedule, guidance_scale, shared)
        old[micro] = _children_log_prob(u, mean, std, shared).view(len(micro), -1).float().cpu()
    for _ in range(pads):
        pad_call(policy, emb, guidance_scale, reference=False, backward=False)
    return TrainUnits(units.x, units.x_next, old, units.advantages, units.step, units.prompt_index, units.weight,
                      units.kl_weight)


_STAT_NAMES = ("loss", "policy_loss", "kl", "approx_kl", "clip_frac", "ratio_mean")


def empty_units(children: int) -> TrainUnits:
    """No units (a learner rank whose share of a stage is empty): it still joins every all-reduce."""
    z = torch.zeros(0, 1, 1, 1)
    return TrainUnits(z, torch.zeros(0, children, 1, 1, 1), torch.zeros(0, children), torch.zeros(0, children),
                      torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0))


def make_optimizer(policy: FlowPolicy, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(policy.lora_parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                             weight_decay=cfg.weight_decay, eps=cfg.eps)


def update(
    policy: FlowPolicy,
    optimizer: torch.optim.Optimizer,
    units: TrainUnits,
    emb: PromptEmbeds,
    schedule: Schedule,
    guidance_scale: float,
    train_cfg: TrainConfig,
    loss_cfg: LossConfig,
    generator: torch.Generator,
    shared: bool = True,
    progress: Callable[[int], None] | None = None,
    dp: DataParallel | None = None,
    after_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Inner epochs x minibatches of clipped GRPO steps; returns mean statistics. `after_step`
    runs after every optimizer step (the EMA).

    With `dp`, `units` are this rank's share of the stage's N = dp.total units: every rank
    draws the same permutation of all N, runs the units of each minibatch it holds, and the
    gradients are summed over ranks before the step (data_parallel.py)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sums: dict[str, float] = {}
    count = 0
    grad_norms = []
    ratio_min, ratio_max = float("inf"), float("-inf")
    first_min, first_max = float("inf"), float("-inf")  # the first minibatch: weights not yet changed
    N, K = (dp.total if dp is not None else len(units)), units.children
    perms = [torch.randperm(N, generator=generator) for _ in range(train_cfg.inner_epochs)]  # [N] each

    def micro_batches(mb: torch.Tensor) -> list[torch.Tensor]:
        """This rank's micro-batches of minibatch `mb` (none where it holds none of its units)."""
        return [m for m in torch.split(dp.local(mb) if dp is not None else mb, train_cfg.micro_batch) if m.numel()]

    minibatches = [torch.tensor_split(perm, min(train_cfg.minibatches, N)) for perm in perms]
    padded = 0  # pad calls this rank made (sharding.py): computed, no unit in them
    if train_cfg.recompute_old_log_probs:
        first = [m for mb in minibatches[0] for m in micro_batches(mb)]
        pads = dp.pads(len(first)) if dp is not None else 0
        units = learner_log_probs(policy, units, emb, schedule, guidance_scale, first, shared, pads)
        padded += pads
    for epoch in range(train_cfg.inner_epochs):
        for j, mb in enumerate(minibatches[epoch]):
            optimizer.zero_grad(set_to_none=True)
            n_terms = len(mb) * K
            micros = micro_batches(mb)
            pads = dp.pads(len(micros)) if dp is not None else 0
            for _ in range(pads):
                pad_call(policy, emb, guidance_scale, reference=loss_cfg.beta > 0, backward=True)
            padded += pads
            for micro in micros:
                terms = evaluate_units(policy, units.subset(micro), emb, schedule, guidance_scale, loss_cfg, shared)
                (terms.loss.sum() / n_terms).backward()
                for name, val in zip(_STAT_NAMES, (terms.loss, terms.policy, terms.kl, terms.approx_kl,
                                                   terms.clipped.float(), terms.ratio)):
                    sums[name] = sums.get(name, 0.0) + float(val.detach().sum())
                count += terms.loss.numel()
                if terms.ratio.numel():
                    ratio_min = min(ratio_min, float(terms.ratio.min()))
                    ratio_max = max(ratio_max, float(terms.ratio.max()))
                    if epoch == 0 and j == 0:
                        first_min = min(first_min, float(terms.ratio.min()))
                        first_max = max(first_max, float(terms.ratio.max()))
                if progress is not None:
                    progress(len(micro))
            if dp is not None and not dp.sharded:  # FSDP has reduce-scattered the sharded gradients
                dp.all_reduce_grads(params)
            grad_norms.append(float(full(torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip))))
            optimizer.step()
            if after_step is not None:
                after_step()
    if dp is not None:  # every rank reports the whole update's statistics
        total = dp.reduce([sums.get(n, 0.0) for n in _STAT_NAMES] + [float(count), float(padded)])
        sums, count, padded = dict(zip(_STAT_NAMES, total[:-2])), int(total[-2]), int(total[-1])
        ratio_min, first_min = dp.reduce([ratio_min, first_min], "min")
        ratio_max, first_max = dp.reduce([ratio_max, first_max], "max")
    stats = {k: v / max(1, count) for k, v in sums.items()}
    stats.update(ratio_min=ratio_min, ratio_max=ratio_max, ratio_first_min=first_min, ratio_first_max=first_max,
                 grad_norm=float(np.mean(grad_norms)),
                 units=float(N), optimizer_steps=float(len(grad_norms)), pad_calls=float(padded))
    return stats
