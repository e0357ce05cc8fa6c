"""Which denoising steps branch and train, and the noise-aware weight of each.

At T steps the trainable steps are 0..T-2, as in the authors' code (their branched sampler
loops over `timesteps[:-1]`) and Flow-GRPO (`int(0.99 * T)` trained steps). The last step
goes from t_{T-1} to 0 with almost no noise (s * sqrt(|dt|) = 0.006 at T = 6): its children
differ by noise alone, and group-std normalisation would turn that noise into unit
advantages. It stays trainable, but only when a step list names it explicitly.

A step's weight is a function of that step's noise only: the mean-1 normalisation runs once
over the configured trainable set (the pool), never over the steps one iteration drew.
"""

from __future__ import annotations

from typing import Literal

import torch

from tempflow_core.algorithm.schedule import Schedule, WeightNorm
from tempflow_core.seeding import derive_seed

StepSpec = Literal["all"] | list[int] | int  # 'all', an explicit list, or m steps drawn per iteration


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


def select_steps(spec: StepSpec, num_steps: int, seed: int, iteration: int) -> list[int]:
    """The steps of one iteration: the whole pool, or m of it drawn from (seed, iteration)."""
    pool = step_pool(spec, num_steps)
    if spec == "all" or isinstance(spec, list):
        return pool
    g = torch.Generator().manual_seed(derive_seed(seed, "branch-steps", iteration))
    pick = torch.randperm(len(pool), generator=g)[: int(spec)].tolist()
    return sorted(pool[i] for i in pick)


def noise_aware_weights(schedule: Schedule, pool: list[int], norm: WeightNorm = "mean1",
                        constant: float = 2.25) -> dict[int, float]:
    """w_k = Norm(s_k sqrt(|dt_k|)) for every step k of the pool (paper eq. 8).

    "mean1" divides by the mean over the pool, so the weights average 1 over the trainable
    steps; "constant" multiplies by a fixed constant (the authors' 2.25, which is that same
    normalisation over steps 0..8 at T = 10). Select the drawn steps from the result.
    """
    w = schedule.step_weights(pool, norm, constant)  # [len(pool)]
    return {int(k): float(x) for k, x in zip(pool, w)}
