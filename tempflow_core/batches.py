"""What a rollout produces, as data: prompt embeddings, branch points (K children of one
backbone state), plain trajectories and a stage's batch of them. The rollout (algorithm/rollout.py)
makes them, the data plane (shards/) writes and reads them, the learner trains on them.

Shapes: B prompts, K children per branch point, T denoising steps, C, H, W one latent,
L prompt tokens, D token width, Dp pooled width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch


@dataclass
class PromptEmbeds:
    """A batch's conditioning, owned by the policy that encoded it: what `velocity` reads for
    each row. `neg_*` is the empty-prompt embedding used for CFG, kept once. A
    guidance-distilled family (FLUX) has no negative prompt: its `neg_*` hold zero rows, so a
    batch's tensors keep one schema. A family without a pooled embedding (Qwen-Image) holds
    zero-width `pooled`; a family whose text tokens vary per prompt (Qwen-Image) pads them to
    L and marks the valid ones in `mask` (None: every token is valid, SD3 and FLUX)."""

    embeds: torch.Tensor  # [B, L, D] (SD3: CLIP-L/G + T5 joint sequence; FLUX: T5; Qwen-Image: Qwen2.5-VL)
    pooled: torch.Tensor  # [B, Dp] (SD3: CLIP-L/G pooled; FLUX: CLIP-L pooled; Qwen-Image: [B, 0])
    neg_embeds: torch.Tensor  # [1, L, D] ([0, L, D] without CFG)
    neg_pooled: torch.Tensor  # [1, Dp] ([0, Dp] without CFG)
    mask: torch.Tensor | None = None  # [B, L] int64, 1 = a token of the prompt; None: all valid
    neg_mask: torch.Tensor | None = None  # [1, L] (or [0, L]) with `mask`

    def select(self, index: torch.Tensor) -> "PromptEmbeds":
        """The conditioning of rows `index` (a row may repeat: one per child or per CFG row)."""
        mask = None if self.mask is None else self.mask[index]
        return PromptEmbeds(self.embeds[index], self.pooled[index], self.neg_embeds, self.neg_pooled, mask,
                            self.neg_mask)

    def to(self, device: torch.device | str) -> "PromptEmbeds":
        move = lambda z: None if z is None else z.to(device)  # noqa: E731
        return PromptEmbeds(self.embeds.to(device), self.pooled.to(device), self.neg_embeds.to(device),
                            self.neg_pooled.to(device), move(self.mask), move(self.neg_mask))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The named tensors a stage stores (the masks only where the family has them)."""
        out = {"embeds": self.embeds, "pooled": self.pooled, "neg_embeds": self.neg_embeds,
               "neg_pooled": self.neg_pooled}
        if self.mask is not None:
            out.update(mask=self.mask, neg_mask=self.neg_mask if self.neg_mask is not None else self.mask[:0])
        return out

    @staticmethod
    def from_tensors(t: dict[str, torch.Tensor]) -> "PromptEmbeds":
        """The inverse of `tensors` (KeyError naming a missing field)."""
        return PromptEmbeds(t["embeds"], t["pooled"], t["neg_embeds"], t["neg_pooled"], t.get("mask"),
                            t.get("neg_mask"))

    @staticmethod
    def cat(parts: list["PromptEmbeds"]) -> "PromptEmbeds":
        """The rows of `parts` in order (the negative of the first; all encoded by one policy)."""
        mask = None if parts[0].mask is None else torch.cat([p.mask for p in parts])  # type: ignore[misc]
        e0 = parts[0]
        return PromptEmbeds(torch.cat([p.embeds for p in parts]), torch.cat([p.pooled for p in parts]),
                            e0.neg_embeds, e0.neg_pooled, mask, e0.neg_mask)


@dataclass
class BranchPoint:
    """One (prompt, branch step k) action and its K children: one GRPO group."""

    prompt_index: int  # row in the batch's prompts / embeddings
    prompt_id: str
    step: int  # k: index into the schedule, 0 = noisiest
    t: float  # t_k, the flow's time at step k (the grid's sigma_k on a rectified-flow grid)
    t_next: float  # t_{k+1}
    x_k: torch.Tensor  # [C, H, W] backbone state, stored once
    x_next: torch.Tensor  # [K, C, H, W] child state after its one SDE step
    log_prob: torch.Tensor  # [K] float32 old log-prob of x_next
    seeds: torch.Tensor  # [K] int64 noise seed of each child
    final_latents: torch.Tensor | None  # [K, C, H, W] the children's last states (in memory; not in shards)
    images: np.ndarray | None = None  # [K, H', W', 3] uint8

    @property
    def group_id(self) -> str:
        return f"{self.prompt_id}_k{self.step:02d}"

    @property
    def child_keys(self) -> list[str]:
        return [f"{self.group_id}_c{j:02d}" for j in range(self.x_next.shape[0])]


def group_of_key(sample_key: str) -> str:
    """The group of a sample key: `{group_id}_c{j}` (a child) or `{prompt_id}_g{j}` (a trajectory)."""
    return sample_key.rsplit("_", 1)[0]


def branch_step_of_group(group_id: str) -> int:
    """The branch step k of a branch point's group id `{prompt_id}_k{k:02d}`."""
    return int(group_id.rsplit("_k", 1)[1])


@dataclass
class Trajectory:
    """One plain SDE trajectory; its G siblings of the same prompt form the group."""

    prompt_index: int
    prompt_id: str
    member: int  # j in 0..G-1
    seed: int
    states: torch.Tensor  # [T+1, C, H, W] x_0 (noise) .. x_T (final latent)
    log_probs: torch.Tensor  # [T] float32
    image: np.ndarray | None = None  # [H', W', 3] uint8

    @property
    def group_id(self) -> str:
        return self.prompt_id

    @property
    def key(self) -> str:
        return f"{self.prompt_id}_g{self.member:02d}"


@dataclass
class RolloutBatch:
    """Everything one rollout stage produces, before rewards."""

    kind: Literal["branch", "plain"]
    prompts: list[str]
    prompt_ids: list[str]
    embeds: PromptEmbeds
    sigmas: torch.Tensor  # [T+1] float64
    branch_points: list[BranchPoint] = field(default_factory=list)
    trajectories: list[Trajectory] = field(default_factory=list)
    forward_calls: int = 0
    nfe: int = 0

    def sample_keys(self) -> list[str]:
        if self.kind == "branch":
            return [k for bp in self.branch_points for k in bp.child_keys]
        return [tr.key for tr in self.trajectories]

    def group_ids(self) -> list[str]:
        if self.kind == "branch":
            return [bp.group_id for bp in self.branch_points for _ in range(bp.x_next.shape[0])]
        return [tr.group_id for tr in self.trajectories]

    def images(self) -> np.ndarray:
        """[S, H', W', 3] uint8 in sample_keys order."""
        if self.kind == "branch":
            return np.concatenate([bp.images for bp in self.branch_points], 0)
        return np.stack([tr.image for tr in self.trajectories], 0)

    def prompt_index_per_sample(self) -> list[int]:
        if self.kind == "branch":
            return [bp.prompt_index for bp in self.branch_points for _ in range(bp.x_next.shape[0])]
        return [tr.prompt_index for tr in self.trajectories]
