"""One command for the day a GPU is lent: the paper's path at SD3.5-M's size, checked against
the estimates the project makes without a GPU.

    .venv/bin/python -m benchmarks.gpu_validate --json results/gpu/validate/h100.json
    .venv/bin/python -m benchmarks.gpu_validate --size toy --device cpu     # the tiny sizes (what CI runs)

SD3.5-M's transformer and VAE are built from their published configs (tests/flux/fixtures/sd35m)
with random weights: nothing is downloaded; the text encoders are replaced by random embeddings
of the real shapes (benchmarks/gpu_smoke.py). Each of `--iterations` iterations runs the code a
run runs: a branched rollout (bf16, 512 px, T 10, CFG 4.5, branch points 0..8), its shards
written to a local store, the `brightness` reward, group advantages and the clipped update with
the noise-aware weights. Per stage it prints the peak device memory against the estimate of
`tempflow plan` (tempflow_core/memory.py, probed on the CPU; text encoders left out of both),
the rollout's MFU, the first minibatch's likelihood ratio (unchanged weights: it must be 1) and
the bytes the rollout's shards take. With two or more GPUs the same update also runs on two
ranks under NCCL (the learner's data parallelism), once with the whole transformer on each rank
and once sharded with FSDP2 (train.sharding=fsdp, with each rank's peak memory against the
sharded estimate), and both ranks must end with the one-process LoRA. The default batch (2 prompts x K 6) runs in a few minutes on one H100.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from benchmarks.gpu_smoke import PEAK_BF16_TFLOPS, RandomTextPolicy, build_pipeline, flops_of, peak_gib, sync
from tempflow_core.algorithm.advantages import compute_advantages
from tempflow_core.algorithm.learner import build_units, make_optimizer, update
from tempflow_core.algorithm.rollout import branched_rollout
from tempflow_core.algorithm.steps import noise_aware_weights, step_pool
from tempflow_core.batches import group_of_key
from tempflow_core.config import LoraSettings, load_config
from tempflow_core.memory import GIB, estimate, load_facts, probe
from tempflow_core.rewards import RewardRegistry
from tempflow_core.run.layout import RunLayout
from tempflow_core.shards import write_rollouts
from tempflow_core.storage import open_store

ROOT = Path(__file__).resolve().parents[1]

FIXTURE = ROOT / "tests" / "flux" / "fixtures" / "sd35m"


def _config(args: argparse.Namespace, dtype: str, *extra: str):
    sets = [*extra, f"rollout.prompts_per_iter={args.prompts}", f"rollout.group_size={args.group_size}",
            f"sampling.num_steps={args.steps}", f"rollout.max_batch={args.max_batch}",
            f"train.micro_batch={args.micro_batch}", f"train.gradient_checkpointing={str(args.checkpointing).lower()}",
            f"model.dtype={dtype}", "reward.name=brightness", "train.minibatches=1"]
    if args.size == "toy":
        return load_config(overrides=sets + ["model.path=null", "lora.rank=4", "lora.alpha=8"])
    return load_config(ROOT / "flows" / "configs" / "models" / "sd35m.yaml", sets + [f"model.path={FIXTURE}"])


def _estimate(cfg, args: argparse.Namespace) -> dict[str, float]:
    """The estimate's peaks (GiB) without text encoders (gpu_smoke's policy has none)."""
    facts, meta = load_facts(cfg)
    sample = probe(meta, cfg.lora, cfg.model.dtype, facts.pixels, cfg.model.max_sequence_length, cfg.guidance_scale(),
                   cfg.model.num_frames)
    out = {}
    for stage, f in estimate(cfg, facts, sample, gpu=args.device != "cpu").items():
        out[stage] = max(sum(v for k, v in p.items() if k != "text encoders") for name, p in f.phases.items()
                         if name != "encode prompts") / GIB
    return out


def _ranks(rank: int, world: int, args: argparse.Namespace, path: str, result: str, sharded: bool) -> None:
    """One NCCL rank of the update in `path` (units, embeddings, initial LoRA): its share, the
    all-reduces (the transformer FSDP-sharded when `sharded`), its final LoRA written to
    `result`-rank.safetensors and its peak memory (GiB, a GPU's) to `result`-rank.json."""
    import safetensors.torch
    import torch.distributed as dist

    from tempflow_core.algorithm.data_parallel import DataParallel, collective_device
    from tempflow_core.algorithm.learner import TrainUnits
    from tempflow_core.batches import PromptEmbeds

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("TEMPFLOW_VALIDATE_PORT", "29511"))
    gpu = args.device == "cuda"
    if gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)
    dtype = "bfloat16" if gpu else "float32"
    cfg = _config(args, dtype)
    device = torch.device("cuda", rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)  # the peak counts the model's load
    # sharded: loaded on the host, then the transformer sharded onto the device block by block (as a
    # sharded learner rank's session is set up), so the device never holds the whole transformer
    policy, schedule = _policy(args, torch.device("cpu") if sharded else device, getattr(torch, dtype))
    if sharded:
        policy.shard_onto(device)
    saved = safetensors.torch.load_file(path)
    policy.load_lora_state_dict({k[5:]: v for k, v in saved.items() if k.startswith("lora.")})
    units = TrainUnits(*(saved[f"units.{f}"] for f in ("x", "x_next", "old_log_prob", "advantages", "step",
                                                       "prompt_index", "weight", "kl_weight")))
    emb = PromptEmbeds.from_tensors({k[4:]: v for k, v in saved.items() if k.startswith("emb.")}).to(policy.device)
    owned = torch.arange(rank, len(units), world)
    dp = DataParallel(rank, world, len(units), owned, collective_device(dist.get_backend_config(), policy.device),
                      sharded=sharded)
    optimizer = make_optimizer(policy, cfg.train)
    update(policy, optimizer, units.subset(owned), emb, schedule, cfg.guidance_scale(), cfg.train, cfg.loss,
           torch.Generator().manual_seed(0), dp=dp)
    lora = policy.lora_state_dict()  # every rank: gathering a sharded LoRA is a collective
    safetensors.torch.save_file(lora, f"{result}-{rank}.safetensors")
    Path(f"{result}-{rank}.json").write_text(json.dumps({"peak_gib": peak_gib(policy.device)}))
    dist.destroy_process_group()


def _policy(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    pipe, tokens, resolution = build_pipeline(args.size, device, dtype)
    torch.manual_seed(0)  # the same LoRA initialisation in every process
    policy = RandomTextPolicy(pipe, LoraSettings(rank=32 if args.size != "toy" else 4, alpha=64 if args.size != "toy"
                                                 else 8), device=str(device), resolution=resolution,
                              gradient_checkpointing=args.checkpointing, tokens=tokens)
    return policy, policy.schedule(args.steps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["sd35m", "toy"], default="sd35m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=24)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--two-ranks", action="store_true", help="also run the update on two ranks where fewer than two "
                    "GPUs exist (gloo on the CPU: the code path, not NCCL)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    args.device = device.type
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    cfg = _config(args, dtype)
    est = _estimate(cfg, args)
    policy, schedule = _policy(args, device, getattr(torch, dtype))
    policy.decode_chunk = cfg.rollout.decode_chunk
    reward = RewardRegistry.for_config(cfg.reward).build("brightness")
    optimizer = make_optimizer(policy, cfg.train)
    steps = step_pool("all", args.steps)
    weights = noise_aware_weights(schedule, steps, "mean1", 2.25)
    prompts = [f"validate prompt {i}" for i in range(args.prompts)]
    emb1 = policy.encode_prompts(prompts[:1])
    x1 = torch.randn(1, *policy.latent_shape(), device=device)
    with torch.no_grad():
        nfe_flops = flops_of(lambda: policy.velocity(x1, torch.tensor(0.5), emb1, 4.5))
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name(device)),
                None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.size} on {name}: {args.prompts} prompts x K {args.group_size}, T {args.steps}, {dtype}; "
          f"estimate (GiB, no text encoders): rollout {est['rollout']:.2f}, learner {est['learner']:.2f}", flush=True)
    records = []
    store_dir = tempfile.mkdtemp(prefix="tempflow-validate-")
    for it in range(args.iterations):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0, nfe0 = time.perf_counter(), policy.nfe
        batch = branched_rollout(policy, prompts, [f"p{i}" for i in range(args.prompts)], schedule, steps,
                                 args.group_size, 4.5, seed=it, max_batch=args.max_batch)
        sync(device)
        rollout_s, nfe, rollout_peak = time.perf_counter() - t0, policy.nfe - nfe0, peak_gib(device)
        m = write_rollouts(batch, open_store(store_dir), RunLayout(open_store(store_dir), "validate").prefix(it, "rollout"))
        shard_bytes = sum(s.bytes for s in m.shards)
        keys = batch.sample_keys()
        idx = batch.prompt_index_per_sample()
        rewards, _ = reward(batch.images(), [prompts[i] for i in idx], [{} for _ in idx])
        adv, _ = compute_advantages(np.asarray(rewards), [group_of_key(k) for k in keys], "group", 5.0)
        units = build_units(batch, adv, {k: weights[k] for k in steps})
        lora0 = policy.lora_state_dict()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        stats = update(policy, optimizer, units, batch.embeds, schedule, 4.5, cfg.train, cfg.loss,
                       torch.Generator().manual_seed(it))
        sync(device)
        learner_s, learner_peak = time.perf_counter() - t0, peak_gib(device)
        mfu = nfe * nfe_flops / rollout_s / (peak * 1e12) if peak else None
        rec = {"iteration": it, "rollout_s": rollout_s, "rollout_nfe": nfe, "rollout_peak_gib": rollout_peak,
               "rollout_estimate_gib": est["rollout"], "rollout_mfu": mfu, "shard_bytes": shard_bytes,
               "learner_s": learner_s, "learner_peak_gib": learner_peak, "learner_estimate_gib": est["learner"],
               "ratio_first_min": stats["ratio_first_min"], "ratio_first_max": stats["ratio_first_max"],
               "reward_mean": float(np.mean(rewards))}
        records.append(rec)
        mem = (lambda g, e: f"peak {g:.2f} GiB (estimate {e:.2f})" if g is not None else f"estimate {e:.2f} GiB")
        print(f"iteration {it}: rollout {nfe} NFE in {rollout_s:.1f} s, {mem(rollout_peak, est['rollout'])}"
              f"{f', MFU {100 * mfu:.1f}%' if mfu else ''}, shards {shard_bytes / 2**20:.1f} MiB | learner "
              f"{learner_s:.1f} s, {mem(learner_peak, est['learner'])}, first minibatch's ratio "
              f"[{stats['ratio_first_min']:.6f}, {stats['ratio_first_max']:.6f}]", flush=True)
    if args.two_ranks or (device.type == "cuda" and torch.cuda.device_count() >= 2):
        records.append(_two_ranks(args, policy, units, batch.embeds, lora0, schedule, cfg))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": name, "size": args.size, "records": records}, indent=2))
    return 0


def _two_ranks(args, policy, units, emb, lora0, schedule, cfg) -> dict:
    """The last update again on two NCCL ranks from the same LoRA: both ranks' LoRA against the one-process one."""
    import safetensors.torch
    import torch.multiprocessing as mp

    policy.load_lora_state_dict(lora0)
    update(policy, make_optimizer(policy, cfg.train), units, emb, schedule, 4.5, cfg.train, cfg.loss,
           torch.Generator().manual_seed(0))
    want = policy.lora_state_dict()
    tmp = tempfile.mkdtemp(prefix="tempflow-ranks-")
    saved = {**{f"lora.{k}": v for k, v in lora0.items()},
             **{f"units.{f}": getattr(units, f).contiguous() for f in ("x", "x_next", "old_log_prob", "advantages",
                                                                       "step", "prompt_index", "weight", "kl_weight")},
             **{f"emb.{k}": v.cpu().contiguous() for k, v in emb.tensors().items()}}
    safetensors.torch.save_file(saved, f"{tmp}/inputs.safetensors")
    out: dict = {}
    for sharded in (False, True):
        name = "fsdp" if sharded else "two_ranks"
        os.environ["TEMPFLOW_VALIDATE_PORT"] = str(int(os.environ.get("TEMPFLOW_VALIDATE_PORT", "29511")) + sharded)
        mp.spawn(_ranks, args=(2, args, f"{tmp}/inputs.safetensors", f"{tmp}/{name}", sharded), nprocs=2, join=True)
        worst = 0.0
        for rank in range(2):
            got = safetensors.torch.load_file(f"{tmp}/{name}-{rank}.safetensors")
            for k, w in want.items():
                worst = max(worst, float((got[k].float() - w.float()).norm()
                                         / (w - lora0[k]).float().norm().clamp_min(1e-12)))
        peaks = [json.loads(Path(f"{tmp}/{name}-{rank}.json").read_text())["peak_gib"] for rank in range(2)]
        ranks = ["pipeline.engine=ray", "train.workers=2", f"train.sharding={'fsdp' if sharded else 'none'}"]
        est = _estimate(_config(args, cfg.model.dtype, *ranks), args)["learner"]
        out.update({f"{name}_max_relative_delta_error": worst, f"{name}_peak_gib": peaks, f"{name}_estimate_gib": est})
        where = "NCCL" if args.device == "cuda" else "gloo"
        peak = f"peak {max(peaks):.2f} GiB a rank (estimate {est:.2f})" if peaks[0] is not None else \
            f"estimate {est:.2f} GiB a rank"
        print(f"two {where} ranks{', transformer sharded (FSDP2)' if sharded else ''}: the update's LoRA delta "
              f"within {worst:.2e} (relative) of one process's, {peak}", flush=True)
    return out

if __name__ == "__main__":
    raise SystemExit(main())
