"""GenEval-style evaluation of generated images and a Table-1-like markdown report.

GenEval's overall score is the mean over its six tasks of each task's strict accuracy (not the
mean over images), so a prompt set with many position prompts does not outweigh the rest.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from tempflow_core.shapes.detect import RULES, DetectorRules
from tempflow_core.shapes.score import score_images
from tempflow_core.shapes.world import TAGS

TABLE_COLUMNS: dict[str, str] = {
    "single_object": "Single Obj.", "two_object": "Two Obj.", "counting": "Counting",
    "colors": "Colors", "position": "Position", "color_attr": "Color Attr.",
}


def _metadata(records: Sequence[Any]) -> list[dict[str, Any]]:
    return [r.metadata if hasattr(r, "metadata") else r for r in records]


def evaluate(images: np.ndarray, records: Sequence[Any], rules: DetectorRules = RULES,
             per_image: bool = False) -> dict[str, Any]:
    """Strict and partial GenEval-like scores of images [N, H, W, 3] uint8 against their
    records (PromptRecord or metadata dicts with 'tag' and 'include'), detected under `rules`.

    Returns:
        {"overall": mean over the tags present of their strict accuracy,
         "per_category": {tag: strict accuracy}, "counts": {tag: images},
         "partial_overall": same mean of partial scores, "partial_per_category": {tag: ...},
         "n": images, "overall_se" and "per_category_se": standard errors (see standard_error),
         with per_image also "strict": [N] 0/1 per image, for comparisons paired by image}
    Raises:
        ValueError: when lengths differ, a record has no tag, or there are no images.
    """
    meta = _metadata(records)
    if len(images) == 0:
        raise ValueError("evaluate needs at least one image")
    missing = [i for i, m in enumerate(meta) if "tag" not in m]
    if missing:
        raise ValueError(f"records {missing[:5]} have no GenEval 'tag'")
    strict, partial = score_images(images, meta, rules)
    tags = np.array([m["tag"] for m in meta])
    order = [t for t in TAGS if t in set(tags)] + sorted(set(tags) - set(TAGS))
    per = {t: float(strict[tags == t].mean()) for t in order}
    per_partial = {t: float(partial[tags == t].mean()) for t in order}
    per_se = {t: standard_error(strict[tags == t]) for t in order}
    out = {
        "overall_se": float(np.sqrt(sum(se**2 for se in per_se.values())) / len(per_se)),
        "per_category_se": per_se,
        "overall": float(np.mean(list(per.values()))),
        "per_category": per,
        "counts": {t: int((tags == t).sum()) for t in order},
        "partial_overall": float(np.mean(list(per_partial.values()))),
        "partial_per_category": per_partial,
        "n": int(len(images)),
    }
    if per_image:
        out["strict"] = [int(x) for x in strict]
    return out


def standard_error(scores: np.ndarray) -> float:
    """Standard error of a mean of per-image scores: sample std (ddof 1) / sqrt(n); 0 for
    fewer than two images. Images of one prompt differ only by their seed, so across prompts
    this counts the prompts' spread too: it errs on the wide side for a fixed prompt set.
    The overall score's error is sqrt(sum of squared category errors) / categories."""
    x = np.asarray(scores, dtype=np.float64)
    return float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else 0.0


def format_table(results: Mapping[str, Mapping[str, Any]], digits: int = 2) -> str:
    """A markdown table like Table 1 of Flow-GRPO/TempFlow-GRPO: one row per model or
    checkpoint (name -> evaluate() result), columns Overall and the six tasks; tasks a row
    did not evaluate show as '-'."""
    header = ["Model", "Overall"] + list(TABLE_COLUMNS.values())
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, res in results.items():
        per = res.get("per_category", {})
        cells = [str(name), f"{res['overall']:.{digits}f}"]
        cells += [f"{per[t]:.{digits}f}" if t in per else "-" for t in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
