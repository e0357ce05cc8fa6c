"""Rollouts, the learner, evaluation, export and a short training run on the tiny FLUX model:
the checks of tests/algorithm/test_rollout.py and test_learner.py, for the FLUX policy."""

import json

import numpy as np
import pytest
import torch

from tempflow_core.config import LoraSettings, LossConfig, TrainConfig, load_config
from tempflow_core.policies.flux import FluxPolicy
from tempflow_core.algorithm.learner import build_units, evaluate_units, make_optimizer, update
from tempflow_core.algorithm.rollout import branched_rollout, branched_rollout_loop, plain_rollout
from tempflow_core.algorithm.sde import sde_log_prob

PROMPTS, IDS = ["a red circle", "two blue squares", "a green triangle"], ["p0", "p1", "p2"]
G = 3.5  # FLUX.1-dev's guidance value


@pytest.fixture
def policy(flux_pipe):
    torch.manual_seed(0)  # the gaussian LoRA init draws from the global RNG
    pol = FluxPolicy(flux_pipe, LoraSettings(rank=4, alpha=8), "cpu")
    with torch.no_grad():  # move off the zero-init LoRA so that gradients reach A and B
        for i, (n, p) in enumerate(pol.transformer.named_parameters()):
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(i))
    return pol


def test_branched_rollout_floor_nfe_and_one_call_per_wavefront_step(policy):
    T, K = 5, 3
    s = policy.schedule(T)
    b = branched_rollout(policy, PROMPTS, IDS, s, list(range(T)), K, G, seed=7)
    assert len(b.branch_points) == len(PROMPTS) * T
    assert b.nfe == len(PROMPTS) * (T + K * T * (T - 1) // 2)
    assert b.forward_calls == T  # one unchunked call per step: no CFG pair
    for bp in b.branch_points:
        assert bp.x_next.shape == (K, 4, 8, 8) and bp.images.shape == (K, 32, 32, 3)
        assert not torch.equal(bp.x_next[0], bp.x_next[1]) and len(set(bp.seeds.tolist())) == K


def test_wavefront_equals_loop_and_stored_log_probs_are_the_policys(policy):
    T, K = 5, 3
    s = policy.schedule(T)
    wave = branched_rollout(policy, PROMPTS[:2], IDS[:2], s, [0, 2, 4], K, G, seed=3, max_batch=5)
    loop = branched_rollout_loop(policy, PROMPTS[:2], IDS[:2], s, [0, 2, 4], K, G, seed=3)
    key = lambda g: (g.step, g.prompt_index)  # noqa: E731
    for w, l in zip(sorted(wave.branch_points, key=key), loop.branch_points):
        assert key(w) == key(l) and torch.equal(w.seeds, l.seeds)
        torch.testing.assert_close(w.x_next, l.x_next, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w.final_latents, l.final_latents, rtol=1e-4, atol=1e-4)
    sig, ss = s.sigmas, s.sde_sigma()
    emb = wave.embeds
    for bp in wave.branch_points:
        r = torch.tensor([bp.prompt_index])
        with torch.no_grad():
            v = policy.velocity(bp.x_k[None], torch.tensor(bp.t), emb.select(r), G)
        lp, _, _ = sde_log_prob(bp.x_next, bp.x_k[None].expand_as(bp.x_next), v.expand_as(bp.x_next),
                                float(sig[bp.step]), float(sig[bp.step + 1]), float(ss[bp.step]))
        torch.testing.assert_close(lp, bp.log_prob, rtol=1e-4, atol=1e-4)


def test_plain_rollout_trajectories(policy):
    s = policy.schedule(4)
    b = plain_rollout(policy, PROMPTS[:2], IDS[:2], s, 3, G, seed=1)
    assert len(b.trajectories) == 6 and b.nfe == 6 * 4 and b.forward_calls == 4
    tr = b.trajectories[0]
    assert tr.states.shape == (5, 4, 8, 8) and np.isfinite(tr.log_probs.numpy()).all()
    again = plain_rollout(policy, PROMPTS[:2], IDS[:2], s, 3, G, seed=1)
    assert torch.equal(again.trajectories[4].states, b.trajectories[4].states)


def test_shared_x_k_learner_equals_per_child_and_update_moves_only_the_policy(policy):
    s = policy.schedule(5)
    b = branched_rollout(policy, PROMPTS[:2], IDS[:2], s, [0, 2, 3], 4, G, seed=2)
    adv = np.random.default_rng(0).normal(size=len(b.sample_keys())).astype(np.float32)
    units = build_units(b, adv, dict(zip([0, 2, 3], s.step_weights([0, 2, 3]).tolist())))
    params = policy.lora_parameters()
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    out = []
    for shared in (True, False):
        for p in params:
            p.grad = None
        calls = policy.forward_calls
        terms = evaluate_units(policy, units, b.embeds, s, G, LossConfig(beta=0.01), shared=shared)
        terms.loss.mean().backward()
        out.append((terms.loss.detach().clone(), [p.grad.clone() for p in params], policy.forward_calls - calls))
    (l1, g1, c1), (l2, g2, c2) = out
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    num = sum(((a - b) ** 2).sum() for a, b in zip(g1, g2)) ** 0.5
    den = sum((a**2).sum() for a in g1) ** 0.5
    assert den > 0 and num / den < 1e-5
    assert c1 == c2 == 2  # one policy call and one reference call
    assert not torch.allclose(terms.ratio, torch.ones_like(terms.ratio))

    x, r, t = units.x[:2], units.prompt_index[:2], s.sigmas[units.step[:2]].float()
    emb = b.embeds

    def predict(ref: bool) -> torch.Tensor:
        with torch.no_grad():
            if ref:
                with policy.reference():
                    return policy.velocity(x, t, emb.select(r), G)
            return policy.velocity(x, t, emb.select(r), G)

    ref0, pol0 = predict(True), predict(False)
    stats = update(policy, make_optimizer(policy, TrainConfig(lr=1e-2)), units, emb, s, G,
                   TrainConfig(lr=1e-2, minibatches=2, micro_batch=2), LossConfig(beta=0.01),
                   torch.Generator().manual_seed(0))
    assert torch.equal(ref0, predict(True)) and (predict(False) - pol0).abs().max() > 1e-4
    assert stats["optimizer_steps"] == 2 and np.isfinite(stats["loss"])


def _cfg(tmp_path, *extra: str):
    return load_config(overrides=[
        "model.tiny.family=flux", "train.iterations=1", "rollout.prompts_per_iter=2", "rollout.group_size=3",
        "lora.rank=4", "lora.alpha=8", "sampling.num_steps=3", "sampling.eval_num_steps=3",
        "eval.max_prompts=2", "prompts.source=builtin:colors",
        f"output_dir={tmp_path / 'runs'}", f"pipeline.store={tmp_path / 'store'}", *extra])


def test_train_in_process_tempflow_on_tiny_flux(tmp_path):
    from tempflow_core.algorithm.train import train_in_process

    cfg = _cfg(tmp_path, "algorithm=tempflow", "train.lr=0.01")
    assert cfg.family() == "flux"
    res = train_in_process(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and np.isfinite(rows[0]["train/loss"]) and rows[0]["train/optimizer_steps"] == 1
    from safetensors.torch import load_file

    lora = load_file(str(res.lora_path))
    assert any("single_transformer_blocks" in k for k in lora) and any(k.endswith("to_add_out.lora_B.weight")
                                                                      for k in lora)
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_B" in k)  # the update moved B


def test_stages_evaluation_and_export_reproduce_eval_images_with_plain_flux_pipeline(tmp_path, tiny_flux_dir):
    """Stages on a saved tiny FLUX folder; the exported README's snippet runs as written, and
    plain FluxPipeline + the exported LoRA draws the evaluated images from the recorded seeds."""
    from tempflow_core.run import stages
    from tempflow_core.run.export import export_lora
    from tempflow_core.run.layout import RunLayout
    from tempflow_core.policies.models import load_pipeline
    from tempflow_core.algorithm.session import SessionCache

    # model.tiny.family says sd3, but with a path the folder's model_index.json decides
    # train.ema_decay > 0: evaluation scores the EMA and export writes it with FluxPipeline.save_lora_weights
    cfg = _cfg(tmp_path, f"model.path={tiny_flux_dir}", "model.tiny.family=sd3", "train.lr=0.05", "reward.name=brightness",
               "train.ema_decay=0.5", "train.ema_update_interval=1")
    assert cfg.family() == "flux"
    lay, sessions = RunLayout.open(cfg, "flux"), SessionCache()
    stages.init_stage(cfg, lay, sessions)
    for stage in (stages.rollout_stage, stages.reward_stage, stages.learner_stage, stages.eval_stage):
        stage(cfg, lay, 0, sessions)
    assert sessions.get(cfg).policy.family == "flux" and sessions.get(cfg).schedule.noise_level == 0.9
    from tempflow_core.shards import read_manifest

    assert read_manifest(lay.store, lay.prefix(0, "rollout")).extra["noise_level"] == 0.9  # resolved, not None
    ev = stages.read_eval(lay, 0)
    out = export_lora(cfg, lay, 0, tmp_path / "export")
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["shift"] == "dynamic" and recipe["train_noise_level"] == 0.9 and recipe["weights"] == "ema"
    # guidance unset: FLUX.1-dev's 3.5, not SD3's CFG 4.5
    assert recipe["max_sequence_length"] == 16 and recipe["resolution"] == 32 and recipe["guidance_scale"] == 3.5
    readme = (out / "README.md").read_text()
    assert "FluxPipeline" in readme and "StableDiffusion3Pipeline" not in readme
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(snippet, str(out / "README.md"), "exec"), scope)
    assert scope["image"].size == (32, 32)

    pipe = load_pipeline(tiny_flux_dir)
    pipe.load_lora_weights(str(out))
    from tempflow_core.rewards import build_reward

    for sample in ev["samples"][:2]:
        img = pipe(sample["prompt"], num_inference_steps=3, guidance_scale=3.5, height=32, width=32,
                   max_sequence_length=16, generator=torch.Generator().manual_seed(sample["seed"]),
                   output_type="np").images
        score, _ = build_reward("brightness")((img * 255).round().astype(np.uint8), [sample["prompt"]], [{}])
        assert abs(float(score[0]) - sample["reward"]) < 2e-3
