"""Hand-built rollout batches (small random tensors, no model) and exact comparisons."""

from __future__ import annotations

import uuid

import numpy as np
import torch

from tempflow_core.batches import PromptEmbeds
from tempflow_core.batches import BranchPoint, RolloutBatch, Trajectory

from moto_s3 import KEY_ID as TEST_KEY_ID, SECRET as TEST_SECRET  # noqa: E402,F401  (the S3 fixture's env credentials)


def new_bucket() -> str:
    return f"tf-{uuid.uuid4().hex[:16]}"


def _embeds(b: int, dtype: torch.dtype, g: torch.Generator) -> PromptEmbeds:
    return PromptEmbeds(torch.randn(b, 5, 8, generator=g).to(dtype), torch.randn(b, 6, generator=g).to(dtype),
                        torch.randn(1, 5, 8, generator=g).to(dtype), torch.randn(1, 6, generator=g).to(dtype))


def make_branch_batch(prompts: int = 2, steps: tuple[int, ...] = (0, 2), k: int = 3, dtype: torch.dtype = torch.float32,
                      images: bool = True, seed: int = 0, latent: tuple[int, int, int] = (4, 8, 8),
                      image_side: int = 16, prompt_ids: list[str] | None = None) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    ids = prompt_ids or [f"{i:06d}" for i in range(prompts)]
    sigmas = torch.linspace(1.0, 0.0, 5, dtype=torch.float64) ** 1.3
    bps = []
    for step in steps:
        for p, pid in enumerate(ids):
            bps.append(BranchPoint(
                prompt_index=p, prompt_id=pid, step=step, t=float(sigmas[step]), t_next=float(sigmas[step + 1]),
                x_k=torch.randn(*latent, generator=g).to(dtype), x_next=torch.randn(k, *latent, generator=g).to(dtype),
                log_prob=torch.randn(k, generator=g), seeds=torch.randint(0, 2**62, (k,), generator=g, dtype=torch.int64),
                final_latents=torch.randn(k, *latent, generator=g).to(dtype),
                images=rng.integers(0, 256, (k, image_side, image_side, 3), dtype=np.uint8) if images else None))
    return RolloutBatch("branch", [f"prompt number {i}" for i in range(len(ids))], ids, _embeds(len(ids), dtype, g),
                        sigmas, branch_points=bps, forward_calls=7, nfe=11)


def make_plain_batch(prompts: int = 2, group: int = 3, steps: int = 4, dtype: torch.dtype = torch.float32,
                     seed: int = 1) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    ids = [f"p{i:03d}" for i in range(prompts)]
    trajs = [Trajectory(p, pid, j, int(rng.integers(0, 2**62)), torch.randn(steps + 1, 4, 8, 8, generator=g).to(dtype),
                        torch.randn(steps, generator=g), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
             for p, pid in enumerate(ids) for j in range(group)]
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return RolloutBatch("plain", [f"text {i}" for i in range(prompts)], ids, _embeds(prompts, dtype, g), sigmas,
                        trajectories=trajs, forward_calls=3, nfe=4)


def bits(t: torch.Tensor) -> bytes:
    """Raw bytes of a tensor (bit-identity, NaN-safe, any dtype including bf16)."""
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def assert_tensor_identical(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert tuple(a.shape) == tuple(b.shape), f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert bits(a) == bits(b), f"{what}: bits differ"


def assert_batches_identical(a: RolloutBatch, b: RolloutBatch, images: bool = True) -> None:
    assert (a.kind, a.prompts, a.prompt_ids, a.forward_calls, a.nfe) == (b.kind, b.prompts, b.prompt_ids,
                                                                        b.forward_calls, b.nfe)
    assert_tensor_identical(a.sigmas, b.sigmas, "sigmas")
    ta, tb = a.embeds.tensors(), b.embeds.tensors()
    assert sorted(ta) == sorted(tb), f"embeds fields {sorted(ta)} != {sorted(tb)}"
    for f in ta:
        assert_tensor_identical(ta[f], tb[f], f"embeds.{f}")
    assert a.sample_keys() == b.sample_keys()
    assert a.group_ids() == b.group_ids()
    if a.kind == "branch":
        assert len(a.branch_points) == len(b.branch_points)
        for x, y in zip(a.branch_points, b.branch_points):
            assert (x.prompt_index, x.prompt_id, x.step, x.t, x.t_next) == \
                (y.prompt_index, y.prompt_id, y.step, y.t, y.t_next)
            for f in ("x_k", "x_next", "log_prob", "seeds"):
                assert_tensor_identical(getattr(x, f), getattr(y, f), f"{x.group_id}.{f}")
            if images:
                assert x.images is not None and y.images is not None
                assert x.images.dtype == y.images.dtype and np.array_equal(x.images, y.images)
    else:
        assert len(a.trajectories) == len(b.trajectories)
        for x, y in zip(a.trajectories, b.trajectories):
            assert (x.prompt_index, x.prompt_id, x.member, x.seed) == (y.prompt_index, y.prompt_id, y.member, y.seed)
            assert_tensor_identical(x.states, y.states, f"{x.key}.states")
            assert_tensor_identical(x.log_probs, y.log_probs, f"{x.key}.log_probs")
            if images:
                assert np.array_equal(x.image, y.image)
