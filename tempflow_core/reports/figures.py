"""The paper's figures from run records: reward std per branch step (Fig. 1), noise level
against reward std and the scale terms with and without reweighting (Fig. 4), evaluation
score against iterations and NFEs (Figs. 2 and 5), and Table 1's per-category form.

Inputs are plain dicts (curves read from the store), outputs PNG files; matplotlib runs
headless (Agg).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tempflow_core.algorithm.schedule import Schedule, make_schedule


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: Path) -> Path:
    """Write the PNG under a temporary name and rename it: a reader never sees half a figure."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out


def reward_std_per_step(std_by_step: dict[int, list[float]], out: Path, title: str = "") -> Path:
    """Figure 1 (left): within-group reward std when the SDE acts at one step only."""
    plt = _plt()
    steps = sorted(std_by_step)
    mean = [float(np.mean(std_by_step[k])) for k in steps]
    err = [float(np.std(std_by_step[k])) for k in steps]  # across runs (seeds x branching variants)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(steps, mean, yerr=err if max(len(std_by_step[k]) for k in steps) > 1 else None, capsize=3,
           color="#4878a8")
    ax.set_xlabel("branch step k (0 = noisiest)")
    ax.set_ylabel("reward std within a group")
    ax.set_title(title or "Reward std per branch step (base model)")
    fig.tight_layout()
    return _save(plt, fig, out)


def noise_vs_reward_std(std_by_step: dict[int, list[float]], schedule: Schedule, out: Path) -> Path:
    """Figure 4 (left): the per-step noise scale s_t sqrt(dt) of the grid the runs sampled on
    (the model family's: SD3's static shift, FLUX's resolution-dependent one) next to the reward std."""
    plt = _plt()
    num_steps = schedule.num_steps
    scale = schedule.step_std().numpy()
    steps = sorted(std_by_step)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(num_steps), scale, "o-", color="#c44e52", label="noise s_t sqrt(dt)")
    ax.set_xlabel("step k")
    ax.set_ylabel("noise scale", color="#c44e52")
    ax2 = ax.twinx()
    ax2.plot(steps, [np.mean(std_by_step[k]) for k in steps], "s--", color="#4878a8", label="reward std")
    ax2.set_ylabel("reward std", color="#4878a8")
    if len(steps) > 2:
        r = np.corrcoef(scale[steps], [np.mean(std_by_step[k]) for k in steps])[0, 1]
        ax.set_title(f"Noise level vs reward std (Pearson r = {r:.2f})")
    fig.tight_layout()
    return _save(plt, fig, out)


def scale_terms(num_steps: int, out: Path, noise_level: float = 0.7) -> Path:
    """Figure 4 (right): gradient scale per step without reweighting, sqrt(dt (1-t)/t), and
    with it (proportional to dt), for shifts 1 and 3; each normalised to sum 1."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    for ax, shift in zip(axes, (1.0, 3.0)):
        s = make_schedule(num_steps, shift, noise_level)
        # steps 1..T-2: step 0's scale term is 0 (t = 1) and the last step is not trained
        raw = s.scale_term().numpy()[1:-1]
        rew = (s.step_weights() * s.scale_term()[:-1]).numpy()[1:]
        x = np.arange(1, num_steps - 1)
        ax.plot(x, raw / raw.sum(), "o-", label="w/o reweighting")
        ax.plot(x, rew / rew.sum(), "s-", label="noise-aware reweighting")
        ax.set_title(f"shift {shift:g}")
        ax.set_xlabel("step k")
    axes[0].set_ylabel("share of the gradient scale")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, out)


def score_curves(curves: dict[str, list[dict[str, Any]]], x: str, out: Path, ylabel: str,
                 reference: dict[str, list[dict[str, Any]]] | None = None) -> Path:
    """Figures 2 / 5: eval score against `x` ('iteration' or 'nfe') per variant; the line is
    the mean over seeds, the dark band its evaluation standard error (mean ± se, when the
    points carry one), the light band spans the seeds (min to max). Reference curves are dashed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    with_se = False
    for name, points in sorted(curves.items()):
        xs = sorted({p[x] for p in points})
        at = [[p for p in points if p[x] == v] for v in xs]
        ys = [[p["score"] for p in a] for a in at]
        mean = [float(np.mean(y)) for y in ys]
        line, = ax.plot(xs, mean, "o-", label=name)
        if all("se" in p for a in at for p in a):
            se = [float(np.sqrt(sum(p["se"] ** 2 for p in a)) / len(a)) for a in at]
            ax.fill_between(xs, np.subtract(mean, se), np.add(mean, se), color=line.get_color(), alpha=0.3)
            with_se = True
        if any(len(y) > 1 for y in ys):
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.1)
    for name, points in sorted((reference or {}).items()):
        xs = sorted({p[x] for p in points})
        ys = [[p["score"] for p in points if p[x] == v] for v in xs]
        line, = ax.plot(xs, [float(np.mean(y)) for y in ys], "--", alpha=0.7, label=f"{name} (reference)")
        ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.08)
    ax.set_xlabel("iterations" if x == "iteration" else "transformer NFEs, rollout + learner (cumulative)")
    ax.set_ylabel(ylabel)
    n = max((len({p["seed"] for p in pts}) for pts in curves.values()), default=1)
    bands = (["dark band: ± eval standard error"] if with_se else []) + (["light band: seeds min to max"] if n > 1 else [])
    if n > 1 or bands:
        ax.set_title("; ".join([f"mean over {n} seeds"] + bands), fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over the curves
    fig.tight_layout()
    return _save(plt, fig, out)
