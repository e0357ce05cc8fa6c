"""Rollouts: branched (ODE -> one SDE step -> ODE) and plain Flow-GRPO SDE trajectories.

Branched rollouts run as a wavefront: at denoising step i the ODE backbone of every prompt
and every live child of every (prompt, branch step) sit at the same timestep, so they go
through the transformer together (chunked to `max_batch`). The K children leaving one
branch point share x_k, so their SDE step reuses the backbone's velocity at x_k: no forward
pass is spent per child at the branch step. Per prompt that is T + K*T(T-1)/2 NFEs when every
step branches, the floor for this estimator at full completion.

Coarse completion (`stride` s > 1): after its SDE step a child finishes with ODE steps over
every s-th node of the backbone's grid (`completion_nodes`), always ending at t = 0. Its
log-prob and the learner's work are untouched (they live at the branch step); only the reward
of the child's image comes from a coarser solve. s = 1 is the full completion, bit for bit.

`branched_rollout_loop` is the structure of the paper's public code (a separate inner loop
finishes each branch step's children). It is kept as the reference for tests and benchmarks.

Shapes: B prompts, K children per branch point (= group_size), G trajectories per prompt
(plain), T denoising steps, C, H, W one latent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch

from tempflow_core.batches import (  # noqa: F401  (the rollout's data types, used with it)
    BranchPoint, PromptEmbeds, RolloutBatch, Trajectory, branch_step_of_group, group_of_key,
)
from tempflow_core.policies.base import FlowPolicy
from tempflow_core.algorithm.schedule import Schedule
from tempflow_core.algorithm.sde import ode_step, sde_log_prob, sde_step
from tempflow_core.seeding import derive_seed, seeded_normal


def _chunked_velocity(policy: FlowPolicy, x: torch.Tensor, t: float, rows: torch.Tensor, emb: PromptEmbeds,
                      guidance: float, max_batch: int) -> torch.Tensor:
    """Velocity for every row of x (all at time t), prompts picked by `rows`, in chunks."""
    out = []
    for i in range(0, x.shape[0], max_batch):
        r = rows[i:i + max_batch]
        out.append(policy.velocity(x[i:i + max_batch], torch.tensor(t), emb.select(r), guidance))
    return torch.cat(out, 0)


def initial_noise(seed: int, prompt_ids: list[str], shape: tuple[int, int, int], device) -> torch.Tensor:
    """[B, C, H, W] starting noise of each prompt's backbone, seeded by prompt id."""
    return torch.stack([seeded_normal(derive_seed(seed, "init", pid), shape, device) for pid in prompt_ids])


def child_seeds(seed: int, prompt_id: str, step: int, k: int) -> list[int]:
    return [derive_seed(seed, "child", prompt_id, step, j) for j in range(k)]


# ----------------------------------------------------------------------------- shared pieces


@dataclass(frozen=True)
class _Setup:
    """What every rollout reads before its first step (plain Python floats for the grid)."""

    emb: PromptEmbeds  # the B prompts' embeddings (+ the negative prompt for CFG)
    shape: tuple[int, int, int]  # (C, H, W) of one latent
    device: torch.device
    sig: list[float]  # [T+1] t_0 = 1 .. t_T = 0
    sde_sigma: list[float]  # [T] s_i of the SDE step from t_i (sin(a pi / 2) under CPS)
    sde_type: str  # "flow_grpo" or "cps"
    keep: torch.device  # where spawned branch points are kept (the host with rollout.children_on_host)
    store: torch.dtype  # the dtype states are kept in: the model's half precision, else float32
    calls0: int  # policy counters at the start, to report this rollout's share
    nfe0: int

    @property
    def T(self) -> int:
        return len(self.sig) - 1


def _begin(policy: FlowPolicy, prompts: list[str], schedule: Schedule, children_on_host: bool = False) -> _Setup:
    emb = policy.encode_prompts(prompts)
    keep = torch.device("cpu") if children_on_host else torch.device(policy.device)
    model = policy.transformer.dtype
    store = model if model in (torch.bfloat16, torch.float16) else torch.float32
    return _Setup(emb, policy.latent_shape(), policy.device, schedule.sigmas.tolist(), schedule.sde_sigma().tolist(),
                  schedule.sde_type, keep, store, policy.forward_calls, policy.nfe)


def _kept(su: _Setup, x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, s: float,
          noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One SDE step from x [N, C, H, W] as the rollout keeps it: the next state rounded to the
    dtype states are kept in (the model's half precision, which its transformer reads them in
    anyway; float32 models: unrounded) and the log-prob [N] of that rounded state, so that the
    learner, reading the kept states, computes the same transition."""
    out = sde_step(x, v, t, t_next, s, noise, su.sde_type)
    if su.store == torch.float32:
        return out.next_sample, out.log_prob.float()
    nxt = out.next_sample.to(su.store).float()
    return nxt, sde_log_prob(nxt, x, v, t, t_next, s, su.sde_type)[0].float()


def _finish(policy: FlowPolicy, su: _Setup, kind: Literal["branch", "plain"], prompts: list[str], prompt_ids: list[str],
            schedule: Schedule, decode: bool, branch_points: list[BranchPoint] | None = None,
            trajectories: list[Trajectory] | None = None) -> RolloutBatch:
    """The batch with this rollout's forward counts, its images decoded when asked."""
    batch = RolloutBatch(kind, list(prompts), list(prompt_ids), su.emb, schedule.sigmas.clone(),
                         branch_points=branch_points or [], trajectories=trajectories or [],
                         forward_calls=policy.forward_calls - su.calls0, nfe=policy.nfe - su.nfe0)
    if decode:
        decode_rollout_images(policy, batch)
    return batch


def completion_nodes(step: int, T: int, stride: int) -> list[int]:
    """Grid indices a child of branch step `step` visits after its SDE step: step+1, then every
    `stride`-th node, then T (t = 0). stride 1: step+1..T, the backbone's own grid."""
    if stride < 1:
        raise ValueError(f"completion stride must be >= 1, got {stride}")
    return list(range(step + 1, T, stride)) + [T]


def completion_rows(steps: list[int], T: int, group_size: int, stride: int = 1) -> int:
    """Transformer rows (CFG pairs as one) the children of one prompt take to finish: K per
    ODE step of each branch step's completion."""
    return group_size * sum(len(completion_nodes(k, T, stride)) - 1 for k in steps)


def _branch_steps(branch_steps: list[int], T: int) -> list[int]:
    steps = sorted(set(int(k) for k in branch_steps))
    if not steps or steps[-1] >= T or steps[0] < 0:
        raise ValueError(f"branch steps {branch_steps} must lie in [0, {T})")
    return steps


def _spawn(su: _Setup, x_k: torch.Tensor, v_k: torch.Tensor, prompt_index: int, prompt_id: str, step: int,
           group_size: int, seed: int) -> BranchPoint:
    """The K children of one (prompt, step k): one SDE step each from the backbone state
    x_k [C, H, W] with its velocity v_k [C, H, W], each child with its own seeded noise.
    The group's `final_latents` start as the children's states; the caller finishes them."""
    K, t, t_next = group_size, su.sig[step], su.sig[step + 1]
    seeds = child_seeds(seed, prompt_id, step, K)
    noise = torch.stack([seeded_normal(s, su.shape, su.device) for s in seeds])  # [K, C, H, W]
    x_k = x_k.to(su.store).float()  # as kept (the transformer read it in this precision already)
    x_next, log_prob = _kept(su, x_k.expand(K, *su.shape), v_k.expand(K, *su.shape), t, t_next, su.sde_sigma[step],
                             noise)
    return BranchPoint(prompt_index=prompt_index, prompt_id=prompt_id, step=step, t=t, t_next=t_next,
                       x_k=x_k.to(su.keep, su.store, copy=True), x_next=x_next.to(su.keep, su.store, copy=True),
                       log_prob=log_prob, seeds=torch.tensor(seeds, dtype=torch.int64), final_latents=x_next)


def _ode_from(policy: FlowPolicy, su: _Setup, x: torch.Tensor, rows: torch.Tensor, nodes: list[int],
              guidance_scale: float, max_batch: int) -> torch.Tensor:
    """Finish states x [N, C, H, W] (at t_{nodes[0]}) with one ODE step between each pair of
    consecutive grid nodes; rows [N] pick prompts."""
    for a, b in zip(nodes[:-1], nodes[1:]):
        v = _chunked_velocity(policy, x, su.sig[a], rows, su.emb, guidance_scale, max_batch)
        x = ode_step(x, v, su.sig[a], su.sig[b])
    return x


# ----------------------------------------------------------------------------- rollouts


@torch.no_grad()
def branched_rollout(
    policy: FlowPolicy,
    prompts: list[str],
    prompt_ids: list[str],
    schedule: Schedule,
    branch_steps: list[int],
    group_size: int,
    guidance_scale: float,
    seed: int,
    max_batch: int = 64,
    decode: bool = True,
    progress: Callable[[int], None] | None = None,
    stride: int = 1,
    children_on_host: bool = False,
) -> RolloutBatch:
    """Wavefront branched rollouts for B prompts; children finish over every `stride`-th grid
    node (see the module docstring). `children_on_host` keeps each branch point's x_k and
    x_next on the host once spawned (the live children stay on the device)."""
    su = _begin(policy, prompts, schedule, children_on_host)
    sig, B = su.sig, len(prompts)
    steps = _branch_steps(branch_steps, su.T)
    last_branch = steps[-1]
    backbone = initial_noise(seed, prompt_ids, su.shape, su.device)  # [B, C, H, W]
    groups: list[BranchPoint] = []
    live: list[torch.Tensor] = []  # per group: [K, C, H, W] child states
    path: list[list[int]] = []  # per group: the grid nodes still ahead, the current one first

    for i in range(su.T):
        # 1. gather the wavefront: backbones still needed + every child whose current node is i
        parts, rows = [], []
        if i <= last_branch:
            parts.append(backbone)
            rows.append(torch.arange(B, device=su.device))
        here = [gi for gi, nodes in enumerate(path) if nodes[0] == i]
        for gi in here:
            parts.append(live[gi])
            rows.append(torch.full((live[gi].shape[0],), groups[gi].prompt_index, device=su.device))
        if parts:
            v_all = _chunked_velocity(policy, torch.cat(parts, 0), sig[i], torch.cat(rows), su.emb, guidance_scale,
                                      max_batch)
            # 2. those children take an ODE step to their next node
            offset = B if i <= last_branch else 0
            for gi in here:
                n, nxt = live[gi].shape[0], path[gi][1]
                live[gi] = ode_step(live[gi], v_all[offset:offset + n], sig[i], sig[nxt])
                path[gi] = path[gi][1:]
                offset += n
        # 3. the backbone spawns children at branch steps (reusing its velocity), then moves on
        if i <= last_branch:
            v_b = v_all[:B]
            if i in steps:
                for p in range(B):
                    groups.append(_spawn(su, backbone[p], v_b[p], p, prompt_ids[p], i, group_size, seed))
                    live.append(groups[-1].final_latents)
                    path.append(completion_nodes(i, su.T, stride))
            backbone = ode_step(backbone, v_b, sig[i], sig[i + 1])
        if progress is not None:
            progress(1)

    for g, xs in zip(groups, live):
        g.final_latents = xs
    return _finish(policy, su, "branch", prompts, prompt_ids, schedule, decode, branch_points=groups)


@torch.no_grad()
def branched_rollout_loop(
    policy: FlowPolicy,
    prompts: list[str],
    prompt_ids: list[str],
    schedule: Schedule,
    branch_steps: list[int],
    group_size: int,
    guidance_scale: float,
    seed: int,
    max_batch: int = 64,
    decode: bool = True,
    stride: int = 1,
) -> RolloutBatch:
    """Reference structure of the paper's public code: at each branch step the children
    leave the backbone with its velocity, then an inner loop of their own finishes them.
    Same seeds as `branched_rollout`, so both return the same children."""
    su = _begin(policy, prompts, schedule)
    sig, B, K = su.sig, len(prompts), group_size
    steps = _branch_steps(branch_steps, su.T)
    backbone = initial_noise(seed, prompt_ids, su.shape, su.device)  # [B, C, H, W]
    groups: list[BranchPoint] = []
    all_rows = torch.arange(B, device=su.device)
    for i in range(steps[-1] + 1):
        v_b = _chunked_velocity(policy, backbone, sig[i], all_rows, su.emb, guidance_scale, max_batch)
        if i in steps:
            new = [_spawn(su, backbone[p], v_b[p], p, prompt_ids[p], i, K, seed) for p in range(B)]
            xs = torch.cat([g.final_latents for g in new], 0)  # [B*K, C, H, W]
            rows = torch.cat([torch.full((K,), p, device=su.device) for p in range(B)])
            xs = _ode_from(policy, su, xs, rows, completion_nodes(i, su.T, stride), guidance_scale,
                           max_batch)  # this step's own inner loop
            for p, g in enumerate(new):
                g.final_latents = xs[p * K:(p + 1) * K]
            groups.extend(new)
        backbone = ode_step(backbone, v_b, sig[i], sig[i + 1])
    groups.sort(key=lambda g: (g.step, g.prompt_index))
    return _finish(policy, su, "branch", prompts, prompt_ids, schedule, decode, branch_points=groups)


@torch.no_grad()
def plain_rollout(
    policy: FlowPolicy,
    prompts: list[str],
    prompt_ids: list[str],
    schedule: Schedule,
    group_size: int,
    guidance_scale: float,
    seed: int,
    max_batch: int = 64,
    decode: bool = True,
    progress: Callable[[int], None] | None = None,
) -> RolloutBatch:
    """Flow-GRPO rollouts: G full SDE trajectories per prompt, all stepped together."""
    su = _begin(policy, prompts, schedule)
    sig, shape = su.sig, su.shape
    members = [(p, j) for p in range(len(prompts)) for j in range(group_size)]
    seeds = [derive_seed(seed, "traj", prompt_ids[p], j) for p, j in members]
    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(su.device)  # [B*G, C, H, W]
    x = x.to(su.store).float()  # states as kept (see _kept)
    rows = torch.tensor([p for p, _ in members], device=su.device)
    states, logps = [x], []
    for i in range(su.T):
        v = _chunked_velocity(policy, x, sig[i], rows, su.emb, guidance_scale, max_batch)
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(su.device)
        x, log_prob = _kept(su, x, v, sig[i], sig[i + 1], su.sde_sigma[i], noise)
        states.append(x)
        logps.append(log_prob)
        if progress is not None:
            progress(1)
    st = torch.stack(states, 1)  # [B*G, T+1, C, H, W]
    lp = torch.stack(logps, 1)  # [B*G, T]
    trajs = [Trajectory(p, prompt_ids[p], j, seeds[n], st[n].to(su.store, copy=True), lp[n].clone())
             for n, (p, j) in enumerate(members)]
    return _finish(policy, su, "plain", prompts, prompt_ids, schedule, decode, trajectories=trajs)


def decode_rollout_images(policy: FlowPolicy, batch: RolloutBatch) -> None:
    """Decode final latents into uint8 images, in place."""
    if batch.kind == "branch":
        if not batch.branch_points:
            return
        imgs = policy.decode(torch.cat([g.final_latents for g in batch.branch_points], 0))
        o = 0
        for g in batch.branch_points:
            k = g.final_latents.shape[0]
            g.images = imgs[o:o + k]
            o += k
    else:
        imgs = policy.decode(torch.stack([tr.states[-1] for tr in batch.trajectories]))
        for tr, im in zip(batch.trajectories, imgs):
            tr.image = im


@torch.no_grad()
def sample_images(policy: FlowPolicy, prompts: list[str], prompt_ids: list[str], schedule: Schedule,
                  guidance_scale: float, seed: int, max_batch: int = 64) -> np.ndarray:
    """Deterministic ODE samples (evaluation): [B, H', W', 3] uint8."""
    su = _begin(policy, prompts, schedule)
    x = initial_noise(seed, prompt_ids, su.shape, su.device)  # [B, C, H, W]
    rows = torch.arange(len(prompts), device=su.device)
    return policy.decode(_ode_from(policy, su, x, rows, list(range(su.T + 1)), guidance_scale, max_batch))
