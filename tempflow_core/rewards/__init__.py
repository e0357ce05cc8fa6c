"""Reward registry: every reward is `(images, prompts, metadata) -> (scores, details)`.

images are uint8 numpy arrays [N, H, W, 3]; prompts a list of N strings; metadata a list of N
dicts (the prompt's record, e.g. GenEval-style requirements). scores are float32 [N];
details maps names to float32 [N] arrays (per-reward parts, per-category checks).
`build_reward` validates every call's output so that a broken reward fails loudly, naming
itself, instead of silently training on NaN or zeros of the wrong shape.

A name `BASE:LABEL` builds the registered reward BASE with the options under
`options['BASE:LABEL']`: the same reward twice with different options, e.g. two reward servers
(`remote:ocr`, `remote:pick`) in one `weighted` reward. A reward served by another process
(`remote`) reports which server scored it; `reward_servers` collects that for the manifest.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .registry import _REGISTRY, RewardError, RewardFn, register  # noqa: F401  (the package's API)


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def factory(name: str) -> Callable[..., RewardFn]:
    """The factory of a registered reward, or of BASE for a labelled name `BASE:LABEL`.

    Raises:
        KeyError: naming the unknown reward and the available ones.
    """
    _load_builtin()
    base, sep, label = name.partition(":")
    if name in _REGISTRY or (sep and label and base in _REGISTRY):
        return _REGISTRY[name] if name in _REGISTRY else _REGISTRY[base]
    raise KeyError(f"unknown reward {name!r}; available: {', '.join(sorted(_REGISTRY) + ['weighted'])}")


def is_known(name: str) -> bool:
    """Whether `name` is a registered reward or a labelled one (`remote:ocr`)."""
    try:
        factory(name)
    except KeyError:
        return False
    return True


def reward_servers(fn: RewardFn) -> dict[str, dict[str, Any]]:
    """What served each remote part of a built reward: {part name: {url, reward, version,
    protocol}}, from the latest call; {} for a reward computed in this process."""
    servers = getattr(fn, "servers", None)
    return dict(servers()) if callable(servers) else {}


def _load_builtin() -> None:
    from . import basic, ocr, remote  # noqa: F401  (register brightness, ocr, remote)
    try:  # optional reward modules register themselves when present
        from . import extra  # noqa: F401
    except ImportError:
        pass


def checked(name: str, fn: RewardFn) -> RewardFn:
    """Wrap a reward so that a wrong shape, dtype or a NaN raises RewardError naming it."""

    def call(images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]):
        n = len(images)
        scores, details = fn(images, prompts, metadata)
        scores = np.asarray(scores)
        if scores.shape != (n,):
            raise RewardError(f"reward {name!r} returned shape {scores.shape}, expected ({n},)")
        if not np.all(np.isfinite(scores)):
            bad = int((~np.isfinite(scores)).sum())
            raise RewardError(f"reward {name!r} returned {bad} non-finite value(s) (NaN or inf) out of {n}")
        return scores.astype(np.float32), {k: np.asarray(v, dtype=np.float32) for k, v in (details or {}).items()}

    call.__name__ = f"reward_{name}"
    if callable(getattr(fn, "servers", None)):  # already keyed by part (weighted)
        setattr(call, "servers", getattr(fn, "servers"))
    elif callable(getattr(fn, "provenance", None)):  # one remote reward
        setattr(call, "servers", lambda: {name: getattr(fn, "provenance")()})
    return call


def build_reward(name: str, weights: dict[str, float] | None = None,
                 options: dict[str, dict[str, Any]] | None = None) -> RewardFn:
    """Build a registered reward, or a weighted sum when name == 'weighted'.

    Raises:
        KeyError: naming the unknown reward and the available ones.
    """
    _load_builtin()
    options = options or {}
    if name == "weighted":
        if not weights:
            raise ValueError("reward 'weighted' needs reward.weights, e.g. {'shapes': 1.0, 'jpeg_compressibility': 0.1}")
        parts = {n: build_reward(n, options=options) for n in weights}

        def weighted(images, prompts, metadata):
            total = np.zeros(len(images), dtype=np.float32)
            details: dict[str, np.ndarray] = {}
            for n, fn in parts.items():
                s, d = fn(images, prompts, metadata)
                total += np.float32(weights[n]) * s
                details[n] = s
                details.update({f"{n}/{k}": v for k, v in d.items()})
            return total, details

        setattr(weighted, "servers", lambda: {k: v for fn in parts.values() for k, v in reward_servers(fn).items()})
        return checked("weighted", weighted)
    return checked(name, factory(name)(**options.get(name, {})))
