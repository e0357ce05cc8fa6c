"""`tempflow sweep`'s report (tempflow_core/reports/redraw.py): sweep points (runs stopped at different iterations) become the
ablation's report, compared at the last iteration every run reached."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tempflow_core.reports import redraw, sweep

ROOT = Path(__file__).resolve().parents[2]

CATS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]


def _point(it: int, score: float) -> dict:
    return {"iteration": it, "score": score, "se": 0.02, "reward": score + 0.1, "reward_se": 0.02,
            "nfe": 100 * it, "learner_nfe": 10 * it, "categories": {c: score for c in CATS}}


def _write(path: Path) -> dict[str, dict[int, float]]:
    rng = np.random.default_rng(0)
    runs = {"flow_grpo_fixed-s0": 42, "flow_grpo_fixed-s1": 36, "tempflow-s0": 30, "tempflow-s1": 36}
    scores = {n: {it: (0.3 if it == 0 else float(rng.uniform(0.3, 0.4))) for it in range(0, last + 1, 6)}
              for n, last in runs.items()}
    lines = [json.dumps({"name": n, "device": "cpu", "point": _point(it, s)}) for n, c in scores.items() for it, s in c.items()]
    path.write_text("\n".join(lines) + "\n")
    return scores


def test_report_compares_at_the_last_iteration_every_run_reached(tmp_path):
    scores = _write(tmp_path / "points.jsonl")
    rows = sweep.load_points(tmp_path / "points.jsonl")
    assert sweep.common_iteration(rows) == 30  # tempflow-s0 stopped there
    curves, finals = sweep.curves_of(rows, 30)
    assert list(curves) == ["flow_grpo_fixed", "tempflow"]
    assert max(p["iteration"] for pts in curves.values() for p in pts) == 30
    # NFE = rollout + learner, cumulative, as the pipeline's curves count it
    assert {p["nfe"] for p in curves["tempflow"]} == {110 * it for it in range(0, 31, 6)}
    redraw.write_sweep_report(rows, tmp_path / "out")
    summary = (tmp_path / "out" / "summary.md").read_text()
    for v in ("flow_grpo_fixed", "tempflow"):
        finals_at_30 = [scores[f"{v}-s{s}"][30] for s in (0, 1)]
        mean, sd = np.mean(finals_at_30), np.std(finals_at_30, ddof=1)
        assert f"| {v} | {mean:.3f} ± {sd:.3f} |" in summary
    assert "at iteration 30" in summary and "| base model | 0.300 |" in summary
    table = (tmp_path / "out" / "table.md").read_text()
    assert table.count("\n") == 2 + 3  # header, rule, base + two variants
    for fig in ("fig2_score_vs_iteration.png", "fig5_score_vs_nfe.png", "fig2_reward_vs_iteration.png"):
        assert (tmp_path / "out" / fig).stat().st_size > 0


def test_a_run_name_without_a_seed_is_refused(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"name": "tempflow", "point": _point(0, 0.3)}) + "\n")
    with pytest.raises(ValueError, match="VARIANT-sSEED"):
        sweep.curves_of(sweep.load_points(tmp_path / "p.jsonl"), 0)
