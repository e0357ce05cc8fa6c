"""Named presets: a measured change of a run's cost settings, applied to a resolved config.

A preset rewrites what a config already holds, relative to it, so it fits any batch and budget;
docs/experiments/cost.md has what each was measured to give and on which world.

* ``fast``: branch at the four noisiest steps only (``rollout.branch_steps=[0, 1, 2, 3]``: an
  ODE after the fourth, as Flow-GRPO-Fast does after its one or two) for half the iterations
  (rounded up). Per prompt and iteration the rollout then spends 4 + K (4T - 10) transformer
  calls against default's (T - 1) + K T (T - 1) / 2: over a run, at the paper's T = 10 with
  K = 8, 0.33 of default's rollout; at T = 6 (4 of its 5 trainable steps) 0.46, nearly all of
  it from the halved iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType

from tempflow_core.config import RunConfig


@dataclass(frozen=True)
class Preset:
    branch_steps: tuple[int, ...]  # the fixed branch points (rollout.branch_steps)
    iterations: float  # share of the config's train.iterations, rounded up


PRESETS = MappingProxyType({"fast": Preset(branch_steps=(0, 1, 2, 3), iterations=0.5)})


def apply_preset(config: RunConfig, name: str) -> RunConfig:
    """`config` rewritten by preset `name`. Raises ValueError for an unknown preset or a config
    the preset does not apply to (it names the field)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if not config.branching:
        raise ValueError(f"preset {name!r} sets rollout.branch_steps, and algorithm {config.algorithm!r} does not "
                         "branch: use algorithm tempflow or branch")
    if max(preset.branch_steps) > config.sampling.num_steps - 2:
        raise ValueError(f"preset {name!r} branches at steps {list(preset.branch_steps)}, and sampling.num_steps "
                         f"{config.sampling.num_steps} has trainable steps 0..{config.sampling.num_steps - 2}: "
                         f"use sampling.num_steps >= {max(preset.branch_steps) + 2}")
    data = config.model_dump(mode="json")
    data["rollout"].update(branch_steps=list(preset.branch_steps), branch_draw="uniform")
    data["train"]["iterations"] = math.ceil(config.train.iterations * preset.iterations)
    return RunConfig.model_validate(data)
