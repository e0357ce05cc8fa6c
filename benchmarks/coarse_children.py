"""Coarse completion of children: do cheap children rank a group like full ones?

    python -m benchmarks.coarse_children --strides 1,2,3,5 --seeds 4 --out results/coarse-children
    python -m benchmarks.coarse_children --out results/coarse-children --report-only

On the base model (no training), every training prompt is rolled out with branching at every
trainable step, once per stride of `rollout.completion_stride`, from the same noise: the
backbone, each branch point's x_k and its K children's SDE steps are the same tensors at
every stride (tests/algorithm/test_rollout.py), only the children's ODE completion differs.
Each child's image is scored with the run's reward. Against stride 1 (the full children),
per branch step and stride: the mean Spearman rho within groups, the share of children whose
group-normalised advantage keeps its sign, the cosine of the advantage vectors, and the
transformer rows the rollout took (CFG pairs as one row, as `rollout/nfe`).

Writes `children.jsonl` (one line per child and stride: rollout seed, prompt, branch step,
child, stride, reward, the rollout's rows) and `summary.md`, which `--report-only` recomputes
from `children.jsonl` alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from tempflow_core.algorithm.rollout import branched_rollout
from tempflow_core.algorithm.session import setup
from tempflow_core.algorithm.steps import default_steps
from tempflow_core.algorithm.train import batch_prompt_ids, score_rollout
from tempflow_core.config import load_config
from tempflow_core.prompts import load_prompts
from tempflow_core.reports.agreement import agreement
from tempflow_core.seeding import derive_seed

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_SET = ["model.path=models/tiny-shapes-sd3", "reward.name=shapes"]


def measure(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    base = yaml.safe_load((ROOT / "flows" / "configs" / "default.yaml").read_text())  # as `tempflow` layers it
    cfg = load_config(ROOT / args.config, DEFAULT_SET + args.set, base=base)
    s = setup(cfg, Path(args.work) / "tokenizer")
    records = load_prompts(cfg.prompts.source)
    T, K = s.schedule.num_steps, cfg.rollout.group_size
    steps = default_steps(T)
    out = []
    for r in range(args.seeds):
        seed = derive_seed(cfg.train.seed, "coarse-children", r)
        ids = batch_prompt_ids(records)
        for stride in args.strides:
            batch = branched_rollout(s.policy, [p.text for p in records], ids, s.schedule, steps, K,
                                     cfg.guidance_scale(), seed, cfg.rollout.max_batch, stride=stride)
            rewards, _ = score_rollout(s.reward_fn, batch, records)
            for n, key in enumerate(batch.sample_keys()):
                bp = batch.branch_points[n // K]
                out.append({"seed": r, "prompt": records[bp.prompt_index].text, "prompt_id": bp.prompt_id,
                            "step": bp.step, "child": n % K, "stride": stride, "reward": round(float(rewards[n]), 6),
                            "rollout_rows": batch.nfe, "prompts": len(records), "T": T, "K": K})
            print(f"seed {r} stride {stride}: rows {batch.nfe}, mean reward {rewards.mean():.3f}", flush=True)
    return out


def summarize(children: list[dict]) -> str:
    strides = sorted({c["stride"] for c in children})
    steps = sorted({c["step"] for c in children})
    full = {(c["seed"], c["prompt_id"], c["step"], c["child"]): c["reward"] for c in children if c["stride"] == 1}
    rows = {}
    for c in children:
        rows.setdefault(c["stride"], {})[c["seed"]] = c["rollout_rows"] / c["prompts"]
    first = children[0]
    lines = [
        "# Coarse completion: cheap children against full ones",
        "",
        f"Base model, {first['prompts']} prompts x {len(rows[1])} rollout seeds, T = {first['T']}, "
        f"K = {first['K']}, branching at steps {steps[0]}..{steps[-1]}. Rows: transformer rows per prompt "
        "(backbone + children; CFG pairs as one). rho: mean Spearman within groups that have a spread under "
        "both completions (how many in brackets). Sign: share of children with a nonzero full advantage whose "
        "cheap advantage has its sign. Cosine: of the group-normalised advantage vectors. Zero-std: share of "
        "groups without a spread (no signal), cheap.",
        "",
        "## All branch steps",
        "",
        "| stride | rows / prompt | of full | mean reward | rho | sign | cosine | zero-std |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def agree(stride: int, step: int | None):
        sel = [c for c in children if c["stride"] == stride and (step is None or c["step"] == step)]
        keys = [(c["seed"], c["prompt_id"], c["step"], c["child"]) for c in sel]
        groups = [f"{k[0]}/{k[1]}/{k[2]}" for k in keys]
        cheap = np.array([c["reward"] for c in sel])
        return agreement(np.array([full[k] for k in keys]), cheap, groups), float(cheap.mean())

    full_rows = float(np.mean(list(rows[1].values())))
    for st in strides:
        a, mean = agree(st, None)
        r = float(np.mean(list(rows[st].values())))
        lines.append(f"| {st} | {r:.1f} | {r / full_rows:.2f} | {mean:.3f} | {a.spearman:.3f} ({a.ranked_groups}) | "
                     f"{a.sign_agreement:.3f} | {a.adv_cosine:.3f} | {a.zero_std_cheap:.3f} |")
    lines += ["", "## Per branch step (rho / sign / cosine)", "",
              "| stride | " + " | ".join(f"step {k}" for k in steps) + " |",
              "|---:|" + "---:|" * len(steps)]
    for st in strides:
        cells = []
        for k in steps:
            a, _ = agree(st, k)
            cells.append(f"{a.spearman:.2f} / {a.sign_agreement:.2f} / {a.adv_cosine:.2f}")
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="flows/configs/ablation.yaml")
    ap.add_argument("--set", action="append", default=[], help="config override, KEY=VALUE (repeatable)")
    ap.add_argument("--strides", default="1,2,3,5", type=lambda v: [int(x) for x in v.split(",")])
    ap.add_argument("--seeds", type=int, default=4, help="rollout seeds (each rolls out every prompt)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/tempflow-coarse-children")
    ap.add_argument("--out", required=True)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    path = out / "children.jsonl"
    if args.report_only:
        if not path.is_file():
            print(f"{path} does not exist: run without --report-only first", file=sys.stderr)
            return 2
        children = [json.loads(line) for line in path.read_text().splitlines()]
    else:
        if 1 not in args.strides:
            print("--strides must include 1 (the full children the others are compared with)", file=sys.stderr)
            return 2
        children = measure(args)
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(c) + "\n" for c in children))
        tmp.replace(path)
    text = summarize(children)
    tmp = (out / "summary.md").with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out / "summary.md")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
