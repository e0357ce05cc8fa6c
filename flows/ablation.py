"""The ablation flow: the paper's five variants from one base model, same prompts, seeds and
iterations, on one or more rewards; then the figures and the per-category table.

    tempflow ablation --seeds 0,1,2 --rewards shapes,jpeg_compressibility --out ablation

Every variant run is an ordinary training run (a subflow) with a deterministic run id, so
re-running the ablation resumes unfinished runs and skips finished ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.evaluate import eval_flow
from flows.train import train_flow
from tasks.tracking_task import track_ablation
from tempflow_core.reports import redraw, report
from tempflow_core.run import stages
from tempflow_core.config import RunConfig
from tempflow_core.run.layout import RunLayout

VARIANTS = ["flow_grpo", "flow_grpo_fixed", "reweight", "branch", "tempflow"]


def variant_config(base: RunConfig, algorithm: str, reward: str, seed: int) -> RunConfig:
    d = base.model_dump(mode="json")
    d["algorithm"], d["train"]["seed"] = algorithm, seed
    d["reward"]["name"] = reward
    return RunConfig.model_validate(d)


@task(name="collect-curves", cache_policy=NONE)
def collect(base: RunConfig, runs: dict[str, dict[str, str]], base_eval: dict[str, Any]) -> dict[str, Any]:
    """Per variant: eval score per (seed, iteration, cumulative NFE), starting from the base
    model; per-step reward std of the first iteration (the base model) of the branching runs;
    the final eval of every run."""
    curves: dict[str, list[dict[str, Any]]] = {}
    std_by_step: dict[int, list[float]] = {}
    finals: dict[str, list[dict[str, Any]]] = {}
    grid: dict[str, Any] | None = None
    for variant, by_seed in runs.items():
        for seed, run_id in by_seed.items():
            cfg = variant_config(base, variant, base.reward.name, int(seed))
            lay = RunLayout.open(cfg, run_id)
            points = report.run_curve(cfg, lay, base_eval)
            curves.setdefault(variant, []).extend(points)
            if cfg.branching and lay.complete(0, "learner"):
                for k, v in stages.checkpoint_metrics(lay, 0).items():
                    if k.startswith("reward_step/std_"):
                        std_by_step.setdefault(int(k.rsplit("_", 1)[1]), []).append(float(v))
                if grid is None:  # the grid the rollouts were sampled on: the family's, as resolved
                    grid = stages.rollout_grid(lay, 0)
            if points and points[-1]["iteration"] > 0:
                finals.setdefault(variant, []).append(stages.read_eval(lay, points[-1]["iteration"] - 1))
    return {"curves": curves, "std_by_step": {str(k): v for k, v in sorted(std_by_step.items())}, "finals": finals,
            "grid": grid}


@task(name="figures", cache_policy=NONE)
def make_figures(base: RunConfig, data: dict[str, Any], base_eval: dict[str, Any], out: str,
                 runs: dict[str, dict[str, str]]) -> dict[str, str]:
    """Figures 1, 4, 2, 5, Table 1's form, the headline verdicts (tempflow_core.reports.redraw,
    which `tempflow report` redraws them with from curves.json) and the reproduction bundle."""
    folder = Path(out)
    made, head = redraw.write_curves_report(folder, data, base_eval, base.reward.name,
                                            base.sampling.model_dump(mode="json"))
    label = report.score_label(base.reward.name)
    configs = {f"{variant}-s{seed}": variant_config(base, variant, base.reward.name, int(seed))
               for variant, by_seed in runs.items() for seed in by_seed}
    prompts = report.write_bundle(folder, configs)
    report.write_text(folder / "curves.json", json.dumps(
        {"reward": base.reward.name, "score": label, "seeds": sorted({int(s) for r in runs.values() for s in r}),
         "runs": runs, "prompts": prompts, "config": report.portable_config(base), "base_eval": base_eval,
         "headline": head, **data}, indent=1))
    made.update(table=str(folder / "table.md"), summary=str(folder / "summary.md"), curves=str(folder / "curves.json"))
    return made


@flow(name="tempflow-ablation", validate_parameters=True)
def ablation_flow(base: RunConfig = RunConfig(), variants: list[str] = VARIANTS, seeds: list[int] = [0, 1, 2],
                  rewards: list[str] = ["shapes"], out: str = "ablation", name: str = "abl",
                  report_only: bool = False) -> dict[str, Any]:
    """Train every (reward, variant, seed) and draw the paper's figures per reward.

    ``report_only``: train nothing; redraw the figures, table and bundle from the runs an
    earlier call with the same settings finished (an unfinished run is named, not trained)."""
    log = get_run_logger()
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {VARIANTS}")
    results: dict[str, Any] = {}
    for reward in rewards:
        runs: dict[str, dict[str, str]] = {}
        for seed in seeds:  # seed-major: a cut-short ablation still compares every variant
            for variant in variants:
                cfg = variant_config(base, variant, reward, seed)
                run_id = f"{name}-{reward}-{variant}-s{seed}-{cfg.digest()[:6]}"
                if report_only:
                    if not RunLayout.open(cfg, run_id).complete(cfg.train.iterations - 1, "learner"):
                        raise ValueError(f"report_only: run {run_id} has not finished in {cfg.pipeline.store}; "
                                         "run the ablation without report_only to train it")
                else:
                    log.info("ablation: %s", run_id)
                    train_flow(config=cfg, run_id=run_id)
                runs.setdefault(variant, {})[str(seed)] = run_id
        rbase = variant_config(base, "tempflow", reward, seeds[0])
        base_eval = eval_flow(config=rbase)
        data = collect(rbase, runs, base_eval)
        made = make_figures(rbase, data, base_eval, str(Path(out) / reward), runs)
        track_ablation(rbase, f"{name}-{reward}", made, json.loads(Path(made["curves"]).read_text())["headline"])
        results[reward] = {"runs": runs, "figures": made}
    index = Path(out) / "runs.json"  # one index over every reward this folder holds
    merged = {**(json.loads(index.read_text()) if index.exists() else {}), **results}
    report.write_text(index, json.dumps(merged, indent=1))
    return results
