"""Comparisons beyond the headline's fixed pairs: every pair of variants at the final
iteration, paired by seed, and the headline pair (tempflow against flow_grpo_fixed) at every
evaluated iteration.

Inputs are the plain dicts of report.py (``headline``'s finals, the curves' points); outputs
rows of numbers and their markdown. The test is the verdicts' own (``report.paired_verdict``),
so a pair called 'beyond' here is one the verdicts would call clear.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tempflow_core.reports import report

HEADLINE_PAIR = ("tempflow", "flow_grpo_fixed")


def paired_difference(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, Any] | None:
    """a - b over the seeds both have (seed -> score): the mean difference, its standard error
    over those seeds (sample std / sqrt(n); None with one seed), the seeds where a is higher
    and how many were compared. None when no seed is shared."""
    seeds = sorted(set(a) & set(b), key=str)
    if not seeds:
        return None
    d = np.array([a[s] - b[s] for s in seeds], dtype=float)
    n = len(seeds)
    return {"diff": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
            "won": int((d > 0).sum()), "n": n}


def all_pairs(finals: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every pair of variants of ``headline(curves)["finals"]``, later minus earlier in the
    finals' order (for the ablation: flow_grpo, flow_grpo_fixed, reweight, branch, tempflow),
    by the verdicts' paired test (``report.paired_verdict``: 'clear' None below 4 seeds)."""
    names = list(finals)
    rows = []
    for j, a in enumerate(names):
        for b in names[:j]:
            res = report.paired_verdict(finals[a]["per_seed"], finals[b]["per_seed"], finals[a].get("se"),
                                        finals[b].get("se"))
            if res is None:
                continue
            rows.append({"a": a, "b": b, "diff": res.diff, "won": res.won, "n": res.seeds,
                         **report.verdict_fields(res), "iteration": finals[a]["iteration"]})
    return rows


def all_pairs_markdown(rows: list[dict[str, Any]]) -> str:
    """The all-pairs rows as a markdown section ('' when there is no pair)."""
    if not rows:
        return ""
    its = sorted({r["iteration"] for r in rows})
    where = f"at iteration {its[0]:g}" if len(its) == 1 else "at each variant's last evaluation"
    lines = [f"### Every pair of variants {where}", "",
             ("First named minus second: the mean over the seeds both ran of the per-seed difference, its standard "
              "error (the seeds' spread and the evaluation's, sqrt(se_a^2 + se_b^2)), the t-test's p and the seeds "
              "the first won; beyond the noise only from 4 seeds and p < 0.05."), "",
             "| pair | difference | standard error | p | seeds won | verdict |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['a']} - {r['b']} | {r['diff']:+.4f} | {r['se']:.4f} | {r['p']:.3f} | {r['won']}/{r['n']} | "
                     f"{report.noise_words(r)} |")
    return "\n".join(lines) + "\n"


def _seed_stats(scores: Mapping[str, float]) -> dict[str, Any]:
    """Mean, sample std (0 with one seed) and count of per-seed scores."""
    xs = np.array(list(scores.values()), dtype=float)
    return {"mean": float(xs.mean()), "std": float(xs.std(ddof=1)) if len(xs) > 1 else 0.0, "n": len(xs)}


def _by_iteration(points: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """iteration -> {seed: score} of one variant's points."""
    out: dict[int, dict[str, float]] = {}
    for p in points:
        out.setdefault(p["iteration"], {})[str(p["seed"])] = float(p["score"])
    return out


def per_iteration(curves: Mapping[str, list[dict[str, Any]]], a: str, b: str) -> list[dict[str, Any]]:
    """a against b at every iteration after the base that both evaluated: each one's mean,
    seed std and seed count (seeds that stopped earlier are left out at later iterations);
    the difference of the means with its standard error over seeds, sqrt(sd_a^2/n_a +
    sd_b^2/n_b) (None when either has one seed); and the difference paired by seed."""
    pa, pb = _by_iteration(curves[a]), _by_iteration(curves[b])
    rows = []
    for it in sorted(set(pa) & set(pb)):
        if it == 0:
            continue
        sa, sb = _seed_stats(pa[it]), _seed_stats(pb[it])
        se = (float(np.sqrt(sa["std"] ** 2 / sa["n"] + sb["std"] ** 2 / sb["n"]))
              if sa["n"] > 1 and sb["n"] > 1 else None)
        rows.append({"iteration": it, "a": sa, "b": sb, "diff": sa["mean"] - sb["mean"], "se": se,
                     "paired": paired_difference(pa[it], pb[it])})
    return rows


def per_iteration_markdown(curves: Mapping[str, list[dict[str, Any]]], label: str,
                           dense: Mapping[str, list[dict[str, Any]]] | None = None,
                           pair: tuple[str, str] = HEADLINE_PAIR) -> str:
    """The pair per iteration as a markdown section, judged by ``label`` (and by the dense
    reward's curves when given); '' when either variant is missing."""
    a, b = pair
    if a not in curves or b not in curves:
        return ""
    rows = per_iteration(curves, a, b)
    if not rows:
        return ""
    extra = {r["iteration"]: r for r in per_iteration(dense, a, b)} if dense else {}
    head = (f"| iteration | {a} (mean ± seed std, seeds) | {b} (mean ± seed std, seeds) | difference (standard error) "
            f"| paired by seed: difference (standard error), seeds won |"
            + (" shapes reward difference (standard error) |" if dense else ""))
    lines = [f"## {a} - {b} per iteration", "",
             (f"Judged by {label}; the difference of the seed means with its standard error over seeds "
              "(sqrt(sd_a^2/n_a + sd_b^2/n_b)), and the same paired by seed over the seeds both reached."), "",
             head, "|---|---|---|---|---|" + ("---|" if dense else "")]

    def cell(s: dict[str, Any]) -> str:
        return f"{s['mean']:.3f} ± {s['std']:.3f} ({s['n']})"

    def diff(r: dict[str, Any] | None) -> str:
        return "" if r is None else f"{r['diff']:+.4f}" + ("" if r["se"] is None else f" ({r['se']:.4f})")

    for r in rows:
        p = r["paired"]
        won = "" if p is None else f"{diff(p)}, {p['won']}/{p['n']}"
        line = f"| {r['iteration']:g} | {cell(r['a'])} | {cell(r['b'])} | {diff(r)} | {won} |"
        if dense:
            line += f" {diff(extra.get(r['iteration']))} |"
        lines.append(line)
    return "\n".join(lines) + "\n"
