"""`tempflow report` on a cost comparison (tempflow_core/reports/cost.py) from records alone: rows shares and paired differences against
values worked out by hand; bad input refused with one line and nothing written."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

from tests.pipeline.cli_runner import in_process

ROOT = Path(__file__).resolve().parents[2]


def _report(*args: str) -> subprocess.CompletedProcess:
    return in_process(["report", *args], ROOT)  # typer's runner: no interpreter start per call



def _records(tmp_path: Path, base: bool = False, earlier: bool = False) -> Path:
    """Arms x 4 seeds, 4 images in 2 categories. The reference ends at iteration 8 with every
    image scored 0 but the first of each category (overall 0.5); the cheap arm at iteration 8 also
    passes the second image of category a (overall 0.75) with half the reference's rows. With
    `base`: a base model that fails every image, and an arm equal to the reference at half its rows.
    With `earlier`: the cheap arm at iteration 4 too, passing what the reference passes."""
    out = tmp_path / "rec"
    out.mkdir()
    points, images = [], []
    items = [("p0", "a"), ("p1", "a"), ("p2", "b"), ("p3", "b")]
    arms = [("tempflow", 1000, {"p0", "p2"}), ("tempflow branch_steps=2", 500, {"p0", "p1", "p2"})]
    if base:
        arms.append(("tempflow same", 500, {"p0", "p2"}))
        images += [{"arm": "base model", "seed": None, "iteration": 0, "prompt": prompt, "category": cat,
                    "noise_seed": 1, "strict": 0, "reward": 0.0} for prompt, cat in items]
    for arm, rows, passed in arms:
        for seed in range(4):
            points.append({"arm": arm, "settings": {}, "seed": seed, "iteration": 8, "rollout_rows": rows - 100,
                           "learner_rows": 100, "stage_seconds": rows / 10, "overall": 0.5, "overall_se": 0.1,
                           "reward": 0.5, "detector": "v2", "run": f"{arm}-{seed}"})
            for prompt, cat in items:
                images.append({"arm": arm, "seed": seed, "iteration": 8, "prompt": prompt, "category": cat,
                               "noise_seed": 1, "strict": int(prompt in passed), "reward": 0.0})
    if earlier:
        for seed in range(4):
            points.append({**next(p for p in points if p["arm"] == arms[1][0] and p["seed"] == seed), "iteration": 4})
            images += [{"arm": arms[1][0], "seed": seed, "iteration": 4, "prompt": prompt, "category": cat,
                        "noise_seed": 1, "strict": int(prompt in arms[0][2]), "reward": 0.0} for prompt, cat in items]
    (out / "points.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    (out / "images.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in images).encode()))
    return out


def test_shares_and_differences_by_hand(tmp_path):
    out = _records(tmp_path)
    r = _report(str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(line for line in (out / "summary.md").read_text().splitlines()
               if line.startswith("| tempflow branch_steps=2 | 8 | 0.50 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # rows 500 / 1000, seconds 50 / 100; overall by category: (1 + 0.5) / 2 - (0.5 + 0.5) / 2 = +0.25
    assert cells[3] == "0.50" and cells[6] == "+0.2500" and cells[9] == "4/4"
    assert (out / "score-vs-rows.png").stat().st_size > 0


def test_shares_are_taken_on_the_seeds_both_arms_ran(tmp_path):
    """The reference also ran seeds 4-7, three times as slow: the cheap arm's share of the seconds
    is 50 / 100 on the seeds it shares, not 50 / 200 over every seed of the reference."""
    out = _records(tmp_path)
    points = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    images = gzip.decompress((out / "images.jsonl.gz").read_bytes()).decode().splitlines()
    ref = [p for p in points if p["arm"] == "tempflow"]
    extra = [{**p, "seed": p["seed"] + 4, "stage_seconds": 300.0, "run": f"tempflow-{p['seed'] + 4}"} for p in ref]
    more = [json.dumps({**r, "seed": r["seed"] + 4}) for r in map(json.loads, images) if r["arm"] == "tempflow"]
    (out / "points.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points + extra))
    (out / "images.jsonl.gz").write_bytes(gzip.compress("".join(line + "\n" for line in images + more).encode()))
    r = _report(str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(line for line in (out / "summary.md").read_text().splitlines()
               if line.startswith("| tempflow branch_steps=2 | 8 | 0.50 |"))
    assert [c.strip() for c in row.strip("|").split("|")][3] == "0.50"


def test_gain_reaches_and_the_target_by_hand(tmp_path):
    out = _records(tmp_path, base=True)
    r = _report(str(out), "--reference", "tempflow")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (out / "summary.md").read_text().splitlines()

    def cells(prefix: str, section: str) -> list[str]:
        start = next(i for i, line in enumerate(lines) if line.startswith(section))
        row = next(line for line in lines[start:] if line.startswith(prefix))
        return [c.strip() for c in row.strip("|").split("|")]

    # gain over a base that fails everything: the arm's own score, 0.75
    assert cells("| tempflow branch_steps=2 | 8 |", "## Gain")[3] == "+0.7500"
    # margin: 0.25 of the reference's gain 0.5. The +0.25 arm: every seed alike, the items' error
    # over category a's two items (differences 0 and 1): SE sqrt((1/4)^2 * 2 * 0.5) = 0.25 on
    # 4 - 2 = 2 degrees of freedom, lower bound 0.25 - t(0.95, 2) 0.25 = -0.4800: not shown to reach;
    # of the reference's gain it keeps at least (0.5 - 0.48) / 0.5 = 0.04
    assert "within a margin of 0.1250" in "\n".join(lines)
    cheap = cells("| tempflow branch_steps=2 | 8 |", "## Against")
    assert cheap[7] == "0.2500" and cheap[11] == "-0.4800" and cheap[12] == "0.04" and cheap[13] == "no"
    # the equal arm: no difference, no error: reaches, at half the rows and seconds: the target met
    same = cells("| tempflow same | 8 |", "## Against")
    assert same[6] == "+0.0000" and same[12] == "1.00" and same[13] == "yes"
    assert cells("| tempflow same |", "## Rows to reach")[1:] == ["8", "0.50", "0.50", "met"]
    assert cells("| tempflow branch_steps=2 |", "## Rows to reach")[1] == "not reached"
    # the settings travel with the records; a category the records lack is refused
    assert json.loads((out / "comparison.json").read_text()) == {
        "reference": "tempflow", "categories": ["a", "b"], "margin_share": 0.25,
        "train_prompts": "builtin:shapes_train?tags=single_object,two_object,colors"}
    # every yardstick: with p0 and p2 the training prompts, the untrained ones are p1 (a) and p3 (b):
    # the cheap arm passes p1 where the reference fails it, (1 + 0) / 2 = +0.5; the reference gains
    # nothing over the base there, so that yardstick's margin is 0; 2 points were compared (5% / 2)
    train = tmp_path / "train.txt"
    train.write_text("p0\np2\n")
    r = _report(str(out), "--train-prompts", str(train))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (out / "summary.md").read_text().splitlines()
    assert any("untrained prompts: 2 items, margin 0.0000" in line and "0.05 / 2" in line for line in lines)
    assert cells("| tempflow branch_steps=2 | 8 | untrained prompts |", "## Every yardstick")[4] == "+0.5000"
    same = cells("| tempflow same | 8 | trained categories |", "## Every yardstick")
    assert same[4] == "+0.0000" and same[9:] == ["yes", "yes"]  # no difference, no error: reaches at 5% / 3 too
    assert json.loads((out / "comparison.json").read_text())["train_prompts"] == str(train)
    (out / "comparison.json").write_text(json.dumps({"reference": "tempflow", "categories": ["a", "b"],
                                                     "margin_share": 0.25}))
    r = _report(str(out), "--categories", "a,c")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "'c' is not an evaluated category" in r.stderr
    # over category a alone the +0.25 arm is 1.0 against 0.5
    r = _report(str(out), "--categories", "a")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (out / "summary.md").read_text().splitlines()
    assert cells("| tempflow branch_steps=2 | 8 |", "## Against")[6] == "+0.5000"


def test_an_arms_last_point_against_its_earlier_one_by_hand(tmp_path):
    out = _records(tmp_path, earlier=True)
    r = _report(str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    text = (out / "summary.md").read_text()
    section = text.split("## Does the rest")[1].split("\n## ")[0].splitlines()
    row = next(line for line in section if line.startswith("| tempflow branch_steps=2 |"))
    # 0.75 at 8 against 0.5 at 4: +0.25, every seed alike; the items' error is category a's
    # (differences 0 and 1): 0.25 on 2 degrees of freedom, p = 2 (1 - T_2(1)) = 1 - 1/sqrt(3) = 0.423
    assert [c.strip() for c in row.strip("|").split("|")] == [
        "tempflow branch_steps=2", "8", "4", "4", "0.750", "0.500", "+0.2500", "0.2500", "0.423", "4/4",
        "within the noise"]
    assert not [line for line in section if line.startswith("| tempflow |")]  # one point: nothing to compare


def test_an_unknown_reference_is_refused_with_one_line_and_nothing_written(tmp_path):
    out = _records(tmp_path)
    r = _report(str(out), "--reference", "flow_grpo")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--reference 'flow_grpo'" in r.stderr
    assert not (out / "summary.md").exists()
    half = tmp_path / "half"  # per-image records without their points
    half.mkdir()
    (half / "images.jsonl.gz").write_bytes((out / "images.jsonl.gz").read_bytes())
    r = _report(str(half))
    assert r.returncode == 2 and "points.jsonl does not exist" in r.stderr and not (half / "summary.md").exists()


def _recomputed(src: Path, tmp_path: Path) -> list[dict]:
    """Redraw a committed comparison from its records in tmp_path: its summary.md must come back
    byte for byte. Returns its points."""
    for name in ("points.jsonl", "images.jsonl.gz", "comparison.json"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    r = _report(str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "summary.md").read_text() == (src / "summary.md").read_text()
    return [json.loads(line) for line in (src / "points.jsonl").read_text().splitlines()]


def test_the_committed_comparison_is_what_its_records_give(tmp_path):
    src = ROOT / "results" / "cost" / "64px"
    points = _recomputed(src, tmp_path)
    # every arm starts at the base model with no rows spent
    arms = {p["arm"] for p in points}
    assert len(arms) == 7
    eight = ("cost-default-shapes-tempflow", "cost-p01-shapes-tempflow", "cost-p0-shapes-tempflow",
             "cost-fixed-shapes-flow_grpo_fixed")
    for arm in arms:  # four arms on eight seeds, the others on the first four
        first = [p for p in points if p["arm"] == arm and p["iteration"] == 0]
        want = list(range(20, 28)) if arm in eight else [20, 21, 22, 23]
        assert sorted(p["seed"] for p in first) == want and all(p["rollout_rows"] == 0 for p in first)
    # the rows recorded are the rollout's arithmetic: 16 prompts x (5 backbone steps + 8 x 15 child steps), CFG x 2;
    # branching at step 0 only: 16 x (1 + 8 x 5) x 2 per iteration
    default = [p for p in points if p["arm"] == "cost-default-shapes-tempflow" and p["iteration"] == 8]
    assert {p["rollout_rows"] for p in default} == {8 * 16 * (5 + 8 * 15) * 2}
    p0 = [p for p in points if p["arm"] == "cost-p0-shapes-tempflow" and p["iteration"] == 12]
    assert {p["rollout_rows"] for p in p0} == {12 * 16 * (1 + 8 * 5) * 2}
    images = gzip.decompress((src / "images.jsonl.gz").read_bytes()).decode().splitlines()
    assert len(images) == 414 + sum(414 for p in points if p["iteration"] > 0)  # the base model's once
    # the score over every category is the overall each evaluation recorded (computed apart)
    r = _report(str(tmp_path), "--categories",
                        "color_attr,colors,counting,position,single_object,two_object")
    assert r.returncode == 0, r.stderr[-2000:]
    table = [line for line in (tmp_path / "summary.md").read_text().split("## The arms")[0].splitlines()
             if line.startswith("| cost-")]
    assert table and all(abs(float(c[3]) - float(c[4])) <= 0.0011 for c in
                         ([x.strip() for x in line.strip("|").split("|")] for line in table))


def test_the_committed_t10_comparison_is_what_its_records_give(tmp_path):
    src = ROOT / "results" / "cost" / "64px-t10"
    points = _recomputed(src, tmp_path)
    rows = {(p["arm"], p["iteration"]): p["rollout_rows"] for p in points if p["iteration"] >= 5}
    # T = 10, 16 prompts, CFG x 2, per iteration: every branch point, 9 backbone steps + 8 children x
    # (9 + 8 + ... + 1) steps; at steps 0 and 1, 2 backbone steps + 8 x (9 + 8); at 0 to 3, 4 + 8 x (9 + ... + 6).
    # A window of 3 starting at s = iteration mod 7: s + 3 backbone steps + 8 x ((9 - s) + (8 - s) + (7 - s)).
    # Without CFG one row per sample and step.
    window = [s + 3 + 8 * (24 - 3 * s) for s in (0, 1, 2, 3, 4, 5, 6, 0, 1, 2)]
    assert rows == {("cost-t10-default-shapes-tempflow", 8): 8 * 16 * (9 + 8 * 45) * 2,
                    ("cost-t10-p01-10its-shapes-tempflow", 8): 8 * 16 * (2 + 8 * 17) * 2,
                    ("cost-t10-p01-10its-shapes-tempflow", 10): 10 * 16 * (2 + 8 * 17) * 2,
                    ("cost-t10-window3-shapes-tempflow", 8): 16 * 2 * sum(window[:8]),
                    ("cost-t10-window3-shapes-tempflow", 10): 16 * 2 * sum(window),
                    ("cost-t10-cps-cfg1-shapes-tempflow", 8): 8 * 16 * (9 + 8 * 45),
                    ("cost-t10-p01-32p-shapes-tempflow", 5): 5 * 32 * (2 + 8 * 17) * 2,
                    ("cost-t10-p0123-shapes-tempflow", 6): 6 * 16 * (4 + 8 * 30) * 2}
    seeds = {"cost-t10-default-shapes-tempflow": range(20, 38), "cost-t10-p01-10its-shapes-tempflow": range(20, 38),
             "cost-t10-window3-shapes-tempflow": [20, 21, 22, 23, 29, 30, 31, 32],
             "cost-t10-cps-cfg1-shapes-tempflow": range(20, 28), "cost-t10-p01-32p-shapes-tempflow": range(20, 28),
             "cost-t10-p0123-shapes-tempflow": range(20, 28)}
    for arm, want in seeds.items():
        assert sorted(p["seed"] for p in points if p["arm"] == arm and p["iteration"] == 0) == list(want)
