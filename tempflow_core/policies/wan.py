"""The Wan policy (Wan2.1-style text-to-video): a diffusers WanPipeline with a peft LoRA on its transformer.

What differs from the image families, all inside this class:

* Latents of a clip have a frame axis: one sample is [C, F', H, W] (F' = (frames - 1) / 4 + 1
  latent frames for Wan2.1's VAE). The SDE, its log-density (a mean over every latent element)
  and the learner take any rank; the rollout draws noise of `latent_shape()`.
* CFG as WanPipeline does it: a conditional and a negative ("") call of N rows each, combined
  v_neg + g (v_cond - v_neg); 2N rows a step. No pooled embedding; UMT5 tokens padded with zeros
  to model.max_sequence_length (512 unset, the pipeline's), as the pipeline pads them, no mask.
* Grid: the scheduler's static flow shift (3.0 for Wan2.1 at 480p).
* Decoding: AutoencoderKLWan de-normalised with its latents_mean / latents_std; a clip goes on
  as a frame strip, its frames side by side ([H', F W', 3]), so that shards, rewards, the MLflow
  log and evaluation carry a clip as one image (`rewards.clips.split_strips` cuts it back into frames).

Shapes: N rows, C latent channels (16 for Wan2.1), F' latent frames, H, W latent size, L text tokens.
"""

from __future__ import annotations

import torch

from tempflow_core.batches import PromptEmbeds
from tempflow_core.config import LoraSettings
from tempflow_core.families import family_spec
from tempflow_core.policies.base import FlowPolicy

NATIVE = (480, 33)  # pixels and frames when the VAE config names none: Wan2.1 at 480p, Flow-GRPO's clip length


class WanPolicy(FlowPolicy):
    """Velocity predictions (CFG as two calls), LoRA handling and decoding for one WanPipeline.

    Args:
        pipe: a loaded WanPipeline (tiny or Wan2.1).
        lora: LoRA settings; None leaves the transformer without an adapter (pure sampling).
        device: 'auto', 'cpu' or 'cuda[:i]'.
        max_sequence_length: UMT5 tokens; None: 512 (WanPipeline's), capped by the tokenizer's
            model_max_length (16 for the tiny model).
        resolution: pixels of a square clip; None: the VAE config's sample_size (the tiny model), else 480.
        frames: frames of a clip (1 + 4k for Wan2.1); None: the VAE config's sample_frames, else 33.
    """

    family = "wan"
    uses_pooled = False

    def __init__(self, pipe, lora: LoraSettings | None, device: str = "auto", max_sequence_length: int | None = None,
                 resolution: int | None = None, gradient_checkpointing: bool = False, frames: int | None = None):
        if max_sequence_length is None:
            max_sequence_length = min(family_spec("wan").defaults.text_tokens, int(pipe.tokenizer.model_max_length))
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"model.max_sequence_length={max_sequence_length}: Wan's UMT5 reads 1..512 tokens "
                             "(leave it unset for 512)")
        self.max_sequence_length = max_sequence_length
        step = int(pipe.vae.config.scale_factor_temporal)
        self.frames = frames or int(pipe.vae.config.get("sample_frames", NATIVE[1]))
        if (self.frames - 1) % step:
            raise ValueError(f"{self.frames} frames: Wan's VAE takes 1 + {step}k frames (e.g. {1 + step * 8})")
        super().__init__(pipe, lora, device, resolution, gradient_checkpointing)

    def _text_encoders(self) -> list[torch.nn.Module | None]:
        return [self.pipe.text_encoder]

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """UMT5 hidden states, zero after each prompt's tokens (WanPipeline's padding); the negative "" likewise."""
        with self.encoding():
            embeds, neg = self.pipe.encode_prompt(prompt=prompts, negative_prompt=[""] * len(prompts),
                                                  do_classifier_free_guidance=True,
                                                  max_sequence_length=self.max_sequence_length, device=self.device)
        embeds, neg = embeds.float(), neg[:1].float()  # [B, L, D], [1, L, D]
        pooled = embeds.new_zeros(embeds.shape[0], 0)  # no pooled embedding
        return PromptEmbeds(embeds, pooled, neg, pooled[:1])

    # ------------------------------------------------------------------ velocity
    def velocity(
        self,
        x: torch.Tensor,  # [N, C, F', H, W]
        t: torch.Tensor,  # [N] in [0, 1] (sigma), or a scalar
        cond: PromptEmbeds,  # embeds [N, L, D]; the negative [1, L, D]
        guidance_scale: float,
    ) -> torch.Tensor:
        """v(x, t | c) with CFG as two transformer calls of N rows. Returns float32 [N, C, F', H, W]."""
        n = x.shape[0]
        dev, dtype = self.device, self.transformer.dtype
        t = torch.as_tensor(t, dtype=torch.float32, device=dev)
        t = t.expand(n) if t.ndim == 0 else t
        xx = x.to(dev, dtype)

        def call(embeds: torch.Tensor) -> torch.Tensor:
            self.forward_calls += 1
            return self.transformer(hidden_states=xx, timestep=t * 1000.0, encoder_hidden_states=embeds.to(dev, dtype),
                                    return_dict=False)[0].float()

        out = call(cond.embeds)
        if guidance_scale > 1.0:
            assert cond.neg_embeds.shape[0] == 1, "CFG needs the negative embedding"
            neg = call(cond.neg_embeds.expand(n, -1, -1))
            out = neg + guidance_scale * (out - neg)
        self.nfe += n
        return out

    # ------------------------------------------------------------------ shapes, clips
    def text_tokens(self) -> int:
        """Tokens of one prompt's conditioning: UMT5's (zero-padded)."""
        return int(self.max_sequence_length)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, ...]:
        """(C, F', H, W) of one clip's latent: F' = (frames - 1) / temporal scale + 1, H = W = pixels / spatial scale."""
        conf = self.pipe.vae.config
        resolution = resolution or self.resolution or int(conf.get("sample_size", NATIVE[0]))
        spatial, temporal = int(conf.scale_factor_spatial), int(conf.scale_factor_temporal)
        patch = self.transformer.config.patch_size
        if resolution % (spatial * patch[1]):
            raise ValueError(f"resolution {resolution} must be a multiple of {spatial * patch[1]} for this Wan model")
        side = resolution // spatial
        return (self.transformer.config.in_channels, (self.frames - 1) // temporal + 1, side, side)

    def pixels(self) -> int:
        return self.latent_shape()[-1] * int(self.pipe.vae.config.scale_factor_spatial)

    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """[n, C, F', H, W] -> [n, 3, H', F W'] frame strips, de-normalised as WanPipeline does."""
        vae = self.pipe.vae
        c = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1).to(z.device, z.dtype)
        video = vae.decode(z / inv_std + mean, return_dict=False)[0]  # [n, 3, F, H', W']
        return video.permute(0, 1, 3, 2, 4).flatten(3)  # [n, 3, H', F W']
