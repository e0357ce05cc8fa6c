"""Short in-process training runs with held-out evaluation: the budget sweep.

Each `--run NAME:override,override,...` trains the config with those overrides through the
product's training loop in process (`train_in_process`: no Prefect, no MLflow, no store) and
evaluates the base model and every `--eval-every` iterations under the config's evaluation
protocol (the EMA weights when EMA is on, as the pipeline does).
Prints the curve with standard errors and appends one JSON line per run to `--out`; each
evaluated point also carries the cumulative rollout and learner NFEs (rows through the
transformer, a CFG pair counted once; the learner's include the KL reference's forward) and
the cumulative seconds spent in rollout, reward and learner up to it.

    python -m benchmarks.sweep --iterations 24 --eval-every 6 \\
        --run fixed-lr3e-4:algorithm=flow_grpo_fixed,train.lr=3e-4 \\
        --run tempflow-lr3e-4:algorithm=tempflow,train.lr=3e-4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from tempflow_core.config import load_config
from tempflow_core.algorithm.train import train_in_process
from tempflow_core.reports.report import eval_score, eval_se


def run(name: str, cfg, eval_every: int, log, point=lambda name, p: None, out_dir: str | None = None) -> dict:
    """The product's in-process training loop (train_in_process) with an evaluation of the base
    model first and every `eval_every` iterations and after the last, each a point of the curve."""
    curve: list[dict] = []
    cost = {"nfe": 0, "learner_nfe": 0, "rollout_s": 0.0, "reward_s": 0.0, "learner_s": 0.0}  # cumulative, training
    last_train = {}

    def scored(result: dict) -> dict[str, float]:
        return {"score": eval_score(cfg.reward.name, result), "se": eval_se(cfg.reward.name, result),
                "reward": result["reward"], "reward_se": result["reward_se"], "categories": result.get("geneval", {})}

    def base(steps) -> None:
        curve.append({"iteration": 0, **scored(steps.evaluate(-1))})
        point(name, curve[-1])
        log(f"{name}: it 0 score {curve[-1]['score']:.3f} ± {curve[-1]['se']:.3f} reward {curve[-1]['reward']:.3f}")

    def iterated(it: int, m: dict[str, float]) -> None:
        cost["rollout_s"] += m["time/rollout_s"]
        cost["reward_s"] += m["time/reward_s"]
        cost["learner_s"] += m["time/learner_s"]
        cost["nfe"] += int(m["rollout/nfe"])
        cost["learner_nfe"] += int(m["learner/nfe"])
        last_train["reward"] = m["reward/mean"]
        log(f"{name}: it {it + 1} train reward {m['reward/mean']:.3f} ratio [{m['train/ratio_min']:.3f}, "
            f"{m['train/ratio_max']:.3f}] clip {m['train/clip_frac']:.3f} kl {m['train/kl']:.2e} "
            f"|g| {m['train/grad_norm']:.2e}")

    started = {}

    def due(it: int) -> bool:
        if (it + 1) % eval_every == 0 or it + 1 == cfg.train.iterations:
            started["eval"] = time.perf_counter()  # the evaluation runs next
            return True
        return False

    def evaluated(it: int, result: dict) -> None:
        curve.append({"iteration": it + 1, "train_reward": last_train["reward"], **cost, **scored(result),
                      "eval_s": time.perf_counter() - started["eval"]})
        point(name, curve[-1])
        log(f"{name}: it {it + 1} eval score {curve[-1]['score']:.3f} ± {curve[-1]['se']:.3f} "
            f"reward {curve[-1]['reward']:.3f}")

    t0 = time.perf_counter()
    train_in_process(cfg, out_dir or tempfile.mkdtemp(prefix=f"sweep-{name}-"), on_iteration=iterated, eval_at=due,
                     on_eval=evaluated, before=base)
    return {"name": name, "curve": curve, "minutes": (time.perf_counter() - t0) / 60,
            "config": cfg.model_dump(mode="json")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="flows/configs/ablation.yaml")
    ap.add_argument("--base", default="flows/configs/default.yaml", help="config the --config file is layered over")
    ap.add_argument("--run", action="append", required=True, help="NAME:override,override,...")
    ap.add_argument("--set", action="append", default=[], help="override for every run")
    ap.add_argument("--iterations", type=int, default=24)
    ap.add_argument("--eval-every", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="sweep.jsonl")
    ap.add_argument("--points", default=None,
                    help="also append each evaluated point as it is measured ({name, point}): a killed sweep keeps its curve")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import yaml

    base = yaml.safe_load(Path(args.base).read_text()) if args.base else None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    def point(name: str, p: dict) -> None:
        if args.points:
            with open(args.points, "a") as f:  # one short append per line: processes may share the file
                f.write(json.dumps({"name": name, "device": device, "point": p}) + "\n")
    for spec in args.run:
        name, _, sets = spec.partition(":")
        overrides = [*args.set, f"train.iterations={args.iterations}", *[x for x in sets.split(",") if x]]
        cfg = load_config(args.config, overrides, base=base)
        result = run(name, cfg, args.eval_every, lambda msg: print(msg, flush=True), point)
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
