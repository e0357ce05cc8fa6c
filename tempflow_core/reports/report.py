"""Evaluation curves of runs, the paper's headline comparison, and the reproduction bundle.

Everything here reads what the stages wrote (eval results, checkpoint metrics) and produces
plain dicts and files, so the ablation flow, `tempflow compare` and the README all judge runs
by the same score.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tempflow_core.run import stages
from tempflow_core.config import RunConfig
from tempflow_core.run.layout import RunLayout
from tempflow_core.prompts import load_prompts, split_source
from tempflow_core.reports.paired import MIN_SEEDS, Paired, from_seeds

SHAPES_REWARDS = ("shapes", "shapes_strict")
CHECKOUT = Path(__file__).resolve().parents[1]


def write_text(path: Path, text: str) -> Path:
    """Atomic text write (temporary name, then rename): a re-drawn report is never half old."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def eval_score(reward_name: str, result: dict[str, Any]) -> float:
    """What a run is judged by: GenEval's strict overall when it trains a shapes reward (the
    paper's headline metric), otherwise the mean evaluation value of the reward it trains, never
    a metric of another objective (a JPEG run is not ranked by GenEval)."""
    if reward_name in SHAPES_REWARDS and "geneval_overall" in result:
        return float(result["geneval_overall"])
    return float(result["reward"])


def eval_summary(result: dict[str, Any]) -> str:
    """One line of an eval result: the reward and GenEval-style overall, each with its
    standard error when recorded, e.g. 'reward 0.3739 ± 0.0210, GenEval-style overall 0.296 ± 0.020'."""
    def pm(key: str, digits: int) -> str:
        se = result.get(f"{key}_se")
        return f"{result[key]:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")

    return f"reward {pm('reward', 4)}" + (f", GenEval-style overall {pm('geneval_overall', 3)}"
                                          if "geneval_overall" in result else "")


def score_label(reward_name: str) -> str:
    if reward_name in SHAPES_REWARDS:
        return "GenEval-style overall (evaluation prompts)"
    return f"eval {reward_name} (evaluation prompts)"


def eval_se(reward_name: str, result: dict[str, Any]) -> float | None:
    """The standard error of eval_score under the evaluation protocol (None: not recorded)."""
    key = "geneval_overall_se" if reward_name in SHAPES_REWARDS and "geneval_overall" in result else "reward_se"
    return None if result.get(key) is None else float(result[key])


def _point(reward_name: str, result: dict[str, Any], seed: int, iteration: int, nfe: int) -> dict[str, Any]:
    p = {"seed": seed, "iteration": iteration, "nfe": nfe, "score": eval_score(reward_name, result),
         "reward": float(result["reward"])}
    for key, value in (("se", eval_se(reward_name, result)), ("reward_se", result.get("reward_se"))):
        if value is not None:
            p[key] = float(value)
    if "geneval_overall" in result:
        p["geneval_overall"] = float(result["geneval_overall"])
    return p


def run_curve(cfg: RunConfig, layout: RunLayout, base_eval: dict[str, Any] | None = None
              ) -> list[dict[str, Any]]:
    """Eval points of one run in order: (iteration, cumulative transformer NFEs, score).

    NFEs count the rows through the transformer, a CFG pair once: the rollout's and the
    learner's (its forward with grad and the KL reference's; 0 for runs recorded before the
    learner counted them), so a variant with a cheap rollout and a costly update is charged
    for both. ``rollout_nfe`` keeps the rollout's share. ``base_eval`` (the base model under
    the same eval settings) becomes the point at iteration 0, so every curve starts from the
    same place."""
    points = [{**_point(cfg.reward.name, base_eval, cfg.train.seed, 0, 0), "rollout_nfe": 0}] if base_eval else []
    nfe = rollout_nfe = 0
    for it in range(cfg.train.iterations):
        if not layout.complete(it, "learner"):
            break
        m = stages.checkpoint_metrics(layout, it)
        rollout_nfe += int(m.get("rollout/nfe", 0))
        nfe += int(m.get("rollout/nfe", 0)) + int(m.get("learner/nfe", 0))
        if layout.complete(it, "eval"):
            points.append({**_point(cfg.reward.name, stages.read_eval(layout, it), cfg.train.seed, it + 1, nfe),
                           "rollout_nfe": rollout_nfe})
    return points


def rescore(curves: dict[str, list[dict[str, Any]]], key: str) -> dict[str, list[dict[str, Any]]]:
    """The same curves judged by another recorded value (e.g. 'reward', the dense partial
    credit, which is steadier than GenEval's per-category mean on a small test split)."""
    def moved(p: dict[str, Any]) -> dict[str, Any]:
        q = {k: v for k, v in p.items() if k != "se"}
        if f"{key}_se" in p:
            q["se"] = p[f"{key}_se"]
        return {**q, "score": p[key]}

    return {v: [moved(p) for p in pts if key in p] for v, pts in curves.items()}


def mean_curve(points: list[dict[str, Any]], x: str = "iteration") -> list[dict[str, float]]:
    """Mean and spread over seeds at each x (only x values every seed reached); "se" is the
    evaluation protocol's standard error of that mean, sqrt(sum of the seeds' se^2) / n."""
    seeds = {p["seed"] for p in points}
    out = []
    for v in sorted({p[x] for p in points}):
        at = [p for p in points if p[x] == v]
        ys = [p["score"] for p in at]
        if len(ys) == len(seeds):
            row = {x: v, "mean": float(np.mean(ys)), "std": float(np.std(ys, ddof=1)) if len(ys) > 1 else 0.0,
                   "min": float(min(ys)), "max": float(max(ys)), "n": len(ys)}
            if all("se" in p for p in at):
                row["se"] = float(np.sqrt(sum(p["se"] ** 2 for p in at)) / len(at))
            out.append(row)
    return out


def first_reaching(points: list[dict[str, Any]], target: float, x: str = "iteration") -> float | None:
    """The first x (after the base point) where the seed-mean score reaches ``target``."""
    for row in mean_curve(points, x):
        if row[x] > 0 and row["mean"] >= target - 1e-12:
            return row[x]
    return None


def _se_of_difference(a: float | None, b: float | None) -> float:
    """The standard error of a difference of two independent estimates (0 when one is unknown)."""
    return 0.0 if a is None or b is None else float(np.hypot(a, b))


def paired_verdict(a: dict[str, float], b: dict[str, float], se_a: float | None, se_b: float | None) -> Paired | None:
    """a - b over the seeds both have (seed -> score), paired by seed, with the evaluation's
    standard error of the difference sqrt(se_a^2 + se_b^2) (each the se of a seed mean; 0 where
    not recorded): `paired.from_seeds`, "beyond the noise" only from 4 seeds and p < 0.05.
    None when no seed is shared."""
    seeds = sorted(set(a) & set(b), key=str)
    if not seeds:
        return None
    return from_seeds([a[k] - b[k] for k in seeds], _se_of_difference(se_a, se_b))


def verdict_fields(res: Paired) -> dict[str, Any]:
    """What the verdicts record of a paired test: 'clear' is None below MIN_SEEDS seeds (no verdict)."""
    return {"clear": res.beyond if res.seeds >= MIN_SEEDS else None, "p": res.p, "se": res.se,
            "seeds_won": f"{res.won}/{res.seeds}"}


def headline(curves: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The paper's claims on these curves as numbers and verdicts:
    tempflow ends above the base model, reaches flow_grpo_fixed's final score in at most half
    the iterations and ends above it; flow_grpo_fixed ends above flow_grpo. Final = last evaluation, mean over seeds;
    'clear' means the gap is beyond the noise by the paired test (`paired_verdict`: paired by
    seed, the seeds' spread and the evaluation's error, p < 0.05), None below 4 seeds, where
    no verdict is given. Reaching a target is only a claim when the target lies above the base
    model (iteration 0) by more than flow_grpo_fixed's seed std (otherwise every curve starts
    at it, 'reaching' it is vacuous and the verdict says so), and, like every verdict, from 4
    seeds."""
    base_points = [p for pts in curves.values() for p in pts if p["iteration"] == 0]
    base = float(np.mean([p["score"] for p in base_points])) if base_points else None
    base_se = base_points[0].get("se") if base_points else None
    finals: dict[str, dict[str, Any]] = {}
    for variant, points in curves.items():
        rows = mean_curve(points)
        if not rows:
            continue
        last = rows[-1]
        per_seed = sorted((p["seed"], p["score"]) for p in points if p["iteration"] == last["iteration"])
        finals[variant] = {"iteration": last["iteration"], "mean": last["mean"], "std": last["std"],
                           "se": last.get("se"),
                           "per_seed": {str(s): v for s, v in per_seed},
                           "vs_base": None if base is None else last["mean"] - base,
                           "best_mean": max(r["mean"] for r in rows if r["iteration"] > 0) if len(rows) > 1 else None}
    out: dict[str, Any] = {"base": base, "base_se": base_se, "finals": finals}

    def gap(a: str, b: str) -> dict[str, Any] | None:
        if a not in finals or b not in finals:
            return None
        res = paired_verdict(finals[a]["per_seed"], finals[b]["per_seed"], finals[a].get("se"), finals[b].get("se"))
        if res is None:
            return None
        return {"diff": res.diff, "holds": res.diff > 0, **verdict_fields(res)}

    if "tempflow" in finals and base is not None:  # the gain over the model every variant starts from
        f = finals["tempflow"]
        res = paired_verdict(f["per_seed"], {k: base for k in f["per_seed"]}, f.get("se"), base_se)
        out["tempflow_above_base"] = {"diff": res.diff, "holds": res.diff > 0, **verdict_fields(res)}
    if "tempflow" in finals and "flow_grpo_fixed" in finals:
        target = finals["flow_grpo_fixed"]["mean"]
        total = finals["tempflow"]["iteration"]
        reach = first_reaching(curves["tempflow"], target)
        reach_nfe = first_reaching(curves["tempflow"], target, "nfe")
        fixed_nfe = max(p["nfe"] for p in curves["flow_grpo_fixed"])
        # the target must stand above the base model by more than its own seed spread
        vacuous = base is not None and target <= base + finals["flow_grpo_fixed"]["std"]
        seeds = min(len(finals["tempflow"]["per_seed"]), len(finals["flow_grpo_fixed"]["per_seed"]))
        out["tempflow_reaches_fixed_final"] = {
            "target": target, "iteration": reach, "of": total, "nfe": reach_nfe, "fixed_total_nfe": fixed_nfe,
            "vacuous": vacuous, "seeds": seeds,
            "holds": (not vacuous) and reach is not None and reach <= total / 2 and seeds >= MIN_SEEDS}
        out["tempflow_above_fixed"] = gap("tempflow", "flow_grpo_fixed")
    out["fixed_above_flow_grpo"] = gap("flow_grpo_fixed", "flow_grpo")
    out["branch_above_fixed"] = gap("branch", "flow_grpo_fixed")
    out["reweight_above_fixed"] = gap("reweight", "flow_grpo_fixed")
    out["tempflow_above_branch"] = gap("tempflow", "branch")
    return out


def headline_markdown(h: dict[str, Any]) -> str:
    """The verdicts as a short markdown list (the README quotes it)."""
    def yn(ok: bool | None) -> str:
        return "holds" if ok else "does not hold"

    def se(x: float | None) -> str:
        return "" if x is None else f"{x:.3f}"

    base = h.get("base")
    lines = ["| variant | final score (mean ± std over seeds) | eval standard error | change from the base model "
             "| per seed | best seed-mean along the curve |", "|---|---|---|---|---|---|"]
    if base is not None:
        lines.append(f"| base model | {base:.3f} | {se(h.get('base_se'))} | | | |")
    for v, f in h["finals"].items():
        seeds = ", ".join(f"{s}: {x:.3f}" for s, x in f["per_seed"].items())
        best = "" if f["best_mean"] is None else f"{f['best_mean']:.3f}"
        change = "" if f.get("vs_base") is None else f"{f['vs_base']:+.3f}"
        lines.append(f"| {v} | {f['mean']:.3f} ± {f['std']:.3f} | {se(f.get('se'))} | {change} | {seeds} | {best} |")
    lines.append("")
    r = h.get("tempflow_reaches_fixed_final")
    if r:
        when = (f"at iteration {r['iteration']:g} of {r['of']:g} ({r['nfe']:.0f} NFEs; flow_grpo_fixed used "
                f"{r['fixed_total_nfe']} in all)") if r["iteration"] is not None else "never"
        if r.get("vacuous"):
            lines.append(f"- tempflow reaching flow_grpo_fixed's final score ({r['target']:.3f}) in at most half the "
                         f"iterations: not measurable here, flow_grpo_fixed did not end above the base model "
                         f"({base:.3f}) by more than its seed spread, so any curve starting there 'reaches' it; "
                         f"tempflow did {when}.")
        elif r.get("seeds", MIN_SEEDS) < MIN_SEEDS:
            lines.append(f"- tempflow reaches flow_grpo_fixed's final score ({r['target']:.3f}) {when}: "
                         f"'in at most half the iterations' has no verdict (fewer than {MIN_SEEDS} seeds).")
        else:
            lines.append(f"- tempflow reaches flow_grpo_fixed's final score ({r['target']:.3f}) {when}: "
                         f"'in at most half the iterations' {yn(r['holds'])}.")
    for key, text in (("tempflow_above_base", "tempflow ends above the base model"),
                      ("tempflow_above_fixed", "tempflow ends above flow_grpo_fixed"),
                      ("fixed_above_flow_grpo", "flow_grpo_fixed ends above flow_grpo"),
                      ("branch_above_fixed", "branch ends above flow_grpo_fixed"),
                      ("reweight_above_fixed", "reweight ends above flow_grpo_fixed"),
                      ("tempflow_above_branch", "tempflow ends above branch")):
        g = h.get(key)
        if g:
            lines.append(f"- {text}: {yn(g['holds'])} (difference {g['diff']:+.3f}, {noise_words(g)}; "
                         f"seeds won {g['seeds_won']}).")
    return "\n".join(lines) + "\n"


def noise_words(g: dict[str, Any]) -> str:
    """A verdict's words: no verdict below 4 seeds, else beyond or within the noise with its p."""
    if g["clear"] is None:
        return f"fewer than {MIN_SEEDS} seeds: no verdict"
    return f"{'beyond' if g['clear'] else 'within'} the noise, p = {g['p']:.3f}"


def category_table(base_eval: dict[str, Any], finals: dict[str, list[dict[str, Any]]], reward_name: str) -> str:
    """Table 1's form: the evaluation value of the trained reward, GenEval's overall and its
    categories, mean over seeds (for a non-shapes reward GenEval shows what the reward costs)."""
    rows = {"base model": [base_eval], **finals}
    if all("geneval" in e for es in rows.values() for e in es):
        cats = list(base_eval["geneval"])
        first = [f"eval {reward_name}"]
        head = ["model", *first, "overall", *cats]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, es in rows.items():
            cells = [f"{np.mean([e['reward'] for e in es]):.3f}", f"{np.mean([e['geneval_overall'] for e in es]):.3f}"]
            if all("geneval_overall_se" in e for e in es):  # the protocol's standard error of the seed mean
                err = np.sqrt(sum(e["geneval_overall_se"] ** 2 for e in es)) / len(es)
                cells[1] += f" ± {err:.3f}"
            cells += [f"{np.mean([e['geneval'][c] for e in es]):.3f}" for c in cats]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)
    lines = ["| model | eval reward |", "|---|---|"]
    for name, es in rows.items():
        lines.append(f"| {name} | {np.mean([e['reward'] for e in es]):.4f} |")
    return "\n".join(lines)


def portable_config(cfg: RunConfig) -> dict[str, Any]:
    """A run's config as a file another checkout can train from: store and tracking settings
    left out (they are the user's), the shipped model named relative to the checkout."""
    d = cfg.model_dump(mode="json", exclude={"pipeline", "output_dir"})
    path = d["model"]["path"]
    if path:
        try:
            d["model"]["path"] = str(Path(path).resolve().relative_to(CHECKOUT))
        except ValueError:
            pass
    return d


def write_bundle(folder: Path, configs: dict[str, RunConfig]) -> dict[str, str]:
    """The reproduction bundle: one config file per run (name -> config) and the exact prompt
    sets they train and evaluate on, as JSONL any config can point at."""
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "prompts").mkdir(parents=True, exist_ok=True)
    sources: set[str] = set()
    for name, cfg in configs.items():
        text = (f"# Run {name} of the ablation; train it again from the checkout root with\n"
                f"#   tempflow train --config <this file> --run-id my-{name}\n"
                + yaml.safe_dump(portable_config(cfg), sort_keys=False))
        write_text(folder / "configs" / f"{name}.yaml", text)
        sources.update(s for s in (cfg.prompts.source, cfg.prompts.test_source, cfg.eval.prompts) if s)
    written = {}
    for source in sorted(sources):
        base, tags = split_source(source)
        name = base.split(":", 1)[-1].rsplit("/", 1)[-1].removesuffix(".jsonl").removesuffix(".txt")
        name += "".join(f"_{t}" for t in tags)
        path = folder / "prompts" / f"{name}.jsonl"
        write_text(path, "".join(json.dumps({**r.metadata, "id": r.id, "prompt": r.text}, sort_keys=True) + "\n"
                                 for r in load_prompts(source)))
        written[source] = str(path)
    return written
