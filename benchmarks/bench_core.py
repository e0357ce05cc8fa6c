"""Benchmark the rollout engine and the learner on the tiny SD3 model.

    .venv/bin/python -m benchmarks.bench_core [--prompts 4] [--k 6] [--steps 10] [--repeats 3] [--device cpu]

Rollouts: the wavefront engine against the structure of the paper's public code (ODE backbone;
at each branch step the K children leave it, then a separate inner loop finishes them).
Learner: one velocity per branch point (shared x_k) against one forward/backward per child.
Variants are interleaved and medians reported (benchmarks/harness.py); measure on an idle machine.
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.harness import interleaved, parser, set_threads

from tempflow_core.config import LoraSettings, LossConfig, TinyModelConfig
from tempflow_core.algorithm.learner import build_units, evaluate_units
from tempflow_core.policies.models import build_tiny_pipeline, load_pipeline
from tempflow_core.policies.sd3 import SD3Policy
from tempflow_core.algorithm.rollout import branched_rollout, branched_rollout_loop
from tempflow_core.algorithm.schedule import make_schedule


def main() -> None:
    ap = parser(__doc__, repeats=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--model", default=None, help="SD3 pipeline folder (default: random tiny model at 64 px)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    set_threads(args)
    torch.manual_seed(0)
    pipe = load_pipeline(args.model) if args.model else build_tiny_pipeline(TinyModelConfig(
        resolution=64, vae_channels=[32, 64, 64], layers=6, heads=4, head_dim=32, text_width=64, text_layers=2))
    policy = SD3Policy(pipe, LoraSettings(rank=32, alpha=64), args.device)
    print(f"device {policy.device}, threads {torch.get_num_threads()}, transformer "
          f"{sum(p.numel() for p in pipe.transformer.parameters()) / 1e6:.2f} M params, latent {policy.latent_shape()}")
    words = ["red", "green", "blue", "yellow"]
    prompts = [f"a {words[i % 4]} circle left of a {words[(i + 1) % 4]} square" for i in range(args.prompts)]
    ids = [f"p{i}" for i in range(args.prompts)]
    T, K = args.steps, args.k
    s = make_schedule(T)
    steps = list(range(T))

    # ---------------------------------------------------------------- rollouts
    def rollout(fn):
        return lambda: fn(policy, prompts, ids, s, steps, K, 4.5, seed=0, max_batch=args.max_batch, decode=False)

    times = interleaved({"wavefront": rollout(branched_rollout), "loop": rollout(branched_rollout_loop)}, args.repeats)
    floor = args.prompts * (T + K * T * (T - 1) // 2)
    print(f"\nrollouts: {args.prompts} prompts, K={K}, T={T}, CFG 4.5, all steps branch, max_batch {args.max_batch}")
    print(f"{'engine':<10} {'fwd calls':>9} {'NFE':>7} {'NFE/action':>10} {'median s':>9}")
    for name, b in times.results.items():
        actions = len(b.branch_points) * K
        print(f"{name:<10} {b.forward_calls:>9} {b.nfe:>7} {b.nfe / actions:>10.2f} {times.median(name):>9.3f}")
    print(f"NFE floor T + K*T(T-1)/2 per prompt: {floor} in all; "
          f"speed-up wavefront vs loop: {times.ratio('loop', 'wavefront'):.2f}x")

    # ---------------------------------------------------------------- learner
    b = branched_rollout(policy, prompts, ids, s, steps, K, 4.5, seed=0, decode=False)
    adv = np.random.default_rng(0).normal(size=len(b.sample_keys())).astype(np.float32)
    units = build_units(b, adv, dict(zip(steps, s.step_weights(steps).tolist())))
    loss_cfg = LossConfig(beta=0.004)
    params = policy.lora_parameters()
    with torch.no_grad():
        for p in params:
            p.add_(1e-3 * torch.randn_like(p))
    micro = 8

    def learner(shared: bool):
        def step():
            total = 0.0
            for idx in torch.split(torch.arange(len(units)), micro):
                terms = evaluate_units(policy, units.subset(idx), b.embeds, s, 4.5, loss_cfg, shared=shared)
                (terms.loss.sum() / (len(units) * K)).backward()
                total += float(terms.loss.detach().sum())
            return total / (len(units) * K), torch.cat([p.grad.flatten() for p in params])
        return step

    def clear(_name: str) -> None:
        for p in params:
            p.grad = None

    ltimes = interleaved({"shared": learner(True), "per-child": learner(False)}, args.repeats, before=clear)
    g1, g2 = ltimes.results["shared"][1], ltimes.results["per-child"][1]
    print(f"\nlearner: {len(units)} branch points x K={K} children, micro-batch {micro} units, CFG, KL on")
    for name, (loss, _) in ltimes.results.items():
        print(f"{name:<10} loss {loss:+.6f}  median {ltimes.median(name):.3f} s")
    print(f"speed-up shared vs per-child: {ltimes.ratio('per-child', 'shared'):.2f}x, "
          f"relative gradient difference {float((g1 - g2).norm() / g1.norm()):.2e}")


if __name__ == "__main__":
    main()
