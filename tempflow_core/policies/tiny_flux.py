"""The tiny FluxPipeline: the real diffusers and transformers classes at toy widths, random weights.

FluxTransformer2DModel (double- and single-stream blocks, guidance embedding), an
AutoencoderKL with FLUX's latent scaling and shift, a CLIPTextModel (pooled prompt) and a
T5EncoderModel (prompt sequence), with FLUX.1-dev's scheduler config (dynamic shift). Both
tokenizers are built here, offline: the word-level CLIP BPE of models.py and a T5 Unigram
tokenizer over the same words (plus single characters, so any text tokenizes). Nothing downloads.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from tempflow_core.config import TinyModelConfig
from tempflow_core.policies.tiny_parts import TINY_VOCAB_WORDS, tiny_vae, write_clip_tokenizer_files

# FLUX.1-dev's scheduler/scheduler_config.json (black-forest-labs/FLUX.1-dev)
FLUX_SCHEDULER_CONFIG: tuple[tuple[str, Any], ...] = (
    ("base_image_seq_len", 256), ("base_shift", 0.5), ("max_image_seq_len", 4096), ("max_shift", 1.15),
    ("num_train_timesteps", 1000), ("shift", 3.0), ("use_dynamic_shifting", True),
)
FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159  # FLUX.1-dev vae/config.json


def t5_vocab(words: list[str]) -> list[tuple[str, float]]:
    """A T5 Unigram vocab: <pad>=0, </s>=1, <unk>=2, then '▁word' pieces (score -1) that keep every
    listed word whole, then single characters with and without '▁' (score -8), so any lowercase
    text made of ASCII letters, digits and punctuation tokenizes without <unk>."""
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    seen = {p for p, _ in vocab}
    for w in sorted(set(words)):
        if "▁" + w not in seen:
            vocab.append(("▁" + w, -1.0))
            seen.add("▁" + w)
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&%+*=#@_"
    for c in chars:
        for piece in (c, "▁" + c):
            if piece not in seen:
                vocab.append((piece, -8.0))
                seen.add(piece)
    return vocab


def build_t5_tokenizer(words: list[str], max_length: int):
    """transformers' T5Tokenizer (tokenizers Unigram backend) over `t5_vocab(words)`, no sentinels."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=t5_vocab(words), extra_ids=0, model_max_length=max_length)


def build_tiny_flux_pipeline(cfg: TinyModelConfig | None = None, workdir: str | Path | None = None):
    """A random FluxPipeline sized by `cfg` (cfg.family should be 'flux').

    Widths: CLIP and T5 are `text_width` wide (pooled projection and joint attention dims of the
    transformer), the transformer has `layers` double- and `layers` single-stream blocks of
    `heads` x `head_dim`, rotary axes split head_dim as (d - 2r, r, r). Latents have
    `latent_channels` channels; the transformer's in_channels is 4x that (2x2 packing).

    Args:
        workdir: where the CLIP tokenizer files are written before loading (a temp dir if None).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel


    cfg = cfg or TinyModelConfig(family="flux")
    down = len(cfg.vae_channels) - 1
    latent = cfg.resolution // (2**down)
    if latent % 2:
        raise ValueError(f"latent size {latent} (resolution {cfg.resolution} / 2**{down}) must be even: FLUX packs 2x2 patches")
    if cfg.head_dim % 4 or cfg.head_dim < 8:
        raise ValueError(f"head_dim {cfg.head_dim} must be a multiple of 4 and >= 8 (FLUX's three rotary axes "
                         "take even, non-zero widths)")
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="tempflow-tok-") as tmp:
        folder = tmp if workdir is None else str(workdir)
        write_clip_tokenizer_files(folder, max_length=cfg.max_tokens)
        tokenizer = CLIPTokenizer.from_pretrained(folder)  # read into memory; the folder may go
    tokenizer_2 = build_t5_tokenizer(TINY_VOCAB_WORDS, cfg.max_tokens)

    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=max(1, cfg.text_width // 16),
        max_position_embeddings=cfg.max_tokens, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=cfg.text_width, d_kv=16, d_ff=4 * cfg.text_width,
        num_layers=cfg.text_layers, num_heads=max(1, cfg.text_width // 16), relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    vae = tiny_vae(cfg, FLUX_VAE_SCALING, FLUX_VAE_SHIFT)
    rope = cfg.head_dim // 4 // 2 * 2  # even widths: e.g. head_dim 16 -> (8, 4, 4)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * cfg.latent_channels, num_layers=cfg.layers, num_single_layers=cfg.layers,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads, joint_attention_dim=cfg.text_width,
        pooled_projection_dim=cfg.text_width, guidance_embeds=True,
        axes_dims_rope=(cfg.head_dim - 2 * rope, rope, rope),
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**dict(FLUX_SCHEDULER_CONFIG)), vae=vae, text_encoder=clip,
        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer,
    )
