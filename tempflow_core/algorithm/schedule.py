"""Flow-matching schedule, SDE noise levels and noise-aware step weights.

Timesteps and sigmas come from diffusers' FlowMatchEulerDiscreteScheduler, so a run uses
exactly the grid the pipeline samples on. Everything else is a pure function of that grid:
nothing here keeps a hidden step counter (branched rollouts call steps out of order).

Step i goes from t_i = sigmas[i] to t_{i+1} = sigmas[i+1] (t = 1 is noise, t = 0 data),
with dt_i = t_{i+1} - t_i < 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import math

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

WeightNorm = Literal["mean1", "constant"]
SDEType = Literal["flow_grpo", "cps"]  # the stochastic step: Flow-GRPO's SDE (paper eq. 5) or CPS


@dataclass(frozen=True)
class Schedule:
    """The sampling grid of one run.

    Attributes:
        sigmas: [T+1] float64, t_0 = 1 (shifted) down to t_T = 0.
        timesteps: [T] float32, sigmas[:-1] * num_train_timesteps: what the transformer sees.
        noise_level: the `a` of s_t = a * sqrt(t / (1 - t)) (0.7 for SD3.5-M, 0.9 for FLUX);
            under CPS the step's std is t_{i+1} * sin(a * pi / 2).
        sde_type: which stochastic step rollouts take and log-probs score (sde.py).
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    noise_level: float
    sde_type: SDEType = "flow_grpo"

    @property
    def num_steps(self) -> int:
        return int(self.sigmas.numel() - 1)

    @classmethod
    def from_sigmas(cls, sigmas: Sequence[float] | torch.Tensor, noise_level: float,
                    num_train_timesteps: int = 1000) -> Schedule:
        """The grid a rollout was sampled on, from its stored sigmas [T+1] (any family's)."""
        sig = torch.as_tensor(sigmas, dtype=torch.float64)
        return cls(sig, (sig[:-1] * num_train_timesteps).float(), float(noise_level))

    def dt(self) -> torch.Tensor:
        """[T] signed step sizes t_{i+1} - t_i (negative)."""
        return self.sigmas[1:] - self.sigmas[:-1]

    def sde_sigma(self) -> torch.Tensor:
        """[T] the noise parameter of every step's transition (sde.sde_mean_std): s_t = a * sqrt(t / (1 - t))
        at the start of the step for Flow-GRPO's SDE, sin(a * pi / 2) for CPS.

        At t = 1 the ratio is infinite; as in Flow-GRPO, sigma_max = sigmas[1] stands in for
        t in the denominator, so the first step's noise stays finite.
        """
        if self.sde_type == "cps":
            return torch.full((self.num_steps,), math.sin(self.noise_level * math.pi / 2), dtype=torch.float64)
        t = self.sigmas[:-1]
        denom_t = torch.where(t >= 1.0, self.sigmas[1].expand_as(t), t)
        return self.noise_level * torch.sqrt(t / (1.0 - denom_t))

    def step_std(self) -> torch.Tensor:
        """[T] the std of every step's stochastic transition: s_t * sqrt(|dt|) (Flow-GRPO's SDE),
        t_{i+1} * sin(a * pi / 2) (CPS)."""
        if self.sde_type == "cps":
            return self.sigmas[1:] * self.sde_sigma()
        return self.sde_sigma() * torch.sqrt(self.dt().abs())

    def step_weights(
        self,
        steps: torch.Tensor | list[int] | None = None,
        norm: WeightNorm = "mean1",
        constant: float = 2.25,
    ) -> torch.Tensor:
        """Noise-aware weights w_k = Norm(s_k sqrt(|dt_k|)) for the trained steps (paper eq. 8).

        Args:
            steps: the trainable set (default 0..T-2, every step but the last). With "mean1"
                the weights are normalised so that their mean over exactly these steps is 1,
                which keeps the loss scale comparable to unweighted Flow-GRPO (paper
                section 5): pass the configured set, not the steps one iteration drew.
            norm: "mean1" (the paper's text) or "constant" (the authors' SD3 code, which
                multiplies the step's noise scale by a fixed constant instead).
            constant: the fixed multiplier of the "constant" normalisation.

        Returns:
            [len(steps)] float64 weights, in the order of `steps`.
        """
        scale = self.step_std()
        idx = torch.arange(max(self.num_steps - 1, 1)) if steps is None else torch.as_tensor(steps, dtype=torch.long)
        w = scale[idx]
        if norm == "mean1":
            return w / w.mean()
        if norm == "constant":
            return constant * w
        raise ValueError(f"unknown weight normalisation {norm!r}; expected 'mean1' or 'constant'")

    def scale_term(self) -> torch.Tensor:
        """[T] the unweighted gradient scale sqrt(|dt| (1 - t) / t) of paper eq. 22."""
        t = self.sigmas[:-1]
        return torch.sqrt(self.dt().abs() * (1.0 - t) / t)


def make_schedule(
    num_steps: int,
    shift: float | None = 3.0,
    noise_level: float | None = 0.7,
    num_train_timesteps: int = 1000,
    mu: float | None = None,
    scheduler_config: Mapping[str, Any] | None = None,
) -> Schedule:
    """Build the grid with diffusers' own scheduler.

    Args:
        shift: SD3's static shift (3.0); None: 3.0, the SD3 default, for callers that pass an
            unset config field (a FLUX run passes `mu`, see `FluxPolicy.schedule`).
        noise_level: the `a` of s_t; None: 0.7, the SD3 default.
        mu: FLUX's time shift: the grid FluxPipeline samples on, sigmas linspace(1, 1/T, T)
            shifted by exp(mu) (diffusers' `use_dynamic_shifting`); `shift` is then unused.
            FluxPipeline computes mu with `calculate_shift` from the image's token count.
        scheduler_config: with `mu`, the model folder's scheduler config, for a family whose
            scheduler shapes the grid further (Qwen-Image: exponential shift, terminal stretch to 0.02).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    shift = 3.0 if shift is None else shift
    noise_level = 0.7 if noise_level is None else noise_level
    if mu is None:  # SD3: static shift, the pipeline's default timesteps
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
        scheduler.set_timesteps(num_steps)
    else:  # FLUX, Qwen-Image: the sigmas their pipelines pass, shifted by exp(mu)
        if scheduler_config is None:
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, use_dynamic_shifting=True)
        else:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=float(mu))
    sigmas = scheduler.sigmas.to(torch.float64).clone()
    timesteps = scheduler.timesteps.to(torch.float32).clone()
    return Schedule(sigmas=sigmas, timesteps=timesteps, noise_level=float(noise_level))
