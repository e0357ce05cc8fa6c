"""Shard I/O throughput and its share of a rollout stage (not a test).

Runs one real branched rollout of the tiny model (default TinyModelConfig, CPU), then writes and
reads its shards through a local folder store and an S3 store (a moto server this script starts
as a child process on 127.0.0.1 and stops). Prints MB/s and samples/s for write and read, and the share of the
rollout stage's wall time spent writing its shards (goal: under 5%).

    .venv/bin/python -m benchmarks.bench_shards [--prompts 4 --k 6 --steps 10 --samples 480]

`--samples` sets how many branch-point samples the throughput runs move: the rollout's own
branch points, repeated under fresh prompt ids until there are that many.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch

from benchmarks.harness import interleaved, parser, set_threads
from flows import children

from tempflow_core.batches import RolloutBatch
from tempflow_core.shards import iter_samples, read_rollouts, write_rollouts
from tempflow_core.storage import ObjectStore, open_store


def make_rollout(prompts: int, k: int, steps: int, seed: int,
                 workdir: str) -> tuple[Callable[[], RolloutBatch], float]:
    """(run, build seconds): `run()` does one branched rollout of the tiny model (default
    TinyModelConfig, CPU), every step a branch step, images decoded, as a rollout stage does."""
    from tempflow_core.policies.models import build_tiny_pipeline
    from tempflow_core.policies.sd3 import SD3Policy
    from tempflow_core.algorithm.rollout import branched_rollout
    from tempflow_core.algorithm.schedule import make_schedule

    t0 = time.perf_counter()
    policy = SD3Policy(build_tiny_pipeline(workdir=workdir), None, device="cpu")
    build_s = time.perf_counter() - t0
    colors, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]
    texts = [f"a {colors[i % 4]} {shapes[i % 3]}" for i in range(prompts)]
    ids = [f"{i:06d}" for i in range(prompts)]
    schedule = make_schedule(steps)
    return (lambda: branched_rollout(policy, texts, ids, schedule, list(range(steps)), group_size=k,
                                     guidance_scale=4.5, seed=seed)), build_s


def replicate(batch: RolloutBatch, samples: int) -> RolloutBatch:
    """A batch of `samples` branch points: copies of the rollout's, under fresh prompt ids."""
    bps, prompts, ids, rows = [], [], [], []
    rep = 0
    while len(bps) < samples:
        for p, pid in enumerate(batch.prompt_ids):
            prompts.append(batch.prompts[p])
            ids.append(f"r{rep:03d}{pid}")
            rows.append(p)
        for bp in batch.branch_points:
            if len(bps) == samples:
                break
            c = copy.copy(bp)
            c.prompt_index = rep * len(batch.prompt_ids) + bp.prompt_index
            c.prompt_id = ids[c.prompt_index]
            bps.append(c)
        rep += 1
    e = batch.embeds.select(torch.tensor(rows))
    return RolloutBatch("branch", prompts, ids, e, batch.sigmas, branch_points=bps)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """(median seconds of `repeats` calls, the last call's value)."""
    t = interleaved({"fn": fn}, repeats)
    return t.median("fn"), t.results["fn"]


def throughput(name: str, store: ObjectStore, big: RolloutBatch, spp: int, repeats: int) -> dict[str, float]:
    """Write / read MB/s and samples/s of `big` through `store` (medians of `repeats`)."""
    counter = iter(range(10**6))
    prefixes: list[str] = []

    def write() -> object:
        prefixes.append(f"bench/{name}/t{next(counter):04d}")
        return write_rollouts(big, store, prefixes[-1], samples_per_shard=spp, producer={"iteration": 0})

    write_s, m = timed(write, repeats)
    nbytes = sum(s.bytes for s in m.shards) + sum(o.bytes for o in m.objects.values())  # type: ignore[attr-defined]
    read_s, back = timed(lambda: read_rollouts(store, prefixes[-1]), repeats)
    stream_s, _ = timed(lambda: sum(1 for _ in iter_samples(store, prefixes[-1], nodesplitter=None, images=False)),
                        repeats)
    assert len(back.branch_points) == len(big.branch_points)  # type: ignore[attr-defined]
    n, mb = len(big.branch_points), nbytes / 1e6
    return {"samples": n, "MB": mb, "shards": len(m.shards), "write_MBps": mb / write_s,  # type: ignore[attr-defined]
            "write_sps": n / write_s, "read_MBps": mb / read_s, "read_sps": n / read_s, "stream_sps": n / stream_s}


def stage_shares(run: Callable[[], RolloutBatch], stores: dict[str, ObjectStore], spp: int,
                 repeats: int) -> tuple[RolloutBatch, list[float], dict[str, list[float]]]:
    """Rollout, then write its shards to each store, `repeats` times, interleaved so that both see
    the same machine load (this box is shared). Returns (last batch, rollout s, write s per store)."""
    rollout_s: list[float] = []
    write_s: dict[str, list[float]] = {n: [] for n in stores}
    batch = None
    for r in range(repeats):
        t0 = time.perf_counter()
        batch = run()
        rollout_s.append(time.perf_counter() - t0)
        for name, store in stores.items():
            t0 = time.perf_counter()
            write_rollouts(batch, store, f"bench/{name}/stage{r:03d}", samples_per_shard=spp, producer={"iteration": r})
            write_s[name].append(time.perf_counter() - t0)
    assert batch is not None
    return batch, rollout_s, write_s


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server as a child process on 127.0.0.1 (its CPU time is not ours, as with a real
    server); the caller stops it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = children.spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with code {proc.returncode}") from None
            time.sleep(0.1)
    stop_moto(proc)
    raise RuntimeError("moto server did not start within 30 s")


def stop_moto(proc: subprocess.Popen[bytes]) -> None:
    children.stop(proc, timeout=10)


def main() -> None:
    ap = parser(__doc__, repeats=3, threads=1)  # 1 thread: on a shared box 2 threads stall under contention
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--samples", type=int, default=480, help="branch points moved in the throughput runs")
    ap.add_argument("--samples-per-shard", type=int, default=32)
    ap.add_argument("--no-s3", action="store_true")
    args = ap.parse_args()
    set_threads(args)

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="tempflow-bench-shards-"))
        run, build_s = make_rollout(args.prompts, args.k, args.steps, seed=0, workdir=os.path.join(tmp, "tok"))
        stores: dict[str, ObjectStore] = {"local": open_store(os.path.join(tmp, "store"))}
        if not args.no_s3:
            server, endpoint = start_moto()
            stack.callback(stop_moto, server)
            stores["s3 (moto)"] = open_store("s3://tempflow-bench/data", endpoint_url=endpoint, create_bucket=True,
                                             aws_access_key_id="bench", aws_secret_access_key="bench-secret",
                                             region_name="us-east-1")
        batch, rollout_s, stage_write_s = stage_shares(run, stores, args.samples_per_shard, args.repeats)
        big = replicate(batch, args.samples)
        results = {name: throughput(name.split()[0], st, big, args.samples_per_shard, args.repeats)
                   for name, st in stores.items()}

    bp = batch.branch_points[0]
    med_roll = statistics.median(rollout_s)
    print(f"rollout stage: {args.prompts} prompts x {args.steps} branch steps x K={args.k} -> "
          f"{len(batch.branch_points)} branch points, {len(batch.sample_keys())} children; latent "
          f"{tuple(bp.x_k.shape)}, image {tuple(bp.images.shape[1:])}; rollout {med_roll:.2f} s median "
          f"(runs {', '.join(f'{t:.2f}' for t in rollout_s)}; tiny model, CPU, {args.threads} threads); "
          f"model build {build_s:.2f} s")
    r0 = next(iter(results.values()))
    print(f"throughput: {r0['samples']} samples ({r0['samples'] * args.k} children), {r0['MB']:.1f} MB in "
          f"{r0['shards']} shards of <= {args.samples_per_shard} samples; medians of {args.repeats}")
    print(f"{'store':<10} {'write MB/s':>10} {'write smp/s':>11} {'read MB/s':>10} {'read smp/s':>10} "
          f"{'stream smp/s':>12} {'stage write s':>13} {'share':>7} {'share w/ load':>13}")
    for name, r in results.items():
        shares = [w / (ro + w) for ro, w in zip(rollout_s, stage_write_s[name])]
        w_med = statistics.median(stage_write_s[name])
        print(f"{name:<10} {r['write_MBps']:>10.1f} {r['write_sps']:>11.0f} {r['read_MBps']:>10.1f} "
              f"{r['read_sps']:>10.0f} {r['stream_sps']:>12.0f} {w_med:>13.3f} "
              f"{100 * statistics.median(shares):>6.2f}% {100 * w_med / (build_s + med_roll + w_med):>12.2f}%")
    print("read = read_rollouts (verify sha256, decode tensors + PNGs, rebuild dataclasses); stream = iter_samples, "
          "no images. share = shard writing / (rollout + shard writing), median over the interleaved runs; "
          "'w/ load' also counts building the model. Goal < 5%. moto runs as a child process on this machine.")


if __name__ == "__main__":
    main()
