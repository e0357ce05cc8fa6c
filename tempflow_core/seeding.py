"""Deterministic seeds and noise that do not depend on batching.

Every random draw of a rollout comes from its own torch.Generator seeded by a name
(iteration, prompt, branch step, child), so the wavefront engine, the per-branch-step loop
and a resumed run all draw the same noise for the same child, whatever the batch layout.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple of names, stable across processes and platforms."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_normal(seed: int, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal float32 noise from its own CPU generator (bit-identical on any device)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device)
