"""Sharded training of the transformer: FSDP2 (`fully_shard`) under the data-parallel learner.

With `train.sharding = "fsdp"` each of the W learner ranks keeps 1/W of every transformer
weight (the frozen base and the LoRA) and of the AdamW moments; a block's weights are
all-gathered for its forward and backward and freed after, and the LoRA gradients are
reduce-scattered. What the ranks compute is the data-parallel update of data_parallel.py:
the same permutation, the same minibatches, the loss divided by the global number of terms
and the gradients SUMMED over ranks (the divide factor is 1, not FSDP's default mean), so
the update equals one process's within float32 summation order.

Two rules come with the collectives in every forward and backward:

* every rank runs the same number of transformer calls. A rank that holds fewer units of a
  minibatch than another runs `pad_call`s: one row of zeros whose loss is multiplied by
  0 (it adds nothing to any gradient), with the KL reference's call when the loss has one;
* whatever reads or writes the whole LoRA or optimizer state (`lora_state_dict`, the
  checkpoint, the EMA) runs on every rank: gathering a sharded tensor is a collective.

Checkpoints hold full tensors, as without sharding: a run may change `train.sharding` or
`train.workers` between iterations.
"""

from __future__ import annotations

from typing import Any

import torch


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every rank calls it), `t` itself otherwise."""
    return t.full_tensor() if is_sharded(t) else t


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor every rank holds) cut as `like` is sharded; no communication."""
    if not is_sharded(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer's blocks: the members of its ModuleLists (SD3 / Qwen-Image
    `transformer_blocks`, FLUX's two lists, Wan's `blocks`), the units FSDP gathers one at a time."""
    return [m for child in transformer.children() if isinstance(child, torch.nn.ModuleList) for m in child]


def shard_transformer(transformer: torch.nn.Module, device: torch.device) -> None:
    """Shard `transformer` in place over the default process group's ranks: each block is one
    FSDP unit, the rest (embeddings, norms, output) the root's. Parameters become DTensors, so
    an optimizer must be built after this."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    blocks = transformer_blocks(transformer)
    if not blocks:
        raise ValueError(f"train.sharding=fsdp: {type(transformer).__name__} has no list of blocks to shard")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(transformer, mesh=mesh)
    for m in transformer.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # a sum over ranks: the loss already divides by the global count
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)


def full_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's state_dict with every sharded moment gathered (a collective)."""
    return {**state, "state": {i: {k: full(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                               for i, s in state["state"].items()}}


def sharded_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A whole optimizer state_dict cut as `optimizer`'s parameters are sharded (the inverse of
    full_optimizer_state; `step` counters stay as they are)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {**state, "state": {i: {k: shard_like(v, params[int(i)]) if isinstance(v, torch.Tensor) and v.ndim else v
                                   for k, v in s.items()} for i, s in state["state"].items()}}


def pad_call(policy: Any, emb: Any, guidance_scale: float, reference: bool, backward: bool) -> None:
    """The transformer calls of one micro-batch on one row of zeros, adding nothing: keeps a
    rank with fewer units in step with its peers' collectives (module docstring). They are left
    out of the policy's NFE and call counts (the learner's rows stay those of its units, as
    without sharding); the update reports them as `train/pad_calls`."""
    counts = policy.nfe, policy.forward_calls
    x = torch.zeros(1, *policy.latent_shape(), device=policy.device)  # [1, C, H, W] (Wan: [1, C, F, H, W])
    t = torch.full((1,), 0.5, device=policy.device)
    cond = emb.select(torch.zeros(1, dtype=torch.long, device=policy.device))
    with torch.set_grad_enabled(backward):
        v = policy.velocity(x, t, cond, guidance_scale)
        if reference:
            with torch.no_grad(), policy.reference():
                policy.velocity(x, t, cond, guidance_scale)
        if backward:
            (v.sum() * 0.0).backward()
    policy.nfe, policy.forward_calls = counts
