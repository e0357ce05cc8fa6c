"""The FLUX.1 policy: a diffusers FluxPipeline with a peft LoRA on its transformer.

What differs from SD3 (sd3.py), all inside this class so that rollouts, the learner,
evaluation and export see the same [N, C, H, W] latents and the same calls:

* Guidance-distilled: FLUX.1-dev takes the guidance value (3.5) as an input of its guidance
  embedding; there is no CFG pair, so a step is ONE transformer call on N rows (SD3: 2N rows).
  `guidance_scale` is that value; it is ignored by a transformer without guidance embeds
  (FLUX.1-schnell).
* Packed latents: the transformer sees 2x2 patches of the latent as tokens,
  [N, C, H, W] -> [N, (H/2)(W/2), 4C], with 3-axis rotary ids per token (image ids: (0, row,
  col); text ids: zeros). Packing and ids are diffusers' own `FluxPipeline._pack_latents`,
  `_unpack_latents` and `_prepare_latent_image_ids`.
* Prompts: CLIP-L pooled [B, 768] + T5 sequence [B, L, 4096] (`FluxPipeline.encode_prompt`),
  L = 512 for FLUX.1-dev unless model.max_sequence_length says otherwise.
* Grid: FluxPipeline's sigmas linspace(1, 1/T, T) shifted by exp(mu), mu = calculate_shift of
  the image's token count (H/2)(W/2) between the scheduler config's base and max shift.

Shapes: N rows, C latent channels (16 for FLUX.1), H, W latent size (pixels / 8), L text tokens.
"""

from __future__ import annotations

import torch

from tempflow_core.config import LoraSettings
from tempflow_core.families import family_defaults
from tempflow_core.batches import PromptEmbeds


from tempflow_core.policies.base import FlowPolicy
def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, (H/2)(W/2), 4C] tokens, diffusers' FluxPipeline._pack_latents."""
    from diffusers import FluxPipeline

    n, c, h, w = x.shape
    return FluxPipeline._pack_latents(x, n, c, h, w)


def unpack_latents(tokens: torch.Tensor, h: int, w: int, vae_scale_factor: int) -> torch.Tensor:
    """[N, (H/2)(W/2), 4C] -> [N, C, H, W], diffusers' FluxPipeline._unpack_latents (which takes
    the image size in pixels: H * vae_scale_factor)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(tokens, h * vae_scale_factor, w * vae_scale_factor, vae_scale_factor)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[(H/2)(W/2), 3] rotary ids (0, row, col) of the packed latent tokens."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)


class FluxPolicy(FlowPolicy):
    """Velocity predictions (guidance as an input), LoRA handling and decoding for one FluxPipeline.

    Args:
        pipe: a loaded FluxPipeline (tiny or FLUX.1-dev).
        lora: LoRA settings; None leaves the transformer without an adapter (pure sampling).
        device: 'auto', 'cpu' or 'cuda[:i]'.
        max_sequence_length: T5 tokens; None: 512 (FLUX.1-dev), capped by the T5 tokenizer's
            model_max_length (16 for the tiny model).
        resolution: pixels; None: the VAE's sample size (1024 for FLUX.1-dev).
    """

    family = "flux"

    def __init__(self, pipe, lora: LoraSettings | None, device: str = "auto", max_sequence_length: int | None = None,
                 resolution: int | None = None, gradient_checkpointing: bool = False):
        if max_sequence_length is None:
            max_sequence_length = min(family_defaults("flux").text_tokens, int(pipe.tokenizer_2.model_max_length))
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"model.max_sequence_length={max_sequence_length}: FLUX's T5 needs 1..512 tokens "
                             "(512 for FLUX.1-dev; leave it unset)")
        self.max_sequence_length = max_sequence_length
        super().__init__(pipe, lora, device, resolution, gradient_checkpointing)

    def _text_encoders(self) -> list[torch.nn.Module | None]:
        return [self.pipe.text_encoder, self.pipe.text_encoder_2]

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """CLIP pooled + T5 sequence; no negative prompt (guidance-distilled, no CFG)."""
        with self.encoding():
            embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                        max_sequence_length=self.max_sequence_length)
        embeds, pooled = embeds.float(), pooled.float()  # [B, L, D], [B, Dp]
        return PromptEmbeds(embeds, pooled, embeds[:0].clone(), pooled[:0].clone())  # no negative: zero rows

    # ------------------------------------------------------------------ velocity
    def velocity(
        self,
        x: torch.Tensor,  # [N, C, H, W]
        t: torch.Tensor,  # [N] in [0, 1] (sigma), or a scalar
        cond: PromptEmbeds,  # embeds [N, L, D] T5, pooled [N, Dp] CLIP; no negative (no CFG pair)
        guidance_scale: float,
    ) -> torch.Tensor:
        """v(x, t | c, g) in one transformer call on N rows. Returns float32 [N, C, H, W]."""
        (n, _, h, w), embeds, pooled = x.shape, cond.embeds, cond.pooled
        dev, dtype = self.device, self.transformer.dtype
        t = torch.as_tensor(t, dtype=torch.float32, device=dev)
        t = t.expand(n) if t.ndim == 0 else t
        guidance = None
        if self.transformer.config.guidance_embeds:  # FLUX.1-dev; schnell has none
            guidance = torch.full((n,), float(guidance_scale), device=dev, dtype=torch.float32)
        tokens = pack_latents(x.to(dev, dtype))  # [N, (H/2)(W/2), 4C]
        out = self.transformer(
            hidden_states=tokens, timestep=t.to(dtype), guidance=guidance, pooled_projections=pooled.to(dev, dtype),
            encoder_hidden_states=embeds.to(dev, dtype), txt_ids=torch.zeros(embeds.shape[1], 3, device=dev, dtype=dtype),
            img_ids=image_ids(h, w, dev, dtype), return_dict=False,
        )[0]  # [N, (H/2)(W/2), 4C]; the transformer scales t and guidance by 1000 itself
        self.forward_calls += 1
        self.nfe += n
        return unpack_latents(out, h, w, self.pipe.vae_scale_factor).float()

    # ------------------------------------------------------------------ images
    def text_tokens(self) -> int:
        """Tokens of one prompt's conditioning: T5's."""
        return int(self.max_sequence_length)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        """(C, H, W) of one unpacked latent: C = in_channels / 4, H = W = pixels / vae_scale_factor (even)."""
        resolution = resolution or self.resolution or int(self.pipe.vae.config.sample_size)
        step = self.pipe.vae_scale_factor * 2  # 2x2 packing needs an even latent side
        if resolution % step:
            raise ValueError(f"resolution {resolution} must be a multiple of {step} for this FLUX model")
        side = resolution // self.pipe.vae_scale_factor
        return (self.transformer.config.in_channels // 4, side, side)
