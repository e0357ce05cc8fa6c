"""The reward registry: names to factories. Reward modules register themselves on import;
`tempflow_core.rewards` builds rewards from it."""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np


class RewardFn(Protocol):
    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]: ...


class RewardError(RuntimeError):
    """A reward returned something unusable; the message names the reward."""


_REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register(name: str) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Register a reward factory under `name` (factories import heavy models lazily)."""

    def deco(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        _REGISTRY[name] = factory
        return factory

    return deco
