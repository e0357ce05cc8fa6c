"""Cost against score: what each arm of a comparison spent (transformer rows, seconds) to reach
its held-out score, paired by training seed and evaluation image.

    tempflow report DIR --store STORE --kind cost [--base CURVES_JSON] --reference ARM [--categories A,B]
    tempflow report DIR          # summary and figure from the records

An arm is one algorithm with its cost settings (`rollout.prompts_per_iter`, `rollout.group_size`,
`rollout.branch_steps`, `rollout.branch_draw`, `rollout.completion_stride`, `sampling.sde_type`,
`sampling.noise_level`, `sampling.guidance_scale`, `eval.guidance_scale`); the runs of an arm
differ by `train.seed` only. Writes to DIR:

* `points.jsonl`: one line per evaluated point (arm, its settings, seed, iteration, cumulative
  rollout rows, learner rows and stage seconds, the held-out GenEval-style overall with its
  standard error, the shapes reward, the run id); with `--base` (the `curves.json` of a
  `tempflow ablation` over these runs, which holds the base model's evaluation) every arm and
  seed also starts with the base model at iteration 0, 0 rows. Rows are transformer rows with a CFG pair
  counted as two; seconds are the rollout and learner stages' (the reward stage's are not
  recorded in the store);
* `images.jsonl.gz`: one line per evaluated image (arm, seed, iteration, prompt, category, noise
  seed, strict score, reward), gzip-compressed (`gzip -dc` reads it); the base model's under the
  arm "base model" with seed null;
* `comparison.json`: the reference arm, the categories the score is taken over and the margin
  of "reaches", so the summary redraws from the records alone;
* `summary.md`: per arm and iteration the seeds' means; each point's gain over the base model;
  every point against the reference arm's last one, paired (`tempflow_core/reports/paired.py`),
  with the share of the reference's rows and seconds it spent and whether it reaches the
  reference's score (non-inferior within `margin_share` of the reference's gain over the base
  model, on at least 4 seeds); the first point of each arm that reaches it, against the target
  (at most half the rows and 0.6 of the seconds); each arm's last point against its earlier
  ones (whether the rest of its budget paid), paired the same way;
* every comparison with the reference again on three yardsticks (the score's categories, every
  evaluated category, the score's categories without the training prompts of `--train-prompts`),
  each with its own margin, the formula's error beside a seeds-and-items bootstrap's, and the
  lower bound also at 5% divided by the number of points compared (everything tried);
* `score-vs-rows.png`: the score against cumulative rows (rollout + learner), mean over seeds,
  with the reference's final score and the margin.

The score is the GenEval-style overall (the mean of the categories' means) over `--categories`
(default: every evaluated one), computed from the per-image records; `overall` in points.jsonl
is the evaluation's own over every category. Everything in summary.md and the figure is
recomputed from the two JSONL files alone.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np

from tempflow_core.reports.paired import (
    MIN_SEEDS, bootstrap_se, compare, lower_bound, overall_weights, reaches,
)
from tempflow_core.reports.records import RecordsError
from tempflow_core.reports.report import write_text

IMAGES = "images.jsonl.gz"  # per-image records, gzip-compressed (byte-stable: no timestamp)
POINTS, COMPARISON = "points.jsonl", "comparison.json"
MARGIN_SHARE = 0.25  # "reaches": within a quarter of the reference's gain over the base model
TARGET_ROWS, TARGET_SECONDS = 0.5, 0.6  # the cost target: at most these shares of the reference's
Z_POWER = 1.645 + 0.842  # one-sided 5% test with 80% power (normal quantiles)
COST_SETTINGS = (("rollout", "prompts_per_iter"), ("rollout", "group_size"), ("rollout", "branch_steps"),
                 ("rollout", "branch_draw"), ("rollout", "completion_stride"),
                 ("sampling", "sde_type"), ("sampling", "noise_level"), ("sampling", "guidance_scale"),
                 ("eval", "guidance_scale"))


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
            raise RecordsError(f"the runs named {arm!r} differ in their cost settings: start each arm under its own --name")


def collect(store_uri: str) -> tuple[list[dict], list[dict]]:
    """Points and per-image records of every run in the store."""
    from tempflow_core.config import RunConfig
    from tempflow_core.run import stages
    from tempflow_core.run.layout import RunLayout
    from tempflow_core.storage import open_store

    store = open_store(store_uri)
    points, images = [], []
    for run in RunLayout.runs(store):
        config = json.loads(store.get_bytes(RunLayout(store, run).record_key))["config"]
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


BASE = "base model"  # the arm name of the base model's per-image records (seed null, iteration 0)


def base_records(curves_json: Path, points: list[dict]) -> tuple[list[dict], list[dict]]:
    """The base model's evaluation (an ablation's curves.json): iteration 0 of every arm and seed,
    and its per-image records once, under the arm name BASE."""
    base = json.loads(curves_json.read_text())["base_eval"]
    runs = {(p["arm"], p["seed"]): p for p in points}
    starts = [{**first, "iteration": 0, "rollout_rows": 0, "learner_rows": 0, "stage_seconds": 0.0,
               "overall": base["geneval_overall"], "overall_se": base["geneval_overall_se"], "reward": base["reward"],
               "detector": base.get("detector_rules", "v1"), "run": BASE} for first in runs.values()]
    images = [{"arm": BASE, "seed": None, "iteration": 0, "prompt": s["prompt"], "category": s["category"],
               "noise_seed": s["seed"], "strict": s["strict"], "reward": round(s["reward"], 6)} for s in base["samples"]]
    return starts, images


class Scores:
    """Per-image strict scores by (arm, iteration, seed), over the chosen categories."""

    def __init__(self, images: list[dict], categories: list[str]):
        self.by: dict[tuple, dict[tuple, float]] = {}
        self.category: dict[tuple, str] = {}
        for r in images:
            if r["category"] in categories:
                item = (r["prompt"], r["noise_seed"])
                self.by.setdefault((r["arm"], r["iteration"], r["seed"]), {})[item] = r["strict"]
                self.category[item] = r["category"]
        self.items = sorted(self.category)  # every evaluation scores the same prompts and noise
        self.groups = [self.category[i] for i in self.items]

    def has_base(self) -> bool:
        return (BASE, 0, None) in self.by

    def matrix(self, arm: str, iteration: int, seeds: list[int]) -> np.ndarray:
        """[S, I] scores; the base model's one evaluation stands for every seed."""
        def row(seed):
            key = (BASE, 0, None) if iteration == 0 else (arm, iteration, seed)
            by = self.by[key]
            missing = [i for i in self.items if i not in by]
            if missing:
                raise RecordsError(f"{arm} iteration {iteration} seed {seed} has no record of {missing[0]}: every "
                                   "evaluation must score the same prompts and noise")
            return [by[i] for i in self.items]
        return np.array([row(s) for s in seeds], dtype=float)

    def score(self, arm: str, iteration: int, seed: int) -> float:
        """The GenEval-style overall over the chosen categories: the mean of each category's mean."""
        w, _ = overall_weights(self.groups, len(self.items))
        return float(self.matrix(arm, iteration, [seed])[0] @ w)


def _mean(points: list[dict], key: str) -> float:
    return float(np.mean([p[key] for p in points]))


def _rows(points: list[dict]) -> float:
    return _mean(points, "rollout_rows") + _mean(points, "learner_rows")


def _verdict(res) -> str:
    return ("above, beyond the noise" if res.diff > 0 else "below, beyond the noise") if res.beyond else "within the noise"


def summarize(points: list[dict], images: list[dict], reference: str, categories: list[str],
              margin_share: float = MARGIN_SHARE, train_prompts: set[str] | None = None
              ) -> tuple[str, list[dict], float | None]:
    """(summary.md, the points with their score over `categories`, the margin of "reaches"
    (None without the base model's records)). With `train_prompts` (the texts the runs train
    on), every comparison with the reference is also given on every evaluated category and on
    the untrained prompts of `categories` (`yardsticks`)."""
    sc = Scores(images, categories)
    points = [{**p, "score": sc.score(p["arm"], p["iteration"], p["seed"])} for p in points]
    arms = sorted({p["arm"] for p in points}, key=lambda a: (a != reference, a))
    its = {arm: sorted({p["iteration"] for p in points if p["arm"] == arm}) for arm in arms}
    at = {(arm, it): [p for p in points if p["arm"] == arm and p["iteration"] == it] for arm in arms for it in its[arm]}
    every = sorted({r["category"] for r in images})
    lines = ["# Cost against score", "",
             f"Score: the held-out GenEval-style overall (strict) over the categories {', '.join(categories)}"
             + (" (all evaluated)" if categories == every else f" (of the evaluated {', '.join(every)})")
             + ", mean over seeds; overall: over all evaluated categories, as each evaluation recorded it. Rows: "
             "transformer rows, a CFG pair counted as two, cumulative over the iterations (rollout + learner). "
             "Seconds: the rollout and learner stages'.", "",
             "## Every evaluated point, mean over seeds", "",
             "| arm | iteration | seeds | score | overall | rollout rows | learner rows | rows | stage seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in arms:
        for it in its[arm]:
            a = at[arm, it]
            lines.append(f"| {arm} | {it} | {len(a)} | {_mean(a, 'score'):.3f} | {_mean(a, 'overall'):.3f} | "
                         f"{_mean(a, 'rollout_rows'):.0f} | {_mean(a, 'learner_rows'):.0f} | {_rows(a):.0f} | "
                         f"{_mean(a, 'stage_seconds'):.0f} |")
    keys = [k for k in points[0]["settings"] if len({json.dumps(p["settings"].get(k)) for p in points}) > 1]
    if keys:
        lines += ["", "## The arms' settings (those that differ between arms)", "",
                  "| arm | " + " | ".join(f"`{k}`" for k in keys) + " |", "|---|" + "---|" * len(keys)]
        for arm in arms:
            st = next(p["settings"] for p in points if p["arm"] == arm)
            lines.append(f"| {arm} | " + " | ".join(json.dumps(st.get(k)) for k in keys) + " |")
    ref_it = its[reference][-1]
    ref = at[reference, ref_it]
    margin = gain = None
    if sc.has_base():
        lines += ["", "## Gain over the base model, paired by image", "",
                  "Each seed's score minus the base model's on the same images; SE holds the seeds' spread and the "
                  "evaluation set's; beyond the noise only from 4 seeds and p < 0.05.", "",
                  "| arm | iteration | seeds | gain | SE | p | seeds above | verdict |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for arm in arms:
            for it in its[arm][1:] if its[arm][0] == 0 else its[arm]:
                seeds = sorted(p["seed"] for p in at[arm, it])
                res = compare(sc.matrix(arm, it, seeds), sc.matrix(BASE, 0, seeds), sc.groups)
                lines.append(f"| {arm} | {it} | {res.seeds} | {res.diff:+.4f} | {res.se:.4f} | {res.p:.3f} | "
                             f"{res.won}/{res.seeds} | {_verdict(res)} |")
        gain = _mean(ref, "score") - sc.score(BASE, 0, ref[0]["seed"])
        margin = margin_share * max(gain, 0.0)
    lines += ["", f"## Against {reference} after its {ref_it} iterations, paired by seed and image", "",
              "Difference: arm - reference of the score over the seeds both ran (the reference column is its mean "
              "on those seeds); SE holds the seeds' spread and the shared evaluation set's; beyond the noise only from "
              "4 seeds and p < 0.05."]
    if margin is not None:
        lines += ["", f"Reaches: the reference's score within a margin of {margin:.4f} ({margin_share:g} of its gain "
                  f"over the base model, {margin / margin_share if margin_share else 0:.4f}), shown by the one-sided "
                  "95% lower bound of the difference lying above minus the margin, on at least 4 seeds. Gain kept: "
                  "the share of the reference's gain that bound still leaves, (gain + lower bound) / gain: what the "
                  "seeds show the arm keeps at least."]
    lines += ["", "| arm | iteration | share of the rows | share of the seconds | arm | reference | difference | SE | p | "
              "seeds won | verdict | lower bound | gain kept | reaches |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    first_reach: dict[str, tuple] = {}
    last: dict[str, tuple] = {}  # each arm's last point compared: (iteration, Paired)
    for arm in arms:
        for it in its[arm]:
            if (arm == reference and it == ref_it) or it == 0:
                continue
            a = at[arm, it]
            seeds = sorted({p["seed"] for p in a} & {p["seed"] for p in ref})
            ref_shared = [p for p in ref if p["seed"] in seeds]  # the reference on the seeds paired with
            res = compare(sc.matrix(arm, it, seeds), sc.matrix(reference, ref_it, seeds), sc.groups)
            # shares on the seeds both ran: the reference's other seeds would divide by another mean
            share, share_s = _rows(a) / _rows(ref_shared), _mean(a, "stage_seconds") / _mean(ref_shared, "stage_seconds")
            ok = margin is not None and reaches(res, margin)
            kept = "-" if gain is None or gain <= 0 or res.seeds < MIN_SEEDS else f"{max((gain + lower_bound(res)) / gain, 0.0):.2f}"
            if ok and arm not in first_reach:
                first_reach[arm] = (it, share, share_s)
            last[arm] = (it, res)
            lines.append(f"| {arm} | {it} | {share:.2f} | {share_s:.2f} | {_mean(a, 'score'):.3f} | "
                         f"{_mean(ref_shared, 'score'):.3f} | {res.diff:+.4f} | {res.se:.4f} | {res.p:.3f} | "
                         f"{res.won}/{res.seeds} | {_verdict(res)} | {lower_bound(res):+.4f} | {kept} | "
                         f"{'-' if margin is None else ('yes' if ok else 'no')} |")
    if margin is not None and train_prompts is not None:
        lines += yardsticks(at, images, reference, ref_it, categories, train_prompts, margin_share)
    later = [(arm, it) for arm in arms for it in its[arm] if it != 0 and it != its[arm][-1]]
    if later:
        lines += ["", "## Does the rest of the budget pay: each arm's last point against its earlier ones", "",
                  "Difference: the arm's last point minus an earlier point of the same runs, paired by seed and "
                  "image; beyond the noise only from 4 seeds and p < 0.05.", "",
                  "| arm | last | earlier | seeds | last score | earlier score | difference | SE | p | seeds won | "
                  "verdict |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for arm, it in later:
            end = its[arm][-1]
            seeds = sorted({p["seed"] for p in at[arm, end]} & {p["seed"] for p in at[arm, it]})
            res = compare(sc.matrix(arm, end, seeds), sc.matrix(arm, it, seeds), sc.groups)
            mean_end, mean_it = (float(np.mean([sc.score(arm, i, s) for s in seeds])) for i in (end, it))
            lines.append(f"| {arm} | {end} | {it} | {res.seeds} | {mean_end:.3f} | {mean_it:.3f} | "
                         f"{res.diff:+.4f} | {res.se:.4f} | {res.p:.3f} | {res.won}/{res.seeds} | {_verdict(res)} |")
    if margin is not None:
        lines += ["", f"## Rows to reach {reference}'s final score", "",
                  f"Each arm's first evaluated point that reaches it (above), and whether that meets the target: at "
                  f"most {TARGET_ROWS:g} of the reference's rows and {TARGET_SECONDS:g} of its seconds.", "",
                  "| arm | first point that reaches | share of the rows | share of the seconds | target |",
                  "|---|---:|---:|---:|---|"]
        for arm in arms:
            if arm in first_reach:
                it, share, share_s = first_reach[arm]
                met = "met" if share <= TARGET_ROWS and share_s <= TARGET_SECONDS else "not met"
                lines.append(f"| {arm} | {it} | {share:.2f} | {share_s:.2f} | {met} |")
            elif arm != reference:
                lines.append(f"| {arm} | not reached | | | not met |")
        lines += ["", "## What the seeds resolve", "",
                  "Per arm's last point against the reference: the standard deviation of the seeds' differences "
                  "(training runs and each seed's own images), the evaluation set's error of the difference (shared by "
                  "the seeds), and how many paired seeds an arm as good as the reference needs to be shown to reach "
                  "it within the margin 4 times in 5 (normal approximation: (1.645 + 0.842)^2 SD^2 / (margin^2 - "
                  "(1.645 + 0.842)^2 items^2)).", "",
                  "| arm | iteration | seeds | SD of the seeds' differences | items' error | seeds needed |",
                  "|---|---:|---:|---:|---:|---:|"]
        for arm, (it, res) in last.items():
            sd = res.se_seeds * np.sqrt(res.seeds)
            room = margin**2 - (Z_POWER * res.se_items) ** 2
            need = f"{int(np.ceil((Z_POWER * sd) ** 2 / room))}" if room > 0 else "none suffice: more images"
            lines.append(f"| {arm} | {it} | {res.seeds} | {sd:.4f} | {res.se_items:.4f} | {need} |")
    return "\n".join(lines) + "\n", points, margin


def yardsticks(at: dict, images: list[dict], reference: str, ref_it: int, categories: list[str],
               train_prompts: set[str], margin_share: float) -> list[str]:
    """Every point against the reference's last on three yardsticks (the score's categories, every
    evaluated category, the score's categories without the training prompts), each with its own
    margin (`margin_share` of the reference's gain over the base model on that yardstick), the
    paired formula's SE beside a two-level bootstrap's, and the lower bound at the 5% level and
    at 5% divided by the number of points compared (Bonferroni: an arm picked as the first of M
    points to pass should pass at that level)."""
    every = sorted({r["category"] for r in images})
    untrained = [r for r in images if r["prompt"] not in train_prompts]
    sticks = [("trained categories", Scores(images, categories)), ("all categories", Scores(images, every)),
              ("untrained prompts", Scores(untrained, categories))]
    sticks = [(name, sc) for name, sc in sticks if sc.items]
    ref = at[reference, ref_it]
    margins = {name: margin_share * max(float(np.mean([sc.score(reference, ref_it, p["seed"]) for p in ref]))
                                        - sc.score(BASE, 0, ref[0]["seed"]), 0.0) for name, sc in sticks}
    compared = [(arm, it) for arm, it in at if it != 0 and not (arm == reference and it == ref_it)]
    m = len(compared)
    alpha = 0.05 / max(m, 1)
    items = ", ".join(f"{name}: {len(sc.items)} items, margin {margins[name]:.4f}" for name, sc in sticks)
    lines = ["", "## Every yardstick, and everything tried", "",
             f"Each point against {reference} after {ref_it} on each yardstick ({items}; a margin is {margin_share:g} "
             "of the reference's gain over the base model on that yardstick). SE: the paired formula (seeds and "
             "items); bootstrap: seeds and items resampled, an independent check (it counts each seed's image noise twice, so "
             "it mostly lies above the formula). "
             f"{m} points were compared; an arm chosen as the first of them to reach should reach at 0.05 / {m} "
             f"(the lower bound at {alpha:.4f}).", "",
             "| arm | iteration | yardstick | seeds | difference | SE | bootstrap SE | lower bound (5%) | "
             f"lower bound (5%/{m}) | reaches (5%) | reaches (5%/{m}) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for arm, it in sorted(compared):
        seeds = sorted({p["seed"] for p in at[arm, it]} & {p["seed"] for p in ref})
        for name, sc in sticks:
            a, b = sc.matrix(arm, it, seeds), sc.matrix(reference, ref_it, seeds)
            res = compare(a, b, sc.groups)
            lines.append(f"| {arm} | {it} | {name} | {res.seeds} | {res.diff:+.4f} | {res.se:.4f} | "
                         f"{bootstrap_se(a, b, sc.groups):.4f} | {lower_bound(res):+.4f} | "
                         f"{lower_bound(res, alpha):+.4f} | {'yes' if reaches(res, margins[name]) else 'no'} | "
                         f"{'yes' if reaches(res, margins[name], alpha) else 'no'} |")
    return lines


def figure(points: list[dict], out: Path, reference: str, margin: float | None) -> Path:
    """The score against cumulative rows (Figure 5's form): each arm's mean over seeds (line) and
    each seed (dots), with the reference's final score and the band within the margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.8))
    for arm in sorted({p["arm"] for p in points}, key=lambda a: (a != reference, a)):
        its = sorted({p["iteration"] for p in points if p["arm"] == arm})
        at = [[p for p in points if p["arm"] == arm and p["iteration"] == it] for it in its]
        line, = ax.plot([_rows(a) for a in at], [_mean(a, "score") for a in at], "o-", label=arm)
        for a in at:
            ax.plot([p["rollout_rows"] + p["learner_rows"] for p in a], [p["score"] for p in a], ".",
                    color=line.get_color(), alpha=0.3)
    last = max(p["iteration"] for p in points if p["arm"] == reference)
    final = _mean([p for p in points if p["arm"] == reference and p["iteration"] == last], "score")
    ax.axhline(final, color="k", lw=0.8, ls="--", label=f"{reference} final")
    if margin:
        ax.axhspan(final - margin, final, color="k", alpha=0.07, label="within the margin")
    n = len({p["seed"] for p in points})
    ax.set_xlabel("transformer rows, rollout + learner, cumulative")
    ax.set_ylabel("held-out score")
    ax.set_title(f"mean over seeds (line, up to {n}), each seed (dots)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = out / "score-vs-rows.png"
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def is_cost_folder(folder: Path) -> bool:
    return (folder / IMAGES).is_file() or (folder / COMPARISON).is_file()


def report(out: Path, store: str | None = None, reference: str | None = None, base: Path | None = None,
           categories: str | None = None, train_prompts: str | None = None, margin_share: float | None = None,
           default_train_source: str = "builtin:shapes_train") -> str:
    """Collect the records from `store` into `out` (or read `out`'s), then write comparison.json,
    summary.md and the figure; returns summary.md. Every option left None takes what
    comparison.json recorded, else its default. Raises RecordsError (one line) before writing
    anything when an input or option is bad."""
    saved = out / COMPARISON
    if store:
        points, images = collect(store)
        if not points:
            raise RecordsError(f"no evaluated run in store {store}: pass the store the runs wrote to (--store)")
        if base is not None:
            if not base.is_file():
                raise RecordsError(f"--base {base} does not exist: pass the curves.json of an ablation over these runs")
            starts, base_images = base_records(base, points)
            points = sorted(starts + points, key=lambda p: (p["arm"], p["seed"], p["iteration"]))
            images = base_images + images
        before = {}
    else:
        missing = [n for n in (POINTS, IMAGES) if not (out / n).is_file()]
        if missing:
            raise RecordsError(f"{out / missing[0]} does not exist: collect the records with --store first")
        points = [json.loads(line) for line in (out / POINTS).read_text().splitlines()]
        images = [json.loads(line) for line in gzip.decompress((out / IMAGES).read_bytes()).decode().splitlines()]
        before = json.loads(saved.read_text()) if saved.is_file() else {}
    arms = sorted({p["arm"] for p in points})
    every = sorted({r["category"] for r in images})
    reference = reference or before.get("reference", "tempflow")
    chosen = categories.split(",") if categories else before.get("categories", every)
    share = margin_share if margin_share is not None else before.get("margin_share", MARGIN_SHARE)
    train_source = train_prompts or before.get("train_prompts") or default_train_source
    try:
        from tempflow_core.prompts import load_prompts

        trained = {r.text for r in load_prompts(train_source)}
    except (OSError, ValueError) as e:
        raise RecordsError(f"--train-prompts {train_source!r}: {e}") from None
    if reference not in arms:
        raise RecordsError(f"--reference {reference!r} is not an arm of these records: use one of {arms}")
    unknown = [c for c in chosen if c not in every]
    if unknown:
        raise RecordsError(f"--categories: {unknown[0]!r} is not an evaluated category: use some of {','.join(every)}")
    if not 0 <= share < 1:
        raise RecordsError(f"--margin-share {share} is not a share in [0, 1): pass e.g. {MARGIN_SHARE}")
    chosen = sorted(chosen)
    text, scored, margin = summarize(points, images, reference, chosen, share, trained)
    out.mkdir(parents=True, exist_ok=True)
    if store:
        write_text(out / POINTS, "".join(json.dumps(p) + "\n" for p in points))
        _write_bytes(out / IMAGES, gzip.compress("".join(json.dumps(r) + "\n" for r in images).encode(), mtime=0))
    write_text(saved, json.dumps({"reference": reference, "categories": chosen, "margin_share": share,
                              "train_prompts": train_source}) + "\n")
    write_text(out / "summary.md", text)
    figure(scored, out, reference, margin)
    return text
