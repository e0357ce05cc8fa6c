"""The ablation's report (figures 2 and 5, Table 1's form, the verdicts) from sweep points.

`benchmarks/sweep_parallel.sh` runs the variants as in-process sweeps and appends every
evaluated point to `points.jsonl`; this turns those points into the same report
`tempflow ablation` writes (`tempflow_core.reports.report`, `tempflow_core.reports.figures`), for runs named
`VARIANT-sSEED`. Runs stopped at a deadline reach different iterations: every curve is cut at
`--at` (default: the last iteration every run evaluated), so the variants are compared at
equal iterations.

    python benchmarks/sweep_report.py results/gpu/ablation-64px/points.jsonl \\
        --out results/gpu/ablation-64px [--at 30]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tempflow_core.reports import figures, report  # noqa: E402

NAME = re.compile(r"^(?P<variant>.+)-s(?P<seed>\d+)$")
ORDER = ["flow_grpo", "flow_grpo_fixed", "reweight", "branch", "tempflow"]  # the ablation's; other names after


def load_points(path: Path) -> list[dict[str, Any]]:
    """The {name, point} lines of a points file (the last one wins where a point repeats)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest = {(r["name"], r["point"]["iteration"]): r for r in rows}
    return sorted(latest.values(), key=lambda r: (r["name"], r["point"]["iteration"]))


def common_iteration(rows: list[dict[str, Any]]) -> int:
    """The last iteration that every run evaluated."""
    by_run: dict[str, set[int]] = {}
    for r in rows:
        by_run.setdefault(r["name"], set()).add(r["point"]["iteration"])
    return min(max(its) for its in by_run.values())


def curves_of(rows: list[dict[str, Any]], at: int) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict]]]:
    """(curves, finals) in `tempflow ablation`'s form: per variant the points of every seed up
    to iteration `at` (score, se, reward, reward_se, cumulative NFE of rollout + learner), and
    per variant the evaluation at `at` of every seed (reward, GenEval overall, categories)."""
    curves: dict[str, list[dict[str, Any]]] = {}
    finals: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        m, p = NAME.match(r["name"]), r["point"]
        if m is None:
            raise ValueError(f"run name {r['name']!r} is not VARIANT-sSEED")
        if p["iteration"] > at:
            continue
        rollout = int(p.get("nfe", 0))
        point = {"seed": int(m["seed"]), "iteration": p["iteration"], "score": p["score"], "se": p["se"],
                 "reward": p["reward"], "reward_se": p["reward_se"], "geneval_overall": p["score"],
                 "rollout_nfe": rollout, "nfe": rollout + int(p.get("learner_nfe", 0))}
        curves.setdefault(m["variant"], []).append(point)
        if p["iteration"] == at:
            finals.setdefault(m["variant"], []).append(
                {"reward": p["reward"], "geneval_overall": p["score"], "geneval_overall_se": p["se"],
                 "geneval": p["categories"]})
    rank = {v: i for i, v in enumerate(ORDER)}
    order = sorted(curves, key=lambda v: (rank.get(v, len(ORDER)), v))
    return {v: curves[v] for v in order}, {v: finals[v] for v in order if v in finals}


def write_report(rows: list[dict[str, Any]], out: Path, at: int | None = None) -> dict[str, str]:
    at = common_iteration(rows) if at is None else at
    curves, finals = curves_of(rows, at)
    base = next(r["point"] for r in rows if r["point"]["iteration"] == 0)
    base_eval = {"reward": base["reward"], "geneval_overall": base["score"], "geneval_overall_se": base["se"],
                 "geneval": base["categories"]}
    out.mkdir(parents=True, exist_ok=True)
    label = "GenEval-style overall (held-out)"
    made = {"fig2": str(figures.score_curves(curves, "iteration", out / "fig2_score_vs_iteration.png", label)),
            "fig5": str(figures.score_curves(curves, "nfe", out / "fig5_score_vs_nfe.png", label))}
    dense = report.rescore(curves, "reward")
    made["fig2_reward"] = str(figures.score_curves(dense, "iteration", out / "fig2_reward_vs_iteration.png",
                                                   "eval shapes reward (held-out)"))
    summary = (f"## Judged by {label}, at iteration {at}\n\n" + report.headline_markdown(report.headline(curves))
               + "\n## Judged by the held-out shapes reward (partial credit)\n\n"
               + report.headline_markdown(report.headline(dense)))
    made["summary"] = str(report.write_text(out / "summary.md", summary))
    made["table"] = str(report.write_text(out / "table.md", report.category_table(base_eval, finals, "shapes") + "\n"))
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("points", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--at", type=int, default=None, help="compare at this iteration (default: the last every run reached)")
    args = ap.parse_args()
    for name, path in write_report(load_points(args.points), args.out, args.at).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
