"""The reward stage through a reward server against the in-process reward.

One real rollout of the embedded default's batch (4 prompts x K 4 on the shipped base model)
is written to a local store once; then the reward stage (`tempflow_core.run.stages.reward_stage`:
read the shards with their images, score, write the scores) runs `--repeats` times with
`reward.name=shapes` in-process and with `reward.name=remote` against a `tempflow
reward-server --reward shapes` process on 127.0.0.1, alternating, each mode with its own
warm session. Prints the median stage seconds of each and their ratio, and checks that both
give the same scores.

    python -m benchmarks.bench_reward_server [--repeats 7] [--threads 1] [--batch-size N] [--in-flight N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flows.reward_server import reward_server_process
from tempflow_core.run import stages
from tempflow_core.config import load_config
from tempflow_core.run.layout import RunLayout
from tempflow_core.algorithm.session import SessionCache
from tempflow_core.shards import read_rollouts, read_scores

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads here and in the server")
    ap.add_argument("--batch-size", type=int, default=None, help="reward.options.remote.batch_size (default: the option's)")
    ap.add_argument("--in-flight", type=int, default=None, help="reward.options.remote.in_flight (default: the option's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with reward_server_process("shapes", threads=args.threads, timeout=120) as url, \
            tempfile.TemporaryDirectory(prefix="bench-reward-") as tmpdir:
        tmp = Path(tmpdir)
        base = ["model.path=" + str(ROOT / "models" / "tiny-shapes-sd3"), f"pipeline.store={tmp}"]
        cfgs = {"in-process": load_config(ROOT / "flows/configs/default.yaml", base),
                "server": load_config(ROOT / "flows/configs/default.yaml", base + [
                    "reward.name=remote", f"reward.options.remote.url={url}",
                    *([f"reward.options.remote.batch_size={args.batch_size}"] if args.batch_size else []),
                    *([f"reward.options.remote.in_flight={args.in_flight}"] if args.in_flight else [])])}
        caches = {mode: SessionCache() for mode in cfgs}
        lay = RunLayout.open(cfgs["in-process"], "bench")
        stages.init_stage(cfgs["in-process"], lay, caches["in-process"])
        stages.rollout_stage(cfgs["in-process"], lay, 0, caches["in-process"])
        batch = read_rollouts(lay.store, lay.prefix(0, "rollout"), images=True)
        print(f"rollout: {len(batch.sample_keys())} images of {batch.images().shape[1]} px, server at {url}")
        reward_dir = tmp / lay.prefix(0, "reward")
        times: dict[str, list[float]] = {m: [] for m in cfgs}
        scores: dict[str, np.ndarray] = {}
        for mode, cfg in cfgs.items():  # warm: the session (model + reward) is built once per run
            caches[mode].get(cfg)
        for rep in range(args.repeats + 1):  # the first round is a warm-up, not counted
            for mode, cfg in cfgs.items():
                shutil.rmtree(reward_dir, ignore_errors=True)
                t = time.perf_counter()
                stages.reward_stage(cfg, lay, 0, caches[mode])
                if rep:
                    times[mode].append(time.perf_counter() - t)
                keys = batch.sample_keys()
                scores[mode] = read_scores(lay.store, lay.iteration_prefix(0), "reward").aligned(keys, "reward")
        same = np.array_equal(scores["in-process"], scores["server"])
        med = {m: statistics.median(v) for m, v in times.items()}
        for m, v in times.items():
            print(f"{m:>10}: reward stage median {med[m]:.3f} s (min {min(v):.3f}, max {max(v):.3f}, n {len(v)})")
        print(f"server / in-process: {med['server'] / med['in-process']:.2f}x; scores identical: {same}")
        if not same:
            raise SystemExit("the server's scores differ from the in-process reward's")


if __name__ == "__main__":
    main()
