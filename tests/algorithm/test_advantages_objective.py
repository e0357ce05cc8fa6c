"""Advantages and the clipped, weighted objective on hand-computed cases."""

import numpy as np
import pytest
import torch

from tempflow_core.algorithm.advantages import compute_advantages
from tempflow_core.algorithm.objective import grpo_terms


def test_group_std_advantages_by_hand():
    # group a: rewards 1, 3 -> mean 2, std 1 -> -1, +1; group b: 0, 0, 6 -> mean 2, std 2.828
    adv, st = compute_advantages(np.array([1.0, 3.0, 0.0, 0.0, 6.0]), ["a", "a", "b", "b", "b"])
    np.testing.assert_allclose(adv, [-1, 1, -2 / 8**0.5, -2 / 8**0.5, 4 / 8**0.5], rtol=1e-6)
    assert st.frac_zero_std_groups == 0.0


def test_global_std_uses_batch_std_with_group_means():
    r = np.array([1.0, 3.0, 10.0, 14.0])
    adv, _ = compute_advantages(r, ["a", "a", "b", "b"], std_mode="global")
    np.testing.assert_allclose(adv, [(1 - 2) / r.std(), (3 - 2) / r.std(), -2 / r.std(), 2 / r.std()], rtol=1e-6)


def test_zero_spread_groups_give_zero_not_nan_and_are_counted():
    adv, st = compute_advantages(np.array([0.5, 0.5, 0.5, 1.0, 2.0, 3.0]), ["a"] * 3 + ["b"] * 3)
    assert np.all(np.isfinite(adv)) and np.all(adv[:3] == 0)
    assert st.frac_zero_std_groups == 0.5
    adv, st = compute_advantages(np.zeros(4), ["a", "a", "b", "b"], std_mode="global")
    assert np.all(adv == 0) and st.frac_zero_std_groups == 1.0


def test_clipping_and_bad_rewards():
    adv, _ = compute_advantages(np.array([0.0] * 9 + [1.0]), ["a"] * 10, clip_max=2.0)
    assert adv.max() == 2.0  # (1 - 0.1) / 0.3 = 3 clipped to 2
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages(np.array([1.0, np.nan]), ["a", "a"])


def test_clipped_weighted_objective_by_hand():
    # ratios e^0.1 = 1.105 and e^-0.1 = 0.905, clip 0.05 -> clipped at 1.05 and 0.95
    lp = torch.tensor([0.1, -0.1, 0.1, -0.1])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    w = torch.tensor([2.0, 1.0, 1.0, 0.5])
    kl = torch.tensor([0.0, 1.0, 0.0, 2.0])
    t = grpo_terms(lp, old, adv, w, kl, clip_range=0.05, beta=0.1)
    e = torch.exp(torch.tensor([0.1, -0.1]))
    # A>0: max(-r, -clip(r)) -> -1.05 (r above band), -0.905 (r below band keeps r)
    # A<0: max(r, clip(r))   ->  1.105, 0.95
    expected_policy = torch.stack([torch.tensor(-1.05 * 2), -e[1], e[0], torch.tensor(0.95 * 0.5)])
    torch.testing.assert_close(t.policy, expected_policy)
    torch.testing.assert_close(t.loss, expected_policy + 0.1 * kl)
    assert t.clipped.tolist() == [True, True, True, True]
    torch.testing.assert_close(t.approx_kl, torch.full((4,), 0.005))
