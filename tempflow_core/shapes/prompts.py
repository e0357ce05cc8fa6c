"""GenEval-style prompts for the shapes world, split into disjoint train and test sets.

Every prompt comes from a small grammar per GenEval tag, and its metadata is a GenEval JSONL
record (`tag`, `include: [{class, count, color?, position?: [relation, index]}]`, `exclude`
for counting, `prompt`) plus a stable `id`. As in GenEval, single_object and two_object name
no colour (the renderer picks one at random), and neither do position prompts, so they test
placement alone; colors, color_attr and counting ("two red circles") do.

The split holds out about a quarter of each tag's prompts (chosen by a hash of the prompt, so
it is stable when the grammar grows) for test; the committed files under data/ are the
generator's output and `tests/shapes` checks they stay equal. Regenerate them with
`python -m tempflow_core.shapes.prompts`.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from tempflow_core.shapes.world import COLORS, COUNT_WORDS, COUNTS, RELATIONS, SHAPES, TAGS, plural

DATA_DIR = Path(__file__).parent / "data"
SPLITS: tuple[str, ...] = ("train", "test")
BUILTIN_SPLITS: tuple[str, ...] = SPLITS + ("eval",)  # served as builtin:shapes_<split> by tempflow_core.prompts
TEST_FRACTION = 0.25
# Categories the world holds too few prompts of to hold enough out (3, 6 and 12 prompts):
# the evaluation set takes all of them and more seeds per prompt instead.
EVAL_ALL_PROMPTS: tuple[str, ...] = ("single_object", "two_object", "colors")


def _record(tag: str, prompt: str, include: list[dict[str, Any]], exclude: list[dict[str, Any]] | None = None
            ) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": f"{tag}_{prompt.replace(' ', '_')}", "tag": tag, "include": include}
    if exclude:
        rec["exclude"] = exclude
    rec["prompt"] = prompt
    return rec


def generate_records() -> list[dict[str, Any]]:
    """Every prompt of the grammar, in a fixed order (tag, then the loops below)."""
    out: list[dict[str, Any]] = []
    for s in SHAPES:
        out.append(_record("single_object", f"a {s}", [{"class": s, "count": 1}]))
    for s1 in SHAPES:
        for s2 in SHAPES:
            if s1 != s2:
                out.append(_record("two_object", f"a {s1} and a {s2}",
                                   [{"class": s1, "count": 1}, {"class": s2, "count": 1}]))
    for n in COUNTS:
        for c in COLORS:
            for s in SHAPES:
                out.append(_record("counting", f"{COUNT_WORDS[n]} {c} {plural(s)}",
                                   [{"class": s, "count": n, "color": c}], [{"class": s, "count": n + 1}]))
    for c in COLORS:
        for s in SHAPES:
            out.append(_record("colors", f"a {c} {s}", [{"class": s, "count": 1, "color": c}]))
    for rel in RELATIONS:
        for s_ref in SHAPES:  # include[0] is the reference object B, include[1] is A (A rel B)
            for s_obj in SHAPES:
                if s_ref != s_obj:
                    out.append(_record("position", f"a {s_obj} {rel} a {s_ref}", [
                        {"class": s_ref, "count": 1},
                        {"class": s_obj, "count": 1, "position": [rel, 0]},
                    ]))
    for s1 in SHAPES:
        for s2 in SHAPES:
            if s1 == s2:
                continue
            for c1 in COLORS:
                for c2 in COLORS:
                    if c1 != c2:
                        out.append(_record("color_attr", f"a {c1} {s1} and a {c2} {s2}", [
                            {"class": s1, "count": 1, "color": c1}, {"class": s2, "count": 1, "color": c2}]))
    return out


def _hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


def split_records(records: list[dict[str, Any]] | None = None, test_fraction: float = TEST_FRACTION
                  ) -> dict[str, list[dict[str, Any]]]:
    """Disjoint train/test lists: per tag, the ceil(fraction * n) prompts with the smallest
    sha256 go to test (at least one per tag, so every tag is evaluated), the rest to train.
    Both keep the generator's order."""
    records = generate_records() if records is None else records
    test_prompts: set[str] = set()
    for tag in TAGS:
        prompts = sorted((r["prompt"] for r in records if r["tag"] == tag), key=_hash)
        k = max(1, math.ceil(test_fraction * len(prompts))) if len(prompts) > 1 else 0
        test_prompts.update(prompts[:k])
    return {"train": [r for r in records if r["prompt"] not in test_prompts],
            "test": [r for r in records if r["prompt"] in test_prompts]}


def to_jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def write_prompt_files(folder: str | Path = DATA_DIR) -> dict[str, Path]:
    """Write train.jsonl and test.jsonl (the committed copies live in DATA_DIR)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, recs in split_records().items():
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text(to_jsonl(recs))
    return paths


@lru_cache(maxsize=None)
def _load_split_cached(split: str) -> tuple[str, ...]:
    path = DATA_DIR / f"{split}.jsonl"
    if path.is_file():
        return tuple(ln for ln in path.read_text().splitlines() if ln.strip())
    # Installed without package data: the generator is deterministic, so regenerate.
    return tuple(json.dumps(r) for r in split_records()[split])


def load_split(split: str) -> list[dict[str, Any]]:
    """The metadata records of a split, fresh copies each call: "train", "test", "all", or
    "eval" (the evaluation set: the test prompts of every category, and all prompts of the
    categories in EVAL_ALL_PROMPTS, whose test split is too small to score).

    Raises:
        ValueError: for an unknown split name.
    """
    if split == "all":
        return load_split("train") + load_split("test")
    if split == "eval":
        return [r for r in load_split("all") if r["tag"] in EVAL_ALL_PROMPTS] + \
            [r for r in load_split("test") if r["tag"] not in EVAL_ALL_PROMPTS]
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; expected one of {', '.join(SPLITS + ('all', 'eval'))}")
    return [json.loads(ln) for ln in _load_split_cached(split)]


@lru_cache(maxsize=None)
def _by_prompt() -> dict[str, str]:
    return {r["prompt"]: json.dumps(r) for r in generate_records()}


def record_for_prompt(prompt: str) -> dict[str, Any]:
    """The metadata record of a grammar prompt, for callers that only have the text.

    Raises:
        KeyError: naming the prompt when it is not in the shapes grammar.
    """
    key = " ".join(prompt.strip().lower().split())
    found = _by_prompt().get(key)
    if found is None:
        raise KeyError(f"prompt {prompt!r} is not in the shapes grammar and came without GenEval metadata")
    return json.loads(found)


if __name__ == "__main__":
    for name, p in write_prompt_files().items():
        print(f"{name}: {p} ({len(p.read_text().splitlines())} prompts)")
