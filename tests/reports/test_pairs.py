"""Every pair of variants at the final iteration by the verdicts' paired test; the headline pair
per iteration."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from tempflow_core.reports import pairs, report


def _points(variant_scores: dict[int, dict[int, float]]) -> list[dict]:
    """seed -> {iteration: score} as curve points."""
    return [{"seed": s, "iteration": it, "nfe": 10 * it, "score": v}
            for s, by_it in variant_scores.items() for it, v in by_it.items()]


def test_paired_difference_is_the_mean_of_per_seed_differences_with_its_standard_error():
    a, b = {"0": 0.40, "1": 0.35, "2": 0.38}, {"0": 0.30, "1": 0.33, "2": 0.32, "3": 0.5}
    p = pairs.paired_difference(a, b)
    # differences 0.10, 0.02, 0.06 (seed 3 has no partner): mean 0.06, sample std 0.04, se 0.04 / sqrt 3
    assert p["diff"] == pytest.approx(0.06) and p["se"] == pytest.approx(0.04 / 3 ** 0.5)
    assert (p["won"], p["n"]) == (3, 3)
    one = pairs.paired_difference({"0": 0.4}, {"0": 0.5})
    assert one["se"] is None and one["won"] == 0 and one["diff"] == pytest.approx(-0.1)
    assert pairs.paired_difference({"0": 0.4}, {"1": 0.5}) is None


def test_all_pairs_are_later_minus_earlier_judged_by_the_verdicts_paired_test():
    ends = {"flow_grpo": [0.31, 0.33, 0.32, 0.30], "flow_grpo_fixed": [0.33, 0.32, 0.335, 0.288],
            "tempflow": [0.46, 0.44, 0.475, 0.418]}
    curves = {v: _points({s: {0: 0.3, 8: e} for s, e in enumerate(xs)}) for v, xs in ends.items()}
    h = report.headline(curves)
    rows = pairs.all_pairs(h["finals"])
    assert [(r["a"], r["b"]) for r in rows] == [("flow_grpo_fixed", "flow_grpo"), ("tempflow", "flow_grpo"),
                                                ("tempflow", "flow_grpo_fixed")]
    fixed, tempflow = rows[0], rows[2]
    # no evaluation error recorded: the test is a one-sample t-test of the per-seed differences
    d_fixed = np.subtract(ends["flow_grpo_fixed"], ends["flow_grpo"])
    d_temp = np.subtract(ends["tempflow"], ends["flow_grpo_fixed"])
    assert fixed["diff"] == pytest.approx(d_fixed.mean()) and fixed["p"] == pytest.approx(stats.ttest_1samp(d_fixed, 0).pvalue)
    assert fixed["clear"] is False and fixed["p"] > 0.5
    assert tempflow["p"] == pytest.approx(stats.ttest_1samp(d_temp, 0).pvalue) and tempflow["clear"] is True
    assert tempflow["won"] == 4 and tempflow["n"] == 4
    assert h["tempflow_above_fixed"]["clear"] is tempflow["clear"] and h["tempflow_above_fixed"]["p"] == tempflow["p"]
    md = pairs.all_pairs_markdown(rows)
    assert "### Every pair of variants at iteration 8" in md
    assert f"| tempflow - flow_grpo_fixed | +{d_temp.mean():.4f} | {tempflow['se']:.4f} | {tempflow['p']:.3f} | 4/4 | " \
           f"beyond the noise, p = {tempflow['p']:.3f} |" in md
    assert pairs.all_pairs_markdown([]) == ""
    # the same differences on three seeds give no verdict at all
    three = pairs.all_pairs(report.headline({v: [p for p in pts if p["seed"] < 3] for v, pts in curves.items()})["finals"])
    assert all(r["clear"] is None for r in three)
    assert "fewer than 4 seeds: no verdict" in pairs.all_pairs_markdown(three)


def test_per_iteration_uses_the_seeds_each_variant_reached():
    curves = {"tempflow": _points({0: {0: 0.3, 6: 0.40, 12: 0.42}, 1: {0: 0.3, 6: 0.36}}),
              "flow_grpo_fixed": _points({0: {0: 0.3, 6: 0.32, 12: 0.40}, 1: {0: 0.3, 6: 0.34, 12: 0.38}})}
    rows = pairs.per_iteration(curves, "tempflow", "flow_grpo_fixed")
    assert [r["iteration"] for r in rows] == [6, 12]  # the base (0) is left out
    six, twelve = rows
    # iteration 6: means 0.38 and 0.33, seed stds 0.0283 and 0.0141: se sqrt(0.0008/2 + 0.0002/2)
    assert six["diff"] == pytest.approx(0.05) and six["se"] == pytest.approx((0.0005) ** 0.5)
    assert six["paired"]["diff"] == pytest.approx(0.05) and six["paired"]["won"] == 2
    # iteration 12: tempflow seed 1 stopped; no spread on one seed, paired on seed 0 only
    assert twelve["a"]["n"] == 1 and twelve["se"] is None and twelve["paired"]["n"] == 1
    md = pairs.per_iteration_markdown(curves, "score")
    assert "| 6 | 0.380 ± 0.028 (2) | 0.330 ± 0.014 (2) | +0.0500 (0.0224) |" in md
    assert pairs.per_iteration_markdown({"tempflow": curves["tempflow"]}, "score") == ""
