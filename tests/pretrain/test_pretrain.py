"""pretrain(): a tiny-budget run end to end, bit-identical reruns, falling loss, stopping rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tempflow_core.config import TinyModelConfig
from tempflow_core.pretrain import PretrainConfig, encode_text, pretrain

TINY = dict(
    model=TinyModelConfig(resolution=32), images=200, val_images=32,
    vae_steps=4, vae_batch=8, vae_crop=16, encode_batch=100,
    steps=20, batch=16, warmup=2, eval_every=10, eval_at_start=True,
    eval_per_prompt=1, eval_steps=2, final_per_prompt=1, final_train_per_prompt=0,
    band=(0.0, 1.0), stop_at=2.0,  # never stop early: run the whole step budget
)


def _weights(folder):
    return {f"{p.parent.name}/{k}": v for p in sorted(folder.rglob("*.safetensors")) for k, v in load_file(p).items()}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: with two, a busy neighbour on the same 2 cores makes OpenMP's spinning
    threads 5-10x slower (measured); the bit-identity check only needs the same count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("pretrain") / "model"
    return pretrain(PretrainConfig(**TINY), out, progress=False)


def test_tiny_run_writes_a_loadable_pipeline_that_samples(tiny_run):
    from tempflow_core.policies.models import load_pipeline
    from tempflow_core.policies.sd3 import SD3Policy
    from tempflow_core.algorithm.rollout import sample_images
    from tempflow_core.algorithm.schedule import make_schedule

    out = tiny_run.out_dir
    assert tiny_run.steps == 20 and len(tiny_run.losses) == 20
    for name in ("model_index.json", "curve.json", "samples.png"):  # MODEL_CARD.md, README.md: test_pretrain_flow.py
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.bin")) and 0 < tiny_run.size_mb < 25
    vae_cfg = json.loads((out / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == pytest.approx(tiny_run.vae["scaling_factor"])
    assert vae_cfg["shift_factor"] == pytest.approx(tiny_run.vae["shift_factor"])
    curve = json.loads((out / "curve.json").read_text())["curve"]
    assert [p["step"] for p in curve] == [0, 10, 20]

    pipe = load_pipeline(out)  # offline (HF_HUB_OFFLINE=1 in conftest)
    imgs = sample_images(SD3Policy(pipe, None, "cpu"), ["a red circle", "two blue squares"], ["a", "b"],
                         make_schedule(2, shift=3.0), 4.0, seed=0)
    assert imgs.shape == (2, 32, 32, 3) and imgs.dtype == np.uint8


def test_same_seed_gives_bit_identical_weights(tiny_run, tmp_path):
    again = pretrain(PretrainConfig(**TINY), tmp_path / "model", progress=False)
    a, b = _weights(tiny_run.out_dir), _weights(again.out_dir)
    assert a.keys() == b.keys() and len(a) > 50
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert again.losses == tiny_run.losses


def test_loss_decreases(tiny_run):
    curve = tiny_run.curve
    assert curve[0]["step"] == 0 and curve[-1]["step"] == 20
    # fixed t and noise on held-out scenes: an untrained model sits near E|eps - x0|^2 ~ 2
    assert curve[-1]["val_loss"] < 0.9 * curve[0]["val_loss"]
    assert np.mean(tiny_run.losses[-5:]) < np.mean(tiny_run.losses[:5])


def test_training_prompt_path_is_the_inference_path(tiny_run):
    from tempflow_core.policies.models import load_pipeline
    from tempflow_core.policies.sd3 import SD3Policy

    pipe = load_pipeline(tiny_run.out_dir)
    prompts = ["a red circle", "", "a blue square left of a yellow triangle", "a red circle"]
    with torch.no_grad():
        embeds, pooled = encode_text(pipe, prompts)
    emb = SD3Policy(pipe, None, "cpu").encode_prompts(prompts)
    # same computation; only float summation order may differ with the batch layout
    torch.testing.assert_close(embeds, emb.embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, emb.pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embeds[1:2], emb.neg_embeds, rtol=1e-5, atol=1e-5)  # dropped captions train the CFG negative


def test_stops_at_the_first_evaluation_inside_the_band(tmp_path):
    cfg = PretrainConfig(**{**TINY, "eval_at_start": False, "stop_at": 0.0, "band": (0.0, 1.0),
                            "cache_dir": str(tmp_path / "cache")})
    res = pretrain(cfg, tmp_path / "model", progress=False)
    assert res.steps == 10 and "stop_at" in res.stop_reason and res.in_band
    assert list((tmp_path / "cache").glob("pretrain-*/latents.npy"))


def test_a_nested_override_keeps_the_other_shipped_sizes():
    from tempflow_core.pretrain.config import SHIPPED_MODEL

    cfg = PretrainConfig.with_overrides(["model.resolution=32", "steps=10"], seed=3, images=None)
    assert cfg.model.resolution == 32 and cfg.steps == 10 and cfg.seed == 3
    assert cfg.images == PretrainConfig().images  # None keeps the default
    assert cfg.model.model_dump() == SHIPPED_MODEL.model_copy(update={"resolution": 32}).model_dump()
    assert cfg.model.layers != TinyModelConfig().layers  # not reset to the class defaults
    assert PretrainConfig.with_overrides([]) == PretrainConfig()
