"""What every model family's policy shares: the peft LoRA, the reference, decoding, the grid.

A policy wraps one loaded diffusers pipeline with a LoRA on its transformer. Rollouts, the
learner, evaluation, session setup and export use only this interface, so they never know
which family they hold:

    encode_prompts(prompts)                       -> PromptEmbeds
    velocity(x, t, cond, guidance)                -> v  [N, *latent] float32 (cond: N rows of PromptEmbeds)
    decode(latents [N, *latent])                  -> uint8 images [N, H', W', 3] (a clip: its frame strip)
    latent_shape()                                -> (C, H, W); a clip's (C, F', H, W)
    text_tokens()                                 -> tokens of one prompt's conditioning
    schedule(num_steps, shift, noise_level)       -> the family's sampling grid
    lora_* / save_lora / load_lora / reference()  -> adapter handling

Latents are [N, C, H, W] at the interface for every image family (FLUX and Qwen-Image pack
them inside their velocity) and [N, C, F', H, W] for a video family (Wan). The reference policy is the same transformer with the adapter disabled, so no
second copy of the model is held. Text encoders and the VAE stay frozen; only LoRA trains.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from tempflow_core.config import DEFAULT_LORA_TARGETS, LoraSettings
from tempflow_core.families import ModelFamily, family_defaults, family_spec, lora_targets
from tempflow_core.policies.models import resolve_device
from tempflow_core.algorithm.schedule import Schedule, make_schedule
from tempflow_core.algorithm.sharding import full, shard_like, shard_transformer
from tempflow_core.batches import PromptEmbeds  # noqa: F401  (the type encode_prompts returns)


class FlowPolicy:
    """The family-independent half of a policy; subclasses set `family` and implement
    `encode_prompts`, `velocity`, `latent_shape` and `_text_encoders` (and `_vae_decode`, `_scheduler_config` where
    their VAE or grid differs from the defaults).

    Args:
        pipe: a loaded diffusers pipeline of the subclass's family.
        lora: LoRA settings; None leaves the transformer without an adapter (pure sampling).
        device: 'auto', 'cpu' or 'cuda[:i]'.
        resolution: pixels of rollouts and evaluation; None: the model's native size.
        gradient_checkpointing: recompute transformer activations in backward.
    """

    family: ModelFamily
    uses_pooled = True  # the transformer reads a pooled prompt embedding (SD3, FLUX)
    uses_mask = False  # the conditioning carries a token mask (Qwen-Image)

    def __init__(self, pipe: Any, lora: LoraSettings | None, device: str = "auto", resolution: int | None = None,
                 gradient_checkpointing: bool = False):
        self.pipe = pipe
        self.device = resolve_device(device)
        self.resolution = resolution  # pixels; None: the transformer's native sample size
        pipe.to(self.device)
        for module in (pipe.vae, *self._text_encoders(), pipe.transformer):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        self.transformer = pipe.transformer
        self.decode_chunk = 64  # images per VAE decode call (rollout.decode_chunk)
        self.offloaded = False  # text encoders on the host between encodings (offload_text_encoders)
        self.forward_calls = 0  # transformer calls (one per chunk; CFG rides in the same call)
        self.nfe = 0  # sample-steps evaluated (a CFG pair counts once)
        self.has_lora = lora is not None
        if lora is not None:
            from peft import LoraConfig

            init = {"gaussian": "gaussian", "default": True}[lora.init]
            self.transformer.add_adapter(LoraConfig(
                r=lora.rank, lora_alpha=lora.alpha, init_lora_weights=init,
                target_modules=lora_targets(lora.target_modules, DEFAULT_LORA_TARGETS, self.family),
            ))
            for p in self.lora_parameters():
                p.data = p.data.float()
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ family hooks
    def _text_encoders(self) -> list[torch.nn.Module | None]:
        raise NotImplementedError

    def _mu(self) -> float:
        """The time shift mu of this model at the policy's resolution, as FluxPipeline and
        QwenImagePipeline compute it: `calculate_shift` of the image's (H/2)(W/2) packed tokens
        between the scheduler config's base and max shift (a family with a static shift never asks)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        _, h, w = self.latent_shape()
        conf = self.pipe.scheduler.config
        return float(calculate_shift((h // 2) * (w // 2), conf.get("base_image_seq_len", 256),
                                     conf.get("max_image_seq_len", 4096), conf.get("base_shift", 0.5),
                                     conf.get("max_shift", 1.15)))

    def _scheduler_config(self) -> dict | None:
        """The scheduler config the grid is drawn with when the family's scheduler shapes it beyond
        exp(mu) (Qwen-Image); None: diffusers' defaults with dynamic shifting (FLUX)."""
        return None

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        raise NotImplementedError

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds, guidance_scale: float) -> torch.Tensor:
        """v(x, t | cond, guidance) for N rows: x [N, C, H, W], t [N] or a scalar, `cond` the N rows'
        conditioning (`PromptEmbeds.select` of the prompts' rows; its negative rides along)."""
        raise NotImplementedError

    def latent_shape(self, resolution: int | None = None) -> tuple[int, ...]:
        """One sample's latent: (C, H, W), or (C, F', H, W) for a clip."""
        raise NotImplementedError

    def text_tokens(self) -> int:
        """Tokens of one prompt's conditioning (the transformer's text sequence)."""
        raise NotImplementedError

    def pixels(self) -> int:
        """The side in pixels of what the policy samples (model.resolution, else the model's native size)."""
        return self.latent_shape()[-1] * int(self.pipe.vae_scale_factor)

    def blank_conditioning(self, n: int = 1) -> PromptEmbeds:
        """Zeros of the shapes `encode_prompts` returns for n prompts, without running an encoder
        (the memory probe's input): [n, L, D] embeddings, pooled where the family has one, a mask
        where it has one, and its negative row where it runs CFG."""
        conf = self.transformer.config
        L, D = self.text_tokens(), int(conf.get("joint_attention_dim") or conf.get("text_dim"))
        P = int(conf.get("pooled_projection_dim") or 0) if self.uses_pooled else 0
        neg = 1 if family_spec(self.family).negative_prompt is not None else 0
        mask = (torch.ones(n, L, dtype=torch.long), torch.ones(neg, L, dtype=torch.long)) if self.uses_mask else (None, None)
        return PromptEmbeds(torch.zeros(n, L, D), torch.zeros(n, P), torch.zeros(neg, L, D), torch.zeros(neg, P), *mask)

    def shard_onto(self, device: torch.device) -> None:
        """Move this policy, loaded on the host, to `device` with its transformer sharded over the
        default process group (train.sharding=fsdp, algorithm/sharding.py): the other modules
        whole, the transformer one block at a time, each block's shard left on the device, so the
        device never holds the whole transformer."""
        self.device = device
        for module in self.pipe.components.values():
            if isinstance(module, torch.nn.Module) and module is not self.transformer:
                module.to(device)
        shard_transformer(self.transformer, device)

    # ------------------------------------------------------------------ text encoders
    def offload_text_encoders(self) -> None:
        """Keep the text encoders on the host from now on; `encoding()` brings them to the device
        while prompts are encoded (model.offload_text_encoders)."""
        self.offloaded = True
        for module in self._text_encoders():
            if module is not None:
                module.to("cpu")

    @contextlib.contextmanager
    def encoding(self) -> Iterator[None]:
        """The text encoders on the device for the duration (back on the host after, when offloaded)."""
        modules = [m for m in self._text_encoders() if m is not None] if self.offloaded else []
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")

    # ------------------------------------------------------------------ schedule
    def schedule(self, num_steps: int, shift: float | None = None, noise_level: float | None = None) -> Schedule:
        """The family's grid: unset shift / noise level take the family's defaults (SD3: static
        shift 3.0, a = 0.7; FLUX: exp(mu) with mu from the resolution, a = 0.9). A set shift on
        FLUX is used as exp(mu) on FLUX's own grid."""
        d = family_defaults(self.family)
        a = d.noise_level if noise_level is None else noise_level
        if d.shift is not None:  # a static shift (SD3); else a resolution-dependent one (FLUX's mu)
            return make_schedule(num_steps, d.shift if shift is None else shift, a)
        mu = self._mu() if shift is None else float(np.log(shift))
        return make_schedule(num_steps, noise_level=a, mu=mu, scheduler_config=self._scheduler_config())

    # ------------------------------------------------------------------ parameters
    def pipeline_class(self) -> Any:
        """The diffusers pipeline class whose save/load_lora_weights this family uses."""
        return type(self.pipe)

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        params = [p for n, p in self.transformer.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        return params

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's whole tensors on the host (gathered from every rank when the transformer
        is sharded: then every rank calls it, see algorithm/sharding.py)."""
        from peft.utils import get_peft_model_state_dict

        return {k: full(v.detach()).cpu().clone() for k, v in get_peft_model_state_dict(self.transformer).items()}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load whole adapter tensors (a sharded transformer keeps this rank's cut of each)."""
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        own = get_peft_model_state_dict(self.transformer)
        missing = sorted(set(own) - set(state))
        if missing:  # a partial state would silently keep the previous weights of those layers
            raise ValueError(f"LoRA state lacks {len(missing)} of this adapter's tensors, e.g. {missing[:2]}")
        result = set_peft_model_state_dict(self.transformer, {
            k: shard_like(v.to(self.device), own[k]) if k in own else v.to(self.device) for k, v in state.items()})
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"LoRA state has keys this model does not know: {unexpected[:3]}...")

    def save_lora(self, folder: str | Path) -> Path:
        """Write pytorch_lora_weights.safetensors that the pipeline class's load_lora_weights accepts."""
        from tempflow_core.canonical import canonicalize_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # the adapter config (rank, alpha, targets) travels in the safetensors metadata, so
        # plain diffusers applies the same alpha / r scale the policy trained with
        self.pipeline_class().save_lora_weights(
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

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int | None = None) -> np.ndarray:
        """Latents [N, C, H, W] -> uint8 images [N, H', W', 3], `chunk` (default: decode_chunk) at a time."""
        vae = self.pipe.vae
        chunk = chunk or self.decode_chunk
        out = []
        for i in range(0, latents.shape[0], chunk):
            img = self._vae_decode(latents[i:i + chunk].to(self.device, vae.dtype)).float()
            img = ((img / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            out.append(img.permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out, 0)

    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [n, C, H, W] in the transformer's scale -> images [n, 3, H', W'] in [-1, 1]
        (AutoencoderKL's scaling and shift; a family with another VAE overrides it)."""
        vae = self.pipe.vae
        z = z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(z, return_dict=False)[0]
