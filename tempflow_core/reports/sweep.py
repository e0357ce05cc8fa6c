"""Sweep points as the ablation's curves: the records `tempflow sweep` appends,
one JSON line per evaluated point ({name: "VARIANT-sSEED", device, point}), read into the
form `tempflow ablation` keeps (curves per variant, the final evaluations, the base model's).

Runs stopped at a deadline reach different iterations, so the report compares them at one
iteration: by default the last one every run evaluated (``common_iteration``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

NAME = re.compile(r"^(?P<variant>.+)-s(?P<seed>\d+)$")
ORDER = ["flow_grpo", "flow_grpo_fixed", "reweight", "branch", "tempflow"]  # the ablation's; other names after
POINT_KEYS = ("iteration", "score", "se", "reward", "reward_se", "categories")


def parse_points(text: str, source: str = "points.jsonl") -> list[dict[str, Any]]:
    """The {name, point} lines of a points file, checked: ValueError naming the line of the
    first one that is not JSON, has no VARIANT-sSEED name or lacks a point's fields."""
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} line {i}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("point"), dict):
            raise ValueError(f"{source} line {i}: not a {{name, point}} record")
        if NAME.match(str(row.get("name", ""))) is None:
            raise ValueError(f"{source} line {i}: run name {row.get('name')!r} is not VARIANT-sSEED")
        missing = [k for k in POINT_KEYS if k not in row["point"]]
        if missing:
            raise ValueError(f"{source} line {i}: the point lacks {', '.join(missing)}")
        rows.append(row)
    return rows


def latest(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (run, iteration), the last one read winning, sorted by run and iteration."""
    by_key = {(r["name"], r["point"]["iteration"]): r for r in rows}
    return sorted(by_key.values(), key=lambda r: (r["name"], r["point"]["iteration"]))


def load_points(path: Path) -> list[dict[str, Any]]:
    """The {name, point} lines of a points file (the last one wins where a point repeats)."""
    return latest(parse_points(Path(path).read_text(), str(path)))


def variant_of(name: str) -> str:
    """The variant of a VARIANT-sSEED run name (ValueError for another name)."""
    m = NAME.match(name)
    if m is None:
        raise ValueError(f"run name {name!r} is not VARIANT-sSEED")
    return m["variant"]


def common_iteration(rows: list[dict[str, Any]]) -> int:
    """The last iteration that every run evaluated."""
    by_run: dict[str, set[int]] = {}
    for r in rows:
        by_run.setdefault(r["name"], set()).add(r["point"]["iteration"])
    return min(max(its) for its in by_run.values())


def last_iteration(rows: list[dict[str, Any]]) -> int:
    """The last iteration any run evaluated."""
    return max(r["point"]["iteration"] for r in rows)


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


def base_eval_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The base model's evaluation (the first iteration-0 point; every run starts from it) in
    the form of an eval result (reward, GenEval overall with its standard error, categories)."""
    base = next((r["point"] for r in rows if r["point"]["iteration"] == 0), None)
    if base is None:
        raise ValueError("no point at iteration 0 (the base model)")
    return {"reward": base["reward"], "geneval_overall": base["score"], "geneval_overall_se": base["se"],
            "geneval": base["categories"]}


def devices(rows: list[dict[str, Any]]) -> list[str]:
    """The devices the points were measured on, as the records name them."""
    return sorted({str(r.get("device")) for r in rows if r.get("device")})
