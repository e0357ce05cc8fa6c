"""The reward registry: an object that maps reward names to factories, built where a run starts.

    RewardRegistry.for_config(cfg.reward)   the built-in rewards and those of reward.plugins
    RewardRegistry({"mine": factory})       a registry of one's own (tests pass theirs)

A built-in reward is named by where its factory lives ("module:function") and imported only
when it is built, so a reward whose optional dependency is missing fails then, with the extra
to install (`pip install 'tempflow[ocr]'`), and never hides as an unknown name. A plugin is a
module on the Python path that defines `REWARDS = {name: factory}` (reward.plugins names it).
A factory takes the reward's options as keyword arguments and returns the reward function.
A name `BASE:LABEL` builds BASE with the options under `options['BASE:LABEL']`.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Protocol

import numpy as np


class RewardFn(Protocol):
    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]: ...


class RewardError(RuntimeError):
    """A reward returned something unusable, or cannot be built; the message names the reward
    (`problem`, and the `fix` when one is known: '<problem>; fix: <fix>')."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem}; fix: {fix}" if fix else problem)


Factory = Callable[..., RewardFn]


@dataclass(frozen=True)
class Entry:
    target: str | Factory  # "module:function", imported when the reward is built, or the factory
    extra: str | None = None  # the pip extra of tempflow that installs its optional dependencies
    requires: tuple[str, ...] = ()  # modules the reward imports when built (checked without importing)
    gpu: bool = True  # runs a model that wants a GPU; False: numpy, a CPU library or a server does the work


BUILTIN: Mapping[str, Entry] = MappingProxyType({
    "brightness": Entry("tempflow_core.rewards.basic:brightness", gpu=False),
    "shapes": Entry("tempflow_core.rewards.extra:shapes", gpu=False),
    "shapes_strict": Entry("tempflow_core.rewards.extra:shapes_strict", gpu=False),
    "jpeg_compressibility": Entry("tempflow_core.rewards.extra:jpeg_compressibility", gpu=False),
    "jpeg_incompressibility": Entry("tempflow_core.rewards.extra:jpeg_incompressibility", gpu=False),
    "clipscore": Entry("tempflow_core.rewards.extra:clipscore"),
    "pickscore": Entry("tempflow_core.rewards.extra:pickscore"),
    "ocr": Entry("tempflow_core.rewards.ocr:ocr", extra="ocr", requires=("rapidocr", "onnxruntime"), gpu=False),
    "remote": Entry("tempflow_core.rewards.remote:remote", gpu=False),
    "frames": Entry("tempflow_core.rewards.clips:frames", gpu=False),
    "temporal_consistency": Entry("tempflow_core.rewards.clips:temporal_consistency", gpu=False),
})


def _missing(name: str, entry: Entry, module: str | None) -> RewardError:
    fix = f"pip install 'tempflow[{entry.extra}]'" if entry.extra else f"pip install {module or 'the missing package'}"
    return RewardError(f"reward {name!r} needs the package {module or '?'}, which is not installed", fix)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None
        return False


class RewardRegistry:
    """Reward names -> factories (or where to import them). Immutable: `with_rewards` returns a new one."""

    def __init__(self, entries: Mapping[str, Entry | Factory]) -> None:
        self._entries = {n: e if isinstance(e, Entry) else Entry(e) for n, e in entries.items()}

    @classmethod
    def builtin(cls) -> "RewardRegistry":
        return cls(BUILTIN)

    @classmethod
    def for_config(cls, reward: Any) -> "RewardRegistry":
        """The registry of a run: its RewardConfig's plugins over the built-in rewards."""
        return cls.with_plugins(reward.plugins)

    @classmethod
    def with_plugins(cls, modules: Sequence[str]) -> "RewardRegistry":
        """The built-in rewards and those of the plugin modules (each REWARDS = {name: factory})."""
        registry = cls.builtin()
        for module in modules:
            registry = registry.with_rewards(plugin_rewards(module))
        return registry

    def with_rewards(self, rewards: Mapping[str, Entry | Factory]) -> "RewardRegistry":
        taken = sorted(set(rewards) & set(self._entries))
        if taken:
            raise RewardError(f"rewards {taken} are registered already; give them other names")
        return RewardRegistry({**self._entries, **rewards})

    def names(self) -> list[str]:
        return sorted(self._entries)

    def _entry(self, name: str) -> tuple[str, Entry]:
        base, sep, label = name.partition(":")
        if name in self._entries:
            return name, self._entries[name]
        if sep and label and base in self._entries:
            return base, self._entries[base]
        raise KeyError(f"unknown reward {name!r}; available: {', '.join(self.names() + ['weighted'])}")

    def is_known(self, name: str) -> bool:
        """Whether `name` is a registered reward or a labelled one (`remote:ocr`)."""
        try:
            self._entry(name)
        except KeyError:
            return False
        return True

    def needs_gpu(self, name: str, weights: Mapping[str, float] | None = None) -> bool:
        """Whether building `name` (any part of 'weighted') loads a model that wants a GPU: the
        CLIP-based rewards do; image statistics, the shapes detector, OCR on onnxruntime's CPU
        provider and a reward server do not. A plugin's reward counts as needing one unless its
        factory says otherwise (an attribute `gpu = False`)."""
        if name == "weighted":
            return any(self.needs_gpu(n) for n in (weights or {}))
        _, entry = self._entry(name)
        return bool(getattr(entry.target, "gpu", True)) if callable(entry.target) else entry.gpu

    def factory(self, name: str) -> Factory:
        """The factory of `name` (of BASE for `BASE:LABEL`), imported if need be.

        Raises:
            KeyError: naming the unknown reward and the available ones.
            RewardError: its module needs a package that is not installed (naming the extra).
        """
        base, entry = self._entry(name)
        for needed in entry.requires:
            if not _importable(needed):
                raise _missing(base, entry, needed)
        if callable(entry.target):
            return entry.target
        module, _, attr = entry.target.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as e:
            raise _missing(base, entry, e.name) from e

    def build(self, name: str, weights: Mapping[str, float] | None = None,
              options: Mapping[str, Mapping[str, Any]] | None = None) -> RewardFn:
        """The reward `name` (or the weighted sum of `weights` for 'weighted'), its every call
        checked (`checked`).

        Raises:
            KeyError: naming the unknown reward and the available ones.
            RewardError: a missing optional dependency (naming the extra to install).
        """
        options = options or {}
        if name == "weighted":
            if not weights:
                raise ValueError("reward 'weighted' needs reward.weights, e.g. {'shapes': 1.0, 'jpeg_compressibility': 0.1}")
            return weighted({n: self.build(n, options=options) for n in weights}, dict(weights))
        factory = self.factory(name)
        try:
            fn = factory(**options.get(name, {}))
        except ImportError as e:  # a factory imports its heavy library when called
            raise _missing(*self._entry(name), e.name) from e
        return checked(name, fn)


def plugin_rewards(module: str) -> Mapping[str, Factory]:
    """The rewards a plugin module defines (`REWARDS = {name: factory}`)."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise RewardError(f"reward plugin {module!r} cannot be imported ({e})",
                          "put it on the Python path or remove it from reward.plugins") from e
    rewards = getattr(mod, "REWARDS", None)
    if not isinstance(rewards, Mapping) or not all(isinstance(k, str) and callable(v) for k, v in rewards.items()):
        raise RewardError(f"reward plugin {module!r} defines no REWARDS = {{name: factory}}")
    return rewards


def weighted(parts: Mapping[str, RewardFn], weights: Mapping[str, float]) -> RewardFn:
    """The weighted sum of built rewards; details keep each part's score and its details."""

    def fn(images, prompts, metadata):
        total = np.zeros(len(images), dtype=np.float32)
        details: dict[str, np.ndarray] = {}
        for n, part in parts.items():
            s, d = part(images, prompts, metadata)
            total += np.float32(weights[n]) * s
            details[n] = s
            details.update({f"{n}/{k}": v for k, v in d.items()})
        return total, details

    setattr(fn, "servers", lambda: {k: v for part in parts.values() for k, v in reward_servers(part).items()})
    return checked("weighted", fn)


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


def reward_servers(fn: RewardFn) -> dict[str, dict[str, Any]]:
    """What served each remote part of a built reward: {part name: {url, reward, version,
    protocol}}, from the latest call; {} for a reward computed in this process."""
    servers = getattr(fn, "servers", None)
    return dict(servers()) if callable(servers) else {}
