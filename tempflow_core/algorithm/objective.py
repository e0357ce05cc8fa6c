"""The clipped, step-weighted GRPO objective with a KL penalty (paper eq. 1-2, 6, 8).

Per term (one sample's action at one step):
    ratio  = exp(logp_new - logp_old)
    policy = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) * w_step
    loss   = policy + beta * KL(pi_theta || pi_ref) * I_step
where w_step is the noise-aware weight for `tempflow` and 1 otherwise, times I_step, the
importance of a step drawn by a weighted branch draw (steps.importance; 1 otherwise), which
scales the KL term too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ObjectiveTerms:
    """Per-term tensors, all [N] (flattened over units and children)."""

    loss: torch.Tensor
    policy: torch.Tensor
    kl: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor  # bool: |ratio - 1| > eps
    approx_kl: torch.Tensor  # 0.5 (logp - logp_old)^2


def grpo_terms(
    log_prob: torch.Tensor,  # [N]
    old_log_prob: torch.Tensor,  # [N]
    advantages: torch.Tensor,  # [N]
    weights: torch.Tensor,  # [N]
    kl: torch.Tensor,  # [N] closed-form KL to the reference (zeros when beta = 0)
    clip_range: float,
    beta: float,
    kl_weights: torch.Tensor | None = None,  # [N] the draw's importance (None: 1)
) -> ObjectiveTerms:
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy = torch.maximum(unclipped, clipped) * weights
    loss = policy + beta * (kl if kl_weights is None else kl * kl_weights)
    return ObjectiveTerms(
        loss=loss, policy=policy, kl=kl, ratio=ratio.detach(),
        clipped=((ratio.detach() - 1.0).abs() > clip_range), approx_kl=0.5 * log_ratio.detach() ** 2,
    )
