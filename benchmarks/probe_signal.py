"""Does one iteration's batch carry a policy-gradient signal?

Two independent rollout batches of the same prompts (different noise), scored and turned into
advantages as in training; the policy-gradient of each at the current LoRA; their cosine,
overall and per denoising step. A cosine near 0 means the batch is too small for the gradient
to point anywhere: Adam then takes full-size steps in a random direction each iteration.

    python -m benchmarks.probe_signal --groups 4,16,48 --algorithms flow_grpo_fixed,tempflow

Prints one line per (algorithm, groups) and the per-step cosines. beta = 0 and ratio = 1 (the
gradient of the first minibatch of an iteration), so this measures the reward signal alone.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from tempflow_core.algorithm.advantages import compute_advantages
from tempflow_core.config import load_config
from tempflow_core.algorithm.learner import build_units, evaluate_units, trained_steps
from tempflow_core.prompts import load_prompts
from tempflow_core.algorithm.session import setup
from tempflow_core.algorithm.iteration import plan_iteration
from tempflow_core.algorithm.train import run_rollout, score_rollout


def grads_by_step(s, batch, rewards, cfg) -> dict[int, torch.Tensor]:
    """{step: flat LoRA gradient of the policy loss of that step's units} (mean over terms)."""
    adv, _ = compute_advantages(rewards, batch.group_ids(), cfg.std_mode, cfg.loss.adv_clip_max)
    steps = trained_steps(batch, cfg.train.train_steps)
    units = build_units(batch, adv, plan_iteration(cfg, s.schedule, 0).weights_of(steps), steps)
    params = list(s.policy.lora_parameters())
    loss_cfg = cfg.loss.model_copy(update={"beta": 0.0})
    out = {}
    n_terms = len(units) * units.children
    for k in steps:
        idx = torch.nonzero(units.step == k).flatten()
        for p in params:
            p.grad = None
        for micro in torch.split(idx, cfg.train.micro_batch):
            terms = evaluate_units(s.policy, units.subset(micro), batch.embeds, s.schedule,
                                   cfg.guidance_scale(), loss_cfg)
            (terms.loss.sum() / n_terms).backward()
        out[k] = torch.cat([p.grad.flatten().clone() for p in params])
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a[None].double(), b[None].double())[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="flows/configs/default.yaml")
    ap.add_argument("--groups", default="4,16,48", help="prompt groups per batch")
    ap.add_argument("--algorithms", default="flow_grpo_fixed,tempflow")
    ap.add_argument("--set", action="append", default=[], help="config override section.field=value")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for algorithm in args.algorithms.split(","):
        for groups in [int(g) for g in args.groups.split(",")]:
            cfg = load_config(args.config, [f"algorithm={algorithm}", f"rollout.prompts_per_iter={groups}", *args.set])
            s = setup(cfg)
            records = load_prompts(cfg.prompts.source)
            rng = np.random.default_rng(0)
            batch_records = [records[i] for i in rng.choice(len(records), groups, replace=False)]
            t0 = time.perf_counter()
            g = []
            rew = []
            for draw in (0, 1):  # two independent noise draws of the same prompts
                batch = run_rollout(s, batch_records, plan_iteration(cfg, s.schedule, 10_000 + draw))
                rewards, _ = score_rollout(s.reward_fn, batch, batch_records)
                rew.append(float(rewards.mean()))
                g.append(grads_by_step(s, batch, rewards, cfg))
            total = [sum(d.values()) for d in g]
            per_step = {k: cosine(g[0][k], g[1][k]) for k in g[0]}
            print(f"{algorithm:16s} groups {groups:3d} x K {cfg.rollout.group_size}: cos(g1, g2) = "
                  f"{cosine(*total):+.3f}  |g| {float(total[0].norm()):.2e}  reward {rew[0]:.3f}/{rew[1]:.3f}  "
                  f"per step " + " ".join(f"{k}:{c:+.2f}" for k, c in per_step.items())
                  + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
