"""Checkpoints scored under other evaluation settings, against the base model scored the same
way, paired by image.

    tempflow eval --run RUN --iteration N --set eval.guidance_scale=1 --out DIR/RUN.json   # per checkpoint
    tempflow eval --config CFG --set eval.guidance_scale=1 --out DIR/base.json             # the base model
    python -m benchmarks.eval_report --out DIR [--categories A,B]

Reads every `*.json` in DIR (the scores `tempflow eval --out` writes, each image's included).
A file without a run is the base model; the others are grouped into arms by run name less its
seed and config digest (`NAME-s<seed>-<digest>`) and the iteration. Every file must be scored
with the same guidance and on the same images. Writes `summary.md`: per arm the seeds' mean of
the score (the GenEval-style overall over `--categories`, default every evaluated one) and its
gain over the base model, paired by image (`tempflow_core/reports/paired.py`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from tempflow_core.reports.paired import compare, overall_weights

ROOT = Path(__file__).resolve().parents[1]


def _fail(msg: str) -> int:
    print(msg, file=sys.stderr)
    return 2


def _scores(result: dict, items: list[tuple], path: Path) -> list[float]:
    by = {(s["prompt"], s["seed"]): s["strict"] for s in result["samples"]}
    missing = [i for i in items if i not in by]
    if missing:
        print(f"{path.name} has no score for {missing[0]}: score every file on the same images", file=sys.stderr)
        raise SystemExit(2)
    return [by[i] for i in items]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder of `tempflow eval --out` files; summary.md goes here")
    ap.add_argument("--categories", default=None, help="comma-separated categories of the score (default: all)")
    args = ap.parse_args(argv)
    files = sorted(args.out.glob("*.json"))
    if not files:
        return _fail(f"no *.json in {args.out}: write the scores there with `tempflow eval ... --out {args.out}/NAME.json`")
    results = {f: json.loads(f.read_text()) for f in files}
    unshaped = [f.name for f, r in results.items() if not all("strict" in s for s in r.get("samples", [{}]))]
    if unshaped:
        return _fail(f"{unshaped[0]} has no per-image GenEval-style scores: evaluate on shapes prompts")
    base = [f for f, r in results.items() if "run" not in r]
    if len(base) != 1:
        return _fail(f"{args.out} holds {len(base)} base-model files (no 'run'): put exactly one there")
    guidance = {r.get("guidance_scale") for r in results.values()}
    if len(guidance) != 1:
        return _fail(f"the files were scored with guidance {sorted(map(str, guidance))}: compare one guidance at a time")
    every = sorted({s["category"] for r in results.values() for s in r["samples"]})
    categories = sorted(args.categories.split(",")) if args.categories else every
    unknown = [c for c in categories if c not in every]
    if unknown:
        return _fail(f"--categories: {unknown[0]!r} is not an evaluated category: use some of {','.join(every)}")
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
    tmp = args.out / "summary.md.tmp"
    tmp.write_text(text)
    tmp.replace(args.out / "summary.md")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
