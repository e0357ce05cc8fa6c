"""How well cheap children's rewards rank a group like the full children's (coarse completion).

Inputs are per-child rewards of the same children under two completions, with the children's
group ids (one group = the K children of one prompt at one branch step). What the update sees
is the group-normalised advantage, so besides the rank correlation this reports whether each
child keeps its advantage's sign and the cosine between the two advantage vectors (the policy
gradient is sum_i A_i grad log p_i: its direction follows that cosine).

Shapes: S children in all, K per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tempflow_core.algorithm.advantages import compute_advantages


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of x [n], ties sharing their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        m = x == v
        r[m] = r[m].mean()
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho of a [n] and b [n] (Pearson of average ranks); None when either is constant."""
    ra, rb = ranks(a) - (len(a) + 1) / 2, ranks(b) - (len(b) + 1) / 2
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return None if den == 0 else float((ra * rb).sum() / den)


@dataclass(frozen=True)
class Agreement:
    groups: int
    spearman: float  # mean over the groups where both completions have a spread (nan if none)
    ranked_groups: int  # how many groups that mean is over
    sign_agreement: float  # share of children with a nonzero full advantage whose cheap one has its sign
    adv_cosine: float  # cosine of the cheap and full advantage vectors [S]
    zero_std_full: float  # share of groups without a spread (no signal) under each completion
    zero_std_cheap: float


def agreement(full: np.ndarray, cheap: np.ndarray, group_ids: list[str]) -> Agreement:
    """Agreement of the cheap rewards [S] with the full ones [S] on the same children."""
    full, cheap = np.asarray(full, dtype=np.float64), np.asarray(cheap, dtype=np.float64)
    if full.shape != cheap.shape or full.shape != (len(group_ids),):
        raise ValueError(f"rewards {full.shape} and {cheap.shape} must both match {len(group_ids)} group ids")
    a_full, s_full = compute_advantages(full, group_ids)
    a_cheap, s_cheap = compute_advantages(cheap, group_ids)
    ids = np.asarray(group_ids)
    rhos = [spearman(full[ids == g], cheap[ids == g]) for g in dict.fromkeys(group_ids)]
    rhos = [r for r in rhos if r is not None]
    signed = a_full != 0
    den = float(np.linalg.norm(a_full) * np.linalg.norm(a_cheap))
    return Agreement(
        groups=len(dict.fromkeys(group_ids)),
        spearman=float(np.mean(rhos)) if rhos else float("nan"),
        ranked_groups=len(rhos),
        sign_agreement=float(np.mean(np.sign(a_cheap[signed]) == np.sign(a_full[signed]))) if signed.any() else float("nan"),
        adv_cosine=float(a_full.astype(np.float64) @ a_cheap.astype(np.float64) / den) if den > 0 else float("nan"),
        zero_std_full=s_full.frac_zero_std_groups,
        zero_std_cheap=s_cheap.frac_zero_std_groups,
    )
