"""One denoising step of a flow-matching model: ODE (Euler) and SDE (Flow-GRPO, paper eq. 5, or CPS).

The SDE transition from t to t + dt (dt < 0) is Gaussian:

    mean = x + [v + s_t^2 / (2t) * (x + (1 - t) v)] dt
    std  = s_t * sqrt(|dt|)

and keeps the marginals of the probability-flow ODE. The coefficients-preserving step (CPS,
`kind="cps"`, as Flow-GRPO's `sde_type="cps"`) goes from the predicted data x0 = x - t v and
noise e = x + (1 - t) v to t' = t + dt with fresh noise of std sigma = t' sin(a pi / 2):

    mean = (1 - t') x0 + sqrt(t'^2 - sigma^2) e
    std  = t' sin(a pi / 2)

so the state keeps the coefficients (1 - t', t') of data and noise. The `sde_sigma` argument
is s_t for the SDE and sin(a pi / 2) for CPS (Schedule.sde_sigma gives the run's). Log-probs
are those of the step's Gaussian, averaged over all non-batch dimensions (as in Flow-GRPO)
so that their scale does not grow with the image size. Arithmetic runs in float32 (float64
inputs stay float64) and results are cast back to the input dtype where they are states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tempflow_core.algorithm.schedule import SDEType

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class SDEStepOutput:
    """Result of one SDE step; tensors are [N, ...] with the input's shape."""

    next_sample: torch.Tensor  # [N, C, H, W]
    mean: torch.Tensor  # [N, C, H, W] float32
    std: torch.Tensor  # [N, 1, 1, 1] float32 (broadcastable)
    log_prob: torch.Tensor  # [N] float32, averaged over non-batch dims


def _per_sample(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or [N] value to [N, 1, 1, ...] in like's device and compute dtype."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    v = torch.as_tensor(value, dtype=dtype, device=like.device)
    if v.ndim == 0:
        v = v.expand(like.shape[0])
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def _compute(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def ode_step(sample: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor | float,
             t_next: torch.Tensor | float) -> torch.Tensor:
    """Euler step of dx = v dt; matches FlowMatchEulerDiscreteScheduler.step."""
    dt = _per_sample(t_next, sample) - _per_sample(t, sample)
    return (_compute(sample) + dt * _compute(velocity)).to(sample.dtype)


def sde_mean_std(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    sde_sigma: torch.Tensor | float,
    kind: SDEType = "flow_grpo",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the stochastic transition (paper eq. 5 / eq. 9, or CPS)."""
    x = _compute(sample)
    v = _compute(velocity)
    t_ = _per_sample(t, x)
    tn = _per_sample(t_next, x)
    dt = tn - t_
    s = _per_sample(sde_sigma, x)
    if kind == "cps":
        std = tn * s
        mean = (1.0 - tn) * (x - t_ * v) + torch.sqrt((tn**2 - std**2).clamp_min(0.0)) * (x + (1.0 - t_) * v)
        return mean, std
    mean = x + (v + s**2 / (2.0 * t_) * (x + (1.0 - t_) * v)) * dt
    std = s * torch.sqrt(dt.abs())
    return mean, std


def gaussian_log_prob(value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, batch_dims: int = 1) -> torch.Tensor:
    """Log-density of N(mean, std^2 I) at value, averaged over all but the leading `batch_dims`
    dimensions.

    The three tensors broadcast against each other. The usual case is one mean per sample:
    value [N, C, H, W], mean [N, C, H, W], std [N, 1, 1, 1] -> [N]. The learner scores K
    children against one mean per unit with batch_dims=2: value [N, K, C, H, W], mean
    [N, 1, C, H, W], std [N, 1, 1, 1, 1] -> [N, K].
    """
    value = _compute(value)
    lp = -((value - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _LOG_SQRT_2PI  # [*batch, C, H, W]
    return lp.mean(dim=tuple(range(batch_dims, lp.ndim)))


def sde_step(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    sde_sigma: torch.Tensor | float,
    noise: torch.Tensor,
    kind: SDEType = "flow_grpo",
) -> SDEStepOutput:
    """Take one SDE step with the given standard-normal noise (callers own the RNG)."""
    mean, std = sde_mean_std(sample, velocity, t, t_next, sde_sigma, kind)
    nxt = mean + std * _compute(noise)
    return SDEStepOutput(
        next_sample=nxt.to(sample.dtype), mean=mean, std=std, log_prob=gaussian_log_prob(nxt, mean, std)
    )


def sde_log_prob(
    next_sample: torch.Tensor,
    sample: torch.Tensor,
    velocity: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    sde_sigma: torch.Tensor | float,
    kind: SDEType = "flow_grpo",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob [N] of a given next state under the policy's transition, with its mean and std."""
    mean, std = sde_mean_std(sample, velocity, t, t_next, sde_sigma, kind)
    return gaussian_log_prob(next_sample, mean, std), mean, std


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(mean_ref, std^2 I)) averaged over non-batch dims (paper eq. 6): [N].

    Both policies share the transition std, so the KL is the squared mean gap over 2 std^2.
    """
    kl = (mean - mean_ref) ** 2 / (2.0 * std**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))
