"""The coarse-children records: summary.md is what children.jsonl gives, and the records hold
what the measurement says (same children at every stride, rows from the completion grid)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tempflow_core.algorithm.rollout import completion_rows

ROOT = Path(__file__).resolve().parents[2]
RECORDS = ROOT / "results" / "coarse-children"


def test_the_summary_is_what_the_per_child_records_give(tmp_path):
    shutil.copy(RECORDS / "children.jsonl", tmp_path / "children.jsonl")
    out = subprocess.run([sys.executable, "-m", "benchmarks.coarse_children", "--report-only",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "summary.md").read_text() == (RECORDS / "summary.md").read_text()


def test_every_stride_scores_the_same_children_and_its_rows_follow_the_grid():
    children = [json.loads(line) for line in (RECORDS / "children.jsonl").read_text().splitlines()]
    by_stride: dict[int, set] = {}
    for c in children:
        by_stride.setdefault(c["stride"], set()).add((c["seed"], c["prompt_id"], c["step"], c["child"]))
        T, K, steps = c["T"], c["K"], list(range(c["T"] - 1))
        # backbone steps up to the last branch step + the children's completions, per prompt
        assert c["rollout_rows"] == c["prompts"] * (steps[-1] + 1 + completion_rows(steps, T, K, c["stride"]))
    assert sorted(by_stride) == [1, 2, 3, 5]
    assert all(keys == by_stride[1] for keys in by_stride.values())


def test_report_only_without_records_exits_2_with_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.coarse_children", "--report-only",
                          "--out", str(tmp_path / "none")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "children.jsonl" in out.stderr
    assert not (tmp_path / "none").exists()
