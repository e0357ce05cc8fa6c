"""Rewards in rewards/extra.py: shapes, JPEG, CLIP adapters, the weighted sum and the checks."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image

from tempflow_core.prompts import load_prompts
from tempflow_core.rewards import RewardError, RewardRegistry, build_reward
from tempflow_core.shapes import render_batch


@pytest.fixture(scope="module")
def shapes_batch():
    records = load_prompts("builtin:shapes_test")
    images = render_batch(records, seed=9)
    return images, [r.text for r in records], [r.metadata for r in records]


def test_registry_lists_the_extra_rewards():
    assert {"shapes", "shapes_strict", "jpeg_compressibility", "jpeg_incompressibility",
            "clipscore", "pickscore"} <= set(RewardRegistry.builtin().names())


def test_shapes_rewards_on_correct_wrong_and_noise(shapes_batch):
    images, prompts, meta = shapes_batch
    dense, strict = build_reward("shapes"), build_reward("shapes_strict")
    s, d = dense(images, prompts, meta)
    assert s.dtype == np.float32 and s.shape == (len(images),) and np.all(s == 1.0)
    assert np.all(d["strict"] == 1.0)
    counting = np.array([m["tag"] == "counting" for m in meta])
    assert np.all(d["strict_counting"][counting] == 1.0) and np.all(np.isnan(d["strict_counting"][~counting]))
    # shift images by one prompt: most images now answer another prompt
    rolled = np.roll(images, 1, axis=0)
    s2, _ = dense(rolled, prompts, meta)
    st2, _ = strict(rolled, prompts, meta)
    assert st2.mean() < 0.3 and s2.mean() < 0.8 and np.all(s2 >= 0) and np.all(s2 <= 1)
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    assert strict(noise, prompts, meta)[0].sum() == 0


def test_shapes_reward_falls_back_to_prompt_text(shapes_batch):
    images, prompts, meta = shapes_batch
    s_meta, _ = build_reward("shapes")(images, prompts, meta)
    s_text, _ = build_reward("shapes")(images, prompts, [{} for _ in prompts])
    assert np.array_equal(s_meta, s_text)
    with pytest.raises(KeyError, match="purple"):
        build_reward("shapes")(images[:1], ["a purple star"], [{}])


def test_jpeg_rewards_are_file_sizes_in_kb_and_favour_flat_images(tmp_path):
    rng = np.random.default_rng(1)
    flat = np.full((2, 64, 64, 3), 128, np.uint8)
    noise = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    images = np.concatenate([flat, noise])
    comp, d = build_reward("jpeg_compressibility")(images, [""] * 4, [{}] * 4)
    incomp, _ = build_reward("jpeg_incompressibility")(images, [""] * 4, [{}] * 4)
    # the size in kB (1000 bytes) of the file PIL writes at quality 95 (DDPO's measure)
    on_disk = []
    for i, img in enumerate(images):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(img).save(path, quality=95)
        on_disk.append(os.path.getsize(path) / 1000)
    np.testing.assert_allclose(incomp, on_disk, rtol=0, atol=1e-6)
    assert np.array_equal(comp, -incomp) and np.array_equal(d["size_kb"], incomp)
    # a flat 64x64 image is little more than the JPEG headers and tables (< 1 kB); uniform
    # noise keeps a large share of its 12,288 raw bytes even at 4:2:0 chroma subsampling
    assert np.all((incomp[:2] > 0.3) & (incomp[:2] < 1.0))
    assert np.all((incomp[2:] > 4.0) & (incomp[2:] < 12.3))
    assert comp[0] > comp[2] and incomp[2] > 5 * incomp[0]  # noise is far bigger than flat


def test_weighted_combines_rewards(shapes_batch):
    images, prompts, meta = shapes_batch
    w = build_reward("weighted", weights={"shapes": 1.0, "jpeg_compressibility": 0.1})
    total, d = w(images, prompts, meta)
    s, _ = build_reward("shapes")(images, prompts, meta)
    j, _ = build_reward("jpeg_compressibility")(images, prompts, meta)
    np.testing.assert_allclose(total, s + 0.1 * j, rtol=1e-6)
    assert {"shapes", "jpeg_compressibility", "shapes/strict", "jpeg_compressibility/size_kb"} <= set(d)


@pytest.fixture
def dummy_rewards() -> RewardRegistry:
    """A registry of the test's own: the built-in rewards and two broken ones."""
    def nan_dummy():
        return lambda images, prompts, metadata: (np.array([0.5] + [np.nan] * (len(images) - 1)), {})

    def shape_dummy():
        return lambda images, prompts, metadata: (np.zeros((len(images), 2), np.float32), {})

    return RewardRegistry.builtin().with_rewards({"test_nan_dummy": nan_dummy, "test_shape_dummy": shape_dummy})


def test_broken_rewards_raise_reward_error_naming_them(dummy_rewards):
    images = np.zeros((3, 8, 8, 3), np.uint8)
    with pytest.raises(RewardError, match=r"'test_nan_dummy'.*2 non-finite"):
        dummy_rewards.build("test_nan_dummy")(images, [""] * 3, [{}] * 3)
    with pytest.raises(RewardError, match=r"'test_shape_dummy'.*\(3, 2\)"):
        dummy_rewards.build("test_shape_dummy")(images, [""] * 3, [{}] * 3)
    w = dummy_rewards.build("weighted", weights={"brightness": 1.0, "test_nan_dummy": 1.0})
    with pytest.raises(RewardError, match="test_nan_dummy"):
        w(images, [""] * 3, [{}] * 3)


# ----------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random tiny CLIPModel plus the project's word-level tokenizer, saved to disk."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from tempflow_core.policies.tiny_parts import write_clip_tokenizer_files

    folder = tmp_path_factory.mktemp("tiny-clip")
    write_clip_tokenizer_files(folder)
    tok = CLIPTokenizer.from_pretrained(str(folder))
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(cfg).save_pretrained(str(folder))
    return folder


def _reference_logits(folder, images, prompts):
    """CLIPModel.forward's logits_per_image with transformers' own (PIL) image processor."""
    import torch
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(str(folder)).eval()
    tok = CLIPTokenizer.from_pretrained(str(folder))
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixels = proc(images=list(images), return_tensors="pt")["pixel_values"]
    ids = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=pixels)
    return out.logits_per_image.diagonal().numpy(), float(model.logit_scale.detach().exp())


def test_clipscore_and_pickscore_match_clipmodel_forward(tiny_clip_dir, shapes_batch):
    images, prompts, meta = shapes_batch
    images, prompts, meta = images[:6], prompts[:6], meta[:6]
    ref_logits, scale = _reference_logits(tiny_clip_dir, images, prompts)
    opts = {"clipscore": {"model": str(tiny_clip_dir), "device": "cpu", "batch_size": 4},
            "pickscore": {"model": str(tiny_clip_dir), "device": "cpu"}}
    cos, d = build_reward("clipscore", options=opts)(images, prompts, meta)
    assert cos.shape == (6,) and np.all(np.abs(cos) <= 1)
    # torch bicubic resizing differs a little from PIL's (measured 1.5e-4 in cosine)
    np.testing.assert_allclose(cos, ref_logits / scale, atol=2e-3)
    np.testing.assert_allclose(d["clip_s"], 2.5 * np.maximum(cos, 0))
    pick, pd = build_reward("pickscore", options=opts)(images, prompts, meta)
    np.testing.assert_allclose(pd["raw"], ref_logits, atol=2e-3 * scale)
    np.testing.assert_allclose(pick, pd["raw"] / 26, rtol=1e-6)
    # batching does not change the scores, and prompts matter
    again, _ = build_reward("clipscore", options={"clipscore": {**opts["clipscore"], "batch_size": 6}})(
        images, prompts, meta)
    np.testing.assert_allclose(again, cos, atol=1e-5)
    other, _ = build_reward("clipscore", options=opts)(images, prompts[::-1], meta)
    assert not np.allclose(other, cos)


def test_clip_rewards_need_a_local_model(tmp_path):
    with pytest.raises(ValueError, match="clipscore.*model"):
        build_reward("clipscore")
    with pytest.raises(FileNotFoundError, match="pickscore"):
        build_reward("pickscore", options={"pickscore": {"model": str(tmp_path / "missing")}})


def test_a_reward_whose_optional_dependency_is_missing_names_the_extra_to_install(monkeypatch):
    """Not an unknown name: the registry knows `ocr` and says which extra brings RapidOCR."""
    from tempflow_core.run.preflight import PreflightError, check_reward

    monkeypatch.setitem(sys.modules, "rapidocr", None)  # as if not installed
    registry = RewardRegistry.builtin()
    assert registry.is_known("ocr") and "ocr" in registry.names()
    with pytest.raises(RewardError, match=r"reward 'ocr' needs the package rapidocr.*pip install 'tempflow\[ocr\]'"):
        registry.build("ocr")
    with pytest.raises(PreflightError, match=r"reward\.name: reward 'ocr' needs the package rapidocr.*tempflow\[ocr\]"):
        check_reward("ocr", {}, {}, "reward.name", rewards=registry)


def test_a_run_registry_holds_the_plugins_rewards_and_nothing_leaks_between_registries(tmp_path, monkeypatch):
    from tempflow_core.config import load_config
    from tempflow_core.run.preflight import PreflightError, reward_registry

    (tmp_path / "my_rewards.py").write_text(
        "import numpy as np\n"
        "def darkness():\n"
        "    return lambda images, prompts, metadata: (1 - images.reshape(len(images), -1).mean(1) / 255.0, {})\n"
        "REWARDS = {'darkness': darkness}\n")
    (tmp_path / "not_rewards.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, ["reward.name=darkness", "reward.plugins=[my_rewards]"])
    mine = RewardRegistry.for_config(cfg.reward)
    images = np.full((2, 4, 4, 3), 255, np.uint8)
    assert mine.build("darkness")(images, ["", ""], [{}, {}])[0].tolist() == [0.0, 0.0]
    assert not RewardRegistry.builtin().is_known("darkness")  # another registry: the built-in rewards only
    with pytest.raises(RewardError, match="registered already"):
        mine.with_rewards({"shapes": lambda: None})
    with pytest.raises(PreflightError, match=r"reward\.plugins: reward plugin 'not_rewards' defines no REWARDS"):
        reward_registry(["not_rewards"])
    with pytest.raises(PreflightError, match=r"reward\.plugins: reward plugin 'no_such_module' cannot be imported"):
        reward_registry(["no_such_module"])
    assert "plugins" not in load_config(None, []).canonical_dump()["reward"]  # digests of earlier runs stay


def test_a_run_from_a_deployment_imports_only_the_reward_plugins_the_operator_allows(tmp_path, monkeypatch):
    from tempflow_core.config import load_config
    from tempflow_core.run.preflight import PLUGINS_ENV, PreflightError, preflight

    (tmp_path / "served_rewards.py").write_text("REWARDS = {'zero': lambda: (lambda i, p, m: ([0.0] * len(i), {}))}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    cfg = load_config(None, ["reward.name=zero", "reward.plugins=[served_rewards]"])
    preflight(cfg, check_store=False)  # the CLI's own run: the user's Python path
    with pytest.raises(PreflightError, match=r"reward\.plugins: .*'served_rewards' unless the operator allows it"):
        preflight(cfg, roots=[tmp_path], check_store=False)
    monkeypatch.setenv(PLUGINS_ENV, "other, served_rewards")
    preflight(cfg, roots=[tmp_path], check_store=False)
