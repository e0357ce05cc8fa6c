"""The ablation flow: the paper's four variants from one base model, same prompts, seeds and
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
from tempflow_core import figures, stages
from tempflow_core.config import RunConfig

VARIANTS = ["flow_grpo", "flow_grpo_fixed", "branch", "tempflow"]


def variant_config(base: RunConfig, algorithm: str, reward: str, seed: int) -> RunConfig:
    d = base.model_dump(mode="json")
    d["algorithm"], d["train"]["seed"] = algorithm, seed
    d["reward"]["name"] = reward
    return RunConfig.model_validate(d)


def _score(e: dict[str, Any]) -> float:
    return float(e.get("geneval_overall", e["reward"]))


@task(name="collect-curves", cache_policy=NONE)
def collect(base: RunConfig, runs: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Per variant: eval score per (seed, iteration, cumulative NFE); per-step reward std of
    the first iteration (the base model) of the branching runs; final per-category scores."""
    curves: dict[str, list[dict[str, Any]]] = {}
    std_by_step: dict[int, list[float]] = {}
    finals: dict[str, list[dict[str, Any]]] = {}
    for variant, by_seed in runs.items():
        for seed, run_id in by_seed.items():
            cfg = variant_config(base, variant, base.reward.name, int(seed))
            lay = stages.RunLayout(stages.open_run_store(cfg), run_id)
            nfe = 0
            last = None
            for it in range(cfg.train.iterations):
                m = stages.checkpoint_metrics(lay, it)
                nfe += int(m.get("rollout/nfe", 0))
                if it == 0 and cfg.branching:
                    for k, v in m.items():
                        if k.startswith("reward_step/std_"):
                            std_by_step.setdefault(int(k.rsplit("_", 1)[1]), []).append(float(v))
                if lay.complete(it, "eval"):
                    last = stages.read_eval(lay, it)
                    curves.setdefault(variant, []).append({"seed": int(seed), "iteration": it + 1, "nfe": nfe,
                                                           "score": _score(last)})
            if last is not None:
                finals.setdefault(variant, []).append(last)
    return {"curves": curves, "std_by_step": {str(k): v for k, v in sorted(std_by_step.items())}, "finals": finals}


def _table(base_eval: dict[str, Any], finals: dict[str, list[dict[str, Any]]]) -> str:
    """Table 1's form: overall and per category, mean over seeds (or the reward when the
    prompts carry no GenEval metadata)."""
    rows = {"base model": [base_eval], **finals}
    if all("geneval" in e for es in rows.values() for e in es):
        cats = list(base_eval["geneval"])
        head = "| model | overall | " + " | ".join(cats) + " |\n|---|---|" + "---|" * len(cats)
        lines = [head]
        for name, es in rows.items():
            overall = sum(e["geneval_overall"] for e in es) / len(es)
            cells = [sum(e["geneval"][c] for e in es) / len(es) for c in cats]
            lines.append(f"| {name} | {overall:.3f} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
        return "\n".join(lines)
    lines = ["| model | eval reward |", "|---|---|"]
    for name, es in rows.items():
        lines.append(f"| {name} | {sum(e['reward'] for e in es) / len(es):.4f} |")
    return "\n".join(lines)


@task(name="figures", cache_policy=NONE)
def make_figures(base: RunConfig, data: dict[str, Any], base_eval: dict[str, Any], out: str) -> dict[str, str]:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    T = base.sampling.num_steps
    made: dict[str, str] = {}
    std = {int(k): v for k, v in data["std_by_step"].items()}
    if std:
        made["fig1"] = str(figures.reward_std_per_step(std, folder / "fig1_reward_std_per_step.png"))
        made["fig4_left"] = str(figures.noise_vs_reward_std(std, T, base.sampling.shift, base.sampling.noise_level,
                                                             folder / "fig4_noise_vs_reward_std.png"))
    made["fig4_right"] = str(figures.scale_terms(T, folder / "fig4_scale_terms.png", base.sampling.noise_level))
    label = "GenEval-style overall (held-out)" if "geneval_overall" in base_eval else "eval reward"
    if data["curves"]:
        made["fig2"] = str(figures.score_curves(data["curves"], "iteration", folder / "fig2_score_vs_iteration.png", label))
        made["fig5"] = str(figures.score_curves(data["curves"], "nfe", folder / "fig5_score_vs_nfe.png", label))
    table = _table(base_eval, data["finals"])
    (folder / "table.md").write_text(table + "\n")
    (folder / "curves.json").write_text(json.dumps({"config": base.model_dump(mode="json"), "base_eval": base_eval,
                                                    **data}, indent=1))
    made["table"] = str(folder / "table.md")
    made["curves"] = str(folder / "curves.json")
    return made


@flow(name="tempflow-ablation", validate_parameters=True)
def ablation_flow(base: RunConfig = RunConfig(), variants: list[str] = VARIANTS, seeds: list[int] = [0, 1, 2],
                  rewards: list[str] = ["shapes"], out: str = "ablation", name: str = "abl") -> dict[str, Any]:
    """Train every (reward, variant, seed) and draw the paper's figures per reward."""
    log = get_run_logger()
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {VARIANTS}")
    results: dict[str, Any] = {}
    for reward in rewards:
        runs: dict[str, dict[str, str]] = {}
        for variant in variants:
            for seed in seeds:
                cfg = variant_config(base, variant, reward, seed)
                run_id = f"{name}-{reward}-{variant}-s{seed}-{cfg.digest()[:6]}"
                log.info("ablation: %s", run_id)
                train_flow(config=cfg, run_id=run_id)
                runs.setdefault(variant, {})[str(seed)] = run_id
        rbase = variant_config(base, "tempflow", reward, seeds[0])
        base_eval = eval_flow(config=rbase)
        data = collect(rbase, runs)
        results[reward] = {"runs": runs, "figures": make_figures(rbase, data, base_eval, str(Path(out) / reward))}
    (Path(out) / "runs.json").write_text(json.dumps(results, indent=1))
    return results
