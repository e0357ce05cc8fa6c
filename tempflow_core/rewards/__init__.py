"""Rewards: every reward is `(images, prompts, metadata) -> (scores, details)`.

images are uint8 numpy arrays [N, H, W, 3]; prompts a list of N strings; metadata a list of N
dicts (the prompt's record, e.g. GenEval-style requirements). scores are float32 [N];
details maps names to float32 [N] arrays (per-reward parts, per-category checks). Every
built reward's output is checked (`checked`), so that a broken reward fails loudly, naming
itself, instead of silently training on NaN or zeros of the wrong shape.

Which rewards exist is a `RewardRegistry` (registry.py), built where a run starts from its
config (`RewardRegistry.for_config(cfg.reward)`: the built-in rewards and reward.plugins).
A reward served by another process (`remote`) reports which server scored it; `reward_servers`
collects that for the manifest.

    basic.py     brightness (tests and smoke runs)
    extra.py     shapes (GenEval-like), JPEG (in)compressibility, CLIPScore, PickScore
    ocr.py       Flow-GRPO's OCR reward (extra `ocr`)
    remote.py    a reward served by `tempflow reward-server` (protocol.py; server.py serves one)
"""

from __future__ import annotations

from typing import Any, Mapping

from tempflow_core.rewards.registry import BUILTIN, Entry, RewardError, RewardFn, RewardRegistry, checked, reward_servers  # noqa: F401


def build_reward(name: str, weights: Mapping[str, float] | None = None,
                 options: Mapping[str, Mapping[str, Any]] | None = None,
                 registry: RewardRegistry | None = None) -> RewardFn:
    """`registry.build(...)` (default: the built-in rewards)."""
    return (registry or RewardRegistry.builtin()).build(name, weights, options)
