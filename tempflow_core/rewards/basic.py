"""Cheap image rewards with no model: for unit tests and learning smoke tests."""

from __future__ import annotations

import numpy as np


def brightness():
    """Mean pixel value in [0, 1]: the simplest reward a policy can visibly learn."""

    def fn(images, prompts, metadata):
        return images.reshape(len(images), -1).mean(axis=1).astype(np.float32) / 255.0, {}

    return fn
