"""Paired comparison of two arms trained on the same seeds and evaluated on the same items.

Arm a and arm b give per-image scores a[s, i] and b[s, i] for training seed s and evaluation
item i (a prompt and its noise: the same for every seed and arm). The difference of the arms
is D = mean_s d_s with d_s = sum_i w_i (a[s, i] - b[s, i]), where the weights w make the
GenEval-style overall (the mean over categories of each category's mean: w_i = 1 / (C n_c)).

Two sources of error: the seeds (training runs spread) and the items (the evaluation set is one
draw of prompts and noise, shared by every seed, so its error does not average out over seeds).
The standard error is sqrt(var_s(d) / S + sum_c var_{i in c}(e_i) / (C^2 n_c)), where e_i is
item i's difference averaged over seeds; the first term also holds each seed's own item noise,
so the sum errs on the wide side. The verdict is a t-test of D / SE with the two terms'
Welch-Satterthwaite degrees of freedom (S - 1 for the seeds', items - categories for the
items'): "beyond the noise" needs at least `min_seeds` seeds and a two-sided p below `alpha`.

`bootstrap_se` resamples seeds and items (both with replacement, the items once for all seeds)
as an independent check of the formula. `from_seeds` is the same test where only each seed's
overall score and the evaluation's standard error are recorded (results from before per-image
records): the items' term is then the unpaired one, sqrt(se_a^2 + se_b^2), the wide side again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

MIN_SEEDS = 4
ALPHA = 0.05


@dataclass(frozen=True)
class Paired:
    """a - b, paired by seed and item."""

    diff: float  # D
    se: float  # the standard error of D (seeds and items)
    se_seeds: float
    se_items: float
    p: float  # two-sided t-test, Welch-Satterthwaite degrees of freedom (nan with one seed)
    seeds: int
    won: int  # seeds where a scores higher
    beyond: bool  # at least MIN_SEEDS seeds and p < ALPHA


def _weights(groups: Sequence[str] | None, items: int) -> tuple[np.ndarray, np.ndarray]:
    """([I] weights summing to 1 that give the mean over groups of each group's mean, [I] group index)."""
    if groups is None:
        return np.full(items, 1.0 / items), np.zeros(items, dtype=int)
    if len(groups) != items:
        raise ValueError(f"{len(groups)} groups for {items} items")
    names, index = np.unique(np.asarray(groups), return_inverse=True)
    sizes = np.bincount(index)
    return 1.0 / (len(names) * sizes[index]), index


def compare(a: np.ndarray, b: np.ndarray, groups: Sequence[str] | None = None, min_seeds: int = MIN_SEEDS,
            alpha: float = ALPHA) -> Paired:
    """Paired comparison of per-image scores a, b [S, I] (rows: the same seeds; columns: the same
    items); groups [I]: each item's category (None: one category).

    Raises:
        ValueError: when the shapes differ, or there are no seeds or items.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"paired scores need two equal [seeds, items] arrays; got {a.shape} and {b.shape}")
    n = a.shape[1]
    w, index = _weights(groups, n)
    delta = a - b  # [S, I]
    d = delta @ w  # [S]
    e = delta.mean(axis=0)  # [I]
    var_items = 0.0
    for g in range(index.max() + 1):
        members = e[index == g]
        if members.size > 1:
            var_items += float(w[index == g][0] ** 2 * members.size * members.var(ddof=1))
    return _test(d, float(np.sqrt(var_items)), max(n - (index.max() + 1), 1), min_seeds, alpha)


def from_seeds(d: Sequence[float], se_items: float, min_seeds: int = MIN_SEEDS, alpha: float = ALPHA) -> Paired:
    """a - b from the per-seed differences d [S] of the two arms' overall scores (paired by seed)
    and the evaluation's standard error of the difference `se_items` (taken as known: its
    degrees of freedom are the evaluation set's hundreds of images)."""
    return _test(np.asarray(d, dtype=float), float(se_items), float("inf"), min_seeds, alpha)


def _test(d: np.ndarray, se_items: float, df_items: float, min_seeds: int, alpha: float) -> Paired:
    """The t-test of mean(d) with the seeds' and the items' standard errors (module docstring)."""
    s = len(d)
    if s == 0:
        raise ValueError("a paired comparison needs at least one seed")
    diff = float(d.mean())
    se_seeds = float(d.std(ddof=1) / np.sqrt(s)) if s > 1 else 0.0
    se = float(np.hypot(se_seeds, se_items))
    if s > 1 and se > 0:
        den = se_seeds**4 / (s - 1) + se_items**4 / df_items
        df = se**4 / den if den > 0 else float("inf")  # identical seeds, the items' error known
        p = float(2 * stats.t.sf(abs(diff) / se, df=df))
    elif s > 1:
        p = 0.0 if diff != 0 else 1.0
    else:
        p = float("nan")
    return Paired(diff, se, se_seeds, se_items, p, s, int((d > 0).sum()), bool(s >= min_seeds and p < alpha))


def bootstrap_se(a: np.ndarray, b: np.ndarray, groups: Sequence[str] | None = None, draws: int = 2000,
                 seed: int = 0) -> float:
    """The standard error of compare()'s D by a two-level bootstrap: seeds resampled with
    replacement, and items within each category resampled once per draw for all seeds."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    s, n = a.shape
    w, index = _weights(groups, n)
    delta = a - b
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(index == g) for g in range(index.max() + 1)]
    out = np.empty(draws)
    for k in range(draws):
        rows = rng.integers(s, size=s)
        cols = np.concatenate([m[rng.integers(m.size, size=m.size)] for m in members])
        out[k] = float((delta[np.ix_(rows, cols)] @ w[cols]).mean())
    return float(out.std(ddof=1))
