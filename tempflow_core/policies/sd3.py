"""The SD3 policy: a diffusers StableDiffusion3Pipeline with a peft LoRA on its transformer
(`families.make_policy` picks the policy of a pipeline's family).

The LoRA, reference (adapter disabled), decoding and grid live in base.FlowPolicy;
this file holds what is SD3's own: CLIP-L/G + T5 prompt encoding, CFG pairs in one
transformer call, the static-shift grid.
"""

from __future__ import annotations

import torch

from tempflow_core.config import LoraSettings
from tempflow_core.families import family_defaults
from tempflow_core.batches import PromptEmbeds
from tempflow_core.policies.base import FlowPolicy

__all__ = ["SD3Policy", "T5_TOKENS"]

T5_TOKENS = family_defaults("sd3").text_tokens  # T5 tokens of SD3.5 prompts when model.max_sequence_length is unset


class SD3Policy(FlowPolicy):
    """Velocity predictions with CFG, LoRA handling and decoding for one SD3 pipeline.

    Args:
        pipe: a loaded StableDiffusion3Pipeline (tiny or SD3.5-M).
        lora: LoRA settings; None leaves the transformer without an adapter (pure sampling).
        device: 'auto', 'cpu' or 'cuda[:i]'.
        max_sequence_length: T5 tokens (0 when the model has no T5).
    """

    family = "sd3"

    def __init__(self, pipe, lora: LoraSettings | None, device: str = "auto", max_sequence_length: int | None = None,
                 resolution: int | None = None, gradient_checkpointing: bool = False):
        if max_sequence_length is None:  # T5 tokens when the model has T5 (SD3.5), none otherwise
            max_sequence_length = T5_TOKENS if pipe.text_encoder_3 is not None else 0
        if pipe.text_encoder_3 is not None and max_sequence_length == 0:
            raise ValueError("model.max_sequence_length=0 but the model has a T5 encoder: T5 would get no tokens; "
                             "use 256 (SD3.5) or leave it unset")
        self.max_sequence_length = max_sequence_length
        super().__init__(pipe, lora, device, resolution, gradient_checkpointing)

    def _text_encoders(self) -> list[torch.nn.Module | None]:
        return [self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3]

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        with self.encoding():
            embeds, neg, pooled, neg_pooled = self._encode_many(prompts)
        return PromptEmbeds(embeds.float(), pooled.float(), neg[:1].float(), neg_pooled[:1].float())

    def _encode_many(self, prompts: list[str]):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        neg, _, neg_pooled, _ = self.pipe.encode_prompt(
            prompt=[""], prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return embeds, neg, pooled, neg_pooled

    # ------------------------------------------------------------------ velocity
    def velocity(
        self,
        x: torch.Tensor,  # [N, C, H, W]
        t: torch.Tensor,  # [N] in [0, 1] (sigma), or a scalar
        cond: PromptEmbeds,  # embeds [N, L, D], pooled [N, Dp]; the negative [1, L, D], [1, Dp]
        guidance_scale: float,
    ) -> torch.Tensor:
        """v(x, t | c) with classifier-free guidance, in one transformer call. Returns float32 [N, C, H, W]."""
        n, embeds, pooled, neg = x.shape[0], cond.embeds, cond.pooled, cond
        t = torch.as_tensor(t, dtype=torch.float32, device=self.device)
        t = t.expand(n) if t.ndim == 0 else t
        dtype = self.transformer.dtype
        if guidance_scale > 1.0:
            assert neg.neg_embeds.shape[0] == 1, "CFG needs the negative embedding"
            h = torch.cat([neg.neg_embeds.expand(n, -1, -1), embeds], 0)
            p = torch.cat([neg.neg_pooled.expand(n, -1), pooled], 0)
            xx = torch.cat([x, x], 0)
            tt = torch.cat([t, t], 0)
        else:
            h, p, xx, tt = embeds, pooled, x, t
        dev = self.device
        out = self.transformer(
            hidden_states=xx.to(dev, dtype), timestep=tt * 1000.0, encoder_hidden_states=h.to(dev, dtype),
            pooled_projections=p.to(dev, dtype), return_dict=False,
        )[0].float()
        self.forward_calls += 1
        self.nfe += n
        if guidance_scale > 1.0:
            v_uncond, v_cond = out.chunk(2)
            return v_uncond + guidance_scale * (v_cond - v_uncond)
        return out

    def text_tokens(self) -> int:
        """Tokens of one prompt's conditioning: CLIP's (padded) then T5's."""
        return int(self.pipe.tokenizer_max_length) + int(self.max_sequence_length)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        cfg = self.transformer.config
        resolution = resolution or self.resolution
        if resolution is None:
            side = cfg.sample_size
        else:
            if resolution % (self.pipe.vae_scale_factor * cfg.patch_size):
                raise ValueError(f"resolution {resolution} must be a multiple of "
                                 f"{self.pipe.vae_scale_factor * cfg.patch_size} for this model")
            side = resolution // self.pipe.vae_scale_factor
        return (cfg.in_channels, side, side)
