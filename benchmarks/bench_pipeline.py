"""Orchestration overhead: one iteration through Prefect + MLflow + store vs train_in_process.

    .venv/bin/python -m benchmarks.bench_pipeline [--iterations 3] [--set key=value ...]

Both sides run the same config on the same tiny model in this process. The per-iteration
cost is the marginal time of extra iterations ((t_N - t_1) / (N - 1)), so model loading and
the Prefect server start are excluded on both sides. The Prefect side runs against a
temporary server (prefect_test_harness), MLflow on sqlite, the store in a temp folder.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from flows.train import train_flow
    from tempflow_core.run import stages
    from tempflow_core.run.layout import RunLayout
    from tempflow_core.algorithm.session import setup
    from tempflow_core.config import load_config
    from tempflow_core.algorithm.train import train_in_process

    tmp = tempfile.mkdtemp(prefix="tempflow-bench-")
    base = ["rollout.prompts_per_iter=4", "rollout.group_size=6", "sampling.num_steps=10", "lora.rank=8",
            "lora.alpha=16", "eval.max_prompts=4", "pipeline.grid_every=0", f"output_dir={tmp}/runs",
            f"pipeline.store={tmp}/store"] + args.overrides

    def cfg(n: int):
        return load_config(overrides=base + [f"train.iterations={n}"])

    setup(cfg(1))  # load the model once (warm file caches), outside every timing
    results: dict[str, dict[int, float]] = {"in-process": {}, "pipeline": {}}
    breakdown = {}
    with prefect_test_harness(server_startup_timeout=120):
        train_flow(config=cfg(1), run_id="warmup")
        for n in (1, args.iterations):  # interleave the two sides
            t0 = time.perf_counter()
            train_in_process(cfg(n), f"{tmp}/inproc-{n}")  # model load cancels out in the marginal cost
            results["in-process"][n] = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = train_flow(config=cfg(n), run_id=f"bench-{n}")
            results["pipeline"][n] = time.perf_counter() - t0
            breakdown[n] = out
    per = {k: (v[args.iterations] - v[1]) / (args.iterations - 1) for k, v in results.items()}
    lay = RunLayout.open(cfg(args.iterations), f"bench-{args.iterations}")
    m = stages.checkpoint_metrics(lay, args.iterations - 1)
    print(f"per-iteration wall time (marginal over {args.iterations - 1} extra iterations; eval only at the end):")
    print(f"  in-process (train_in_process): {per['in-process']:.2f} s")
    print(f"  Prefect + MLflow + store     : {per['pipeline']:.2f} s")
    print(f"  overhead ratio               : {per['pipeline'] / per['in-process']:.3f}")
    print(f"  compute inside the pipeline's last iteration: rollout {m['time/rollout_s']:.2f} s, "
          f"learner {m['time/learner_s']:.2f} s")
    print(f"  the rest ({per['pipeline'] - m['time/rollout_s'] - m['time/learner_s']:.2f} s) is task "
          "orchestration, shard/checkpoint I/O, reward scoring and MLflow logging")


if __name__ == "__main__":
    main()
