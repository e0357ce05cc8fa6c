"""`tempflow sweep`: variants x seeds trained in worker processes side by side, every evaluated
point appended as it is measured, the ablation's report drawn from the points, finished runs
skipped on a rerun, runs stopped at the deadline, and bad options refused before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.pipeline.cli_runner import run_cli


PASSWORD = "planted-sweep-password-7341"


def _sets(model_dir: Path) -> list[str]:
    sets = [f"model.path={model_dir}", "rollout.prompts_per_iter=2", "rollout.group_size=3", "lora.rank=4",
            "lora.alpha=8", "sampling.num_steps=4", "sampling.eval_num_steps=4", "eval.images_per_category=0",
            "eval.max_prompts=4"]
    return [x for s in sets for x in ("--set", s)]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_sweep_trains_its_runs_side_by_side_reports_them_and_a_rerun_skips_them(tiny_model_dir, tmp_path):
    """Also: a password in the config (an MLflow URI's, which a sweep never uses) is written nowhere."""
    out = tmp_path / "out"
    args = ["sweep", "--variants", "tempflow,flow_grpo_fixed", "--seeds", "0", "--iterations", "2", "--eval-every", "2",
            "--jobs", "2", "--out", str(out), *_sets(tiny_model_dir),
            "--set", f"pipeline.mlflow_uri=http://tempflow:{PASSWORD}@127.0.0.1:9"]
    code, stdout, stderr = run_cli(args, dict(os.environ), tmp_path, own_process=False, timeout=600)
    assert code == 0, stdout + stderr
    points = _lines(out / "points.jsonl")
    by_run: dict[str, list[int]] = {}
    for p in points:
        by_run.setdefault(p["name"], []).append(p["point"]["iteration"])
    assert {k: sorted(v) for k, v in by_run.items()} == {"tempflow-s0": [0, 2], "flow_grpo_fixed-s0": [0, 2]}
    base = {p["name"]: p["point"] for p in points if p["point"]["iteration"] == 0}
    assert base["tempflow-s0"] == base["flow_grpo_fixed-s0"]  # both start from the same base model's evaluation
    last = {p["name"]: p["point"] for p in points if p["point"]["iteration"] == 2}
    assert last["tempflow-s0"]["nfe"] > 0 and last["tempflow-s0"]["nfe"] != last["flow_grpo_fixed-s0"]["nfe"]
    runs = {r["name"]: r for r in _lines(out / "runs.jsonl")}
    assert runs.keys() == {"tempflow-s0", "flow_grpo_fixed-s0"}
    assert runs["tempflow-s0"]["config"]["algorithm"] == "tempflow" and runs["tempflow-s0"]["config"]["train"]["iterations"] == 2
    for name in ("summary.md", "table.md", "fig2_score_vs_iteration.png", "fig5_score_vs_nfe.png"):
        assert (out / name).stat().st_size > 0, name
    assert "tempflow" in (out / "summary.md").read_text() and "flow_grpo_fixed" in (out / "summary.md").read_text()
    assert runs["tempflow-s0"]["config"]["pipeline"]["mlflow_uri"] == "http://tempflow:***@127.0.0.1:9"
    assert not [p for p in out.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]

    code, stdout, stderr = run_cli(args, dict(os.environ), tmp_path, own_process=False)
    assert code == 0, stdout + stderr
    assert "2 of 2 runs already in" in stdout and "started" not in stdout
    assert _lines(out / "points.jsonl") == points


def test_runs_still_training_at_the_deadline_are_stopped(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["sweep", "--variants", "tempflow", "--seeds", "0", "--deadline", "1", "--out",
                                    str(out), *_sets(tiny_model_dir)], dict(os.environ), tmp_path, own_process=False)
    assert code == 1 and "tempflow-s0: stopped at the deadline" in stdout, stdout + stderr
    assert "no points" in stderr and not (out / "runs.jsonl").exists()


@pytest.mark.parametrize("args, words", [
    (["--run", "fast:train.lr=1e-3"], ["--run 'fast:train.lr=1e-3'", "VARIANT-sSEED"]),
    (["--variants", "tempflow", "--seeds", "0", "--run", "tempflow-s0:train.lr=1e-3"], ["already in the sweep"]),
    (["--seeds", "a,b"], ["--seeds"]),
    (["--variants", "", "--seeds", "0"], ["no runs"]),
    (["--variants", "tempflow", "--seeds", "0", "--set", "train.lr=-1"], ["train.lr"]),
])
def test_bad_options_are_refused_before_any_work(args, words, tmp_path):
    """One line naming the option, or the config's own refusal (a line per bad field)."""
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["sweep", "--out", str(out), *args], dict(os.environ), tmp_path, own_process=False)
    assert code == 2, stdout + stderr
    text = stderr.strip()
    assert all(w in text for w in words), text
    assert "\n" not in text or text.startswith("error: invalid run config:"), text
    assert not out.exists()
