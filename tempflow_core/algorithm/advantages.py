"""GRPO advantages from rewards and group ids.

Group = the K children of one (prompt, branch step) when branching, the G trajectories of
one prompt otherwise. Flow-GRPO (Fixed) normalises by the group's own std; the original
Flow-GRPO subtracts the group mean but divides by the std of the whole batch. A group whose
rewards have no spread carries no signal: its advantages are 0, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class AdvantageStats:
    frac_zero_std_groups: float  # share of groups whose rewards are all equal
    mean: float
    std: float
    abs_max: float


def compute_advantages(
    rewards: np.ndarray,  # [S] float
    group_ids: list[str],  # [S]
    std_mode: Literal["group", "global"] = "group",
    clip_max: float = 5.0,
    eps: float = 1e-6,
) -> tuple[np.ndarray, AdvantageStats]:
    """Return float32 advantages [S] and summary stats.

    Example:
        >>> a, _ = compute_advantages(np.array([1., 3., 2., 2.]), ["a", "a", "b", "b"])
        >>> a.round(3).tolist()   # group a: (r - 2) / 1 ; group b has no spread
        [-1.0, 1.0, 0.0, 0.0]
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.shape != (len(group_ids),):
        raise ValueError(f"rewards shape {r.shape} does not match {len(group_ids)} group ids")
    if not np.all(np.isfinite(r)):
        raise ValueError("rewards contain NaN or inf; refusing to compute advantages")
    ids = np.asarray(group_ids)
    adv = np.zeros_like(r)
    global_std = r.std()
    zero_groups = 0
    uniq = list(dict.fromkeys(group_ids))
    for g in uniq:
        m = ids == g
        rg = r[m]
        std = rg.std() if std_mode == "group" else global_std
        if rg.max() - rg.min() <= eps * max(1.0, abs(rg).max()):
            zero_groups += 1
            continue  # no spread: no signal, advantage 0
        if std <= eps:
            continue
        adv[m] = (rg - rg.mean()) / std
    adv = np.clip(adv, -clip_max, clip_max).astype(np.float32)
    stats = AdvantageStats(
        frac_zero_std_groups=zero_groups / max(1, len(uniq)),
        mean=float(adv.mean()) if adv.size else 0.0,
        std=float(adv.std()) if adv.size else 0.0,
        abs_max=float(np.abs(adv).max()) if adv.size else 0.0,
    )
    return adv, stats
