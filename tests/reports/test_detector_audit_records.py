"""The detector audit's records: summary.md is what images.jsonl gives, and each image's v1 and
v2 verdicts are the grid's at those rules' thresholds (records written under other rules fail)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tempflow_core.shapes import RULES, RULES_V1

ROOT = Path(__file__).resolve().parents[2]
AUDIT = ROOT / "results" / "detector-audit"


def test_the_audit_summary_is_what_its_per_image_records_give(tmp_path):
    copy = tmp_path / "audit"
    copy.mkdir()
    shutil.copy(AUDIT / "images.jsonl", copy / "images.jsonl")
    out = subprocess.run([sys.executable, "-m", "benchmarks.detector_audit", "--report-only", "--out", str(copy)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (copy / "summary.md").read_text() == (AUDIT / "summary.md").read_text()


def test_each_images_verdicts_agree_with_the_rules_they_name():
    records = [json.loads(line) for line in (AUDIT / "images.jsonl").read_text().splitlines()]
    assert {r["model"] for r in records} == {"base", "p64-shapes-tempflow-s0-113ccf", "p64-shapes-tempflow-s1-94740a"}
    assert len(records) == 3 * 414
    v1 = f"{RULES_V1.min_confidence}/{RULES_V1.min_color_share}"
    v2 = f"{RULES.min_confidence}/{RULES.min_color_share}"
    for r in records:
        assert r["strict_at"][v1] == r["v1_strict"] and r["strict_at"][v2] == r["v2_strict"], r["noise"]
        if r["v1_strict"] and not r["v2_strict"]:
            assert r["v2_dropped"], r["noise"]  # a verdict v2 changed names the objects it dropped
