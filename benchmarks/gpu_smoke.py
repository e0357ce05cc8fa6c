"""GPU smoke test: one branched rollout and one learner update of an SD3.5-M-shaped model.

    python -m benchmarks.gpu_smoke                     # SD3.5-M transformer + VAE, 512 px, bf16, on the GPU
    python -m benchmarks.gpu_smoke --size toy          # the shipped tiny sizes on the CPU (what CI runs)

The transformer and the VAE are the real SD3.5-Medium configs (tests/flux/fixtures/sd35m,
copied from the public repository) with random weights: nothing is downloaded. The text
encoders are left out; prompts get random embeddings of the real shapes (77 CLIP + 256 T5
tokens x 4096, pooled 2048), since what this measures is the transformer. It runs the code
the trainer runs (`branched_rollout`, `build_units`, `update` with the tempflow weights, CFG
4.5, clip 1e-4, beta 0.004) and prints:

    images/s           children decoded per second of rollout (a branch point's K children count K)
    learner units/s    (branch point x child) terms per second of the update
    peak memory        torch.cuda.max_memory_allocated per phase (GPU only)
    MFU                model FLOPs (counted by torch.utils.flop_counter on one call of each kind)
                       over time, against the device's dense bf16 peak (--peak-tflops; known
                       for H100/H200/A100)

With --json FILE it also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch.utils.flop_counter import FlopCounterMode

from tempflow_core.config import LossConfig, LoraSettings, TrainConfig
from tempflow_core.algorithm.learner import build_units, evaluate_units, make_optimizer, update
from tempflow_core.policies.sd3 import SD3Policy
from tempflow_core.batches import PromptEmbeds
from tempflow_core.algorithm.rollout import branched_rollout
from tempflow_core.algorithm.steps import noise_aware_weights, step_pool

REAL = Path(__file__).resolve().parents[1] / "tests" / "flux" / "fixtures" / "sd35m"
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}  # dense, SXM
CLIP_TOKENS, T5_TOKENS = 77, 256


class RandomTextPolicy(SD3Policy):
    """The SD3 policy with the text encoders replaced by fixed random embeddings of the
    transformer's shapes (seeded per prompt, so a prompt always gets the same ones)."""

    def __init__(self, *args, tokens: int, **kwargs):
        self.tokens = tokens
        super().__init__(*args, **kwargs)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        cfg = self.transformer.config

        def embed(text: str) -> tuple[torch.Tensor, torch.Tensor]:
            g = torch.Generator().manual_seed(sum(map(ord, text)))
            return (torch.randn(self.tokens, cfg.joint_attention_dim, generator=g),
                    torch.randn(cfg.pooled_projection_dim, generator=g))

        pos, neg = [embed(p) for p in prompts], embed("")
        return PromptEmbeds(torch.stack([e for e, _ in pos]).to(self.device), torch.stack([p for _, p in pos]).to(self.device),
                            neg[0][None].to(self.device), neg[1][None].to(self.device))


def build_pipeline(size: str, device: torch.device, dtype: torch.dtype):
    """(pipeline without text encoders, text tokens, resolution)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    if size == "toy":
        from tempflow_core.policies.models import build_tiny_pipeline

        tiny = build_tiny_pipeline()
        transformer, vae, tokens, resolution = tiny.transformer, tiny.vae, 16, None
    else:
        def config(component: str) -> dict:
            return json.loads((REAL / component / "config.json").read_text())

        with torch.device(device):
            transformer = SD3Transformer2DModel.from_config(config("transformer"))
            vae = AutoencoderKL.from_config(config("vae"))
        tokens, resolution = CLIP_TOKENS + T5_TOKENS, 512
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer.to(dtype), vae=vae.to(dtype), scheduler=scheduler,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    return pipe, tokens, resolution


def flops_of(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["sd35m", "toy"], default="sd35m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=6, help="K children per branch point")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps T (branch points 0..T-2)")
    ap.add_argument("--micro-batch", type=int, default=2, help="learner units per forward/backward")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    t0 = time.perf_counter()
    pipe, tokens, resolution = build_pipeline(args.size, device, dtype)
    policy = RandomTextPolicy(pipe, LoraSettings(rank=32, alpha=64), device=str(device), resolution=resolution,
                              gradient_checkpointing=args.gradient_checkpointing, tokens=tokens)
    build_s = time.perf_counter() - t0
    C, H, W = policy.latent_shape()
    params = sum(p.numel() for p in policy.transformer.parameters())
    print(f"{args.size}: transformer {params / 1e9:.3f} B parameters ({dtype}), latent {C}x{H}x{W}, "
          f"{tokens} text tokens, device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"built in {build_s:.1f} s", flush=True)

    schedule = policy.schedule(args.steps)
    prompts = [f"smoke prompt {i}" for i in range(args.prompts)]
    ids = [f"p{i}" for i in range(args.prompts)]
    branch = step_pool("all", args.steps)
    guidance = 4.5

    # one CFG call (2 rows) per NFE, counted once on a single sample
    emb = policy.encode_prompts(prompts[:1])
    x1 = torch.randn(1, C, H, W, device=device)
    with torch.no_grad():
        nfe_flops = flops_of(lambda: policy.velocity(x1, torch.tensor(0.5), emb, guidance))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    nfe0 = policy.nfe
    batch = branched_rollout(policy, prompts, ids, schedule, branch, args.group_size, guidance, seed=0, max_batch=64)
    sync(device)
    rollout_s, rollout_nfe, rollout_peak = time.perf_counter() - t0, policy.nfe - nfe0, peak_gib(device)
    images = sum(bp.x_next.shape[0] for bp in batch.branch_points)

    weights = noise_aware_weights(schedule, branch, "mean1", 2.25)
    adv = torch.randn(images).numpy()  # a reward model is not part of this smoke test
    units = build_units(batch, adv, {k: weights[k] for k in branch})
    train_cfg = TrainConfig(lr=1e-4, micro_batch=args.micro_batch, minibatches=1)
    loss_cfg = LossConfig(clip_range=1e-4, beta=0.004)
    optimizer = make_optimizer(policy, train_cfg)
    gen = torch.Generator().manual_seed(0)

    def one_unit() -> None:  # forward with grad (CFG) + reference forward + backward, one branch point
        terms = evaluate_units(policy, units.subset(torch.tensor([0])), batch.embeds, schedule, guidance, loss_cfg)
        terms.loss.sum().backward()

    unit_flops = flops_of(one_unit)
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    stats = update(policy, optimizer, units, batch.embeds, schedule, guidance, train_cfg, loss_cfg, gen)
    sync(device)
    learner_s, learner_peak = time.perf_counter() - t0, peak_gib(device)
    terms = len(units) * units.children

    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items()
                                     if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)
    flops = {"rollout": rollout_nfe * nfe_flops, "learner": len(units) * unit_flops}
    out = {
        "size": args.size, "device": str(device), "dtype": str(dtype), "transformer_params": params,
        "prompts": args.prompts, "group_size": args.group_size, "steps": args.steps,
        "rollout_s": rollout_s, "rollout_nfe": rollout_nfe, "images": images, "images_per_s": images / rollout_s,
        "learner_s": learner_s, "learner_units": len(units), "learner_terms": terms,
        "learner_units_per_s": terms / learner_s, "loss": stats.get("loss"),
        "flops_per_nfe": nfe_flops, "flops_per_learner_unit": unit_flops,
        "rollout_tflops_per_s": flops["rollout"] / rollout_s / 1e12,
        "learner_tflops_per_s": flops["learner"] / learner_s / 1e12,
        "rollout_peak_gib": rollout_peak, "learner_peak_gib": learner_peak, "peak_tflops": peak,
        "rollout_mfu": flops["rollout"] / rollout_s / (peak * 1e12) if peak else None,
        "learner_mfu": flops["learner"] / learner_s / (peak * 1e12) if peak else None,
    }
    mem = lambda g: f", peak {g:.1f} GiB" if g is not None else ""  # noqa: E731
    mfu = lambda m: f", MFU {100 * m:.1f}%" if m is not None else ""  # noqa: E731
    print(f"rollout: {images} images ({args.prompts} prompts x {len(branch)} branch points x K {args.group_size}), "
          f"{rollout_nfe} NFE in {rollout_s:.2f} s: {out['images_per_s']:.2f} images/s, "
          f"{out['rollout_tflops_per_s']:.3g} TFLOP/s{mem(rollout_peak)}{mfu(out['rollout_mfu'])}")
    print(f"learner: {terms} units ({len(units)} branch points x K {units.children}) in {learner_s:.2f} s: "
          f"{out['learner_units_per_s']:.2f} units/s, {out['learner_tflops_per_s']:.3g} TFLOP/s"
          f"{mem(learner_peak)}{mfu(out['learner_mfu'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
