"""Where to branch: m of the N trainable steps per iteration, drawn uniformly, by noise with an
importance correction, or as a sliding window; the correction checked by Monte Carlo."""

import numpy as np
import pytest
import torch

from tempflow_core.algorithm.learner import build_units, evaluate_units
from tempflow_core.algorithm.objective import grpo_terms
from tempflow_core.algorithm.schedule import make_schedule
from tempflow_core.algorithm.steps import draw_counts, importance, noise_aware_weights, select_steps, step_pool
from tempflow_core.algorithm.iteration import plan_iteration
from tempflow_core.config import ConfigError, LoraSettings, RunConfig, load_config
from tempflow_core.seeding import derive_seed

T = 10
POOL = step_pool("all", T)


def _noise() -> dict[int, float]:
    return noise_aware_weights(make_schedule(T), POOL)


def _estimates(draw: str, m: int, f: np.ndarray, iterations: int, corrected: bool = True) -> np.ndarray:
    """Per iteration: the learner's mean over the drawn steps of I_k f_k [iterations, D]."""
    noise = _noise()
    out = []
    for it in range(iterations):
        counts = draw_counts(m, T, 0, it, draw, noise)
        imp = importance(counts, noise, draw) if corrected else {k: 1.0 for k in counts}
        out.append(np.mean([imp[k] * f[k] for k in counts], axis=0))
    return np.array(out)


@pytest.mark.parametrize("draw, m", [("weighted", 3), ("weighted", 1), ("uniform", 3)])
def test_the_expected_gradient_equals_weighting_every_step(draw, m):
    """f_k stands for step k's gradient (5 coordinates, noise-aware weight included): the loss is a
    mean over units of per-step terms, so an unbiased mean of f_k is an unbiased gradient."""
    rng = np.random.default_rng(1)
    w = np.array(list(_noise().values()))
    f = rng.normal(size=(len(POOL), 5)) * 3 + 5 * w[:, None] ** 2  # large where the noise is: the draw matters
    full = f.mean(0)  # training every step: the mean over the N steps
    est = _estimates(draw, m, f, 20000)
    se = est.std(0) / np.sqrt(len(est))
    assert np.all(np.abs(est.mean(0) - full) < 4 * se), (est.mean(0), full, se)
    if draw == "weighted":  # without the correction the same draws are biased towards the noisy steps
        raw = _estimates(draw, m, f, 20000, corrected=False)
        assert np.any(np.abs(raw.mean(0) - full) > 10 * raw.std(0) / np.sqrt(len(raw)))


def test_weighted_draws_follow_the_noise_and_are_reproducible():
    noise = _noise()
    seen = np.zeros(len(POOL))
    for it in range(4000):
        for k, n in draw_counts(2, T, 5, it, "weighted", noise).items():
            seen[k] += n
    p = np.array(list(noise.values())) / sum(noise.values())
    np.testing.assert_allclose(seen / seen.sum(), p, atol=0.015)
    assert draw_counts(2, T, 5, 7, "weighted", noise) == draw_counts(2, T, 5, 7, "weighted", noise)
    # the importance by hand: one step drawn twice of m = 2 -> d = 1, I = 1 * 2 / (N * 2 * p_k)
    counts = {3: 2}
    assert importance(counts, noise, "weighted")[3] == pytest.approx(1 / (len(POOL) * p[3]))
    with pytest.raises(ValueError, match="noise"):
        draw_counts(2, T, 5, 7, "weighted")


def test_uniform_draws_are_the_old_draws_and_the_window_slides():
    for it in range(20):  # the uniform draw is the one configs had before draws could be chosen
        g = torch.Generator().manual_seed(derive_seed(0, "branch-steps", it))
        assert select_steps(3, T, 0, it) == sorted(torch.randperm(9, generator=g)[:3].tolist())
    windows = [select_steps(3, T, 0, it, "window") for it in range(9)]
    assert windows[:7] == [[i, i + 1, i + 2] for i in range(7)] and windows[7] == [0, 1, 2]
    assert importance({0: 1, 1: 1}, _noise(), "window") == {0: 1.0, 1: 1.0}


def test_the_learner_scales_policy_and_kl_terms_by_the_importance(tiny_pipe):
    from tempflow_core.algorithm.rollout import branched_rollout
    from tempflow_core.policies.sd3 import SD3Policy

    cfg = RunConfig(algorithm="tempflow", sampling={"num_steps": T},
                    rollout={"branch_steps": 3, "branch_draw": "weighted", "group_size": 2})
    s = make_schedule(T)
    plan = plan_iteration(cfg, s, 4)
    counts, steps = plan.counts, list(plan.steps)
    imp = plan.importance_of(steps)
    assert imp == importance(counts, noise_aware_weights(s, POOL), "weighted")
    torch.manual_seed(0)
    policy = SD3Policy(tiny_pipe, LoraSettings(rank=4, alpha=8), "cpu")
    batch = branched_rollout(policy, ["a red circle"], ["p0"], s, steps, 2, 4.5, seed=1)
    adv = np.linspace(-1, 1, len(batch.sample_keys()))
    w = plan.weights_of(steps)
    plain = build_units(batch, adv, w, steps)
    units = build_units(batch, adv, w, steps, imp)
    want = torch.tensor([w[k] * imp[k] for k in units.step.tolist()])
    torch.testing.assert_close(units.weight, want)
    torch.testing.assert_close(units.kl_weight, torch.tensor([imp[k] for k in units.step.tolist()]))
    with torch.no_grad():  # away from the reference, so that the KL term is not 0
        for i, (n, prm) in enumerate(policy.transformer.named_parameters()):
            if "lora_B" in n:
                prm.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    loss_cfg = cfg.loss.model_copy(update={"beta": 0.5})
    a = evaluate_units(policy, plain, batch.embeds, s, 4.5, loss_cfg)
    b = evaluate_units(policy, units, batch.embeds, s, 4.5, loss_cfg)
    scale = torch.tensor([imp[k] for k in units.step.tolist()]).repeat_interleave(2)
    torch.testing.assert_close(b.loss.detach(), (a.loss * scale).detach(), rtol=1e-5, atol=1e-7)
    assert (a.kl > 0).all()  # the KL term was there to be scaled
    with pytest.raises(ValueError, match="another config"):
        plan.importance_of([k for k in POOL if k not in steps][:len(steps)])


def test_kl_weights_in_the_objective_by_hand():
    one = torch.ones(3)
    t = grpo_terms(torch.zeros(3), torch.zeros(3), torch.tensor([1.0, -1, 2]), torch.tensor([2.0, 1, 1]),
                   torch.tensor([0.5, 1.0, 2.0]), 0.1, 0.5, kl_weights=torch.tensor([2.0, 1, 0]))
    # policy = -A * 1 * w; loss = policy + 0.5 * kl * I
    torch.testing.assert_close(t.loss, torch.tensor([-2.0 + 0.5, 1 + 0.5, -2 + 0.0]))
    torch.testing.assert_close(grpo_terms(torch.zeros(3), torch.zeros(3), one, one, one, 0.1, 0.5).loss, -one + 0.5)


@pytest.mark.parametrize("override, match", [
    (["rollout.branch_draw=weighted"], r"rollout\.branch_draw='weighted' draws m steps.*set branch_steps to a count"),
    (["rollout.branch_draw=sometimes", "rollout.branch_steps=2"], r"rollout\.branch_draw"),
])
def test_a_draw_without_a_count_is_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, override)
    assert RunConfig(rollout={"branch_steps": 2, "branch_draw": "uniform"}).digest() == \
        RunConfig(rollout={"branch_steps": 2}).digest()
