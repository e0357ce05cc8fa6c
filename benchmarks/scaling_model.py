"""Minutes per iteration on one H200 at the paper's batch, per cost setting: the scaling model of
docs/ray.md evaluated from each setting's transformer rows.

    python -m benchmarks.scaling_model [--prompts 48] [--group-size 24] [--steps 10]

Rows per iteration come from the rollout's and the learner's arithmetic (the counts the
`rollout/nfe` and `learner/nfe` metrics report, tested against real rollouts); a random branch
draw is averaged over 2000 iterations' draws. Per-row costs are the ones `benchmarks/gpu_smoke.py`
measured on one H200 for SD3.5-M at 512 px in bf16 (`results/gpu/smoke/sd35m_mb8.json`): a
rollout NFE (a CFG pair) and a learner unit (one x with its children: forward with grad, the
reference's forward, backward). Without CFG a row is assumed to cost half a CFG pair (one row
of two); that, and the sum of the terms, are assumptions, not measurements. Reward models and
orchestration are left out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tempflow_core.config import load_config
from tempflow_core.presets import PRESETS
from tempflow_core.run.plan import rows_per_iteration as plan_rows

ROOT = Path(__file__).resolve().parents[1]

SMOKE = ROOT / "results" / "gpu" / "smoke" / "sd35m_mb8.json"
FAST = PRESETS["fast"]  # the preset's branch points and share of the iterations

# (label, settings): the settings that differ from default tempflow
SETTINGS: list[tuple[str, dict]] = [
    ("tempflow (all branch points)", {}),
    ("rollout.branch_steps=3 (uniform)", {"m": 3, "draw": "uniform"}),
    ("rollout.branch_steps=3, branch_draw=weighted", {"m": 3, "draw": "weighted"}),
    ("rollout.branch_steps=3, branch_draw=window", {"m": 3, "draw": "window"}),
    ("rollout.branch_steps=[0,1,2,3] (`--preset fast` per iteration)", {"steps": list(FAST.branch_steps)}),
    ("rollout.branch_steps=[0,1] (an ODE after two branch points)", {"steps": [0, 1]}),
    ("rollout.branch_steps=[0] (an ODE after the noisiest step)", {"steps": [0]}),
    ("rollout.completion_stride=2", {"stride": 2}),
    ("sampling.guidance_scale=1 (no CFG)", {"cfg_free": True}),
    ("flow_grpo_fixed (plain SDE trajectories)", {"plain": True}),
]


def rows_per_iteration(T: int, K: int, B: int, setting: dict, iterations: int = 2000) -> tuple[float, float]:
    """Expected rollout NFEs and learner units of one iteration (NFE: a CFG pair counts once), by
    the product's own arithmetic (`tempflow_core.run.plan.rows_per_iteration`) on the setting's config."""
    sets = [f"sampling.num_steps={T}", f"rollout.group_size={K}", f"rollout.prompts_per_iter={B}"]
    if setting.get("plain"):
        sets.append("algorithm=flow_grpo_fixed")
    if "m" in setting:
        sets += [f"rollout.branch_steps={setting['m']}", f"rollout.branch_draw={setting['draw']}"]
    if "steps" in setting:
        sets.append(f"rollout.branch_steps={list(setting['steps'])}")
    sets.append(f"rollout.completion_stride={setting.get('stride', 1)}")
    return plan_rows(load_config(overrides=sets), iterations)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--group-size", type=int, default=24)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    smoke = json.loads(SMOKE.read_text())
    c_f = smoke["rollout_s"] / smoke["rollout_nfe"]  # seconds per rollout NFE (a CFG pair)
    c_u = smoke["learner_s"] / smoke["learner_units"]  # seconds per learner unit
    T, K, B = args.steps, args.group_size, args.prompts
    print(f"SD3.5-M, 512 px, bf16, one H200: {c_f * 1e3:.1f} ms per rollout NFE (a CFG pair), "
          f"{c_u * 1e3:.1f} ms per learner unit ({SMOKE.relative_to(ROOT)}); "
          f"{B} prompts, K = {K}, T = {T}\n")
    print("| setting | rollout NFEs | learner units | rows (CFG pair = 2) | rollout min | learner min | "
          "iteration min | of tempflow's |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base, fast = None, None
    for label, setting in SETTINGS:
        nfe, units = rows_per_iteration(T, K, B, setting)
        per = 1 if setting.get("cfg_free") else 2  # transformer rows per NFE
        roll, learn = nfe * c_f * per / 2 / 60, units * c_u * per / 2 / 60
        total = roll + learn
        base = base or total
        fast = total if setting.get("steps") == list(FAST.branch_steps) else fast
        print(f"| {label} | {nfe:,.0f} | {units:,.0f} | {(nfe + 2 * units) * per:,.0f} | {roll:.1f} | {learn:.1f} | "
              f"{total:.1f} | {total / base:.2f} |")
    print(f"\n`--preset fast` runs {FAST.iterations:g} of the iterations: over a run "
          f"{fast * FAST.iterations / base:.2f} of tempflow's minutes")
    print("\nrows: transformer rows as the `rollout/rows` and `learner/rows` metrics count them: rollout NFEs and "
          "the learner's two forwards per unit (with grad, and the KL reference's), each times 2 under CFG")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
