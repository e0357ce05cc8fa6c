"""An experiment folder's figures and tables, drawn from its records alone.

One implementation for every writer: `tempflow ablation` (flows/ablation.py, from the runs it
collected), `tempflow sweep` (from its points) and `tempflow report DIR` (from
the committed records of a folder, ``records.read_records``: no run store, no tracking, no
network). Each file is written under a temporary name and renamed, so a redrawn folder never
holds half a file; the names are the ones the folder already has.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tempflow_core.algorithm.schedule import Schedule, make_schedule
from tempflow_core.reports import figures, pairs, report, sweep
from tempflow_core.reports.records import Records

Curves = dict[str, list[dict[str, Any]]]
DENSE_TITLE = "## Judged by the shapes reward on the evaluation prompts (partial credit)"


def summary_markdown(curves: Curves, label: str, at: int | None = None, dense: Curves | None = None,
                     timeline: tuple[Curves, Curves | None] | None = None) -> tuple[str, dict[str, Any]]:
    """(summary.md, headline): the verdicts and every pair of variants at the final iteration,
    judged by ``label`` and, given ``dense`` (the curves rescored by the trained shapes
    reward), by it too; then tempflow against flow_grpo_fixed at every iteration, on
    ``timeline`` (curves and dense curves not cut at ``at``; default: the same curves). The
    headline carries the dense one under "by_eval_reward"."""
    head = report.headline(curves)
    title = f"## Judged by {label}" + ("" if at is None else f", at iteration {at}")
    text = f"{title}\n\n" + report.headline_markdown(head) + _pairs(head)
    if dense is not None:
        head["by_eval_reward"] = report.headline(dense)
        text += f"\n{DENSE_TITLE}\n\n" + report.headline_markdown(head["by_eval_reward"]) + _pairs(head["by_eval_reward"])
    full, full_dense = timeline or (curves, dense)
    steps = pairs.per_iteration_markdown(full, label, full_dense)
    return text + ("\n" + steps if steps else ""), head


def _pairs(head: dict[str, Any]) -> str:
    section = pairs.all_pairs_markdown(pairs.all_pairs(head["finals"]))
    return "\n" + section if section else ""


def score_figures(curves: Curves, folder: Path, label: str, dense: Curves | None = None,
                  dense_label: str = "") -> dict[str, str]:
    """Figures 2 and 5 (score against iterations and NFEs) and, given the dense curves,
    Figure 2 by the trained reward."""
    made = {"fig2": str(figures.score_curves(curves, "iteration", folder / "fig2_score_vs_iteration.png", label)),
            "fig5": str(figures.score_curves(curves, "nfe", folder / "fig5_score_vs_nfe.png", label))}
    if dense is not None:
        made["fig2_reward"] = str(figures.score_curves(dense, "iteration", folder / "fig2_reward_vs_iteration.png",
                                                       dense_label))
    return made


def write_curves_report(folder: Path, data: Mapping[str, Any], base_eval: dict[str, Any], reward: str,
                        sampling: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """`tempflow ablation`'s figures 1, 4, 2, 5, Table 1's form and the summary from its
    collected data (curves, std_by_step, finals, grid) and the run config's sampling settings
    (num_steps, shift, noise_level). Returns (what was written, the headline)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    steps = int(sampling["num_steps"])
    made: dict[str, str] = {}
    std = {int(k): v for k, v in data["std_by_step"].items()}
    if std:
        made["fig1"] = str(figures.reward_std_per_step(std, folder / "fig1_reward_std_per_step.png"))
        grid = data.get("grid") or {}
        schedule = Schedule.from_sigmas(grid["sigmas"], grid["noise_level"]) if grid else \
            make_schedule(steps, sampling.get("shift"), sampling.get("noise_level"))  # bundles from before the grid was kept
        made["fig4_left"] = str(figures.noise_vs_reward_std(std, schedule, folder / "fig4_noise_vs_reward_std.png"))
    made["fig4_right"] = str(figures.scale_terms(steps, folder / "fig4_scale_terms.png", sampling.get("noise_level")))
    label = report.score_label(reward)
    curves = data["curves"]
    dense = report.rescore(curves, "reward") if reward in report.SHAPES_REWARDS else None  # the steadier second view
    if curves:
        made.update(score_figures(curves, folder, label, dense, f"eval {reward} reward (evaluation prompts)"))
    summary, head = summary_markdown(curves, label, dense=dense)
    made["table"] = str(report.write_text(folder / "table.md",
                                          report.category_table(base_eval, data["finals"], reward) + "\n"))
    made["summary"] = str(report.write_text(folder / "summary.md", summary))
    return made, head


def write_sweep_report(rows: list[dict[str, Any]], out: Path, at: int | None = None) -> dict[str, str]:
    """The ablation's report from sweep points: every curve cut at ``at`` (default: the last
    iteration every run evaluated), judged by the GenEval-style overall and the shapes reward;
    the per-iteration comparison runs on the uncut points."""
    at = sweep.common_iteration(rows) if at is None else at
    curves, finals = sweep.curves_of(rows, at)
    full, _ = sweep.curves_of(rows, sweep.last_iteration(rows))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    label = "GenEval-style overall (evaluation prompts)"
    dense = report.rescore(curves, "reward")
    made = score_figures(curves, out, label, dense, "eval shapes reward (evaluation prompts)")
    summary, _ = summary_markdown(curves, label, at=at, dense=dense, timeline=(full, report.rescore(full, "reward")))
    made["summary"] = str(report.write_text(out / "summary.md", summary))
    made["table"] = str(report.write_text(out / "table.md", report.category_table(
        sweep.base_eval_of(rows), finals, "shapes") + "\n"))
    return made


def _mfu(x: float | None) -> str:
    return "" if x is None else f", MFU {100 * x:.1f}%"


def smoke_table(records: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per gpu_smoke.py record (named by its file): the rollout's images, NFEs, time,
    throughput and MFU, the learner's, and the peak memory of each."""
    lines = ["| record | model, device, dtype | prompts × K, steps | rollout | learner | peak memory rollout / learner |",
             "|---|---|---|---|---|---|"]
    for name, r in records.items():
        rollout = (f"{r['images']} images, {r['rollout_nfe']} NFE in {r['rollout_s']:.1f} s: "
                   f"{r['images_per_s']:.1f} images/s, {r.get('rollout_tflops_per_s', 0):.0f} TFLOP/s"
                   + _mfu(r.get("rollout_mfu")))
        learner = (f"{r['learner_terms']} terms ({r['learner_units']} branch points) in {r['learner_s']:.2f} s: "
                   f"{r['learner_units_per_s']:.0f} units/s, {r.get('learner_tflops_per_s', 0):.0f} TFLOP/s"
                   + _mfu(r.get("learner_mfu")))
        peaks = [r.get("rollout_peak_gib"), r.get("learner_peak_gib")]
        peak = " / ".join("–" if g is None else f"{g:.1f}" for g in peaks) + " GiB"
        params = r.get("transformer_params")
        model = f"{r.get('size', '?')}" + ("" if params is None else f" ({params / 1e9:.2f} B)")
        lines.append(f"| {name} | {model}, {r.get('device', '?')}, {r.get('dtype', '?')} | "
                     f"{r.get('prompts', '?')} × {r.get('group_size', '?')}, T {r.get('steps', '?')} | "
                     f"{rollout} | {learner} | {peak} |")
    return "\n".join(lines) + "\n"


def redraw(records: Records) -> dict[str, str]:
    """Every figure and table of the folder ``records`` were read from, from them alone."""
    if records.kind == "curves":
        d = records.curves
        made, _ = write_curves_report(records.folder, d, d["base_eval"], d["reward"], d["config"]["sampling"])
        return made
    if records.kind == "points":
        return write_sweep_report(records.rows, records.folder)
    return {"table": str(report.write_text(records.folder / "table.md", smoke_table(records.smoke)))}
