"""Which denoising steps branch and train, and the noise-aware weight of each.

At T steps the trainable steps are 0..T-2, as in the authors' code (their branched sampler
loops over `timesteps[:-1]`) and Flow-GRPO (`int(0.99 * T)` trained steps). The last step
goes from t_{T-1} to 0 with almost no noise (s * sqrt(|dt|) = 0.006 at T = 6): its children
differ by noise alone, and group-std normalisation would turn that noise into unit
advantages. It stays trainable, but only when a step list names it explicitly.

A step's weight is a function of that step's noise only: the mean-1 normalisation runs once
over the configured trainable set (the pool), never over the steps one iteration drew.

Drawing m of the N pool steps per iteration (`branch_steps: m`) is a Monte Carlo estimate of
training all of them; how the m are drawn (`BranchDraw`):

* "uniform": m distinct steps, each equally likely (without replacement): every step is in a
  draw with probability m/N, so the mean over the drawn steps is unbiased as it is.
* "weighted": m draws with replacement, step k with probability p_k proportional to its noise
  term s_k sqrt(|dt_k|), so the steps that carry the most noise branch most often. Each drawn
  step's terms are scaled by `importance`, I_k = d n_k / (N m p_k) (n_k: times drawn, d:
  distinct steps drawn), which makes the expected loss, a mean over the d drawn steps, equal
  the mean over all N (tests/algorithm/test_branch_draws.py checks it by Monte Carlo).
* "window": m consecutive steps starting at (iteration mod (N - m + 1)): a window sliding
  from the first steps (high noise) to the last, one step per iteration, then again (MixGRPO's
  sliding SDE window; not a Monte Carlo estimate of all steps, no correction).
"""

from __future__ import annotations

from typing import Literal

import torch

from tempflow_core.algorithm.schedule import Schedule, WeightNorm
from tempflow_core.seeding import derive_seed

StepSpec = Literal["all"] | list[int] | int  # 'all', an explicit list, or m steps drawn per iteration
BranchDraw = Literal["uniform", "weighted", "window"]


def default_steps(num_steps: int) -> list[int]:
    """Steps 0..T-2: every step but the last (the reference's trainable set)."""
    return list(range(max(num_steps - 1, 0)))


def step_pool(spec: StepSpec, num_steps: int) -> list[int]:
    """The configured trainable set: 'all' and a count m mean 0..T-2; a list is taken as
    given (name T-1 in it to train the last step)."""
    if isinstance(spec, list):
        return sorted(int(k) for k in spec)
    if spec == "all" or isinstance(spec, int):
        return default_steps(num_steps)
    raise ValueError(f"unknown step spec {spec!r}; expected 'all', a list of steps or a count")


def draw_counts(spec: StepSpec, num_steps: int, seed: int, iteration: int, draw: BranchDraw = "uniform",
                noise: dict[int, float] | None = None) -> dict[int, int]:
    """The steps of one iteration with how often each was drawn: the whole pool once each, or m
    draws from it by `draw`, seeded by (seed, iteration). `noise` (the pool's noise terms or
    any positive multiple of them) is needed by "weighted" only."""
    pool = step_pool(spec, num_steps)
    if spec == "all" or isinstance(spec, list):
        return {k: 1 for k in pool}
    m = int(spec)
    if draw == "window":
        start = iteration % (len(pool) - m + 1)
        return {k: 1 for k in pool[start:start + m]}
    g = torch.Generator().manual_seed(derive_seed(seed, "branch-steps", iteration))
    if draw == "uniform":
        return {pool[i]: 1 for i in sorted(torch.randperm(len(pool), generator=g)[:m].tolist())}
    if draw != "weighted":
        raise ValueError(f"unknown branch draw {draw!r}; expected uniform, weighted or window")
    if noise is None:
        raise ValueError("a weighted draw needs the pool's noise terms")
    p = torch.tensor([noise[k] for k in pool], dtype=torch.float64)
    idx = torch.multinomial(p, m, replacement=True, generator=g).tolist()
    return {pool[i]: idx.count(i) for i in sorted(set(idx))}


def select_steps(spec: StepSpec, num_steps: int, seed: int, iteration: int, draw: BranchDraw = "uniform",
                 noise: dict[int, float] | None = None) -> list[int]:
    """The distinct steps of one iteration (see draw_counts)."""
    return sorted(draw_counts(spec, num_steps, seed, iteration, draw, noise))


def importance(counts: dict[int, int], noise: dict[int, float], draw: BranchDraw) -> dict[int, float]:
    """I_k of every drawn step: d n_k / (N m p_k) for a weighted draw over the N steps of
    `noise` (p_k = noise_k / sum(noise)), 1 otherwise. See the module docstring."""
    if draw != "weighted":
        return {k: 1.0 for k in counts}
    total, n, m, d = sum(noise.values()), len(noise), sum(counts.values()), len(counts)
    return {k: d * c / (n * m * noise[k] / total) for k, c in counts.items()}


def noise_aware_weights(schedule: Schedule, pool: list[int], norm: WeightNorm = "mean1",
                        constant: float = 2.25) -> dict[int, float]:
    """w_k = Norm(s_k sqrt(|dt_k|)) for every step k of the pool (paper eq. 8).

    "mean1" divides by the mean over the pool, so the weights average 1 over the trainable
    steps; "constant" multiplies by a fixed constant (the authors' 2.25, which is that same
    normalisation over steps 0..8 at T = 10). Select the drawn steps from the result.
    """
    w = schedule.step_weights(pool, norm, constant)  # [len(pool)]
    return {int(k): float(x) for k, x in zip(pool, w)}
