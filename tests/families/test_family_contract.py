"""The contract every registered model family passes (tempflow_core/families.py: FAMILIES).

A family is one `FamilySpec` plus this suite: each test runs on every family's tiny model, saved
with save_pretrained and loaded back as users load theirs. What a family must do:

  * a branched rollout stores the log-probs its policy gives, so the learner's ratio at unchanged
    weights is 1, and every adapter it trains gets a gradient (but those on the text stream of a
    last block whose text output the model discards: SD3's and Qwen-Image's);
  * plain rollouts are drawn from their seeds: the same seed gives the same states, bit for bit;
  * an update moves the policy and never the reference (the adapter disabled);
  * its LoRA, saved by the policy, loads into the family's plain diffusers pipeline with
    `load_lora_weights` and moves that pipeline's velocity exactly as it moved the policy's.

Family-specific checks (each policy against its diffusers pipeline's own sampling, encoding and
export) are in tests/flux, tests/qwen_image, tests/wan and tests/policies.
"""

import numpy as np
import pytest
import torch

from tempflow_core.algorithm.learner import build_units, evaluate_units, make_optimizer, update
from tempflow_core.algorithm.rollout import branched_rollout, plain_rollout
from tempflow_core.algorithm.sde import sde_log_prob
from tempflow_core.config import LoraSettings, LossConfig, TrainConfig
from tempflow_core.families import FAMILIES
from tempflow_core.policies.models import load_pipeline
from tempflow_core.families import make_policy

FOLDERS = {"sd3": "tiny_model_dir", "flux": "tiny_flux_dir", "qwen-image": "tiny_qwen_dir", "wan": "tiny_wan_dir"}
PROMPTS, IDS = ["a red circle", "two blue squares left of a green star"], ["p0", "p1"]
# adapters whose output the model never uses: the last block's text stream is discarded (SD3's
# context_pre_only block, Qwen-Image's last block), so its text query (and Qwen-Image's text
# output projection) gets no gradient, in one process or in many
UNUSED = {"sd3": {"transformer_blocks.1.attn.add_q_proj"},
          "qwen-image": {"transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.to_add_out"}}


def test_every_registered_family_is_in_the_suite():
    assert sorted(FOLDERS) == sorted(s.name for s in FAMILIES)


@pytest.fixture(params=[s.name for s in FAMILIES])
def family(request):
    """(name, saved tiny folder, guidance) of each registered family."""
    name = request.param
    spec = next(s for s in FAMILIES if s.name == name)
    return name, request.getfixturevalue(FOLDERS[name]), spec.defaults.guidance_scale


def _policy(folder, lora=True):
    torch.manual_seed(0)  # the gaussian LoRA init draws from the global RNG
    pol = make_policy(load_pipeline(folder), LoraSettings(rank=4, alpha=8) if lora else None, "cpu")
    if lora:
        with torch.no_grad():  # off the zero-init B, so that gradients reach A too
            for i, (n, p) in enumerate(pol.transformer.named_parameters()):
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(i))
    return pol


def test_stored_log_probs_are_the_policys_the_ratio_is_one_and_every_used_adapter_learns(family):
    name, folder, g = family
    pol = _policy(folder)
    assert pol.family == name
    s = pol.schedule(4)
    b = branched_rollout(pol, PROMPTS, IDS, s, [0, 1, 2], 3, g, seed=5, max_batch=4)
    assert len(b.branch_points) == 6 and b.branch_points[0].x_next.shape == (3, *pol.latent_shape())
    sig, ss = s.sigmas, s.sde_sigma()
    for bp in b.branch_points:
        r = torch.tensor([bp.prompt_index])
        with torch.no_grad():
            v = pol.velocity(bp.x_k[None], torch.tensor(bp.t), b.embeds.select(r), g)
        lp, _, _ = sde_log_prob(bp.x_next, bp.x_k[None].expand_as(bp.x_next), v.expand_as(bp.x_next),
                                float(sig[bp.step]), float(sig[bp.step + 1]), float(ss[bp.step]))
        torch.testing.assert_close(lp, bp.log_prob, rtol=1e-4, atol=1e-4)
    adv = np.random.default_rng(0).normal(size=len(b.sample_keys())).astype(np.float32)
    units = build_units(b, adv, dict(zip([0, 1, 2], s.step_weights([0, 1, 2]).tolist())))
    terms = evaluate_units(pol, units, b.embeds, s, g, LossConfig(beta=0.01))
    torch.testing.assert_close(terms.ratio, torch.ones_like(terms.ratio), rtol=1e-4, atol=1e-4)
    terms.loss.mean().backward()
    without = {n.split(".lora_")[0] for n, p in pol.transformer.named_parameters()
               if "lora_" in n and (p.grad is None or not p.grad.abs().sum() > 0)}
    assert without == UNUSED.get(name, set())


def test_plain_rollouts_are_drawn_from_their_seeds(family):
    _, folder, g = family
    pol = _policy(folder, lora=False)
    s = pol.schedule(3)
    a = plain_rollout(pol, PROMPTS, IDS, s, 2, g, seed=1, decode=False)
    b = plain_rollout(pol, PROMPTS, IDS, s, 2, g, seed=1, decode=False)
    c = plain_rollout(pol, PROMPTS, IDS, s, 2, g, seed=2, decode=False)
    assert a.trajectories[0].states.shape == (4, *pol.latent_shape())
    assert all(torch.equal(x.states, y.states) and torch.equal(x.log_probs, y.log_probs)
               for x, y in zip(a.trajectories, b.trajectories))
    assert not torch.equal(a.trajectories[0].states, c.trajectories[0].states)
    assert all(torch.isfinite(t.log_probs).all() for t in a.trajectories)


def test_an_update_moves_the_policy_and_never_the_reference(family):
    _, folder, g = family
    pol = _policy(folder)
    s = pol.schedule(4)
    b = branched_rollout(pol, PROMPTS, IDS, s, [0, 2], 2, g, seed=3, decode=False)
    adv = np.random.default_rng(1).normal(size=len(b.sample_keys())).astype(np.float32)
    units = build_units(b, adv, dict(zip([0, 2], s.step_weights([0, 2]).tolist())))
    x, r, t = units.x[:2], units.prompt_index[:2], s.sigmas[units.step[:2]].float()

    def predict(ref: bool) -> torch.Tensor:
        with torch.no_grad():
            if ref:
                with pol.reference():
                    return pol.velocity(x, t, b.embeds.select(r), g)
            return pol.velocity(x, t, b.embeds.select(r), g)

    ref0, pol0 = predict(True), predict(False)
    tc = TrainConfig(lr=1e-2, minibatches=1, micro_batch=2)
    stats = update(pol, make_optimizer(pol, tc), units, b.embeds, s, g, tc, LossConfig(beta=0.01),
                   torch.Generator().manual_seed(0))
    assert stats["optimizer_steps"] == 1 and np.isfinite(stats["loss"])
    assert torch.equal(ref0, predict(True)) and (predict(False) - pol0).abs().max() > 1e-5


def test_the_lora_loads_into_the_plain_pipeline_and_moves_it_as_it_moved_the_policy(family, tmp_path):
    _, folder, g = family
    pol = _policy(folder)
    x = torch.randn(2, *pol.latent_shape(), generator=torch.Generator().manual_seed(1))
    t, emb = torch.tensor([0.7, 0.3]), pol.encode_prompts(PROMPTS)
    with torch.no_grad():
        v_pol = pol.velocity(x, t, emb, g)
        with pol.reference():
            v_ref = pol.velocity(x, t, emb, g)
    assert (v_pol - v_ref).abs().max() > 1e-5
    path = pol.save_lora(tmp_path / "lora")
    plain = load_pipeline(folder)
    plain.load_lora_weights(str(path.parent))  # the family's own diffusers loader, nothing of ours
    with torch.no_grad():
        v_plain = make_policy(plain, None, "cpu").velocity(x, t, emb, g)
    torch.testing.assert_close(v_plain, v_pol, rtol=1e-4, atol=1e-5)
