"""The tiny QwenImagePipeline: the real diffusers and transformers classes at toy widths, random weights.

QwenImageTransformer2DModel (dual-stream blocks, 3-axis rotary), an AutoencoderKLQwenImage (the
causal 3-D VAE, one frame) with identity latent statistics, a Qwen2_5_VLForConditionalGeneration
text encoder (a one-block vision tower it never uses for text) and a byte-level BPE Qwen2Tokenizer
trained here, offline, on the pipeline's prompt template and the tiny vocabulary, so that every
template word is one token: the template's prefix is then 34 tokens, as with Qwen-Image's own
tokenizer, and the pipeline's `prompt_template_encode_start_idx` drops exactly the template.
Qwen-Image's scheduler config (exponential dynamic shift, terminal stretch 0.02). Nothing downloads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tempflow_core.config import TinyModelConfig
from tempflow_core.families import QWEN_IMAGE_TEMPLATE, family_spec
from tempflow_core.policies.tiny_parts import TINY_VOCAB_WORDS

# Qwen/Qwen-Image scheduler/scheduler_config.json
QWEN_IMAGE_SCHEDULER_CONFIG: tuple[tuple[str, Any], ...] = (
    ("base_image_seq_len", 256), ("base_shift", 0.5), ("max_image_seq_len", 8192), ("max_shift", 0.9),
    ("num_train_timesteps", 1000), ("shift", 1.0), ("shift_terminal", 0.02), ("time_shift_type", "exponential"),
    ("use_dynamic_shifting", True),
)
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_qwen_tokenizer(words: list[str], max_length: int):
    """A byte-level BPE Qwen2Tokenizer whose merges keep the template's words and `words` whole
    (trained with `tokenizers` on them, deterministic); any other text falls back to bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    shape = Qwen2Tokenizer()  # Qwen2's normalizer and pre-tokenizer (split regex + byte level)
    bpe = Tokenizer(models.BPE())
    bpe.normalizer, bpe.pre_tokenizer = shape._tokenizer.normalizer, shape._tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=1 << 20, min_frequency=1, special_tokens=list(_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [QWEN_IMAGE_TEMPLATE.format(" ".join(words))] + [" " + w for w in words] + list(words)
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, model_max_length=max_length)
    tok.add_special_tokens({"additional_special_tokens": list(_SPECIALS[1:])})
    return tok


def build_tiny_qwen_image_pipeline(cfg: TinyModelConfig | None = None, workdir: str | Path | None = None):
    """A random QwenImagePipeline sized by `cfg` (cfg.family should be 'qwen-image').

    Widths: the text encoder is `text_width` wide (the transformer's joint attention dim), the
    transformer has `layers` dual-stream blocks of `heads` x `head_dim` with rotary axes
    (d - 2r, r, r); latents have `latent_channels` channels (in_channels 4x: 2x2 packing); the VAE
    has one level per entry of cfg.vae_channels (scale 2**(len - 1)). The tokenizer reads up to
    2 * max_tokens tokens after the template (the prompt and the template's 5 closing tokens).

    Args:
        workdir: unused (the tokenizer is built in memory); kept for the builders' common signature.
    """
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = cfg or TinyModelConfig(family="qwen-image")
    down = len(cfg.vae_channels) - 1
    latent = cfg.resolution // (2**down)
    if latent % 2:
        raise ValueError(f"latent size {latent} (resolution {cfg.resolution} / 2**{down}) must be even: Qwen-Image packs 2x2 patches")
    if cfg.head_dim % 4 or cfg.head_dim < 8:
        raise ValueError(f"head_dim {cfg.head_dim} must be a multiple of 4 and >= 8 (three rotary axes of even width)")
    if cfg.text_width % 16:
        raise ValueError(f"text_width {cfg.text_width} must be a multiple of 16 (Qwen2.5-VL heads of 16 with mrope)")
    base = cfg.vae_channels[0]
    if any(c % base for c in cfg.vae_channels):
        raise ValueError(f"vae_channels {cfg.vae_channels} must be multiples of the first (the VAE's dim_mult)")
    torch.manual_seed(cfg.seed)
    tokenizer = build_qwen_tokenizer(TINY_VOCAB_WORDS, family_spec("qwen-image").tiny_tokens_factor * cfg.max_tokens)

    heads = cfg.text_width // 16  # head_dim 16: mrope sections (2, 3, 3) of its 8 rotary pairs
    text = dict(vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
                num_hidden_layers=cfg.text_layers, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=1024, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=1, out_hidden_size=cfg.text_width,
                  patch_size=2, spatial_merge_size=1, temporal_patch_size=1, fullatt_block_indexes=[0], window_size=4)
    unused = len(tokenizer)  # image / video token ids past the vocabulary: text never contains them
    encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=unused, video_token_id=unused + 1,
        vision_start_token_id=unused + 2, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    c = cfg.latent_channels
    vae = AutoencoderKLQwenImage(base_dim=base, z_dim=c, dim_mult=[ch // base for ch in cfg.vae_channels],
                                 num_res_blocks=1, attn_scales=[], temperal_downsample=[False] * down,
                                 latents_mean=[0.0] * c, latents_std=[1.0] * c)
    vae.register_to_config(sample_size=cfg.resolution)  # the folder's native size (Qwen-Image's VAE has none: 1024)
    rope = cfg.head_dim // 4 // 2 * 2  # even widths: e.g. head_dim 16 -> (8, 4, 4)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * c, out_channels=c, num_layers=cfg.layers, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads, joint_attention_dim=cfg.text_width, guidance_embeds=False,
        axes_dims_rope=(cfg.head_dim - 2 * rope, rope, rope),
    )
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**dict(QWEN_IMAGE_SCHEDULER_CONFIG)), vae=vae,
                             text_encoder=encoder, tokenizer=tokenizer, transformer=transformer)
