"""Checkpoints scored under other evaluation settings, against the base model scored the same
way, paired by image.

    tempflow eval --run RUN --iteration N --set eval.guidance_scale=1 --out DIR/RUN.json   # per checkpoint
    tempflow eval --config CFG --set eval.guidance_scale=1 --out DIR/base.json             # the base model
    tempflow report DIR [--categories A,B]

Reads every `*.json` in DIR (the scores `tempflow eval --out` writes, each image's included).
A file without a run is the base model; the others are grouped into arms by run name less its
seed and config digest (`NAME-s<seed>-<digest>`) and the iteration. Every file must be scored
with the same guidance and on the same images. Writes `summary.md`: per arm the seeds' mean of
the score (the GenEval-style overall over `--categories`, default the ones `report.json`
recorded, else every evaluated one) and its gain over the base model, paired by image
(`tempflow_core/reports/paired.py`); and `report.json`, the categories, so the summary redraws
from the folder alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from tempflow_core.reports.paired import compare, overall_weights
from tempflow_core.reports.records import RecordsError
from tempflow_core.reports.report import write_text

SETTINGS = "report.json"  # the categories of the last report, so that it redraws alone


def _scores(result: dict, items: list[tuple], path: Path) -> list[float]:
    by = {(s["prompt"], s["seed"]): s["strict"] for s in result["samples"]}
    missing = [i for i in items if i not in by]
    if missing:
        raise RecordsError(f"{path.name} has no score for {missing[0]}: score every file on the same images")
    return [by[i] for i in items]


def _results(folder: Path) -> dict[Path, dict]:
    """The `tempflow eval --out` files of `folder` (every *.json but the report's own)."""
    found = {}
    for f in sorted(folder.glob("*.json")):
        if f.name == SETTINGS:
            continue
        try:
            found[f] = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise RecordsError(f"{f}: not JSON ({e.msg}); fix or remove the file") from None
    return found


def is_evals_folder(folder: Path) -> bool:
    """A folder of `tempflow eval --out` files: each *.json an evaluation (its per-image samples)."""
    try:
        results = _results(folder)
    except RecordsError:
        return False
    return bool(results) and all(isinstance(r, dict) and "samples" in r for r in results.values())


def report(out: Path, categories: str | None = None) -> str:
    """summary.md (and report.json) of the evaluations in `out`; returns summary.md."""
    results = _results(out)
    if not results:
        raise RecordsError(f"no *.json in {out}: write the scores there with `tempflow eval ... --out {out}/NAME.json`")
    unshaped = [f.name for f, r in results.items() if not all("strict" in s for s in r.get("samples", [{}]))]
    if unshaped:
        raise RecordsError(f"{unshaped[0]} has no per-image GenEval-style scores: evaluate on shapes prompts")
    base = [f for f, r in results.items() if "run" not in r]
    if len(base) != 1:
        raise RecordsError(f"{out} holds {len(base)} base-model files (no 'run'): put exactly one there")
    guidance = {r.get("guidance_scale") for r in results.values()}
    if len(guidance) != 1:
        raise RecordsError(f"the files were scored with guidance {sorted(map(str, guidance))}: compare one guidance "
                           "at a time")
    every = sorted({s["category"] for r in results.values() for s in r["samples"]})
    saved = out / SETTINGS
    before = json.loads(saved.read_text()) if saved.is_file() else {}
    categories = sorted(categories.split(",")) if categories else before.get("categories", every)
    unknown = [c for c in categories if c not in every]
    if unknown:
        raise RecordsError(f"--categories: {unknown[0]!r} is not an evaluated category: use some of {','.join(every)}")
    first = results[base[0]]["samples"]
    items = sorted({(s["prompt"], s["seed"]) for s in first if s["category"] in categories})
    category = {(s["prompt"], s["seed"]): s["category"] for s in first}
    groups = [category[i] for i in items]
    w, _ = overall_weights(groups, len(items))
    b = np.array(_scores(results[base[0]], items, base[0]), dtype=float)
    arms: dict[tuple[str, int], dict[int, np.ndarray]] = {}
    for f, r in results.items():
        if f in base:
            continue
        m = re.fullmatch(r"(.+)-s(\d+)-[0-9a-f]{6}", r["run"])
        name, seed = (m.group(1), int(m.group(2))) if m else (r["run"], 0)
        arms.setdefault((name, r["iteration"] + 1), {})[seed] = np.array(_scores(r, items, f), dtype=float)
    lines = ["# Checkpoints against the base model, scored the same way", "",
             f"Guidance {guidance.pop()}; score: the GenEval-style overall (strict) over {', '.join(categories)}, mean "
             "over seeds; gain: paired by image against the base model, SE with the seeds' spread and the evaluation "
             "set's; beyond the noise only from 4 seeds and p < 0.05.", "",
             "| arm | iteration | seeds | score | base | gain | SE | p | seeds above | verdict |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for (name, it), by_seed in sorted(arms.items()):
        seeds = sorted(by_seed)
        a = np.stack([by_seed[s] for s in seeds])  # [S, I]
        res = compare(a, np.tile(b, (len(seeds), 1)), groups)
        verdict = ("above" if res.diff > 0 else "below") + ", beyond the noise" if res.beyond else "within the noise"
        lines.append(f"| {name} | {it} | {len(seeds)} | {float((a @ w).mean()):.3f} | {float(b @ w):.3f} | "
                     f"{res.diff:+.4f} | {res.se:.4f} | {res.p:.3f} | {res.won}/{res.seeds} | {verdict} |")
    text = "\n".join(lines) + "\n"
    write_text(saved, json.dumps({"categories": categories}) + "\n")
    write_text(out / "summary.md", text)
    return text
