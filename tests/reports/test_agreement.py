"""Agreement of cheap and full children's rewards, against independent computations."""

import numpy as np
import pytest
from scipy import stats

from tempflow_core.reports.agreement import agreement, ranks, spearman


def test_ranks_and_spearman_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = rng.integers(0, 4, 8).astype(float)  # ties, as binary-ish shapes scores have
        b = a + rng.normal(0, 1.0, 8)
        np.testing.assert_allclose(ranks(a), stats.rankdata(a))
        rho = spearman(a, b)
        if np.ptp(a) == 0:
            assert rho is None
        else:
            assert rho == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert spearman(np.ones(4), np.arange(4.0)) is None


def test_identical_rewards_agree_fully_and_reversed_ones_not_at_all():
    full = np.array([0.0, 1, 0.5, 0.5, 1, 1, 1, 1, 0.2, 0.9, 0.4, 0.1])
    ids = ["a"] * 4 + ["b"] * 4 + ["c"] * 4  # b has no spread
    same = agreement(full, full.copy(), ids)
    assert (same.spearman, same.sign_agreement, same.adv_cosine) == (pytest.approx(1.0),) * 3
    assert same.ranked_groups == 2 and same.groups == 3 and same.zero_std_full == pytest.approx(1 / 3)
    rev = agreement(full, -full, ids)
    assert rev.spearman == pytest.approx(-1.0) and rev.sign_agreement == 0.0 and rev.adv_cosine == pytest.approx(-1.0)


def test_cosine_and_sign_agreement_by_hand():
    full = np.array([0.0, 1.0, 0.0, 1.0])  # one group: advantages -1, 1, -1, 1
    cheap = np.array([0.0, 1.0, 1.0, 1.0])  # mean 0.75, std sqrt(3)/4: -sqrt(3), 1/sqrt(3) (x3)
    a = agreement(full, cheap, ["g"] * 4)
    a_full = np.array([-1, 1, -1, 1.0])
    a_cheap = np.array([-3, 1, 1, 1.0]) / np.sqrt(3)
    assert a.adv_cosine == pytest.approx(a_full @ a_cheap / (2 * 2), rel=1e-6)
    assert a.sign_agreement == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="group ids"):
        agreement(full, cheap[:3], ["g"] * 4)
