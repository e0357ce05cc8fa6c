"""Cost against score: what each arm of a comparison spent (transformer rows, seconds) to reach
its held-out score, paired by training seed and evaluation image.

    python benchmarks/cost_report.py --store STORE [--base CURVES_JSON] --reference tempflow --out results/cost/<name>
    python benchmarks/cost_report.py --out results/cost/<name>          # summary from the records

An arm is one algorithm with its cost settings (`rollout.branch_steps`, `rollout.branch_draw`,
`rollout.completion_stride`, `sampling.sde_type`, `sampling.guidance_scale`,
`eval.guidance_scale`); the runs of an arm differ by `train.seed` only. Writes to `--out`:

* `points.jsonl`: one line per evaluated point (arm, its settings, seed, iteration, cumulative
  rollout rows, learner rows and stage seconds, the held-out GenEval-style overall with its
  standard error, the shapes reward, the run id); with `--base` (the `curves.json` of a
  `tempflow ablation` over these runs, which holds the base model's evaluation) every arm and
  seed also starts with the base model at iteration 0, 0 rows. Rows are transformer rows with a CFG pair
  counted as two; seconds are the rollout and learner stages' (the reward stage's are not
  recorded in the store);
* `images.jsonl.gz`: one line per evaluated image (arm, seed, iteration, prompt, category, noise
  seed, strict score, reward), gzip-compressed (`gzip -dc` reads it);
* `comparison.json`: the reference arm, so the summary redraws from the records alone;
* `summary.md`: per arm and iteration the seeds' means, and every other arm's evaluated points
  against the reference arm's last one, paired (`tempflow_core/reports/paired.py`), with the
  share of the reference's rows each spent;
* `score-vs-rows.png`: the overall against cumulative rows (rollout + learner), mean over seeds.

Everything in summary.md and the figure is recomputed from the two JSONL files alone.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tempflow_core.reports.paired import compare  # noqa: E402

IMAGES = "images.jsonl.gz"  # per-image records, gzip-compressed (byte-stable: no timestamp)
COST_SETTINGS = (("rollout", "branch_steps"), ("rollout", "branch_draw"), ("rollout", "completion_stride"),
                 ("sampling", "sde_type"), ("sampling", "guidance_scale"), ("eval", "guidance_scale"))


def cost_settings(config: dict) -> dict:
    """The run's cost settings (COST_SETTINGS), with the algorithm."""
    return {"algorithm": config["algorithm"], **{f"{sec}.{key}": config[sec][key] for sec, key in COST_SETTINGS}}


def label_arms(points: list[dict]) -> None:
    """Name each point's arm by its run id less the seed and config digest (`tempflow ablation
    --name NAME` gives NAME-<reward>-<variant>-s<seed>-<digest>): the name its runs were started
    under. Runs of one arm must share their cost settings."""
    for p in points:
        p["arm"] = re.sub(r"-s\d+-[0-9a-f]{6}$", "", p["run"])
    for arm in {p["arm"] for p in points}:
        settings = {json.dumps(p["settings"], sort_keys=True) for p in points if p["arm"] == arm}
        if len(settings) > 1:
            raise SystemExit(f"the runs named {arm!r} differ in their cost settings: start each arm under its own --name")


def collect(store_uri: str) -> tuple[list[dict], list[dict]]:
    """Points and per-image records of every run in the store."""
    from tempflow_core.config import RunConfig
    from tempflow_core.run import stages
    from tempflow_core.run.layout import RunLayout
    from tempflow_core.storage import ObjectNotFound, open_store

    store = open_store(store_uri)
    points, images = [], []
    for run in sorted({key.split("/", 1)[0] for key in store.list("")}):
        try:
            config = json.loads(store.get_bytes(f"{run}/run.json"))["config"]
        except ObjectNotFound:
            continue
        cfg = RunConfig.model_validate(config)
        layout = RunLayout.open(cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(
            update={"store": store_uri})}), run)
        settings = cost_settings(cfg.model_dump(mode="json"))
        per_row = cfg.rows_per_sample()
        rollout_rows = learner_rows = 0
        seconds = 0.0
        for it in range(cfg.train.iterations):
            if not layout.complete(it, "learner"):
                break
            m = stages.checkpoint_metrics(layout, it)
            rollout_rows += int(m["rollout/nfe"]) * per_row
            learner_rows += int(m["learner/nfe"]) * per_row
            seconds += float(m["time/rollout_s"]) + float(m["time/learner_s"])
            if not layout.complete(it, "eval"):
                continue
            ev = stages.read_eval(layout, it)
            points.append({"arm": None, "settings": settings, "seed": cfg.train.seed, "iteration": it + 1,
                           "rollout_rows": rollout_rows, "learner_rows": learner_rows, "stage_seconds": round(seconds, 3),
                           "overall": ev["geneval_overall"], "overall_se": ev["geneval_overall_se"],
                           "reward": ev["reward"], "detector": ev.get("detector_rules", "v1"), "run": run})
            for s in ev["samples"]:
                images.append({"arm": run, "seed": cfg.train.seed, "iteration": it + 1, "prompt": s["prompt"],
                               "category": s["category"], "noise_seed": s["seed"], "strict": s["strict"],
                               "reward": round(s["reward"], 6)})
    if points:
        label_arms(points)
        arm_of_run = {p["run"]: p["arm"] for p in points}
        for r in images:
            r["arm"] = arm_of_run[r["arm"]]
    return points, images


def base_points(curves_json: Path, points: list[dict]) -> list[dict]:
    """The base model's evaluation (an ablation's curves.json) as iteration 0 of every arm and seed."""
    base = json.loads(curves_json.read_text())["base_eval"]
    runs = {(p["arm"], p["seed"]): p for p in points}
    return [{**first, "iteration": 0, "rollout_rows": 0, "learner_rows": 0, "stage_seconds": 0.0,
             "overall": base["geneval_overall"], "overall_se": base["geneval_overall_se"], "reward": base["reward"],
             "detector": base.get("detector_rules", "v1"), "run": "base model"} for first in runs.values()]


def _matrix(images: list[dict], arm: str, iteration: int, seeds: list[int], items: list[tuple]) -> np.ndarray:
    by = {(r["seed"], r["prompt"], r["noise_seed"]): r["strict"] for r in images
          if r["arm"] == arm and r["iteration"] == iteration}
    return np.array([[by[(s, *i)] for i in items] for s in seeds], dtype=float)  # [S, I]


def _mean(points: list[dict], key: str) -> float:
    return float(np.mean([p[key] for p in points]))


def summarize(points: list[dict], images: list[dict], reference: str) -> str:
    arms = sorted({p["arm"] for p in points}, key=lambda a: (a != reference, a))
    lines = ["# Cost against score", "",
             "Rows: transformer rows, a CFG pair counted as two, cumulative over the iterations (rollout + learner). "
             "Seconds: the rollout and learner stages'. Overall: the held-out GenEval-style overall (strict), mean "
             "over seeds.", "",
             "## Every evaluated point, mean over seeds", "",
             "| arm | iteration | seeds | overall | rollout rows | learner rows | rows | stage seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in arms:
        for it in sorted({p["iteration"] for p in points if p["arm"] == arm}):
            at = [p for p in points if p["arm"] == arm and p["iteration"] == it]
            rows = _mean(at, "rollout_rows") + _mean(at, "learner_rows")
            lines.append(f"| {arm} | {it} | {len(at)} | {_mean(at, 'overall'):.3f} | {_mean(at, 'rollout_rows'):.0f} | "
                         f"{_mean(at, 'learner_rows'):.0f} | {rows:.0f} | {_mean(at, 'stage_seconds'):.0f} |")
    keys = [k for k in points[0]["settings"] if len({json.dumps(p["settings"].get(k)) for p in points}) > 1]
    if keys:
        lines += ["", "## The arms' settings (those that differ between arms)", "",
                  "| arm | " + " | ".join(f"`{k}`" for k in keys) + " |", "|---|" + "---|" * len(keys)]
        for arm in arms:
            st = next(p["settings"] for p in points if p["arm"] == arm)
            lines.append(f"| {arm} | " + " | ".join(json.dumps(st.get(k)) for k in keys) + " |")
    ref_it = max(p["iteration"] for p in points if p["arm"] == reference)
    ref = [p for p in points if p["arm"] == reference and p["iteration"] == ref_it]
    ref_rows = _mean(ref, "rollout_rows") + _mean(ref, "learner_rows")
    ref_seconds = _mean(ref, "stage_seconds")
    lines += ["", f"## Against {reference} after its {ref_it} iterations, paired by seed and image", "",
              "Difference: arm - reference of the overall over the seeds both ran (the reference column is its mean "
              "on those seeds); SE holds the seeds' spread and the shared evaluation set's; beyond the noise only from "
              "4 seeds and p < 0.05.", "",
              "| arm | iteration | share of the rows | share of the seconds | arm | reference | difference | SE | p | "
              "seeds won | verdict |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for arm in arms:
        for it in sorted({p["iteration"] for p in points if p["arm"] == arm}):
            if (arm == reference and it == ref_it) or it == 0:  # the base model has no per-image records here
                continue
            at = [p for p in points if p["arm"] == arm and p["iteration"] == it]
            seeds = sorted({p["seed"] for p in at} & {p["seed"] for p in ref})
            ref_shared = [p for p in ref if p["seed"] in seeds]  # the reference on the seeds paired with
            first = [r for r in images if r["arm"] == reference and r["iteration"] == ref_it and r["seed"] == seeds[0]]
            items = [(r["prompt"], r["noise_seed"]) for r in first]
            groups = [r["category"] for r in first]
            a, b = _matrix(images, arm, it, seeds, items), _matrix(images, reference, ref_it, seeds, items)
            res = compare(a, b, groups)
            rows = _mean(at, "rollout_rows") + _mean(at, "learner_rows")
            verdict = ("above, beyond the noise" if res.diff > 0 else "below, beyond the noise") if res.beyond \
                else "within the noise"
            lines.append(f"| {arm} | {it} | {rows / ref_rows:.2f} | {_mean(at, 'stage_seconds') / ref_seconds:.2f} | "
                         f"{_mean(at, 'overall'):.3f} | {_mean(ref_shared, 'overall'):.3f} | {res.diff:+.4f} | {res.se:.4f} | "
                         f"{res.p:.3f} | {res.won}/{res.seeds} | {verdict} |")
    return "\n".join(lines) + "\n"


def figure(points: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.8))
    for arm in sorted({p["arm"] for p in points}):
        its = sorted({p["iteration"] for p in points if p["arm"] == arm})
        at = [[p for p in points if p["arm"] == arm and p["iteration"] == it] for it in its]
        xs = [_mean(a, "rollout_rows") + _mean(a, "learner_rows") for a in at]
        line, = ax.plot(xs, [_mean(a, "overall") for a in at], "o-", label=arm)
        for a in at:
            ax.plot([p["rollout_rows"] + p["learner_rows"] for p in a], [p["overall"] for p in a], ".",
                    color=line.get_color(), alpha=0.3)
    n = len({p["seed"] for p in points})
    ax.set_xlabel("transformer rows, rollout + learner, cumulative")
    ax.set_ylabel("held-out overall")
    ax.set_title(f"mean over {n} seeds (line), each seed (dots)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = out / "score-vs-rows.png"
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def _write(path: Path, text: str) -> None:
    _write_bytes(path, text.encode())


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="run store to collect the records from (omit: use --out's records)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reference", default=None,
                    help="the arm the others are compared with (its last point); default: the one the records name "
                         "(comparison.json), else 'tempflow'")
    ap.add_argument("--base", type=Path, default=None,
                    help="with --store: an ablation's curves.json whose base-model evaluation starts every curve")
    args = ap.parse_args(argv)
    if args.store:
        points, images = collect(args.store)
        if not points:
            print(f"no evaluated run in store {args.store}: pass the store the runs wrote to (--store)", file=sys.stderr)
            return 2
        if args.base is not None:
            if not args.base.is_file():
                print(f"--base {args.base} does not exist: pass the curves.json of an ablation over these runs",
                      file=sys.stderr)
                return 2
            points = sorted(base_points(args.base, points) + points, key=lambda p: (p["arm"], p["seed"], p["iteration"]))
    else:
        missing = [n for n in ("points.jsonl", IMAGES) if not (args.out / n).is_file()]
        if missing:
            print(f"{args.out / missing[0]} does not exist: collect the records with --store first", file=sys.stderr)
            return 2
        points = [json.loads(line) for line in (args.out / "points.jsonl").read_text().splitlines()]
        images = [json.loads(line) for line in gzip.decompress((args.out / IMAGES).read_bytes()).decode().splitlines()]
    arms = sorted({p["arm"] for p in points})
    saved = args.out / "comparison.json"
    if args.reference is None:
        args.reference = json.loads(saved.read_text())["reference"] if not args.store and saved.is_file() else "tempflow"
    if args.reference not in arms:
        print(f"--reference {args.reference!r} is not an arm of these records: use one of {arms}", file=sys.stderr)
        return 2
    text = summarize(points, images, args.reference)
    if args.store:
        args.out.mkdir(parents=True, exist_ok=True)
        _write(args.out / "points.jsonl", "".join(json.dumps(p) + "\n" for p in points))
        _write(saved, json.dumps({"reference": args.reference}) + "\n")
        _write_bytes(args.out / IMAGES, gzip.compress("".join(json.dumps(r) + "\n" for r in images).encode(), mtime=0))
    _write(args.out / "summary.md", text)
    figure(points, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
