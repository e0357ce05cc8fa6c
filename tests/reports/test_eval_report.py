"""`tempflow report` (tempflow_core/reports/checkpoint_evals.py) on `tempflow eval --out` files: the
gain over the base model by hand; mixed guidance, two base files and missing images refused with one line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.pipeline.cli_runner import in_process

ROOT = Path(__file__).resolve().parents[2]


def _report(*args: str) -> subprocess.CompletedProcess:
    return in_process(["report", *args], ROOT)  # typer's runner: no interpreter start per call

ITEMS = [("p0", "a"), ("p1", "a"), ("p2", "b"), ("p3", "b")]


def _file(path: Path, passed: set[str], run: str | None = None, guidance: float = 1.0, items=ITEMS) -> None:
    result = {"guidance_scale": guidance, "samples": [
        {"prompt": p, "seed": 7, "category": c, "strict": int(p in passed), "reward": 0.0} for p, c in items]}
    if run:
        result.update(run=run, iteration=7)
    path.write_text(json.dumps(result))


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return _report(str(out), *extra)


def test_gain_over_the_base_by_hand(tmp_path):
    _file(tmp_path / "base.json", {"p0"})  # overall (0.5 + 0) / 2 = 0.25
    for seed in range(4):  # every seed also passes p2: overall (0.5 + 0.5) / 2 = 0.5
        _file(tmp_path / f"s{seed}.json", {"p0", "p2"}, run=f"cost-cfg1-shapes-tempflow-s{seed}-abc123")
    r = _run(tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(line for line in (tmp_path / "summary.md").read_text().splitlines()
               if line.startswith("| cost-cfg1-shapes-tempflow |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:6] == ["8", "4", "0.500", "0.250", "+0.2500"] and cells[8] == "4/4"
    # over category a alone nothing changed
    r = _run(tmp_path, "--categories", "a")
    assert r.returncode == 0 and "| cost-cfg1-shapes-tempflow | 8 | 4 | 0.500 | 0.500 | +0.0000 |" in r.stdout


def test_mixed_guidance_two_bases_and_missing_images_are_refused(tmp_path):
    _file(tmp_path / "base.json", {"p0"})
    _file(tmp_path / "s0.json", {"p0"}, run="x-s0-abc123", guidance=4.0)
    r = _run(tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "guidance" in r.stderr
    _file(tmp_path / "s0.json", {"p0"}, run="x-s0-abc123", items=ITEMS[:3])
    r = _run(tmp_path)
    assert r.returncode == 2 and "s0.json has no score for ('p3', 7)" in r.stderr
    _file(tmp_path / "base2.json", {"p0"})
    r = _run(tmp_path)
    assert r.returncode == 2 and "2 base-model files" in r.stderr
    assert not (tmp_path / "summary.md").exists()


def test_the_committed_unguided_scores_are_what_their_records_give(tmp_path):
    src = ROOT / "results" / "cost" / "64px-unguided"
    for f in src.glob("*.json"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    assert json.loads((src / "report.json").read_text()) == {"categories": ["colors", "single_object", "two_object"]}
    r = _run(tmp_path)  # the categories come from report.json
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "summary.md").read_text() == (src / "summary.md").read_text()
    assert {json.loads(f.read_text())["guidance_scale"] for f in src.glob("*.json") if f.name != "report.json"} == {1.0}
