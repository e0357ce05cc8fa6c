"""The parts both tiny pipelines share (SD3 in models.py, FLUX in tiny_flux.py): a word-level
CLIP BPE tokenizer whose vocab and merges files the project writes itself, and a tiny
AutoencoderKL."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tempflow_core.config import TinyModelConfig

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
