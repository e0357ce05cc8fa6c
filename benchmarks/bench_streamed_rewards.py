"""Streamed rewards against scoring after the rollout, with a slow reward behind a reward server.

The embedded default's run (the shipped 64 px base, 4 prompts x K 4, T = 6) with its rollout cut
into `--slices` slices and `reward.name=remote` against a `tempflow reward-server` serving
`heavy_shapes` (benchmarks/heavy_reward.py: `shapes` plus a wait of `--seconds-per-image`, a
reward model elsewhere). `--iterations` iterations through the local engine, once with
`reward.stream=false` and once with `true`, alternating `--repeats` times, each in a fresh store;
prints the median seconds per iteration of each (rollout, reward, learner stages and their sum),
the ratio, and checks that the scores and the final LoRA are the same bit for bit.

    python -m benchmarks.bench_streamed_rewards [--slices 4] [--seconds-per-image 0.05] [--repeats 3]
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import TimedStages, parser, set_threads
from flows.reward_server import reward_server_process
from tempflow_core.algorithm.controller import Hooks, train
from tempflow_core.algorithm.session import SessionCache
from tempflow_core.config import load_config
from tempflow_core.engines.engine import LocalEngine
from tempflow_core.engines.stored_run import StoredRun
from tempflow_core.run.layout import RunLayout
from tempflow_core.shards import read_scores

ROOT = Path(__file__).resolve().parents[1]


def run(cfg) -> tuple[list[dict[str, float]], list[np.ndarray], dict[str, torch.Tensor]]:
    """The product's training controller on the run's stored stages (no evaluation): stage seconds
    per iteration, the scores of each iteration and the final LoRA."""
    lay, sessions, engine = RunLayout.open(cfg, "bench"), SessionCache(), LocalEngine()
    timed, scores = TimedStages(StoredRun(cfg, lay, sessions, engine)), []

    def scored(it: int, metrics: dict[str, float]) -> None:
        scores.append(read_scores(lay.store, lay.iteration_prefix(it), "reward").values["reward"])

    try:
        train(cfg, timed, Hooks(on_iteration=scored, eval_at=lambda it: False))
    finally:
        engine.close()
    return timed.seconds, scores, sessions.get(cfg).policy.lora_state_dict()


def main() -> None:
    ap = parser(__doc__, repeats=3, threads=2)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--seconds-per-image", type=float, default=0.05)
    ap.add_argument("--iterations", type=int, default=3)
    args = ap.parse_args()
    set_threads(args)
    with reward_server_process("heavy_shapes", [f"seconds_per_image={args.seconds_per_image}"], threads=1,
                               timeout=120, plugins=["benchmarks.heavy_reward"]) as url:
        per_mode: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        results = {}
        for r in range(args.repeats):
            for stream in (False, True):
                with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
                    cfg = load_config(ROOT / "flows/configs/default.yaml", [
                        "model.path=" + str(ROOT / "models" / "tiny-shapes-sd3"), f"pipeline.store={tmp}",
                        f"rollout.slices={args.slices}", "reward.name=remote", f"reward.options.remote.url={url}",
                        f"reward.stream={str(stream).lower()}", f"train.iterations={args.iterations}"])
                    times, scores, lora = run(cfg)
                per_mode[stream] += times[1:]  # the first iteration also loads the model
                results.setdefault(stream, (scores, lora))
                print(f"repeat {r} stream={stream}: " + ", ".join(f"{t['iteration']:.2f}" for t in times) + " s",
                      flush=True)
    (sa, la), (sb, lb) = results[False], results[True]
    same = all(np.array_equal(x, y) for x, y in zip(sa, sb)) and all(torch.equal(la[k], lb[k]) for k in la)
    print(f"\n{args.slices} slices, {args.seconds_per_image} s per image in the reward server, "
          f"{args.iterations - 1} timed iterations x {args.repeats} repeats per mode (median s):\n")
    print("| mode | rollout | reward | learner | iteration |")
    print("|---|---:|---:|---:|---:|")
    med = {m: {k: statistics.median(t[k] for t in per_mode[m]) for k in ("rollout", "reward", "learner", "iteration")}
           for m in per_mode}
    for m, name in ((False, "scored after the rollout"), (True, "reward.stream")):
        print(f"| {name} | {med[m]['rollout']:.2f} | {med[m]['reward']:.2f} | {med[m]['learner']:.2f} | "
              f"{med[m]['iteration']:.2f} |")
    print(f"\niteration time, streamed / after: {med[True]['iteration'] / med[False]['iteration']:.2f}; "
          f"the reward's share of an iteration scored after: {med[False]['reward'] / med[False]['iteration']:.2f}")
    print(f"scores and final LoRA identical: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
