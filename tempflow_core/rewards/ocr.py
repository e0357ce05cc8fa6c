"""Reward `ocr`: Flow-GRPO's text-rendering reward, read with RapidOCR (offline).

Flow-GRPO's OCR prompts ask for a text in double quotes (`A neon sign that says "Open 24h"`).
The reward reads the image and compares, with spaces removed and lower-cased:

    reward = 1 - min(d, len(target)) / len(target),   d = 0 when target is inside the read text,
                                                      else Levenshtein(read, target)

so 1 is the exact text, 0 nothing like it (or no text at all). The models are the ONNX
detection and recognition models inside the `rapidocr` wheel (`pip install .[ocr]`): nothing
is downloaded at run time; a missing model file is an error, never a download.

Options: threads (onnxruntime intra-op threads, 0: its default), det_model / rec_model
(other ONNX files, default the wheel's), min_confidence (read lines below it are ignored).
details: distance (capped edit distance), target_length.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from tempflow_core.rewards.registry import RewardFn

_QUOTED = re.compile(r'"([^"]+)"|\u201c([^\u201d]+)\u201d')
WHEEL_MODELS = {"det": "PP-OCRv6_det_small.onnx", "rec": "PP-OCRv6_rec_small.onnx"}  # in rapidocr 3.10's wheel


def target_text(prompt: str, metadata: dict[str, Any] | None = None) -> str:
    """The text a prompt asks for: metadata['text'] when given, else the first double-quoted
    part of the prompt (straight or curly quotes).

    >>> target_text('A sign that says "Hello World" in a park')
    'Hello World'
    """
    if metadata and isinstance(metadata.get("text"), str) and metadata["text"]:
        return str(metadata["text"])
    m = _QUOTED.search(prompt)
    if m is None:
        raise ValueError(f"reward 'ocr': prompt {prompt!r} has no text in double quotes (nor metadata['text']): "
                         'write prompts as Flow-GRPO\'s OCR set, e.g. A sign that says "OPEN"')
    return m.group(1) or m.group(2)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each).

    >>> levenshtein("kitten", "sitting")
    3
    """
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _normalise(text: str) -> str:
    return "".join(text.split()).lower()


def ocr_distance(read: str, target: str) -> tuple[int, int]:
    """(capped distance, target length) after removing whitespace and lower-casing both."""
    read, target = _normalise(read), _normalise(target)
    if not target:
        raise ValueError("reward 'ocr': the requested text is empty")
    d = 0 if target in read else levenshtein(read, target)
    return min(d, len(target)), len(target)


def _engine(threads: int, det_model: str | None, rec_model: str | None) -> Any:
    """A RapidOCR engine on local ONNX files only (no angle classifier, as Flow-GRPO)."""
    try:
        import rapidocr
    except ImportError:
        raise ImportError("reward 'ocr' needs rapidocr and onnxruntime: pip install -e '.[ocr]'") from None
    models = Path(rapidocr.__file__).parent / "models"
    paths = {"det": Path(det_model) if det_model else models / WHEEL_MODELS["det"],
             "rec": Path(rec_model) if rec_model else models / WHEEL_MODELS["rec"]}
    for task, p in paths.items():
        if not p.is_file():
            raise FileNotFoundError(f"reward 'ocr': {task} model {str(p)!r} is missing (rapidocr 3.10's wheel ships "
                                    f"it: reinstall it, or set the option {task}_model); models are never downloaded")
    params: dict[str, Any] = {"Global.use_cls": False, "Global.log_level": "error",
                              "Det.model_path": str(paths["det"]), "Rec.model_path": str(paths["rec"])}
    if threads > 0:
        params["EngineConfig.onnxruntime.intra_op_num_threads"] = int(threads)
        params["EngineConfig.onnxruntime.inter_op_num_threads"] = 1
    return rapidocr.RapidOCR(params=params)


def read_text(engine: Any, image: np.ndarray, min_confidence: float = 0.0) -> str:
    """The text RapidOCR reads in one uint8 [H, W, 3] image, lines joined in its reading order."""
    result = engine(np.ascontiguousarray(image))
    txts, scores = getattr(result, "txts", None) or (), getattr(result, "scores", None) or ()
    return "".join(t for t, s in zip(txts, scores) if s > min_confidence)


def ocr(threads: int = 0, det_model: str | None = None, rec_model: str | None = None,
        min_confidence: float = 0.0) -> RewardFn:
    """Flow-GRPO's OCR reward: 1 - normalised edit distance to the quoted text, in [0, 1]."""
    engine = _engine(threads, det_model, rec_model)

    def fn(images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
           ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
        targets = [target_text(p, m) for p, m in zip(prompts, metadata)]  # fail before any OCR work
        dist = np.zeros(len(images), np.float32)
        length = np.zeros(len(images), np.float32)
        for i, (img, target) in enumerate(zip(np.asarray(images, dtype=np.uint8), targets)):
            dist[i], length[i] = ocr_distance(read_text(engine, img, min_confidence), target)
        return 1.0 - dist / np.maximum(length, 1), {"distance": dist, "target_length": length}

    return fn
