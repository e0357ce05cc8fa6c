"""The tiny StableDiffusion3Pipeline and the one loader for every model folder (every registered family).

The tiny model is a real diffusers pipeline (SD3 transformer, AutoencoderKL, two CLIP text
encoders with projection, no T5) built from configs, with a word-level CLIP BPE tokenizer
whose vocab and merges files the project writes itself. It goes through save_pretrained /
from_pretrained like SD3.5-M does, so tests exercise the same loading code users run.
The tiny FluxPipeline is built in tiny_flux.py; the parts both share (tokenizer files, VAE) are
in tiny_parts.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tempflow_core.config import ModelConfig, TinyModelConfig
from tempflow_core.policies.tiny_flux import build_t5_tokenizer
from tempflow_core.policies.tiny_parts import TINY_VOCAB_WORDS, tiny_vae, write_clip_tokenizer_files

def build_tiny_pipeline(cfg: TinyModelConfig | None = None, workdir: str | Path | None = None):
    """Build a randomly initialised tiny StableDiffusion3Pipeline (seeded, deterministic).

    Args:
        cfg: sizes; defaults give a ~32x32-pixel model that runs a rollout in about a second.
        workdir: where the tokenizer files are written before loading them (a temp dir if None).
    """
    import tempfile

    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    cfg = cfg or TinyModelConfig()
    down = len(cfg.vae_channels) - 1
    latent = cfg.resolution // (2**down)
    if latent % cfg.patch_size:
        raise ValueError(f"latent size {latent} (resolution {cfg.resolution} / 2**{down}) must divide by patch_size {cfg.patch_size}")
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="tempflow-tok-") as tmp:
        folder = tmp if workdir is None else str(workdir)
        write_clip_tokenizer_files(folder, max_length=cfg.max_tokens)
        tokenizer = CLIPTokenizer.from_pretrained(folder)  # read into memory; the folder may go
        tokenizer_2 = CLIPTokenizer.from_pretrained(folder)

    def text_encoder() -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
            num_hidden_layers=cfg.text_layers, num_attention_heads=max(1, cfg.text_width // 16),
            max_position_embeddings=cfg.max_tokens, projection_dim=cfg.text_width,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))

    vae = tiny_vae(cfg)
    inner = cfg.heads * cfg.head_dim
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=cfg.patch_size, in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, num_layers=cfg.layers, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads, joint_attention_dim=2 * cfg.text_width,
        caption_projection_dim=inner, pooled_projection_dim=2 * cfg.text_width,
        pos_embed_max_size=latent // cfg.patch_size,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder(), tokenizer=tokenizer, text_encoder_2=text_encoder(), tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None,
    )


def save_pipeline(pipe, folder: str | Path) -> Path:
    """save_pretrained as safetensors; the folder then loads with load_pipeline offline."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"model.device={name!r} but no CUDA device is available")
    return dev


def load_pipeline(path: str | Path, dtype: str = "float32"):
    """Load a pipeline folder offline: StableDiffusion3Pipeline (tiny or SD3.5-M), FluxPipeline
    (tiny or FLUX.1-dev) or QwenImagePipeline (tiny or Qwen-Image), as model_index.json `_class_name` says.

    Raises:
        FileNotFoundError: naming the folder when it or its model_index.json is missing.
        ValueError: one line naming model_index.json and the supported classes, for any other pipeline.
    """
    import diffusers

    from tempflow_core.families import detect_family, family_spec

    p = Path(path)
    spec = family_spec(detect_family(p))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pipeline = getattr(diffusers, spec.pipeline_class)
    return pipeline.from_pretrained(str(p), dtype=_DTYPES[dtype], local_files_only=True, **absent_components(p))


def absent_components(path: str | Path) -> dict[str, None]:
    """The optional components a pipeline folder saved as null (T5 of a CLIP-only SD3 model, as
    its family's registration names them): `from_pretrained` must be told they are None."""
    from tempflow_core.families import detect_family, family_spec

    p = Path(path)
    index = json.loads((p / "model_index.json").read_text())
    optional = family_spec(detect_family(p)).optional_components
    return {k: None for k in optional if not (p / k).is_dir() and index.get(k, [None])[0] is None}


def load_model(cfg: ModelConfig, workdir: str | Path | None = None):
    """The pipeline a run uses: the folder in cfg.path, or a fresh tiny model of cfg.tiny.family."""
    if cfg.path:
        return load_pipeline(cfg.path, cfg.dtype)
    from tempflow_core.families import family_spec

    pipe = family_spec(cfg.tiny.family).load("tiny_builder")(cfg.tiny, workdir)
    return pipe if cfg.dtype == "float32" else pipe.to(_DTYPES[cfg.dtype])


def load_pipeline_meta(path: str | Path):
    """A pipeline folder's real module classes built from its configs on the meta device: shapes,
    module names and parameter counts of SD3.5-M or FLUX.1-dev without reading (or having) weights.

    Every component config.json / scheduler_config.json is read; models are instantiated under
    torch.device('meta') (no memory). Tokenizers are offline stand-ins (the project's word-level
    CLIP BPE and T5 Unigram) carrying the folder's `model_max_length`, so token counts are the
    real ones while vocabularies are not. Not for sampling: the weights are meta tensors.
    """
    import diffusers
    import transformers

    from tempflow_core.families import detect_family, family_defaults

    p = Path(path)
    family = detect_family(p)
    index = json.loads((p / "model_index.json").read_text())
    parts: dict[str, object] = {}
    for name, spec in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(spec, list) or spec[0] is None:  # saved as absent (image_encoder of FLUX)
            parts[name] = None
            continue
        lib, cls_name = spec
        sub = p / name
        if "tokenizer" in name.lower():
            conf = json.loads((sub / "tokenizer_config.json").read_text())
            length = int(conf.get("model_max_length", 77))
            if "T5" in cls_name:
                parts[name] = build_t5_tokenizer(TINY_VOCAB_WORDS, length)
            elif "Qwen2" in cls_name:
                from tempflow_core.policies.tiny_qwen_image import build_qwen_tokenizer

                parts[name] = build_qwen_tokenizer(TINY_VOCAB_WORDS, length)
            else:
                import tempfile

                with tempfile.TemporaryDirectory(prefix="tempflow-tok-") as tmp:
                    write_clip_tokenizer_files(tmp, max_length=length)
                    parts[name] = transformers.CLIPTokenizer.from_pretrained(tmp)
        elif lib == "diffusers" and cls_name.endswith("Scheduler"):  # no weights; UniPC (Wan) copies its sigmas
            cls = getattr(diffusers, cls_name)
            parts[name] = cls.from_config(cls.load_config(str(sub)))
        elif lib == "diffusers":
            cls = getattr(diffusers, cls_name)
            with torch.device("meta"):
                parts[name] = cls.from_config(cls.load_config(str(sub)))
        else:
            config = transformers.AutoConfig.from_pretrained(str(sub), local_files_only=True)
            with torch.device("meta"):
                parts[name] = getattr(transformers, cls_name)(config)
    pipeline = getattr(diffusers, family_defaults(family).pipeline_class)
    return pipeline(**parts)
