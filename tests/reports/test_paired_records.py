"""A paired comparison's folder: summary.md is what its per-image records give
(`tempflow report DIR` recomputes it from images.jsonl alone)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.pipeline.cli_runner import run_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("experiment", ["paired/64px-early"])
def test_the_paired_summary_is_what_its_per_image_records_give(tmp_path, experiment):
    src = ROOT / "results" / experiment
    shutil.copy(src / "images.jsonl", tmp_path / "images.jsonl")
    code, _, err = run_cli(["report", str(tmp_path)], dict(os.environ), ROOT, own_process=False)
    assert code == 0, err[-2000:]
    assert (tmp_path / "summary.md").read_text() == (src / "summary.md").read_text()
