"""The tiny WanPipeline (Wan2.1-style text-to-video): the real diffusers and transformers classes at
toy widths, random weights.

WanTransformer3DModel (self- and cross-attention blocks over (frame, row, col) patches of 1x2x2),
an AutoencoderKLWan (causal 3-D VAE; each level halves the frames and the sides, so 5 frames are
2 latent frames) with identity latent statistics, a UMT5EncoderModel with the project's offline T5
Unigram tokenizer, and a FlowMatchEulerDiscreteScheduler with Wan's flow shift 3.0 (480p), so plain
WanPipeline samples on the grid the policy evaluates with. Nothing downloads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tempflow_core.config import TinyModelConfig
from tempflow_core.policies.tiny_flux import build_t5_tokenizer
from tempflow_core.policies.tiny_parts import TINY_VOCAB_WORDS

TINY_FRAMES = 5  # frames of a tiny clip: (5 - 1) / 4 + 1 = 2 latent frames


def build_tiny_wan_pipeline(cfg: TinyModelConfig | None = None, workdir: str | Path | None = None):
    """A random WanPipeline sized by `cfg` (cfg.family should be 'wan').

    The transformer has `layers` blocks of `heads` x `head_dim` reading a `text_width` UMT5; latents
    have `latent_channels` channels; the VAE has one level per entry of cfg.vae_channels (spatial
    scale 2**(len - 1), temporal the same: TINY_FRAMES frames are 2 latent frames). The VAE config
    records the clip's native size and frames (sample_size, sample_frames).

    Args:
        workdir: unused (the tokenizer is built in memory); kept for the builders' common signature.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = cfg or TinyModelConfig(family="wan")
    down = len(cfg.vae_channels) - 1
    latent = cfg.resolution // (2**down)
    if latent % 2:
        raise ValueError(f"latent size {latent} (resolution {cfg.resolution} / 2**{down}) must be even: Wan patches 2x2")
    if cfg.head_dim % 2 or cfg.head_dim < 6:
        raise ValueError(f"head_dim {cfg.head_dim} must be even and >= 6 (Wan's three rotary axes take even widths)")
    base = cfg.vae_channels[0]
    if any(c % base for c in cfg.vae_channels):
        raise ValueError(f"vae_channels {cfg.vae_channels} must be multiples of the first (the VAE's dim_mult)")
    torch.manual_seed(cfg.seed)
    tokenizer = build_t5_tokenizer(TINY_VOCAB_WORDS, cfg.max_tokens)
    encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=cfg.text_width, d_kv=16, d_ff=4 * cfg.text_width,
        num_layers=cfg.text_layers, num_heads=max(1, cfg.text_width // 16), relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    c = cfg.latent_channels
    vae = AutoencoderKLWan(base_dim=base, z_dim=c, dim_mult=[ch // base for ch in cfg.vae_channels], num_res_blocks=1,
                           attn_scales=[], temperal_downsample=[True] * down, latents_mean=[0.0] * c,
                           latents_std=[1.0] * c, scale_factor_temporal=2**down, scale_factor_spatial=2**down)
    vae.register_to_config(sample_size=cfg.resolution, sample_frames=TINY_FRAMES)  # the folder's native clip
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim, in_channels=c,
        out_channels=c, text_dim=cfg.text_width, freq_dim=32, ffn_dim=4 * cfg.heads * cfg.head_dim,
        num_layers=cfg.layers, rope_max_seq_len=64,
    )
    return WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
