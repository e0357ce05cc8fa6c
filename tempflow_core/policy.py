"""The policy: a diffusers StableDiffusion3Pipeline with a peft LoRA on its transformer.

The reference policy is the same transformer with the adapter disabled, so no second copy
of the model is held. Text encoders and the VAE stay frozen; only LoRA weights train.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import LoraSettings
from .models import resolve_device

T5_TOKENS = 256  # T5 tokens of SD3.5 prompts when model.max_sequence_length is unset


@dataclass
class PromptEmbeds:
    """Encoded prompts; `neg_*` is the empty-prompt embedding used for CFG, kept once."""

    embeds: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor  # [B, Dp]
    neg_embeds: torch.Tensor  # [1, L, D]
    neg_pooled: torch.Tensor  # [1, Dp]

    def select(self, index: torch.Tensor) -> "PromptEmbeds":
        return PromptEmbeds(self.embeds[index], self.pooled[index], self.neg_embeds, self.neg_pooled)

    def to(self, device: torch.device | str) -> "PromptEmbeds":
        return PromptEmbeds(self.embeds.to(device), self.pooled.to(device), self.neg_embeds.to(device),
                            self.neg_pooled.to(device))


class Policy:
    """Velocity predictions with CFG, LoRA handling and decoding for one pipeline.

    Args:
        pipe: a loaded StableDiffusion3Pipeline (tiny or SD3.5-M).
        lora: LoRA settings; None leaves the transformer without an adapter (pure sampling).
        device: 'auto', 'cpu' or 'cuda[:i]'.
        max_sequence_length: T5 tokens (0 when the model has no T5).
    """

    def __init__(self, pipe, lora: LoraSettings | None, device: str = "auto", max_sequence_length: int | None = None,
                 resolution: int | None = None, gradient_checkpointing: bool = False):
        self.pipe = pipe
        self.device = resolve_device(device)
        if max_sequence_length is None:  # T5 tokens when the model has T5 (SD3.5), none otherwise
            max_sequence_length = T5_TOKENS if pipe.text_encoder_3 is not None else 0
        if pipe.text_encoder_3 is not None and max_sequence_length == 0:
            raise ValueError("model.max_sequence_length=0 but the model has a T5 encoder: T5 would get no tokens; "
                             "use 256 (SD3.5) or leave it unset")
        self.max_sequence_length = max_sequence_length
        self.resolution = resolution  # pixels; None: the transformer's native sample size
        pipe.to(self.device)
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.transformer):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        self.transformer = pipe.transformer
        self.forward_calls = 0  # transformer calls (one per chunk; CFG rides in the same call)
        self.nfe = 0  # sample-steps evaluated (a CFG pair counts once)
        self.has_lora = lora is not None
        if lora is not None:
            from peft import LoraConfig

            init = {"gaussian": "gaussian", "default": True}[lora.init]
            self.transformer.add_adapter(LoraConfig(
                r=lora.rank, lora_alpha=lora.alpha, init_lora_weights=init,
                target_modules=list(lora.target_modules),
            ))
            for p in self.lora_parameters():
                p.data = p.data.float()
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ parameters
    def lora_parameters(self) -> list[torch.nn.Parameter]:
        params = [p for n, p in self.transformer.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        return params

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.transformer).items()}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        own = set(get_peft_model_state_dict(self.transformer))
        missing = sorted(own - set(state))
        if missing:  # a partial state would silently keep the previous weights of those layers
            raise ValueError(f"LoRA state lacks {len(missing)} of this adapter's tensors, e.g. {missing[:2]}")
        result = set_peft_model_state_dict(self.transformer, {k: v.to(self.device) for k, v in state.items()})
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"LoRA state has keys this model does not know: {unexpected[:3]}...")

    def save_lora(self, folder: str | Path) -> Path:
        """Write pytorch_lora_weights.safetensors that StableDiffusion3Pipeline.load_lora_weights accepts."""
        from diffusers import StableDiffusion3Pipeline

        from .canonical import canonicalize_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # the adapter config (rank, alpha, targets) travels in the safetensors metadata, so
        # plain diffusers applies the same alpha / r scale the policy trained with
        StableDiffusion3Pipeline.save_lora_weights(
            save_directory=str(folder), transformer_lora_layers=self.lora_state_dict(), safe_serialization=True,
            transformer_lora_adapter_metadata=self.lora_metadata(),
        )
        return canonicalize_file(folder / "pytorch_lora_weights.safetensors")  # same tensors, same bytes

    def lora_metadata(self) -> dict:
        """The adapter config (rank, alpha, targets), JSON-ready, as diffusers stores it with the weights."""
        meta = self.transformer.peft_config["default"].to_dict()
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}

    def load_lora(self, folder: str | Path) -> None:
        """Load an adapter written by save_lora (safetensors only) into this policy's LoRA."""
        from safetensors.torch import load_file

        path = Path(folder)
        path = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
        if path.suffix != ".safetensors":
            raise ValueError(f"refusing to load {str(path)!r}: LoRA checkpoints are read from .safetensors only")
        raw = load_file(str(path))
        prefix = "transformer."
        self.load_lora_state_dict({k[len(prefix):] if k.startswith(prefix) else k: v for k, v in raw.items()})

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Run the base model (adapter disabled): the KL reference policy."""
        if not self.has_lora:
            yield
            return
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
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
        embeds: torch.Tensor,  # [N, L, D]
        pooled: torch.Tensor,  # [N, Dp]
        neg: PromptEmbeds | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """v(x, t | c) with classifier-free guidance, in one transformer call. Returns float32 [N, C, H, W]."""
        n = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=self.device)
        t = t.expand(n) if t.ndim == 0 else t
        dtype = self.transformer.dtype
        if guidance_scale > 1.0:
            assert neg is not None, "CFG needs the negative embedding"
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

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 64) -> np.ndarray:
        """Latents [N, C, H, W] -> uint8 images [N, H', W', 3]."""
        vae = self.pipe.vae
        out = []
        for i in range(0, latents.shape[0], chunk):
            z = latents[i:i + chunk].to(self.device, vae.dtype)
            z = z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
            img = vae.decode(z, return_dict=False)[0].float()
            img = ((img / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            out.append(img.permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out, 0)

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
