"""Tiny model save/load offline, LoRA export into plain diffusers, prompt encoding."""

import json
import subprocess
import sys

import torch

from tempflow_core.batches import PromptEmbeds
from tempflow_core.config import LoraSettings, TinyModelConfig
from tempflow_core.policies.models import load_pipeline
from tempflow_core.policies.tiny_parts import TINY_VOCAB_WORDS, write_clip_tokenizer_files
from tempflow_core.policies.sd3 import SD3Policy


def test_tokenizer_keeps_every_vocab_word_whole(tmp_path):
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert [w for w in TINY_VOCAB_WORDS if len(tok.tokenize(w)) != 1] == []
    ids = tok("Two RED circles left of a blue square.", padding="max_length", max_length=16)["input_ids"]
    assert len(ids) == 16 and ids[0] == tok.bos_token_id
    pieces = tok.tokenize("zebra")  # unknown words fall back to sub-word pieces, never to <unk>
    assert len(pieces) > 1 and "".join(pieces) == "zebra</w>" and tok.unk_token_id not in tok.convert_tokens_to_ids(pieces)


def test_tiny_pipeline_is_a_real_sd3_pipeline_loaded_offline(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["text_encoder"][1] == "CLIPTextModelWithProjection"
    assert not list(tiny_model_dir.rglob("*.bin")) and list(tiny_model_dir.rglob("*.safetensors"))
    # a fresh interpreter with the hub switched off loads it and runs diffusers' own __call__
    code = (
        "import torch; from tempflow_core.policies.models import load_pipeline;"
        f"p = load_pipeline({str(tiny_model_dir)!r});"
        "img = p('a red circle', num_inference_steps=2, height=32, width=32, max_sequence_length=0,"
        " generator=torch.Generator().manual_seed(0), output_type='np').images;"
        "print(img.shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(1, 32, 32, 3)" in out.stdout


def test_missing_model_folder_is_named(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_pipeline(tmp_path / "nope")


def test_lora_saved_by_policy_loads_into_plain_diffusers(tiny_pipe, tiny_model_dir, tmp_path):
    pol = SD3Policy(tiny_pipe, LoraSettings(rank=4, alpha=8), "cpu")
    with torch.no_grad():
        for n, p in pol.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    path = pol.save_lora(tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors"
    emb = pol.encode_prompts(["a red circle"])
    x = torch.randn(1, 4, 8, 8)
    v_pol = pol.velocity(x, torch.tensor(0.6), emb, 4.5)
    with pol.reference():
        v_ref = pol.velocity(x, torch.tensor(0.6), emb, 4.5)
    assert (v_pol - v_ref).abs().max() > 1e-4

    plain = load_pipeline(tiny_model_dir)
    plain.load_lora_weights(str(tmp_path / "lora"))
    other = SD3Policy(plain, None, "cpu")
    v_plain = other.velocity(x, torch.tensor(0.6), emb, 4.5)
    torch.testing.assert_close(v_plain, v_pol, rtol=1e-4, atol=1e-5)

    # and back into a fresh policy through load_lora
    again = SD3Policy(load_pipeline(tiny_model_dir), LoraSettings(rank=4, alpha=8), "cpu")
    again.load_lora(tmp_path / "lora")
    torch.testing.assert_close(again.velocity(x, torch.tensor(0.6), emb, 4.5), v_pol)


def test_gaussian_init_lora_starts_equal_to_reference(tiny_pipe):
    pol = SD3Policy(tiny_pipe, LoraSettings(rank=4, alpha=8, init="gaussian"), "cpu")
    n_lora = sum(p.numel() for p in pol.lora_parameters())
    assert n_lora > 0
    targets = {n.split(".lora_")[0].split(".", 2)[-1] for n, _ in pol.transformer.named_parameters() if "lora_A" in n}
    assert {"attn.to_q", "attn.add_k_proj", "attn.to_add_out"} <= targets
    emb = pol.encode_prompts(["a blue square", "a red circle"])
    x = torch.randn(2, 4, 8, 8)
    v = pol.velocity(x, torch.tensor([0.9, 0.2]), emb, 3.0)
    with pol.reference():
        torch.testing.assert_close(pol.velocity(x, torch.tensor([0.9, 0.2]), emb, 3.0), v)
    assert emb.embeds.shape == (2, 16, 64) and emb.neg_embeds.shape == (1, 16, 64)


def test_cfg_combines_conditional_and_unconditional(tiny_pipe):
    pol = SD3Policy(tiny_pipe, None, "cpu")
    emb = pol.encode_prompts(["a red circle"])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(0.5)
    v_c = pol.velocity(x, t, emb, 1.0)
    v_u = pol.velocity(x, t, PromptEmbeds(emb.neg_embeds, emb.neg_pooled, emb.neg_embeds, emb.neg_pooled), 1.0)
    torch.testing.assert_close(pol.velocity(x, t, emb, 4.0), v_u + 4.0 * (v_c - v_u),
                               rtol=1e-4, atol=1e-5)


def test_tiny_config_sizes_are_respected(tmp_path):
    from tempflow_core.policies.models import build_tiny_pipeline

    p = build_tiny_pipeline(TinyModelConfig(resolution=64, vae_channels=[8, 16, 16], layers=1), tmp_path)
    assert p.vae_scale_factor == 4 and p.transformer.config.sample_size == 16
