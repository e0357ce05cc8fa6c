"""A paired comparison's folder: summary.md is what its per-image records give
(`tempflow report DIR` recomputes it from images.jsonl alone)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("experiment", ["paired/64px-early"])
def test_the_paired_summary_is_what_its_per_image_records_give(tmp_path, experiment):
    src = ROOT / "results" / experiment
    shutil.copy(src / "images.jsonl", tmp_path / "images.jsonl")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "report", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "summary.md").read_text() == (src / "summary.md").read_text()
