"""Paired comparison of two arms trained on the same seeds and evaluated on the same items.

Arm a and arm b give per-image scores a[s, i] and b[s, i] for training seed s and evaluation
item i (a prompt and its noise: the same for every seed and arm). The difference of the arms
is D = mean_s d_s with d_s = sum_i w_i (a[s, i] - b[s, i]), where the weights w make the
GenEval-style overall (the mean over categories of each category's mean: w_i = 1 / (C n_c)).

Two sources of error: the seeds (training runs spread) and the items (the evaluation set is one
draw of prompts and noise, shared by every seed, so its error does not average out over seeds).
The standard error is sqrt(var_s(d) / S + sum_c v_c / (C^2 n_c)). The first term holds the
seeds' spread, each seed's own image noise included. v_c is the variance of the items' shared
effect in category c: the variance over its items of e_i (item i's difference averaged over
seeds), less what each seed's image noise adds to it, the two-way (seed x item) residual mean
square / S, which the first term already counts (clipped at 0; with one seed v_c is the items'
whole variance). The verdict is a t-test of D / SE with the two terms'
Welch-Satterthwaite degrees of freedom (S - 1 for the seeds', items - categories for the
items'): "beyond the noise" needs at least `min_seeds` seeds and a two-sided p below `alpha`.

"a reaches b" (`reaches`) is the one-sided non-inferiority test of the same difference: a is
shown to be no worse than b by more than `margin` when D - margin is beyond the noise on the
upper side, i.e. the one-sided (1 - alpha) lower confidence bound D - t * SE lies above -margin,
again from at least `min_seeds` seeds. Two equal arms are then shown to reach each other only
when SE is well below the margin: "not reached" means either worse or not measured well enough.

`bootstrap_se` resamples seeds and items (both with replacement, the items once for all seeds);
it counts each seed's image noise twice (with the seeds and with the items), so it bounds the
formula from above (a test checks both against simulated runs whose error is known).
`from_seeds` is the same test where only each seed's overall score and the evaluation's
standard error are recorded (results from before per-image records): the items' term is then
the unpaired one, sqrt(se_a^2 + se_b^2), the wide side.
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
    df: float  # those degrees of freedom (inf where the error is the items' alone, nan with one seed)
    seeds: int
    won: int  # seeds where a scores higher
    beyond: bool  # at least MIN_SEEDS seeds and p < ALPHA


def overall_weights(groups: Sequence[str] | None, items: int) -> tuple[np.ndarray, np.ndarray]:
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
    w, index = overall_weights(groups, n)
    delta = a - b  # [S, I]
    d = delta @ w  # [S]
    e = delta.mean(axis=0)  # [I]
    s = a.shape[0]
    var_items = 0.0
    for g in range(index.max() + 1):
        cols = index == g
        members = e[cols]
        if members.size < 2:
            continue
        var_e = float(members.var(ddof=1))  # the items' shared effect + each seed's image noise / S
        if s > 1:  # take out the image noise, which var_s(d) already holds: the two-way residual's mean square
            r = delta[:, cols] - delta[:, cols].mean(axis=1, keepdims=True) - members + members.mean()  # [S, n_c]
            noise = float((r**2).sum() / ((s - 1) * (members.size - 1)))
            var_e = max(var_e - noise / s, 0.0)
        var_items += float(w[cols][0] ** 2 * members.size * var_e)
    return _test(d, float(np.sqrt(var_items)), max(n - (index.max() + 1), 1), min_seeds, alpha)


def from_seeds(d: Sequence[float], se_items: float, min_seeds: int = MIN_SEEDS, alpha: float = ALPHA) -> Paired:
    """a - b from the per-seed differences d [S] of the two arms' overall scores (paired by seed)
    and the evaluation's standard error of the difference `se_items` (taken as known: its
    degrees of freedom are the evaluation set's hundreds of images)."""
    return _test(np.asarray(d, dtype=float), float(se_items), float("inf"), min_seeds, alpha)


def _test(d: np.ndarray, se_items: float, df_items: float, min_seeds: int, alpha: float) -> Paired:
    """The t-test of mean(d) with the seeds' and the items' standard errors (module docstring)."""
    s = len(d)
    df = float("nan")
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
    return Paired(diff, se, se_seeds, se_items, p, df, s, int((d > 0).sum()), bool(s >= min_seeds and p < alpha))


def lower_bound(r: Paired, alpha: float = ALPHA) -> float:
    """The one-sided (1 - alpha) lower confidence bound of r.diff (-inf with one seed)."""
    if r.seeds < 2:
        return float("-inf")
    if r.se == 0:
        return r.diff
    return r.diff - float(stats.t.ppf(1 - alpha, df=r.df)) * r.se


def reaches(r: Paired, margin: float, alpha: float = ALPHA, min_seeds: int = MIN_SEEDS) -> bool:
    """Whether a is shown to reach b within `margin` (module docstring): at least min_seeds
    seeds and the one-sided lower confidence bound of a - b above -margin."""
    if margin < 0:
        raise ValueError(f"a non-inferiority margin is >= 0; got {margin}")
    return bool(r.seeds >= min_seeds and lower_bound(r, alpha) > -margin)


def bootstrap_se(a: np.ndarray, b: np.ndarray, groups: Sequence[str] | None = None, draws: int = 2000,
                 seed: int = 0) -> float:
    """The standard error of compare()'s D by a two-level bootstrap: seeds resampled with
    replacement, and items within each category resampled once per draw for all seeds."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    s, n = a.shape
    w, index = overall_weights(groups, n)
    delta = a - b
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(index == g) for g in range(index.max() + 1)]
    out = np.empty(draws)
    for k in range(draws):
        rows = rng.integers(s, size=s)
        cols = np.concatenate([m[rng.integers(m.size, size=m.size)] for m in members])
        out[k] = float((delta[np.ix_(rows, cols)] @ w[cols]).mean())
    return float(out.std(ddof=1))
