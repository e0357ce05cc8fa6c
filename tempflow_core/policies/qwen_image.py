"""The Qwen-Image policy: a diffusers QwenImagePipeline with a peft LoRA on its transformer.

What differs from SD3 (sd3.py) and FLUX (flux.py), all inside this class so that rollouts, the
learner, evaluation and export see the same [N, C, H, W] latents and the same calls:

* True CFG: the conditional and the negative prompt (" ", the model card's) are two transformer
  calls of N rows each, as QwenImagePipeline makes them; the combination
  v_neg + g (v_cond - v_neg) is rescaled, token by token, to the conditional prediction's norm.
  A CFG step costs 2N rows (`FamilySpec.rows_per_sample`).
* Conditioning without a pooled embedding, with a mask: Qwen2.5-VL's last hidden states of the
  prompt inside the pipeline's chat template, the template's first 34 tokens dropped
  (`QwenImagePipeline.encode_prompt`). Prompts have different lengths, so every batch is padded
  to L = model.max_sequence_length tokens (256 unset) and `PromptEmbeds.mask` marks the valid
  ones; a prompt longer than L is refused, not cut. `pooled` is [B, 0].
* Packed latents: 2x2 patches as tokens, [N, C, H, W] -> [N, (H/2)(W/2), 4C]; the transformer's
  rotary ids come from `img_shapes` (1 frame, H/2, W/2).
* VAE: AutoencoderKLQwenImage is a causal 3-D VAE; one image is one frame, and latents are
  de-normalised with the VAE's per-channel latents_mean / latents_std before decoding.
* Grid: linspace(1, 1/T, T) shifted by exp(mu) (mu from the image's token count between the
  scheduler's base and max shift), drawn by the folder's own scheduler config, which also
  stretches the grid to end at shift_terminal (0.02 for Qwen-Image).

Shapes: N rows, C latent channels (16 for Qwen-Image), H, W latent size (pixels / 8), L text tokens.
"""

from __future__ import annotations

import torch

from tempflow_core.batches import PromptEmbeds
from tempflow_core.config import LoraSettings
from tempflow_core.families import family_spec
from tempflow_core.policies.base import FlowPolicy

NEGATIVE_PROMPT = family_spec("qwen-image").negative_prompt or " "
NATIVE = 1024  # pixels of QwenImagePipeline's default size (its VAE config has no sample_size; the tiny one's has)
MAX_TOKENS = 1024  # QwenImagePipeline.tokenizer_max_length: what the pipeline reads of a prompt


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, (H/2)(W/2), 4C] tokens, diffusers' QwenImagePipeline._pack_latents."""
    from diffusers import QwenImagePipeline

    n, c, h, w = x.shape
    return QwenImagePipeline._pack_latents(x, n, c, h, w)


def unpack_latents(tokens: torch.Tensor, h: int, w: int, vae_scale_factor: int) -> torch.Tensor:
    """[N, (H/2)(W/2), 4C] -> [N, C, H, W], diffusers' QwenImagePipeline._unpack_latents (which
    takes the size in pixels and returns a frame axis, dropped here)."""
    from diffusers import QwenImagePipeline

    return QwenImagePipeline._unpack_latents(tokens, h * vae_scale_factor, w * vae_scale_factor, vae_scale_factor)[:, :, 0]


class QwenImagePolicy(FlowPolicy):
    """Velocity predictions (true CFG), LoRA handling and decoding for one QwenImagePipeline.

    Args:
        pipe: a loaded QwenImagePipeline (tiny or Qwen-Image).
        lora: LoRA settings; None leaves the transformer without an adapter (pure sampling).
        device: 'auto', 'cpu' or 'cuda[:i]'.
        max_sequence_length: L, the prompt tokens every batch is padded to; None: 256, capped by
            the tokenizer's model_max_length (32 for the tiny model).
        resolution: pixels; None: the VAE config's sample_size where it has one (the tiny model),
            else 1024 (QwenImagePipeline's default size).
    """

    family = "qwen-image"
    uses_pooled, uses_mask = False, True

    def __init__(self, pipe, lora: LoraSettings | None, device: str = "auto", max_sequence_length: int | None = None,
                 resolution: int | None = None, gradient_checkpointing: bool = False):
        if max_sequence_length is None:
            max_sequence_length = min(family_spec("qwen-image").defaults.text_tokens, int(pipe.tokenizer.model_max_length))
        if not 1 <= max_sequence_length <= MAX_TOKENS:
            raise ValueError(f"model.max_sequence_length={max_sequence_length}: Qwen-Image reads 1..{MAX_TOKENS} "
                             "tokens of a prompt (leave it unset for 256)")
        self.max_sequence_length = max_sequence_length
        super().__init__(pipe, lora, device, resolution, gradient_checkpointing)

    def _text_encoders(self) -> list[torch.nn.Module | None]:
        return [self.pipe.text_encoder]

    def _scheduler_config(self) -> dict:
        return dict(self.pipe.scheduler.config)

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Qwen2.5-VL hidden states after the template, padded to L with a mask; the negative " " likewise."""
        with self.encoding():
            embeds, mask = self._encode(prompts)
            neg, neg_mask = self._encode([NEGATIVE_PROMPT])
        pooled = embeds.new_zeros(embeds.shape[0], 0)  # no pooled embedding
        return PromptEmbeds(embeds, pooled, neg, pooled[:1], mask, neg_mask)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L, D] float32 embeddings and [B, L] int64 mask of `prompts`."""
        embeds, mask = self.pipe.encode_prompt(prompt=prompts, device=self.device, max_sequence_length=MAX_TOKENS)
        b, n, d = embeds.shape
        mask = torch.ones(b, n, dtype=torch.long, device=embeds.device) if mask is None else mask.long()
        lengths = mask.sum(1)
        L = self.max_sequence_length
        if int(lengths.max()) > L:
            i = int(lengths.argmax())
            raise ValueError(f"prompt {prompts[i]!r} is {int(lengths[i])} Qwen2.5-VL tokens after the template, over "
                             f"model.max_sequence_length={L}: shorten it or raise model.max_sequence_length")
        out = embeds.new_zeros(b, L, d, dtype=torch.float32)
        out[:, :min(n, L)] = embeds[:, :L].float()
        full = mask.new_zeros(b, L)
        full[:, :min(n, L)] = mask[:, :L]
        return out * full[..., None], full  # padding rows are zeros, as the pipeline pads them

    # ------------------------------------------------------------------ velocity
    def velocity(
        self,
        x: torch.Tensor,  # [N, C, H, W]
        t: torch.Tensor,  # [N] in [0, 1] (sigma), or a scalar
        cond: PromptEmbeds,  # embeds [N, L, D], mask [N, L]; the negative [1, L, D], [1, L]
        guidance_scale: float,
    ) -> torch.Tensor:
        """v(x, t | c) with true CFG: one transformer call on the N conditional rows and, when
        guidance > 1, one on N negative rows. Returns float32 [N, C, H, W]."""
        n, _, h, w = x.shape
        dev, dtype = self.device, self.transformer.dtype
        t = torch.as_tensor(t, dtype=torch.float32, device=dev)
        t = t.expand(n) if t.ndim == 0 else t
        tokens = pack_latents(x.to(dev, dtype))  # [N, (H/2)(W/2), 4C]
        shapes = [[(1, h // 2, w // 2)]] * n

        def call(embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            self.forward_calls += 1
            return self.transformer(
                hidden_states=tokens, timestep=t.to(dtype), encoder_hidden_states=embeds.to(dev, dtype),
                encoder_hidden_states_mask=None if mask is None else mask.to(dev), img_shapes=shapes, return_dict=False,
            )[0].float()  # [N, (H/2)(W/2), 4C]; the transformer scales t by 1000 itself

        out = call(cond.embeds, cond.mask)
        if guidance_scale > 1.0:
            assert cond.neg_embeds.shape[0] == 1, "true CFG needs the negative embedding"
            neg_mask = None if cond.neg_mask is None else cond.neg_mask.expand(n, -1)
            neg = call(cond.neg_embeds.expand(n, -1, -1), neg_mask)
            comb = neg + guidance_scale * (out - neg)
            out = comb * (torch.norm(out, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        self.nfe += n
        return unpack_latents(out, h, w, self.pipe.vae_scale_factor)

    # ------------------------------------------------------------------ shapes, images
    def text_tokens(self) -> int:
        """Tokens of one prompt's conditioning: L (padded, masked)."""
        return int(self.max_sequence_length)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        """(C, H, W) of one unpacked latent: C = in_channels / 4, H = W = pixels / vae_scale_factor (even)."""
        resolution = resolution or self.resolution or int(self.pipe.vae.config.get("sample_size", NATIVE))
        step = self.pipe.vae_scale_factor * 2  # 2x2 packing needs an even latent side
        if resolution % step:
            raise ValueError(f"resolution {resolution} must be a multiple of {step} for this Qwen-Image model")
        side = resolution // self.pipe.vae_scale_factor
        return (self.transformer.config.in_channels // 4, side, side)

    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """[n, C, H, W] -> [n, 3, H', W']: one frame, de-normalised as QwenImagePipeline does."""
        vae = self.pipe.vae
        c = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1).to(z.device, z.dtype)
        return vae.decode(z[:, :, None] / inv_std + mean, return_dict=False)[0][:, :, 0]
