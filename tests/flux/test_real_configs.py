"""flows/configs/models/*.yaml against the real SD3.5-M and FLUX.1-dev configs (no weights).

The model folders in tests/flux/fixtures hold only model_index.json and the components'
configs, as the Hub repositories ship them; the real module classes are built on the meta
device, so shapes, LoRA targets and token counts are checked without allocating a weight.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import torch

from tempflow_core.config import load_config
from tempflow_core.run.export import effective_max_sequence_length, native_resolution
from tempflow_core.policies.models import load_pipeline_meta
from tempflow_core.families import make_policy

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures"

# config file, fixture folder, family, T5 tokens, LoRA-wrapped modules, transformer parameters
CASES = [
    # SD3.5-M: 24 joint blocks x 8 targets, less the last block's to_add_out (context_pre_only);
    # the dual-attention blocks' attn2 is not a target (as in Flow-GRPO)
    ("sd35m.yaml", "sd35m", "sd3", 256, 24 * 8 - 1, 2_243_171_520),
    # FLUX.1-dev: 19 double-stream blocks x 8 targets + 38 single-stream blocks x to_q/k/v
    ("flux1-dev.yaml", "flux1-dev", "flux", 512, 19 * 8 + 38 * 3, 11_901_408_320),
]


@pytest.mark.parametrize("name,folder,family,t5,n_targets,n_params", CASES)
def test_model_config_against_real_model_folder(name, folder, family, t5, n_targets, n_params):
    cfg = load_config(ROOT / "flows" / "configs" / "models" / name, [f"model.path={FIXTURES / folder}"])
    assert cfg.family() == family and cfg.model.resolution == 512 and cfg.lora.rank == 32 and cfg.lora.alpha == 64
    assert cfg.sampling.num_steps == 10 and cfg.sampling.eval_num_steps == 40 and cfg.rollout.group_size == 24
    pipe = load_pipeline_meta(cfg.model.path)
    assert all(p.is_meta for p in pipe.transformer.parameters())
    assert sum(p.numel() for p in pipe.transformer.parameters()) == n_params

    pol = make_policy(pipe, cfg.lora, "meta", cfg.model.max_sequence_length, cfg.model.resolution)
    assert pol.family == family
    # latents: 512 px / 8 = 64, 16 channels; FLUX packs them into (64 / 2)^2 = 1024 tokens of 64
    assert pol.latent_shape() == (16, 64, 64)
    if family == "flux":
        assert pipe.transformer.config.in_channels == 4 * 16 and pipe.transformer.config.guidance_embeds
    # LoRA targets: every configured suffix names real modules, and exactly the expected ones are wrapped
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_modules() if n.endswith(".lora_A")}
    assert len(wrapped) == n_targets
    for target in cfg.lora.target_modules:
        assert any(w.endswith("." + target) for w in wrapped), target
    assert all(w.split(".")[0] in ("transformer_blocks", "single_transformer_blocks") for w in wrapped)
    # token counts: T5 512 (FLUX.1-dev) or 256 (SD3.5), CLIP 77
    assert pol.max_sequence_length == t5 == effective_max_sequence_length(cfg)
    assert pipe.tokenizer_max_length == 77 and pipe.text_encoder.config.max_position_embeddings == 77
    assert native_resolution(cfg.model_copy(update={"model": cfg.model.model_copy(update={"resolution": None})})) == 1024
    # the grid of the family: FLUX's mu for 1024 tokens is 0.5 + 0.65 * 768 / 3840 = 0.63
    s = pol.schedule(cfg.sampling.num_steps, cfg.sampling.shift, cfg.sampling.noise_level)
    assert s.noise_level == (0.9 if family == "flux" else 0.7)
    if family == "flux":  # sigmas linspace(1, 1/T, T) shifted by exp(mu): t_1 = e^mu 0.9 / (e^mu 0.9 + 0.1)
        e = torch.exp(torch.tensor(0.63, dtype=torch.float64))
        assert abs(float(s.sigmas[1]) - float(e * 0.9 / (e * 0.9 + 0.1))) < 1e-6
    else:  # SD3's static shift 3.0, exactly the grid runs had before families
        from tempflow_core.algorithm.schedule import make_schedule

        assert torch.equal(s.sigmas, make_schedule(10, 3.0, 0.7).sigmas)


# The paper's recipe and the reference code's (docs/fidelity.md), as a model config must resolve
# it: each value with where it comes from. SD3.5-M and FLUX.1-dev share all but the family's
# CFG / guidance value and noise level.
RECIPE = {
    "algorithm": "tempflow",
    "model.resolution": 512,  # paper: 512 px
    "model.dtype": "bfloat16",
    "lora.rank": 32, "lora.alpha": 64.0, "lora.init": "gaussian",  # paper: r 32, alpha 64
    "sampling.num_steps": 10, "sampling.eval_num_steps": 40,  # paper and Flow-GRPO: T 10, 40 for evaluation
    "rollout.prompts_per_iter": 48, "rollout.group_size": 24,  # paper: 48 groups of 24
    "rollout.branch_steps": "all",  # the authors' sampler: timesteps[:-1]
    "loss.clip_range": 1e-4, "loss.beta": 0.004,  # paper and Flow-GRPO: 1e-4; paper: 0.004 for GenEval
    "loss.weight_norm": "mean1",  # paper: weights of mean 1
    "train.lr": 3e-4,  # Flow-GRPO: 3e-4
    "train.iterations": 2200, "train.minibatches": 2, "train.inner_epochs": 1,  # 4,400 steps, 2 per epoch
    "train.ema_decay": 0.9, "train.ema_update_interval": 8,  # Flow-GRPO's EMA
}
FAMILY = {"sd35m.yaml": {"sampling.guidance_scale": 4.5, "sampling.noise_level": 0.7},
          "flux1-dev.yaml": {"sampling.guidance_scale": 3.5, "sampling.noise_level": 0.9},
          "qwen-image.yaml": {"sampling.guidance_scale": 4.0, "sampling.noise_level": 0.7},
          # Wan2.1-1.3B is trained at 480p; its clips' rows are 8x an image's, so fewer rows a call
          "wan2.1-t2v-1.3b.yaml": {"sampling.guidance_scale": 4.5, "sampling.noise_level": 0.7,
                                   "model.resolution": 480}}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_a_model_config_resolves_to_the_papers_recipe_and_nothing_of_the_cpu_demo(name, tmp_path):
    """`tempflow show-config --config flows/configs/models/X.yaml`, as a user runs it: the paper's
    learning rate, batch, K, T and iterations; every setting the file leaves unset is the code's
    default, never the embedded demo's (its lr 0.003, 4 prompts, 4 iterations, LoRA rank 8)."""
    from tempflow_core.config import RunConfig

    path = ROOT / "flows" / "configs" / "models" / name
    env = {**os.environ, "TEMPFLOW_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-m", "flows.cli", "show-config", "--config", str(path)],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-800:]
    got = _flat(json.loads(out.stdout))
    want = {**RECIPE, **FAMILY[name]}
    assert {k: got[k] for k in want} == want
    code = _flat(RunConfig().model_dump(mode="json"))
    named = set(_flat(yaml.safe_load(path.read_text())))
    unset = {k for k in code if not any(n == k or n.startswith(k + ".") for n in named)  # a dict's keys name it
             and k not in ("output_dir", "pipeline.store", "model.path")}
    assert {k: got[k] for k in unset} == {k: code[k] for k in unset}


def test_the_shipped_ablation_resolves_as_it_did_over_the_embedded_default():
    """flows/configs/ablation.yaml stands alone now; its runs keep their configs (and so their
    digests and run ids) from when it was layered over the embedded default."""
    from tempflow_core.config import load_config

    embedded = yaml.safe_load((ROOT / "flows" / "configs" / "default.yaml").read_text())
    ablation = ROOT / "flows" / "configs" / "ablation.yaml"
    alone, layered = load_config(ablation), load_config(ablation, base=embedded)
    assert alone == layered and alone.digest() == layered.digest()


def test_qwen_image_config_against_its_real_model_folder():
    """flows/configs/models/qwen-image.yaml on Qwen-Image's configs (tests/flux/fixtures/qwen-image):
    the real classes on the meta device give the published 20,430,401,088 transformer parameters,
    the policy's grid is Qwen-Image's (exponential shift of mu at 1024 tokens, stretched to end at
    0.02), computed here by hand."""
    import numpy as np

    from tempflow_core.run.preflight import prompt_token_limit

    cfg = load_config(ROOT / "flows" / "configs" / "models" / "qwen-image.yaml",
                      [f"model.path={FIXTURES / 'qwen-image'}"])
    assert cfg.family() == "qwen-image" and cfg.model.resolution == 512 and cfg.guidance_scale() == 4.0
    assert cfg.rows_per_sample() == 2  # true CFG: a conditional and a negative row
    pipe = load_pipeline_meta(cfg.model.path)
    assert sum(p.numel() for p in pipe.transformer.parameters()) == 20_430_401_088
    assert round(sum(p.numel() for p in pipe.text_encoder.parameters()) / 1e9, 2) == 8.29  # Qwen2.5-VL-7B
    pol = make_policy(pipe, cfg.lora, "meta", cfg.model.max_sequence_length, cfg.model.resolution)
    assert pol.family == "qwen-image" and pol.latent_shape() == (16, 64, 64)
    assert pol.max_sequence_length == 256 == effective_max_sequence_length(cfg)
    assert prompt_token_limit(cfg) == ("tokenizer", 256, "Qwen2.5-VL")
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_modules() if n.endswith(".lora_A")}
    assert len(wrapped) == 60 * 8  # the 8 attention targets of each of the 60 dual-stream blocks
    s = pol.schedule(cfg.sampling.num_steps, cfg.sampling.shift, cfg.sampling.noise_level)
    assert s.noise_level == 0.7
    t = np.linspace(1.0, 0.1, 10)
    mu = 0.5 + (0.9 - 0.5) * ((64 // 2) ** 2 - 256) / (8192 - 256)  # calculate_shift of 1024 packed tokens
    shifted = np.exp(mu) / (np.exp(mu) + (1 / t - 1))
    stretched = 1 - (1 - shifted) / ((1 - shifted[-1]) / (1 - 0.02))  # the terminal sigma becomes 0.02
    np.testing.assert_allclose(s.sigmas.numpy(), np.append(stretched, 0.0), rtol=1e-6, atol=1e-7)
    assert native_resolution(cfg.model_copy(update={"model": cfg.model.model_copy(update={"resolution": None})})) == 1024


def test_wan_config_against_its_real_model_folder():
    """flows/configs/models/wan2.1-t2v-1.3b.yaml on Wan2.1-T2V-1.3B's configs: 33-frame clips are
    9 latent frames of 60 x 60, UMT5 reads 512 tokens, the LoRA adapts self- and cross-attention
    of the 30 blocks, and the grid is the static flow shift 3.0 (computed here by hand)."""
    import numpy as np

    cfg = load_config(ROOT / "flows" / "configs" / "models" / "wan2.1-t2v-1.3b.yaml",
                      [f"model.path={FIXTURES / 'wan2.1-t2v-1.3b'}"])
    assert cfg.family() == "wan" and cfg.model.num_frames == 33 and cfg.guidance_scale() == 4.5
    pipe = load_pipeline_meta(cfg.model.path)
    assert sum(p.numel() for p in pipe.transformer.parameters()) == 1_418_996_800
    pol = make_policy(pipe, cfg.lora, "meta", cfg.model.max_sequence_length, cfg.model.resolution,
                      frames=cfg.model.num_frames)
    assert pol.latent_shape() == (16, 9, 60, 60) and pol.pixels() == 480
    assert pol.max_sequence_length == 512 == effective_max_sequence_length(cfg)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_modules() if n.endswith(".lora_A")}
    assert len(wrapped) == 30 * 8 and all(".attn1." in w or ".attn2." in w for w in wrapped)
    s = pol.schedule(cfg.sampling.num_steps, cfg.sampling.shift, cfg.sampling.noise_level)
    shift = lambda t: 3 * t / (1 + 2 * t)  # noqa: E731  (the static flow shift 3.0)
    t = np.linspace(1.0, shift(1 / 1000), 10)  # diffusers' timesteps: from 1 to the shifted smallest training sigma
    np.testing.assert_allclose(s.sigmas.numpy(), np.append(shift(t), 0.0), rtol=1e-6, atol=1e-7)
