"""The tiny StableDiffusion3Pipeline and the one loader for every model folder (SD3 and FLUX families).

The tiny model is a real diffusers pipeline (SD3 transformer, AutoencoderKL, two CLIP text
encoders with projection, no T5) built from configs, with a word-level CLIP BPE tokenizer
whose vocab and merges files the project writes itself. It goes through save_pretrained /
from_pretrained like SD3.5-M does, so tests exercise the same loading code users run.
The tiny FluxPipeline is built in tiny_flux.py.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .config import ModelConfig, TinyModelConfig

# Words the tiny tokenizer keeps whole; anything else falls back to characters.
TINY_VOCAB_WORDS = sorted(set("""
a an the one two three four five six seven eight nine ten zero no and or of on in at to with without
photo picture image drawing painting render scene background plain black white dark bright light
red green blue yellow purple orange pink brown gray grey cyan magenta
circle circles square squares triangle triangles star stars heart hearts rectangle rectangles
cross crosses diamond diamonds ring rings dot dots blob blobs object objects shape shapes
left right above below under over next beside near far top bottom middle center corner
small big large tiny huge round sharp colorful colourful empty full many few several
is are there this that it its of cat dog tree house car sky sea sun moon flower person
""".split()))

_SPECIAL_BOS = "<|startoftext|>"
_SPECIAL_EOS = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-char table of CLIP's (and GPT-2's) byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word, to check that the merges keep every vocab word whole."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def write_clip_tokenizer_files(folder: str | Path, words: list[str] | None = None, max_length: int = 16) -> None:
    """Write vocab.json, merges.txt and the tokenizer configs of a word-level CLIP BPE.

    Every byte symbol (with and without the end-of-word marker) is in the vocab, so any text
    tokenizes; each listed word gets a chain of left-to-right merges ending in one token.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted(set(words or TINY_VOCAB_WORDS))
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    for s in symbols:
        vocab.setdefault(s + "</w>", len(vocab))
    # Deeper merges rank first, so once a word's first pair is merged the word grows left
    # to right before any inner bigram of another word can split it; the first pairs are
    # ordered by how many words start with them.
    firsts: dict[tuple[str, str], int] = {}
    deeper: list[tuple[int, tuple[str, str]]] = []
    for w in words:
        for depth in range(1, len(w)):
            left = w[:depth]
            right = w[depth] + ("</w>" if depth == len(w) - 1 else "")
            vocab.setdefault(left + right, len(vocab))
            if depth == 1:
                firsts[(left, right)] = firsts.get((left, right), 0) + 1
            else:
                deeper.append((depth, (left, right)))
    merges = list(dict.fromkeys(pair for _, pair in sorted(deeper, key=lambda d: -d[0])))
    first_pairs = sorted(firsts, key=lambda pair: -firsts[pair])
    # A word whose inner bigram is another word's first pair can still split; move the
    # failing word's first pair ahead of the others until every word is one token.
    for _ in range(4 * len(words)):
        ranks = {m: i for i, m in enumerate(merges + first_pairs)}
        failing = [w for w in words if len(_bpe(w, ranks)) != 1]
        if not failing:
            break
        pair = (failing[0][0], failing[0][1] + ("</w>" if len(failing[0]) == 2 else ""))
        first_pairs.remove(pair)
        first_pairs.insert(0, pair)
    merges += first_pairs
    vocab.setdefault(_SPECIAL_BOS, len(vocab))
    vocab.setdefault(_SPECIAL_EOS, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": _SPECIAL_BOS, "eos_token": _SPECIAL_EOS, "unk_token": _SPECIAL_EOS, "pad_token": _SPECIAL_EOS}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
        "bos_token": _SPECIAL_BOS, "eos_token": _SPECIAL_EOS, "unk_token": _SPECIAL_EOS, "pad_token": _SPECIAL_EOS,
        "clean_up_tokenization_spaces": False,
    }))


def tiny_vae(cfg: TinyModelConfig, scaling_factor: float = 1.0, shift_factor: float = 0.0):
    """The tiny AutoencoderKL of both families (random init from the global RNG): one layer
    per block of cfg.vae_channels, no quant convs; FLUX passes its latent scaling and shift."""
    from diffusers import AutoencoderKL

    groups = math.gcd(*cfg.vae_channels) if len(cfg.vae_channels) > 1 else cfg.vae_channels[0]
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(cfg.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(cfg.vae_channels),
        block_out_channels=list(cfg.vae_channels), layers_per_block=1,
        latent_channels=cfg.latent_channels, norm_num_groups=min(32, groups),
        sample_size=cfg.resolution, scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=False, use_post_quant_conv=False,
    )


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
    """Load a pipeline folder offline: StableDiffusion3Pipeline (tiny or SD3.5-M) or FluxPipeline
    (tiny or FLUX.1-dev), as model_index.json `_class_name` says.

    Raises:
        FileNotFoundError: naming the folder when it or its model_index.json is missing.
        ValueError: one line naming model_index.json and the supported classes, for any other pipeline.
    """
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from .families import detect_family

    p = Path(path)
    family = detect_family(p)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if family == "flux":
        return FluxPipeline.from_pretrained(str(p), dtype=_DTYPES[dtype], local_files_only=True)
    return StableDiffusion3Pipeline.from_pretrained(str(p), dtype=_DTYPES[dtype], local_files_only=True,
                                                    **absent_components(p))


def absent_components(path: str | Path) -> dict[str, None]:
    """The optional components a pipeline folder saved as null (T5 of a CLIP-only model):
    `from_pretrained` must be told they are None."""
    p = Path(path)
    index = json.loads((p / "model_index.json").read_text())
    return {k: None for k in ("text_encoder_3", "tokenizer_3") if not (p / k).is_dir() and index.get(k, [None])[0] is None}


def load_model(cfg: ModelConfig, workdir: str | Path | None = None):
    """The pipeline a run uses: the folder in cfg.path, or a fresh tiny model of cfg.tiny.family."""
    if cfg.path:
        return load_pipeline(cfg.path, cfg.dtype)
    if cfg.tiny.family == "flux":
        from .tiny_flux import build_tiny_flux_pipeline

        pipe = build_tiny_flux_pipeline(cfg.tiny, workdir)
    else:
        pipe = build_tiny_pipeline(cfg.tiny, workdir)
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

    from .families import detect_family, family_defaults
    from .tiny_flux import build_t5_tokenizer

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
            else:
                import tempfile

                with tempfile.TemporaryDirectory(prefix="tempflow-tok-") as tmp:
                    write_clip_tokenizer_files(tmp, max_length=length)
                    parts[name] = transformers.CLIPTokenizer.from_pretrained(tmp)
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
