"""`tempflow report DIR`: a committed experiment folder's figures and tables redrawn from its
records alone agree with the committed ones byte for byte; a folder it cannot draw from is
refused with exit 2 and one line, before anything is written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tempflow_core.reports import records, redraw

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"
CLI = [sys.executable, "-m", "flows.cli", "report"]
DRAWN = ("table.md", "summary.md")


def _report(folder: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + [str(folder)], capture_output=True, text=True, timeout=300, cwd=cwd, check=False,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "TEMPFLOW_HOME": str(cwd / "home")})


def _copy_without_drawings(src: Path, dst: Path) -> list[str]:
    """Copy an experiment folder, leaving out what the report draws; the PNG names left out."""
    shutil.copytree(src, dst)
    pngs = sorted(p.name for p in dst.glob("*.png"))
    for name in pngs + list(DRAWN):
        (dst / name).unlink()
    return pngs


def test_report_redraws_a_committed_sweep_folder_as_committed(tmp_path):
    src = RESULTS / "cpu" / "64px-48it"
    folder = tmp_path / "64px-48it"
    pngs = _copy_without_drawings(src, folder)
    assert pngs == ["fig2_reward_vs_iteration.png", "fig2_score_vs_iteration.png", "fig5_score_vs_nfe.png"]
    out = _report(folder, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in DRAWN:
        assert (folder / name).read_bytes() == (src / name).read_bytes(), name
    for name in pngs:
        assert (folder / name).stat().st_size > 0, name
    assert not list(folder.glob("*.tmp")) and not (tmp_path / "home").exists()  # no state, no half files
    summary = (folder / "summary.md").read_text()
    assert "| tempflow - flow_grpo_fixed | +0.0101 | 0.0189 | 0.593 | 2/2 | fewer than 4 seeds: no verdict |" \
        in summary  # the all-pairs table
    assert "| 24 | 0.388 ± 0.020 (2) | 0.335 ± 0.005 (2) | +0.0529 (0.0145) |" in summary  # per iteration


def test_the_nine_seed_folder_joins_the_first_runs_points_as_its_records_json_says(tmp_path):
    gpu = tmp_path / "results" / "gpu"
    shutil.copytree(RESULTS / "gpu" / "ablation-64px", gpu / "ablation-64px")
    _copy_without_drawings(RESULTS / "gpu" / "ablation-64px-more-seeds", gpu / "ablation-64px-more-seeds")
    folder = gpu / "ablation-64px-more-seeds"
    redraw.redraw(records.read_records(folder))
    for name in DRAWN:
        assert (folder / name).read_bytes() == (RESULTS / "gpu" / "ablation-64px-more-seeds" / name).read_bytes()
    summary = (folder / "summary.md").read_text()
    # nine seeds of each to iteration 12, seven tempflow seeds at 18
    assert "| 6 | 0.327 ± 0.016 (9) | 0.296 ± 0.021 (9) | +0.0309 (0.0088) |" in summary
    assert "| 18 | 0.332 ± 0.019 (7) | 0.331 ± 0.021 (9) | +0.0012 (0.0100) |" in summary
    assert "at iteration 12" in summary and "branch" not in summary


def test_report_redraws_an_ablation_folder_from_its_curves_json(tmp_path):
    src = RESULTS / "ablation" / "jpeg_compressibility"
    folder = tmp_path / "jpeg"
    pngs = _copy_without_drawings(src, folder)
    made = redraw.redraw(records.read_records(folder))
    assert sorted(Path(p).name for p in made.values()) == sorted(pngs + list(DRAWN))
    for name in DRAWN:
        assert (folder / name).read_bytes() == (src / name).read_bytes(), name
    for name in pngs:
        assert (folder / name).stat().st_size > 0, name


def test_a_folder_without_records_exits_2_with_one_line_and_writes_nothing(tmp_path):
    empty = tmp_path / "results" / "empty"
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("no records here\n")
    out = _report(empty, tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(empty) in lines[0] and "holds no records" in lines[0]
    assert "points.jsonl" in lines[0] and "curves.json" in lines[0]  # the fix: which records a folder needs
    assert sorted(p.name for p in empty.iterdir()) == ["notes.txt"]
    parent = tmp_path / "results"  # its subfolder holds records: the fix names the command for it
    (parent / "sweep").mkdir()
    shutil.copy(RESULTS / "cpu" / "64px-48it" / "points.jsonl", parent / "sweep")
    with pytest.raises(records.RecordsError, match=f"its subfolders sweep hold records: tempflow report {parent}/sweep"):
        records.read_records(parent)
    missing = _report(tmp_path / "nowhere", tmp_path)
    assert missing.returncode == 2 and "no such folder" in missing.stderr
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "home").exists()


@pytest.mark.parametrize("text, problem", [
    ("{not json\n", "line 1: not JSON"),
    (json.dumps({"name": "tempflow", "point": {"iteration": 0}}) + "\n", "is not VARIANT-sSEED"),
    (json.dumps({"name": "tempflow-s0", "point": {"iteration": 0, "score": 0.3}}) + "\n", "the point lacks se"),
])
def test_bad_points_are_refused_before_anything_is_drawn(tmp_path, text, problem):
    (tmp_path / "points.jsonl").write_text(text)
    with pytest.raises(records.RecordsError, match=problem):
        records.read_records(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["points.jsonl"]


def test_a_curves_json_without_curves_is_refused(tmp_path):
    (tmp_path / "curves.json").write_text(json.dumps({"reward": "shapes"}))
    with pytest.raises(records.RecordsError, match="lacks curves, std_by_step, finals, base_eval, config"):
        records.read_records(tmp_path)


def test_a_records_json_naming_a_missing_points_file_is_refused(tmp_path):
    (tmp_path / "records.json").write_text(json.dumps({"points": ["points.jsonl", "../other/points.jsonl"]}))
    (tmp_path / "points.jsonl").write_text("")
    with pytest.raises(records.RecordsError, match="which does not exist"):
        records.read_records(tmp_path)


@pytest.mark.parametrize("experiment", ["ablation/shapes", "ablation/jpeg_compressibility", "gpu/ablation-64px",
                                        "gpu/ablation-64px-more-seeds", "cpu/64px-48it", "gpu/smoke",
                                        "weighting/jpeg-T6-plain", "weighting/jpeg-T10-plain",
                                        "weighting/jpeg-T6-branch", "weighting/jpeg-T10-branch",
                                        "ema/jpeg-T6-flow_grpo_fixed", "cpu/64px-product"])
def test_every_committed_folders_tables_are_what_its_records_give(tmp_path, experiment):
    """The committed tables of every results folder agree with its records: a table edited by
    hand, or records changed without redrawing, fails here."""
    copy = tmp_path / "results"
    shutil.copytree(RESULTS, copy, ignore=shutil.ignore_patterns("*.png"))
    folder = copy / experiment
    tables = sorted(p.name for p in (RESULTS / experiment).glob("*.md") if p.name != "README.md")
    assert tables, f"results/{experiment} holds no tables"
    redraw.redraw(records.read_records(folder))
    for name in tables:
        assert (folder / name).read_text() == (RESULTS / experiment / name).read_text(), f"{experiment}/{name}"
