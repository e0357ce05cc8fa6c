"""Throughput of the pretraining phases for the shipped 64 px config (images/s), on this CPU.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.pretrain_throughput --threads 2

OMP_WAIT_POLICY=PASSIVE matters on shared cores: with the default (spinning) policy and 2 threads,
another busy process on the same 2 cores slowed the tiny pretrain 5-10x in our measurements.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from benchmarks.harness import parser, set_threads


def main() -> None:
    ap = parser(__doc__, threads=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--eval", action="store_true", help="also time one evaluation (39 test prompts x 6, 20 steps, CFG)")
    a = ap.parse_args()
    set_threads(a)
    from tempflow_core.policies.models import build_tiny_pipeline
    from tempflow_core.pretrain import SHIPPED_MODEL, evaluate_pipeline, flow_loss, to_pixels

    pipe = build_tiny_pipeline(SHIPPED_MODEL)
    out = {"threads": a.threads}
    # VAE train step on 32x32 crops and on 64x64, batch 32
    opt = torch.optim.AdamW(pipe.vae.parameters(), lr=1e-3)
    for side in (32, 64):
        x = to_pixels(np.random.default_rng(0).integers(0, 255, (32, side, side, 3), dtype=np.uint8))
        ts = []
        for _ in range(a.iters):
            t = time.perf_counter()
            post = pipe.vae.encode(x).latent_dist
            loss = torch.nn.functional.mse_loss(pipe.vae.decode(post.sample()).sample, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ts.append(time.perf_counter() - t)
        out[f"vae_train_{side}px_img_s"] = round(32 / np.median(ts[2:]), 1)
    with torch.no_grad():
        x = to_pixels(np.zeros((256, 64, 64, 3), np.uint8))
        t = time.perf_counter()
        pipe.vae.encode(x)
        out["encode_img_s"] = round(256 / (time.perf_counter() - t), 1)
    params = [p for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=8e-4)
    caps = ["a red circle", "two blue squares", "a green triangle left of a yellow square", ""] * 16
    ts = []
    for _ in range(a.iters):
        x0 = torch.randn(64, 4, 16, 16)
        t = time.perf_counter()
        loss = flow_loss(pipe, x0, caps, torch.rand(64), torch.randn_like(x0))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ts.append(time.perf_counter() - t)
    out["transformer_train_img_s"] = round(64 / np.median(ts[2:]), 1)
    if a.eval:
        t = time.perf_counter()
        res, _, _ = evaluate_pipeline(pipe, "test", 6, 20, 3.0, 4.0, 0)
        out["eval_234_images_s"] = round(time.perf_counter() - t, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
