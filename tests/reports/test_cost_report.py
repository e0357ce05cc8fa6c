"""benchmarks/cost_report.py from records alone: rows shares and paired differences against
values worked out by hand; bad input refused with one line and nothing written."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "cost_report.py"


def _records(tmp_path: Path) -> Path:
    """Two arms x 4 seeds, 4 images in 2 categories. The reference ends at iteration 8 with every
    image scored 0 but the first of each category (overall 0.5); the cheap arm at iteration 8 also
    passes the second image of category a (overall 0.75) with half the reference's rows."""
    out = tmp_path / "rec"
    out.mkdir()
    points, images = [], []
    items = [("p0", "a"), ("p1", "a"), ("p2", "b"), ("p3", "b")]
    for arm, rows, passed in (("tempflow", 1000, {"p0", "p2"}), ("tempflow branch_steps=2", 500, {"p0", "p1", "p2"})):
        for seed in range(4):
            points.append({"arm": arm, "settings": {}, "seed": seed, "iteration": 8, "rollout_rows": rows - 100,
                           "learner_rows": 100, "stage_seconds": rows / 10, "overall": 0.5, "overall_se": 0.1,
                           "reward": 0.5, "detector": "v2", "run": f"{arm}-{seed}"})
            for prompt, cat in items:
                images.append({"arm": arm, "seed": seed, "iteration": 8, "prompt": prompt, "category": cat,
                               "noise_seed": 1, "strict": int(prompt in passed), "reward": 0.0})
    (out / "points.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    (out / "images.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in images).encode()))
    return out


def test_shares_and_differences_by_hand(tmp_path):
    out = _records(tmp_path)
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(line for line in (out / "summary.md").read_text().splitlines()
               if line.startswith("| tempflow branch_steps=2 | 8 | 0.50 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # rows 500 / 1000, seconds 50 / 100; overall by category: (1 + 0.5) / 2 - (0.5 + 0.5) / 2 = +0.25
    assert cells[3] == "0.50" and cells[6] == "+0.2500" and cells[9] == "4/4"
    assert (out / "score-vs-rows.png").stat().st_size > 0


def test_an_unknown_reference_is_refused_with_one_line_and_nothing_written(tmp_path):
    out = _records(tmp_path)
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--reference", "flow_grpo"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--reference 'flow_grpo'" in r.stderr
    assert not (out / "summary.md").exists()
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "none")], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and "points.jsonl does not exist" in r.stderr and not (tmp_path / "none").exists()


def test_the_committed_comparison_is_what_its_records_give(tmp_path):
    src = ROOT / "results" / "cost" / "64px"
    for name in ("points.jsonl", "images.jsonl.gz", "comparison.json"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "summary.md").read_text() == (src / "summary.md").read_text()
    points = [json.loads(line) for line in (src / "points.jsonl").read_text().splitlines()]
    # every arm starts at the base model with no rows spent
    arms = {p["arm"] for p in points}
    assert len(arms) == 5
    for arm in arms:  # default and [0,1] on eight seeds, the others on the first four
        first = [p for p in points if p["arm"] == arm and p["iteration"] == 0]
        want = list(range(20, 28)) if arm in ("cost-default-shapes-tempflow", "cost-p01-shapes-tempflow") else \
            [20, 21, 22, 23]
        assert sorted(p["seed"] for p in first) == want and all(p["rollout_rows"] == 0 for p in first)
    # the rows recorded are the rollout's arithmetic: 16 prompts x (5 backbone steps + 8 x 15 child steps), CFG x 2
    default = [p for p in points if p["arm"] == "cost-default-shapes-tempflow" and p["iteration"] == 8]
    assert {p["rollout_rows"] for p in default} == {8 * 16 * (5 + 8 * 15) * 2}
    images = gzip.decompress((src / "images.jsonl.gz").read_bytes()).decode().splitlines()
    assert len(images) == sum(414 for p in points if p["iteration"] > 0)
