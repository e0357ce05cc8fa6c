"""Seconds per training iteration, by stage, in-process (no Prefect, no MLflow).

Loads the ablation config (flows/configs/ablation.yaml over the embedded default), applies the
overrides and times the rollout, reward and update of a few iterations of the product's
in-process training loop (`train_in_process`).
Used to pick the ablation's world (README "Results": the 32 px base against the 64 px one):

    OMP_NUM_THREADS=1 python -m benchmarks.bench_iteration --set model.path=models/tiny-shapes-sd3 &
    OMP_NUM_THREADS=1 python -m benchmarks.bench_iteration --set model.path=models/tiny-shapes-sd3-32
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
import yaml

from benchmarks.harness import parser, set_threads
from tempflow_core.config import load_config
from tempflow_core.algorithm.train import train_in_process

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = parser(__doc__, threads=1)
    ap.add_argument("--config", default=str(ROOT / "flows/configs/ablation.yaml"))
    ap.add_argument("--base", default=str(ROOT / "flows/configs/default.yaml"))
    ap.add_argument("--set", action="append", default=[], help="override, e.g. algorithm=flow_grpo_fixed")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer's forward first")
    args = ap.parse_args()
    set_threads(args)
    cfg = load_config(args.config, [*args.set, f"train.iterations={args.iterations}"],
                      base=yaml.safe_load(Path(args.base).read_text()))
    rows = []

    def before(steps) -> None:
        if args.compile:
            steps.s.policy.transformer.forward = torch.compile(steps.s.policy.transformer.forward, dynamic=True)

    def timed(it: int, m: dict[str, float]) -> None:
        rows.append((m["time/rollout_s"], m["time/reward_s"], m["time/learner_s"]))
        print(f"{cfg.model.path} {cfg.algorithm} iteration {it}: rollout {rows[-1][0]:.1f} s, reward {rows[-1][1]:.1f} s, "
              f"learner {rows[-1][2]:.1f} s ({int(m['rollout/nfe'])} rollout rows)", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-iteration-") as out:
        train_in_process(cfg, out, on_iteration=timed, before=before)
    mean = [statistics.mean(c) for c in zip(*rows)]
    print(f"mean over {len(rows)}: rollout {mean[0]:.1f} s, reward {mean[1]:.1f} s, learner {mean[2]:.1f} s, "
          f"iteration {sum(mean):.1f} s")


if __name__ == "__main__":
    main()
