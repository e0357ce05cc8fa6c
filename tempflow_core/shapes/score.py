"""GenEval's scoring rules on the shapes detector's output: strict correctness and the
partial credit Flow-GRPO trains on.

Objects are grouped by class (shape) as GenEval groups detections by COCO class; an include
clause {class, count, color?, position?} looks at all detections of its class.

* strict (Flow-GRPO's `strict_correct`, GenEval with exact counts): every clause needs exactly
  `count` objects of its class; with a colour, all of them must have it; with a position
  [relation, i], every object must stand in that relation (geometry.relative_position) to
  every object matched by clause i, which must itself have matched. Exclude clauses fail the
  image when `count` or more objects of the class are found.
* partial (Flow-GRPO's `evaluate_reward`): per clause append 1 - |n_req - n_found| / n_req;
  if the count is wrong and a colour or position is required, append 0 for it; otherwise
  append 1 - |n_req - n_colour_ok| / n_req for a colour and 1/0 for the position. The score is
  the mean of the appended terms. One deviation: each term is clipped at 0 (Flow-GRPO lets a
  count term go negative when more than twice the requested objects appear), so the reward
  stays in [0, 1] and noise cannot drive it to large negative values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from tempflow_core.shapes.detect import RULES, Detection, DetectorRules, detect
from tempflow_core.shapes.geometry import relative_position


@dataclass(frozen=True)
class ImageScore:
    strict: bool
    partial: float
    reasons: list[str] = field(default_factory=list)


def _group(objects: Sequence[Detection]) -> dict[str, list[Detection]]:
    groups: dict[str, list[Detection]] = {}
    for o in objects:  # detections arrive most confident first, as GenEval's do
        groups.setdefault(o.shape, []).append(o)
    return groups


def score_objects(objects: Sequence[Detection], metadata: dict[str, Any]) -> ImageScore:
    """Score one image's detections against a GenEval-style record.

    Raises:
        ValueError: when the record has no 'include' clauses.
    """
    include = metadata.get("include")
    if not include:
        raise ValueError(f"shapes scoring needs GenEval metadata with 'include' clauses; got keys {sorted(metadata)}")
    groups = _group(objects)
    strict = True
    reasons: list[str] = []
    terms: list[float] = []
    matched: list[list[Detection] | None] = []
    for req in include:
        cls, n_req = req["class"], int(req["count"])
        found = groups.get(cls, [])
        ok = True
        terms.append(max(0.0, 1 - abs(n_req - len(found)) / n_req))
        if len(found) != n_req:
            ok = False
            reasons.append(f"expected {cls}=={n_req}, found {len(found)}")
            if "color" in req or req.get("position"):
                terms.append(0.0)
        else:
            if "color" in req:
                n_color = sum(o.color == req["color"] for o in found)
                terms.append(max(0.0, 1 - abs(n_req - n_color) / n_req))
                if n_color != n_req:
                    ok = False
                    reasons.append(f"expected {req['color']} {cls}>={n_req}, found {n_color} {req['color']}")
            if req.get("position") and ok:
                rel, target = req["position"]
                if matched[target] is None:
                    ok = False
                    reasons.append(f"no target for {cls} to be {rel}")
                    terms.append(0.0)
                else:
                    for obj in found:
                        for ref in matched[target]:
                            if rel not in relative_position(obj.bbox, ref.bbox):
                                ok = False
                                reasons.append(f"expected {cls} {rel} target")
                                break
                        if not ok:
                            break
                    terms.append(1.0 if ok else 0.0)
        strict &= ok
        matched.append(found if ok else None)
    for req in metadata.get("exclude", []):
        n_found = len(groups.get(req["class"], []))
        if n_found >= int(req["count"]):
            strict = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n_found}")
    return ImageScore(strict, float(np.mean(terms)), reasons)


def score_images(images: np.ndarray, metadata: Sequence[dict[str, Any]], rules: DetectorRules = RULES
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Strict (float32 0/1) and partial (float32 in [0, 1]) scores for a batch, detected under `rules`.

    Raises:
        ValueError: when the numbers of images and records differ.
    """
    if len(images) != len(metadata):
        raise ValueError(f"{len(images)} images but {len(metadata)} metadata records")
    detections = detect(images, rules=rules) if len(images) else []
    results = [score_objects(d, m) for d, m in zip(detections, metadata)]
    return (np.array([r.strict for r in results], dtype=np.float32),
            np.array([r.partial for r in results], dtype=np.float32))
