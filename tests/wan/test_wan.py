"""The Wan (text-to-video) family against diffusers' own WanPipeline: clips with a frame axis
through the ODE and the pipeline; decoding to frame strips; the stages and export. (What every family
must do, rollouts, learner, LoRA export, is tests/families.)"""

import numpy as np
import pytest
import torch

from tempflow_core.algorithm.rollout import _begin, _ode_from, initial_noise
from tempflow_core.config import LoraSettings
from tempflow_core.policies.models import load_pipeline
from tempflow_core.families import make_policy
from tempflow_core.policies.wan import WanPolicy
from tempflow_core.rewards.clips import split_strips

PROMPTS, IDS = ["a red circle", "two blue squares"], ["p0", "p1"]
G = 4.5  # Flow-GRPO's CFG for Wan2.1


def test_a_clip_is_a_latent_with_a_frame_axis_and_the_conditioning_is_the_pipelines(wan_pipe):
    pol = WanPolicy(wan_pipe, None, "cpu")
    assert isinstance(make_policy(wan_pipe, None, "cpu"), WanPolicy)
    assert pol.frames == 5 and pol.latent_shape() == (4, 2, 8, 8) and pol.text_tokens() == 16
    emb = pol.encode_prompts(PROMPTS)
    own, neg = wan_pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=16)
    torch.testing.assert_close(emb.embeds, own.float())
    torch.testing.assert_close(emb.neg_embeds, neg[:1].float())
    assert emb.pooled.shape == (2, 0) and emb.mask is None
    with pytest.raises(ValueError, match=r"6 frames: Wan's VAE takes 1 \+ 4k frames"):
        WanPolicy(wan_pipe, None, "cpu", frames=6)


def test_policy_ode_with_cfg_equals_wan_pipeline_sampling_and_clips_decode_to_its_frames(wan_pipe):
    pol = WanPolicy(wan_pipe, None, "cpu")
    s = pol.schedule(4)
    assert s.noise_level == 0.7
    su = _begin(pol, PROMPTS, s)
    x0 = initial_noise(3, IDS, su.shape, su.device)  # [2, C, F', H, W]
    calls = pol.forward_calls
    ours = _ode_from(pol, su, x0, torch.arange(2), list(range(5)), G, 64)
    assert pol.forward_calls - calls == 2 * 4  # a conditional and a negative call per step
    strips = pol.decode(ours)
    assert strips.shape == (2, 32, 5 * 32, 3) and strips.dtype == np.uint8
    for i, p in enumerate(PROMPTS):
        kw = dict(height=32, width=32, num_frames=5, num_inference_steps=4, guidance_scale=G, max_sequence_length=16,
                  latents=x0[i:i + 1])
        lat = wan_pipe(p, output_type="latent", **kw).frames
        torch.testing.assert_close(lat[0], ours[i], rtol=1e-4, atol=1e-4)
        video = wan_pipe(p, output_type="np", **kw).frames[0]  # [F, H, W, 3] in [0, 1]
        assert np.abs(split_strips(strips[i:i + 1])[0].astype(np.float32) - video * 255).max() <= 1.0  # uint8 rounding
    assert split_strips(np.arange(2 * 3 * 12 * 3).reshape(2, 3, 12, 3)).shape == (2, 4, 3, 3, 3)


def test_the_lora_adapts_self_and_cross_attention(wan_pipe):
    """Wan registers its own targets for the default list (its attention is attn1 / attn2); the
    family contract (tests/families) checks that they learn and export into plain WanPipeline."""
    pol = make_policy(wan_pipe, LoraSettings(rank=4, alpha=8), "cpu")
    names = {n.split(".lora_")[0] for n, _ in pol.transformer.named_parameters() if "lora_A" in n}
    assert names == {f"blocks.{b}.attn{a}.{m}" for b in (0, 1) for a in (1, 2)
                     for m in ("to_q", "to_k", "to_v", "to_out.0")}
    assert pol.lora_metadata()["target_modules"] == sorted(f"attn{a}.{m}" for a in (1, 2)
                                                           for m in ("to_q", "to_k", "to_v", "to_out.0"))


def _cfg(tmp_path, *extra: str):
    from tempflow_core.config import load_config

    return load_config(overrides=[
        "model.tiny.family=wan", "train.iterations=1", "rollout.prompts_per_iter=2", "rollout.group_size=3",
        "lora.rank=4", "lora.alpha=8", "sampling.num_steps=3", "sampling.eval_num_steps=3",
        "eval.max_prompts=2", "prompts.source=builtin:colors",
        f"output_dir={tmp_path / 'runs'}", f"pipeline.store={tmp_path / 'store'}", *extra])


def test_train_in_process_tempflow_on_tiny_wan_with_a_per_frame_reward(tmp_path):
    import json

    from safetensors.torch import load_file

    from tempflow_core.algorithm.train import train_in_process

    cfg = _cfg(tmp_path, "algorithm=tempflow", "train.lr=0.01", "reward.name=frames",
               "reward.options={frames: {of: brightness}}")
    assert cfg.family() == "wan" and cfg.guidance_scale() == 4.5 and cfg.rows_per_sample() == 2
    res = train_in_process(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and np.isfinite(rows[0]["train/loss"]) and rows[0]["train/optimizer_steps"] == 1
    lora = load_file(str(res.lora_path))
    assert any(k.endswith("attn2.to_k.lora_B.weight") for k in lora)
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_B" in k)  # the update moved B


def test_stages_evaluation_and_export_reproduce_eval_rewards_with_plain_wan_pipeline(tmp_path, tiny_wan_dir):
    """Stages on a saved tiny Wan folder with 9-frame clips: the shards hold frame strips, the exported
    README's snippet runs as written, and plain WanPipeline + the exported LoRA draws the evaluated
    clips' rewards from the recorded seeds."""
    import json

    from tempflow_core.algorithm.session import SessionCache
    from tempflow_core.rewards import build_reward
    from tempflow_core.run import stages
    from tempflow_core.run.export import export_lora
    from tempflow_core.run.layout import RunLayout
    from tempflow_core.shards import read_rollouts

    cfg = _cfg(tmp_path, f"model.path={tiny_wan_dir}", "model.tiny.family=sd3", "model.num_frames=9",
               "train.lr=0.05", "reward.name=frames", "reward.options={frames: {of: brightness}}")
    lay, sessions = RunLayout.open(cfg, "wan"), SessionCache()
    stages.init_stage(cfg, lay, sessions)
    for stage in (stages.rollout_stage, stages.reward_stage, stages.learner_stage, stages.eval_stage):
        stage(cfg, lay, 0, sessions)
    b = read_rollouts(lay.store, lay.prefix(0, "rollout"))
    assert b.branch_points[0].x_k.shape == (4, 3, 8, 8) and b.images().shape[1:] == (32, 9 * 32, 3)
    ev = stages.read_eval(lay, 0)
    out = export_lora(cfg, lay, 0, tmp_path / "export")
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["num_frames"] == 9 and recipe["shift"] == 3.0 and recipe["guidance_scale"] == 4.5
    readme = (out / "README.md").read_text()
    assert "WanPipeline" in readme and "num_frames=9" in readme and ".frames[0]" in readme
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(snippet, str(out / "README.md"), "exec"), scope)
    assert np.asarray(scope["video"]).shape == (9, 32, 32, 3)

    pipe = load_pipeline(tiny_wan_dir)
    pipe.load_lora_weights(str(out))
    reward = build_reward("frames", options={"frames": {"of": "brightness"}})
    for sample in ev["samples"][:2]:
        video = pipe(sample["prompt"], num_frames=9, num_inference_steps=3, guidance_scale=4.5, height=32, width=32,
                     max_sequence_length=16, generator=torch.Generator().manual_seed(sample["seed"]),
                     output_type="np").frames[0]  # [F, H, W, 3]
        strip = (np.concatenate(list(video), 1)[None] * 255).round().astype(np.uint8)
        score, _ = reward(strip, [sample["prompt"]], [{}])
        assert abs(float(score[0]) - sample["reward"]) < 2e-3


def test_frames_are_checked_before_any_work(tiny_wan_dir):
    """model.num_frames: refused for an image family and for a count the VAE does not take,
    naming the field and the counts it does take; a saved Wan folder reads its VAE's temporal scale."""
    from tempflow_core.config import RunConfig
    from tempflow_core.run.preflight import PreflightError, check_frames

    with pytest.raises(PreflightError, match=r"^model.num_frames: 9 frames, but StableDiffusion3Pipeline makes images"):
        check_frames(RunConfig(model={"num_frames": 9}))
    with pytest.raises(PreflightError, match=r"^model.num_frames: 6 frames: this VAE takes 1 \+ 4k frames; fix: use 5 or 9"):
        check_frames(RunConfig(model={"num_frames": 6, "tiny": {"family": "wan"}}))
    with pytest.raises(PreflightError, match=r"takes 1 \+ 4k frames; fix: use 9 or 13"):
        check_frames(RunConfig(model={"num_frames": 10, "path": str(tiny_wan_dir)}))
    check_frames(RunConfig(model={"num_frames": 9, "path": str(tiny_wan_dir)}))
    check_frames(RunConfig())  # unset: nothing to check
