"""Seconds per training iteration, by stage, in-process (no Prefect, no MLflow).

Loads the ablation config (flows/configs/ablation.yaml over the embedded default), applies the
overrides and times `run_rollout`, `score_rollout` and `run_update` for a few iterations.
Used to pick the ablation's world (README "Results": the 32 px base against the 64 px one):

    OMP_NUM_THREADS=1 python benchmarks/bench_iteration.py --set model.path=models/tiny-shapes-sd3 &
    OMP_NUM_THREADS=1 python benchmarks/bench_iteration.py --set model.path=models/tiny-shapes-sd3-32
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml

from tempflow_core.config import load_config
from tempflow_core.algorithm.session import setup
from tempflow_core.algorithm.train import run_rollout, run_update, score_rollout

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "flows/configs/ablation.yaml"))
    ap.add_argument("--base", default=str(ROOT / "flows/configs/default.yaml"))
    ap.add_argument("--set", action="append", default=[], help="override, e.g. algorithm=flow_grpo_fixed")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer's forward first")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set, base=yaml.safe_load(Path(args.base).read_text()))
    s = setup(cfg)
    if args.compile:
        s.policy.transformer.forward = torch.compile(s.policy.transformer.forward, dynamic=True)
    rows = []
    for it in range(args.iterations):
        records = s.stream.next_batch(cfg.rollout.prompts_per_iter)
        t0 = time.perf_counter()
        batch = run_rollout(s, records, it)
        t1 = time.perf_counter()
        rewards, _ = score_rollout(s.reward_fn, batch, records)
        t2 = time.perf_counter()
        run_update(s, batch, rewards)
        t3 = time.perf_counter()
        rows.append((t1 - t0, t2 - t1, t3 - t2))
        print(f"{cfg.model.path} {cfg.algorithm} iteration {it}: rollout {t1 - t0:.1f} s, reward {t2 - t1:.1f} s, "
              f"learner {t3 - t2:.1f} s ({batch.nfe} rollout rows)", flush=True)
    mean = [statistics.mean(c) for c in zip(*rows)]
    print(f"mean over {len(rows)}: rollout {mean[0]:.1f} s, reward {mean[1]:.1f} s, learner {mean[2]:.1f} s, "
          f"iteration {sum(mean):.1f} s")


if __name__ == "__main__":
    main()
