"""The learner: shared-x_k evaluation equals per-child evaluation; LoRA and reference behaviour."""

import numpy as np
import pytest
import torch

from tempflow_core.config import LoraSettings, LossConfig, TrainConfig
from tempflow_core.algorithm.learner import build_units, evaluate_units, make_optimizer, update
from tempflow_core.policies.sd3 import SD3Policy
from tempflow_core.algorithm.rollout import branched_rollout, plain_rollout
from tempflow_core.algorithm.schedule import make_schedule

PROMPTS, IDS = ["a red circle", "two blue squares"], ["p0", "p1"]


@pytest.fixture
def policy(tiny_pipe):
    torch.manual_seed(0)  # the gaussian LoRA init draws from the global RNG: the same A in every process
    pol = SD3Policy(tiny_pipe, LoraSettings(rank=4, alpha=8), "cpu")
    with torch.no_grad():  # move off the zero-init LoRA so that gradients reach A and B
        for i, (n, p) in enumerate(pol.transformer.named_parameters()):
            if "lora_B" in n:  # a seed per parameter that is the same in every process
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(i))
    return pol


def _units(policy, s, K=4):
    b = branched_rollout(policy, PROMPTS, IDS, s, [0, 2, 3], K, 4.5, seed=2)
    adv = np.random.default_rng(0).normal(size=len(b.sample_keys())).astype(np.float32)
    w = dict(zip([0, 2, 3], s.step_weights([0, 2, 3]).tolist()))
    return b, build_units(b, adv, w)


def test_shared_x_k_matches_per_child_loss_and_gradients(policy):
    s = make_schedule(5)
    b, units = _units(policy, s)
    loss_cfg = LossConfig(beta=0.01, clip_range=1e-4)
    params = policy.lora_parameters()
    # perturb so that ratios differ from 1 and the KL is non-zero
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    grads = []
    for shared in (True, False):
        for p in params:
            p.grad = None
        calls = policy.forward_calls
        terms = evaluate_units(policy, units, b.embeds, s, 4.5, loss_cfg, shared=shared)
        terms.loss.mean().backward()
        grads.append((terms.loss.detach().clone(), [p.grad.clone() for p in params], policy.forward_calls - calls))
    (l1, g1, c1), (l2, g2, c2) = grads
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    num = sum(((a - b) ** 2).sum() for a, b in zip(g1, g2)) ** 0.5
    den = sum((a**2).sum() for a in g1) ** 0.5
    assert den > 0 and num / den < 1e-5
    assert len(units) == 6 and units.children == 4
    assert not torch.allclose(terms.ratio, torch.ones_like(terms.ratio))
    assert c1 == c2 == 2  # one policy call and one reference call per batch


def test_kl_forms_are_the_exact_gaussian_kl_and_flow_grpos(policy):
    """loss.kl_form=exact is the KL of the two Gaussian transitions, |mean gap|^2 / (2 s^2 |dt|)
    averaged over elements; flow_grpo divides by 2 s^2 only (Flow-GRPO's code), computed here
    from the policy's and the reference's velocities directly."""
    from tempflow_core.algorithm.sde import sde_mean_std

    s = make_schedule(5)
    b, units = _units(policy, s, K=3)
    with torch.no_grad():
        for p in policy.lora_parameters():
            p.add_(0.05 * torch.randn_like(p))
    kls = {}
    for form in ("exact", "flow_grpo"):
        with torch.no_grad():
            terms = evaluate_units(policy, units, b.embeds, s, 4.5, LossConfig(beta=0.01, kl_form=form))
        kls[form] = terms.kl.reshape(len(units), units.children)[:, 0]  # one KL per unit, repeated over children
    sig, sde = s.sigmas.float(), s.sde_sigma().float()
    t, tn, sk = sig[units.step], sig[units.step + 1], sde[units.step]
    emb, r = b.embeds, units.prompt_index
    with torch.no_grad():
        v = policy.velocity(units.x, t, emb.select(r), 4.5)
        with policy.reference():
            v_ref = policy.velocity(units.x, t, emb.select(r), 4.5)
    gap2 = ((sde_mean_std(units.x, v, t, tn, sk)[0] - sde_mean_std(units.x, v_ref, t, tn, sk)[0]) ** 2).flatten(1).mean(1)
    dt = (t - tn).abs()
    torch.testing.assert_close(kls["exact"], gap2 / (2 * sk**2 * dt), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(kls["flow_grpo"], gap2 / (2 * sk**2), rtol=1e-4, atol=1e-9)
    assert (kls["exact"] > kls["flow_grpo"]).all()  # |dt| < 1: the exact KL is the stronger penalty


def test_update_changes_policy_but_not_reference(policy):
    s = make_schedule(4)
    b, units = _units(policy, s, K=3)
    x = units.x[:2]
    r = units.prompt_index[:2]
    t = s.sigmas[units.step[:2]].float()
    emb = b.embeds

    def predict(ref: bool):
        with torch.no_grad():
            if ref:
                with policy.reference():
                    return policy.velocity(x, t, emb.select(r), 4.5)
            return policy.velocity(x, t, emb.select(r), 4.5)

    ref0, pol0 = predict(True), predict(False)
    opt = make_optimizer(policy, TrainConfig(lr=1e-2))
    stats = update(policy, opt, units, emb, s, 4.5, TrainConfig(lr=1e-2, minibatches=2, micro_batch=2),
                   LossConfig(beta=0.01), torch.Generator().manual_seed(0))
    ref1, pol1 = predict(True), predict(False)
    assert torch.equal(ref0, ref1)  # the adapter-disabled base model never moves
    assert (pol1 - pol0).abs().max() > 1e-4
    assert stats["optimizer_steps"] == 2
    assert np.isfinite(stats["loss"]) and stats["grad_norm"] > 0


def test_plain_units_one_per_trajectory_step(policy):
    s = make_schedule(4)
    b = plain_rollout(policy, PROMPTS, IDS, s, 3, 4.5, seed=0)
    adv = np.arange(6, dtype=np.float32)
    u = build_units(b, adv, {k: 1.0 for k in range(4)}, [1, 3])
    assert len(u) == 6 * 2 and u.children == 1
    torch.testing.assert_close(u.x[1], b.trajectories[0].states[3])
    torch.testing.assert_close(u.x_next[1, 0], b.trajectories[0].states[4])
    assert u.advantages[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


@pytest.mark.parametrize("sde_type", ["flow_grpo", "cps"])
def test_at_the_rollouts_weights_the_learner_reads_the_rollouts_log_probs_back(policy, sde_type):
    """No log-prob is computed twice: the learner takes the rollout's as the old ones, and at the
    weights that sampled them (the first minibatch) its own, from other batches (micro-batches
    of 2 units against the rollout's one call), give a ratio of 1 to float precision, far inside
    the clip range, so nothing is clipped there; under either stochastic step."""
    from dataclasses import replace

    s = replace(make_schedule(5), sde_type=sde_type)
    b, units = _units(policy, s)
    loss_cfg = LossConfig(beta=0.0, clip_range=1e-4)
    ratios = []
    with torch.no_grad():
        for i in range(0, len(units), 2):
            terms = evaluate_units(policy, units.subset(torch.arange(i, min(i + 2, len(units)))), b.embeds, s, 4.5,
                                   loss_cfg)
            ratios.append(terms.ratio)
            assert not terms.clipped.any()
    r = torch.cat(ratios)
    assert r.numel() == 6 * 4 and (r - 1).abs().max() < 1e-5
