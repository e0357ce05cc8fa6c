"""Model families side by side: sizes of the real SD3.5-M and FLUX.1-dev, CPU throughput of the tiny builders.

    .venv/bin/python -m benchmarks.bench_families [--repeats 3] [--threads 1]
        [--sd3 tests/flux/fixtures/sd35m] [--flux tests/flux/fixtures/flux1-dev]

1. Real configs (flows/configs/models/*.yaml against a model folder; config files are enough:
   the modules are built on the meta device): parameters per component, LoRA parameters
   (r 32 on the attention targets), and a peak-memory estimate of one training process
   (bf16 weights, float32 LoRA with AdamW, gradient checkpointing):

       weights      every component at 2 bytes (text encoders and VAE stay on the device)
       LoRA state   16 bytes a LoRA parameter (float32 weight, gradient, Adam m and v)
       learner      rows x tokens x width x 2 bytes x (blocks + C): one saved block input per
                    block, plus one block's activations recomputed in backward (C = 16, a rough
                    count of the joint block's live tensors: q, k, v, attention out, 4x MLP ...);
                    rows = micro_batch units (x2 for SD3's CFG pair)
       rollout      rows x tokens x width x 2 bytes x C (no grad: one block live), rows = max_batch (x2 CFG)
       peak         weights + LoRA state + max(learner, rollout)

   An estimate to size a GPU, not a measurement; the tokens include the text sequence.
2. Tiny builders on the CPU (random weights, the tests' sizes): branched rollouts (wavefront,
   all steps branch, no decoding) and one learner update over their branch points; medians.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from benchmarks.harness import parser, set_threads
from tempflow_core.config import LoraSettings, LossConfig, TinyModelConfig, TrainConfig, load_config
from tempflow_core.algorithm.learner import build_units, make_optimizer, update
from tempflow_core.families import FAMILIES, family_spec
from tempflow_core.policies.models import load_pipeline_meta
from tempflow_core.families import make_policy
from tempflow_core.algorithm.rollout import branched_rollout

ROOT = Path(__file__).resolve().parents[1]

C_BLOCK = 16  # live tensors of one block, in units of tokens x width (see the docstring)


def count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def real_sizes(name: str, folder: str) -> None:
    """Parameter counts and the memory estimate of flows/configs/models/<name> on `folder`."""
    cfg = load_config(ROOT / "flows" / "configs" / "models" / name, [f"model.path={folder}"])
    pipe = load_pipeline_meta(folder)
    pol = make_policy(pipe, cfg.lora, "meta", cfg.model.max_sequence_length, cfg.model.resolution)
    comps = {k: count(getattr(pipe, k, None)) for k in ("transformer", "text_encoder", "text_encoder_2",
                                                         "text_encoder_3", "vae")}
    lora = sum(p.numel() for p in pol.lora_parameters())
    base = sum(comps.values()) - lora  # the transformer count includes the attached adapter
    c, h, w = pol.latent_shape()
    tc = pipe.transformer.config
    img_tokens = (h // 2) * (w // 2)  # 2x2 patches: SD3's patch embedding, FLUX's packing
    width = tc.num_attention_heads * tc.attention_head_dim
    blocks = tc.num_layers + getattr(tc, "num_single_layers", 0)  # FLUX: double- and single-stream blocks
    cfg_rows = cfg.rows_per_sample()
    text_tokens = pol.text_tokens()
    tokens = img_tokens + text_tokens
    gb = 1024**3
    weights = 2 * base / gb
    lora_state = 16 * lora / gb
    learner = cfg.train.micro_batch * cfg_rows * tokens * width * 2 * (blocks + C_BLOCK) / gb
    rollout = cfg.rollout.max_batch * cfg_rows * tokens * width * 2 * C_BLOCK / gb
    print(f"\n{name} ({type(pipe).__name__}, {cfg.model.resolution} px, latent {(c, h, w)}, "
          f"{img_tokens} image + {text_tokens} text tokens, width {width}, {blocks} blocks)")
    for k, v in comps.items():
        if v:
            print(f"  {k:<15} {(v - (lora if k == 'transformer' else 0)) / 1e9:8.3f} B params")
    print(f"  {'total':<15} {base / 1e9:8.3f} B params; LoRA r {cfg.lora.rank}: {lora / 1e6:.1f} M params "
          f"on {len({n.rsplit('.lora_A', 1)[0] for n, _ in pipe.transformer.named_modules() if n.endswith('.lora_A')})} modules")
    print(f"  memory estimate: weights {weights:.1f} GiB + LoRA/AdamW {lora_state:.2f} GiB + "
          f"max(learner {learner:.1f} GiB [micro_batch {cfg.train.micro_batch} x {cfg_rows} rows], "
          f"rollout {rollout:.1f} GiB [max_batch {cfg.rollout.max_batch} x {cfg_rows} rows]) "
          f"= peak ~{weights + lora_state + max(learner, rollout):.1f} GiB")


def tiny_throughput(family: str, repeats: int) -> None:
    """Branched rollouts and one learner update on the tiny model of `family`, CPU."""
    torch.manual_seed(0)
    tiny = TinyModelConfig(family=family)
    spec = family_spec(family)
    pipe = spec.load("tiny_builder")(tiny, None)
    pol = make_policy(pipe, LoraSettings(rank=8, alpha=16), "cpu")
    guidance = spec.defaults.guidance_scale  # FLUX: guidance input; SD3: CFG (two rows a sample)
    B, K, T = 4, 4, 6  # flows/configs/default.yaml: 4 prompts, K 4, 6 steps
    words = ["red", "green", "blue", "yellow"]
    prompts = [f"a {words[i % 4]} circle left of a {words[(i + 1) % 4]} square" for i in range(B)]
    ids = [f"p{i}" for i in range(B)]
    s = pol.schedule(T)
    steps = list(range(T - 1))
    rt, lt = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        b = branched_rollout(pol, prompts, ids, s, steps, K, guidance, seed=r, decode=False)
        rt.append(time.perf_counter() - t0)
        adv = np.random.default_rng(r).normal(size=len(b.sample_keys())).astype(np.float32)
        units = build_units(b, adv, dict(zip(steps, s.step_weights(steps).tolist())))
        tc = TrainConfig(lr=1e-3, micro_batch=16)
        opt = make_optimizer(pol, tc)
        t0 = time.perf_counter()
        update(pol, opt, units, b.embeds, s, guidance, tc, LossConfig(beta=0.004), torch.Generator().manual_seed(r))
        lt.append(time.perf_counter() - t0)
    samples = len(b.branch_points) * K
    rows = b.nfe * spec.rows_per_sample(guidance)  # transformer rows: SD3's CFG pair doubles them
    print(f"\ntiny {family}: transformer {count(pipe.transformer) / 1e6:.3f} M params (+ LoRA r 8), "
          f"latent {pol.latent_shape()}, {tiny.resolution} px")
    print(f"  rollout  {B} prompts x {len(steps)} branch steps x K {K} = {samples} samples: {b.forward_calls} calls, "
          f"{b.nfe} NFE, {rows} transformer rows; median {statistics.median(rt):.3f} s "
          f"= {samples / statistics.median(rt):.1f} samples/s, {rows / statistics.median(rt):.0f} rows/s")
    print(f"  learner  {len(units)} units x K {K}, micro-batch 16, KL on: median {statistics.median(lt):.3f} s "
          f"= {len(units) / statistics.median(lt):.1f} units/s")


def main() -> None:
    ap = parser(__doc__, repeats=3, threads=1)
    ap.add_argument("--sd3", default=str(ROOT / "tests" / "flux" / "fixtures" / "sd35m"),
                    help="SD3.5-M folder (configs suffice)")
    ap.add_argument("--flux", default=str(ROOT / "tests" / "flux" / "fixtures" / "flux1-dev"),
                    help="FLUX.1-dev folder (configs suffice)")
    args = ap.parse_args()
    set_threads(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)")
    real_sizes("sd35m.yaml", args.sd3)
    real_sizes("flux1-dev.yaml", args.flux)
    for spec in FAMILIES:
        tiny_throughput(spec.name, args.repeats)


if __name__ == "__main__":
    main()
