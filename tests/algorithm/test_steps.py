"""Which steps branch and train (0..T-2 as in the reference code) and their noise-aware weights."""

import numpy as np
import pytest

from tempflow_core.config import ConfigError, RunConfig, load_config
from tempflow_core.algorithm.learner import build_units, trained_steps
from tempflow_core.prompts import PromptRecord
from tempflow_core.algorithm.schedule import make_schedule
from tempflow_core.algorithm.steps import noise_aware_weights, select_steps, step_pool
from tempflow_core.algorithm.session import setup
from tempflow_core.algorithm.iteration import plan_iteration
from tempflow_core.algorithm.train import run_rollout


def _grid(T: int, shift: float = 3.0, n: int = 1000) -> np.ndarray:
    """The SD3 grid written out by hand: linspace from 1 to the shifted 1/n, shifted, then 0."""
    sh = lambda x: shift * x / (1 + (shift - 1) * x)  # noqa: E731
    return np.append(sh(np.linspace(1.0, sh(1.0 / n), T)), 0.0)


def _noise(T: int, a: float = 0.7) -> np.ndarray:
    """[T] s_k sqrt(|dt_k|) with sigmas[1] standing in for t = 1 in the denominator."""
    sig = _grid(T)
    t = sig[:-1]
    s = a * np.sqrt(t / (1 - np.where(t >= 1, sig[1], t)))
    return s * np.sqrt(np.abs(np.diff(sig)))


def test_all_means_every_step_but_the_last():
    assert step_pool("all", 10) == list(range(9))
    assert select_steps("all", 10, 0, 3) == list(range(9))
    assert step_pool([9, 2], 10) == [2, 9]  # the last step only when named
    a = select_steps(2, 10, 0, 0)
    assert len(a) == 2 and a == select_steps(2, 10, 0, 0) and max(a) <= 8
    draws = {tuple(select_steps(2, 10, 0, it)) for it in range(30)}
    assert len(draws) > 5  # a fresh draw per iteration
    assert all(max(d) <= 8 for d in draws)
    assert {k for d in draws for k in d} == set(range(9))  # every trainable step gets drawn


def test_authors_constant_is_mean_one_over_the_branched_steps():
    """2.25 = 1 / mean(s_k sqrt(dt_k)) over steps 0..8 at T = 10 (within 1%); over 0..9 it is not."""
    s = make_schedule(10)
    np.testing.assert_allclose(s.step_std().numpy(), _noise(10), rtol=1e-6)
    assert abs(2.25 * _noise(10)[:9].mean() - 1) < 0.01
    assert abs(2.25 * _noise(10).mean() - 1) > 0.05
    mean1 = noise_aware_weights(s, step_pool("all", 10))
    const = noise_aware_weights(s, step_pool("all", 10), "constant", 2.25)
    assert list(mean1) == list(range(9))
    np.testing.assert_allclose(list(mean1.values()), _noise(10)[:9] / _noise(10)[:9].mean(), rtol=1e-6)
    np.testing.assert_allclose(list(const.values()), list(mean1.values()), rtol=0.01)


def test_a_steps_weight_does_not_depend_on_the_other_drawn_steps():
    cfg = RunConfig(algorithm="tempflow", sampling={"num_steps": 6}, rollout={"branch_steps": 2})
    s = make_schedule(6)
    plan = plan_iteration(cfg, s, 0)
    w_a, w_b = plan.weights_of([0, 4]), plan.weights_of([3, 4])
    assert w_a[4] == w_b[4]
    expected = _noise(6)[:5] / _noise(6)[:5].mean()  # normalised over the trainable set 0..4
    np.testing.assert_allclose([w_a[0], w_a[4], w_b[3]], expected[[0, 4, 3]], rtol=1e-6)
    # plain rollouts: reweight weighs the trained steps, flow_grpo_fixed does not
    rw = plan_iteration(RunConfig(algorithm="reweight", sampling={"num_steps": 6}), s, 0).weights_of(list(range(5)))
    np.testing.assert_allclose(list(rw.values()), expected, rtol=1e-6)
    fixed = plan_iteration(RunConfig(algorithm="flow_grpo_fixed", sampling={"num_steps": 6}), s, 0).weights_of(
        list(range(5)))
    assert set(fixed.values()) == {1.0}


def test_the_last_step_is_refused_as_a_count_and_needs_two_steps():
    with pytest.raises(ConfigError, match="branch_steps"):
        load_config(None, ["sampling.num_steps=6", "rollout.branch_steps=6"])
    with pytest.raises(ConfigError, match="sampling.num_steps"):
        load_config(None, ["sampling.num_steps=1"])
    cfg = load_config(None, ["sampling.num_steps=1", "rollout.branch_steps=[0]", "train.train_steps=[0]"])
    assert cfg.rollout.branch_steps == [0]


@pytest.mark.parametrize("algorithm", ["tempflow", "reweight"])
def test_a_batch_at_T10_trains_B_times_T_minus_1_actions(tiny_pipe, algorithm):
    T, B, K = 10, 2, 2
    cfg = RunConfig(algorithm=algorithm, sampling={"num_steps": T, "guidance_scale": 1.0},
                    rollout={"prompts_per_iter": B, "group_size": K}, lora={"rank": 2, "alpha": 2})
    sess = setup(cfg, pipe=tiny_pipe)
    records = [PromptRecord(id=f"p{i}", text=t) for i, t in enumerate(["a red circle", "a blue square"])]
    batch = run_rollout(sess, records, plan_iteration(cfg, sess.schedule, 0))
    steps = trained_steps(batch, cfg.train.train_steps)
    assert steps == list(range(T - 1))
    adv = np.zeros(len(batch.sample_keys()), dtype=np.float32)
    units = build_units(batch, adv, plan_iteration(cfg, sess.schedule, 0).weights_of(steps), steps)
    if algorithm == "tempflow":  # one unit per branch point: B * (T - 1)
        assert len(batch.branch_points) == B * (T - 1) and len(units) == B * (T - 1)
    else:  # one unit per trained step of each of the B * K trajectories
        assert len(units) == B * K * (T - 1)
    assert int(units.step.max()) == T - 2
    np.testing.assert_allclose(float(units.weight.mean()), 1.0, rtol=1e-6)
