"""One training iteration on the Ray engine (1 worker per stage) against the local engine.

Both engines run the same stages (tempflow_core.run.stages) on the same config and store layout;
iteration 0 warms up (model loads, Ray actors start) and iteration 1 is timed per stage.
Prints the wall time of each stage on each engine, their ratio, and the bytes an iteration
moves: the LoRA each rollout actor and learner rank loads from the store, the shards, the
reward scores and the checkpoint written.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_engine                      # shipped 32 px model
    OMP_NUM_THREADS=1 python -m benchmarks.bench_engine --set rollout.prompts_per_iter=8
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.harness import TimedStages, parser, set_threads
from tempflow_core.config import load_config
from tempflow_core.algorithm.controller import Hooks, train
from tempflow_core.engines.engine import Engine, LocalEngine
from tempflow_core.engines.stored_run import StoredRun
from tempflow_core.run.layout import RunLayout
from tempflow_core.algorithm.session import SessionCache
from tempflow_core.shards import read_manifest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("rollout", "reward", "learner")


def _bytes(lay: RunLayout, it: int, cfg) -> dict[str, int]:
    def total(prefix: str) -> int:
        m = read_manifest(lay.store, prefix)
        return sum(s.bytes for s in m.shards) + sum(o.bytes for o in m.objects.values()) if m else 0

    scores = sum(len(lay.store.get_bytes(k)) for k in lay.store.list(lay.prefix(it, "reward")))
    ckpt = total(lay.prefix(it, "learner"))
    return {"checkpoint read by each rollout actor and learner rank": total(lay.prefix(it - 1, "learner")),
            "shards + embeddings written": total(lay.prefix(it, "rollout")), "reward scores": scores,
            "checkpoint written": ckpt}


def main() -> None:
    ap = parser(__doc__, threads=1)
    ap.add_argument("--config", default=str(ROOT / "flows/configs/ablation.yaml"))
    ap.add_argument("--base", default=str(ROOT / "flows/configs/default.yaml"))
    ap.add_argument("--set", action="append", default=[], help="override, e.g. rollout.prompts_per_iter=8")
    args = ap.parse_args()
    set_threads(args)
    os.environ["TEMPFLOW_WORKER_THREADS"] = str(args.threads)
    store = tempfile.mkdtemp(prefix="bench-engine-")
    walls: dict[str, dict[str, float]] = {}
    for engine_name in ("local", "ray"):
        cfg = load_config(args.config, [*args.set, f"pipeline.engine={engine_name}", f"pipeline.store={store}",
                                        "eval.every=0", "train.iterations=2"], base=yaml.safe_load(Path(args.base).read_text()))
        lay = RunLayout.open(cfg, f"bench-{engine_name}")
        sessions = SessionCache()
        engine: Engine = LocalEngine()
        cluster = contextlib.ExitStack()
        t = time.perf_counter()
        if engine_name == "ray":
            from flows.ray_head import ray_cluster
            from tempflow_core.engines.ray_engine import RayEngine

            engine = RayEngine(cfg, cluster.enter_context(ray_cluster(max(2, RayEngine.cpus_needed(cfg)))))
        startup = time.perf_counter() - t
        timed = TimedStages(StoredRun(cfg, lay, sessions, engine))
        train(cfg, timed, Hooks(eval_at=lambda it: False))  # the product's controller; iteration 0 warms up
        walls[engine_name] = timed.seconds[1]
        engine.close()
        cluster.close()
        sessions.clear()
        print(f"{engine_name}: engine start {startup:.1f} s; iteration 1: " +
              ", ".join(f"{s} {walls[engine_name][s]:.2f} s" for s in STAGES), flush=True)
    for s in STAGES:
        print(f"  {s:8s} local {walls['local'][s]:7.2f} s   ray {walls['ray'][s]:7.2f} s   "
              f"ratio {walls['ray'][s] / walls['local'][s]:.2f}x")
    lw, rw = walls["local"]["iteration"], walls["ray"]["iteration"]  # the sum of the stages
    print(f"  iteration local {lw:.2f} s   ray {rw:.2f} s   ratio {rw / lw:.2f}x")
    lay = RunLayout.open(cfg, "bench-ray")
    for name, n in _bytes(lay, 1, cfg).items():
        print(f"  bytes/iteration: {name}: {n / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
