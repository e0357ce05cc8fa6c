"""Rewards beyond the basic ones: the shapes benchmark (GenEval-like), JPEG (in)compressibility
(DDPO) and CLIP-based CLIPScore / PickScore adapters.

Heavy libraries (torch, transformers) are imported inside the factories, so importing this
module, which the registry does when one of its rewards is built, stays cheap. Model weights are
never downloaded: the CLIP rewards take a local folder through the factory option `model`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image


# ----------------------------------------------------------------------------- shapes


def _shapes_metadata(prompts: list[str], metadata: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The GenEval record per image: the metadata given, else looked up from the prompt text
    (so plain-text prompt sets from the shapes grammar work too)."""
    from tempflow_core.shapes.prompts import record_for_prompt

    metadata = metadata if metadata is not None else [{}] * len(prompts)
    if len(metadata) != len(prompts):
        raise ValueError(f"shapes reward got {len(prompts)} prompts but {len(metadata)} metadata records")
    return [m if m.get("include") else record_for_prompt(p) for p, m in zip(prompts, metadata)]


def _shapes_scores(images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]], rules: Any
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    from tempflow_core.shapes.score import score_images
    from tempflow_core.shapes.world import TAGS

    meta = _shapes_metadata(prompts, metadata)
    strict, partial = score_images(np.asarray(images), meta, rules)
    tags = np.array([m.get("tag", "") for m in meta])
    details = {"strict": strict, "partial": partial}
    for tag in TAGS:  # NaN where the image's prompt is another task: average with np.nanmean
        details[f"strict_{tag}"] = np.where(tags == tag, strict, np.nan).astype(np.float32)
    return strict, partial, details


def shapes(rules: Literal["v1", "v2"] = "v2"):
    """Flow-GRPO's dense GenEval reward on the shapes world (partial credit in [0, 1]).

    rules: the detector's rules (`tempflow_core.shapes.detect.RULE_SETS`): v2, the default, or
    v1, the rules before the detector's audit (to recompute results scored with them).
    details: strict, partial, and strict_<tag> per GenEval task (NaN for other tasks' images).
    """
    from tempflow_core.shapes.detect import rules_named

    chosen = rules_named(rules)

    def fn(images, prompts, metadata):
        _, partial, details = _shapes_scores(images, prompts, metadata, chosen)
        return partial, details

    return fn


def shapes_strict(rules: Literal["v1", "v2"] = "v2"):
    """GenEval's strict 0/1 correctness on the shapes world (sparse; for evaluation or ablations);
    rules as for `shapes`."""
    from tempflow_core.shapes.detect import rules_named

    chosen = rules_named(rules)

    def fn(images, prompts, metadata):
        strict, _, details = _shapes_scores(images, prompts, metadata, chosen)
        return strict, details

    return fn


# ----------------------------------------------------------------------------- JPEG


def jpeg_size_kb(images: np.ndarray, quality: int = 95) -> np.ndarray:
    """Size in kB (1000 bytes) of each image saved by PIL as JPEG, DDPO's measure."""
    sizes = np.zeros(len(images), dtype=np.float32)
    for i, img in enumerate(np.asarray(images, dtype=np.uint8)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        sizes[i] = buf.tell() / 1000
    return sizes


def jpeg_compressibility(quality: int = 95):
    """-JPEG size in kB (DDPO): rewards flat, simple images; a classic reward-hacking demo."""

    def fn(images, prompts, metadata):
        size = jpeg_size_kb(images, quality)
        return -size, {"size_kb": size}

    return fn


def jpeg_incompressibility(quality: int = 95):
    """+JPEG size in kB (DDPO): rewards detail and noise."""

    def fn(images, prompts, metadata):
        size = jpeg_size_kb(images, quality)
        return size, {"size_kb": size}

    return fn


# ----------------------------------------------------------------------------- CLIP

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    """A CLIPModel + CLIPTokenizer from local folders, with torch-only image preprocessing
    (resize the short side to the vision tower's size with bicubic antialiasing, centre-crop,
    normalise with the folder's preprocessor_config.json mean/std or OpenAI's), so that no
    torchvision is needed and preprocessing runs on the GPU with the model.
    """

    def __init__(self, reward: str, model: str | None, processor: str | None = None, device: str | None = None,
                 batch_size: int = 32, dtype: str | None = None):
        if not model:
            raise ValueError(f"reward {reward!r} needs a local CLIP folder: options {{'{reward}': {{'model': '/path'}}}} "
                             "(weights are never downloaded)")
        self.reward = reward
        path = Path(model)
        tok_path = Path(processor) if processor else path
        for p in {path, tok_path}:
            if not p.is_dir():
                raise FileNotFoundError(f"reward {reward!r}: model folder {str(p)!r} does not exist")
        import torch
        from transformers import CLIPModel, CLIPTokenizer

        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype) if dtype else (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.model = CLIPModel.from_pretrained(str(path), dtype=self.dtype).to(self.device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(str(tok_path))
        self.batch_size = int(batch_size)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_length = min(int(self.tokenizer.model_max_length),
                              int(self.model.config.text_config.max_position_embeddings))
        mean, std = _OPENAI_MEAN, _OPENAI_STD
        pre = tok_path / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def pixel_values(self, images: np.ndarray):
        """uint8 [N, H, W, 3] -> normalised float [N, 3, S, S] on the scorer's device."""
        torch = self.torch
        F = torch.nn.functional
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        h, w = x.shape[-2:]
        s = self.image_size
        nh, nw = (s, max(s, round(w * s / h))) if h <= w else (max(s, round(h * s / w)), s)
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (nh - s) // 2, (nw - s) // 2
        x = x[..., top:top + s, left:left + s]
        return ((x - self.mean) / self.std).to(self.dtype)

    def embeddings(self, images: np.ndarray, prompts: list[str]):
        """L2-normalised image and text embeddings, float32 [N, D] each."""
        torch = self.torch
        if len(images) != len(prompts):
            raise ValueError(f"reward {self.reward!r}: {len(images)} images but {len(prompts)} prompts")
        img_out, txt_out = [], []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                tok = self.tokenizer(list(prompts[i:i + self.batch_size]), padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                img = self.model.get_image_features(pixel_values=self.pixel_values(images[i:i + self.batch_size]))
                txt = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
                img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))
                img_out.append(torch.nn.functional.normalize(img.float(), dim=-1))
                txt_out.append(torch.nn.functional.normalize(txt.float(), dim=-1))
        return torch.cat(img_out), torch.cat(txt_out)

    def cosine(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        img, txt = self.embeddings(images, prompts)
        return (img * txt).sum(-1).cpu().numpy().astype(np.float32)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp().cpu())


def clipscore(model: str | None = None, processor: str | None = None, device: str | None = None,
              batch_size: int = 32, dtype: str | None = None):
    """Cosine similarity of CLIP image and prompt embeddings, in [-1, 1].

    Options: model (local CLIPModel folder, required), processor (tokenizer/preprocessor folder,
    default the model folder), device (default cuda when available), batch_size, dtype.
    details: cosine and Hessel et al.'s CLIP-S = 2.5 * max(cosine, 0).
    """
    scorer = ClipScorer("clipscore", model, processor, device, batch_size, dtype)

    def fn(images, prompts, metadata):
        cos = scorer.cosine(np.asarray(images), list(prompts))
        return cos, {"cosine": cos, "clip_s": 2.5 * np.maximum(cos, 0)}

    return fn


def pickscore(model: str | None = None, processor: str | None = None, device: str | None = None,
              batch_size: int = 32, dtype: str | None = None, scale: float = 1 / 26):
    """PickScore: logit_scale.exp() * cosine of a CLIP-H fine-tune (yuvalkirstain/PickScore_v1),
    times `scale` (Flow-GRPO divides by 26 to bring it near [0, 1]).

    Options as clipscore; PickScore's tokenizer and preprocessing come from the LAION CLIP-H
    folder, so pass that as `processor`. details: raw (the unscaled PickScore).
    """
    scorer = ClipScorer("pickscore", model, processor, device, batch_size, dtype)

    def fn(images, prompts, metadata):
        raw = (scorer.logit_scale * scorer.cosine(np.asarray(images), list(prompts))).astype(np.float32)
        return raw * np.float32(scale), {"raw": raw}

    return fn
