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

import shutil
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.harness import interleaved, parser, set_threads
from flows.reward_server import reward_server_process
from tempflow_core.run import stages
from tempflow_core.config import load_config
from tempflow_core.run.layout import RunLayout
from tempflow_core.algorithm.session import SessionCache
from tempflow_core.shards import read_rollouts, read_scores

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = parser(__doc__, repeats=7, threads=1)
    ap.add_argument("--batch-size", type=int, default=None, help="reward.options.remote.batch_size (default: the option's)")
    ap.add_argument("--in-flight", type=int, default=None, help="reward.options.remote.in_flight (default: the option's)")
    args = ap.parse_args()
    set_threads(args)
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
        for mode, cfg in cfgs.items():  # warm: the session (model + reward) is built once per run
            caches[mode].get(cfg)

        def stage(mode: str):
            return lambda: stages.reward_stage(cfgs[mode], lay, 0, caches[mode])

        def scores(_mode: str) -> np.ndarray:
            return read_scores(lay.store, lay.iteration_prefix(0), "reward").aligned(batch.sample_keys(), "reward")

        times = interleaved({mode: stage(mode) for mode in cfgs}, args.repeats, warmup=1,
                            before=lambda _mode: shutil.rmtree(reward_dir, ignore_errors=True), after=scores)
        same = np.array_equal(times.results["in-process"], times.results["server"])
        for m in cfgs:
            print(f"{m:>10}: reward stage {times.line(m)}")
        print(f"server / in-process: {times.ratio('server', 'in-process'):.2f}x; scores identical: {same}")
        if not same:
            raise SystemExit("the server's scores differ from the in-process reward's")


if __name__ == "__main__":
    main()
