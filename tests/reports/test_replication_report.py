"""`tempflow report` on a replication folder (its PROTOCOL.md) from records alone: the control decides whether a verdict is
drawn, and the primary difference is the arm after 4 against the recorded reference after 8."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

from tests.pipeline.cli_runner import in_process

ROOT = Path(__file__).resolve().parents[2]


def _report(*args: str) -> subprocess.CompletedProcess:
    return in_process(["report", *args], ROOT)  # typer's runner: no interpreter start per call

REF, ARM = "cost-t10-default-shapes-tempflow", "rep-t10-p0123-shapes-tempflow"
ITEMS = [("p0", "colors"), ("p1", "colors"), ("p2", "single_object"), ("p3", "single_object")]


def _image(arm, seed, it, prompt, cat, strict):
    return {"arm": arm, "seed": seed, "iteration": it, "prompt": prompt, "category": cat, "noise_seed": 1,
            "strict": strict, "reward": float(strict)}


def _point(arm, seed, it, rows):
    return {"arm": arm, "settings": {}, "seed": seed, "iteration": it, "rollout_rows": rows, "learner_rows": 0,
            "stage_seconds": 1.0, "overall": 0.5, "overall_se": 0.1, "reward": 0.5, "detector": "v2", "run": "r"}


def _write(folder: Path, points, images) -> None:
    folder.mkdir()
    (folder / "points.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    (folder / "images.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in images).encode()))


def _run(tmp_path: Path, control_flip: bool) -> str:
    """The reference passes p0 and p2 after 8 (p0 after 4); the arm after 4 passes the same on every
    seed: a difference of 0 with no error, which reaches."""
    seeds = range(28, 38)
    ref_pts = [_point(REF, s, it, 1000 * it) for s in seeds for it in (4, 8)]
    ref_img = [_image("base model", None, 0, p, c, 0) for p, c in ITEMS]
    ref_img += [_image(REF, s, it, p, c, int(p in ({"p0", "p2"} if it == 8 else {"p0"}))) for s in seeds
                for it in (4, 8) for p, c in ITEMS]
    ours_pts = [_point(ARM, s, it, 400 * it) for s in seeds for it in (4, 8)] + [_point(REF, 28, it, 1000 * it)
                                                                                 for it in (4, 8)]
    ours_img = [_image(ARM, s, it, p, c, int(p in {"p0", "p2"})) for s in seeds for it in (4, 8) for p, c in ITEMS]
    ours_img += [r for r in ref_img if r["arm"] == REF and r["seed"] == 28]  # the control reproduces the record
    if control_flip:
        ours_img[-1] = {**ours_img[-1], "strict": 1 - ours_img[-1]["strict"]}
    _write(tmp_path / "64px-t10", ref_pts, ref_img)  # the reference's records: the folder beside the replication
    _write(tmp_path / "ours", ours_pts, ours_img)
    (tmp_path / "ours" / "PROTOCOL.md").write_text("# the protocol\n")
    r = _report(str(tmp_path / "ours"))
    assert r.returncode == 0, r.stderr[-2000:]
    return (tmp_path / "ours" / "summary.md").read_text()


def test_a_reproduced_control_gives_the_verdict_of_the_primary_difference(tmp_path):
    text = _run(tmp_path, control_flip=False)
    assert "8 evaluated images (after 4 and 8 iterations) compared with the records: 0 differ" in text
    row = next(line for line in text.splitlines() if "(primary)" in line)
    assert "| 10 | +0.0000 | 0.0000 " in row and "**reaches**" in row
    assert "**Verdict: replicated" in text
    assert "| rep-t10-p0123-shapes-tempflow after 4 | 1600 | 0.20 |" in text  # 1600 of the reference's 8000 rows


def test_a_control_that_does_not_reproduce_the_record_voids_the_verdict(tmp_path):
    text = _run(tmp_path, control_flip=True)
    assert "1 differ in the strict score" in text and "**The pairing with the records is void**" in text
    assert "**Verdict: void (control failed).**" in text and "no verdict: the control failed" in text
