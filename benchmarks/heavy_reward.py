"""A deliberately slow reward for benchmarks: `shapes`, then a wait of `seconds_per_image` per
image, standing in for a reward model that runs elsewhere (a GPU, another machine) and keeps
the caller waiting without using its CPU. A reward plugin (REWARDS), served with

    tempflow reward-server --reward heavy_shapes --plugin benchmarks.heavy_reward --option seconds_per_image=0.05
"""

from __future__ import annotations

import time

from tempflow_core.rewards import build_reward


def heavy_shapes(seconds_per_image: float = 0.05):
    shapes = build_reward("shapes")

    def fn(images, prompts, metadata):
        out = shapes(images, prompts, metadata)
        time.sleep(seconds_per_image * len(images))
        return out

    return fn


REWARDS = {"heavy_shapes": heavy_shapes}
