"""The paired comparison of two arms (tempflow_core.reports.paired): its difference is the
overall scores' difference, its error agrees with a two-level bootstrap, and its verdict holds
its error rates on simulated runs with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from scipy import stats

from tempflow_core.reports.paired import bootstrap_se, compare, lower_bound, reaches

SIZES = (66, 66, 72, 72, 66, 72)  # images per category of the shapes evaluation protocol
GROUPS = [c for c, n in enumerate(SIZES) for _ in range(n)]
SIGMA_SEED, SIGMA_IMAGE, SIGMA_ITEM = 0.02, 0.45, 0.15


def _overall(scores: np.ndarray) -> float:
    """GenEval's overall of one seed's images: the mean over categories of each one's mean."""
    return float(np.mean([scores[np.asarray(GROUPS) == c].mean() for c in range(len(SIZES))]))


def _arms(rng: np.random.Generator, seeds: int, true_diff: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-image scores [seeds, items] of two arms: a shared item difficulty, an arm-by-item effect
    fixed across seeds (the evaluation set's own error), a seed effect and image noise."""
    items = len(GROUPS)
    base = rng.normal(0.4, 0.2, size=items)
    arm = [base + rng.normal(0, SIGMA_ITEM, size=items) for _ in range(2)]
    a = arm[0] + true_diff + rng.normal(0, SIGMA_SEED, size=(seeds, 1)) + rng.normal(0, SIGMA_IMAGE, size=(seeds, items))
    b = arm[1] + rng.normal(0, SIGMA_SEED, size=(seeds, 1)) + rng.normal(0, SIGMA_IMAGE, size=(seeds, items))
    return a, b


def _true_se(seeds: int) -> float:
    """The standard deviation of the overall difference over repeated experiments of _arms."""
    w2 = sum(n * (1 / (len(SIZES) * n)) ** 2 for n in SIZES)  # sum of the squared item weights
    return float(np.sqrt(2 * SIGMA_SEED**2 / seeds + 2 * SIGMA_IMAGE**2 * w2 / seeds + 2 * SIGMA_ITEM**2 * w2))


def test_the_difference_is_the_difference_of_the_seeds_overall_scores():
    rng = np.random.default_rng(0)
    a, b = _arms(rng, 5, 0.03)
    r = compare(a, b, GROUPS)
    per_seed = [_overall(a[s]) - _overall(b[s]) for s in range(5)]
    assert r.diff == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert r.won == sum(d > 0 for d in per_seed) and r.seeds == 5


def test_the_standard_error_is_the_true_one_and_narrower_than_a_two_level_bootstrap():
    rng = np.random.default_rng(1)
    a, b = _arms(rng, 24, 0.0)
    r = compare(a, b, GROUPS)
    assert r.se == pytest.approx(_true_se(24), rel=0.15)
    assert r.se == pytest.approx(np.hypot(r.se_seeds, r.se_items))
    # the bootstrap resamples each seed's image noise with the items as well as with the seeds:
    # it counts that noise twice, so it lies above the true error by about that much
    boot = bootstrap_se(a, b, GROUPS, draws=1500, seed=2)
    w2 = sum(n * (1 / (len(SIZES) * n)) ** 2 for n in SIZES)
    twice = np.sqrt(_true_se(24) ** 2 + 2 * SIGMA_IMAGE**2 * w2 / 24)
    assert boot > r.se and boot == pytest.approx(twice, rel=0.15)


def test_without_the_image_noise_taken_out_the_items_term_would_count_it_twice():
    rng = np.random.default_rng(4)
    a, b = _arms(rng, 8, 0.0)
    r = compare(a, b, GROUPS)
    delta = a - b
    idx = np.asarray(GROUPS)
    w = 1 / (len(SIZES) * np.asarray(SIZES)[idx])
    naive = np.sqrt(sum(w[idx == c][0] ** 2 * (idx == c).sum() * delta[:, idx == c].mean(0).var(ddof=1)
                        for c in range(len(SIZES))))
    true_items = np.sqrt(2 * SIGMA_ITEM**2 * (w**2).sum())  # the arm-by-item effect alone
    assert r.se_items == pytest.approx(true_items, rel=0.3) and naive > 1.3 * true_items


def test_the_standard_error_covers_the_spread_of_repeated_experiments():
    rng = np.random.default_rng(3)
    runs = [compare(*_arms(rng, 4, 0.0), GROUPS) for _ in range(300)]
    spread = np.std([r.diff for r in runs], ddof=1)
    assert spread == pytest.approx(_true_se(4), rel=0.15)  # the simulation is what _true_se says
    assert np.mean([r.se for r in runs]) >= 0.9 * spread  # the estimate does not understate it


@pytest.mark.parametrize("seeds", [4, 8])
def test_no_true_difference_is_called_beyond_in_at_most_a_tenth_of_experiments(seeds):
    rng = np.random.default_rng(10 + seeds)
    calls = [compare(*_arms(rng, seeds, 0.0), GROUPS).beyond for _ in range(400)]
    assert np.mean(calls) <= 0.10, np.mean(calls)


def test_a_true_difference_of_three_standard_errors_is_found_in_most_experiments():
    rng = np.random.default_rng(20)
    seeds = 8
    diff = 3 * _true_se(seeds)
    found = [compare(*_arms(rng, seeds, diff), GROUPS).beyond for _ in range(300)]
    assert np.mean(found) > 0.5, np.mean(found)


def test_fewer_than_four_seeds_are_never_beyond():
    rng = np.random.default_rng(30)
    a, b = _arms(rng, 3, 0.5)  # a huge difference, but three seeds
    r = compare(a, b, GROUPS)
    assert r.p < 0.05 and not r.beyond


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"two equal \[seeds, items\] arrays"):
        compare(np.zeros((4, 10)), np.zeros((4, 9)))
    with pytest.raises(ValueError, match="9 groups for 10 items"):
        compare(np.zeros((4, 10)), np.zeros((4, 10)), groups=[0] * 9)


@pytest.mark.parametrize("seeds", [4, 8])
def test_an_arm_worse_by_the_margin_is_said_to_reach_in_at_most_a_tenth_of_experiments(seeds):
    rng = np.random.default_rng(40 + seeds)
    margin = 2 * _true_se(seeds)
    calls = [reaches(compare(*_arms(rng, seeds, -margin), GROUPS), margin) for _ in range(400)]
    assert np.mean(calls) <= 0.10, np.mean(calls)  # one-sided at 5%: the boundary case


def test_an_equal_arm_is_said_to_reach_when_the_margin_is_several_standard_errors():
    rng = np.random.default_rng(50)
    seeds = 8
    margin = 4 * _true_se(seeds)
    found = [reaches(compare(*_arms(rng, seeds, 0.0), GROUPS), margin) for _ in range(300)]
    assert np.mean(found) > 0.8, np.mean(found)
    # and one worse by twice the margin almost never
    worse = [reaches(compare(*_arms(rng, seeds, -2 * margin), GROUPS), margin) for _ in range(100)]
    assert np.mean(worse) < 0.02


def test_the_lower_bound_is_the_one_sided_t_bound_and_three_seeds_never_reach():
    rng = np.random.default_rng(60)
    r = compare(*_arms(rng, 5, 0.0), GROUPS)
    t = stats.t.ppf(0.95, df=r.df)
    assert lower_bound(r) == pytest.approx(r.diff - t * r.se)
    assert reaches(r, margin=-lower_bound(r) + 1e-9) and not reaches(r, margin=-lower_bound(r) - 1e-9)
    few = compare(*_arms(rng, 3, 0.5), GROUPS)  # far above, but three seeds
    assert lower_bound(few) > 0 and not reaches(few, margin=0.1)
    with pytest.raises(ValueError, match="margin is >= 0"):
        reaches(r, margin=-0.01)
