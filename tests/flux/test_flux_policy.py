"""The FLUX policy against diffusers' own FluxPipeline: packing, velocity, grid, sampling, LoRA export."""

import json

import pytest
import torch

from tempflow_core.config import LoraSettings
from tempflow_core.families import detect_family
from tempflow_core.policies.flux import FluxPolicy, image_ids, pack_latents, unpack_latents
from tempflow_core.policies.models import load_pipeline
from tempflow_core.families import make_policy
from tempflow_core.policies.sd3 import SD3Policy
from tempflow_core.algorithm.rollout import _ode_from, _begin, initial_noise  # noqa: F401  (ODE of evaluation)
from tempflow_core.algorithm.schedule import make_schedule

PROMPTS = ["a red circle", "two blue squares"]


def reference_pack(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, (H/2)(W/2), 4C] written out index by index:
    token (i, j) holds x[c, 2i + a, 2j + b] at feature c*4 + a*2 + b."""
    n, c, h, w = x.shape
    out = torch.empty(n, (h // 2) * (w // 2), 4 * c, dtype=x.dtype)
    for i in range(h // 2):
        for j in range(w // 2):
            for a in range(2):
                for b in range(2):
                    out[:, i * (w // 2) + j, torch.arange(c) * 4 + a * 2 + b] = x[:, :, 2 * i + a, 2 * j + b]
    return out


def test_pack_unpack_round_trip_and_token_layout():
    x = torch.randn(3, 4, 8, 6)
    tokens = pack_latents(x)
    assert tokens.shape == (3, 12, 16)
    torch.testing.assert_close(tokens, reference_pack(x), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(tokens, 8, 6, vae_scale_factor=4), x, rtol=0, atol=0)
    ids = image_ids(8, 6, torch.device("cpu"), torch.float32)  # [(H/2)(W/2), 3]: (0, row, col)
    assert ids.shape == (12, 3) and ids[:, 0].abs().sum() == 0
    assert ids[4].tolist() == [0.0, 1.0, 1.0]  # token 4 = row 1, col 1 of a 4x3 grid


def test_velocity_equals_flux_transformer_on_packed_latents(flux_pipe):
    pol = FluxPolicy(flux_pipe, None, "cpu")
    n, (c, h, w) = len(PROMPTS), pol.latent_shape()
    # the pipeline's own inputs: packed noise and ids from prepare_latents, text from encode_prompt
    packed, img_ids = flux_pipe.prepare_latents(n, c, h * 4, w * 4, torch.float32, "cpu",
                                                torch.Generator().manual_seed(0))
    embeds, pooled, txt_ids = flux_pipe.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=16)
    t = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        ref = flux_pipe.transformer(hidden_states=packed, timestep=t, guidance=torch.full((n,), 3.5),
                                    pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids,
                                    img_ids=img_ids, return_dict=False)[0]  # [N, HW/4, 4C]
    # the policy sees the same noise unpacked to [N, C, H, W] (the inverse of reference_pack)
    x = torch.empty(n, c, h, w)
    for k in range(4 * c):
        ch, a, b = k // 4, (k % 4) // 2, k % 2
        x[:, ch, a::2, b::2] = packed[:, :, k].reshape(n, h // 2, w // 2)
    emb = pol.encode_prompts(PROMPTS)
    assert emb.neg_embeds.shape == (0, 16, 32) and emb.embeds.shape == (2, 16, 32) and emb.pooled.shape == (2, 32)
    with torch.no_grad():
        v = pol.velocity(x, t, emb, 3.5)
    assert v.shape == (n, c, h, w) and v.dtype == torch.float32
    torch.testing.assert_close(reference_pack(v), ref, rtol=1e-5, atol=1e-5)
    # guidance is an input of the distilled model: another value, another velocity
    with torch.no_grad():
        assert (pol.velocity(x, t, emb, 1.0) - v).abs().max() > 1e-4


def test_one_transformer_call_per_step_without_cfg(flux_pipe):
    from tempflow_core.algorithm.rollout import sample_images

    pol = FluxPolicy(flux_pipe, None, "cpu")
    T = 3
    images = sample_images(pol, PROMPTS, ["p0", "p1"], pol.schedule(T), 3.5, seed=0)
    assert images.shape == (2, 32, 32, 3)
    assert pol.forward_calls == T and pol.nfe == 2 * T  # SD3 with CFG sends 2N rows per call


def test_grid_is_flux_pipelines(flux_pipe):
    """FluxPolicy.schedule = the sigmas FluxPipeline.__call__ sets (dynamic shift of the token count)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pol = FluxPolicy(flux_pipe, None, "cpu")
    s = pol.schedule(5)
    assert s.noise_level == 0.9  # the FLUX default a
    flux_pipe("a red circle", height=32, width=32, num_inference_steps=5, guidance_scale=3.5,
              max_sequence_length=16, output_type="latent", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s.sigmas.float(), flux_pipe.scheduler.sigmas.float(), rtol=1e-6, atol=1e-6)
    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)  # (32 px / 4 / 2)^2 = 16 tokens
    sh = make_schedule(5, shift=float(torch.tensor(mu).exp()))  # = a static shift exp(mu) ...
    assert not torch.allclose(sh.sigmas, s.sigmas)  # ... but on SD3's base grid, which FLUX does not use
    assert pol.schedule(5, noise_level=0.5).noise_level == 0.5
    torch.testing.assert_close(pol.schedule(5, shift=float(torch.tensor(mu).exp())).sigmas, s.sigmas)


def _ode_latents(pol, prompts, ids, schedule, guidance, seed):
    su = _begin(pol, prompts, schedule)
    x = initial_noise(seed, ids, su.shape, su.device)
    return x, _ode_from(pol, su, x, torch.arange(len(prompts)), list(range(su.T + 1)), guidance, 64)


def _perturb_lora(pol, scale=0.05):
    with torch.no_grad():
        for i, (n, p) in enumerate(pol.transformer.named_parameters()):
            if "lora_B" in n:
                p.normal_(0, scale, generator=torch.Generator().manual_seed(i))


def test_policy_ode_equals_flux_pipeline_sampling(flux_pipe):
    pol = FluxPolicy(flux_pipe, None, "cpu")
    x0, ours = _ode_latents(pol, ["a red circle"], ["p0"], pol.schedule(4), 3.5, seed=3)
    out = flux_pipe("a red circle", height=32, width=32, num_inference_steps=4, guidance_scale=3.5,
                    max_sequence_length=16, latents=pack_latents(x0), output_type="latent").images
    torch.testing.assert_close(ours, unpack_latents(out, 8, 8, 4), rtol=1e-4, atol=1e-4)


def test_lora_targets_reference_and_export_into_plain_flux_pipeline(flux_pipe, tiny_flux_dir, tmp_path):
    pol = make_policy(flux_pipe, LoraSettings(rank=4, alpha=8), "cpu")
    assert isinstance(pol, FluxPolicy) and pol.family == "flux"
    names = {n.split(".lora_")[0] for n, _ in pol.transformer.named_parameters() if "lora_A" in n}
    double = {f"transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                          "add_k_proj", "add_v_proj", "to_add_out")}
    single = {f"single_transformer_blocks.1.attn.{m}" for m in ("to_q", "to_k", "to_v")}
    assert double | single <= names and len(names) == 2 * 8 + 2 * 3
    # gaussian init: B = 0, the policy starts as its reference
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(0.6)
    emb = pol.encode_prompts(["a red circle"])
    with torch.no_grad():
        v0 = pol.velocity(x, t, emb, 3.5)
        _perturb_lora(pol)
        v_pol = pol.velocity(x, t, emb, 3.5)
        with pol.reference():
            torch.testing.assert_close(pol.velocity(x, t, emb, 3.5), v0)
    assert (v_pol - v0).abs().max() > 1e-4

    path = pol.save_lora(tmp_path / "lora")
    plain = load_pipeline(tiny_flux_dir)
    plain.load_lora_weights(str(path.parent))  # diffusers' FluxPipeline loader, nothing of ours
    other = FluxPolicy(plain, None, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(other.velocity(x, t, emb, 3.5), v_pol, rtol=1e-4, atol=1e-5)
    # and the LoRA changes plain sampling exactly as it changes the policy's
    x0, ours = _ode_latents(pol, ["two blue squares"], ["p1"], pol.schedule(3), 3.5, seed=1)
    out = plain("two blue squares", height=32, width=32, num_inference_steps=3, guidance_scale=3.5,
                max_sequence_length=16, latents=pack_latents(x0), output_type="latent").images
    torch.testing.assert_close(unpack_latents(out, 8, 8, 4), ours, rtol=1e-4, atol=1e-4)
    # back into a fresh policy through load_lora
    again = FluxPolicy(load_pipeline(tiny_flux_dir), LoraSettings(rank=4, alpha=8), "cpu")
    again.load_lora(tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(again.velocity(x, t, emb, 3.5), v_pol)


def test_family_detection_and_refusal(tiny_flux_dir, tiny_model_dir, tmp_path):
    assert detect_family(tiny_flux_dir) == "flux" and detect_family(tiny_model_dir) == "sd3"
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match=r"model_index\.json'?: _class_name 'StableDiffusionXLPipeline' is not "
                                         r"supported; supported pipelines: StableDiffusion3Pipeline, FluxPipeline"):
        load_pipeline(tmp_path / "sdxl")
    assert isinstance(make_policy(load_pipeline(tiny_model_dir), None, "cpu"), SD3Policy)
    with pytest.raises(ValueError, match="not supported"):
        make_policy(object(), None, "cpu")
