"""Markdown tables from `benchmarks/sweep.py` records (one JSON line per run).

    python -m benchmarks.sweep_table sweep.jsonl [more.jsonl ...] [--runs REGEX]

Prints one row per run (the eval curve, the final per-category scores, cumulative rollout
NFEs and stage seconds where the record has them), then one row per group of seeds: runs
whose names differ only in a trailing `-s<seed>` (seed 0 has none) are one group, shown as
mean, seed standard deviation and the per-seed finals.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

CATEGORIES = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]


def load(paths: list[str], pattern: str | None) -> list[dict]:
    runs = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    return [r for r in runs if pattern is None or re.search(pattern, r["name"])]


def group_of(name: str) -> str:
    return re.sub(r"-s\d+$", "", name)


def run_rows(runs: list[dict]) -> list[str]:
    rows = ["| run | overall at iterations | final ± SE | shapes reward, final | final per category "
            f"({', '.join(CATEGORIES)}) | rollout NFE | rollout / reward / learner / eval s |",
            "|---|---|---|---|---|---|---|"]
    for r in runs:
        curve = r["curve"]
        last = curve[-1]
        pts = " / ".join(f"{p['iteration']}: {p['score']:.3f}" for p in curve)
        cats = ", ".join(f"{last.get('categories', {}).get(c, float('nan')):.2f}" for c in CATEGORIES)
        cost = "–"
        if "rollout_s" in last:
            evals = sum(p.get("eval_s", 0.0) for p in curve)
            cost = f"{last['rollout_s']:.0f} / {last['reward_s']:.0f} / {last['learner_s']:.0f} / {evals:.0f}"
        rows.append(f"| {r['name']} | {pts} | {last['score']:.3f} ± {last['se']:.3f} | {last['reward']:.3f} | {cats} | "
                    f"{last.get('nfe', '–')} | {cost} |")
    return rows


def group_rows(runs: list[dict]) -> list[str]:
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(group_of(r["name"]), []).append(r)
    rows = ["| group | seeds | final overall, mean ± seed sd | per seed | final shapes reward, mean |",
            "|---|---|---|---|---|"]
    for name, members in groups.items():
        finals = [m["curve"][-1]["score"] for m in members]
        rewards = [m["curve"][-1]["reward"] for m in members]
        sd = statistics.stdev(finals) if len(finals) > 1 else float("nan")
        rows.append(f"| {name} | {len(members)} | {statistics.mean(finals):.3f} ± {sd:.3f} | "
                    f"{', '.join(f'{f:.3f}' for f in finals)} | {statistics.mean(rewards):.3f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", nargs="+")
    ap.add_argument("--runs", default=None, help="only runs whose name matches this regex")
    args = ap.parse_args()
    runs = load(args.records, args.runs)
    print("\n".join(run_rows(runs)))
    print()
    print("\n".join(group_rows(runs)))


if __name__ == "__main__":
    main()
