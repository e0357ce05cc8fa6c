"""The pre-registered replication of `--preset fast` (results/cost/64px-t10-replication/PROTOCOL.md):
its control, its one primary test and its secondary figures, from records alone.

    tempflow report DIR --store STORE --kind replication   # collect the runs' records, then report
    tempflow report DIR                                     # report from DIR's records

The replication's runs (the arm on the protocol's seeds, and default `tempflow` again on the
control seed) are collected from STORE into DIR's `points.jsonl` and `images.jsonl.gz` (the
format of tempflow_core/reports/cost.py). The reference, default `tempflow` after 8 iterations,
and the base model come from the records of the folder `REFERENCE_RECORDS` names beside DIR
(results/cost/64px-t10). Writes
DIR/summary.md:

* the control: the re-run default's per-image strict scores against the recorded ones, image by
  image (the pairing with the records holds only if they are equal);
* the primary test: the arm after 4 iterations minus the reference after 8, paired by seed and
  image over the trained categories (tempflow_core/reports/paired.py), its one-sided 95% lower
  bound against the margin, and the verdict;
* secondary figures, with no claim: the arm after 8; the primary difference on all six
  categories and on the trained categories' prompts that are not training prompts; each
  standard error beside a seeds-and-items bootstrap; the rows each spent (same seeds).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from tempflow_core.reports.cost import BASE, IMAGES, Scores, collect
from tempflow_core.reports.paired import bootstrap_se, compare, lower_bound, reaches
from tempflow_core.reports.records import RecordsError
from tempflow_core.reports.report import write_text

PROTOCOL = "PROTOCOL.md"  # a replication folder holds its protocol
REFERENCE_RECORDS = "64px-t10"  # the recorded reference runs: a folder beside the replication's

REFERENCE = "cost-t10-default-shapes-tempflow"  # the recorded default runs (and the control's arm name)
ARM = "rep-t10-p0123-shapes-tempflow"
SEEDS = list(range(28, 38))
CONTROL_SEED = 28
MARGIN = 0.033  # the protocol's: a quarter of default's +0.133 over the base on 18 seeds
TRAINED = ["colors", "single_object", "two_object"]
JUDGED_AT, REFERENCE_AT = 4, 8


def _read(folder: Path) -> tuple[list[dict], list[dict]]:
    points = [json.loads(line) for line in (folder / "points.jsonl").read_text().splitlines()]
    images = [json.loads(line) for line in gzip.decompress((folder / IMAGES).read_bytes()).decode().splitlines()]
    return points, images


def _write(folder: Path, points: list[dict], images: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "points.jsonl").write_text("".join(json.dumps(p, sort_keys=True) + "\n" for p in points))
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in images).encode()
    (folder / IMAGES).write_bytes(gzip.compress(data, mtime=0))


def _training_prompts(source: str) -> set[str]:
    from tempflow_core.prompts import load_prompts

    return {r.text for r in load_prompts(source)}


def _line(name: str, r, boot: float | None = None, margin: float | None = None) -> str:
    lb = lower_bound(r)
    extra = f" | {boot:.4f}" if boot is not None else " | "
    verdict = "" if margin is None else (" | **reaches**" if reaches(r, margin) else " | does not reach")
    return (f"| {name} | {r.seeds} | {r.diff:+.4f} | {r.se:.4f} ({r.se_seeds:.4f} seeds, {r.se_items:.4f} items)"
            f"{extra} | {r.p:.3f} | {r.won}/{r.seeds} | {lb:+.4f}{verdict or ' | '} |")


def report(ours: tuple[list[dict], list[dict]], ref: tuple[list[dict], list[dict]], train_prompts: set[str]) -> str:
    points, images = ours
    ref_points, ref_images = ref
    recorded = [r for r in ref_images if r["arm"] in (REFERENCE, BASE)]
    control = [r for r in images if r["arm"] == REFERENCE and r["seed"] == CONTROL_SEED]
    rerun = {(r["iteration"], r["prompt"], r["noise_seed"]): r for r in control}
    was = {(r["iteration"], r["prompt"], r["noise_seed"]): r for r in recorded if r["seed"] == CONTROL_SEED}
    shared = sorted(set(rerun) & set(was))
    differ = [k for k in shared if rerun[k]["strict"] != was[k]["strict"]]
    reward_differ = [k for k in shared if abs(rerun[k]["reward"] - was[k]["reward"]) > 1e-6]
    valid = bool(shared) and not differ and {k[0] for k in shared} == {JUDGED_AT, REFERENCE_AT}
    lines = ["# Replication of `--preset fast` at T = 10: results", "",
             "Pre-registered in [PROTOCOL.md](PROTOCOL.md); made with the commands there; this page is drawn from",
             "`points.jsonl` and `images.jsonl.gz` beside it and the records of",
             "[`results/cost/64px-t10`](../64px-t10/README.md) by `tempflow report` on this folder.", "",
             f"## Control: default `tempflow` again on seed {CONTROL_SEED}", "",
             f"{len(shared)} evaluated images (after {JUDGED_AT} and {REFERENCE_AT} iterations) compared with the records: "
             f"{len(differ)} differ in the strict score, {len(reward_differ)} in the reward (beyond 1e-6). "
             + ("The code computes what it computed when the records were made: the pairing holds."
                if valid else "**The pairing with the records is void**: no verdict is drawn below.")]
    every = sorted({r["category"] for r in images})
    all_images = recorded + [r for r in images if r["arm"] == ARM]
    arm_seeds = sorted({p["seed"] for p in points if p["arm"] == ARM and p["iteration"] == JUDGED_AT})
    seeds = [s for s in SEEDS if s in arm_seeds]
    head = ["| comparison | seeds | difference | SE | bootstrap SE | p | seeds won | lower bound | verdict |",
            "|---|---:|---:|---|---:|---:|---:|---:|---|"]

    def pair(categories: list[str], untrained: bool, arm_it: int) -> tuple:
        rows = [r for r in all_images if not (untrained and r["prompt"] in train_prompts)]
        sc = Scores(rows, categories)
        a, b = sc.matrix(ARM, arm_it, seeds), sc.matrix(REFERENCE, REFERENCE_AT, seeds)
        return compare(a, b, sc.groups), bootstrap_se(a, b, sc.groups), sc

    primary, boot, sc = pair(TRAINED, False, JUDGED_AT)
    gain = float(np.mean([sc.score(REFERENCE, REFERENCE_AT, s) for s in seeds])) - sc.score(BASE, 0, seeds[0])
    lines += ["", "## The primary test" if valid else "## The primary comparison (no verdict: the control failed)", "",
              f"The arm (`rollout.branch_steps=[0,1,2,3]`) after {JUDGED_AT} iterations minus default after "
              f"{REFERENCE_AT}, on seeds {seeds[0]}-{seeds[-1]} ({len(seeds)}), over the trained categories; reaches "
              f"when the one-sided 95% lower bound lies above -{MARGIN}. Default's gain over the base model on these "
              f"seeds: {gain:+.4f}.", ""] + head
    lines.append(_line(f"arm at {JUDGED_AT} - default at {REFERENCE_AT} (primary)", primary, boot, MARGIN))
    verdict = ("replicated: the arm reaches default's score within the margin" if reaches(primary, MARGIN) else
               "not replicated: the lower bound does not clear the margin") if valid else "void (control failed)"
    lines += ["", f"**Verdict: {verdict}.**", "", "## Secondary (no claim)", "",
                        "Three comparisons besides the primary (the protocol counted four: its fourth, the bootstrap, is "
                        "a check of each standard error, in its own column, not a comparison).", ""] + head
    for name, cats, untrained, it in ((f"arm at 8 - default at {REFERENCE_AT}", TRAINED, False, 8),
                                      ("primary, all six categories", every, False, JUDGED_AT),
                                      ("primary, untrained prompts of the trained categories", TRAINED, True,
                                       JUDGED_AT)):
        if it not in {p["iteration"] for p in points if p["arm"] == ARM}:
            continue
        r, b, _ = pair(cats, untrained, it)
        lines.append(_line(name, r, b))
    rows = {}
    for arm, it, src in ((ARM, JUDGED_AT, points), (ARM, 8, points), (REFERENCE, REFERENCE_AT, ref_points)):
        pts = [p for p in src if p["arm"] == arm and p["iteration"] == it and p["seed"] in seeds]
        if pts:
            rows[(arm, it)] = float(np.mean([p["rollout_rows"] + p["learner_rows"] for p in pts]))
    ref_rows = rows.get((REFERENCE, REFERENCE_AT))
    if ref_rows:
        lines += ["", "## Rows (transformer rows, a CFG pair as two; mean over the seeds above)", "",
                  "| point | rows | share of default's 8 iterations |", "|---|---:|---:|"]
        lines += [f"| {arm} after {it} | {v:.0f} | {v / ref_rows:.2f} |" for (arm, it), v in rows.items()]
    return "\n".join(lines) + "\n"


def is_replication_folder(folder: Path) -> bool:
    return (folder / PROTOCOL).is_file()


def report_folder(out: Path, store: str | None = None, reference_records: Path | None = None,
                  train_source: str = "builtin:shapes_train") -> str:
    """Collect the replication's records from `store` into `out` (or read `out`'s), write
    summary.md against `reference_records` (default: REFERENCE_RECORDS beside `out`) and return it."""
    reference_records = reference_records or out.parent / REFERENCE_RECORDS
    if store:
        points, images = collect(store)
        if not points:
            raise RecordsError(f"no evaluated run in store {store}: pass the store the runs wrote to (--store)")
        _write(out, points, images)
    for folder in (out, reference_records):
        if not (folder / "points.jsonl").is_file():
            raise RecordsError(f"{folder / 'points.jsonl'} does not exist: collect the records with --store first")
    text = report(_read(out), _read(reference_records), _training_prompts(train_source))
    write_text(out / "summary.md", text)
    return text
