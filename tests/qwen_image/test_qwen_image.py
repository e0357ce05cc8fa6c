"""The Qwen-Image family against diffusers' own QwenImagePipeline: the template and mask of its
conditioning, true CFG sampling, a training run, evaluation and export (what every family must do,
rollouts, learner, LoRA export, is tests/families)."""

import json

import numpy as np
import pytest
import torch

from tempflow_core.algorithm.rollout import _begin, _ode_from, initial_noise
from tempflow_core.config import RunConfig, load_config
from tempflow_core.families import QWEN_IMAGE_TEMPLATE
from tempflow_core.policies.qwen_image import QwenImagePolicy, pack_latents, unpack_latents
from tempflow_core.families import make_policy

PROMPTS, IDS = ["a red circle", "two blue squares left of a green star"], ["p0", "p1"]
G = 4.0  # Qwen-Image's true CFG


def test_the_template_is_34_tokens_and_the_conditioning_is_the_pipelines_padded_and_masked(qwen_pipe):
    tok = qwen_pipe.tokenizer
    ids = tok(QWEN_IMAGE_TEMPLATE.format("a red circle"))["input_ids"]
    assert tok.decode(ids[:34]) == QWEN_IMAGE_TEMPLATE.split("{}")[0]  # the pipeline drops exactly the template
    pol = QwenImagePolicy(qwen_pipe, None, "cpu")
    assert isinstance(make_policy(qwen_pipe, None, "cpu"), QwenImagePolicy) and pol.text_tokens() == 32
    emb = pol.encode_prompts(PROMPTS)
    assert emb.embeds.shape == (2, 32, 32) and emb.pooled.shape == (2, 0) and emb.neg_embeds.shape == (1, 32, 32)
    # the prompt's tokens and the template's 5 closing ones
    assert emb.mask.sum(1).tolist() == [len(tok(QWEN_IMAGE_TEMPLATE.format(p))["input_ids"]) - 34 for p in PROMPTS]
    for i, p in enumerate(PROMPTS):
        own, own_mask = qwen_pipe.encode_prompt(p, device="cpu")  # one prompt: no padding, mask None
        n = own.shape[1]
        assert own_mask is None and int(emb.mask[i].sum()) == n
        torch.testing.assert_close(emb.embeds[i, :n], own[0].float(), rtol=1e-5, atol=1e-5)
        assert not emb.embeds[i, n:].any() and not emb.mask[i, n:].any()
    neg, _ = qwen_pipe.encode_prompt(" ", device="cpu")
    torch.testing.assert_close(emb.neg_embeds[0, :neg.shape[1]], neg[0].float(), rtol=1e-5, atol=1e-5)
    short = QwenImagePolicy(qwen_pipe, None, "cpu", max_sequence_length=6)
    with pytest.raises(ValueError, match=r"prompt 'two blue squares left of a green star' is 1\d Qwen2.5-VL tokens "
                                         r"after the template, over model.max_sequence_length=6"):
        short.encode_prompts(PROMPTS)


def test_policy_ode_with_true_cfg_equals_qwen_image_pipeline_sampling(qwen_pipe):
    """Grid (exponential shift, terminal 0.02), packing, true CFG with the norm rescale, masks:
    the policy's ODE ends where QwenImagePipeline's own loop does from the same noise."""
    pol = QwenImagePolicy(qwen_pipe, None, "cpu")
    s = pol.schedule(4)
    assert s.noise_level == 0.7 and abs(float(s.sigmas[-2]) - 0.02) < 1e-6
    su = _begin(pol, PROMPTS, s)
    x0 = initial_noise(3, IDS, su.shape, su.device)
    calls = pol.forward_calls
    ours = _ode_from(pol, su, x0, torch.arange(2), list(range(5)), G, 64)
    assert pol.forward_calls - calls == 2 * 4  # a conditional and a negative call per step
    for i, p in enumerate(PROMPTS):
        out = qwen_pipe(p, negative_prompt=" ", true_cfg_scale=G, height=32, width=32, num_inference_steps=4,
                        latents=pack_latents(x0[i:i + 1]), output_type="latent").images
        torch.testing.assert_close(unpack_latents(out, 8, 8, 4)[0], ours[i], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.sigmas[:-1].float(), qwen_pipe.scheduler.sigmas[:-1].float(), rtol=1e-6, atol=1e-6)
    plain = _ode_from(pol, su, x0, torch.arange(2), list(range(5)), 1.0, 64)  # guidance 1: no negative call
    assert (plain - ours).abs().max() > 1e-3


def _cfg(tmp_path, *extra: str):
    return load_config(overrides=[
        "model.tiny.family=qwen-image", "train.iterations=1", "rollout.prompts_per_iter=2", "rollout.group_size=3",
        "lora.rank=4", "lora.alpha=8", "sampling.num_steps=3", "sampling.eval_num_steps=3",
        "eval.max_prompts=2", "prompts.source=builtin:colors",
        f"output_dir={tmp_path / 'runs'}", f"pipeline.store={tmp_path / 'store'}", *extra])


def test_train_in_process_tempflow_on_tiny_qwen_image(tmp_path):
    from safetensors.torch import load_file

    from tempflow_core.algorithm.train import train_in_process

    cfg = _cfg(tmp_path, "algorithm=tempflow", "train.lr=0.01")
    assert cfg.family() == "qwen-image" and cfg.guidance_scale() == 4.0 and cfg.rows_per_sample() == 2
    from tempflow_core.run.export import effective_max_sequence_length

    assert effective_max_sequence_length(cfg) == 32  # what the tiny model's policy pads to (its tokenizer's)
    res = train_in_process(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and np.isfinite(rows[0]["train/loss"]) and rows[0]["train/optimizer_steps"] == 1
    lora = load_file(str(res.lora_path))
    assert any(k.endswith("attn.to_add_out.lora_B.weight") for k in lora)
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_B" in k)  # the update moved B


def test_stages_evaluation_and_export_reproduce_eval_rewards_with_plain_qwen_image_pipeline(tmp_path, tiny_qwen_dir):
    """Stages on a saved tiny Qwen-Image folder: the masks go through the store, the exported
    README's snippet runs as written, and plain QwenImagePipeline + the exported LoRA draws the
    evaluated images' rewards from the recorded seeds."""
    from tempflow_core.algorithm.session import SessionCache
    from tempflow_core.policies.models import load_pipeline
    from tempflow_core.rewards import build_reward
    from tempflow_core.run import stages
    from tempflow_core.run.export import export_lora
    from tempflow_core.run.layout import RunLayout
    from tempflow_core.shards import read_embeds

    cfg = _cfg(tmp_path, f"model.path={tiny_qwen_dir}", "model.tiny.family=sd3", "train.lr=0.05",
               "reward.name=brightness")
    assert cfg.family() == "qwen-image"
    lay, sessions = RunLayout.open(cfg, "qwen"), SessionCache()
    stages.init_stage(cfg, lay, sessions)
    for stage in (stages.rollout_stage, stages.reward_stage, stages.learner_stage, stages.eval_stage):
        stage(cfg, lay, 0, sessions)
    emb, _ = read_embeds(lay.store, lay.prefix(0, "rollout"))
    assert emb.mask is not None and emb.mask.dtype == torch.int64 and emb.neg_mask.shape == (1, 32)
    assert 0 < int(emb.mask.sum()) < emb.mask.numel()  # padded, and the pads marked
    ev = stages.read_eval(lay, 0)
    out = export_lora(cfg, lay, 0, tmp_path / "export")
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["shift"] == "dynamic" and recipe["guidance_scale"] == 4.0 and recipe["resolution"] == 32
    readme = (out / "README.md").read_text()
    assert "QwenImagePipeline" in readme and "negative_prompt=' ', true_cfg_scale=4.0" in readme
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(snippet, str(out / "README.md"), "exec"), scope)
    assert scope["image"].size == (32, 32)

    pipe = load_pipeline(tiny_qwen_dir)
    pipe.load_lora_weights(str(out))
    for sample in ev["samples"][:2]:
        img = pipe(sample["prompt"], negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=3, height=32,
                   width=32, generator=torch.Generator().manual_seed(sample["seed"]), output_type="np").images
        score, _ = build_reward("brightness")((img * 255).round().astype(np.uint8), [sample["prompt"]], [{}])
        assert abs(float(score[0]) - sample["reward"]) < 2e-3


def test_a_prompt_longer_than_the_tokens_qwen_image_reads_is_refused(tiny_qwen_dir, tmp_path):
    """Pre-flight counts a prompt as the pipeline encodes it: inside the template, less the 34
    template tokens it drops, against model.max_sequence_length (capped by the tokenizer: 32)."""
    from tempflow_core.run.preflight import PreflightError, check_prompt_tokens, prompt_token_limit

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n" + "a red circle and a blue square " * 4 + "\n")
    cfg = RunConfig(model={"path": str(tiny_qwen_dir)}, prompts={"source": str(prompts)})
    assert prompt_token_limit(cfg) == ("tokenizer", 256, "Qwen2.5-VL")
    with pytest.raises(PreflightError, match=r"record 2 \(000001\) is 3\d Qwen2.5-VL tokens, over the 32 the model reads"):
        check_prompt_tokens(cfg, [("prompts.source", str(prompts))])
    short = cfg.model_copy(update={"model": cfg.model.model_copy(update={"max_sequence_length": 7})})
    with pytest.raises(PreflightError, match=r"record 1 \(000000\) is 8 Qwen2.5-VL tokens, over the 7 .*raise "
                                             r"model.max_sequence_length \(the tokenizer reads up to 32\)"):
        check_prompt_tokens(short, [("prompts.source", str(prompts))])
    prompts.write_text("a red circle\n")
    check_prompt_tokens(cfg, [("prompts.source", str(prompts))])
